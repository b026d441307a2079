//! `leasehold injector`, the real binary over HTTPS: AdmissionReview
//! fixtures (tests/fixtures/injector) and their answers, the patched pods
//! validated against the Kubernetes schemas (kubernetes-validate from the
//! test venv) and their agent configs through `leasehold check`; a rotated
//! certificate; and the vault-k8s translation running a whole lifecycle on
//! the real server.

// Tests measure real time; the agent's clock rule (clippy.toml) is not for them.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Agent, Env, Ttls, eventually};
use base64::Engine as _;
use devvault::DevTls;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/injector")
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).expect("fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

struct Injector {
    agent: Agent,
    dir: tempfile::TempDir,
    addr: String,
}

fn write_pair(dir: &Path, tls: &DevTls) {
    // As a Secret volume or cert-manager does: new files renamed in place.
    for (name, text) in [("tls.crt", tls.cert_pem.as_str()), ("tls.key", tls.key_pem())] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

async fn start_injector(tls: &DevTls, extra: &[&str]) -> Injector {
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), tls);
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let mut args = vec![
        "injector",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--vault-address",
        "https://vault.vault.svc:8200",
        "--image",
        "ghcr.io/leasehold/leasehold:0.1.0",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::spawn(&args, dir.path()).await;
    let mut addr = None;
    let up = eventually(20, async || {
        addr = agent.events("injector_listening").first().and_then(|e| e["addr"].as_str().map(str::to_string));
        addr.is_some()
    })
    .await;
    assert!(up, "the injector listens:\n{}", agent.output());
    Injector { agent, dir, addr: addr.unwrap() }
}

fn client(ca_pem: &str) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

async fn admit(c: &reqwest::Client, inj: &Injector, review: &Value) -> Value {
    let url = format!("https://localhost:{}/mutate", inj.addr.rsplit(':').next().unwrap());
    let resp = c.post(url).json(review).send().await.expect("HTTPS AdmissionReview");
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"], "the answer names the request");
    answer["response"].clone()
}

/// The pod the API server would store: the request's pod with the patch applied.
fn patched(review: &Value, response: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSONPatch");
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &ops).expect("the patch applies");
    pod
}

fn containers<'a>(pod: &'a Value, list: &str) -> &'a [Value] {
    pod["spec"][list].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn named<'a>(pod: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    containers(pod, list).iter().find(|c| c["name"] == name)
}

fn agent_config(c: &Value) -> Value {
    let env = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "LEASEHOLD_CONFIG").expect("config env");
    serde_json::from_str(env["value"].as_str().unwrap()).expect("the config is JSON")
}

fn assert_restricted(c: &Value) {
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
}

/// Every app container mounts the credentials read-only, as a directory.
fn assert_apps_mount(pod: &Value, original: &Value, path: &str) {
    for c in containers(original, "containers") {
        let c = named(pod, "containers", c["name"].as_str().unwrap()).unwrap();
        let m = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "leasehold-credentials");
        let m = m.unwrap_or_else(|| panic!("{} mounts the credentials", c["name"]));
        assert_eq!(m["mountPath"], path);
        assert_eq!(m["readOnly"], true);
        assert!(m.get("subPath").is_none());
    }
}

