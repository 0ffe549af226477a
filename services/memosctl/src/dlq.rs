//! `memosctl dlq`: inspect and redrive the dead letters the projector wrote
//! (`config.topics.dead_letter`). A dead letter is named by its own position in the
//! dead-letter topic, `PARTITION:OFFSET` (`P:O`), e.g. `0:42`.
//!
//! - `list` prints one line per dead letter: id, time, error class, origin, key, payload size,
//!   error message.
//! - `show P:O` prints everything about one: headers, key, a hex dump of the payload and what
//!   the payload decodes to today (or why it still does not).
//! - `redrive` appends the original key and value again to the origin topic (or `--to`).
//!
//! A letter is a copy (its key and value are the original's, nulls included) or a reference
//! (`memos-dlq-form: reference`: a record too large to copy; null key and value, the
//! original's size and SHA-256 in headers). For a reference, `show` and `redrive` read the
//! original from its origin topic, partition and offset and check its size and hash first; a
//! reference whose original is gone or differs is an error, never redriven.
//!
//! Guarantees:
//! - `list` and `show` never change state. They read with a consumer that is assigned the
//!   partitions explicitly, joins no group and commits nothing, from the start of each
//!   partition up to the end offsets seen when the command started, then stop; letters written
//!   meanwhile are left for the next run.
//! - `redrive` only appends. The dead letters stay where they are (the dead-letter topic is an
//!   audit trail); each copy carries [`REDRIVE_OF`] naming the letter it came from, plus the
//!   letter's `traceparent`/`tracestate` when it had them. Letters are sent in their origin
//!   order (topic, partition, offset), each acknowledged (`acks=all`) before the next, so the
//!   commands of one namespace keep their relative order; the first failed send stops the run.
//! - Redrive is idempotent from the system's point of view: the projector deduplicates by
//!   command id, so a command redriven twice (or by two operators) is applied once. A payload
//!   that still does not decode would only be dead-lettered again, as a new letter, so it is
//!   skipped unless `--force` is given.
//!
//! Exit status: 0 on success (skipped letters included), 1 on any error (a malformed `P:O`, a
//! letter that does not exist, Kafka unreachable, a failed send).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use memos_kafka::dlq::{Form, sha256_hex};
use memos_kafka::{CommandProducer, headers};
use memos_runtime::Config;
use memos_runtime::config::KafkaConfig;
use memos_schemas::MemoryCommand;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{Value, json};

/// Header on a redriven record: `<dead-letter topic>/<P:O>` of the letter it was copied from.
pub const REDRIVE_OF: &str = "memos-redrive-of";

/// Timeout of one metadata or watermark request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading the dead-letter topic up to its end offsets may take.
const READ_DEADLINE: Duration = Duration::from_secs(120);
/// Payload bytes `show` dumps.
const HEX_LIMIT: usize = 512;
/// Characters of the error message in the `list` table.
const MESSAGE_WIDTH: usize = 60;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// One line per dead letter, oldest first, read up to the end offsets seen at start.
    List {
        /// Only the N most recent letters (after --class).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Only letters of this error class (`not_avro`, `unknown_schema`, `malformed`, `invalid`, `empty`, `unstorable`).
        #[arg(long, value_name = "C")]
        class: Option<String>,
        /// One JSON object per line (full error message) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter: headers, key, payload hex dump, decoding today.
    Show {
        /// The letter's position in the dead-letter topic, PARTITION:OFFSET.
        #[arg(value_name = "P:O")]
        id: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Appends dead letters' original key and value again to their origin topic.
    Redrive {
        /// Letters to redrive, PARTITION:OFFSET each.
        #[arg(value_name = "P:O", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every letter up to the end offsets seen at start.
        #[arg(long)]
        all: bool,
        /// With --all: only letters of this error class.
        #[arg(long, value_name = "C", requires = "all")]
        class: Option<String>,
        /// Print what would be redriven; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Redrive letters whose payload still does not decode (they will dead-letter again).
        #[arg(long)]
        force: bool,
        /// Append to this topic instead of each letter's origin topic.
        #[arg(long, value_name = "TOPIC")]
        to: Option<String>,
    },
}

pub async fn run(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { limit, class, json } => list(config, limit, class, json).await,
        DlqCommand::Show { id, json } => show(config, &id, json).await,
        DlqCommand::Redrive {
            ids,
            all,
            class,
            dry_run,
            force,
            to,
        } => {
            let options = RedriveOptions { dry_run, force, to };
            redrive(config, ids, all, class, options).await
        }
    }
}

