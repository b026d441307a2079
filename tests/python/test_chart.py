"""The Helm chart, rendered with Helm's own engine (helm-python-sdk) and
validated against the Kubernetes 1.29+ schemas (kubernetes-validate)."""

import glob
import os
import subprocess
import tempfile

import cloudcoil.models.prometheus_operator.v1 as monitoring
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT

CHART = os.path.join(ROOT, "charts", "leasehold")
CI_VALUES = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
KUBE_VERSIONS = ["1.29", "1.33"]


def load_values(path):
    if path is None:
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def render(values):
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="shop", namespace="payments")
    docs = []
    for name, text in sorted(out.items()):
        if name.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def validate_cert_manager(doc):
    """cert-manager's CRDs are not in kubernetes-validate: the fields its
    webhook requires, checked by hand."""
    assert doc["apiVersion"] == "cert-manager.io/v1"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] == "Certificate":
        assert spec["secretName"] and spec["dnsNames"] and spec["issuerRef"]["name"], spec
        assert set(spec) <= {"secretName", "duration", "renewBefore", "dnsNames", "privateKey", "issuerRef"}, spec
    else:
        assert doc["kind"] == "Issuer" and spec == {"selfSigned": {}}, doc


def validate_monitoring(doc):
    """Checks a prometheus-operator object against its CRD schema (types,
    patterns, required fields); the round trip also catches unknown fields,
    which the models would otherwise drop silently."""
    model = {"ServiceMonitor": monitoring.ServiceMonitor, "PrometheusRule": monitoring.PrometheusRule}[doc["kind"]]
    parsed = model.model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, "fields the CRD does not know"


def leasehold_bin():
    path = os.environ.get("LEASEHOLD_BIN", os.path.join(ROOT, "target", "debug", "leasehold"))
    if not os.path.exists(path):
        pytest.fail("leasehold binary not found at %s (cargo build)" % path)
    return path


VALUE_SETS = [None] + CI_VALUES


def test_there_are_at_least_four_ci_value_sets():
    assert len(CI_VALUES) >= 4, CI_VALUES


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=lambda p: os.path.basename(p) if p else "default")
def test_renders_lints_and_validates(values_file):
    values = load_values(values_file)
    report = helm.lint(CHART, values, strict=True)
    errors = [m for m in report.get("messages", []) if m.get("severity", 0) >= 3] + report.get("errors", [])
    assert not errors, errors
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Deployment", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_monitoring(doc)
            continue
        if doc["apiVersion"].startswith("cert-manager.io/"):
            validate_cert_manager(doc)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=lambda p: os.path.basename(p) if p else "default")
