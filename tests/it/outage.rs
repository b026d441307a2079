//! Production faults (#21) as a platform team meets them: a link cut so that
//! packets vanish without a reset (the agent in a network namespace the
//! test creates, the host's end of its veth pair set down), and a Vault
//! leader election in a raft cluster of real `bao server` processes (`ha`).
//! An app stand-in logs in to PostgreSQL with the file's credentials every
//! 200 ms and counts what fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use devvault::testing::PgCluster;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// A network namespace joined to the host by a veth pair, with addresses
/// of its own (10.213.x.0/30): the link the test cuts. Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`ip {}` failed (the outage tests need root and iproute2): {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("running `ip` (iproute2, installed by scripts/test): {e}"),
    }
}

impl Netns {
    pub fn create() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let (name, host_if, peer) = (format!("lh{tag}"), format!("lhh{tag}"), format!("lhp{tag}"));
        let subnet = (pid as usize * 8 + n as usize) % 64 * 4;
        let host_ip = format!("10.213.{}.{}", n % 250, subnet + 1);
        let ns_ip = format!("10.213.{}.{}", n % 250, subnet + 2);
        // Left over from a run that was killed: gone first.
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        let _ = std::process::Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.clone() };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    /// Packets on the link vanish: no reset, no unreachable; the namespace
    /// keeps its route (only the host's end goes down).
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    pub fn mend(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }

    /// `ip netns exec <name>`: the command after it runs in the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_if]).output();
    }
}

/// One login of the app stand-in.
#[derive(Debug, Clone)]
pub struct Login {
    pub at: SystemTime,
    pub user: String,
    pub ok: bool,
    /// The file named someone else by the time the login failed (the app
    /// would have reloaded it): not the agent's failure.
    pub stale: bool,
}

/// Logs in with `file`'s credentials (JSON `username`/`password`) every
/// 200 ms until stopped.
pub struct Probe {
    logins: Arc<Mutex<Vec<Login>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn creds(file: &Path) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    Some((v["username"].as_str()?.to_string(), v["password"].as_str()?.to_string()))
}

