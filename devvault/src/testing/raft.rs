//! A production-shaped OpenBao: three real `bao server` processes (not
//! `-dev`) with integrated raft storage on 127.0.0.11-13, initialised with
//! one unseal key, each with a file audit device. Tests kill the active
//! node with SIGKILL and restart it (it comes back sealed and is unsealed
//! again, as an operator would).
//!
//! Each node runs under a watchdog shell, as [`super::OpenBao`] does, so a
//! test binary that dies leaves no server behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::openbao::{AuditEntry, bao_bin, parse_audit, watched};

/// One node: its address, data directory and running process.
struct Node {
    ip: String,
    port: u16,
    dir: PathBuf,
    running: Mutex<Option<(i32, Child, ChildStdin)>>,
}

pub struct RaftCluster {
    nodes: Vec<Node>,
    pub root_token: String,
    unseal_key: String,
    dir: tempfile::TempDir,
}

/// What a node says of itself (`sys/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Active,
    Standby,
    Sealed,
    /// No answer (killed, or not up yet), or anything else.
    Down,
}

impl RaftCluster {
    /// Starts three nodes, initialises the first, unseals it and joins the
    /// others (`retry_join`), and waits until one is active and two standby.
    pub fn start() -> Result<RaftCluster, String> {
        let dir = tempfile::Builder::new().prefix("leasehold-raft-").tempdir().map_err(|e| e.to_string())?;
        let ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
        let mut ports = Vec::new();
        for ip in ips {
            ports.push(free_port_on(ip)?);
        }
        let mut nodes = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(node_dir.join("raft")).map_err(|e| e.to_string())?;
            let joins: String = ips
                .iter()
                .zip(&ports)
                .filter(|(other, _)| *other != ip)
                .map(|(other, port)| {
                    format!("  retry_join {{\n    leader_api_addr = \"http://{other}:{port}\"\n  }}\n")
                })
                .collect();
            let config = format!(
                "storage \"raft\" {{\n  path = \"{raft}\"\n  node_id = \"node{i}\"\n{joins}}}\n\
                 listener \"tcp\" {{\n  address = \"{ip}:{port}\"\n  cluster_address = \"{ip}:{cport}\"\n  tls_disable = true\n}}\n\
                 api_addr = \"http://{ip}:{port}\"\ncluster_addr = \"https://{ip}:{cport}\"\ndisable_mlock = true\n\
                 audit \"file\" \"test\" {{\n  options {{\n    file_path = \"{audit}\"\n    log_raw = \"true\"\n  }}\n}}\n",
                raft = node_dir.join("raft").display(),
                port = ports[i],
                cport = free_port_on(ip)?,
                // One file for all: the audit table is replicated, and a
                // node whose device options differ refuses to become active.
                audit = dir.path().join("audit.log").display(),
            );
            std::fs::write(node_dir.join("bao.hcl"), config).map_err(|e| e.to_string())?;
            nodes.push(Node { ip: ip.to_string(), port: ports[i], dir: node_dir, running: Mutex::new(None) });
        }
        for node in &nodes {
            node.launch()?;
        }
        let init =
            call(&nodes[0].url(), "PUT", "sys/init", None, Some(json!({"secret_shares": 1, "secret_threshold": 1})))
                .ok_or("sys/init did not answer")?;
        let unseal_key = init["keys_base64"][0].as_str().ok_or(format!("sys/init answered {init}"))?.to_string();
        let root_token = init["root_token"].as_str().ok_or(format!("sys/init answered {init}"))?.to_string();
        let cluster = RaftCluster { nodes, root_token, unseal_key, dir };
        cluster.unseal(0)?;
        cluster.wait_for(0, Health::Active, Duration::from_secs(30))?;
        // Autopilot makes a joined node a voter once it has been healthy
        // this long (10 s by default): only voters elect a new leader.
        let autopilot = json!({"server_stabilization_time": "1s"});
        let base = cluster.url(0);
        let token = Some(cluster.root_token.as_str());
        call(&base, "PUT", "sys/storage/raft/autopilot/configuration", token, Some(autopilot));
        for i in 1..3 {
            cluster.unseal(i)?;
            cluster.wait_for(i, Health::Standby, Duration::from_secs(30))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = call(&base, "GET", "sys/storage/raft/autopilot/state", token, None).unwrap_or_default();
            let voters = state["data"]["voters"].as_array().map_or(0, Vec::len);
            if voters == 3 && state["data"]["healthy"] == true {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the raft cluster has {voters} voters after 60 s: {state}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// Node `i`'s server log (for a failing test's message).
    pub fn node_log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("bao.log")
    }

    pub fn health(&self, i: usize) -> Health {
        self.nodes[i].health()
    }

    /// The node that is active now, if any.
    pub fn active(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|i| self.health(*i) == Health::Active)
    }

