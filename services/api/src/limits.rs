//! Limits per principal: how fast and how much at once one credential's holder may ask.
//!
//! Guarantees, on each API process (limits are local to a process: `N` processes behind a
//! balancer admit up to `N` times the rate, as a gateway's local policy does):
//! - a principal of role `r` gets at most `http.limits.<r>.burst` requests at once after
//!   being idle, and `http.limits.<r>.requests_per_second` sustained (a token bucket, in the
//!   GCRA form: one timestamp per principal). A request beyond is answered `429
//!   rate_limited` at once, with `Retry-After` the whole seconds until it would be admitted;
//! - at most `http.limits.<r>.concurrent_requests` of its requests are served at once (a
//!   request is served until its answer's body is sent); one beyond is answered `429 too_many_concurrent` with `Retry-After: 1`;
//! - a limited request is refused before its body is read and before any handler runs, and
//!   costs nothing else: it is not counted against the rate.
//!
//! Every principal's keys (and tokens) share one allowance: a principal is its name and
//! role. Each refusal is counted in `memos_http_limited_total{role, limit}`. Under
//! `http.auth = "none"` there is no principal and nothing is limited here (the process-wide
//! `http.max_concurrent_requests` still applies, `crate::edge`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use memos_runtime::config::RoleLimits;
use memos_runtime::keys::Role;
use memos_runtime::metrics as m;

use crate::auth::Caller;
use crate::error::ApiError;

/// Past this many principals tracked, the idle ones are forgotten (an idle principal's
/// bucket is full and it has nothing in flight, so forgetting it changes no answer).
const SWEEP_ABOVE: usize = 4096;

/// The allowance of one principal.
#[derive(Debug)]
struct Allowance {
    /// GCRA's theoretical arrival time: the bucket is full when it is not after now.
    tat: Instant,
    in_flight: u32,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over the rate; admitted again after this long.
    Rate(Duration),
    Concurrency,
}

/// The limits of every principal this process has seen recently.
#[derive(Clone)]
pub struct Limiter {
    config: RoleLimits,
    allowances: Arc<Mutex<HashMap<(Role, String), Allowance>>>,
}

