//! Dead letters. A record that cannot be applied is copied, key and value untouched, to the
//! dead-letter topic with headers naming its origin and the reason, then the pipeline moves
//! on. The copy is acknowledged before the caller commits past the original's offset, so a
//! crash in between yields at most a second copy, never a lost record.

use chrono::Utc;

use crate::headers;
use crate::producer::{CommandProducer, Delivered, ProduceError};

/// A record that could not be applied, and why.
pub struct DeadLetter<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Stable class for metrics and filtering: `not_avro`, `unknown_schema`, `invalid`, ...
    pub error_class: &'a str,
    pub error_message: &'a str,
}

/// Writes `letter` to `dlq_topic` and waits for the broker's acknowledgement.
pub async fn send(
    producer: &CommandProducer,
    dlq_topic: &str,
    letter: &DeadLetter<'_>,
) -> Result<Delivered, ProduceError> {
    let partition = letter.partition.to_string();
    let offset = letter.offset.to_string();
    let time = Utc::now().to_rfc3339();
    let key = letter.key.map(String::from_utf8_lossy).unwrap_or_default();
    producer
        .send(
            dlq_topic,
            &key,
            letter.payload.unwrap_or_default(),
            &[
                (headers::DLQ_ORIGIN_TOPIC, letter.topic),
                (headers::DLQ_ORIGIN_PARTITION, &partition),
                (headers::DLQ_ORIGIN_OFFSET, &offset),
                (headers::DLQ_ERROR_CLASS, letter.error_class),
                (headers::DLQ_ERROR_MESSAGE, letter.error_message),
                (headers::DLQ_TIME, &time),
            ],
        )
        .await
}
