//! The task-projection loop: the memory projector's loop (adaptive batches, retries with
//! backoff, progress reports, events PostgreSQL refuses isolated by [`crate::isolate`])
//! around [`batch`](crate::tasks::batch). Before its first batch it rewrites in Redis every
//! agent whose newest revision had not reached it.
//!
//! Shutdown: a cancelled token stops taking batches; a batch being applied finishes (or, when
//! its dependency is down, is abandoned unapplied and redone after restart), a final progress
//! commit is made, and the consumer leaves the group.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use memos_kafka::admin::dead_letter_max_bytes;
use memos_redis::HotViews;
use memos_runtime::config::KafkaConfig;
use memos_runtime::metrics::{self as m, observe};
use memos_runtime::{Config, telemetry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::batch::Record;
use crate::consumer::{self, Positions, SeekToStored};
use crate::lag;
use crate::tasks::batch::{self, TaskSinks};
use crate::worker::{Abandoned, Limits, dead_letter_producer, report_progress, retry, take_records};

pub struct TaskProjector {
    sinks: TaskSinks,
    consumer: BaseConsumer<SeekToStored>,
    handle: Handle,
    group: String,
    positions: Positions,
    kafka: KafkaConfig,
    lag_interval: Duration,
    limits: Limits,
    max_backoff: Duration,
}

/// The consumer group of the task projection: `<projector.group_id>-tasks`.
pub fn group_id(config: &Config) -> String {
    format!("{}-tasks", config.projector.group_id)
}

impl TaskProjector {
    /// Builds the projection and subscribes it. Call from inside the tokio runtime.
    pub fn new(config: &Config, pool: PgPool, hot: HotViews) -> anyhow::Result<Self> {
        let producer = dead_letter_producer(config)?;
        let handle = Handle::current();
        let positions = Positions::default();
        let group = group_id(config);
        let context = SeekToStored {
            pool: pool.clone(),
            handle: handle.clone(),
            projection: crate::tasks::TASK_PROJECTION.to_owned(),
            group: group.clone(),
            positions: positions.clone(),
        };
        let consumer = consumer::create(&config.kafka, &config.projector, &group, context)?;
        register_series(config, &group);
        consumer.subscribe(&[config.topics.task_events.as_str()])?;
        Ok(TaskProjector {
            sinks: TaskSinks {
                pool,
                hot,
                producer,
                topic: config.topics.task_events.clone(),
                dead_letter_topic: config.topics.dead_letter.clone(),
                dead_letter_max_bytes: dead_letter_max_bytes(&config.topics),
                projection: crate::tasks::TASK_PROJECTION.to_owned(),
            },
            consumer,
            handle,
            group,
            positions,
            kafka: config.kafka.clone(),
            lag_interval: config.telemetry.lag_interval,
            limits: Limits {
                poll_timeout: config.projector.poll_timeout,
                max_records: config.projector.max_batch_records,
                max_bytes: config.projector.max_batch_bytes,
            },
            max_backoff: config.projector.max_retry_backoff,
        })
    }

    /// Runs the loop on a dedicated thread (the consumer blocks); the returned handle ends
    /// when the loop has drained after `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let lag = lag::spawn(
            &self.kafka,
            self.group.clone(),
            self.sinks.topic.clone(),
            self.positions.clone(),
            self.lag_interval,
            shutdown.clone(),
        )?;
        Ok(std::thread::Builder::new()
            .name("memos-task-projection".into())
            .spawn(move || {
                self.run(shutdown);
                let _ = lag.join();
            })?)
    }

    fn retry<T, E, F, Fut>(&self, what: &str, shutdown: &CancellationToken, op: F) -> Result<T, Abandoned>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        retry(
            &self.handle,
            self.max_backoff,
            &self.sinks.projection,
            what,
            shutdown,
            op,
        )
    }

    fn run(self, shutdown: CancellationToken) {
        let resynced = self.retry("cache", &shutdown, || {
            observe(
                m::REDIS_SECONDS,
                m::REDIS_ERRORS,
                "put_agents",
                batch::resync(&self.sinks),
            )
        });
        if let Ok(agents) = resynced {
            tracing::info!(topic = %self.sinks.topic, resynced_agents = agents, "task-event projection started");
            let mut progress = BTreeMap::new();
            while !shutdown.is_cancelled() {
                let records = take_records(&self.consumer, &self.limits, &self.group, &self.sinks.topic);
                if records.is_empty() {
                    continue;
                }
                if self.process(&records, &shutdown).is_err() {
                    break;
                }
                for record in &records {
                    let next = progress.entry(record.partition).or_insert(0);
                    *next = (record.offset + 1).max(*next);
                }
                let mut positions = self.positions.lock().expect("positions lock");
                for (partition, next) in &progress {
                    if let Some(position) = positions.get_mut(partition) {
                        *position = (*position).max(*next);
                    }
                }
                drop(positions);
                report_progress(&self.consumer, &self.sinks.topic, &progress, CommitMode::Async);
            }
            report_progress(&self.consumer, &self.sinks.topic, &progress, CommitMode::Sync);
        }
        self.consumer.unsubscribe();
        tracing::info!("task-event projection stopped");
    }

    fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<(), Abandoned> {
        let batch_span = tracing::info_span!(
            "projector.tasks.batch",
            records = records.len(),
            trace_id = tracing::field::Empty
        );
        telemetry::record_trace_id(&batch_span);
        let _batch = batch_span.enter();
        let prepared = batch::prepare(records);
        let forms = self.retry("dead_letter", shutdown, || {
            batch::dead_letter(&self.sinks, records, &prepared)
        })?;
        for (dead, form) in prepared.dead.iter().zip(forms) {
            let record = &records[dead.index];
            tracing::warn!(
                partition = record.partition, offset = record.offset,
                class = dead.class, form = form.as_str(), reason = %dead.message, "task event dead-lettered"
            );
            metrics::counter!(m::DLQ_RECORDS, "source" => self.sinks.topic.clone(), "reason" => dead.class)
                .increment(1);
        }
        let apply_started = Instant::now();
        let isolated = self.retry("apply", shutdown, || {
            observe(
                m::POSTGRES_SECONDS,
                m::POSTGRES_ERRORS,
                "apply_task_batch",
                batch::apply_isolating(&self.sinks, records, &prepared),
            )
        })?;
        let (outcome, already_applied) = (isolated.outcome, isolated.already_applied);
        let projection = self.sinks.projection.clone();
        metrics::histogram!(m::PROJECTOR_APPLY_SECONDS, "projection" => projection.clone())
            .record(apply_started.elapsed().as_secs_f64());
        let committed_ms = chrono::Utc::now().timestamp_millis();
        // Redis is derived: once PostgreSQL has committed, a Redis outage pauses the loop (the
        // copy is retried so inboxes do not go stale) but never undoes offsets; a crash here
        // is repaired by the resync at the next start.
        let touched = &outcome.changes.touched_agents;
        self.retry("cache", shutdown, || {
            observe(
                m::REDIS_SECONDS,
                m::REDIS_ERRORS,
                "put_agents",
                batch::cache(&self.sinks, touched),
            )
        })?;

        metrics::histogram!(m::PROJECTOR_BATCH_RECORDS, "projection" => projection.clone())
            .record(records.len() as f64);
        let freshness =
            metrics::histogram!(m::PROJECTOR_FRESHNESS_SECONDS, "projection" => projection.clone());
        for record in records {
            if let Some(ts) = record.timestamp_ms {
                freshness.record((committed_ms - ts).max(0) as f64 / 1000.0);
            }
        }
        let applied = outcome.changes.events.len();
        for (result, count) in [("applied", applied), ("already_applied", already_applied)] {
            metrics::counter!(m::PROJECTOR_COMMANDS, "projection" => projection.clone(), "outcome" => result)
                .increment(count as u64);
        }
        for (kind, count) in &outcome.by_type {
            metrics::counter!(m::PROJECTOR_TASK_EVENTS, "type" => *kind).increment(*count as u64);
        }
        metrics::gauge!(m::PROJECTOR_LAST_APPLIED, "projection" => projection)
            .set(committed_ms as f64 / 1000.0);
        tracing::debug!(
            records = records.len(),
            applied,
            already_applied,
            "task batch committed"
        );
        Ok(())
    }
}

