//! One unit of projector work, as plain functions a test can drive step by step:
//! [`prepare`] decodes and validates (pure), [`dead_letter`] writes what cannot be decoded to
//! the dead-letter topic, [`apply`] decides the batch with the [`fold`](crate::fold) and writes
//! the views and the next offsets in one transaction, [`apply_all`] does that for the
//! partition groups of [`split`] with the records PostgreSQL refuses isolated
//! ([`crate::isolate`]), [`cache`] copies the result to Redis after the commit.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};
use memos_kafka::dlq::{self, DeadLetter, Form};
use memos_kafka::{CommandProducer, ProduceError};
use memos_postgres::memories::{self, Memory};
use memos_postgres::offsets;
use memos_redis::HotViews;
use memos_redis::hot::{HotWrite, Recent};
use memos_runtime::metrics as m;
use memos_schemas::MemoryCommand;
use sqlx::PgPool;

use crate::fold::{self, Decided, FoldConfig, Outcome};
use crate::isolate::{self, Apply, ApplyError, Isolated, Poisoned};

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
    /// Largest dead letter the topic accepts ([`memos_kafka::admin::dead_letter_max_bytes`]);
    /// a larger one is written as a reference.
    pub dead_letter_max_bytes: usize,
    pub projection: String,
    pub fold: FoldConfig,
}

/// Where a projection's dead letters go.
#[derive(Clone, Copy)]
pub struct LetterBox<'a> {
    pub producer: &'a CommandProducer,
    pub dead_letter_topic: &'a str,
    pub max_bytes: usize,
    /// The topic the records came from.
    pub origin: &'a str,
}

impl LetterBox<'_> {
    /// Writes `record` to the dead-letter topic, a copy or a reference ([`dlq::send`]), and
    /// waits for the broker's acknowledgement.
    pub async fn send(&self, record: &Record, class: &str, message: &str) -> Result<Form, ProduceError> {
        let letter = DeadLetter {
            topic: self.origin,
            partition: record.partition,
            offset: record.offset,
            key: record.key.as_deref(),
            payload: record.payload.as_deref(),
            error_class: class,
            error_message: message,
        };
        let (_, form) = dlq::send(self.producer, self.dead_letter_topic, &letter, self.max_bytes).await?;
        Ok(form)
    }

    /// Dead-letters the record at `poisoned`'s position among `records` as
    /// [`isolate::UNSTORABLE`], and reports it (log and metric) once acknowledged.
    pub async fn send_poisoned(
        &self,
        records: &HashMap<(i32, i64), &Record>,
        poisoned: &Poisoned,
    ) -> Result<(), ProduceError> {
        let record = records
            .get(&(poisoned.partition, poisoned.offset))
            .expect("an isolated item comes from a record of its batch");
        let form = self.send(record, isolate::UNSTORABLE, &poisoned.reason).await?;
        tracing::warn!(
            topic = self.origin, partition = poisoned.partition, offset = poisoned.offset,
            class = isolate::UNSTORABLE, form = form.as_str(), reason = %poisoned.reason,
            "record refused by PostgreSQL isolated and dead-lettered"
        );
        metrics::counter!(m::DLQ_RECORDS, "source" => self.origin.to_owned(), "reason" => isolate::UNSTORABLE)
            .increment(1);
        Ok(())
    }
}

/// `records` by their log position.
pub fn by_position(records: &[Record]) -> HashMap<(i32, i64), &Record> {
    records.iter().map(|r| ((r.partition, r.offset), r)).collect()
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

impl Sinks {
    pub fn letters(&self) -> LetterBox<'_> {
        LetterBox {
            producer: &self.producer,
            dead_letter_topic: &self.dead_letter_topic,
            max_bytes: self.dead_letter_max_bytes,
            origin: &self.topic,
        }
    }
}