impl Probe {
    pub fn start(pg: &'static PgCluster, file: PathBuf) -> Probe {
        let logins = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (l, st) = (logins.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.is_cancelled() {
                if let Some((user, password)) = creds(&file) {
                    let at = SystemTime::now();
                    let ok = tokio::time::timeout(Duration::from_secs(2), pg.connect(&user, &password))
                        .await
                        .is_ok_and(|r| r.is_ok());
                    let stale = !ok && creds(&file).is_some_and(|(now, _)| now != user);
                    l.lock().unwrap().push(Login { at, user, ok, stale });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Probe { logins, stop, task }
    }

    pub fn logins(&self) -> Vec<Login> {
        self.logins.lock().unwrap().clone()
    }

    pub async fn stop(self) -> Vec<Login> {
        self.stop.cancel();
        let _ = self.task.await;
        self.logins.lock().unwrap().clone()
    }
}

/// Failed logins in `[from, to)` that the agent is to blame for.
pub fn failed(logins: &[Login], from: SystemTime, to: SystemTime) -> Vec<&Login> {
    logins.iter().filter(|l| l.at >= from && l.at < to && !l.ok && !l.stale).collect()
}

/// The first successful login at or after `from`.
pub fn first_ok_after(logins: &[Login], from: SystemTime) -> Option<&Login> {
    logins.iter().find(|l| l.at >= from && l.ok)
}

/// The agent's `db.json` user once it exists.
async fn first_user(env: &Env, agent: &Agent) -> String {
    assert!(eventually(30, async || env.read_json("db.json").is_some()).await, "{}", agent.output());
    env.read_json("db.json").unwrap()["username"].as_str().unwrap().to_string()
}

/// Sleeps until `at` (the test's own schedule of cuts, not an assertion).
async fn until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_link_costs_no_login_and_credentials_return_within_3_s_of_it() {
    // TTL 20 s: renewed at 9-10 s (5% jitter), replaced by 20 - 1 - 5 =
    // 14 s at the latest if renewals keep failing (reissue_at 0.75).
    let env = Env::openbao_only(Ttls { db_ttl: "20s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let ns = Netns::create();
    let (vault, _) = forward(&ns.host_ip, env.url().trim_start_matches("http://").to_string()).await;
    let config = env.config("", "shutdown:\n  timeout: 4s\n");
    let text = std::fs::read_to_string(&config).unwrap().replace(&env.url(), &format!("http://{vault}"));
    std::fs::write(&config, text).unwrap();
    let prefix = ns.exec_prefix();
    let mut args: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let config_arg = config.display().to_string();
    args.extend(["leasehold", "agent", "-c", &config_arg]);
    let mut agent = Agent::spawn_command(&args, env.dir.path()).await;
    let first = first_user(&env, &agent).await;
    let issued = Instant::now();
    let probe = Probe::start(env.pg, env.secrets().join("db.json"));

    // 1. A 2.5 s cut over the first renewal (8.5 s to 11 s), shorter than
    // the 4 s between renewal and replacement: no failed login, and the
    // renewal that got through afterwards kept the same user.
    until(issued + Duration::from_millis(8500)).await;
    let cut = SystemTime::now();
    ns.cut();
    until(issued + Duration::from_secs(11)).await;
    ns.mend();
    let renewed = eventually(10, async || !agent.events("renewed").is_empty()).await;
    assert!(renewed, "no renewal after a 2.5 s cut: {}", agent.output());
    let short_done = SystemTime::now();
    assert!(agent.events("issued").len() == 1, "the short cut cost a new user: {}", agent.output());
    assert_eq!(env.read_json("db.json").unwrap()["username"], first.as_str());

    // 2. A 25 s cut, longer than the lease's life: the credentials die
    // (said at ERROR), and are working again within 3 s of the link.
    ns.cut();
    let long_cut = SystemTime::now();
    assert!(eventually(30, async || !agent.events("lease_expired").is_empty()).await, "{}", agent.output());
    tokio::time::sleep(Duration::from_secs(4)).await; // dead a while: the backoff has grown
    let mended = SystemTime::now();
    ns.mend();
    let back = eventually(10, async || first_ok_after(&probe.logins(), mended).is_some()).await;
    assert!(back, "no working credentials 10 s after the link came back: {}", agent.output());

    // 3. SIGTERM during a cut: the revocation cannot reach Vault; the agent
    // exits within shutdown.timeout (4 s) naming the lease it left.
    ns.cut();
    let logins = probe.stop().await;
    let stopped = Instant::now();
    agent.signal(Signal::SIGTERM);
    let code = agent.wait(Duration::from_secs(15)).await;
    let took = stopped.elapsed();
    ns.mend();
    assert_eq!(code, 1, "{}", agent.output());
    assert!(took < Duration::from_secs(6), "SIGTERM during a cut took {took:?}");
    // The current lease, and the dead one it replaced if its revocation
    // was still to come.
    let left = agent.events("lease_left_alive");
    assert!(!left.is_empty() && left.len() <= 2, "{}", agent.output());

    let short = failed(&logins, cut, short_done);
    assert!(short.is_empty(), "failed logins across a 2.5 s cut: {short:?}");
    let ok = first_ok_after(&logins, mended).unwrap();
    let recovered = secs_between(mended, ok.at);
    assert!(ok.user != first, "the dead user logged in again?");
    assert!(recovered <= 3.0, "credentials back {recovered:.1} s after the link");
    eprintln!(
        "blackhole: 0 failed logins over a 2.5 s cut; after a {:.0} s cut, working credentials {recovered:.2} s after the link",
        secs_between(long_cut, mended)
    );
}

/// OpenBao Agent (`bao agent`) rendering `database/creds/app` as JSON into
/// `file`, logging in as leasehold does (Kubernetes auth, role `app`).
fn bao_agent(env: &Env, file: &Path) -> tokio::process::Child {
    let bin = devvault::testing::bao_bin().unwrap_or_else(|e| panic!("{e}"));
    let config = env.dir.path().join("bao-agent.hcl");
    let hcl = format!(
        "vault {{\n  address = \"{url}\"\n}}\nauto_auth {{\n  method \"kubernetes\" {{\n    mount_path = \"auth/kubernetes\"\n    config = {{\n      role = \"app\"\n      token_path = \"{jwt}\"\n    }}\n  }}\n}}\ntemplate {{\n  destination = \"{file}\"\n  contents = <<EOT\n{{{{ with secret \"database/creds/app\" }}}}{{\"username\": \"{{{{ .Data.username }}}}\", \"password\": \"{{{{ .Data.password }}}}\"}}{{{{ end }}}}\nEOT\n}}\n",
        url = env.url(),
        jwt = env.token_path().display(),
        file = file.display(),
    );
    std::fs::write(&config, hcl).unwrap();
    let log = std::fs::File::create(env.dir.path().join("bao-agent.log")).unwrap();
    tokio::process::Command::new(bin)
        .args(["agent", &format!("-config={}", config.display())])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("bao agent starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_during_renewals_costs_no_more_logins_than_openbao_agent() {
    // TTL 10 s: renewed at 4.5-5 s, replaced by 6.5 s at the latest while
    // renewals fail. The election (12-14 s with OpenBao's default raft
    // timings) outlasts the lease: both agents' credentials die, and what
    // counts is how soon each has working ones once Vault answers again.
    let env = Env::raft(Ttls { db_ttl: "10s", db_max: "1h", token_ttl: "1h", token_max: "2h" }).await;
    let Server::Raft { cluster, .. } = &env.server else { unreachable!() };
    let cluster = cluster.clone();
    let leader = cluster.active().expect("an active node");
    let config = env.config("", "");
    let text = std::fs::read_to_string(&config).unwrap();
    // A platform team pointing at the balancing Service lists the nodes a
    // standby may redirect to (docs/kubernetes.md).
    let hosts = "  redirect_hosts: [127.0.0.11, 127.0.0.12, 127.0.0.13]\n";
    std::fs::write(&config, text.replacen("vault:\n", &format!("vault:\n{hosts}"), 1)).unwrap();
    let mut agent = env.spawn(&config).await;
    let bao_file = env.secrets().join("bao-db.json");
    let mut peer = bao_agent(&env, &bao_file);
    first_user(&env, &agent).await;
    assert!(eventually(30, async || creds(&bao_file).is_some()).await, "OpenBao Agent rendered nothing");
    let started = Instant::now();
    let t0 = SystemTime::now();
    let ours = Probe::start(env.pg, env.secrets().join("db.json"));
    let theirs = Probe::start(env.pg, bao_file.clone());

    // The active node dies (SIGKILL) just before the first renewals.
    until(started + Duration::from_secs(4)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.kill(leader)).await.unwrap();
    let killed = SystemTime::now();
    // "Vault answers again": the moment another node is active.
    let c = cluster.clone();
    let back = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.active().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        SystemTime::now()
    })
    .await
    .unwrap();
    // Restarted later, sealed, unsealed by its operator: a standby again.
    until(started + Duration::from_secs(30)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart(leader)).await.unwrap().unwrap();
    until(started + Duration::from_secs(50)).await;
    let (ours, theirs) = (ours.stop().await, theirs.stop().await);
    let end = SystemTime::now();

    let (ours_failed, theirs_failed) = (failed(&ours, t0, end), failed(&theirs, t0, end));
    let late: Vec<_> = ours_failed.iter().filter(|l| secs_between(back, l.at) > 3.0).collect();
    eprintln!(
        "leader election: new leader {:.1} s after the kill; failed logins: leasehold {} of {}, OpenBao Agent {} of {}",
        secs_between(killed, back),
        ours_failed.len(),
        ours.len(),
        theirs_failed.len(),
        theirs.len()
    );
    agent.signal(Signal::SIGTERM);
    let code = agent.wait(Duration::from_secs(20)).await;
    let _ = peer.start_kill();
    assert!(late.is_empty(), "credentials dead more than 3 s after Vault answered again: {late:?}\n{}", agent.output());
    assert!(
        ours_failed.len() <= theirs_failed.len(),
        "leasehold {ours_failed:?} against OpenBao Agent {theirs_failed:?}\n{}",
        agent.output()
    );
    assert_eq!(code, 0, "{}", agent.output());
}