    /// SIGKILL, as a node lost with its machine.
    pub fn kill(&self, i: usize) {
        let mut running = self.nodes[i].running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((pid, mut child, mut stdin)) = running.take() {
            let _ = stdin.write_all(b"\n");
            let _ = child.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts a killed node again and unseals it: it rejoins as a standby.
    pub fn restart(&self, i: usize) -> Result<(), String> {
        self.nodes[i].launch()?;
        self.unseal(i)
    }

    fn unseal(&self, i: usize) -> Result<(), String> {
        // A node still joining answers "not yet": retried.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = call(&self.url(i), "PUT", "sys/unseal", None, Some(json!({"key": self.unseal_key})));
            if answer.as_ref().is_some_and(|a| a["sealed"] == false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("node {i} did not unseal: {answer:?}\n{}", self.nodes[i].log()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_for(&self, i: usize, want: Health, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while self.health(i) != want {
            if Instant::now() > deadline {
                return Err(format!("node {i} is {:?}, not {want:?}: {}", self.health(i), self.nodes[i].log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The cluster's audit entries so far (the nodes share one file).
    pub fn audit(&self) -> Vec<AuditEntry> {
        parse_audit(&std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default())
    }
}

impl Node {
    fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bao.log")).unwrap_or_default()
    }

    fn health(&self) -> Health {
        // standbyok/sealedcode: every state answers 200 with its flags.
        match call(&self.url(), "GET", "sys/health?standbyok=true&sealedcode=200&uninitcode=200", None, None) {
            Some(h) if h["sealed"] == true => Health::Sealed,
            Some(h) if h["standby"] == false && h["initialized"] == true => Health::Active,
            Some(h) if h["standby"] == true => Health::Standby,
            _ => Health::Down,
        }
    }

    fn launch(&self) -> Result<(), String> {
        let bin = bao_bin()?;
        let log = self.dir.join("bao.log");
        let script = format!(
            "'{bin}' server -config='{config}' -log-level=info >>'{log}' 2>&1 & pid=$!; echo $pid; \
             read _ignored; kill -9 $pid; wait $pid",
            bin = bin.display(),
            config = self.dir.join("bao.hcl").display(),
            log = log.display(),
        );
        let (pid, child, stdin) = watched(&script)?;
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some((pid, child, stdin));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.health() == Health::Down {
            if !Path::new(&format!("/proc/{pid}")).exists() || Instant::now() > deadline {
                return Err(format!("bao server on {} did not start: {}", self.url(), self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// A port free on `ip` (a loopback address of 127.0.0.0/8).
fn free_port_on(ip: &str) -> Result<u16, String> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| format!("finding a free port on {ip}: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// A blocking JSON call (the cluster is driven from test setup code, on
/// any thread); None when there is no answer.
fn call(base: &str, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Option<Value> {
    http(method, &format!("{base}/v1/{path}"), token, body)
}

/// A minimal HTTP/1.1 client over std's TcpStream (no blocking HTTP crate
/// in the harness): enough for sys/init, sys/unseal and sys/health.
fn http(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> Option<Value> {
    use std::io::Read;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut stream = std::net::TcpStream::connect_timeout(&host.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let token = token.map(|t| format!("X-Vault-Token: {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} /{path} HTTP/1.1\r\nHost: {host}\r\n{token}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let (head, payload) = text.split_once("\r\n\r\n")?;
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return serde_json::from_str(payload.trim()).ok();
    }
    // Chunked: size line, data, CRLF, until the zero-size chunk.
    let mut rest = payload;
    let mut joined = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 || after.len() < n {
            break;
        }
        joined.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    serde_json::from_str(joined.trim()).ok()
}
