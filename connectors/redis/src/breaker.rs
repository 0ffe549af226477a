//! A circuit breaker for the read side of the hot views. Redis is a cache in front of
//! PostgreSQL: when it cannot answer, a read must learn it in milliseconds and go to
//! PostgreSQL, not wait for reconnect attempts. After a call fails because Redis is
//! unavailable (refused, dropped, timed out), every call fails at once for a cool-down
//! without touching the network; then one call (the probe) goes through, and its outcome
//! closes the breaker or opens it for another cool-down.
//!
//! Only reads go through the breaker. The projector's writes are the source of the cache's
//! correctness: they keep retrying on their own schedule (with a larger bound) and are never
//! skipped because reads saw Redis fail.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use memos_runtime::metrics as m;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    /// Calls fail fast until `until`; the first call after it is the probe.
    Open {
        until: Instant,
    },
    /// A probe is in flight since `since`; other calls fail fast meanwhile.
    Probing {
        since: Instant,
    },
}

/// The reads that go through the breaker (the `op` label of its rejections).
pub const READ_OPS: &[&str] = &[
    "get_memory",
    "memory_position",
    "recent",
    "position",
    "inbox",
    "availability",
    "ping",
];

/// Shared by every clone of a [`crate::HotViews`].
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    cooldown: Duration,
    /// After this long without an outcome, a probe is taken as lost (its caller gave up) and
    /// the next call may probe again, so a cancelled probe cannot keep the breaker open.
    probe_bound: Duration,
}

/// Whether a call may go to Redis.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Call,
    Probe,
    Rejected,
}

impl Breaker {
    pub fn new(cooldown: Duration, probe_bound: Duration) -> Breaker {
        metrics::gauge!(m::REDIS_BREAKER_OPEN).set(0.0);
        metrics::counter!(m::REDIS_BREAKER_OPENS).increment(0);
        for op in READ_OPS {
            metrics::counter!(m::REDIS_BREAKER_REJECTED, "op" => *op).increment(0);
        }
        Breaker {
            state: Mutex::new(State::Closed),
            cooldown,
            probe_bound,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value; a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admit(&self, op: &'static str) -> Admission {
        let now = Instant::now();
        let mut state = self.lock();
        let admission = match *state {
            State::Closed => Admission::Call,
            State::Open { until } if now < until => Admission::Rejected,
            State::Probing { since } if now.duration_since(since) < self.probe_bound => Admission::Rejected,
            State::Open { .. } | State::Probing { .. } => {
                *state = State::Probing { since: now };
                Admission::Probe
            }
        };
        if admission == Admission::Rejected {
            metrics::counter!(m::REDIS_BREAKER_REJECTED, "op" => op).increment(1);
        }
        admission
    }

    /// Records the outcome of an admitted call. `unavailable`: the call failed because Redis
    /// could not answer (as opposed to answering with an error).
    pub fn record(&self, unavailable: bool) {
        let mut state = self.lock();
        let was_closed = *state == State::Closed;
        if unavailable {
            *state = State::Open {
                until: Instant::now() + self.cooldown,
            };
            if was_closed {
                metrics::counter!(m::REDIS_BREAKER_OPENS).increment(1);
                metrics::gauge!(m::REDIS_BREAKER_OPEN).set(1.0);
                tracing::warn!(cooldown = ?self.cooldown, "redis unavailable: reads skip it during the cool-down");
            }
        } else if !was_closed {
            *state = State::Closed;
            metrics::gauge!(m::REDIS_BREAKER_OPEN).set(0.0);
            tracing::info!("redis answers again: breaker closed");
        }
    }

    pub fn is_open(&self) -> bool {
        *self.lock() != State::Closed
    }
}

/// Whether an error means Redis could not answer (so the breaker opens), rather than an
/// answer that happens to be an error (a wrong type, an unknown script).
pub fn is_unavailable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_opens_then_one_probe_decides() {
        let breaker = Breaker::new(Duration::from_millis(30), Duration::from_secs(60));
        assert_eq!(breaker.admit("t"), Admission::Call);
        breaker.record(true);
        assert!(breaker.is_open());
        assert_eq!(breaker.admit("t"), Admission::Rejected, "cool-down");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(breaker.admit("t"), Admission::Probe);
        assert_eq!(
            breaker.admit("t"),
            Admission::Rejected,
            "only one probe at a time"
        );
        breaker.record(true);
        assert_eq!(breaker.admit("t"), Admission::Rejected, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(breaker.admit("t"), Admission::Probe);
        breaker.record(false);
        assert!(!breaker.is_open());
        assert_eq!(breaker.admit("t"), Admission::Call);
    }

    #[test]
    fn a_lost_probe_does_not_keep_the_breaker_open() {
        let breaker = Breaker::new(Duration::ZERO, Duration::from_millis(20));
        breaker.record(true);
        assert_eq!(breaker.admit("t"), Admission::Probe);
        // Its caller dropped the call: no outcome is ever recorded.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(breaker.admit("t"), Admission::Probe);
    }
}
