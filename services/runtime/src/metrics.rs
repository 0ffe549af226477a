//! The metrics every memOS process exports on `/metrics` (Prometheus text format).
//!
//! [`CATALOGUE`] is the single list of metric names, kinds, labels and meanings: processes
//! describe exactly these, `docs/operations.md` documents exactly these (a test compares
//! them), and every dashboard panel and alert rule may use only these (an integration test
//! asks a real Prometheus for each of its expressions).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

pub const CONSUMER_LAG: &str = "memos_consumer_lag_records";
pub const CONSUMER_RECORDS: &str = "memos_consumer_records_total";
pub const CONSUMER_BYTES: &str = "memos_consumer_bytes_total";
pub const CONSUMER_REBALANCES: &str = "memos_consumer_rebalances_total";
pub const CONSUMER_ASSIGNED: &str = "memos_consumer_assigned_partitions";
pub const PROJECTOR_BATCH_RECORDS: &str = "memos_projector_batch_records";
pub const PROJECTOR_APPLY_SECONDS: &str = "memos_projector_apply_seconds";
pub const PROJECTOR_FRESHNESS_SECONDS: &str = "memos_projector_freshness_seconds";
pub const PROJECTOR_COMMANDS: &str = "memos_projector_commands_total";
pub const PROJECTOR_REJECTED: &str = "memos_projector_rejected_total";
pub const PROJECTOR_RETRIES: &str = "memos_projector_retries_total";
pub const PROJECTOR_LAST_APPLIED: &str = "memos_projector_last_applied_timestamp_seconds";
pub const PROJECTOR_TASK_EVENTS: &str = "memos_projector_task_events_total";
pub const DLQ_RECORDS: &str = "memos_dlq_records_total";
pub const POSTGRES_SECONDS: &str = "memos_postgres_operation_seconds";
pub const POSTGRES_ERRORS: &str = "memos_postgres_errors_total";
pub const REDIS_SECONDS: &str = "memos_redis_operation_seconds";
pub const REDIS_ERRORS: &str = "memos_redis_errors_total";
pub const REDIS_BREAKER_OPEN: &str = "memos_redis_breaker_open";
pub const REDIS_BREAKER_OPENS: &str = "memos_redis_breaker_opens_total";
pub const REDIS_BREAKER_REJECTED: &str = "memos_redis_breaker_rejected_total";
pub const CONFLICT_CHECKS_SKIPPED: &str = "memos_api_conflict_checks_skipped_total";
pub const PRODUCER_RECORDS: &str = "memos_producer_records_total";
pub const PRODUCER_BYTES: &str = "memos_producer_bytes_total";
pub const PRODUCER_ERRORS: &str = "memos_producer_delivery_errors_total";
pub const PRODUCER_SECONDS: &str = "memos_producer_delivery_seconds";
pub const PRODUCER_QUEUE: &str = "memos_producer_queue_depth";
pub const HTTP_REQUESTS: &str = "memos_http_requests_total";
pub const HTTP_SECONDS: &str = "memos_http_request_duration_seconds";
pub const HTTP_IN_FLIGHT: &str = "memos_http_requests_in_flight";
pub const HTTP_DENIED: &str = "memos_http_denied_total";
pub const HTTP_LIMITED: &str = "memos_http_limited_total";
pub const SEARCHES: &str = "memos_search_total";
pub const JWT_JWKS_RELOADS: &str = "memos_jwt_jwks_reloads_total";
pub const BUILD_INFO: &str = "memos_build_info";
pub const ORCHESTRATOR_COMMANDS: &str = "memos_orchestrator_commands_total";
pub const ORCHESTRATOR_EVENTS: &str = "memos_orchestrator_events_total";
pub const ORCHESTRATOR_TRANSACTIONS: &str = "memos_orchestrator_transactions_total";
pub const ORCHESTRATOR_TRANSACTION_SECONDS: &str = "memos_orchestrator_transaction_seconds";
pub const ORCHESTRATOR_TASK_COMPLETION_SECONDS: &str = "memos_orchestrator_task_completion_seconds";
pub const ORCHESTRATOR_ACTIVE_WORKFLOWS: &str = "memos_orchestrator_active_workflows";
pub const ORCHESTRATOR_PENDING_TASKS: &str = "memos_orchestrator_pending_tasks";
pub const ORCHESTRATOR_AGENTS: &str = "memos_orchestrator_agents";
pub const ORCHESTRATOR_AGENT_LOAD: &str = "memos_orchestrator_agent_load";
pub const ORCHESTRATOR_RESTARTS: &str = "memos_orchestrator_restarts_total";

