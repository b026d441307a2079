//! The real auth and lease loops, in-process, against a scripted Vault
//! under tokio's paused clock: hours of token and lease life in
//! milliseconds, no sleeps, no timing windows. (`clock::now()` follows
//! tokio's clock, so the loops' deadlines move with `advance`.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agent::auth::{AuthLoop, AuthState, HeldToken};
use agent::clock;
use agent::lease::{LiveLease, SecretSpec, Supervisor};
use agent::render::Renderer;
use agent::run::Loaded;
use agent::teardown::Outcome;
use agent::telemetry::Telemetry;
use config::Config;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use vault::secret::{LeaseId, SecretData, SecretString};
use vault::{AuthMethod, LeaseRenewal, Secret, Token, TokenRenewal, Vault, VaultError};

/// What the scripted Vault answers, and what it was asked (with the
/// process clock's time).
#[derive(Default)]
struct Script {
    /// Login: a batch token of this TTL.
    batch_ttl: Duration,
    /// Credentials: this TTL, renewable.
    lease_ttl: Duration,
    /// Renewals: refused with 403 when true.
    refuse_renewals: bool,
    /// Renewals never answer (a frozen server).
    hang_renewals: bool,
    /// Renewals answer 503, with this `Retry-After` (Vault overloaded or
    /// in an election).
    unavailable: Option<Option<Duration>>,
    /// Lease lookups: this status and error (0: the lease lives, 300 s left).
    lookup: (u16, &'static str),
    /// Reads: refused with this status and error (0: answered).
    refuse_reads: (u16, &'static str),
    logins: Vec<SystemTime>,
    issues: Vec<SystemTime>,
    renewals: Vec<SystemTime>,
    /// A file to look at when credentials are issued and leases revoked.
    watched: Option<std::path::PathBuf>,
    /// Each issue: the path read, and the watched file's content then.
    issued: Vec<(String, Option<String>)>,
    /// Each revocation: when, the lease, and the watched file's content then.
    revoked: Vec<(SystemTime, String, Option<String>)>,
}

impl Script {
    fn look(&self) -> Option<String> {
        self.watched.as_ref().and_then(|p| std::fs::read_to_string(p).ok())
    }
}

#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<Script>>);

impl Scripted {
    fn with(f: impl FnOnce(&mut Script)) -> Scripted {
        let s = Scripted::default();
        f(&mut s.0.lock().unwrap());
        s
    }
    fn get<T>(&self, f: impl FnOnce(&Script) -> T) -> T {
        f(&self.0.lock().unwrap())
    }
}

fn denied() -> VaultError {
    VaultError::Status { op: "scripted", status: 403, errors: vec!["permission denied".into()], retry_after: None }
}

impl Vault for Scripted {
    async fn login(&self, _: AuthMethod, _: &str, _: &str, _: &SecretString) -> Result<Token, VaultError> {
        let mut s = self.0.lock().unwrap();
        s.logins.push(clock::now());
        let n = s.logins.len();
        // A login loop never lets the paused clock move: refuse past any
        // sane count, so such a loop backs off and the test can see it.
        if n > 1000 {
            return Err(denied());
        }
        Ok(Token {
            secret: SecretString::from(format!("b.token-{n}")),
            accessor: format!("batch-{n}").into(),
            ttl: s.batch_ttl,
            renewable: false,
            batch: true,
        })
    }
    async fn lookup_self(&self, _: &SecretString) -> Result<(Duration, bool), VaultError> {
        Ok((Duration::from_secs(3600), false))
    }
    async fn renew_self(&self, _: &SecretString, _: Duration) -> Result<TokenRenewal, VaultError> {
        Err(VaultError::Status {
            op: "scripted",
            status: 400,
            errors: vec!["batch tokens cannot be renewed".into()],
            retry_after: None,
        })
    }
    async fn read_secret(
        &self,
        _: &SecretString,
        _: Method,
        path: &str,
        _: Option<&Value>,
    ) -> Result<Secret, VaultError> {
        let mut s = self.0.lock().unwrap();
        s.issues.push(clock::now());
        if s.refuse_reads.0 != 0 {
            let (status, text) = s.refuse_reads;
            return Err(VaultError::Status { op: "scripted", status, errors: vec![text.into()], retry_after: None });
        }
        let seen = s.look();
        s.issued.push((path.to_string(), seen));
        let n = s.issues.len();
        let role = path.rsplit('/').next().unwrap_or_default();
        let data = serde_json::json!({"username": format!("v-{role}-{n}"), "password": "pw-0123456789"});
        Ok(Secret {
            lease_id: LeaseId::new(format!("{path}/lease{n:020}")),
            lease_duration: s.lease_ttl,
            renewable: true,
            data: SecretData::new(data.as_object().cloned().unwrap_or_default()),
            warnings: vec![],
        })
    }
    async fn renew_lease(
        &self,
        _: &SecretString,
        _: &LeaseId,
        increment: Duration,
    ) -> Result<LeaseRenewal, VaultError> {
        let (refuse, hang, unavailable) = {
            let mut s = self.0.lock().unwrap();
            s.renewals.push(clock::now());
            (s.refuse_renewals, s.hang_renewals, s.unavailable)
        };
        if let Some(retry_after) = unavailable {
            return Err(VaultError::Status {
                op: "scripted",
                status: 503,
                errors: vec!["election".into()],
                retry_after,
            });
        }
        if hang {
            std::future::pending::<()>().await;
        }
        if refuse {
            return Err(denied());
        }
        Ok(LeaseRenewal { lease_duration: increment, renewable: true, warnings: vec![] })
    }
    async fn revoke_lease(&self, _: &SecretString, lease: &LeaseId) -> Result<(), VaultError> {
        let mut s = self.0.lock().unwrap();
        let seen = s.look();
        s.revoked.push((clock::now(), lease.expose().to_string(), seen));
        Ok(())
    }
    async fn lookup_lease(&self, _: &SecretString, _: &LeaseId) -> Result<(Duration, bool), VaultError> {
        match self.get(|s| s.lookup) {
            (0, _) => Ok((Duration::from_secs(300), true)),
            (status, text) => {
                Err(VaultError::Status { op: "scripted", status, errors: vec![text.into()], retry_after: None })
            }
        }
    }
    async fn revoke_self(&self, _: &SecretString) -> Result<(), VaultError> {
        Ok(())
    }
}

fn auth_loop(vault: &Scripted, dir: &std::path::Path) -> (AuthLoop<Scripted>, watch::Receiver<AuthState>) {
    let token = dir.join("jwt");
    std::fs::write(&token, "header.payload.signature").unwrap();
    let (tx, rx) = watch::channel(AuthState::default());
    let auth = AuthLoop {
        client: vault.clone(),
        kind: AuthMethod::Kubernetes,
        mount: "kubernetes".into(),
        role: "app".into(),
        token_path: token,
        state: tx,
        relogin: Arc::new(Notify::new()),
        store: None,
        telemetry: Telemetry::new(),
    };
    (auth, rx)
}

fn supervisor(vault: &Scripted, dir: &std::path::Path, auth: watch::Receiver<AuthState>) -> Supervisor<Scripted> {
    let file = dir.join("db.json");
    let yaml = format!(
        "vault:\n  address: http://vault:8200\nauth:\n  kubernetes:\n    role: app\nsecrets:\n  - name: db\n    path: database/creds/app\n    files:\n      - path: {}\n        format: json\n",
        file.display()
    );
    let path = dir.join("leasehold.yaml");
    let config = Config::parse(&yaml, &path, &|_| None).unwrap();
    let templates = Renderer::compile(&config, &path).unwrap().templates(&config.secrets[0].name);
    // The spec sender is dropped here: the supervisor then sees no reloads.
    let (_, spec) = watch::channel(Arc::new(SecretSpec { cfg: config.secrets[0].clone(), templates, proxy: None }));
    Supervisor {
        spec,
        client: vault.clone(),
        auth,
        relogin: Arc::new(Notify::new()),
        events: mpsc::unbounded_channel().0,
        store: None,
        adopted: None,
        telemetry: Telemetry::new(),
        cancel: CancellationToken::new(),
        request_timeout: config.vault.request_timeout,
        slow_retry: false,
    }
}

/// Runs a supervisor over `vault` for `secs` of the paused clock, then stops
/// it: the leases it left alive.
async fn run_for(vault: &Scripted, secs: u64) -> Result<Vec<LiveLease>, tokio::task::JoinError> {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(vault, dir.path(), service_token());
    let cancel = sup.cancel.clone();
    let task = tokio::spawn(sup.run());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    cancel.cancel();
    task.await
}

/// A service token that outlives the test, for the supervisor.
fn service_token() -> watch::Receiver<AuthState> {
    let held = Arc::new(HeldToken {
        token: Token {
            secret: SecretString::from("s.token".to_string()),
            accessor: "acc".into(),
            ttl: Duration::from_secs(100_000),
            renewable: true,
            batch: false,
        },
        granted_at: clock::now(),
        ttl: Duration::from_secs(100_000),
        final_expiry: false,
    });
    let (tx, rx) = watch::channel(AuthState { current: Some(held.clone()), held: vec![held] });
    // Kept open for the test's life: a closed channel would read as "no auth loop".
    std::mem::forget(tx);
    rx
}

#[tokio::test(start_paused = true)]
async fn a_batch_token_is_replaced_at_half_its_life_not_in_a_loop() {
    let vault = Scripted::with(|s| s.batch_ttl = Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let (auth, _rx) = auth_loop(&vault, dir.path());
    let cancel = CancellationToken::new();
    let task = tokio::spawn(auth.run(cancel.clone()));
    // An hour of token life.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    cancel.cancel();
    task.await.unwrap();
    let logins = vault.get(|s| s.logins.clone());
    // One login at start, then one every 30 s (57–60 s of each 60 s token,
    // less jitter): about 120, not a loop.
    assert!((100..=130).contains(&logins.len()), "{} logins in an hour", logins.len());
    for pair in logins.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(gap >= Duration::from_secs(27) && gap <= Duration::from_secs(30), "{gap:?} between logins");
    }
}

#[tokio::test(start_paused = true)]
async fn refused_renewals_are_retried_with_backoff_then_replaced_in_time() {
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(600);
        s.refuse_renewals = true;
    });
    let live = run_for(&vault, 3 * 3600).await.unwrap();
    let (issues, renewals) = vault.get(|s| (s.issues.clone(), s.renewals.clone()));
    assert!(issues.len() >= 10, "re-issued over three hours: {}", issues.len());
    // Each 600 s lease was replaced while it still had (1 - reissue_at) ×
    // 600 s = 150 s left (its renewals all refused, retried until then): at
    // most 450 s apart, not at 600.
    for pair in issues.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(gap <= Duration::from_secs(450), "replaced {gap:?} after issue");
    }
    // Backoff, not a storm: the 150 s between renew_at and reissue_at hold
    // a dozen or so attempts per lease (0.5 s doubling, full jitter), not
    // one a second.
    assert!(renewals.len() <= 20 * issues.len(), "{} renewals for {} leases", renewals.len(), issues.len());
    assert!(!live.is_empty(), "the current lease is reported alive at the stop");
}

