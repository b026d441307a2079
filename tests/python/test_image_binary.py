"""The image's feature set (`--no-default-features`, no `demo`), which
`cargo test` never builds: its binaries get devvault's dev-dependency
features too, reqwest with a TLS provider of its own among them, and that
hid a panic ("No rustls crypto provider is configured") in `leasehold
status`. scripts/test builds the image's set and names it in
LEASEHOLD_IMAGE_BIN."""

import http.server
import json
import os
import subprocess
import threading

import pytest

from conftest import _free_port


def image_bin():
    path = os.environ.get("LEASEHOLD_IMAGE_BIN")
    if not path or not os.path.exists(path):
        pytest.fail("LEASEHOLD_IMAGE_BIN (%r) is not a built binary: scripts/test builds it "
                    "(cargo build --no-default-features --bin leasehold)" % path)
    return path


def test_it_is_the_image_feature_set():
    out = subprocess.run([image_bin(), "demo"], capture_output=True, text=True)
    assert out.returncode == 2 and "demo" in out.stderr, (out.returncode, out.stderr)


def test_status_names_an_unreachable_agent_and_does_not_panic():
    port = _free_port()
    out = subprocess.run([image_bin(), "status", "--addr", "127.0.0.1:%d" % port], capture_output=True, text=True)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "cannot reach http://127.0.0.1:%d/v1/status" % port in out.stderr, out.stderr
    assert "internal error" not in out.stderr and "panicked" not in out.stderr, out.stderr


def test_status_prints_a_running_agents_table():
    status = {"secrets": [{"name": "db", "ready": True, "lease": "database/creds/app/AbCd…", "ttl_secs": 60,
                           "expires_at": "2026-12-02T14:00:00Z", "renewals": 2, "issues": 1, "last_error": None}],
              "token": {"accessor": "acc123", "expires_at": None}}

    class Status(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps(status).encode() if self.path == "/v1/status" else b"{}"
            self.send_response(200 if self.path == "/v1/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([image_bin(), "status", "--addr", "127.0.0.1:%d" % srv.server_port],
                             capture_output=True, text=True, timeout=20)
    finally:
        srv.shutdown()
    assert out.returncode == 0, (out.returncode, out.stderr)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["SECRET", "READY", "LEASE", "TTL", "EXPIRES", "RENEWALS", "ISSUES", "LAST", "ERROR"]
    assert lines[1].split()[:4] == ["db", "yes", "database/creds/app/AbCd…", "60s"], lines
    assert lines[2] == "token accessor acc123 expires -", lines
