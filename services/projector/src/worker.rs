//! The projector loop. Batches are taken adaptively: a poll waits for the first record only
//! when the topic is idle, then whatever is already fetched is added without waiting, up to
//! the record and byte limits. Each batch is dead-lettered, applied and cached; the loop
//! moves to the next batch only once the current one is committed.
//!
//! Failures are classified ([`crate::isolate`]): a record PostgreSQL refuses is isolated and
//! dead-lettered and the rest of its batch applied; everything else (PostgreSQL, Redis or
//! the broker unavailable, a serialization failure, a deadlock) is retried with bounded
//! exponential backoff (100 ms doubling up to `projector.max_retry_backoff`), and no record
//! is skipped because of it.
//!
//! Shutdown: a cancelled token stops taking batches; a batch already being applied finishes
//! (or, when its dependency is down, is abandoned unapplied and redone after restart), a final
//! progress commit is made, and the consumer leaves the group.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use memos_kafka::CommandProducer;
use memos_kafka::admin::dead_letter_max_bytes;
use memos_kafka::headers;
use memos_redis::HotViews;
use memos_runtime::config::KafkaConfig;
use memos_runtime::metrics::{self as m, observe};
use memos_runtime::{Config, telemetry};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Record, Report, Sinks};
use crate::consumer::{self, Positions, SeekToStored};
use crate::fold::FoldConfig;
use crate::lag;

pub struct Projector {
    sinks: Sinks,
    consumer: BaseConsumer<SeekToStored>,
    handle: Handle,
    group: String,
    positions: Positions,
    kafka: KafkaConfig,
    lag_interval: Duration,
    max_records: usize,
    max_bytes: usize,
    poll_timeout: Duration,
    max_backoff: Duration,
    apply_parallelism: usize,
}

/// The batch was abandoned because shutdown was requested while a dependency was failing.
#[derive(Debug)]
pub(crate) struct Abandoned;

