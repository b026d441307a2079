//! `on_change`: signal, exec and http fire once per actual change, not on
//! an unchanged re-render; a failing hook does not stop the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::{Env, Ttls, eventually};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP server that counts requests and answers 200.
async fn counting_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/-/reload", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf).await;
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
        }
    });
    (url, hits)
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn config(env: &Env, template: &str, url: &str, exec_cmd: &str) -> std::path::PathBuf {
    let d = env.dir.path().display();
    let secrets = format!(
        r#"  - name: db
    path: database/creds/app
    files:
      - path: {secrets}/db.txt
        template: "{template}"
    on_change:
      signal: {{ pid_file: {d}/app.pid, signal: SIGUSR1 }}
      exec: ["/bin/sh", "-c", "{exec_cmd}"]
      http: {{ url: "{url}", method: POST }}
"#,
        secrets = env.secrets().display(),
    );
    env.config_with_secrets(&secrets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_fire_once_per_change() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    let d = env.dir.path().to_path_buf();
    // The "application": records every SIGUSR1 it receives.
    // The trap is set before the pid is published: an early signal must not kill it.
    let app_script = format!(
        "trap 'echo usr1 >> {d}/signals' USR1; echo $$ > {d}/app.pid; while :; do sleep 0.05; done",
        d = d.display()
    );
    let mut app = tokio::process::Command::new("sh").args(["-c", &app_script]).kill_on_drop(true).spawn().unwrap();
    assert!(eventually(5, async || d.join("app.pid").exists()).await);
    let (url, hits) = counting_server().await;
    // The hook's environment is an allowlist: cargo's CARGO_PKG_NAME, which
    // the agent inherited from this test, must not reach it; PATH must.
    let exec_cmd = format!("echo run pkg=[$CARGO_PKG_NAME] path=[$PATH] >> {}/execs", d.display());
    let path = config(&env, "u={{ username }}", &url, &exec_cmd);
    let mut agent = env.spawn(&path).await;

    let fired = |n: usize| {
        let d = d.clone();
        let hits = hits.clone();
        async move { lines(&d.join("signals")) == n && lines(&d.join("execs")) == n && hits.load(Ordering::SeqCst) == n }
    };
    assert!(eventually(20, async || fired(1).await).await, "first render notifies:\n{}", agent.output());

    // SIGHUP with an unchanged config: re-render, nothing changed, no hook.
    agent.signal(Signal::SIGHUP);
    assert!(eventually(10, async || agent.events("rendered").len() >= 2).await, "{}", agent.output());
    // Hooks run only when a file changed; this render changed none.
    assert_eq!(agent.events("rendered")[1]["changed"], 0);
    assert!(fired(1).await, "an unchanged re-render notifies nobody");

    // A template change changes the file: each hook fires once more.
    config(&env, "user={{ username }}", &url, &exec_cmd);
    agent.signal(Signal::SIGHUP);
    assert!(eventually(10, async || fired(2).await).await, "{}", agent.output());
    // The http hook counts as fired when its request arrives; the agent logs
    // it once the answer is in.
    assert!(eventually(5, async || agent.events("notified").len() == 6).await, "{}", agent.output());

    let execs = std::fs::read_to_string(d.join("execs")).unwrap();
    assert!(execs.lines().all(|l| l.contains("pkg=[]") && !l.contains("path=[]")), "{execs}");

    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
    let _ = app.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_hooks_are_logged_not_fatal() {
    let env = Env::new(Ttls { db_ttl: "1h", db_max: "2h", token_ttl: "1h", token_max: "2h" }).await;
    // No pid file, a failing command that prints the password, an unreachable URL.
    let path =
        config(&env, "u={{ username }} p={{ password }}", "http://127.0.0.1:9/x", "cat ../secrets/db.txt; exit 3");
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("/bin/sh\", \"-c\", \"cat ../", &format!("/bin/sh\", \"-c\", \"cat {}/", env.dir.path().display()));
    std::fs::write(&path, yaml).unwrap();
    let mut agent = env.spawn(&path).await;
    assert!(eventually(30, async || agent.events("notify_failed").len() == 3).await, "{}", agent.output());
    assert!(agent.child.try_wait().unwrap().is_none(), "agent keeps running");
    let text = std::fs::read_to_string(env.secrets().join("db.txt")).unwrap();
    let password = text.split(" p=").nth(1).unwrap().trim().to_string();
    let output = agent.events("hook_output");
    assert_eq!(output.len(), 1, "{}", agent.output());
    assert!(output[0]["output"].as_str().unwrap().contains("[redacted]"));
    assert!(!agent.output().contains(&password), "the hook's output was scrubbed");
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(Duration::from_secs(15)).await, 0, "{}", agent.output());
}
