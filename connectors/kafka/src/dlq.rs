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

/// The headers a dead letter carries: origin, error class and message, time.
pub fn letter_headers(letter: &DeadLetter<'_>) -> Vec<(&'static str, String)> {
    vec![
        (headers::DLQ_ORIGIN_TOPIC, letter.topic.to_owned()),
        (headers::DLQ_ORIGIN_PARTITION, letter.partition.to_string()),
        (headers::DLQ_ORIGIN_OFFSET, letter.offset.to_string()),
        (headers::DLQ_ERROR_CLASS, letter.error_class.to_owned()),
        (headers::DLQ_ERROR_MESSAGE, letter.error_message.to_owned()),
        (headers::DLQ_TIME, Utc::now().to_rfc3339()),
    ]
}

/// Writes `letter` to `dlq_topic` and waits for the broker's acknowledgement.
pub async fn send(
    producer: &CommandProducer,
    dlq_topic: &str,
    letter: &DeadLetter<'_>,
) -> Result<Delivered, ProduceError> {
    let key = letter.key.map(String::from_utf8_lossy).unwrap_or_default();
    let headers = letter_headers(letter);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    producer
        .send(dlq_topic, &key, letter.payload.unwrap_or_default(), &headers)
        .await
}
