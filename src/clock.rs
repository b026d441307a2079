//! The one place that reads clocks. Every deadline inside the process is
//! computed from `now()`, a wall-clock time that advances with tokio's
//! monotonic clock from the process's start: an NTP step (backwards or
//! forwards) neither delays renewals nor re-issues early, and tests under
//! tokio's paused clock drive it with `advance`. `wall()` is the system's
//! clock, for what leaves the process with no deadline attached (file name
//! stamps, sample data).

#![allow(clippy::disallowed_methods)]

use std::sync::OnceLock;
use std::time::SystemTime;

use tokio::time::Instant;

fn anchor() -> &'static (SystemTime, Instant) {
    static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()))
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

/// The system's wall clock, for edges without deadlines.
pub fn wall() -> SystemTime {
    SystemTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