#[tokio::test(start_paused = true)]
async fn a_renewal_in_flight_is_dropped_at_shutdown() {
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(60);
        s.hang_renewals = true;
    });
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(&vault, dir.path(), service_token());
    let cancel = sup.cancel.clone();
    let task = tokio::spawn(sup.run());
    // The renewal at 30 s hangs (a frozen server) until its deadline at 40 s.
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert_eq!(vault.get(|s| s.renewals.len()), 1);
    let stopped = clock::instant();
    cancel.cancel();
    let live = tokio::time::timeout(Duration::from_secs(1), task).await.expect("stopped at once").unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(1));
    assert_eq!(live.len(), 1, "the lease, to be revoked");
}

#[tokio::test(start_paused = true)]
async fn a_hung_renewal_gives_up_at_the_replacement_point() {
    // #21: on a blackholed link a renewal hung for the whole request
    // timeout, or forever, while the lease ran out. TTL 20 s: renewed at
    // 10 s; by 20 - 1 (rounding) - 5 (a quarter) = 14 s new credentials
    // are due, so the hung renewal is given up then and the issue follows.
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(20);
        s.hang_renewals = true;
    });
    let started = clock::now();
    let _ = run_for(&vault, 16).await;
    let (issues, renewals) = vault.get(|s| (s.issues.clone(), s.renewals.clone()));
    let at = |t: SystemTime| t.duration_since(started).unwrap().as_secs_f64();
    assert_eq!(renewals.len(), 1, "{renewals:?}");
    // Jitter moves both up to 1 s earlier, coalescing 128 ms more.
    assert!((8.8..=10.1).contains(&at(renewals[0])), "renewed at {}", at(renewals[0]));
    assert_eq!(issues.len(), 2, "the hung renewal was given up and new credentials issued");
    assert!((12.8..=14.1).contains(&at(issues[1])), "re-issued at {} s", at(issues[1]));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_within_the_life_left() {
    // 600 s leases, renewed at 300 s; Vault answers 503 with Retry-After:
    // 20 (capped at a quarter of the 299 s left): the next attempt waits
    // the 20 s, not the backoff's first 0.5 s.
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(600);
        s.unavailable = Some(Some(Duration::from_secs(20)));
    });
    let _ = run_for(&vault, 360).await;
    let renewals = vault.get(|s| s.renewals.clone());
    assert!(renewals.len() >= 2, "{renewals:?}");
    for pair in renewals.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap();
        assert!(gap >= Duration::from_secs(19), "retried {gap:?} after a Retry-After of 20 s");
    }
}