/// Writes the records that cannot be decoded to the dead-letter topic, each acknowledged.
/// Returns the form of each letter, in the order of `prepared.dead`.
pub async fn dead_letter(
    sinks: &Sinks,
    records: &[Record],
    prepared: &Prepared,
) -> Result<Vec<Form>, ProduceError> {
    dead_letter_rejected(sinks.letters(), records, &prepared.dead).await
}

/// [`dead_letter`] for any projection.
pub async fn dead_letter_rejected(
    letters: LetterBox<'_>,
    records: &[Record],
    dead: &[Rejected],
) -> Result<Vec<Form>, ProduceError> {
    let mut forms = Vec::with_capacity(dead.len());
    for dead in dead {
        forms.push(
            letters
                .send(&records[dead.index], dead.class, &dead.message)
                .await?,
        );
    }
    Ok(forms)
}

/// Decides and applies the batch and moves the offsets, in one transaction. Records below the
/// stored next offset of their partition were applied by an earlier transaction (a
/// redelivery after a rebalance) and are skipped. A value PostgreSQL refuses fails the whole
/// transaction; [`apply_all`] isolates it.
pub async fn apply(sinks: &Sinks, prepared: &Prepared) -> Result<(Outcome, usize), sqlx::Error> {
    apply_commands(sinks, &prepared.commands, &prepared.next_offsets).await
}

/// [`apply`] of `commands` (log order) with the offsets `next_offsets`.
pub async fn apply_commands(
    sinks: &Sinks,
    commands: &[Decided],
    next_offsets: &BTreeMap<i32, i64>,
) -> Result<(Outcome, usize), sqlx::Error> {
    let mut tx = sinks.pool.begin().await?;
    let partitions: Vec<i32> = next_offsets.keys().copied().collect();
    let stored = offsets::lock_and_load(&mut tx, &sinks.projection, &sinks.topic, &partitions).await?;
    let (fresh, stale): (Vec<&Decided>, Vec<&Decided>) = commands
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
    offsets::advance(&mut tx, &sinks.projection, &sinks.topic, next_offsets).await?;
    tx.commit().await?;
    Ok((outcome, stale.len()))
}

/// The memory projection as [`crate::isolate`] drives it.
pub struct MemoryApply<'a>(pub &'a Sinks);

impl Apply for MemoryApply<'_> {
    type Item = Decided;
    type Outcome = Outcome;

    fn position(item: &Decided) -> (i32, i64) {
        (item.partition, item.offset)
    }

    async fn apply(
        &self,
        items: &[Decided],
        next_offsets: &BTreeMap<i32, i64>,
    ) -> Result<(Outcome, usize), sqlx::Error> {
        apply_commands(self.0, items, next_offsets).await
    }

    fn merge(into: &mut Outcome, from: Outcome) {
        into.applied += from.applied;
        into.duplicates += from.duplicates;
        into.rejected.extend(from.rejected);
        into.changes.memories.extend(from.changes.memories);
    }
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

/// Applies the groups of [`split`] concurrently, one transaction each, the records
/// PostgreSQL refuses isolated and dead-lettered ([`crate::isolate`]); `records` are the
/// batch's records (the letters carry their bytes). If one group fails, the caller retries
/// them all: what committed is then skipped by its stored offsets.
pub async fn apply_all(
    sinks: &Sinks,
    records: &[Record],
    groups: &[Prepared],
) -> Result<Isolated<Outcome>, ApplyError> {
    let by_position = by_position(records);
    let letters = sinks.letters();
    let target = MemoryApply(sinks);
    let results = futures::future::join_all(groups.iter().map(|group| {
        isolate::apply_isolating(
            &target,
            &group.commands,
            &group.next_offsets,
            async |_: &Decided, poisoned: &Poisoned| letters.send_poisoned(&by_position, poisoned).await,
        )
    }))
    .await;
    let mut merged = Isolated::default();
    for result in results {
        let done = result?;
        MemoryApply::merge(&mut merged.outcome, done.outcome);
        merged.already_applied += done.already_applied;
        merged.poisoned.extend(done.poisoned);
        merged.transactions += done.transactions;
    }
    Ok(merged)
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
