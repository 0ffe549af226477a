//! One unit of task-projection work, as plain functions a test can drive step by step:
//! [`prepare`] decodes (pure), [`dead_letter`] writes what cannot be decoded to the
//! dead-letter topic, [`apply`] folds the batch and writes the views and the next offsets in
//! one transaction, [`apply_isolating`] does that with the events PostgreSQL refuses isolated
//! and dead-lettered ([`crate::isolate`]), [`cache`] copies the touched agents' inbox and
//! availability from PostgreSQL to Redis after the commit. Replay-safe: records below the
//! stored offsets are skipped, and event rows are keyed by their log position.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use memos_kafka::dlq::Form;
use memos_kafka::{CommandProducer, ProduceError};
use memos_postgres::{offsets, tasks};
use memos_redis::HotViews;
use memos_redis::tasks::AgentWrite;
use memos_schemas::task::TaskEvent;
use sqlx::PgPool;

use crate::batch::{self as memory_batch, LetterBox, Record, Rejected};
use crate::isolate::{self, Apply, ApplyError, Isolated, Poisoned};
use crate::tasks::fold::{self, DecidedEvent, TaskOutcome};

/// Where a batch of task events goes.
pub struct TaskSinks {
    pub pool: PgPool,
    pub hot: HotViews,
    pub producer: CommandProducer,
    /// The task events topic.
    pub topic: String,
    pub dead_letter_topic: String,
    /// Largest dead letter the topic accepts; a larger one is written as a reference.
    pub dead_letter_max_bytes: usize,
    pub projection: String,
}

impl TaskSinks {
    pub fn letters(&self) -> LetterBox<'_> {
        LetterBox {
            producer: &self.producer,
            dead_letter_topic: &self.dead_letter_topic,
            max_bytes: self.dead_letter_max_bytes,
            origin: &self.topic,
        }
    }
}

/// A decoded batch, ready to apply.
#[derive(Debug, Default)]
pub struct Prepared {
    pub events: Vec<DecidedEvent>,
    pub dead: Vec<Rejected>,
    /// Next offset per partition once the whole batch is done.
    pub next_offsets: BTreeMap<i32, i64>,
}

fn record_time(record: &Record, fallback_ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(record.timestamp_ms.unwrap_or(fallback_ms))
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Decodes every record; pure and deterministic.
pub fn prepare(records: &[Record]) -> Prepared {
    let mut prepared = Prepared::default();
    for (index, record) in records.iter().enumerate() {
        let next = prepared
            .next_offsets
            .entry(record.partition)
            .or_insert(record.offset + 1);
        *next = (*next).max(record.offset + 1);
        let Some(payload) = record.payload.as_deref() else {
            prepared.dead.push(Rejected {
                index,
                class: "empty",
                message: "record has no value".into(),
            });
            continue;
        };
        match TaskEvent::decode(payload) {
            Ok(event) => prepared.events.push(DecidedEvent {
                record_time: record_time(record, event.at),
                traceparent: record.traceparent.clone().or_else(|| event.traceparent.clone()),
                partition: record.partition,
                offset: record.offset,
                event,
            }),
            Err(e) => prepared.dead.push(Rejected {
                index,
                class: e.class(),
                message: e.to_string(),
            }),
        }
    }
    prepared
}

/// Writes the records that cannot be decoded to the dead-letter topic, each acknowledged.
/// Returns the form of each letter, in the order of `prepared.dead`.
pub async fn dead_letter(
    sinks: &TaskSinks,
    records: &[Record],
    prepared: &Prepared,
) -> Result<Vec<Form>, ProduceError> {
    memory_batch::dead_letter_rejected(sinks.letters(), records, &prepared.dead).await
}

/// Folds and writes the batch and moves the offsets, in one transaction. Returns the outcome
/// and how many records had already been applied (a redelivery after a rebalance).
pub async fn apply(sinks: &TaskSinks, prepared: &Prepared) -> Result<(TaskOutcome, usize), sqlx::Error> {
    apply_to(&sinks.pool, &sinks.projection, &sinks.topic, prepared).await
}

/// The task projection as [`crate::isolate`] drives it, into any pool.
pub struct TaskApply<'a> {
    pub pool: &'a PgPool,
    pub projection: &'a str,
    pub topic: &'a str,
}