/// #24: a role Vault does not have was retried as if Vault were briefly
/// down (0.5 s doubling to 30 s, forever); a 503 still is. The unknown role
/// is named as permanent and its backoff grows on to 5 min, starting as
/// quickly (after an election a standby may not know a role just written).
#[tokio::test(start_paused = true)]
async fn a_role_vault_does_not_have_is_retried_ever_more_slowly() {
    let mut counts = Vec::new();
    for (status, text) in [(400, "unknown role: app"), (503, "Vault is sealed")] {
        let vault = Scripted::with(|s| {
            s.lease_ttl = Duration::from_secs(600);
            s.refuse_reads = (status, text);
        });
        let _ = run_for(&vault, 1800).await;
        let issues = vault.get(|s| s.issues.clone());
        let gaps: Vec<f64> = issues.windows(2).map(|p| p[1].duration_since(p[0]).unwrap().as_secs_f64()).collect();
        assert!(gaps[0] < 2.0, "{text}: the first retry is quick: {gaps:?}");
        let longest = gaps.iter().copied().fold(0.0, f64::max);
        if status == 400 {
            assert!(longest > 60.0, "{text}: the backoff grows past 30 s: {gaps:?}");
        } else {
            assert!(longest <= 31.0, "{text}: an outage stays at 30 s: {gaps:?}");
        }
        counts.push(issues.len());
    }
    assert!(counts[0] * 3 < counts[1], "reads over 30 min, unknown role against sealed: {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn vault_answering_again_ends_every_backoff_at_once() {
    // Renewals fail (503, no Retry-After) from the first one at 300 s; by
    // 400 s the backoff has grown to many seconds. Then any request to
    // Vault succeeds (the auth loop's, here the observer told directly):
    // the supervisor retries at once instead of waiting its step out.
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(600);
        s.unavailable = Some(None);
    });
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(&vault, dir.path(), service_token());
    let (cancel, telemetry) = (sup.cancel.clone(), sup.telemetry.clone());
    let task = tokio::spawn(sup.run());
    tokio::time::sleep(Duration::from_secs(400)).await;
    let failed = vault.get(|s| s.renewals.len());
    assert!(failed >= 3, "{failed} renewals");
    vault.0.lock().unwrap().unavailable = None;
    use vault::RequestObserver as _;
    telemetry.observe("renew lease", 503, Duration::ZERO);
    let back = clock::now();
    telemetry.observe("login", 200, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(10)).await;
    cancel.cancel();
    let _ = task.await;
    let renewals = vault.get(|s| s.renewals.clone());
    assert_eq!(renewals.len(), failed + 1, "one renewal right after Vault answered");
    assert!(renewals[failed].duration_since(back).unwrap() < Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn only_a_lease_vault_calls_gone_is_reissued_at_adoption() {
    use agent::state::{LeaseRecord, SecretRecord, State};
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "vault:\n  address: http://vault:8200\nauth:\n  kubernetes:\n    role: app\nsecrets:\n  - name: db\n    path: database/creds/app\n    files:\n      - path: {}/db.json\n        format: json\n",
        dir.path().display()
    );
    let config = Config::parse(&yaml, &dir.path().join("c.yaml"), &|_| None).unwrap();
    let at = agent::state::unix(clock::now());
    let record = LeaseRecord {
        path: "database/creds/app".into(),
        lease_id: LeaseId::new("database/creds/app/recorded0000000000000000".into()),
        token_accessor: "acc".into(),
        issued_at: at,
        first_ttl: 300.0,
        granted_at: at,
        ttl: 300.0,
        renewable: true,
        capped: false,
        data: SecretData::default(),
    };
    let mut state = State::default();
    state.secrets.insert("db".into(), SecretRecord { current: Some(record), retired: vec![] });
    let token = SecretString::from("s.token".to_string());
    for (lookup, adopted) in [
        ((0, ""), true),
        // A policy without sys/leases/lookup: says nothing about the lease.
        ((403, "permission denied"), true),
        ((503, "Vault is sealed"), true),
        // Gone: re-issued.
        ((400, "invalid lease"), false),
    ] {
        let vault = Scripted::with(|s| s.lookup = lookup);
        let found = agent::adopt::leases(&vault, &token, &state, &config).await;
        assert_eq!(found.adopted.contains_key("db"), adopted, "lookup answered {lookup:?}");
        assert!(found.revoke.is_empty(), "the current lease is never revoked at adoption");
    }
}