use Kind::{Counter, Gauge, Histogram};

/// Every metric memOS exports.
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef {
        name: CONSUMER_LAG,
        kind: Gauge,
        labels: &["group", "topic", "partition"],
        help: "Records in the partition not yet applied by the group: log end offset minus the next offset to apply. Kept up to date while the partition is paused.",
    },
    MetricDef {
        name: CONSUMER_RECORDS,
        kind: Counter,
        labels: &["group", "topic"],
        help: "Records consumed.",
    },
    MetricDef {
        name: CONSUMER_BYTES,
        kind: Counter,
        labels: &["group", "topic"],
        help: "Payload bytes consumed.",
    },
    MetricDef {
        name: CONSUMER_REBALANCES,
        kind: Counter,
        labels: &["group", "kind"],
        help: "Partition assignments (kind=assign) and revocations (kind=revoke).",
    },
    MetricDef {
        name: CONSUMER_ASSIGNED,
        kind: Gauge,
        labels: &["group"],
        help: "Partitions currently assigned to this process.",
    },
    MetricDef {
        name: PROJECTOR_BATCH_RECORDS,
        kind: Histogram,
        labels: &["projection"],
        help: "Records per applied batch.",
    },
    MetricDef {
        name: PROJECTOR_APPLY_SECONDS,
        kind: Histogram,
        labels: &["projection"],
        help: "Time to apply one batch in PostgreSQL, offsets included, until commit.",
    },
    MetricDef {
        name: PROJECTOR_FRESHNESS_SECONDS,
        kind: Histogram,
        labels: &["projection"],
        help: "End-to-end freshness: time the view committed a record minus the record's Kafka timestamp.",
    },
    MetricDef {
        name: PROJECTOR_COMMANDS,
        kind: Counter,
        labels: &["projection", "outcome"],
        help: "Commands decided, by outcome: applied, rejected, duplicate (command id seen before), already_applied (redelivered offset).",
    },
    MetricDef {
        name: PROJECTOR_REJECTED,
        kind: Counter,
        labels: &["projection", "reason"],
        help: "Commands rejected by the apply logic, by reason.",
    },
    MetricDef {
        name: PROJECTOR_RETRIES,
        kind: Counter,
        labels: &["projection", "step"],
        help: "Retries of a failing projector step (dead_letter, apply, cache) while a dependency is down.",
    },
    MetricDef {
        name: PROJECTOR_LAST_APPLIED,
        kind: Gauge,
        labels: &["projection"],
        help: "Unix time of the last committed batch.",
    },
    MetricDef {
        name: PROJECTOR_TASK_EVENTS,
        kind: Counter,
        labels: &["type"],
        help: "Task events recorded in the task views, by event type (TASK_ASSIGNED, COMMAND_REJECTED, ...).",
    },
    MetricDef {
        name: DLQ_RECORDS,
        kind: Counter,
        labels: &["source", "reason"],
        help: "Records sent to the dead-letter topic, by source topic and error class.",
    },
    MetricDef {
        name: POSTGRES_SECONDS,
        kind: Histogram,
        labels: &["op"],
        help: "PostgreSQL operation latency.",
    },
    MetricDef {
        name: POSTGRES_ERRORS,
        kind: Counter,
        labels: &["op"],
        help: "PostgreSQL operations that failed.",
    },
    MetricDef {
        name: REDIS_SECONDS,
        kind: Histogram,
        labels: &["op"],
        help: "Redis operation latency.",
    },
    MetricDef {
        name: REDIS_ERRORS,
        kind: Counter,
        labels: &["op"],
        help: "Redis operations that failed.",
    },
    MetricDef {
        name: REDIS_BREAKER_OPEN,
        kind: Gauge,
        labels: &[],
        help: "1 while the Redis read breaker is open or probing (reads go to PostgreSQL), 0 when closed.",
    },
    MetricDef {
        name: REDIS_BREAKER_OPENS,
        kind: Counter,
        labels: &[],
        help: "Times the Redis read breaker opened after Redis failed to answer.",
    },
    MetricDef {
        name: REDIS_BREAKER_REJECTED,
        kind: Counter,
        labels: &["op"],
        help: "Redis reads failed at once by the open breaker, without a network call.",
    },
    MetricDef {
        name: CONFLICT_CHECKS_SKIPPED,
        kind: Counter,
        labels: &["reason"],
        help: "Updates and forgets appended without the conflict pre-check because PostgreSQL did not answer (error, timeout).",
    },
    MetricDef {
        name: PRODUCER_RECORDS,
        kind: Counter,
        labels: &["topic"],
        help: "Records acknowledged by the broker.",
    },
    MetricDef {
        name: PRODUCER_BYTES,
        kind: Counter,
        labels: &["topic"],
        help: "Payload bytes acknowledged by the broker.",
    },
    MetricDef {
        name: PRODUCER_ERRORS,
        kind: Counter,
        labels: &["topic", "kind"],
        help: "Records the broker did not acknowledge, by kind: too_large, not_authorized (the broker refused the principal: ACLs or credentials), unavailable.",
    },
    MetricDef {
        name: PRODUCER_SECONDS,
        kind: Histogram,
        labels: &["topic"],
        help: "Time from send to the broker's acknowledgement (acks=all).",
    },
    MetricDef {
        name: PRODUCER_QUEUE,
        kind: Gauge,
        labels: &[],
        help: "Records in the producer's queue awaiting acknowledgement.",
    },
    MetricDef {
        name: HTTP_REQUESTS,
        kind: Counter,
        labels: &["method", "route", "status"],
        help: "HTTP requests answered, by route template and status code.",
    },
    MetricDef {
        name: HTTP_SECONDS,
        kind: Histogram,
        labels: &["method", "route"],
        help: "HTTP request latency.",
    },
    MetricDef {
        name: HTTP_IN_FLIGHT,
        kind: Gauge,
        labels: &[],
        help: "HTTP requests being served.",
    },
    MetricDef {
        name: HTTP_DENIED,
        kind: Counter,
        labels: &["reason"],
        help: "Requests refused for their credential (401) or what it may do (403), by reason.",
    },
    MetricDef {
        name: HTTP_LIMITED,
        kind: Counter,
        labels: &["role", "limit"],
        help: "Requests answered 429 for their principal's limits (http.limits), by role and limit (rate, concurrency).",
    },
    MetricDef {
        name: SEARCHES,
        kind: Counter,
        labels: &["mode", "plan"],
        help: "Searches answered, by mode (text, vector, hybrid) and plan (text, exact, approximate, approximate_then_exact, fused).",
    },
    MetricDef {
        name: JWT_JWKS_RELOADS,
        kind: Counter,
        labels: &["outcome"],
        help: "Reads of the JWKS file (http.jwt.jwks_file): loaded, or failed (the keys read before stay in force).",
    },
    MetricDef {
        name: BUILD_INFO,
        kind: Gauge,
        labels: &["version", "role"],
        help: "Always 1; labels say which build and role run.",
    },
    MetricDef {
        name: ORCHESTRATOR_COMMANDS,
        kind: Counter,
        labels: &["type", "outcome"],
        help: "Task commands decided by the orchestrator, by command type and outcome (decided, rejected, duplicate).",
    },
    MetricDef {
        name: ORCHESTRATOR_EVENTS,
        kind: Counter,
        labels: &["type"],
        help: "Task events written by the orchestrator, by event type: TASK_ACCEPTED counts tasks delegated, TASK_COMPLETED, TASK_REDELEGATED, TASK_DEAD_LETTERED, WORKFLOW_COMPLETED, ...",
    },
    MetricDef {
        name: ORCHESTRATOR_TRANSACTIONS,
        kind: Counter,
        labels: &["outcome"],
        help: "Orchestrator Kafka transactions, committed or aborted.",
    },
    MetricDef {
        name: ORCHESTRATOR_TRANSACTION_SECONDS,
        kind: Histogram,
        labels: &[],
        help: "Time from beginning an orchestrator transaction to its commit.",
    },
    MetricDef {
        name: ORCHESTRATOR_TASK_COMPLETION_SECONDS,
        kind: Histogram,
        labels: &[],
        help: "Task completion time, from acceptance to completion, in record time.",
    },
    MetricDef {
        name: ORCHESTRATOR_ACTIVE_WORKFLOWS,
        kind: Gauge,
        labels: &[],
        help: "Workflows started and not yet completed or failed.",
    },
    MetricDef {
        name: ORCHESTRATOR_PENDING_TASKS,
        kind: Gauge,
        labels: &[],
        help: "Tasks waiting for an eligible agent in the partitions this instance owns.",
    },
    MetricDef {
        name: ORCHESTRATOR_AGENTS,
        kind: Gauge,
        labels: &["status"],
        help: "Agents by status (alive, lost, deregistered), reported by the instance owning each agent's partition.",
    },
    MetricDef {
        name: ORCHESTRATOR_AGENT_LOAD,
        kind: Gauge,
        labels: &["agent"],
        help: "Tasks an agent holds (assigned or running).",
    },
    MetricDef {
        name: ORCHESTRATOR_RESTARTS,
        kind: Counter,
        labels: &[],
        help: "Times the orchestrator loop failed, aborted its transaction and restarted from a rebuilt state.",
    },
];