/// `PARTITION:OFFSET`, both non-negative integers.
fn parse_id(text: &str) -> anyhow::Result<(i32, i64)> {
    let invalid = || anyhow::anyhow!("invalid dead letter id {text:?}: expected PARTITION:OFFSET, e.g. 0:42");
    let (partition, offset) = text.split_once(':').ok_or_else(invalid)?;
    let partition: i32 = partition.trim().parse().map_err(|_| invalid())?;
    let offset: i64 = offset.trim().parse().map_err(|_| invalid())?;
    if partition < 0 || offset < 0 {
        return Err(invalid());
    }
    Ok((partition, offset))
}

/// A record's key and value, `None` being a Kafka null.
type Original = (Option<Vec<u8>>, Option<Vec<u8>>);

/// One record of the dead-letter topic.
struct Letter {
    partition: i32,
    offset: i64,
    /// The Kafka record timestamp, Unix milliseconds.
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    /// A reference's original (key, value), once read from its origin by [`resolve`].
    original: Option<Original>,
}

impl Letter {
    fn from_message(message: &impl Message) -> Letter {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Letter {
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            original: None,
        }
    }

    /// A copy unless the letter says it is a reference (letters written before references
    /// existed have no form header and are copies).
    fn form(&self) -> Form {
        match self.header(headers::DLQ_FORM).as_deref() {
            Some("reference") => Form::Reference,
            _ => Form::Copy,
        }
    }

    /// The original key: the letter's own for a copy, the resolved one for a reference.
    fn original_key(&self) -> Option<&[u8]> {
        match &self.original {
            Some((key, _)) => key.as_deref(),
            None => self.key.as_deref(),
        }
    }

    /// The original value, as [`original_key`](Self::original_key).
    fn original_payload(&self) -> Option<&[u8]> {
        match &self.original {
            Some((_, payload)) => payload.as_deref(),
            None => self.payload.as_deref(),
        }
    }

    /// Checks that `key` and `payload` are the original a reference names (size and hash).
    fn verify_original(&self, key: Option<&[u8]>, payload: Option<&[u8]>) -> anyhow::Result<()> {
        let check = |what: &str, bytes: Option<&[u8]>, size: &str, hash: &str| -> anyhow::Result<()> {
            let (size, hash) = (self.header(size), self.header(hash));
            let found = bytes.map(|b| (b.len().to_string(), sha256_hex(b)));
            let expected = size.zip(hash);
            anyhow::ensure!(
                found == expected,
                "the record at the origin of reference {} is not the one dead-lettered: its {what} has (size, sha-256) {found:?}, the letter names {expected:?}",
                self.id()
            );
            Ok(())
        };
        check(
            "value",
            payload,
            headers::DLQ_ORIGIN_SIZE,
            headers::DLQ_ORIGIN_SHA256,
        )?;
        check(
            "key",
            key,
            headers::DLQ_ORIGIN_KEY_SIZE,
            headers::DLQ_ORIGIN_KEY_SHA256,
        )
    }