/// The whole agent (`agent::run_with`) in-process: a config file in `dir`
/// for one secret read from `path`, the scripted Vault, and the handles a
/// test pulls: SIGHUP, SIGTERM, file events.
struct InProcess {
    config: std::path::PathBuf,
    file: std::path::PathBuf,
    reload: watch::Sender<u64>,
    shutdown: CancellationToken,
    file_events: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<Result<Outcome, agent::run::StartError>>,
}

fn agent_config(dir: &std::path::Path, path: &str) -> String {
    format!(
        "vault:\n  address: http://vault:8200\nauth:\n  kubernetes:\n    role: app\n    token_path: {dir}/jwt\nstate_dir: {dir}/state\nsecrets:\n  - name: db\n    path: {path}\n    files:\n      - path: {dir}/db.json\n        format: json\n",
        dir = dir.display()
    )
}

/// The agent with hour-long tokens and leases, once its first credentials
/// are in `db.json`.
async fn start_agent(dir: &std::path::Path) -> (Scripted, InProcess) {
    let vault = Scripted::with(|s| {
        s.batch_ttl = Duration::from_secs(3600);
        s.lease_ttl = Duration::from_secs(3600);
        s.watched = Some(dir.join("db.json"));
    });
    std::fs::write(dir.join("jwt"), "header.payload.signature").unwrap();
    let config_path = dir.join("leasehold.yaml");
    std::fs::write(&config_path, agent_config(dir, "database/creds/app")).unwrap();
    let loaded = Loaded::read(&config_path, &|_| None).unwrap();
    let shutdown = CancellationToken::new();
    let (reload, reload_rx) = watch::channel(0u64);
    let (file_events, file_rx) = mpsc::unbounded_channel();
    let signals = agent::signals::Signals { shutdown: shutdown.clone(), reload: reload_rx };
    let opts = agent::run::Options { once: false, env: &|_| None };
    let task = tokio::spawn(agent::run::run_with(
        vault.clone(),
        loaded,
        // Spawned: the path must outlive the test function.
        &*Box::leak(config_path.clone().into_boxed_path()),
        signals,
        opts,
        Telemetry::new(),
        file_rx,
    ));
    let agent = InProcess { config: config_path, file: dir.join("db.json"), reload, shutdown, file_events, task };
    until(&vault, "first credentials rendered", |s| s.look().is_some_and(|c| c.contains("v-app-1"))).await;
    (vault, agent)
}