/// Latency buckets (seconds): 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Freshness buckets (seconds): 1 ms to 10 min.
const FRESHNESS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and describes the catalogue. `role` goes into
/// `memos_build_info`.
pub fn install(role: &str) -> PrometheusHandle {
    let handle = HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(PROJECTOR_FRESHNESS_SECONDS.into()),
                FRESHNESS_BUCKETS,
            )
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(PROJECTOR_BATCH_RECORDS.into()), BATCH_BUCKETS)
            })
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other metrics recorder");
        for def in CATALOGUE {
            let help = def.help;
            match def.kind {
                Counter => metrics::describe_counter!(def.name, help),
                Gauge => metrics::describe_gauge!(def.name, help),
                Histogram => metrics::describe_histogram!(def.name, help),
            }
        }
        handle
    });
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "role" => role.to_owned()).set(1.0);
    metrics::gauge!(PRODUCER_QUEUE).set(0.0);
    metrics::gauge!(HTTP_IN_FLIGHT).set(0.0);
    handle.clone()
}

/// The installed handle, for rendering `/metrics`.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

/// Times `op` into the latency histogram `seconds` and counts a failure in `errors`, both
/// labelled `op=name`. For PostgreSQL and Redis calls.
pub async fn observe<T, E>(
    seconds: &'static str,
    errors: &'static str,
    name: &'static str,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let start = std::time::Instant::now();
    let result = op.await;
    metrics::histogram!(seconds, "op" => name).record(start.elapsed().as_secs_f64());
    if result.is_err() {
        metrics::counter!(errors, "op" => name).increment(1);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/operations.md` documents exactly the catalogue, in order: name, type, labels
    /// and meaning.
    #[test]
    fn operations_doc_lists_every_metric_as_the_code_defines_it() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/operations.md");
        let doc = std::fs::read_to_string(path).expect("docs/operations.md exists");
        let header = "| metric | type | labels | meaning |";
        let table: Vec<Vec<String>> = doc
            .lines()
            .skip_while(|l| l.trim() != header)
            .skip(2)
            .take_while(|l| l.trim_start().starts_with('|'))
            .map(|l| {
                l.trim()
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<String>> = CATALOGUE
            .iter()
            .map(|def| {
                let labels = if def.labels.is_empty() {
                    "-".to_owned()
                } else {
                    def.labels.join(",")
                };
                vec![
                    format!("`{}`", def.name),
                    def.kind.as_str().to_owned(),
                    labels,
                    def.help.to_owned(),
                ]
            })
            .collect();
        assert_eq!(table, expected);
    }

    #[test]
    fn catalogue_names_are_unique_and_prefixed() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|d| d.name).collect();
        assert!(names.iter().all(|n| n.starts_with("memos_")));
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
        for def in CATALOGUE {
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}",
                def.name
            );
        }
    }
}