    fn id(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn class(&self) -> Option<String> {
        self.header(headers::DLQ_ERROR_CLASS)
    }

    fn origin_topic(&self) -> Option<String> {
        self.header(headers::DLQ_ORIGIN_TOPIC)
    }

    fn origin_partition(&self) -> Option<i32> {
        self.header(headers::DLQ_ORIGIN_PARTITION)?.parse().ok()
    }

    fn origin_offset(&self) -> Option<i64> {
        self.header(headers::DLQ_ORIGIN_OFFSET)?.parse().ok()
    }

    /// When it was dead-lettered: the header, else the record timestamp (RFC 3339).
    fn time(&self) -> Option<String> {
        self.header(headers::DLQ_TIME).or_else(|| {
            self.timestamp
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .map(|t| t.to_rfc3339())
        })
    }

    fn key_text(&self) -> Option<String> {
        self.original_key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }

    /// Size of the original value: the letter's own, or the one a reference names.
    fn payload_len(&self) -> usize {
        match self.form() {
            Form::Reference if self.original.is_none() => self
                .header(headers::DLQ_ORIGIN_SIZE)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => self.original_payload().map_or(0, <[u8]>::len),
        }
    }

    fn decode(&self) -> Result<MemoryCommand, memos_schemas::DecodeError> {
        MemoryCommand::decode(self.original_payload().unwrap_or_default())
    }
}

/// A consumer that is assigned partitions explicitly and never commits. librdkafka needs a
/// `group.id` for `assign`, but a consumer that neither subscribes nor commits never creates
/// the group on the broker.
fn reader(kafka: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    let mut config = memos_kafka::client::base_config(kafka, "memosctl");
    config
        .set("group.id", "memosctl-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .set("auto.offset.reset", "earliest");
    Ok(config.create()?)
}

/// The partitions of `topic` with their (low, high) watermarks; `None` if the topic does not exist.
fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Option<Vec<(i32, i64, i64)>>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if found.partitions().is_empty() {
        return Ok(None);
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, TIMEOUT)
                .with_context(|| format!("cannot read the offsets of {topic} partition {p}"))?;
            Ok((p, low, high))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

/// Reads `[start, end)` of each `(partition, start, end)` of `topic` and hands every record
/// to `each`; returns once every range is read.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    mut each: impl FnMut(Letter),
) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    let mut pending: HashMap<i32, (i64, i64)> = HashMap::new();
    for &(partition, start, end) in ranges.iter().filter(|(_, start, end)| start < end) {
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        pending.insert(partition, (start, end));
    }
    if pending.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + READ_DEADLINE;
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let partition = message.partition();
                let Some(&(start, end)) = pending.get(&partition) else {
                    continue;
                };
                if (start..end).contains(&message.offset()) {
                    each(Letter::from_message(&message));
                }
                if message.offset() + 1 >= end {
                    pending.remove(&partition);
                }
            }
            // The end of the log: nothing below the captured end offset is left.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("cannot read {topic}")),
            None => {}
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "reading {topic} did not reach the end offsets seen at start within {READ_DEADLINE:?}"
            );
        }
    }
    consumer.unassign()?;
    Ok(())
}

/// Every letter of `topic` up to the end offsets seen now, oldest first.
fn read_all(kafka: &KafkaConfig, topic: &str, keep: impl Fn(&Letter) -> bool) -> anyhow::Result<Vec<Letter>> {
    let consumer = reader(kafka)?;
    let Some(partitions) = watermarks(&consumer, topic)? else {
        eprintln!("dead-letter topic {topic} does not exist: no dead letters");
        return Ok(Vec::new());
    };
    let mut letters = Vec::new();
    scan(&consumer, topic, &partitions, |letter| {
        if keep(&letter) {
            letters.push(letter);
        }
    })?;
    letters.sort_by_key(|l| (l.timestamp, l.partition, l.offset));
    Ok(letters)
}