/// Lets the agent's tasks run until `done` holds (virtual time: a minute
/// of it at most).
async fn until(vault: &Scripted, what: &str, done: impl Fn(&Script) -> bool) {
    for _ in 0..600 {
        if vault.get(&done) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_changes_the_path_keeps_the_old_files_until_new_ones_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, agent) = start_agent(dir.path()).await;

    std::fs::write(&agent.config, agent_config(dir.path(), "database/creds/other")).unwrap();
    agent.reload.send_modify(|n| *n += 1);
    until(&vault, "the old lease revoked", |s| !s.revoked.is_empty()).await;

    let (issued, revoked) = vault.get(|s| (s.issued.clone(), s.revoked.clone()));
    assert_eq!(issued.len(), 2, "{issued:?}");
    assert_eq!(issued[1].0, "database/creds/other");
    // The bug: the old files were deleted (and the lease revoked) before
    // the new credentials existed.
    let before_new = issued[1].1.as_deref().unwrap_or("<no file>");
    assert!(before_new.contains("v-app-1"), "the app's file while new credentials were issued: {before_new}");
    let (_, lease, at_revoke) = &revoked[0];
    assert!(lease.starts_with("database/creds/app/"), "the old role's lease goes: {lease}");
    let at_revoke = at_revoke.as_deref().unwrap_or("<no file>");
    assert!(at_revoke.contains("v-other-2"), "the file when the old lease was revoked: {at_revoke}");

    agent.shutdown.cancel();
    assert_eq!(agent.task.await.unwrap().unwrap(), Outcome::Stopped);
    let revoked: Vec<String> = vault.get(|s| s.revoked.iter().map(|r| r.1.clone()).collect());
    assert_eq!(revoked.len(), 2, "both leases revoked, each once: {revoked:?}");
    assert!(revoked[1].starts_with("database/creds/other/"));
    assert!(std::fs::read_to_string(&agent.file).unwrap().contains("v-other-2"));
}

