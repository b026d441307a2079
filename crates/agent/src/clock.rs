//! The one place that reads clocks. Every deadline inside the process is
//! computed from `now()`, a wall-clock time that advances with tokio's
//! monotonic clock from the process's start: an NTP step (backwards or
//! forwards) neither delays renewals nor re-issues early, and tests under
//! tokio's paused clock drive it with `advance`. `wall()` is the system's
//! clock, for what leaves the process with no deadline attached (file name
//! stamps, sample data).

#![allow(clippy::disallowed_methods)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

fn anchor() -> &'static (SystemTime, Instant) {
    static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// Fixes the anchor. Called just before the runtime is built, so that the
/// anchor is before tokio's own timer epoch by (normally) well under a
/// millisecond: deadlines a whole number of `schedule::SLACK` cells after
/// it then fall on the timer wheel's 64 ms slot boundaries (see
/// `sleep_until`). When the build takes longer, a step costs one more
/// wake-up, nothing else.
pub fn start() {
    anchor();
}

/// The process's clock: the wall time at start plus the monotonic time since.
pub fn now() -> SystemTime {
    let (wall, mono) = anchor();
    *wall + mono.elapsed()
}

/// A monotonic instant, for durations and `tokio::time` deadlines.
pub fn instant() -> Instant {
    Instant::now()
}

/// The monotonic instant at which `now()` reads `at` (the anchor's for a
/// time before it).
pub fn instant_at(at: SystemTime) -> Instant {
    let (wall, mono) = anchor();
    *mono + at.duration_since(*wall).unwrap_or_default()
}

/// Sleeps until `now()` reads `at`. Straight from the anchor rather than
/// `sleep(at - now())`, which lands a few microseconds late: past a slot
/// boundary of tokio's timer wheel, that costs one more wakeup.
pub async fn sleep_until(at: SystemTime) {
    tokio::time::sleep_until(instant_at(at)).await
}

/// This process's offset on a grid of `cell`s: the anchor's wall time, so
/// that the grid's lines are whole cells after the anchor (and processes
/// started apart are on different grids).
pub fn grid_phase(cell: Duration) -> Duration {
    let since = anchor().0.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Duration::from_nanos((since.as_nanos() % cell.as_nanos().max(1)) as u64)
}

/// The system's wall clock, for edges without deadlines.
pub fn wall() -> SystemTime {
    SystemTime::now()
}

/// A time as logs, files and `/v1/status` print it (whole seconds, UTC).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A time as Unix seconds (metrics, the state file); 0 before the epoch.
pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn now_follows_the_monotonic_clock_not_the_system_one() {
        let before = now();
        // Hours of (paused, virtual) monotonic time, no real time at all.
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        let after = now();
        assert_eq!(after.duration_since(before).unwrap(), Duration::from_secs(3 * 3600));
        // The system clock did not move like that: deadlines from `now()`
        // are independent of it (and of its steps).
        assert!(wall() < after);
    }
}
