//! Support for the end-to-end suites in `tests/`: they run the real `memos` binary against
//! the real Kafka, PostgreSQL and Redis of the local stack (`scripts/stack up`), each test in
//! isolation: its own topics, its own PostgreSQL database and its own Redis key prefix.
//!
//! The stack's addresses come from the environment (`MEMOS_KAFKA_BROKERS`, `DATABASE_URL`,
//! `REDIS_URL`) or, when unset, from `.stack/env` at the repository root.
//!
//! [`faults`] holds the ledger and checker of the fault-injection suite (`scripts/faults`);
//! [`proxy`] a TCP proxy that forwards, hangs, refuses or delays, to fail one process's
//! dependency without touching the shared stack. [`search_fixture`] builds a large `memories`
//! table for plan tests and search measurements.

pub mod api;
pub mod faults;
pub mod metrics_text;
pub mod process;
pub mod proxy;
pub mod search_fixture;
pub mod stack;
pub mod tasks;

pub use process::MemosProcess;
pub use stack::TestEnv;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or fails after `deadline` with `what` in the
/// message. Tests wait for conditions, never for fixed durations.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if start.elapsed() > deadline {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}; last error: {last_error:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns once the wall clock is in a later millisecond than `t`: record timestamps are
/// milliseconds, so a record produced after this is strictly later than `t`.
pub async fn past_millisecond(t: chrono::DateTime<chrono::Utc>) {
    while chrono::Utc::now().timestamp_millis() <= t.timestamp_millis() {
        tokio::task::yield_now().await;
    }
}