#[tokio::test(start_paused = true)]
async fn file_events_never_hold_up_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, agent) = start_agent(dir.path()).await;

    // A file event (the config directory is busy), and SIGTERM while the
    // reload it arms is still pending.
    agent.file_events.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopped = clock::now();
    agent.shutdown.cancel();
    assert_eq!(agent.task.await.unwrap().unwrap(), Outcome::Stopped);
    let revoked = vault.get(|s| s.revoked.clone());
    assert_eq!(revoked.len(), 1);
    // The bug: handling the event slept the debounce (200 ms) with signals
    // unserved. The revocation starts at SIGTERM, not after it.
    assert_eq!(revoked[0].0, stopped, "revoked {:?} after SIGTERM", revoked[0].0.duration_since(stopped));
}

/// The supervisor's task lives as long as the pod, one per secret: its
/// steps' futures are boxed where they are awaited, so the task holds the
/// loop's state only (3 KiB here with them inline, half that boxed).
#[test]
fn a_supervisors_task_holds_only_its_loop() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(&Scripted::default(), dir.path(), service_token());
    let task = sup.run();
    let size = std::mem::size_of_val(&task);
    assert!(size <= 2048, "the supervisor's future is {size} bytes");
}

#[test]
fn a_live_lease_debug_shows_its_handles_short() {
    let live = LiveLease {
        secret: "db".into(),
        lease_id: LeaseId::new("database/creds/app/AbCdEfGhIjKlMnOpQrStUvWx".into()),
        token_accessor: "ZyXwVuTsRqPoNmLkJiHgFeDc".into(),
    };
    let dbg = format!("{live:?}");
    assert!(dbg.contains("\"db\"") && dbg.contains("ZyXwVu…"), "{dbg}");
    assert!(!dbg.contains("ZyXwVuTsRqPoNmLkJiHgFeDc") && !dbg.contains("EfGhIjKl"), "{dbg}");
}

/// A lease that ended while Vault was out of reach is not handed to the
/// teardown: it would be reported alive (`lease_left_alive`, exit 1) though
/// Vault revoked it at its end.
#[tokio::test(start_paused = true)]
async fn a_lease_past_its_end_is_not_reported_alive_at_the_stop() {
    let vault = Scripted::with(|s| {
        s.lease_ttl = Duration::from_secs(60);
        s.unavailable = Some(None);
    });
    // Issued at 0; every renewal and (once the first is in) every read fails.
    let sealed = vault.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(20)).await;
        sealed.0.lock().unwrap().refuse_reads = (503, "Vault is sealed");
    });
    let live = run_for(&vault, 120).await.unwrap();
    assert!(vault.get(|s| s.issues.len()) > 1, "replacements were tried");
    assert!(live.is_empty(), "{live:?}");
}
