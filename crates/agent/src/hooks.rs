//! App notification (`on_change`): after every file of a secret was written
//! and at least one changed. A failing hook is logged, never fatal; its
//! output is logged with the secret's values scrubbed out, and the secret's
//! values are never put in its environment.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::backoff::Backoff;
use config::OnChange;
use vault::secret::SecretData;

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_ATTEMPTS: usize = 3;
/// How much of a hook's output reaches the log.
const OUTPUT_LIMIT: usize = 2048;
/// Bytes of an exec hook's stdout and of its stderr kept; the rest is read
/// and dropped (a chatty hook cannot take the agent's memory).
const READ_LIMIT: usize = 4 * OUTPUT_LIMIT;
/// What an exec hook's environment keeps of the agent's: never the config
/// (`LEASEHOLD_CONFIG` may hold a CA or a Vault address to abuse) or
/// anything else the pod gave the agent.
const ENV_ALLOWLIST: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "HOSTNAME"];

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("signal: {0}")]
    Signal(String),
    #[error("exec: {0}")]
    Exec(String),
    #[error("http: {0}")]
    Http(String),
}

/// Runs every configured hook; returns each hook's name and its result
/// (the caller's `HookRan` event logs and counts it).
pub async fn run(secret: &str, hooks: &OnChange, data: &SecretData) -> Vec<(&'static str, Result<(), HookError>)> {
    let mut outcomes = Vec::new();
    if let Some(sig) = &hooks.signal {
        outcomes.push(("signal", signal(&sig.pid_file, sig.signal)));
    }
    if let Some(argv) = &hooks.exec {
        outcomes.push(("exec", exec(secret, argv, data).await));
    }
    if let Some(http) = &hooks.http {
        outcomes.push(("http", call(&http.url, &http.method).await));
    }
    outcomes
}

fn signal(pid_file: &std::path::Path, sig: Signal) -> Result<(), HookError> {
    let fail = |m: String| HookError::Signal(m);
    let text = std::fs::read_to_string(pid_file).map_err(|e| fail(format!("reading {}: {e}", pid_file.display())))?;
    let pid: i32 = text.trim().parse().map_err(|_| fail(format!("{} does not hold a pid", pid_file.display())))?;
    if pid <= 1 || pid as u32 == std::process::id() {
        return Err(fail(format!("refusing to signal pid {pid} (init or the agent itself)")));
    }
    kill(Pid::from_raw(pid), sig).map_err(|e| fail(format!("kill {pid} {sig}: {e}")))
}

async fn exec(secret: &str, argv: &[String], data: &SecretData) -> Result<(), HookError> {
    let fail = |m: String| HookError::Exec(m);
    let (program, args) = argv.split_first().ok_or_else(|| fail("empty argv".into()))?;
    let mut command = tokio::process::Command::new(program);
    command.args(args).env_clear();
    for (key, value) in std::env::vars_os().filter(|(k, _)| ENV_ALLOWLIST.iter().any(|a| k == *a)) {
        command.env(key, value);
    }
    let mut child = command
        .env("LEASEHOLD_SECRET", secret)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("starting {program}: {e}")))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err) = tokio::join!(read_capped(stdout), read_capped(stderr));
        (child.wait().await, out, err)
    };
    let (status, out, err) = tokio::time::timeout(EXEC_TIMEOUT, run)
        .await
        .map_err(|_| fail(format!("{program} did not finish within {EXEC_TIMEOUT:?}")))?;
    let status = status.map_err(|e| fail(format!("waiting for {program}: {e}")))?;
    let output = scrub(&format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err)), data);
    if !output.trim().is_empty() {
        tracing::info!(event = "hook_output", secret, output = %output.trim(), "exec hook output");
    }
    if status.success() { Ok(()) } else { Err(fail(format!("{program} exited with {status}"))) }
}

/// Up to `READ_LIMIT` bytes of `pipe`; the rest is read and dropped, so the
/// child never blocks on a full pipe.
async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let Some(mut pipe) = pipe else { return Vec::new() };
    let mut kept = Vec::new();
    // On the heap: an array here would live in this future, and so in every
    // supervisor's (hooks run inside its render), hooks configured or not.
    let mut chunk = vec![0u8; 4096];
    while let Ok(n) = pipe.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let room = READ_LIMIT.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    kept
}

async fn call(url: &str, method: &reqwest::Method) -> Result<(), HookError> {
    let fail = |m: String| HookError::Http(m);
    // No redirects: the hook goes to the URL configured, nowhere else.
    let builder = reqwest::Client::builder().timeout(HTTP_TIMEOUT).redirect(reqwest::redirect::Policy::none());
    let client = vault::without_unused_roots(builder, url).build().map_err(|e| fail(e.to_string()))?;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut last = String::new();
    for attempt in 0..HTTP_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        match client.request(method.clone(), url).send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => last = format!("{url} answered {}", resp.status()),
            Err(e) => last = format!("{url}: {}", if e.is_timeout() { "timed out" } else { "request failed" }),
        }
    }
    Err(fail(last))
}

/// Replaces every secret value (4 characters or more) in `text`, then cuts
/// it to `OUTPUT_LIMIT` characters: cut first, a secret straddling the cut
/// would keep its first characters.
fn scrub(text: &str, data: &SecretData) -> String {
    let mut out = text.to_string();
    for value in data.expose().values().filter_map(|v| v.as_str()).filter(|v| v.len() >= 4) {
        out = out.replace(value, "[redacted]");
    }
    out.chars().take(OUTPUT_LIMIT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scrub_removes_secret_values() {
        let data =
            SecretData::new(json!({"username": "v-app-user", "password": "Hunter2-Pass"}).as_object().unwrap().clone());
        assert_eq!(scrub("user v-app-user pw Hunter2-Pass", &data), "user [redacted] pw [redacted]");
    }

    #[test]
    fn a_secret_across_the_output_limit_leaks_nothing() {
        let data = SecretData::new(json!({"password": "Hunter2-Pass"}).as_object().unwrap().clone());
        // The password starts 4 characters before the cut.
        let text = format!("{}Hunter2-Pass tail", "x".repeat(OUTPUT_LIMIT - 4));
        let out = scrub(&text, &data);
        assert!(!out.contains("Hunt"), "{}", &out[out.len() - 20..]);
        assert_eq!(out.chars().count(), OUTPUT_LIMIT);
    }
}
