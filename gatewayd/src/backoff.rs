//! Capped exponential backoff with full jitter: the one retry policy (reconnects, store
//! recovery, message and twin retries).

use rand::Rng;
use std::time::Duration;

/// Reconnect delays: `min`, doubling up to `max`, each drawn from [half, full].
pub struct Backoff {
    min: u64,
    max: u64,
    next: u64,
}

impl Backoff {
    /// Delays from `min_ms` up to `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Self {
        Self {
            min: min_ms,
            max: max_ms,
            next: min_ms,
        }
    }

    /// Back to the shortest delay (after a successful connect).
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The next delay.
    pub fn delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        Duration::from_millis(rand::rng().random_range(cap / 2..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(100, 1000);
        let d: Vec<u64> = (0..6).map(|_| b.delay().as_millis() as u64).collect();
        assert!((50..=100).contains(&d[0]), "{d:?}");
        assert!((100..=200).contains(&d[1]), "{d:?}");
        assert!(d[5] <= 1000 && d[5] >= 500, "{d:?}");
        b.reset();
        assert!(b.delay().as_millis() <= 100);
    }
}
