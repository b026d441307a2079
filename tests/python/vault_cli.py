"""A stand-in for the `vault` CLI subset deploy/vault/setup.sh uses, making
the same HTTP calls the real CLI makes (VAULT_ADDR, VAULT_TOKEN):

  secrets enable TYPE        POST sys/mounts/TYPE   {"type": TYPE}
  auth enable TYPE           POST sys/auth/TYPE     {"type": TYPE}
  write [-force] PATH k=v…   PUT  PATH              {k: v}   (v=@file reads the file)
  policy write NAME FILE|-   PUT  sys/policies/acl/NAME {"policy": …}
"""

import json
import os
import sys
import urllib.error
import urllib.request


def call(method, path, body):
    req = urllib.request.Request(
        os.environ["VAULT_ADDR"].rstrip("/") + "/v1/" + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"X-Vault-Token": os.environ["VAULT_TOKEN"], "X-Vault-Request": "true"},
    )
    try:
        with urllib.request.urlopen(req) as resp:
            text = resp.read().decode()
            for w in (json.loads(text).get("warnings") or []) if text else []:
                print("WARNING! " + w, file=sys.stderr)
    except urllib.error.HTTPError as e:
        errors = json.loads(e.read().decode() or "{}").get("errors", [])
        print("Error writing data to %s: Code: %d. Errors:\n\n* %s" % (path, e.code, "\n* ".join(errors)), file=sys.stderr)
        sys.exit(2)


def kv(args):
    data = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if value.startswith("@"):
            with open(value[1:]) as f:
                value = f.read()
        data[key] = value
    return data


def main(argv):
    if argv[:2] == ["secrets", "enable"]:
        call("POST", "sys/mounts/" + argv[2], {"type": argv[2]})
    elif argv[:2] == ["auth", "enable"]:
        call("POST", "sys/auth/" + argv[2], {"type": argv[2]})
    elif argv[:2] == ["policy", "write"]:
        source = argv[3]
        text = sys.stdin.read() if source == "-" else open(source).read()
        call("PUT", "sys/policies/acl/" + argv[2], {"policy": text})
    elif argv[0] == "write":
        args = [a for a in argv[1:] if a != "-force"]
        call("PUT", args[0], kv(args[1:]))
    else:
        print("unsupported: vault " + " ".join(argv), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