impl Projector {
    /// Builds the projector and subscribes it. Call from inside the tokio runtime.
    pub fn new(config: &Config, pool: PgPool, hot: HotViews) -> anyhow::Result<Self> {
        let producer = dead_letter_producer(config)?;
        let handle = Handle::current();
        let positions = Positions::default();
        let context = SeekToStored {
            pool: pool.clone(),
            handle: handle.clone(),
            projection: crate::MEMORY_PROJECTION.to_owned(),
            group: config.projector.group_id.clone(),
            positions: positions.clone(),
        };
        let consumer = consumer::create(
            &config.kafka,
            &config.projector,
            &config.projector.group_id,
            context,
        )?;
        register_series(config);
        consumer.subscribe(&[config.topics.memory_commands.as_str()])?;
        Ok(Projector {
            sinks: Sinks {
                pool,
                hot,
                producer,
                topic: config.topics.memory_commands.clone(),
                dead_letter_topic: config.topics.dead_letter.clone(),
                dead_letter_max_bytes: dead_letter_max_bytes(&config.topics),
                projection: crate::MEMORY_PROJECTION.to_owned(),
                fold: FoldConfig {
                    topic: config.topics.memory_commands.clone(),
                    embedding_dimensions: Some(config.memory.embedding_dimensions),
                },
            },
            consumer,
            handle,
            group: config.projector.group_id.clone(),
            positions,
            kafka: config.kafka.clone(),
            lag_interval: config.telemetry.lag_interval,
            max_records: config.projector.max_batch_records,
            max_bytes: config.projector.max_batch_bytes,
            poll_timeout: config.projector.poll_timeout,
            max_backoff: config.projector.max_retry_backoff,
            apply_parallelism: config.projector.apply_parallelism,
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
            .name("memos-projector".into())
            .spawn(move || {
                self.run(shutdown);
                let _ = lag.join();
            })?)
    }

    fn run(self, shutdown: CancellationToken) {
        tracing::info!(topic = %self.sinks.topic, "projector started");
        let mut progress = BTreeMap::new();
        while !shutdown.is_cancelled() {
            let records = self.take_batch();
            if records.is_empty() {
                continue;
            }
            match self.process(&records, &shutdown) {
                Ok(report) => {
                    tracing::debug!(?report, "batch committed");
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
                    self.report_progress(&progress, CommitMode::Async);
                }
                Err(Abandoned) => break,
            }
        }
        self.report_progress(&progress, CommitMode::Sync);
        self.consumer.unsubscribe();
        tracing::info!("projector stopped");
    }

    fn take_batch(&self) -> Vec<Record> {
        take_records(
            &self.consumer,
            &Limits {
                poll_timeout: self.poll_timeout,
                max_records: self.max_records,
                max_bytes: self.max_bytes,
            },
            &self.group,
            &self.sinks.topic,
        )
    }

    fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<Report, Abandoned> {
        let batch_span = tracing::info_span!(
            "projector.batch",
            records = records.len(),
            trace_id = tracing::field::Empty
        );
        telemetry::record_trace_id(&batch_span);
        let _batch = batch_span.enter();
        let prepared = batch::prepare(records);
        // One span per record, child of the span that appended it, so a trace runs from the
        // HTTP request through Kafka to the view; the spans end when the batch is cached.
        let record_spans: Vec<tracing::Span> = records
            .iter()
            .map(|record| {
                let span = tracing::info_span!(
                    parent: None,
                    "projector.apply",
                    otel.name = "memos.projector.apply",
                    otel.kind = "consumer",
                    messaging.destination.name = %self.sinks.topic,
                    messaging.kafka.partition = record.partition,
                    messaging.kafka.offset = record.offset,
                    trace_id = tracing::field::Empty,
                );
                span.follows_from(&batch_span);
                telemetry::set_remote_parent(
                    &span,
                    record.traceparent.as_deref(),
                    record.tracestate.as_deref(),
                );
                span
            })
            .collect();

        let projection = self.sinks.projection.clone();
        let forms = self.retry("dead_letter", shutdown, || {
            batch::dead_letter(&self.sinks, records, &prepared)
        })?;
        for (dead, form) in prepared.dead.iter().zip(forms) {
            let record = &records[dead.index];
            record_spans[dead.index].in_scope(|| {
                tracing::warn!(
                    partition = record.partition, offset = record.offset,
                    class = dead.class, form = form.as_str(), reason = %dead.message, "record dead-lettered"
                )
            });
            metrics::counter!(m::DLQ_RECORDS, "source" => self.sinks.topic.clone(), "reason" => dead.class)
                .increment(1);
        }
        let apply_started = Instant::now();
        let next_offsets = prepared.next_offsets.clone();
        let dead_lettered = prepared.dead.len();
        let groups = batch::split(prepared, self.apply_parallelism);
        let isolated = self.retry("apply", shutdown, || {
            observe(
                m::POSTGRES_SECONDS,
                m::POSTGRES_ERRORS,
                "apply_batch",
                batch::apply_all(&self.sinks, records, &groups),
            )
        })?;
        let dead_lettered = dead_lettered + isolated.poisoned.len();
        let (outcome, already_applied) = (isolated.outcome, isolated.already_applied);
        metrics::histogram!(m::PROJECTOR_APPLY_SECONDS, "projection" => projection.clone())
            .record(apply_started.elapsed().as_secs_f64());
        let committed_ms = chrono::Utc::now().timestamp_millis();
        // Redis is derived: once PostgreSQL has committed, a Redis outage pauses the loop (the
        // copy is retried so the cache does not serve stale data) but never undoes offsets.
        self.retry("cache", shutdown, || {
            observe(
                m::REDIS_SECONDS,
                m::REDIS_ERRORS,
                "put_memories",
                batch::cache(&self.sinks, &outcome, &next_offsets),
            )
        })?;
        drop(record_spans);

        let report = Report {
            records: records.len(),
            applied: outcome.applied,
            rejected: outcome.rejected.len(),
            duplicates: outcome.duplicates,
            dead_lettered,
            already_applied,
        };
        self.record_batch(records, &report, &outcome.rejected, committed_ms);
        Ok(report)
    }

    fn record_batch(
        &self,
        records: &[Record],
        report: &Report,
        rejected: &[(uuid::Uuid, String)],
        committed_ms: i64,
    ) {
        let projection = self.sinks.projection.clone();
        metrics::histogram!(m::PROJECTOR_BATCH_RECORDS, "projection" => projection.clone())
            .record(records.len() as f64);
        let freshness =
            metrics::histogram!(m::PROJECTOR_FRESHNESS_SECONDS, "projection" => projection.clone());
        for record in records {
            if let Some(ts) = record.timestamp_ms {
                freshness.record((committed_ms - ts).max(0) as f64 / 1000.0);
            }
        }
        for (outcome, count) in [
            ("applied", report.applied),
            ("rejected", report.rejected),
            ("duplicate", report.duplicates),
            ("already_applied", report.already_applied),
        ] {
            metrics::counter!(m::PROJECTOR_COMMANDS, "projection" => projection.clone(), "outcome" => outcome)
                .increment(count as u64);
        }
        for (_, reason) in rejected {
            let reason = reason.split(':').next().unwrap_or("unknown").to_owned();
            metrics::counter!(m::PROJECTOR_REJECTED, "projection" => projection.clone(), "reason" => reason)
                .increment(1);
        }
        metrics::gauge!(m::PROJECTOR_LAST_APPLIED, "projection" => projection)
            .set(committed_ms as f64 / 1000.0);
    }

    fn retry<T, E, F, Fut>(&self, what: &str, shutdown: &CancellationToken, op: F) -> Result<T, Abandoned>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
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

    fn report_progress(&self, progress: &BTreeMap<i32, i64>, mode: CommitMode) {
        report_progress(&self.consumer, &self.sinks.topic, progress, mode);
    }
}

/// The producer of a projection's dead letters: its `message.max.bytes` is the dead-letter
/// topic's limit, so a copy the topic accepts is not refused locally.
pub(crate) fn dead_letter_producer(config: &Config) -> anyhow::Result<CommandProducer> {
    CommandProducer::with_max_message_bytes(&config.kafka, Some(dead_letter_max_bytes(&config.topics)))
}

/// Registers at zero every series whose label values are known up front, so dashboards and
/// alerts see a flat line instead of no data until the first failure.
fn register_series(config: &Config) {
    let projection = crate::MEMORY_PROJECTION;
    let topic = config.topics.memory_commands.clone();
    for reason in crate::dead_letter_classes() {
        metrics::counter!(m::DLQ_RECORDS, "source" => topic.clone(), "reason" => reason).increment(0);
    }
    for step in ["dead_letter", "apply", "cache"] {
        metrics::counter!(m::PROJECTOR_RETRIES, "projection" => projection, "step" => step).increment(0);
    }
    for reason in crate::fold::reason::ALL {
        metrics::counter!(m::PROJECTOR_REJECTED, "projection" => projection, "reason" => *reason)
            .increment(0);
    }
    for op in ["apply_batch", "load_offsets"] {
        metrics::counter!(m::POSTGRES_ERRORS, "op" => op).increment(0);
    }
    metrics::counter!(m::REDIS_ERRORS, "op" => "put_memories").increment(0);
    for kind in ["assign", "revoke"] {
        metrics::counter!(m::CONSUMER_REBALANCES, "group" => config.projector.group_id.clone(), "kind" => kind)
            .increment(0);
    }
    metrics::gauge!(m::CONSUMER_ASSIGNED, "group" => config.projector.group_id.clone()).set(0.0);
}

/// How much one batch takes.
pub(crate) struct Limits {
    pub poll_timeout: Duration,
    pub max_records: usize,
    pub max_bytes: usize,
}

/// Waits up to the poll timeout for a first record, then takes what is already fetched.
pub(crate) fn take_records<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    limits: &Limits,
    group: &str,
    topic: &str,
) -> Vec<Record> {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut timeout = limits.poll_timeout;
    while records.len() < limits.max_records && bytes < limits.max_bytes {
        match consumer.poll(timeout) {
            None => break,
            Some(Ok(message)) => {
                bytes += message.payload_len();
                let header = |name: &str| {
                    message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .map(str::to_owned)
                    })
                };
                records.push(Record {
                    partition: message.partition(),
                    offset: message.offset(),
                    timestamp_ms: message.timestamp().to_millis(),
                    key: message.key().map(<[u8]>::to_vec),
                    traceparent: header(headers::TRACEPARENT),
                    tracestate: header(headers::TRACESTATE),
                    payload: message.payload().map(<[u8]>::to_vec),
                });
                timeout = Duration::ZERO;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                break;
            }
        }
    }
    if !records.is_empty() {
        let labels = [("group", group.to_owned()), ("topic", topic.to_owned())];
        metrics::counter!(m::CONSUMER_RECORDS, &labels).increment(records.len() as u64);
        metrics::counter!(m::CONSUMER_BYTES, &labels).increment(bytes as u64);
    }
    records
}

/// Runs `op` until it succeeds, backing off exponentially up to `max_backoff`; gives up only
/// on shutdown.
pub(crate) fn retry<T, E, F, Fut>(
    handle: &Handle,
    max_backoff: Duration,
    projection: &str,
    what: &str,
    shutdown: &CancellationToken,
    op: F,
) -> Result<T, Abandoned>
where
    E: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match handle.block_on(op()) {
            Ok(value) => return Ok(value),
            Err(e) => {
                metrics::counter!(m::PROJECTOR_RETRIES, "projection" => projection.to_owned(), "step" => what.to_owned())
                    .increment(1);
                tracing::warn!(error = %e, step = what, backoff_ms = backoff.as_millis() as u64, "projector step failed; retrying");
                let cancelled = handle.block_on(async {
                    tokio::select! {
                        _ = shutdown.cancelled() => true,
                        _ = tokio::time::sleep(backoff) => false,
                    }
                });
                if cancelled {
                    return Err(Abandoned);
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
}

/// Reports the committed position to the consumer group (monitoring only).
pub(crate) fn report_progress<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    progress: &BTreeMap<i32, i64>,
    mode: CommitMode,
) {
    if progress.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in progress {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::debug!(error = %e, "progress commit failed");
    }
}
