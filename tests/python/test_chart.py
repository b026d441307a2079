"""The Helm chart, rendered with Helm's own engine (helm-python-sdk) and
validated against the Kubernetes 1.29+ schemas (kubernetes-validate)."""

import glob
import json
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
EXAMPLE_APP = os.path.join(CHART, "examples", "app-values.yaml")
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


def with_app(values=None):
    """`values` over examples/app-values.yaml: the chart's app Deployment."""
    merged = load_values(EXAMPLE_APP)
    for k, v in (values or {}).items():
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


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
    model = {"ServiceMonitor": monitoring.ServiceMonitor, "PrometheusRule": monitoring.PrometheusRule,
             "PodMonitor": monitoring.PodMonitor}[doc["kind"]]
    parsed = model.model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc, "fields the CRD does not know"


def leasehold_bin():
    path = os.environ.get("LEASEHOLD_BIN", os.path.join(ROOT, "target", "debug", "leasehold"))
    if not os.path.exists(path):
        pytest.fail("leasehold binary not found at %s (cargo build)" % path)
    return path


VALUE_SETS = [None] + CI_VALUES + [EXAMPLE_APP]
APP_SETS = [p for p in VALUE_SETS if load_values(p).get("app", {}).get("enabled")]


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
    if values_file in APP_SETS:
        assert {"ConfigMap", "Deployment", "ServiceAccount"} <= kinds
    if values_file is None:
        assert docs == [], "no placeholder app, no injector by default: %s" % kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            validate_monitoring(doc)
            continue
        if doc["apiVersion"].startswith("cert-manager.io/"):
            validate_cert_manager(doc)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("values_file", APP_SETS, ids=os.path.basename)
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
    assert auth(with_app()) == {"kubernetes": {
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
    docs = render(with_app())
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
    spec = pod_spec(render(with_app({"legacySidecar": True})))
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
        render(with_app({"terminationGracePeriodSeconds": 10, "shutdown": {"timeoutSeconds": 10}}))


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
    assert sorted(d["kind"] for d in docs) == ["Deployment", "MutatingWebhookConfiguration", "NetworkPolicy",
                                               "PodDisruptionBudget", "Service", "ServiceAccount"]
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
    assert {"--log-level=info", "--log-format=json"} <= set(container["args"])
    quiet = injector_docs({**values, "log": {"level": "warn", "format": "text"}})
    assert {"--log-level=warn", "--log-format=text"} <= set(by_kind(quiet, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"])
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
    app_selector = [d for d in render(with_app()) if d["kind"] == "Deployment"][0]["spec"]["selector"]["matchLabels"]
    labels = by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in app_selector.items())


def selects(selector, labels):
    """A label selector (matchLabels, matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        have, values = labels.get(e["key"]), e.get("values", [])
        ok = {"In": have in values, "NotIn": have not in values,
              "Exists": have is not None, "DoesNotExist": have is None}[e["operator"]]
        if not ok:
            return False
    return True


def test_injector_defaults_cannot_take_the_cluster_down():
    docs = render({"injector": {"enabled": True}})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "MutatingWebhookConfiguration", "NetworkPolicy", "PodDisruptionBudget",
                     "Secret", "Service", "ServiceAccount"], kinds
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    hook = by_kind(docs, "MutatingWebhookConfiguration")[0]["webhooks"][0]
    # Pods that did not opt in never reach the webhook, up or down.
    assert not selects(hook["objectSelector"], {"app": "shop"})
    assert not selects(hook["objectSelector"], {"app.kubernetes.io/name": "cert-manager"})
    assert selects(hook["objectSelector"], {"app": "shop", "leasehold.dev/inject": "true"})
    deploy = by_kind(docs, "Deployment")[0]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert not selects(hook["objectSelector"], {**pod_labels, "leasehold.dev/inject": "true"}), "never itself"
    assert deploy["spec"]["replicas"] >= 2
    anti = deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname" and selects(term["labelSelector"], pod_labels)
    pdb = by_kind(docs, "PodDisruptionBudget")[0]
    assert pdb["spec"]["minAvailable"] == 1 and selects(pdb["spec"]["selector"], pod_labels)
    policy = by_kind(docs, "NetworkPolicy")[0]["spec"]
    assert selects(policy["podSelector"], pod_labels)
    assert policy["ingress"] == [{"ports": [{"port": 8443, "protocol": "TCP"}]}] and policy["egress"] == []
    # Certificates without cert-manager: the chart's own CA signs the
    # webhook's certificate for the Service's names, and the API server
    # trusts that CA.
    from cryptography import x509
    import base64
    secret = by_kind(docs, "Secret")[0]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "shop-leasehold-injector.payments.svc" in names
    cert.verify_directly_issued_by(ca)
    tls = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == secret["metadata"]["name"]


def test_schema_rejects_unknown_keys_at_every_level():
    chart = helm.Chart.load(CHART)
    chart.validate_schema(load_values(EXAMPLE_APP))
    for typo in [{"replicaCout": 2}, {"app": {"imag": "x"}}, {"injector": {"replica": 2}},
                 {"injector": {"podDisruptionBudget": {"minAvaliable": 1}}}, {"metrics": {"dashboard": {"enable": True}}},
                 {"injector": {"networkPolicy": {"form": []}}}, {"serviceAccount": {"crate": True}}]:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(typo)


def notes(values):
    out = helm.Chart.load(CHART).render(values, name="shop", namespace="payments")
    return next(text for name, text in out.items() if name.endswith("NOTES.txt"))


def test_notes_say_what_was_rendered():
    injector_only = notes({"injector": {"enabled": True}})
    assert "deploy/shop-leasehold " not in injector_only and "port-forward" not in injector_only
    assert "leasehold.dev/inject" in injector_only
    app = notes(with_app())
    assert "deploy/shop-leasehold " in app and "injector" not in app
    assert "Nothing to run" in notes({})


def test_dashboard_ships_for_grafanas_sidecar():
    docs = render(with_app({"metrics": {"dashboard": {"enabled": True}}}))
    board = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["leasehold.json"])
    assert dashboard["uid"] == "leasehold" and all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


def docs_rules():
    text = open(os.path.join(ROOT, "docs", "observability.md")).read()
    block = text.split("## Alert rules", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def test_alert_rules_in_the_chart_are_the_docs_and_pass_promtool():
    docs = render(with_app({"metrics": {"prometheusRule": {"enabled": True}}}))
    chart_rules = by_kind(docs, "PrometheusRule")[0]["spec"]
    shape = lambda rules: [(r["alert"], r["expr"], r.get("for"), r["labels"]["severity"]) for r in rules["groups"][0]["rules"]]
    assert shape(chart_rules) == shape(docs_rules())
    with tempfile.TemporaryDirectory() as d:
        for name, rules in [("chart.yaml", chart_rules), ("docs.yaml", docs_rules())]:
            path = os.path.join(d, name)
            with open(path, "w") as f:
                yaml.safe_dump(rules, f)
            out = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
            assert out.returncode == 0, name + ": " + out.stdout + out.stderr