/// The letters at `ids`, in the order given; fails if any does not exist.
fn read_ids(kafka: &KafkaConfig, topic: &str, ids: &[(i32, i64)]) -> anyhow::Result<Vec<Letter>> {
    let consumer = reader(kafka)?;
    let partitions =
        watermarks(&consumer, topic)?.with_context(|| format!("dead-letter topic {topic} does not exist"))?;
    let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for &(partition, offset) in ids {
        let Some(&(_, low, high)) = partitions.iter().find(|(p, _, _)| *p == partition) else {
            anyhow::bail!(
                "no dead letter {partition}:{offset}: {topic} has no partition {partition} (it has {} partitions)",
                partitions.len()
            );
        };
        if low >= high {
            anyhow::bail!("no dead letter {partition}:{offset}: partition {partition} of {topic} is empty");
        }
        if offset < low || offset >= high {
            anyhow::bail!(
                "no dead letter {partition}:{offset}: partition {partition} of {topic} holds offsets {low} to {}",
                high - 1
            );
        }
        let range = ranges.entry(partition).or_insert((offset, offset + 1));
        range.0 = range.0.min(offset);
        range.1 = range.1.max(offset + 1);
    }
    let ranges: Vec<(i32, i64, i64)> = ranges.into_iter().map(|(p, (s, e))| (p, s, e)).collect();
    let mut found: HashMap<(i32, i64), Letter> = HashMap::new();
    scan(&consumer, topic, &ranges, |letter| {
        if ids.contains(&(letter.partition, letter.offset)) {
            found.insert((letter.partition, letter.offset), letter);
        }
    })?;
    let mut letters = Vec::new();
    for id in ids {
        let letter = found
            .remove(id)
            .with_context(|| format!("no dead letter {}:{} in {topic} (compacted away?)", id.0, id.1))?;
        letters.push(letter);
    }
    Ok(letters)
}

/// Reads the original of every reference among `letters` from its origin, checking its size
/// and hash; fails when one is gone from the log or differs.
fn resolve(kafka: &KafkaConfig, letters: &mut [Letter]) -> anyhow::Result<()> {
    let mut wanted: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for letter in letters.iter().filter(|l| l.form() == Form::Reference) {
        let (Some(topic), Some(partition), Some(offset)) = (
            letter.origin_topic(),
            letter.origin_partition(),
            letter.origin_offset(),
        ) else {
            anyhow::bail!(
                "reference {} does not name its origin (topic, partition, offset)",
                letter.id()
            );
        };
        wanted.entry(topic).or_default().push((partition, offset));
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let consumer = reader(kafka)?;
    let mut found: HashMap<(String, i32, i64), Letter> = HashMap::new();
    for (topic, positions) in &wanted {
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for &(partition, offset) in positions {
            let range = ranges.entry(partition).or_insert((offset, offset + 1));
            range.0 = range.0.min(offset);
            range.1 = range.1.max(offset + 1);
        }
        let ranges: Vec<(i32, i64, i64)> = ranges.into_iter().map(|(p, (s, e))| (p, s, e)).collect();
        scan(&consumer, topic, &ranges, |record| {
            if positions.contains(&(record.partition, record.offset)) {
                found.insert((topic.clone(), record.partition, record.offset), record);
            }
        })?;
    }
    for letter in letters.iter_mut().filter(|l| l.form() == Form::Reference) {
        let origin = (
            letter.origin_topic().unwrap_or_default(),
            letter.origin_partition().unwrap_or_default(),
            letter.origin_offset().unwrap_or_default(),
        );
        let record = found.remove(&origin).with_context(|| {
            format!(
                "the original of reference {} ({}/{}:{}) is no longer in the log",
                letter.id(),
                origin.0,
                origin.1,
                origin.2
            )
        })?;
        letter.verify_original(record.key.as_deref(), record.payload.as_deref())?;
        letter.original = Some((record.key, record.payload));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[derive(Serialize)]
struct ListRow {
    id: String,
    partition: i32,
    offset: i64,
    time: Option<String>,
    error_class: Option<String>,
    origin_topic: Option<String>,
    origin_partition: Option<i32>,
    origin_offset: Option<i64>,
    key: Option<String>,
    /// `copy` or `reference`.
    form: &'static str,
    payload_bytes: usize,
    error_message: Option<String>,
}

impl ListRow {
    fn of(letter: &Letter) -> ListRow {
        ListRow {
            id: letter.id(),
            partition: letter.partition,
            offset: letter.offset,
            time: letter.time(),
            error_class: letter.class(),
            origin_topic: letter.origin_topic(),
            origin_partition: letter.origin_partition(),
            origin_offset: letter.origin_offset(),
            key: letter.key_text(),
            form: letter.form().as_str(),
            payload_bytes: letter.payload_len(),
            error_message: letter.header(headers::DLQ_ERROR_MESSAGE),
        }
    }
}

async fn list(
    config: &Config,
    limit: Option<usize>,
    class: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    let topic = config.topics.dead_letter.clone();
    let mut letters = blocking(move || {
        read_all(&kafka, &topic, |l| {
            class.as_deref().is_none_or(|c| l.class().as_deref() == Some(c))
        })
    })
    .await?;
    if let Some(limit) = limit {
        letters.drain(..letters.len().saturating_sub(limit));
    }
    let rows: Vec<ListRow> = letters.iter().map(ListRow::of).collect();
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    let origin = |r: &ListRow| {
        format!(
            "{}/{}:{}",
            r.origin_topic.as_deref().unwrap_or("?"),
            r.origin_partition.map_or("?".into(), |p| p.to_string()),
            r.origin_offset.map_or("?".into(), |o| o.to_string()),
        )
    };
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.time.as_deref().map_or("?".into(), short_time),
                r.error_class.clone().unwrap_or_else(|| "?".into()),
                origin(r),
                truncate(&printable(r.key.as_deref().unwrap_or("")), 24),
                if r.form == "reference" {
                    format!("{} (ref)", r.payload_bytes)
                } else {
                    r.payload_bytes.to_string()
                },
                truncate(
                    &printable(r.error_message.as_deref().unwrap_or("")),
                    MESSAGE_WIDTH,
                ),
            ]
        })
        .collect();
    let titles = ["ID", "TIME", "CLASS", "ORIGIN", "KEY", "BYTES", "ERROR"];
    let mut widths = titles.map(|t| t.chars().count());
    for row in &table {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        format!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:<w4$}  {:>w5$}  {}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4],
            w5 = widths[5],
        )
    };
    println!("{}", line(titles));
    for row in &table {
        println!("{}", line(std::array::from_fn(|i| row[i].as_str())));
    }
    Ok(())
}

