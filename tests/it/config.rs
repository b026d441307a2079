//! Bad configuration exits 78 with the file and key named; `check` renders
//! templates without Vault or runtime files.

use std::path::Path;

use crate::support::Agent;

const GOOD: &str = r#"vault:
  address: http://127.0.0.1:1
auth:
  kubernetes:
    role: app
    token_path: /nonexistent/token
secrets:
  - name: db
    path: database/creds/app
    files:
      - path: /tmp/leasehold-test/db.url
        template: "postgresql://{{ username|urlencode }}:{{ password|urlencode }}@db/app"
"#;

async fn run(args: &[&str], dir: &Path) -> (i32, String) {
    let mut agent = Agent::spawn(args, dir).await;
    let code = agent.wait(std::time::Duration::from_secs(20)).await;
    (code, agent.output())
}

async fn agent_with(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    run(&["agent", "-c", &path.display().to_string()], dir.path()).await
}

#[tokio::test]
async fn bad_configs_exit_78_naming_the_key() {
    let cases = [
        (GOOD.replace("    role: app\n", "    role: app\n    rol: x\n"), "auth.kubernetes.rol"),
        (GOOD.replace("    files:", "    refresh_interval: five\n    files:"), "secrets[0].refresh_interval"),
        (GOOD.replace("@db/app\"", "@db/app\"\n        mode: \"0999\""), "secrets[0].files[0].mode"),
        (GOOD.replace("    role: app\n", ""), "auth.kubernetes"),
        (
            format!("{GOOD}  - name: db\n    path: kv/data/x\n    files:\n      - path: /tmp/x\n        format: env\n"),
            "secrets[1].name",
        ),
        (GOOD.replace("@db/app\"", "@db/app {% if %}\""), "secrets[0].files[0].template"),
        (GOOD.replace("    path: database", "    renew_at: 1.5\n    path: database"), "secrets[0].renew_at"),
    ];
    for (yaml, key) in cases {
        let (code, out) = agent_with(&yaml).await;
        assert_eq!(code, 78, "{key}: {out}");
        assert!(out.contains("bad.yaml") && out.contains(key), "{key} not named in: {out}");
    }
    let (code, out) = agent_with("- just\n- a list\n").await;
    assert_eq!(code, 78, "{out}");
}

#[tokio::test]
async fn missing_config_file_and_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(&["agent", "-c", "/nonexistent/leasehold.yaml"], dir.path()).await;
    assert_eq!(code, 78);
    assert!(out.contains("/nonexistent/leasehold.yaml"), "{out}");
    let (code, _) = run(&["agent"], dir.path()).await;
    assert_eq!(code, 2, "usage error");
}

#[tokio::test]
async fn check_renders_templates_without_vault_or_runtime_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let (code, out) = run(&["check", "-c", &path.display().to_string()], dir.path()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 secrets, 1 files)"), "{out}");
    assert!(!Path::new("/tmp/leasehold-test/db.url").exists(), "check writes nothing");

    // A template that parses but fails to render (unknown filter, undefined value).
    let bad = GOOD.replace("{{ username|urlencode }}", "{{ data.port }}");
    std::fs::write(&path, bad).unwrap();
    let (code, out) = run(&["check", "-c", &path.display().to_string()], dir.path()).await;
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("secrets[0]") && out.contains("db.url") && out.contains("undefined"), "{out}");

    let syntax = GOOD.replace("{{ username|urlencode }}", "{{ username|nofilter }}");
    std::fs::write(&path, syntax).unwrap();
    let (code, out) = run(&["check", "-c", &path.display().to_string()], dir.path()).await;
    assert_eq!(code, 78, "{out}");
}

