//! A token bucket for upload bandwidth: one per transfer and one for the node. Waiting is
//! cancellable.

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `bytes_per_sec` > 0; the bucket holds one second's worth.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1) as f64;
        Self { rate, state: Mutex::new((rate, Instant::now())) }
    }

    /// Takes `n` bytes' worth of tokens, waiting as needed. Requests larger than the bucket
    /// go into debt, so a 16 MiB pack under a 1 MiB/s limit waits about 16 s in total.
    pub async fn acquire(&self, n: u64, cancel: &CancellationToken) -> bool {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.rate);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-s.0 / self.rate)
            }
        };
        if wait.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[tokio::test(start_paused = true)]
    async fn limits_rate() {
        let r = RateLimiter::new(1000);
        let c = CancellationToken::new();
        let t = tokio::time::Instant::now();
        for _ in 0..5 {
            assert!(r.acquire(1000, &c).await);
        }
        let e = t.elapsed().as_secs_f64();
        assert!((3.9..5.1).contains(&e), "{e}");
    }
}