/// `2026-01-02 03:04:05` (UTC) from RFC 3339, or the text as it is.
fn short_time(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| rfc3339.to_owned())
}

/// Control characters (newlines in error messages, binary keys) shown as spaces.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// `hexdump -C` style: offset, 16 bytes in hex, the printable ASCII.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let mut hex = String::new();
        for i in 0..16 {
            if i == 8 {
                hex.push(' ');
            }
            match chunk.get(i) {
                Some(b) => hex.push_str(&format!("{b:02x} ")),
                None => hex.push_str("   "),
            }
        }
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:08x}  {hex} |{ascii}|\n", row * 16));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The decoded command as JSON: `{"schema": <Avro full name>, "command": {...}}`.
fn command_json(command: &MemoryCommand) -> anyhow::Result<Value> {
    let body = match command {
        MemoryCommand::Write(c) => serde_json::to_value(c),
        MemoryCommand::Update(c) => serde_json::to_value(c),
        MemoryCommand::Forget(c) => serde_json::to_value(c),
        MemoryCommand::Share(c) => serde_json::to_value(c),
        MemoryCommand::Revoke(c) => serde_json::to_value(c),
        MemoryCommand::RegisterTool(c) => serde_json::to_value(c),
    }?;
    Ok(json!({"schema": command.kind().full_name(), "command": body}))
}

