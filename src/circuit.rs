//! A circuit breaker per provider: after `threshold` consecutive retryable
//! failures the provider is considered down for `open_for`; then one probe call
//! is let through (half-open), and its result closes or re-opens the circuit.
//!
//! While a circuit is open, dispatch sends fresh deliveries to the channel's
//! fallback provider (or defers them without spending an attempt), instead of
//! hammering a provider that is down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: call as usual.
    Call,
    /// Half-open: this call is the probe.
    Probe,
    /// Open: do not call before `Instant`.
    Refuse(Instant),
}

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probing`: when the probe was handed out, if one is out. A probe that
    /// never reports (its caller made no call, or vanished) is given up after
    /// [`PROBE_PATIENCE`], so the circuit cannot stay half-open for ever.
    HalfOpen {
        probing: Option<Instant>,
    },
}

/// How long a probe may stay out without a result before another is let through:
/// longer than any provider call (timeouts are seconds), short enough that a
/// lost probe costs one pause, not an outage.
pub const PROBE_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Circuit {
    state: Mutex<State>,
    threshold: u32,
    open_for: Duration,
}

impl Circuit {
    pub fn new(threshold: u32, open_for: Duration) -> Circuit {
        Circuit { state: Mutex::new(State::Closed { failures: 0 }), threshold: threshold.max(1), open_for }
    }

    pub fn admit(&self, now: Instant) -> Admission {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *s {
            State::Closed { .. } => Admission::Call,
            State::Open { until } if now < until => Admission::Refuse(until),
            // One probe at a time; the others wait a moment and ask again.
            State::HalfOpen { probing: Some(since) } if now < since + PROBE_PATIENCE => {
                Admission::Refuse(now + Duration::from_millis(500))
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                *s = State::HalfOpen { probing: Some(now) };
                Admission::Probe
            }
        }
    }

    /// The probe admitted by [`Circuit::admit`] made no call after all (its rows
    /// went to the fallback, were settled by the contact lookup, or the pacer
    /// gave up): the next caller may probe at once.
    pub fn probe_unused(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::HalfOpen { probing: Some(_) } = *s {
            *s = State::HalfOpen { probing: None };
        }
    }

    /// A call went through (even if the provider refused the message for good:
    /// a 400 says the provider is up).
    pub fn success(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = State::Closed { failures: 0 };
    }

    /// A retryable failure (timeout, 5xx, 429). Returns true when this opened the circuit.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = match *s {
            State::Closed { failures } if failures + 1 < self.threshold => {
                *s = State::Closed { failures: failures + 1 };
                false
            }
            State::Open { .. } => false,
            _ => true,
        };
        if open {
            *s = State::Open { until: now + self.open_for };
        }
        open
    }

    /// When calls may resume, if they may not now. Unlike [`Circuit::admit`]
    /// this changes nothing: it lets idle workers sleep instead of claiming
    /// rows only to defer them.
    pub fn blocked_until(&self, now: Instant) -> Option<Instant> {
        match *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Open { until } if now < until => Some(until),
            State::HalfOpen { probing: Some(since) } if now < since + PROBE_PATIENCE => {
                Some(now + Duration::from_millis(500))
            }
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.state.lock().unwrap_or_else(|p| p.into_inner()), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_then_closes() {
        let c = Circuit::new(3, Duration::from_secs(10));
        let t = Instant::now();
        assert!(!c.failure(t));
        assert!(!c.failure(t));
        assert_eq!(c.admit(t), Admission::Call);
        assert!(c.failure(t), "third consecutive failure opens");
        assert_eq!(c.admit(t + Duration::from_secs(1)), Admission::Refuse(t + Duration::from_secs(10)));
        assert_eq!(c.blocked_until(t + Duration::from_secs(1)), Some(t + Duration::from_secs(10)));
        assert_eq!(c.admit(t + Duration::from_secs(11)), Admission::Probe);
        assert!(matches!(c.admit(t + Duration::from_secs(11)), Admission::Refuse(_)), "one probe at a time");
        c.success();
        assert_eq!(c.admit(t + Duration::from_secs(12)), Admission::Call);
        assert!(!c.is_open());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let c = Circuit::new(1, Duration::from_secs(5));
        let t = Instant::now();
        assert!(c.failure(t));
        assert_eq!(c.admit(t + Duration::from_secs(6)), Admission::Probe);
        assert!(c.failure(t + Duration::from_secs(6)));
        assert!(matches!(c.admit(t + Duration::from_secs(7)), Admission::Refuse(_)));
    }

    #[test]
    fn a_success_resets_the_count() {
        let c = Circuit::new(2, Duration::from_secs(5));
        let t = Instant::now();
        c.failure(t);
        c.success();
        assert!(!c.failure(t), "the count restarted");
    }

    #[test]
    fn an_unused_probe_is_handed_back() {
        let c = Circuit::new(1, Duration::from_secs(5));
        let t = Instant::now();
        c.failure(t);
        let later = t + Duration::from_secs(6);
        assert_eq!(c.admit(later), Admission::Probe);
        c.probe_unused();
        assert_eq!(c.admit(later), Admission::Probe, "the next caller probes at once");
    }

    #[test]
    fn a_probe_that_never_reports_is_given_up() {
        let c = Circuit::new(1, Duration::from_secs(5));
        let t = Instant::now();
        c.failure(t);
        let later = t + Duration::from_secs(6);
        assert_eq!(c.admit(later), Admission::Probe);
        assert!(matches!(c.admit(later + Duration::from_secs(1)), Admission::Refuse(_)));
        assert_eq!(c.blocked_until(later + PROBE_PATIENCE), None);
        assert_eq!(c.admit(later + PROBE_PATIENCE), Admission::Probe, "not half-open for ever");
    }
}