#[tokio::test]
async fn check_warns_when_a_files_owner_cannot_be_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("owned.yaml");
    let yaml = GOOD.replace("        template:", "        owner: 1000\n        template:");
    std::fs::write(&path, &yaml).unwrap();
    let bin = env!("CARGO_BIN_EXE_leasehold");
    let config = path.display().to_string();
    // Without CAP_CHOWN (as the chart runs it): root drops it with setpriv.
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-chown", "--inh-caps=-chown", bin, "check", "-c", &config])
        .output()
        .expect("setpriv (util-linux) runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {text}");
    assert!(text.contains("secrets[0].files[0]") && text.contains("CAP_CHOWN"), "{text}");
    // With it (as the test runs, when it has CAP_CHOWN), nothing to say.
    let (code, output) = run(&["check", "-c", &config], dir.path()).await;
    assert_eq!(code, 0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap();
    if u64::from_str_radix(caps, 16).unwrap() & 1 == 1 {
        assert!(!output.contains("CAP_CHOWN"), "{output}");
    }
}

/// #24: `check` refused valid configs the agent renders (KV templates with
/// `dictsort`, `.items()`, arithmetic, the injector's own `range`
/// translation) with exit 78. A KV secret's data is now permissive sample
/// data; typos in filter names still fail.
#[tokio::test]
async fn check_accepts_what_the_agent_renders_from_secrets_of_unknown_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.yaml");
    let kv = |template: &str| {
        format!(
            "{GOOD}  - name: kv\n    path: kv/data/app\n    files:\n      - path: /tmp/leasehold-test/kv\n        template: {}\n",
            serde_json::to_string(template).unwrap()
        )
    };
    for template in [
        "{% for k, v in data.data|dictsort %}{{ k }}={{ v }}\n{% endfor %}",
        "{% for k, v in data.data.items() %}{{ k }}={{ v }}\n{% endfor %}",
        "port={{ data.data.port + 1 }} pool={{ (data.data.pool | int) * 2 }}",
        "{{ data.data.cert | b64decode }}{{ data.data.key | b64encode(url=true) }}",
        "{% if data.data.enabled %}on{% else %}off{% endif %} {{ data.metadata.version }}",
    ] {
        std::fs::write(&path, kv(template)).unwrap();
        let (code, out) = run(&["check", "-c", &path.display().to_string()], dir.path()).await;
        assert_eq!(code, 0, "{template}: {out}");
    }
    for template in ["{{ data.data.x | nosuchfilter }}", "{{ nosuchfunction(data.data) }}", "{% for %}"] {
        std::fs::write(&path, kv(template)).unwrap();
        let (code, out) = run(&["check", "-c", &path.display().to_string()], dir.path()).await;
        assert_eq!(code, 78, "{template}: {out}");
        assert!(out.contains("secrets[1]") || out.contains("secrets[1].files[0]"), "{template}: {out}");
    }
}

/// #24: `check --local` says what the agent would find missing here: a
/// destination directory, the token file, the CA.
#[tokio::test]
async fn check_local_names_missing_directories_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.yaml");
    let missing = dir.path().join("missing");
    std::fs::write(&path, GOOD.replace("/tmp/leasehold-test", &missing.display().to_string())).unwrap();
    let config = path.display().to_string();
    let (code, out) = run(&["check", "-c", &config, "--local"], dir.path()).await;
    assert_eq!(code, 78, "{out}");
    assert!(out.contains(&format!("the directory {} does not exist", missing.display())), "{out}");
    assert!(out.contains("auth token_path: /nonexistent/token"), "{out}");
    let (code, out) = run(&["check", "-c", &config], dir.path()).await;
    assert_eq!(code, 0, "without --local the machine is not looked at: {out}");
    // Everything there: ok.
    let token = dir.path().join("token");
    std::fs::write(&token, "jwt").unwrap();
    let here = GOOD
        .replace("/nonexistent/token", &token.display().to_string())
        .replace("/tmp/leasehold-test/db.url", &dir.path().join("db.url").display().to_string());
    std::fs::write(&path, here).unwrap();
    let (code, out) = run(&["check", "-c", &config, "--local"], dir.path()).await;
    assert_eq!(code, 0, "{out}");
}