async fn show(config: &Config, id: &str, json: bool) -> anyhow::Result<()> {
    let position = parse_id(id)?;
    let kafka = config.kafka.clone();
    let topic = config.topics.dead_letter.clone();
    let letter = {
        let topic = topic.clone();
        blocking(move || {
            let mut letters = read_ids(&kafka, &topic, &[position])?;
            resolve(&kafka, &mut letters)?;
            Ok(letters)
        })
        .await?
        .pop()
        .context("letter read")?
    };
    let payload = letter.original_payload().unwrap_or_default();
    let shown = &payload[..payload.len().min(HEX_LIMIT)];
    let decoded = letter.decode();
    if json {
        let headers: serde_json::Map<String, Value> = letter
            .headers
            .iter()
            .map(|(k, v)| {
                let value = v.as_deref().map_or(Value::Null, |v| {
                    Value::String(String::from_utf8_lossy(v).into_owned())
                });
                (k.clone(), value)
            })
            .collect();
        let (command, error) = match &decoded {
            Ok(command) => (command_json(command)?, Value::Null),
            Err(e) => (Value::Null, json!({"class": e.class(), "message": e.to_string()})),
        };
        let out = json!({
            "id": letter.id(),
            "topic": topic,
            "partition": letter.partition,
            "offset": letter.offset,
            "timestamp_ms": letter.timestamp,
            "headers": headers,
            "form": letter.form().as_str(),
            "key": letter.key_text(),
            "key_null": letter.original_key().is_none(),
            "payload_null": letter.original_payload().is_none(),
            "payload_bytes": payload.len(),
            "payload_hex": hex(shown),
            "payload_hex_truncated": shown.len() < payload.len(),
            "decoded": command,
            "decode_error": error,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("dead letter  {topic}/{}", letter.id());
    if let Some(ms) = letter.timestamp {
        let time = DateTime::<Utc>::from_timestamp_millis(ms).map_or(ms.to_string(), |t| t.to_rfc3339());
        println!("record time  {time}");
    }
    println!("headers");
    let width = letter.headers.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &letter.headers {
        let value = value
            .as_deref()
            .map_or("(null)".into(), |v| String::from_utf8_lossy(v).into_owned());
        println!("  {key:<width$}  {value}");
    }
    if letter.form() == Form::Reference {
        println!(
            "form         reference: the original is read from {}/{}:{} (size and sha-256 checked)",
            letter.origin_topic().unwrap_or_default(),
            letter.origin_partition().unwrap_or_default(),
            letter.origin_offset().unwrap_or_default()
        );
    }
    match letter.key_text() {
        Some(key) => println!("key          {key:?}"),
        None => println!("key          (null)"),
    }
    if letter.original_payload().is_none() {
        println!("payload      (null)");
    } else if shown.len() < payload.len() {
        println!("payload      {} bytes, first {HEX_LIMIT}:", payload.len());
    } else {
        println!("payload      {} bytes:", payload.len());
    }
    print!("{}", hex_dump(shown));
    match &decoded {
        Ok(command) => {
            println!("decodes now  yes, as {}:", command.kind().full_name());
            println!("{command:#?}");
        }
        Err(e) => println!("decodes now  no: {}: {e}", e.class()),
    }
    Ok(())
}

struct RedriveOptions {
    dry_run: bool,
    force: bool,
    to: Option<String>,
}

async fn redrive(
    config: &Config,
    ids: Vec<String>,
    all: bool,
    class: Option<String>,
    options: RedriveOptions,
) -> anyhow::Result<()> {
    let dlq_topic = config.topics.dead_letter.clone();
    let kafka = config.kafka.clone();
    let mut letters = if all {
        let topic = dlq_topic.clone();
        blocking(move || {
            read_all(&kafka, &topic, |l| {
                class.as_deref().is_none_or(|c| l.class().as_deref() == Some(c))
            })
        })
        .await?
    } else {
        let mut positions = Vec::new();
        for id in &ids {
            let position = parse_id(id)?;
            if !positions.contains(&position) {
                positions.push(position);
            }
        }
        let topic = dlq_topic.clone();
        blocking(move || read_ids(&kafka, &topic, &positions)).await?
    };
    let kafka = config.kafka.clone();
    letters = blocking(move || {
        resolve(&kafka, &mut letters)?;
        Ok(letters)
    })
    .await?;
    letters.sort_by_key(|l| {
        (
            l.origin_topic(),
            l.origin_partition(),
            l.origin_offset(),
            l.partition,
            l.offset,
        )
    });
    let producer = if options.dry_run {
        None
    } else {
        // Originals may be as large as their topic allowed, more than librdkafka's default.
        let largest = letters
            .iter()
            .map(|l| l.original_key().map_or(0, <[u8]>::len) + l.original_payload().map_or(0, <[u8]>::len))
            .max()
            .unwrap_or(0);
        let max = memos_kafka::admin::dead_letter_max_bytes(&config.topics)
            .max(largest + memos_kafka::dlq::LETTER_OVERHEAD_BYTES);
        Some(CommandProducer::with_max_message_bytes(&config.kafka, Some(max))?)
    };
    let (mut redriven, mut skipped) = (0usize, 0usize);
    for letter in &letters {
        let id = letter.id();
        let Some(target) = options.to.clone().or_else(|| letter.origin_topic()) else {
            println!(
                "skipped {id}: it has no {} header; name a topic with --to",
                headers::DLQ_ORIGIN_TOPIC
            );
            skipped += 1;
            continue;
        };
        if target == dlq_topic {
            println!("skipped {id}: its target is the dead-letter topic {dlq_topic} itself");
            skipped += 1;
            continue;
        }
        let what = match letter.decode() {
            Ok(command) => format!("{} {}", command.kind().full_name(), command.command_id()),
            Err(e) if options.force => format!("undecodable, {}, forced", e.class()),
            Err(e) => {
                println!(
                    "skipped {id}: still does not decode ({}: {e}); --force redrives it anyway",
                    e.class()
                );
                skipped += 1;
                continue;
            }
        };
        let redrive_of = format!("{dlq_topic}/{id}");
        let mut record_headers: Vec<(&str, String)> = vec![(REDRIVE_OF, redrive_of)];
        for name in [headers::TRACEPARENT, headers::TRACESTATE] {
            if let Some(value) = letter.header(name) {
                record_headers.push((name, value));
            }
        }
        let Some(producer) = &producer else {
            println!("would redrive {id} -> {target} ({what})");
            redriven += 1;
            continue;
        };
        let pairs: Vec<(&str, &str)> = record_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // The original bytes exactly: a null key or value stays null.
        let delivered = producer
            .send_bytes(&target, letter.original_key(), letter.original_payload(), &pairs)
            .await
            .with_context(|| {
                format!("redriving {id} to {target} failed after {redriven} redriven; stopped")
            })?;
        println!(
            "redriven {id} -> {target} {}:{} ({what})",
            delivered.partition, delivered.offset
        );
        redriven += 1;
    }
    if options.dry_run {
        println!("dry run: would redrive {redriven}, skipped {skipped}");
    } else {
        println!("redriven {redriven}, skipped {skipped}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_reject_garbage() {
        assert_eq!(parse_id("0:42").unwrap(), (0, 42));
        assert_eq!(parse_id("12:0").unwrap(), (12, 0));
        for bad in ["", "0", "0:", ":1", "a:1", "1:b", "-1:0", "0:-3", "0:1:2"] {
            let err = parse_id(bad).unwrap_err().to_string();
            assert!(err.contains("PARTITION:OFFSET"), "{bad}: {err}");
        }
    }

    #[test]
    fn hex_dump_shows_offsets_hex_and_ascii() {
        let dump = hex_dump(b"this is not avro!");
        let lines: Vec<&str> = dump.lines().collect();
        assert_eq!(
            lines[0],
            "00000000  74 68 69 73 20 69 73 20  6e 6f 74 20 61 76 72 6f  |this is not avro|"
        );
        assert!(lines[1].starts_with("00000010  21 "), "{}", lines[1]);
        assert!(lines[1].ends_with("|!|"), "{}", lines[1]);
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("0123456789abc", 10), "012345678…");
        assert_eq!(printable("a\nb"), "a b");
    }
}
