"""deploy/: the Vault setup script run with the real `bao` CLI against
devvault and OpenBao (its policy lets the agent run a full lifecycle and
nothing more), and the plain manifests."""

import glob
import os
import signal
import subprocess
import time
import uuid

import hvac
import hvac.exceptions
import kubernetes_validate
import psycopg
import pytest
import yaml

from conftest import ROOT, bao_bin
from test_chart import leasehold_bin


def wait_for(cond, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail("timed out waiting for " + what)


def test_setup_script_policy_allows_the_lifecycle_and_nothing_more(fresh_server, postgres, issuer, tmp_path):
    url = fresh_server.url
    admin_pw = "adm-" + uuid.uuid4().hex
    admin = "setup_admin_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres.dsn("postgres", postgres.password), autocommit=True) as conn:
        conn.execute("CREATE ROLE %s WITH LOGIN SUPERUSER PASSWORD '%s'" % (admin, admin_pw))
    pem = tmp_path / "sa.pem"
    pem.write_text(issuer.cert_pem)
    # The bao CLI (the vault CLI's fork, same commands) reads VAULT_ADDR/VAULT_TOKEN.
    env = dict(os.environ, VAULT_CLI=bao_bin(), VAULT_ADDR=url, VAULT_TOKEN="root",
               DB_HOST="127.0.0.1", DB_PORT=str(postgres.port), DB_NAME="postgres", DB_SSLMODE="disable",
               DB_ADMIN_USER=admin, DB_ADMIN_PASSWORD=admin_pw, K8S_HOST=fresh_server.k8s_host,
               K8S_CA_FILE=str(pem), K8S_PEM_KEYS_FILE=str(pem), DB_TTL="1h", DB_MAX_TTL="2h")
    out = subprocess.run([os.path.join(ROOT, "deploy", "vault", "setup.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vault is configured" in out.stdout

    root = hvac.Client(url=url, token="root")
    # rotate-root ran: the admin password the script was given no longer works.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.dsn(admin, admin_pw))
    # A second role the policy does not cover.
    root.secrets.database.create_role(name="other-role", db_name="production-db",
                                      creation_statements=["CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}';"])
    root.write("database/config/production-db", allowed_roles="app-role,other-role")

    jwt = issuer.mint(aud=["vault"])
    token_file = tmp_path / "token"
    token_file.write_text(jwt)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    config = tmp_path / "leasehold.yaml"
    config.write_text(
        "vault:\n  address: %s\nauth:\n  kubernetes:\n    role: app-role\n    token_path: %s\n"
        "secrets:\n  - name: db\n    path: database/creds/app-role\n    files:\n      - path: %s/db.json\n        format: json\n"
        "telemetry:\n  listen: 127.0.0.1:0\n" % (url, token_file, secrets))
    agent = subprocess.Popen([leasehold_bin(), "agent", "-c", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (secrets / "db.json").exists(), 20, "db.json")
        creds = yaml.safe_load((secrets / "db.json").read_text())
        with psycopg.connect(postgres.dsn(creds["username"], creds["password"])) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == creds["username"]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0, agent.stdout.read()
    finally:
        if agent.poll() is None:
            agent.kill()
    with psycopg.connect(postgres.dsn("postgres", postgres.password)) as conn:
        gone = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (creds["username"],)).fetchone()[0] == 0
    assert gone, "revoked at shutdown with the policy's sys/leases/revoke"

    # The same token may not read another role's credentials.
    client = hvac.Client(url=url)
    client.auth.kubernetes.login(role="app-role", jwt=jwt)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.generate_credentials(name="other-role", mount_point="database")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.sys.list_leases("database/creds/")
    # Nor revoke another role's lease, in either form, nor renew it by the
    # path form. (The body form of renew is in Vault's default policy.)
    other = root.secrets.database.generate_credentials(name="other-role", mount_point="database")["lease_id"]
    for path, body in [("sys/leases/revoke/" + other, {}), ("sys/leases/revoke", {"lease_id": other}),
                       ("sys/leases/renew/" + other, {})]:
        with pytest.raises(hvac.exceptions.Forbidden):
            client.adapter.put("/v1/" + path, json=body)


def test_plain_manifests_validate_and_config_passes_check(tmp_path):
    docs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml"))):
        if path.endswith("kustomization.yaml"):
            kust = yaml.safe_load(open(path))
            listed = set(kust["resources"])
            continue
        docs.extend(d for d in yaml.safe_load_all(open(path)) if d)
    assert {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml"))} - {"kustomization.yaml"} == listed
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    sidecar = deployment["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["restartPolicy"] == "Always" and sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["leasehold.yaml"]
    (tmp_path / "leasehold.yaml").write_text(config)
    out = subprocess.run([leasehold_bin(), "check", "-c", str(tmp_path / "leasehold.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
