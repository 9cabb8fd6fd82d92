//! One retry helper for every storage caller: retries only transient errors, with
//! exponential backoff and jitter, and stops at once when cancelled.

use crate::storage::{ErrorKind, StorageError};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 6, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10) }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt` (1-based retries), with up to 50 % jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(16));
        let capped = exp.min(self.max_delay);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        capped.mul_f64(jitter)
    }
}

/// Runs `op` until it succeeds, fails with a non-transient error, runs out of attempts, or
/// `cancel` fires.
pub async fn retry<T, F, Fut>(policy: &RetryPolicy, cancel: &CancellationToken, mut op: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StorageError>>,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < policy.max_attempts => {
                tracing::debug!(attempt, "retrying after transient error: {e:#}");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        let mut e = e;
                        e.kind = ErrorKind::Cancelled;
                        e.message = format!("cancelled while retrying ({})", e.message);
                        return Err(e);
                    }
                    _ = tokio::time::sleep(policy.delay(attempt)) => {}
                }
            }
            Err(mut e) => {
                if e.is_transient() {
                    e.message = format!("{} (gave up after {attempt} attempts)", e.message);
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> StorageError {
        StorageError::new(ErrorKind::Transient, "reading", "x", "loc", "flaky")
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_until_success() {
        let n = AtomicU32::new(0);
        let r = retry(&RetryPolicy::default(), &CancellationToken::new(), || async {
            if n.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(transient())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn does_not_retry_permanent_and_gives_up_eventually() {
        let n = AtomicU32::new(0);
        let r: Result<(), _> = retry(&RetryPolicy::default(), &CancellationToken::new(), || async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(StorageError::new(ErrorKind::Permanent, "reading", "x", "loc", "denied"))
        })
        .await;
        assert_eq!(r.unwrap_err().kind, ErrorKind::Permanent);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let policy = RetryPolicy::default();
        let r: Result<(), _> = retry(&policy, &CancellationToken::new(), || async { Err(transient()) }).await;
        let e = r.unwrap_err();
        assert!(e.message.contains("gave up after 6 attempts"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_retrying() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r: Result<(), _> = retry(&RetryPolicy::default(), &cancel, || async { Err(transient()) }).await;
        assert_eq!(r.unwrap_err().kind, ErrorKind::Cancelled);
    }
}
