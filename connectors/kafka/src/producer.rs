//! The command producer. Idempotent (`enable.idempotence=true`, hence `acks=all`): a send
//! resolves only after every in-sync replica has the record, and librdkafka's own retries
//! never duplicate or reorder it within a partition.

use std::time::{Duration, Instant};

use memos_runtime::config::KafkaConfig;
use memos_runtime::metrics as m;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::client::base_config;

/// Where the broker stored a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// Why a record was not appended.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The broker refused the record for its size; retrying cannot help.
    #[error("record too large for the broker: {0}")]
    TooLarge(KafkaError),
    /// The broker refused this client's principal (authentication, or no WRITE on the topic
    /// by its ACLs): a configuration error; retrying cannot help until an operator fixes it.
    #[error("the broker refused this client's principal: {0}")]
    NotAuthorized(KafkaError),
    /// The broker could not be reached or did not acknowledge in time; a retry may succeed.
    #[error("broker did not acknowledge: {0}")]
    Unavailable(KafkaError),
}

#[derive(Clone)]
pub struct CommandProducer {
    inner: FutureProducer,
}

impl CommandProducer {
    pub fn new(kafka: &KafkaConfig) -> anyhow::Result<Self> {
        Self::with_max_message_bytes(kafka, None)
    }

    /// A producer whose records may be up to `max_message_bytes` (librdkafka
    /// `message.max.bytes`; its default is 1,000,000): the dead-letter producer is given the
    /// dead-letter topic's limit ([`crate::admin::dead_letter_max_bytes`]) so that a copy the
    /// topic accepts is not refused locally first. Raw properties still win.
    pub fn with_max_message_bytes(
        kafka: &KafkaConfig,
        max_message_bytes: Option<usize>,
    ) -> anyhow::Result<Self> {
        let mut config = base_config(kafka, "producer");
        if let Some(max) = max_message_bytes {
            config.set("message.max.bytes", max.to_string());
        }
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "2")
            .set(
                "delivery.timeout.ms",
                kafka.delivery_timeout.as_millis().to_string(),
            );
        for (key, value) in &kafka.properties {
            config.set(key, value);
        }
        Ok(CommandProducer {
            inner: config.create()?,
        })
    }

    /// Appends one record and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Delivered, ProduceError> {
        self.send_bytes(topic, Some(key.as_bytes()), Some(payload), headers)
            .await
    }

    /// [`send`](Self::send) with raw key and value bytes, `None` being a Kafka null (a dead
    /// letter keeps the original's nulls).
    pub async fn send_bytes(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Delivered, ProduceError> {
        let headers = headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        let payload_len = payload.map_or(0, <[u8]>::len);
        let start = Instant::now();
        let sent = self.inner.send(record, Timeout::Never);
        metrics::gauge!(m::PRODUCER_QUEUE).set(f64::from(self.inner.in_flight_count()));
        let result = sent.await;
        metrics::gauge!(m::PRODUCER_QUEUE).set(f64::from(self.inner.in_flight_count()));
        match result {
            Ok(delivery) => {
                let topic = topic.to_owned();
                metrics::histogram!(m::PRODUCER_SECONDS, "topic" => topic.clone())
                    .record(start.elapsed().as_secs_f64());
                metrics::counter!(m::PRODUCER_RECORDS, "topic" => topic.clone()).increment(1);
                metrics::counter!(m::PRODUCER_BYTES, "topic" => topic).increment(payload_len as u64);
                Ok(Delivered {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            Err((e, _)) => {
                let error = classify(e);
                let kind = match error {
                    ProduceError::TooLarge(_) => "too_large",
                    ProduceError::NotAuthorized(_) => "not_authorized",
                    ProduceError::Unavailable(_) => "unavailable",
                };
                metrics::counter!(m::PRODUCER_ERRORS, "topic" => topic.to_owned(), "kind" => kind)
                    .increment(1);
                Err(error)
            }
        }
    }

    /// Waits until every record in flight is acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }

    /// Records waiting in librdkafka's queue.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Asks a broker, through this producer's own client (no new connection per call), for
    /// the metadata of `topic`, and checks that a send could be acknowledged: the topic
    /// exists and every partition has a leader. Blocks for at most `timeout`: call it from a
    /// blocking thread.
    pub fn check_topic(&self, topic: &str, timeout: Duration) -> Result<TopicHealth, KafkaError> {
        let metadata = self.inner.client().fetch_metadata(Some(topic), timeout)?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Ok(TopicHealth::default());
        };
        if found.error().is_some() {
            return Ok(TopicHealth::default());
        }
        Ok(TopicHealth {
            partitions: found.partitions().len(),
            without_leader: found
                .partitions()
                .iter()
                .filter(|p| p.leader() < 0 || p.error().is_some())
                .count(),
        })
    }
}

/// What the broker said about a command topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicHealth {
    /// 0 when the topic does not exist.
    pub partitions: usize,
    /// Partitions that have no leader now: sends to them cannot be acknowledged.
    pub without_leader: usize,
}

impl TopicHealth {
    pub fn writable(&self) -> bool {
        self.partitions > 0 && self.without_leader == 0
    }
}

fn classify(e: KafkaError) -> ProduceError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize) => {
            ProduceError::TooLarge(e)
        }
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => ProduceError::NotAuthorized(e),
        _ => ProduceError::Unavailable(e),
    }
}