/// Registers at zero every series whose label values are known up front.
fn register_series(config: &Config, group: &str) {
    let projection = crate::tasks::TASK_PROJECTION;
    let topic = config.topics.task_events.clone();
    for reason in crate::dead_letter_classes() {
        metrics::counter!(m::DLQ_RECORDS, "source" => topic.clone(), "reason" => reason).increment(0);
    }
    for step in ["dead_letter", "apply", "cache"] {
        metrics::counter!(m::PROJECTOR_RETRIES, "projection" => projection, "step" => step).increment(0);
    }
    use memos_schemas::task::TaskEventType as E;
    for kind in [
        E::TaskAccepted,
        E::TaskAssigned,
        E::TaskStarted,
        E::TaskCompleted,
        E::TaskFailed,
        E::TaskTimedOut,
        E::TaskRedelegated,
        E::TaskDeadLettered,
        E::TaskCancelled,
        E::TemplateDefined,
        E::WorkflowStarted,
        E::WorkflowStepReady,
        E::WorkflowCompleted,
        E::WorkflowFailed,
        E::WorkflowCancelled,
        E::AgentRegistered,
        E::AgentHeartbeat,
        E::AgentLost,
        E::AgentDeregistered,
        E::CommandRejected,
    ] {
        metrics::counter!(m::PROJECTOR_TASK_EVENTS, "type" => kind.as_str()).increment(0);
    }
    metrics::counter!(m::POSTGRES_ERRORS, "op" => "apply_task_batch").increment(0);
    metrics::counter!(m::REDIS_ERRORS, "op" => "put_agents").increment(0);
    for kind in ["assign", "revoke"] {
        metrics::counter!(m::CONSUMER_REBALANCES, "group" => group.to_owned(), "kind" => kind).increment(0);
    }
    metrics::gauge!(m::CONSUMER_ASSIGNED, "group" => group.to_owned()).set(0.0);
}
