//! The projector loop. Batches are taken adaptively: a poll waits for the first record only
//! when the topic is idle, then whatever is already fetched is added without waiting, up to
//! the record and byte limits. Each batch is dead-lettered, applied and cached with retries
//! and backoff; the loop moves to the next batch only once the current one is committed.
//!
//! Shutdown: a cancelled token stops taking batches; a batch already being applied finishes
//! (or, when its dependency is down, is abandoned unapplied and redone after restart), a final
//! progress commit is made, and the consumer leaves the group.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use memos_kafka::CommandProducer;
use memos_redis::HotViews;
use memos_runtime::Config;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::batch::{self, Record, Report, Sinks};
use crate::consumer::{self, SeekToStored};

pub struct Projector {
    sinks: Sinks,
    consumer: BaseConsumer<SeekToStored>,
    handle: Handle,
    max_records: usize,
    max_bytes: usize,
    poll_timeout: Duration,
    max_backoff: Duration,
}

/// The batch was abandoned because shutdown was requested while a dependency was failing.
#[derive(Debug)]
struct Abandoned;

impl Projector {
    /// Builds the projector and subscribes it. Call from inside the tokio runtime.
    pub fn new(
        config: &Config,
        pool: PgPool,
        hot: HotViews,
        producer: CommandProducer,
    ) -> anyhow::Result<Self> {
        let handle = Handle::current();
        let context = SeekToStored {
            pool: pool.clone(),
            handle: handle.clone(),
            projection: crate::MEMORY_PROJECTION.to_owned(),
        };
        let consumer = consumer::create(&config.kafka, &config.projector, context)?;
        consumer.subscribe(&[config.topics.memory_commands.as_str()])?;
        Ok(Projector {
            sinks: Sinks {
                pool,
                hot,
                producer,
                topic: config.topics.memory_commands.clone(),
                dead_letter_topic: config.topics.dead_letter.clone(),
                projection: crate::MEMORY_PROJECTION.to_owned(),
            },
            consumer,
            handle,
            max_records: config.projector.max_batch_records,
            max_bytes: config.projector.max_batch_bytes,
            poll_timeout: config.projector.poll_timeout,
            max_backoff: config.projector.max_retry_backoff,
        })
    }

    /// Runs the loop on a dedicated thread (the consumer blocks); the returned handle ends
    /// when the loop has drained after `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("memos-projector".into())
            .spawn(move || self.run(shutdown))
            .expect("spawn projector thread")
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
                    self.report_progress(&progress, CommitMode::Async);
                }
                Err(Abandoned) => break,
            }
        }
        self.report_progress(&progress, CommitMode::Sync);
        self.consumer.unsubscribe();
        tracing::info!("projector stopped");
    }

    /// Waits up to the poll timeout for a first record, then takes what is already fetched.
    fn take_batch(&self) -> Vec<Record> {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut timeout = self.poll_timeout;
        while records.len() < self.max_records && bytes < self.max_bytes {
            match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(message)) => {
                    bytes += message.payload_len();
                    records.push(Record {
                        partition: message.partition(),
                        offset: message.offset(),
                        timestamp_ms: message.timestamp().to_millis(),
                        key: message.key().map(<[u8]>::to_vec),
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
        records
    }

    fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<Report, Abandoned> {
        let started = Instant::now();
        let prepared = batch::prepare(records);
        self.retry("dead-letter", shutdown, || {
            batch::dead_letter(&self.sinks, records, &prepared)
        })?;
        let (outcome, already_applied) =
            self.retry("apply", shutdown, || batch::apply(&self.sinks, &prepared))?;
        // Redis is derived: once PostgreSQL has committed, a Redis outage must not undo or
        // block the offsets, but the copy is retried so the cache does not serve stale data.
        self.retry("cache", shutdown, || batch::cache(&self.sinks, &outcome))?;
        let report = Report {
            records: records.len(),
            applied: outcome.applied.len(),
            rejected: outcome.rejected.len(),
            duplicates: outcome.duplicates,
            dead_lettered: prepared.dead.len(),
            already_applied,
        };
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "batch applied");
        Ok(report)
    }

    /// Runs `op` until it succeeds, backing off exponentially; gives up only on shutdown.
    fn retry<T, E, F, Fut>(&self, what: &str, shutdown: &CancellationToken, op: F) -> Result<T, Abandoned>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.handle.block_on(op()) {
                Ok(value) => return Ok(value),
                Err(e) => {
                    tracing::warn!(error = %e, step = what, backoff_ms = backoff.as_millis() as u64, "projector step failed; retrying");
                    let cancelled = self.handle.block_on(async {
                        tokio::select! {
                            _ = shutdown.cancelled() => true,
                            _ = tokio::time::sleep(backoff) => false,
                        }
                    });
                    if cancelled {
                        return Err(Abandoned);
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }

    /// Reports the committed position to the consumer group (monitoring only).
    fn report_progress(&self, progress: &BTreeMap<i32, i64>, mode: CommitMode) {
        if progress.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in progress {
            let _ = tpl.add_partition_offset(&self.sinks.topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::debug!(error = %e, "progress commit failed");
        }
    }
}
