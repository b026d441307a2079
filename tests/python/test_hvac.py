"""The seed article's Python client (hvac + psycopg) against devvault and OpenBao."""

import hvac
import hvac.exceptions
import psycopg
import pytest


def app_client(url, issuer):
    client = hvac.Client(url=url)
    client.auth.kubernetes.login(role="app-role", jwt=issuer.mint(), mount_point="kubernetes")
    return client


def test_kubernetes_login_and_lookup_self(configured, issuer):
    client = app_client(configured, issuer)
    assert client.is_authenticated()
    me = client.auth.token.lookup_self()["data"]
    assert me["display_name"] == "kubernetes-default-app"
    assert me["policies"] == ["app", "default"]
    assert me["meta"]["service_account_name"] == "app"
    assert 3590 <= me["ttl"] <= 3600


def test_generate_renew_revoke_with_psycopg(configured, postgres, issuer):
    client = app_client(configured, issuer)
    resp = client.secrets.database.generate_credentials(name="app-role", mount_point="database")
    creds = resp["data"]
    assert resp["lease_duration"] == 3600
    assert resp["lease_id"].startswith("database/creds/app-role/")
    with psycopg.connect(postgres.dsn(creds["username"], creds["password"])) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == creds["username"]

    renewed = client.sys.renew_lease(lease_id=resp["lease_id"], increment=1800)
    assert renewed["lease_duration"] == 1800

    client.sys.revoke_lease(lease_id=resp["lease_id"])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.dsn(creds["username"], creds["password"]))
    with pytest.raises(hvac.exceptions.InvalidRequest, match="lease not found"):
        client.sys.renew_lease(lease_id=resp["lease_id"])


def test_renew_is_capped_at_max_ttl_with_warning(configured, issuer):
    client = app_client(configured, issuer)
    resp = client.secrets.database.generate_credentials(name="app-role")
    renewed = client.sys.renew_lease(lease_id=resp["lease_id"], increment=10 * 3600)
    assert 7190 <= renewed["lease_duration"] <= 7200
    # The max TTL left, as the server prints it: 2h, or 1h59m5xs a moment later.
    warning = renewed["warnings"][0]
    assert warning.startswith('TTL of "10h" exceeded the effective max_ttl of "'), warning
    assert warning.endswith('"; TTL value is capped accordingly'), warning
    assert '"2h"' in warning or '"1h59m5' in warning, warning
    client.sys.revoke_lease(lease_id=resp["lease_id"])


def test_errors_map_to_hvac_exceptions(configured, issuer):
    anon = hvac.Client(url=configured)
    with pytest.raises(hvac.exceptions.Forbidden, match="namespace not authorized"):
        anon.auth.kubernetes.login(role="app-role", jwt=issuer.mint(namespace="other"))
    with pytest.raises(hvac.exceptions.InvalidRequest, match='invalid role name "nope"'):
        anon.auth.kubernetes.login(role="nope", jwt=issuer.mint())
    client = app_client(configured, issuer)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.database.generate_credentials(name="analytics-role")
    root = hvac.Client(url=configured, token="root")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="unknown role: analytics-role"):
        root.secrets.database.generate_credentials(name="analytics-role")


def test_revoke_self_drops_database_users(configured, postgres, issuer):
    client = app_client(configured, issuer)
    creds = client.secrets.database.generate_credentials(name="app-role")["data"]
    client.auth.token.revoke_self()
    import time
    deadline = time.time() + 5
    while time.time() < deadline:
        with psycopg.connect(postgres.dsn("postgres", postgres.password)) as conn:
            gone = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                                (creds["username"],)).fetchone()[0] == 0
        if gone:
            break
        time.sleep(0.05)
    assert gone, "role of the revoked token's lease dropped"
