//! Token buckets: per VM, one for requests (a request without a token is answered 429) and one
//! for bytes (carried bytes draw it into debt, and the copy waits until it is paid back).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket refilled continuously at `rate` per second up to `burst`.
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn refill(&self, now: Instant) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        s
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let mut s = self.refill(Instant::now());
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is in debt (a byte bucket after a burst).
    pub fn exhausted(&self) -> bool {
        self.refill(Instant::now()).0 < 1.0
    }

    /// Takes `n` tokens, going into debt if needed; returns how long to wait until the debt is
    /// paid.
    pub fn take(&self, n: f64) -> Duration {
        let mut s = self.refill(Instant::now());
        s.0 -= n;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills() {
        let b = Bucket::new(1000.0, 3.0);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.try_take());
    }

    #[test]
    fn byte_debt_is_paid_by_waiting() {
        let b = Bucket::new(1000.0, 1000.0);
        assert_eq!(b.take(500.0), Duration::ZERO);
        let wait = b.take(1500.0);
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_millis(1000));
        assert!(b.exhausted());
    }
}
