"""The PKI engine (devvault's and OpenBao's) through hvac, and the
certificates checked with `cryptography`: signed by the root, with the names
asked for."""

import datetime
import ipaddress

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec


@pytest.fixture
def pki(fresh_server):
    client = hvac.Client(url=fresh_server.url, token="root")
    client.sys.enable_secrets_engine("pki", path="pki")
    root = client.secrets.pki.generate_root("internal", "devvault test CA", extra_params={"key_type": "ec", "ttl": "1h"})
    client.secrets.pki.create_or_update_role("web", extra_params={
        "allowed_domains": ["example.com"], "allow_subdomains": True, "key_type": "ec",
        "max_ttl": "10m", "generate_lease": True,
    })
    return client, x509.load_pem_x509_certificate(root["data"]["certificate"].encode())


def test_issued_certificate_is_signed_by_the_root_with_the_names_asked(pki):
    client, ca = pki
    resp = client.secrets.pki.generate_certificate(
        "web", "app.example.com", extra_params={"alt_names": "api.example.com", "ip_sans": "127.0.0.1", "ttl": "5m"})
    cert = x509.load_pem_x509_certificate(resp["data"]["certificate"].encode())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == ca.subject
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "app.example.com"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["app.example.com", "api.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(minutes=4, seconds=55) <= left <= datetime.timedelta(minutes=5)
    assert resp["data"]["expiration"] == int(cert.not_valid_after_utc.timestamp())
    # Vault prints the serial's minimal big-endian bytes: a serial below 2^152
    # (about 1 in 128) has 19 bytes, not 20.
    serial = cert.serial_number
    assert resp["data"]["serial_number"] == ":".join("%02x" % b for b in serial.to_bytes((serial.bit_length() + 7) // 8, "big"))
    # Leased (generate_lease): revoking the lease revokes the certificate.
    assert resp["lease_id"].startswith("pki/issue/web/") and resp["renewable"] is False
    client.sys.revoke_lease(resp["lease_id"])
    stored = client.secrets.pki.read_certificate(resp["data"]["serial_number"])["data"]
    assert stored["certificate"] == resp["data"]["certificate"]
    assert stored["revocation_time"] > 0


def test_role_rules_map_to_hvac_exceptions(pki):
    client, _ = pki
    with pytest.raises(hvac.exceptions.InvalidRequest, match="common name evil.org not allowed by this role"):
        client.secrets.pki.generate_certificate("web", "evil.org")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="unknown role: nope"):
        client.secrets.pki.generate_certificate("nope", "app.example.com")