def test_agent_config_passes_leasehold_check(values_file):
    docs = render(load_values(values_file))
    config = by_kind(docs, "ConfigMap")[0]["data"]["leasehold.yaml"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "leasehold.yaml")
        with open(path, "w") as f:
            f.write(config)
        out = subprocess.run([leasehold_bin(), "check", "-c", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr + config


def test_auth_method_and_mount():
    def auth(values):
        config = by_kind(render(values), "ConfigMap")[0]["data"]["leasehold.yaml"]
        return yaml.safe_load(config)["auth"]
    assert auth(load_values(None)) == {"kubernetes": {
        "role": "app-role", "mount": "kubernetes", "token_path": "/var/run/secrets/leasehold/token"}}
    jwt = auth(load_values(os.path.join(CHART, "ci", "jwt-values.yaml")))
    assert list(jwt) == ["jwt"] and jwt["jwt"]["mount"] == "jwt-prod" and jwt["jwt"]["role"] == "app"


def pod_spec(docs):
    return by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]


def volume(spec, name):
    return next(v for v in spec["volumes"] if v["name"] == name)


def assert_restricted(container):
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_native_sidecar_pod():
    docs = render({})
    spec = pod_spec(docs)
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "leasehold")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [c["name"] for c in spec["containers"]] == ["app"]
    app = spec["containers"][0]
    creds = next(m for m in app["volumeMounts"] if m["name"] == "leasehold-credentials")
    assert creds["readOnly"] is True and "subPath" not in creds
    assert volume(spec, "leasehold-credentials")["emptyDir"]["medium"] == "Memory"
    assert volume(spec, "leasehold-state")["emptyDir"]["medium"] == "Memory"
    assert not any(m["name"] == "leasehold-state" for m in app["volumeMounts"]), "state is the sidecar's only"
    assert any(m["name"] == "leasehold-state" for m in sidecar["volumeMounts"])
    for c in spec["initContainers"] + spec["containers"]:
        assert_restricted(c)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    config = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["leasehold.yaml"])
    timeout = int(config["shutdown"]["timeout"].rstrip("s"))
    assert spec["terminationGracePeriodSeconds"] > timeout
    token = volume(spec, "leasehold-token")["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "vault"
    assert config["auth"]["kubernetes"]["token_path"] == "/var/run/secrets/leasehold/token"
    assert config["secrets"][0]["files"][0]["path"] == "/vault/secrets/db.json"
    assert "checksum/leasehold-config" not in (by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"].get("annotations") or {})


def test_legacy_mode_is_once_init_plus_sidecar_sharing_state():
    spec = pod_spec(render({"legacySidecar": True}))
    init = spec["initContainers"]
    assert [c["name"] for c in init] == ["leasehold-init"]
    assert init[0]["args"][-1] == "--once" and "restartPolicy" not in init[0]
    sidecar = next(c for c in spec["containers"] if c["name"] == "leasehold")
    assert "restartPolicy" not in sidecar
    state_mount = lambda c: next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "leasehold-state")
    assert state_mount(init[0]) == state_mount(sidecar)


def test_metrics_objects_have_their_required_fields():
    docs = render(load_values(os.path.join(CHART, "ci", "metrics-values.yaml")))
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "telemetry"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-metrics"))
    assert all(service["spec"]["selector"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
               if k != "app.kubernetes.io/component")
    assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "metrics"
    rule = by_kind(docs, "PrometheusRule")[0]
    rules = rule["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"LeaseholdRevocationFailures", "LeaseholdCredentialsExpiringSoon", "LeaseholdAuthFailing"}
    assert all(r["expr"] and r["labels"]["severity"] for r in rules)
    # The alerts' label references survive Helm's templating.
    assert "{{ $labels.pod }}" in rules[0]["annotations"]["summary"]


def test_monitoring_validation_catches_what_the_crds_reject():
    docs = render(load_values(os.path.join(CHART, "ci", "metrics-values.yaml")))
    monitor = by_kind(docs, "ServiceMonitor")[0]
    typo = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(AssertionError, match="fields the CRD does not know"):
        validate_monitoring(typo)
    bad_interval = {**monitor, "spec": {**monitor["spec"], "endpoints": [{"port": "telemetry", "interval": "30x"}]}}
    with pytest.raises(ValueError, match="interval"):
        validate_monitoring(bad_interval)
    rule = by_kind(docs, "PrometheusRule")[0]
    no_expr = {**rule, "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]}}
    with pytest.raises(ValueError, match="expr"):
        validate_monitoring(no_expr)


def test_custom_ca_and_rollout_checksum():
    docs = render(load_values(os.path.join(CHART, "ci", "custom-ca-values.yaml")))
    spec = pod_spec(docs)
    assert volume(spec, "leasehold-vault-ca")["secret"]["secretName"] == "vault-ca"
    config = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["leasehold.yaml"])
    assert config["vault"]["ca_cert"] == "/vault/tls/ca.crt"
    assert config["vault"]["namespace"] == "team-a"
    annotations = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/leasehold-config"]) == 64


def test_schema_rejects_bad_values():
    chart = helm.Chart.load(CHART)
    chart.validate_schema({})
    with pytest.raises(helm.HelmValuesError, match="address"):
        chart.validate_schema({"vault": {"address": ""}})
    with pytest.raises(helm.HelmValuesError, match="files|name|additional"):
        chart.validate_schema({"secrets": [{"path": "database/creds/x", "nmae": "typo"}]})
    with pytest.raises(helm.HelmValuesError, match="mode"):
        chart.validate_schema({"secrets": [{"name": "db", "path": "p", "files": [{"path": "a", "mode": "0999"}]}]})


def test_grace_period_must_exceed_shutdown_timeout():
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 10, "shutdown": {"timeoutSeconds": 10}})


def test_image_tag_follows_app_version():
    chart = helm.Chart.load(CHART)
    assert chart.values["image"]["tag"] == chart.metadata["appVersion"]


def injector_docs(values):
    return [d for d in render(values) if d["metadata"]["name"].endswith("-injector")]


def test_injector_is_off_by_default():
    assert injector_docs({}) == []


def test_injector_with_a_secret_certificate():
    values = load_values(os.path.join(CHART, "ci", "injector-values.yaml"))
    docs = injector_docs(values)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "MutatingWebhookConfiguration", "Service", "ServiceAccount"]
    kinds = {d["kind"] for d in render(values)}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}, "the webhook needs no RBAC"
    hook = by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
    assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 10
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["clientConfig"]["service"] == {"name": "shop-leasehold-injector", "namespace": "payments", "path": "/mutate", "port": 443}
    assert hook["clientConfig"]["caBundle"] == values["injector"]["certs"]["caBundle"]
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}]
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", "kube-public"]} in hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["injector"]} in hook["objectSelector"]["matchExpressions"]
    deploy = by_kind(docs, "Deployment")[0]
    pod = deploy["spec"]["template"]
    # Its own pods are never sent to it.
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "injector"
    container = pod["spec"]["containers"][0]
    assert_restricted(container)
    assert container["args"][0] == "injector" and "--vault-k8s-compat" in container["args"]
    assert "--vault-address=https://vault.vault.svc:8200" in container["args"]
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    tls = next(v for v in pod["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "leasehold-injector-tls"
    assert not any("subPath" in m for m in container["volumeMounts"])
    # The app's selector does not catch the injector's pods.
    assert not any(d["kind"] == "Deployment" and not d["metadata"]["name"].endswith("-injector") for d in render(values))


def test_injector_with_cert_manager():
    docs = injector_docs(load_values(os.path.join(CHART, "ci", "injector-cert-manager-values.yaml")))
    hook_config = by_kind(docs, "MutatingWebhookConfiguration")[0]
    assert hook_config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "payments/shop-leasehold-injector"
    assert "caBundle" not in hook_config["webhooks"][0]["clientConfig"]
    cert = by_kind(docs, "Certificate")[0]
    assert "shop-leasehold-injector.payments.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "shop-leasehold-injector", "kind": "Issuer"}
    assert by_kind(docs, "Issuer")[0]["spec"] == {"selfSigned": {}}
    app_selector = [d for d in render({}) if d["kind"] == "Deployment"][0]["spec"]["selector"]["matchLabels"]
    labels = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in app_selector.items())


def test_injector_needs_a_certificate_source():
    with pytest.raises(Exception, match="injector.certs"):
        render({"injector": {"enabled": True}})
