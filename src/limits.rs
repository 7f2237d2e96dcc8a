//! Per-provider pacing: at most `concurrency` calls in flight and at most
//! `per_second` messages a second (a token bucket with a one-second burst).
//!
//! Shared by every worker and channel using the provider, so the limits hold
//! for the relay as a whole, not per worker.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

#[derive(Debug)]
pub struct Pacer {
    calls: Semaphore,
    bucket: Option<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes `n` tokens (possibly going into debt) and says how long to wait
    /// until the debt is paid. Debt makes concurrent callers queue fairly.
    /// `None`, taking nothing, when that wait would end after `deadline`: a
    /// caller that gives up must not leave debt behind for the next ones.
    fn take(&mut self, n: f64, now: Instant, deadline: Option<Instant>) -> Option<Duration> {
        let burst = self.per_second.max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(burst);
        self.last = now;
        let left = self.tokens - n;
        let wait = if left >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-left / self.per_second) };
        if deadline.is_some_and(|d| now + wait > d) {
            return None;
        }
        self.tokens = left;
        Some(wait)
    }
}

impl Pacer {
    /// `per_second = 0` means no rate limit.
    pub fn new(concurrency: usize, per_second: f64) -> Pacer {
        let bucket = (per_second > 0.0)
            .then(|| Mutex::new(Bucket { per_second, tokens: per_second.max(1.0), last: Instant::now() }));
        Pacer { calls: Semaphore::new(concurrency.max(1)), bucket }
    }

    /// Waits for a call slot and for `messages` tokens; hold the permit for the call.
    /// `None` if that cannot happen before `deadline` (nothing is taken then).
    pub async fn admit(&self, messages: usize, deadline: Option<Instant>) -> Option<SemaphorePermit<'_>> {
        // Checked before and after waiting: a permit that is free at once
        // would otherwise admit a call whose claim has already run out.
        let late = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        if late(deadline) {
            return None;
        }
        let acquire = self.calls.acquire();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), acquire).await.ok()?,
            None => acquire.await,
        }
        .expect("the semaphore is never closed");
        if late(deadline) {
            return None;
        }
        if let Some(bucket) = &self.bucket {
            let wait =
                bucket.lock().unwrap_or_else(|p| p.into_inner()).take(messages as f64, Instant::now(), deadline)?;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        Some(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_paces() {
        let t = Instant::now();
        let mut b = Bucket { per_second: 10.0, tokens: 10.0, last: t };
        assert_eq!(b.take(10.0, t, None), Some(Duration::ZERO), "one second's worth at once");
        let wait = b.take(5.0, t, None).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // Half a second later the debt is paid; the next one waits again.
        assert!((b.take(1.0, t + Duration::from_millis(500), None).unwrap().as_secs_f64() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn a_caller_out_of_time_takes_nothing() {
        let t = Instant::now();
        let mut b = Bucket { per_second: 10.0, tokens: 0.0, last: t };
        assert_eq!(b.take(5.0, t, Some(t + Duration::from_millis(100))), None, "0.5 s wait, 0.1 s left");
        let wait = b.take(5.0, t, Some(t + Duration::from_secs(1))).unwrap();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "no debt left by the caller that gave up: {wait:?}");
    }

    #[tokio::test]
    async fn concurrency_is_capped() {
        let p = Pacer::new(2, 0.0);
        let a = p.admit(1, None).await;
        let _b = p.admit(1, None).await;
        assert!(tokio::time::timeout(Duration::from_millis(20), p.admit(1, None)).await.is_err());
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(p.admit(1, Some(soon)).await.is_none(), "gives up at the deadline");
        drop(a);
        assert!(tokio::time::timeout(Duration::from_millis(20), p.admit(1, None)).await.is_ok());
    }

    #[tokio::test]
    async fn a_free_permit_does_not_admit_a_late_call() {
        // No rate limit, every permit free: the deadline alone must refuse.
        let p = Pacer::new(4, 0.0);
        let past = Instant::now() - Duration::from_millis(1);
        assert!(p.admit(1, Some(past)).await.is_none(), "a claim that ran out admits no call");
        assert!(p.admit(1, Some(Instant::now() + Duration::from_secs(5))).await.is_some());
    }
}