/// A request admitted: its concurrency slot, given back when dropped.
pub struct Admitted {
    limiter: Limiter,
    key: (Role, String),
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut allowances = self.limiter.allowances.lock().expect("limits lock");
        if let Some(allowance) = allowances.get_mut(&self.key) {
            allowance.in_flight = allowance.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    pub fn new(config: RoleLimits) -> Limiter {
        Limiter {
            config,
            allowances: Arc::default(),
        }
    }

    /// Admits one request of `principal` (of `role`) at `now`, or says why not.
    pub fn admit(&self, role: Role, principal: &str, now: Instant) -> Result<Admitted, Limited> {
        let limits = self.config.of(role);
        let interval = Duration::from_secs_f64(1.0 / limits.requests_per_second);
        // A full bucket admits `burst` requests at one instant: TAT may run that far ahead.
        let tolerance = interval * limits.burst.saturating_sub(1);
        let key = (role, principal.to_owned());
        let mut allowances = self.allowances.lock().expect("limits lock");
        if allowances.len() > SWEEP_ABOVE {
            allowances.retain(|_, a| a.in_flight > 0 || a.tat > now);
        }
        let allowance = allowances.entry(key.clone()).or_insert(Allowance {
            tat: now,
            in_flight: 0,
        });
        if allowance.in_flight >= limits.concurrent_requests {
            return Err(Limited::Concurrency);
        }
        let tat = allowance.tat.max(now);
        let allowed_at = tat.checked_sub(tolerance).unwrap_or(now);
        if allowed_at > now {
            return Err(Limited::Rate(allowed_at - now));
        }
        allowance.tat = tat + interval;
        allowance.in_flight += 1;
        drop(allowances);
        Ok(Admitted {
            limiter: self.clone(),
            key,
        })
    }
}

/// The middleware (after authentication, before the body is read).
pub async fn limit(State(limiter): State<Limiter>, request: Request, next: Next) -> Response {
    let Some(Caller::Principal(principal)) = request.extensions().get::<Caller>().cloned() else {
        return next.run(request).await;
    };
    match limiter.admit(principal.role, &principal.name, Instant::now()) {
        // The slot is held until the answer's body is sent or dropped: an export streams
        // long after its handler returned.
        Ok(admitted) => next.run(request).await.map(|body| {
            Body::new(body.map_frame(move |frame| {
                let _held = &admitted;
                frame
            }))
        }),
        Err(limited) => {
            let (limit, retry_after, message) = match limited {
                Limited::Rate(wait) => (
                    "rate",
                    wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                    format!(
                        "{} exceeds the request rate of its role (http.limits.{}); retry after the Retry-After seconds",
                        principal.name, principal.role
                    ),
                ),
                Limited::Concurrency => (
                    "concurrency",
                    1,
                    format!(
                        "{} has as many requests in flight as its role allows (http.limits.{}.concurrent_requests)",
                        principal.name, principal.role
                    ),
                ),
            };
            metrics::counter!(m::HTTP_LIMITED, "role" => principal.role.as_str(), "limit" => limit)
                .increment(1);
            tracing::debug!(principal = %principal.name, limit, "request limited");
            let code = if limit == "rate" {
                "rate_limited"
            } else {
                "too_many_concurrent"
            };
            let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            response
        }
    }
}

/// The label values `memos_http_limited_total` is exported with from the start.
pub fn label_values() -> impl Iterator<Item = (&'static str, &'static str)> {
    Role::ALL
        .into_iter()
        .flat_map(|role| ["rate", "concurrency"].map(|limit| (role.as_str(), limit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use memos_runtime::config::Limits;

    fn limiter(rate: f64, burst: u32, concurrent: u32) -> Limiter {
        let limits = Limits {
            requests_per_second: rate,
            burst,
            concurrent_requests: concurrent,
        };
        Limiter::new(RoleLimits {
            agent: limits,
            service: limits,
            auditor: limits,
            operator: limits,
        })
    }

    #[test]
    fn a_burst_is_admitted_then_the_rate() {
        let limiter = limiter(10.0, 5, 100);
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..5)
            .map(|_| limiter.admit(Role::Agent, "a", t0).expect("within the burst"))
            .collect();
        let Err(Limited::Rate(wait)) = limiter.admit(Role::Agent, "a", t0) else {
            panic!("the sixth request at once is over the burst");
        };
        assert_eq!(wait, Duration::from_millis(100));
        drop(admitted);
        // One interval later exactly one more is admitted.
        let t1 = t0 + Duration::from_millis(100);
        let _one = limiter.admit(Role::Agent, "a", t1).expect("one token back");
        assert!(matches!(
            limiter.admit(Role::Agent, "a", t1),
            Err(Limited::Rate(_))
        ));
        // Idle long enough, the whole burst is back, and no more.
        let t2 = t1 + Duration::from_secs(10);
        for _ in 0..5 {
            limiter.admit(Role::Agent, "a", t2).expect("bucket full again");
        }
        assert!(limiter.admit(Role::Agent, "a", t2).is_err());
    }

    #[test]
    fn principals_and_roles_have_their_own_allowance() {
        let limiter = limiter(1.0, 1, 100);
        let t0 = Instant::now();
        let _a = limiter.admit(Role::Agent, "a", t0).unwrap();
        assert!(limiter.admit(Role::Agent, "a", t0).is_err());
        let _b = limiter.admit(Role::Agent, "b", t0).expect("another principal");
        let _s = limiter
            .admit(Role::Service, "a", t0)
            .expect("same name, other role");
    }

    #[test]
    fn concurrency_slots_come_back_when_requests_end() {
        let limiter = limiter(1000.0, 1000, 2);
        let t0 = Instant::now();
        let first = limiter.admit(Role::Service, "s", t0).unwrap();
        let _second = limiter.admit(Role::Service, "s", t0).unwrap();
        assert_eq!(
            limiter.admit(Role::Service, "s", t0).err(),
            Some(Limited::Concurrency)
        );
        drop(first);
        limiter
            .admit(Role::Service, "s", t0)
            .expect("a slot was given back");
    }

    #[test]
    fn a_refused_request_costs_no_token() {
        let limiter = limiter(1.0, 2, 100);
        let t0 = Instant::now();
        limiter.admit(Role::Agent, "a", t0).unwrap();
        limiter.admit(Role::Agent, "a", t0).unwrap();
        for _ in 0..100 {
            assert!(limiter.admit(Role::Agent, "a", t0).is_err());
        }
        // Refusals did not push the bucket further back: one second frees one token.
        limiter
            .admit(Role::Agent, "a", t0 + Duration::from_secs(1))
            .expect("admitted after one interval");
    }

    #[test]
    fn idle_principals_are_forgotten_past_the_sweep_bound() {
        let limiter = limiter(1000.0, 10, 10);
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            limiter.admit(Role::Agent, &format!("p{i}"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(1);
        limiter.admit(Role::Agent, "new", later).unwrap();
        assert_eq!(limiter.allowances.lock().unwrap().len(), 1);
    }
}
