//! One unit of projector work, as plain functions a test can drive step by step:
//! [`prepare`] decodes and validates (pure), [`dead_letter`] copies what cannot be applied to
//! the dead-letter topic, [`apply`] decides the batch with the [`fold`](crate::fold) and writes
//! the views and the next offsets in one transaction, [`cache`] copies the result to Redis
//! after the commit.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use memos_kafka::dlq::{self, DeadLetter};
use memos_kafka::{CommandProducer, ProduceError};
use memos_postgres::memories::{self, Memory};
use memos_postgres::offsets;
use memos_redis::HotViews;
use memos_redis::hot::{HotWrite, Recent};
use memos_schemas::MemoryCommand;
use sqlx::PgPool;

use crate::fold::{self, Decided, FoldConfig, Outcome};

/// A consumed record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// Record timestamp in Unix milliseconds, when the broker has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// W3C trace context of the producer, from the record headers.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub payload: Option<Vec<u8>>,
}

/// A record that cannot be applied, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub index: usize,
    pub class: &'static str,
    pub message: String,
}

/// A decoded batch, ready to apply.
#[derive(Debug, Default)]
pub struct Prepared {
    pub commands: Vec<Decided>,
    pub dead: Vec<Rejected>,
    /// Next offset per partition once the whole batch is done.
    pub next_offsets: BTreeMap<i32, i64>,
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub records: usize,
    pub applied: usize,
    pub rejected: usize,
    pub duplicates: usize,
    pub dead_lettered: usize,
    /// Records at offsets the views had already applied (a redelivery after a rebalance).
    pub already_applied: usize,
}

/// Where a batch goes.
pub struct Sinks {
    pub pool: PgPool,
    pub hot: HotViews,
    pub producer: CommandProducer,
    pub topic: String,
    pub dead_letter_topic: String,
    pub projection: String,
    pub fold: FoldConfig,
}

fn record_time(record: &Record, fallback_ms: i64) -> DateTime<Utc> {
    let ms = record.timestamp_ms.unwrap_or(fallback_ms);
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Decodes and validates every record; pure and deterministic.
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
        match MemoryCommand::decode(payload) {
            Ok(command) => prepared.commands.push(Decided {
                record_time: record_time(record, command.issued_at()),
                traceparent: record
                    .traceparent
                    .clone()
                    .or_else(|| command.traceparent().map(str::to_owned)),
                partition: record.partition,
                offset: record.offset,
                command,
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

/// Copies the records that cannot be applied to the dead-letter topic, each acknowledged.
pub async fn dead_letter(sinks: &Sinks, records: &[Record], prepared: &Prepared) -> Result<(), ProduceError> {
    for dead in &prepared.dead {
        let record = &records[dead.index];
        dlq::send(
            &sinks.producer,
            &sinks.dead_letter_topic,
            &DeadLetter {
                topic: &sinks.topic,
                partition: record.partition,
                offset: record.offset,
                key: record.key.as_deref(),
                payload: record.payload.as_deref(),
                error_class: dead.class,
                error_message: &dead.message,
            },
        )
        .await?;
    }
    Ok(())
}

/// Decides and applies the batch and moves the offsets, in one transaction. Records below the
/// stored next offset of their partition were applied by an earlier transaction (a
/// redelivery after a rebalance) and are skipped.
pub async fn apply(sinks: &Sinks, prepared: &Prepared) -> Result<(Outcome, usize), sqlx::Error> {
    let mut tx = sinks.pool.begin().await?;
    let partitions: Vec<i32> = prepared.next_offsets.keys().copied().collect();
    let stored = offsets::lock_and_load(&mut tx, &sinks.projection, &sinks.topic, &partitions).await?;
    let (fresh, stale): (Vec<&Decided>, Vec<&Decided>) = prepared
        .commands
        .iter()
        .partition(|d| d.offset >= stored.get(&d.partition).copied().unwrap_or(0));
    let fresh: Vec<Decided> = fresh.into_iter().cloned().collect();
    let (command_ids, memory_ids, share_namespaces, tool_namespaces) = fold::touched(&fresh);
    let state = memories::load_state(
        &mut tx,
        &command_ids,
        &memory_ids,
        &share_namespaces,
        &tool_namespaces,
    )
    .await?;
    let outcome = fold::fold(state, &fresh, &sinks.fold);
    memories::write(&mut tx, &outcome.changes).await?;
    offsets::advance(&mut tx, &sinks.projection, &sinks.topic, &prepared.next_offsets).await?;
    tx.commit().await?;
    Ok((outcome, stale.len()))
}

/// Splits a batch into at most `ways` batches by partition (partition `p` goes to group
/// `p % ways`), keeping log order within each partition. Partitions share no namespace, so
/// the groups can be decided and committed concurrently, each with its own offsets.
pub fn split(prepared: Prepared, ways: usize) -> Vec<Prepared> {
    let ways = ways.max(1);
    let mut groups: Vec<Prepared> = (0..ways).map(|_| Prepared::default()).collect();
    let group_of = |partition: i32| partition.rem_euclid(ways as i32) as usize;
    for (partition, next) in prepared.next_offsets {
        groups[group_of(partition)].next_offsets.insert(partition, next);
    }
    for command in prepared.commands {
        groups[group_of(command.partition)].commands.push(command);
    }
    groups.retain(|g| !g.next_offsets.is_empty());
    groups
}

/// Applies the groups of [`split`] concurrently, one transaction each. If one fails, the
/// caller retries them all: groups that committed are then skipped by their stored offsets.
pub async fn apply_all(sinks: &Sinks, groups: &[Prepared]) -> Result<(Outcome, usize), sqlx::Error> {
    let results = futures::future::join_all(groups.iter().map(|group| apply(sinks, group))).await;
    let mut merged = Outcome::default();
    let mut already_applied = 0;
    for result in results {
        let (outcome, stale) = result?;
        merged.applied += outcome.applied;
        merged.duplicates += outcome.duplicates;
        merged.rejected.extend(outcome.rejected);
        merged.changes.memories.extend(outcome.changes.memories);
        already_applied += stale;
    }
    Ok((merged, already_applied))
}

/// The document the hot cache holds for a memory: `None` once it is forgotten.
fn hot_doc(memory: &Memory) -> Option<String> {
    memory
        .forgotten_at
        .is_none()
        .then(|| serde_json::to_string(memory).expect("views serialize"))
}

/// Copies the batch's memories and positions to Redis, each guarded by its log position.
pub async fn cache(
    sinks: &Sinks,
    outcome: &Outcome,
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<usize, memos_redis::hot::Error> {
    let memories = &outcome.changes.memories;
    let ids: Vec<String> = memories.iter().map(|m| m.memory_id.to_string()).collect();
    let writes: Vec<HotWrite<'_>> = memories
        .iter()
        .zip(&ids)
        .map(|(memory, id)| HotWrite {
            key: id,
            position: memory.log_offset,
            doc: hot_doc(memory),
            recent: Recent {
                namespace: &memory.namespace,
                score: memory.created_at.timestamp_millis(),
                keep: memory.forgotten_at.is_none() && memory.tier == "working",
            },
        })
        .collect();
    let written = sinks.hot.put_memories(&writes).await?;
    sinks.hot.advance_positions(&sinks.topic, next_offsets).await?;
    Ok(written)
}
