//! Bounded listeners, shared by every server of the process (the proxy,
//! the injector, telemetry): what to do when accepting fails, and how many
//! descriptors connections may take (`Descriptors`). Out of
//! descriptors (EMFILE) `accept` fails at once, forever: a loop that just
//! retries spins a core and floods the log (264 MB in 20 s, once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Descriptors never taken by the proxy's and the injector's connections:
/// telemetry's (at most 128, its own cap) and 64 for Vault, state and
/// credential writes, hooks and the runtime. Out of descriptors the agent
/// could write nothing.
pub const RESERVE: u64 = 192;

/// Descriptors held by admitted connections, process-wide (the limit is
/// the process's).
static HELD: AtomicU64 = AtomicU64::new(0);

/// Descriptors an admitted connection holds until dropped.
pub struct Descriptors(u64);

impl Descriptors {
    /// `n` descriptors for a new connection, if the soft `RLIMIT_NOFILE`
    /// less `RESERVE` has room; else `Err(limit)`. The limit is read each
    /// time: an operator may lower it while the agent runs (`prlimit`).
    pub fn take(n: u64) -> Result<Descriptors, u64> {
        let limit = nofile();
        let admitted =
            HELD.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| admit(held, n, limit).then_some(held + n));
        admitted.map(|_| Descriptors(n)).map_err(|_| limit)
    }
}

/// Whether `n` more descriptors fit beside `held` under `limit`.
fn admit(held: u64, n: u64, limit: u64) -> bool {
    held.saturating_add(n) <= limit.saturating_sub(RESERVE)
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        HELD.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// The soft limit on open descriptors (unlimited when it cannot be read).
fn nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(soft, _)| soft)
}

/// Raises the soft descriptor limit to the hard one (at most 2^20), as Go
/// programs do at start: a soft limit of 1,024 is a default nobody chose,
/// the hard one is the operator's.
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}

/// Failed accepts in a row: the pause before the next (10 ms doubling to
/// 1 s) and a warning at most every 10 s, with how many it stands for.
#[derive(Default)]
pub struct AcceptErrors {
    in_a_row: u32,
    log: Throttle,
}

/// Events of one kind logged at most every `LOG_EVERY`, each line with how
/// many it stands for.
#[derive(Default)]
pub struct Throttle {
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Throttle {
    /// One more event: `Some(count)` (the events since the last line) when
    /// it is time to log one.
    pub fn tick(&mut self) -> Option<u64> {
        self.unlogged += 1;
        // A log throttle, no deadline: tokio's clock directly.
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        if self.logged_at.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

impl AcceptErrors {
    /// An accept succeeded.
    pub fn ok(&mut self) {
        self.in_a_row = 0;
    }

    /// An accept failed: logs `event` (for `listener`) if it is time to,
    /// and returns how long to pause before accepting again.
    pub fn failed(&mut self, event: &'static str, listener: &str, e: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if let Some(failures) = self.log.tick() {
            tracing::warn!(event, listener, error = %e, failures, "accepting connections fails (out of descriptors?); backing off");
        }
        pause(self.in_a_row)
    }
}

/// The next connection from `accept`, retried after failures as
/// `AcceptErrors` says; `None` once `stop` is cancelled.
pub async fn next<T, F, Fut>(
    mut accept: F,
    errors: &mut AcceptErrors,
    event: &'static str,
    listener: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    loop {
        tokio::select! {
            r = accept() => match r {
                Ok(c) => {
                    errors.ok();
                    return Some(c);
                }
                Err(e) => {
                    let pause = errors.failed(event, listener, &e);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return None,
                    }
                }
            },
            _ = stop.cancelled() => return None,
        }
    }
}

/// At most one warning this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The pause after `in_a_row` failures: 10 ms doubling, at most 1 s.
fn pause(in_a_row: u32) -> Duration {
    Duration::from_millis(10).saturating_mul(1 << in_a_row.clamp(1, 8).saturating_sub(1)).min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget is the soft limit less the reserve, shared by every
    /// listener.
    #[test]
    fn connections_never_take_the_reserve() {
        assert!(admit(0, 2, 256) && admit(62, 2, 256));
        assert!(!admit(63, 2, 256), "64 of 256 for connections, 192 kept");
        assert!(!admit(0, 1, 100), "a limit under the reserve admits nothing");
        assert!(admit(100_000, 2, u64::MAX), "unlimited");
        let held = Descriptors::take(2).expect("this process has descriptors to spare");
        assert!(HELD.load(Ordering::Relaxed) >= 2);
        drop(held);
    }

    #[test]
    fn pauses_double_from_10_ms_to_1_s() {
        assert_eq!(pause(1), Duration::from_millis(10));
        assert_eq!(pause(2), Duration::from_millis(20));
        assert_eq!(pause(7), Duration::from_millis(640));
        assert_eq!(pause(8), Duration::from_secs(1));
        assert_eq!(pause(1000), Duration::from_secs(1));
    }
}
