//! Exponential backoff with full jitter for the agent's loops (per-request
//! retries live in the Vault client).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Full jitter: uniform in [min, min(max, min × 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_up_to(self.max)
    }

    /// The same, growing to `max` instead (a mistake retrying cannot fix is
    /// retried ever more slowly, but the first retries come as quickly: the
    /// "mistake" may be a write Vault has not replicated yet).
    pub fn next_delay_up_to(&mut self, max: Duration) -> Duration {
        let ceiling = self.min.saturating_mul(1u32 << self.attempt.min(16)).min(max);
        self.attempt = self.attempt.saturating_add(1);
        let span = ceiling.saturating_sub(self.min);
        self.min + span.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
