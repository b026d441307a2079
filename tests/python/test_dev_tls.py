"""`devvault --dev-tls`, as `vault server -dev-tls`: HTTPS with a throwaway
CA written to a directory; clients trust it through VAULT_CACERT/verify."""

import os
import stat

import hvac
import pytest
import requests

from conftest import start_devvault


@pytest.fixture
def tls_devvault(tmp_path):
    certs = tmp_path / "certs"
    proc, url = start_devvault("--dev-tls", "--dev-tls-cert-dir", str(certs))
    yield url, certs, proc.preamble
    proc.terminate()
    proc.wait(timeout=10)


def test_dev_tls_writes_the_ca_and_serves_https(tls_devvault):
    url, certs, preamble = tls_devvault
    assert url.startswith("https://127.0.0.1:")
    assert preamble == ["devvault CA certificate: %s" % (certs / "vault-ca.pem")]
    assert sorted(os.listdir(certs)) == ["vault-ca.pem", "vault-cert.pem", "vault-key.pem"]
    assert stat.S_IMODE(os.stat(certs / "vault-key.pem").st_mode) == 0o600
    client = hvac.Client(url=url, token="root", verify=str(certs / "vault-ca.pem"))
    assert client.sys.read_health_status(method="GET")["initialized"] is True
    assert client.is_authenticated()


def test_dev_tls_is_refused_without_the_ca(tls_devvault):
    url, _, _ = tls_devvault
    client = hvac.Client(url=url, token="root", verify=True)
    with pytest.raises(requests.exceptions.SSLError):
        client.is_authenticated()
