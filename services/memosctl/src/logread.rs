//! Reading a slice of a command topic straight from Kafka, for the auditors' commands
//! (`audit --from-log`, `export`, `replay`).
//!
//! Guarantees: the reader is assigned partitions explicitly, joins no group and commits
//! nothing, so reading never changes what any consumer group sees. A slice is fixed when the
//! command starts: per partition, from the first offset whose timestamp is at or after `from`
//! (Kafka's `offsets_for_times`, or the log start) up to the end offset seen at start (or the
//! first offset at or after `to`); records appended meanwhile are left out. Within a
//! partition records arrive in log order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use memos_runtime::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// Timeout of one metadata, watermark or offsets-for-times request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time without any record while the slice is not read completely.
const STALL: Duration = Duration::from_secs(60);

/// One record of the log, detached from the consumer.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The record timestamp, Unix milliseconds.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl LogRecord {
    fn from_message(message: &impl Message) -> LogRecord {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        LogRecord {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// A header's value as text (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn time(&self) -> Option<DateTime<Utc>> {
        self.timestamp_ms.and_then(DateTime::<Utc>::from_timestamp_millis)
    }
}

/// One partition's part of a slice: offsets `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// A consumer that is assigned partitions explicitly and never commits. librdkafka needs a
/// `group.id` for `assign`, but a consumer that neither subscribes nor commits never creates
/// the group on the broker.
pub fn reader(kafka: &KafkaConfig) -> anyhow::Result<BaseConsumer> {
    let mut config = memos_kafka::client::base_config(kafka, "memosctl");
    config
        .set("group.id", "memosctl-log-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "67108864")
        .set("max.partition.fetch.bytes", "16777216")
        .set("queued.min.messages", "200000");
    Ok(config.create()?)
}

/// The partitions of `topic` with their (low, high) watermarks, sorted by partition.
pub fn watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("E_KAFKA: cannot read the metadata of topic {topic}"))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && !t.partitions().is_empty())
        .with_context(|| format!("E_NO_TOPIC: topic {topic} does not exist"))?;
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, TIMEOUT)
                .with_context(|| format!("E_KAFKA: cannot read the offsets of {topic} partition {p}"))?;
            Ok((p, low, high))
        })
        .collect()
}

/// First offset of each partition whose timestamp is at or after `at`; `None` for a
/// partition with no such record.
fn offsets_for_time(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    at: DateTime<Utc>,
) -> anyhow::Result<HashMap<i32, Option<i64>>> {
    let mut query = TopicPartitionList::new();
    for &p in partitions {
        query.add_partition_offset(topic, p, Offset::Offset(at.timestamp_millis()))?;
    }
    let answer = consumer
        .offsets_for_times(query, TIMEOUT)
        .with_context(|| format!("E_KAFKA: offsets_for_times on {topic} failed"))?;
    Ok(answer
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// The slice of `topic` between the times `from` (inclusive) and `to` (exclusive), as
/// offsets per partition fixed now. Record timestamps are CreateTime set by producers, so
/// they are not strictly monotonic: callers that need an exact time window also filter
/// by each record's own timestamp.
pub fn ranges_between(
    consumer: &BaseConsumer,
    topic: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<Range>> {
    let marks = watermarks(consumer, topic)?;
    let partitions: Vec<i32> = marks.iter().map(|(p, _, _)| *p).collect();
    let starts = match from {
        Some(at) => Some(offsets_for_time(consumer, topic, &partitions, at)?),
        None => None,
    };
    let ends = match to {
        Some(at) => Some(offsets_for_time(consumer, topic, &partitions, at)?),
        None => None,
    };
    Ok(marks
        .into_iter()
        .map(|(partition, low, high)| {
            let start = match &starts {
                Some(s) => s.get(&partition).copied().flatten().unwrap_or(high),
                None => low,
            };
            let end = match &ends {
                Some(e) => e.get(&partition).copied().flatten().unwrap_or(high),
                None => high,
            };
            Range {
                partition,
                start: start.max(low),
                end: end.min(high),
            }
        })
        .collect())
}

/// Reads every range of `topic` and hands each record to `each`, in log order within a
/// partition; returns once every range is read. `each` may stop the read early by returning
/// `false`.
pub fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[Range],
    mut each: impl FnMut(LogRecord) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    let mut pending: HashMap<i32, Range> = HashMap::new();
    for range in ranges.iter().filter(|r| r.start < r.end) {
        assignment.add_partition_offset(topic, range.partition, Offset::Offset(range.start))?;
        pending.insert(range.partition, *range);
    }
    if pending.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let mut last_progress = Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                last_progress = Instant::now();
                let partition = message.partition();
                let Some(range) = pending.get(&partition).copied() else {
                    continue;
                };
                if (range.start..range.end).contains(&message.offset())
                    && !each(LogRecord::from_message(&message))?
                {
                    break;
                }
                if message.offset() + 1 >= range.end {
                    pending.remove(&partition);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("E_KAFKA: cannot read {topic}")),
            None => {}
        }
        if last_progress.elapsed() > STALL {
            anyhow::bail!("E_KAFKA: reading {topic} made no progress for {STALL:?}");
        }
    }
    consumer.unassign()?;
    Ok(())
}

/// Parses an RFC 3339 time given on the command line.
pub fn parse_time(name: &str, text: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            anyhow::anyhow!(
                "E_ARGUMENT: --{name} {text:?} is not an RFC 3339 time (e.g. 2026-01-02T03:04:05Z)"
            )
        })
}
