"""Fixtures for driving devvault with hvac, as the seed article's app does.

A real PostgreSQL cluster is started for the session (initdb in a temp dir,
run as the `postgres` user when we are root); the devvault binary built by
cargo is started on a free port. If either cannot start, the tests fail.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import jwt as pyjwt
import psycopg
import pytest
import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir():
    if os.environ.get("PG_BINDIR"):
        return os.environ["PG_BINDIR"]
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL server binaries not found; scripts/test installs postgresql")
    return os.path.dirname(found[-1])


class Postgres:
    def __init__(self):
        self.bindir = _pg_bindir()
        self.as_root = os.geteuid() == 0
        self.dir = tempfile.mkdtemp(prefix="leasehold-pytest-pg-")
        self.password = "pg-" + uuid.uuid4().hex
        self.port = _free_port()
        pwfile = os.path.join(self.dir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self.as_root:
            pg = pwd.getpwnam("postgres")
            os.chown(self.dir, pg.pw_uid, pg.pw_gid)
            os.chown(pwfile, pg.pw_uid, pg.pw_gid)
        self.data = os.path.join(self.dir, "data")
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "-A", "scram-sha-256",
                   "--auth-local=trust", "-E", "UTF8", "-N", "--pwfile=" + pwfile])
        self.log = os.path.join(self.dir, "postgres.log")
        self.proc = subprocess.Popen(
            self._wrap([os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.dir,
                        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with psycopg.connect(self.dsn("postgres", self.password)):
                    break
            except psycopg.OperationalError:
                if time.time() > deadline or self.proc.poll() is not None:
                    pytest.fail("PostgreSQL did not start on port %d (exit %s)" % (self.port, self.proc.poll()))
                time.sleep(0.1)

    def _wrap(self, argv):
        return ["runuser", "-u", "postgres", "--"] + argv if self.as_root else argv

    def _run(self, argv):
        out = subprocess.run(self._wrap(argv), capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail("%s failed: %s %s" % (argv[0], out.stdout, out.stderr))

    def dsn(self, user, password):
        return "host=127.0.0.1 port=%d dbname=postgres user=%s password=%s" % (self.port, user, password)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres()
    yield pg
    pg.stop()


def start_devvault(*extra):
    """Starts the devvault binary on a free port; returns (process, url).
    Lines printed before the "listening" line (the CA path of --dev-tls) are
    on proc.preamble."""
    binary = os.environ.get("DEVVAULT_BIN", os.path.join(ROOT, "target", "debug", "devvault"))
    if not os.path.exists(binary):
        pytest.fail("devvault binary not found at %s; build it with cargo build -p devvault" % binary)
    proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--root-token", "root", *extra],
                            stdout=subprocess.PIPE, text=True)
    proc.preamble = []
    line = proc.stdout.readline().strip()
    while line.startswith("devvault CA certificate: "):
        proc.preamble.append(line)
        line = proc.stdout.readline().strip()
    if not line.startswith("devvault listening on "):
        proc.kill()
        pytest.fail("devvault did not start: %r" % line)
    return proc, line.rsplit(" ", 1)[1]


@pytest.fixture(scope="session")
def devvault_url():
    proc, url = start_devvault()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def fresh_devvault():
    proc, url = start_devvault()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


class Issuer:
    """Signs ServiceAccount JWTs like the Kubernetes API server."""

    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        # hvac only accepts certificates for pem_keys, so wrap the key in one.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(self.key, hashes.SHA256()))
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode().strip()

    def mint(self, namespace="default", name="app", **overrides):
        now = int(time.time())
        claims = {
            "aud": ["https://kubernetes.default.svc.cluster.local"],
            "iss": "https://kubernetes.default.svc.cluster.local",
            "iat": now, "nbf": now, "exp": now + 600,
            "sub": "system:serviceaccount:%s:%s" % (namespace, name),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
                "pod": {"name": name + "-0", "uid": str(uuid.uuid4())},
            },
        }
        claims.update(overrides)
        return pyjwt.encode(claims, self.key, algorithm="ES256")


@pytest.fixture(scope="session")
def issuer():
    return Issuer()


@pytest.fixture(scope="session")
def configured(devvault_url, postgres, issuer):
    """The seed article's setup steps, done with hvac as root."""
    import hvac

    root = hvac.Client(url=devvault_url, token="root")
    root.sys.enable_secrets_engine("database", path="database")
    admin_pw = "adm-" + uuid.uuid4().hex
    with psycopg.connect(postgres.dsn("postgres", postgres.password), autocommit=True) as conn:
        conn.execute("CREATE ROLE vault_admin WITH LOGIN SUPERUSER PASSWORD '%s'" % admin_pw)
    root.secrets.database.configure(
        name="production-db",
        plugin_name="postgresql-database-plugin",
        allowed_roles="app-role,analytics-role",
        connection_url="postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable" % postgres.port,
        username="vault_admin",
        password=admin_pw,
    )
    root.secrets.database.rotate_root_credentials(name="production-db")
    root.secrets.database.create_role(
        name="app-role",
        db_name="production-db",
        creation_statements=[
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO \"{{name}}\";",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO \"{{name}}\";",
        ],
        revocation_statements=[
            "REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM \"{{name}}\";",
            "DROP ROLE IF EXISTS \"{{name}}\";",
        ],
        default_ttl="1h",
        max_ttl="2h",
    )
    root.sys.create_or_update_policy(
        name="app",
        policy='path "database/creds/app-role" { capabilities = ["read"] }\n'
               'path "sys/leases/revoke" { capabilities = ["update"] }\n',
    )
    root.sys.enable_auth_method("kubernetes")
    root.auth.kubernetes.configure(kubernetes_host="https://kubernetes.default.svc", pem_keys=[issuer.cert_pem])
    root.auth.kubernetes.create_role(
        name="app-role",
        bound_service_account_names=["app"],
        bound_service_account_namespaces=["default"],
        policies=["app"],
        ttl="1h",
        audience="https://kubernetes.default.svc.cluster.local",
    )
    return devvault_url