fn check_config(config: &Value, dir: &Path, name: &str) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config.to_string()).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold")).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{name}: leasehold check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubernetes_validate(pods: &[PathBuf]) {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/kubernetes-validate");
    assert!(bin.exists(), "{} is missing: run scripts/test (it creates the venv)", bin.display());
    for version in ["1.29.0", "1.33.0"] {
        let out = std::process::Command::new(&bin).args(["--strict", "-k", version]).args(pods).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !text.contains("ERROR"), "Kubernetes {version} schema:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_get_their_answers_and_patched_pods_validate() {
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &["--vault-k8s-compat"]).await;
    let c = client(&tls.ca_pem);
    let out = tempfile::tempdir().unwrap();
    let mut pods = Vec::new();
    let mut injected = |name: &str, response: &Value| {
        let review = fixture(name);
        let pod = patched(&review, response);
        let path = out.path().join(format!("{name}.json"));
        // The API server names a generateName pod after admission.
        let mut stored = pod.clone();
        if stored["metadata"].get("name").is_none() {
            stored["metadata"]["name"] =
                json!(format!("{}x7k2p", stored["metadata"]["generateName"].as_str().unwrap()));
        }
        std::fs::write(&path, stored.to_string()).unwrap();
        pods.push(path);
        assert_eq!(pod["metadata"]["annotations"]["leasehold.dev/status"], "injected");
        (review["request"]["object"].clone(), pod)
    };

    // One secret: a native sidecar, the last init container.
    let (orig, pod) = injected("plain", &admit(&c, &inj, &fixture("plain")).await);
    let sidecar = containers(&pod, "initContainers").last().unwrap();
    assert_eq!(sidecar["name"], "leasehold");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["args"], json!(["agent", "-c", "env:LEASEHOLD_CONFIG"]));
    assert_restricted(sidecar);
    assert_apps_mount(&pod, &orig, "/vault/secrets");
    let vols: Vec<&str> =
        pod["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(
        vols.contains(&"kube-api-access-x")
            && vols.contains(&"leasehold-credentials")
            && vols.contains(&"leasehold-state")
    );
    let creds =
        pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "leasehold-credentials").unwrap();
    assert_eq!(creds["emptyDir"]["medium"], "Memory");
    let config = agent_config(sidecar);
    assert_eq!(config["vault"]["address"], "https://vault.vault.svc:8200");
    assert_eq!(config["auth"]["kubernetes"]["role"], "app");
    assert_eq!(config["secrets"][0]["path"], "database/creds/app");
    assert_eq!(
        config["secrets"][0]["files"][0],
        json!({ "path": "/vault/secrets/db", "format": "json", "mode": "0444" })
    );
    check_config(&config, out.path(), "plain");
    // The config as the container reads it: from its environment.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["check", "-c", "env:LEASEHOLD_CONFIG"])
        .env("LEASEHOLD_CONFIG", config.to_string())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    // Several secrets, files, formats, a POST body, a hook; fsGroup: 0440.
    let (orig, pod) = injected("several", &admit(&c, &inj, &fixture("several")).await);
    assert_eq!(containers(&pod, "initContainers")[0]["name"], "migrate", "last by default");
    let sidecar = named(&pod, "initContainers", "leasehold").unwrap();
    assert_apps_mount(&pod, &orig, "/etc/creds");
    let config = agent_config(sidecar);
    assert_eq!(config["auth"]["kubernetes"]["mount"], "k8s-prod");
    let secrets = config["secrets"].as_array().unwrap();
    let by = |n: &str| secrets.iter().find(|s| s["name"] == n).unwrap().clone();
    assert_eq!(by("db")["files"][0]["path"], "/etc/creds/db/url");
    assert_eq!(by("db")["files"][0]["mode"], "0400");
    assert!(by("db")["files"][0]["template"].as_str().unwrap().starts_with("postgresql://"));
    assert_eq!(by("cache")["files"][0]["format"], "env");
    assert_eq!(by("cache")["files"][0]["mode"], "0440", "readable by the pod's fsGroup");
    assert_eq!(by("cert")["method"], "POST");
    assert_eq!(by("cert")["body"]["common_name"], "shop.example");
    assert_eq!(by("db")["on_change"]["http"]["url"], "http://127.0.0.1:8080/-/reload");
    check_config(&config, out.path(), "several");

    // Legacy: `--once` first (init-first), then a regular sidecar.
    let (orig, pod) = injected("legacy", &admit(&c, &inj, &fixture("legacy")).await);
    let first = &containers(&pod, "initContainers")[0];
    assert_eq!(first["name"], "leasehold-init");
    assert_eq!(first["args"], json!(["agent", "-c", "env:LEASEHOLD_CONFIG", "--once"]));
    assert!(first.get("restartPolicy").is_none());
    let sidecar = named(&pod, "containers", "leasehold").expect("a regular sidecar");
    assert!(sidecar.get("restartPolicy").is_none());
    assert_eq!(
        agent_config(sidecar),
        agent_config(first),
        "one config: the sidecar adopts the init container's leases"
    );
    let istio = named(&pod, "initContainers", "istio-init").unwrap();
    assert!(istio["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == "leasehold-credentials"));
    assert_apps_mount(&pod, &orig, "/vault/secrets");
    check_config(&agent_config(sidecar), out.path(), "legacy");

    // vault-k8s: templates translated; one credential set for one path.
    let (orig, pod) = injected("vault-k8s", &admit(&c, &inj, &fixture("vault-k8s")).await);
    assert_apps_mount(&pod, &orig, "/vault/secrets");
    let config = agent_config(named(&pod, "initContainers", "leasehold").unwrap());
    let secrets = config["secrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 1, "three files of one path share one lease: {config}");
    let files: Vec<&str> =
        secrets[0]["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(files, ["/vault/secrets/db-creds", "/vault/secrets/db.env", "/vault/secrets/plain.txt"]);
    assert_eq!(secrets[0]["files"][1]["mode"], "0400");
    check_config(&config, out.path(), "vault-k8s");

    // A Job with pre-populate-only: a native sidecar (it ends with the Job and revokes), first.
    let (_, pod) = injected("vault-k8s-job", &admit(&c, &inj, &fixture("vault-k8s-job")).await);
    let sidecar = &containers(&pod, "initContainers")[0];
    assert_eq!((sidecar["name"].as_str(), sidecar["restartPolicy"].as_str()), (Some("leasehold"), Some("Always")));
    assert_eq!(agent_config(sidecar)["auth"]["kubernetes"]["role"], "report");
    check_config(&agent_config(sidecar), out.path(), "vault-k8s-job");

    // Allowed untouched.
    for name in ["injected", "not-annotated", "kube-system"] {
        let r = admit(&c, &inj, &fixture(name)).await;
        assert_eq!(r["allowed"], true, "{name}: {r}");
        assert!(r.get("patch").is_none(), "{name}: untouched: {r}");
    }
    // A patched pod admitted again (a re-invocation) is left as it is.
    let mut again = fixture("plain");
    again["request"]["object"] = serde_json::from_str(&std::fs::read_to_string(&pods[0]).unwrap()).unwrap();
    let r = admit(&c, &inj, &again).await;
    assert!(r["allowed"] == true && r.get("patch").is_none(), "idempotent: {r}");

    // Denied, naming the annotation.
    for (name, names) in [
        ("malformed", "leasehold.dev/perms-db"),
        ("unknown-annotation", "leasehold.dev/secrets-db"),
        ("vault-k8s-unsupported", "vault.hashicorp.com/tls-skip-verify"),
        ("vault-k8s-bad-template", "vault.hashicorp.com/agent-inject-template-cert"),
    ] {
        let r = admit(&c, &inj, &fixture(name)).await;
        assert_eq!(r["allowed"], false, "{name}: {r}");
        assert!(r.get("patch").is_none());
        let message = r["status"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{name}: {message}");
    }

    kubernetes_validate(&pods);

    let metrics =
        c.get(format!("https://localhost:{}/metrics", inj.addr.rsplit(':').next().unwrap())).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    for (result, n) in [("injected", 5), ("skipped", 4), ("denied", 4)] {
        let line = format!("leasehold_injector_admissions_total{{result=\"{result}\"}} {n}");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_is_off_unless_asked() {
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &[]).await;
    let r = admit(&client(&tls.ca_pem), &inj, &fixture("vault-k8s")).await;
    assert!(r["allowed"] == true && r.get("patch").is_none(), "left to vault-k8s: {r}");
}

/// A cluster older than 1.29: `--once` init containers, and for a Job
/// (pre-populate-only) nothing else, as vault-k8s does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_clusters_get_init_containers() {
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &["--vault-k8s-compat", "--legacy-sidecar"]).await;
    let c = client(&tls.ca_pem);
    let out = tempfile::tempdir().unwrap();
    let mut pods = Vec::new();
    for (name, sidecar) in [("plain", true), ("vault-k8s", true), ("vault-k8s-job", false)] {
        let review = fixture(name);
        let mut pod = patched(&review, &admit(&c, &inj, &review).await);
        let init = named(&pod, "initContainers", "leasehold-init").unwrap_or_else(|| panic!("{name}: {pod}"));
        assert_eq!(init["args"][3], "--once");
        assert_eq!(named(&pod, "containers", "leasehold").is_some(), sidecar, "{name}");
        assert!(named(&pod, "initContainers", "leasehold").is_none());
        pod["metadata"]["name"] = json!(format!("{name}-x7k2p"));
        let path = out.path().join(format!("{name}.json"));
        std::fs::write(&path, pod.to_string()).unwrap();
        pods.push(path);
    }
    kubernetes_validate(&pods);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_the_next_connection() {
    let (old, new) = (DevTls::generate().unwrap(), DevTls::generate().unwrap());
    let inj = start_injector(&old, &[]).await;
    let port = inj.addr.rsplit(':').next().unwrap().to_string();
    let healthz = |ca: &str| {
        let c = client(ca);
        let url = format!("https://localhost:{port}/healthz");
        async move { c.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(healthz(&old.ca_pem).await.expect("the first certificate"), 200);
    assert!(healthz(&new.ca_pem).await.is_err(), "not yet the new one");

    write_pair(inj.dir.path(), &new);
    assert_eq!(healthz(&new.ca_pem).await.expect("the rotated certificate"), 200);
    assert!(healthz(&old.ca_pem).await.is_err(), "the old one is gone");
    assert_eq!(inj.agent.events("certificate_reloaded").len(), 1, "{}", inj.agent.output());

    // A broken pair (key not yet written) keeps the last good one serving.
    std::fs::write(inj.dir.path().join("tls.crt"), "not a certificate").unwrap();
    assert_eq!(healthz(&new.ca_pem).await.expect("still served"), 200);
    assert!(!inj.agent.events("certificate_reload_failed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_files_exit_78_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.crt"), "nope").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold")).args(args).current_dir(dir.path()).output().unwrap()
    };
    let base = ["injector", "--tls-key", "bad.crt", "--vault-address", "https://vault:8200"];
    let out = run(&[&base[..], &["--tls-cert", "bad.crt"]].concat());
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.crt"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["injector", "--tls-cert", "x", "--tls-key", "y", "--vault-address", "vault:8200"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vault-address"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["injector", "--tls-cert", "x", "--tls-key", "y"])
        .env_remove("VAULT_ADDR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VAULT_ADDR"));
}

/// `--log-level debug` reaches the injector's logging: a failed TLS
/// handshake, logged at debug only, is in its output; a bad level is a
/// usage error naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_level_flag_sets_the_injectors_level() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &["--log-level", "debug", "--log-format", "json"]).await;
    let mut plain = tokio::net::TcpStream::connect(&inj.addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
    let logged = eventually(10, async || !inj.agent.events("tls_failed").is_empty()).await;
    assert!(logged, "a debug event in the output:\n{}", inj.agent.output());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["injector", "--tls-cert", "x", "--tls-key", "y", "--vault-address", "https://v:8200"])
        .args(["--log-level", "leasehold=loud"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--log-level") && err.contains("\"leasehold=loud\" is not a log level"), "{err}");
}

/// The vault-k8s fixture's config, as injected, on the real server: the
/// translated templates render one credential set, the lease is renewed,
/// and SIGTERM drops the role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_k8s_translation_runs_a_lifecycle_on_the_server() {
    let env = Env::new(Ttls { db_ttl: "4s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let review = fixture("vault-k8s");
    let plan_defaults = injector_defaults();
    let settings = injector::admit::Settings { defaults: plan_defaults, vault_k8s_compat: true };
    let decision = injector::admit::review(&review, &settings).unwrap();
    let pod = patched(&review, &decision.response["response"]);
    let mut config = agent_config(named(&pod, "initContainers", "leasehold").unwrap());
    // Where this machine has them: the pod's paths moved under the test dir.
    let secrets = env.secrets();
    for f in config["secrets"][0]["files"].as_array_mut().unwrap() {
        let p = f["path"].as_str().unwrap().replace("/vault/secrets", secrets.to_str().unwrap());
        f["path"] = json!(p);
    }
    config["vault"]["address"] = json!(env.url());
    config["auth"]["kubernetes"]["token_path"] = json!(env.token_path());
    config["state_dir"] = json!(env.dir.path().join("state"));
    config["telemetry"]["listen"] = json!("127.0.0.1:0");
    let path = env.dir.path().join("injected.yaml");
    std::fs::write(&path, config.to_string()).unwrap();

    let mut agent = env.spawn(&path).await;
    let read = |f: &str| std::fs::read_to_string(secrets.join(f)).ok();
    assert!(eventually(20, async || read("plain.txt").is_some()).await, "{}", agent.output());
    let plain = read("plain.txt").unwrap();
    let field = |k: &str| plain.lines().find_map(|l| l.strip_prefix(&format!("{k}: "))).unwrap().to_string();
    let (user, pass) = (field("username"), field("password"));
    assert_eq!(read("db-creds").unwrap(), format!("postgresql://{user}:{pass}@postgres:5432/app\n"));
    assert_eq!(read("db.env").unwrap(), format!("export DB_USER=\"{user}\"\nexport DB_PASS=\"{pass}\"\n"));
    assert!(env.pg.role_exists(&user).await);
    env.pg.connect(&user, &pass).await.expect("the translated credentials log in");

    assert!(eventually(10, async || !agent.events("renewed").is_empty()).await, "renewed:\n{}", agent.output());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    assert!(!env.pg.role_exists(&user).await, "role dropped at shutdown");
    assert_eq!(agent.events("issued").len(), 1, "one credential set for the three files");
}

fn injector_defaults() -> injector::plan::Defaults {
    injector::plan::Defaults {
        vault_address: "https://vault.vault.svc:8200".into(),
        vault_ca_pem: None,
        vault_namespace: String::new(),
        auth_mount: "kubernetes".into(),
        image: "ghcr.io/leasehold/leasehold:0.1.0".into(),
        legacy: false,
        token_audience: None,
        telemetry_port: 9102,
    }
}

/// #23: after the TLS handshake nothing bounded a connection, and out of
/// descriptors the accept loop spun. Now a request's headers must arrive
/// within 10 s, connections beyond the cap or within the descriptor
/// reserve are closed at once, failing accepts back off; probes and
/// reviews are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_or_a_descriptor_flood_cannot_stall_the_injector() {
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &[]).await;
    let port: u16 = inj.addr.rsplit(':').next().unwrap().parse().unwrap();
    let c = client(&tls.ca_pem);
    let healthz = async || {
        let probe = c.get(format!("https://localhost:{port}/healthz")).timeout(Duration::from_secs(1));
        probe.send().await.map(|r| r.status().as_u16()).ok()
    };

    // 300 connections that never finish their TLS handshake, and one that
    // finishes it and sends half a request's headers.
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(tls.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut half = connector.connect(name, tcp).await.expect("TLS");
    tokio::io::AsyncWriteExt::write_all(&mut half, b"POST /mutate HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
    let sent = std::time::Instant::now();
    assert_eq!(healthz().await, Some(200), "/healthz under a slowloris");
    let review = fixture("plain");
    assert_eq!(admit(&c, &inj, &review).await["allowed"], true, "a review served under a slowloris");
    // The half-sent request is dropped once the header timeout passes.
    let mut rest = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut half, &mut rest);
    let closed = tokio::time::timeout(Duration::from_secs(15), read).await;
    assert!(closed.is_ok(), "a request's headers must come within 10 s: still open after {:?}", sent.elapsed());
    assert!(sent.elapsed() >= Duration::from_secs(9), "closed by the header timeout, not before: {:?}", sent.elapsed());
    drop(slow);

    // Near the descriptor limit (within listen::RESERVE of it): new
    // connections are closed at once instead of being held.
    let pid = inj.agent.child.id().unwrap();
    let (soft, set) = crate::support::nofile(pid);
    set(crate::support::settled_fds(pid).await + 4);
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut rest);
        let closed = tokio::time::timeout(Duration::from_secs(2), read).await;
        assert!(closed.is_ok(), "a connection within the descriptor reserve is closed at once");
    }
    // Out of descriptors altogether (no new descriptor under 3): accepting
    // fails, and backs off.
    set(3);
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.extend(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let warnings = inj.agent.events("accept_failed");
    assert!(!warnings.is_empty() && warnings.len() <= 2, "{} accept warnings in 3 s", warnings.len());
    drop(flood);
    set(soft);
    assert!(eventually(10, async || healthz().await == Some(200)).await, "served after:\n{}", inj.agent.output());
}

/// #24: with --vault-k8s-compat, a pod carrying any of the vault-k8s
/// annotations platform teams use was denied at CREATE, so its ReplicaSet
/// sat at 0. Each is now translated (its effect checked in the patched pod)
/// or accepted with an admission warning saying why it is ignored; the
/// patched pods validate against Kubernetes' schemas and their agent
/// configs pass `leasehold check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vault_k8s_annotation_in_use_is_admitted() {
    let tls = DevTls::generate().unwrap();
    let inj = start_injector(&tls, &["--vault-k8s-compat"]).await;
    let c = client(&tls.ca_pem);
    let out = tempfile::tempdir().unwrap();
    let sidecar = |pod: &Value| named(pod, "initContainers", "leasehold").expect("the sidecar").clone();
    type Check = fn(&Value);
    let cases: [(&str, &str, Option<&str>, Check); 15] = [
        ("agent-limits-cpu", "250m", None, |c| assert_eq!(c["resources"]["limits"]["cpu"], "250m")),
        ("agent-limits-mem", "64Mi", None, |c| assert_eq!(c["resources"]["limits"]["memory"], "64Mi")),
        ("agent-requests-cpu", "10m", None, |c| assert_eq!(c["resources"]["requests"]["cpu"], "10m")),
        ("agent-requests-mem", "16Mi", None, |c| assert_eq!(c["resources"]["requests"]["memory"], "16Mi")),
        // Translated, and a warning: alone, the file must come from the image.
        ("ca-cert", "/vault/tls/ca.crt", Some("without vault.hashicorp.com/tls-secret"), |c| {
            assert_eq!(agent_config(c)["vault"]["ca_cert"], "/vault/tls/ca.crt")
        }),
        ("tls-secret", "vault-tls", None, |c| {
            let m = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/vault/tls");
            assert_eq!(m.expect("the TLS secret mounted")["readOnly"], true);
        }),
        ("log-level", "debug", None, |c| assert_eq!(agent_config(c)["log"]["level"], "debug")),
        ("agent-cache-enable", "true", Some("no cache listener"), |_| {}),
        ("agent-pre-populate", "false", Some("always written before the app starts"), |_| {}),
        ("agent-inject-default-template", "json", None, |c| {
            assert_eq!(agent_config(c)["secrets"][0]["files"][0]["template"], "{{ data|tojson }}")
        }),
        ("preserve-secret-case", "true", None, |c| {
            assert!(agent_config(c)["secrets"][0]["files"][0]["path"].as_str().unwrap().ends_with("/DB"))
        }),
        ("agent-run-as-user", "1000", None, |c| assert_eq!(c["securityContext"]["runAsUser"], 1000)),
        ("agent-inject-token", "true", Some("the Vault token stays with the agent"), |_| {}),
        (
            "agent-inject-template-DB",
            "{{ with secret \"database/creds/app\" }}{{ .Data.password | base64Encode }}{{ end }}",
            None,
            |c| assert!(agent_config(c)["secrets"][0]["files"][0]["template"].as_str().unwrap().contains("b64encode")),
        ),
        (
            "agent-inject-template-DB",
            "{{ with secret \"database/creds/app\" }}{{ base64Decode .Data.password }}{{ end }}",
            None,
            |c| assert!(agent_config(c)["secrets"][0]["files"][0]["template"].as_str().unwrap().contains("b64decode")),
        ),
    ];
    let mut pods = Vec::new();
    for (i, (annotation, value, warning, check)) in cases.into_iter().enumerate() {
        let mut review = fixture("vault-k8s-unsupported");
        let annotations = review["request"]["object"]["metadata"]["annotations"].as_object_mut().unwrap();
        annotations.clear();
        for (k, v) in [("agent-inject", "true"), ("role", "app"), ("agent-inject-secret-DB", "database/creds/app")] {
            annotations.insert(format!("vault.hashicorp.com/{k}"), json!(v));
        }
        annotations.insert(format!("vault.hashicorp.com/{annotation}"), json!(value));
        let r = admit(&c, &inj, &review).await;
        let mut pod = patched(&review, &r);
        // The API server names a generateName pod after admission.
        pod["metadata"]["name"] = json!(format!("app-{i}"));
        let agent = sidecar(&pod);
        assert_restricted(&agent);
        check(&agent);
        let warnings: Vec<&str> =
            r["warnings"].as_array().map(|w| w.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        match warning {
            Some(why) => assert!(
                warnings.iter().any(|w| w.contains(&format!("vault.hashicorp.com/{annotation}")) && w.contains(why)),
                "{annotation}: a warning saying why: {warnings:?}"
            ),
            None => assert!(warnings.is_empty(), "{annotation} is translated, not ignored: {warnings:?}"),
        }
        check_config(&agent_config(&agent), out.path(), &format!("annotation-{i}"));
        let path = out.path().join(format!("pod-{i}.json"));
        std::fs::write(&path, pod.to_string()).unwrap();
        pods.push(path);
    }
    kubernetes_validate(&pods);

    // The lint says the same of manifests, before anything is swapped.
    let lint = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["injector", "lint"])
        .arg(fixtures().join("../lint/workloads.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&lint.stdout);
    assert_eq!(lint.status.code(), Some(1), "one workload would be denied: {text}");
    let expected = std::fs::read_to_string(fixtures().join("../lint/workloads.expected")).unwrap();
    assert_eq!(text, expected);
}
