"""The seed article's application code, as a sidecar loop: its hvac
functions (Kubernetes login, generate_credentials, renew_lease, revoke on
SIGTERM), renewing at half the TTL and fetching new credentials when a
renewal fails, writing them to a file atomically. Used by benches/compare.rs
as the third contender; not part of leasehold.

Environment: VAULT_ADDR, JWT_PATH, ROLE (Kubernetes auth role), DB_ROLE
(database role), OUT (file to write)."""

import json
import os
import signal
import sys
import time

import hvac


def get_vault_client() -> hvac.Client:
    client = hvac.Client(url=os.environ["VAULT_ADDR"])
    with open(os.environ["JWT_PATH"], "r") as f:
        jwt = f.read()
    client.auth.kubernetes.login(role=os.environ["ROLE"], jwt=jwt, mount_point="kubernetes")
    return client


def get_database_credentials(client: hvac.Client) -> dict:
    response = client.secrets.database.generate_credentials(name=os.environ["DB_ROLE"], mount_point="database")
    return {
        "username": response["data"]["username"],
        "password": response["data"]["password"],
        "lease_id": response["lease_id"],
        "lease_duration": response["lease_duration"],
    }


def renew_lease(client: hvac.Client, lease_id: str, increment: int) -> int:
    try:
        response = client.sys.renew_lease(lease_id=lease_id, increment=increment)
        return response["lease_duration"]
    except hvac.exceptions.InvalidRequest:
        return 0


def write(creds: dict) -> None:
    out = os.environ["OUT"]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"username": creds["username"], "password": creds["password"]}, f)
    os.replace(tmp, out)


def main() -> None:
    client = get_vault_client()
    creds = get_database_credentials(client)
    write(creds)

    def handler(signum, frame):
        client.sys.revoke_lease(lease_id=creds["lease_id"])
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    ttl = creds["lease_duration"]
    while True:
        time.sleep(ttl / 2)
        ttl = renew_lease(client, creds["lease_id"], creds["lease_duration"])
        if ttl <= 1:
            client.sys.revoke_lease(lease_id=creds["lease_id"])
            creds.update(get_database_credentials(client))
            write(creds)
            ttl = creds["lease_duration"]


if __name__ == "__main__":
    main()