impl Apply for TaskApply<'_> {
    type Item = DecidedEvent;
    type Outcome = TaskOutcome;

    fn position(item: &DecidedEvent) -> (i32, i64) {
        (item.partition, item.offset)
    }

    async fn apply(
        &self,
        items: &[DecidedEvent],
        next_offsets: &BTreeMap<i32, i64>,
    ) -> Result<(TaskOutcome, usize), sqlx::Error> {
        apply_events(self.pool, self.projection, self.topic, items, next_offsets).await
    }

    /// Merges what is read after the commit: the event rows, the touched agents (whose
    /// Redis copy is rewritten) and the counts by type.
    fn merge(into: &mut TaskOutcome, from: TaskOutcome) {
        into.changes.events.extend(from.changes.events);
        for agent in from.changes.touched_agents {
            if !into.changes.touched_agents.contains(&agent) {
                into.changes.touched_agents.push(agent);
            }
        }
        for (kind, count) in from.by_type {
            *into.by_type.entry(kind).or_default() += count;
        }
    }
}

/// [`apply`] with the events PostgreSQL refuses isolated and dead-lettered; `records` are
/// the batch's records (the letters carry their bytes).
pub async fn apply_isolating(
    sinks: &TaskSinks,
    records: &[Record],
    prepared: &Prepared,
) -> Result<Isolated<TaskOutcome>, ApplyError> {
    let by_position = memory_batch::by_position(records);
    let letters = sinks.letters();
    let target = TaskApply {
        pool: &sinks.pool,
        projection: &sinks.projection,
        topic: &sinks.topic,
    };
    isolate::apply_isolating(
        &target,
        &prepared.events,
        &prepared.next_offsets,
        async |_: &DecidedEvent, poisoned: &Poisoned| letters.send_poisoned(&by_position, poisoned).await,
    )
    .await
}

/// [`apply`] against any pool (a rebuild applies into a fresh schema with it).
pub async fn apply_to(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    prepared: &Prepared,
) -> Result<(TaskOutcome, usize), sqlx::Error> {
    apply_events(pool, projection, topic, &prepared.events, &prepared.next_offsets).await
}

/// [`apply_to`] of `events` (log order) with the offsets `next_offsets`.
pub async fn apply_events(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    events: &[DecidedEvent],
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<(TaskOutcome, usize), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let stored = offsets::lock_and_load(&mut tx, projection, topic, &partitions).await?;
    let (fresh, stale): (Vec<&DecidedEvent>, Vec<&DecidedEvent>) = events
        .iter()
        .partition(|d| d.offset >= stored.get(&d.partition).copied().unwrap_or(0));
    let fresh: Vec<DecidedEvent> = fresh.into_iter().cloned().collect();
    let (agent_ids, task_ids, workflow_ids) = fold::touched(&fresh);
    let state = tasks::load_state(&mut tx, &agent_ids, &task_ids, &workflow_ids).await?;
    let outcome = fold::fold(state, &fresh, topic);
    tasks::write(&mut tx, &outcome.changes).await?;
    offsets::advance(&mut tx, projection, topic, next_offsets).await?;
    tx.commit().await?;
    Ok((outcome, stale.len()))
}

/// Why copying to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("reading the agents' views: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("writing Redis: {0}")]
    Redis(#[from] memos_redis::hot::Error),
}

/// Rewrites the inbox and availability of `agents` in Redis from a PostgreSQL snapshot, then
/// records the revisions Redis now holds. Returns how many agents were written.
pub async fn cache(sinks: &TaskSinks, agents: &[String]) -> Result<usize, CacheError> {
    if agents.is_empty() {
        return Ok(0);
    }
    let snapshots = tasks::agent_snapshots(&sinks.pool, agents).await?;
    let writes: Vec<AgentWrite<'_>> = snapshots
        .iter()
        .map(|s| AgentWrite {
            agent_id: &s.agent_id,
            revision: s.revision,
            inbox: &s.inbox,
            availability: s.availability.as_deref(),
        })
        .collect();
    sinks.hot.put_agents(&writes).await?;
    let synced: Vec<(String, i64)> = snapshots
        .iter()
        .map(|s| (s.agent_id.clone(), s.revision))
        .collect();
    tasks::mark_synced(&sinks.pool, &synced).await?;
    Ok(writes.len())
}

/// Rewrites every agent whose newest revision may not have reached Redis (after a crash
/// between a commit and its Redis write).
pub async fn resync(sinks: &TaskSinks) -> Result<usize, CacheError> {
    let agents = tasks::unsynced_agents(&sinks.pool).await?;
    cache(sinks, &agents).await
}
