//! Dead letters. A record that cannot be applied is written to the dead-letter topic with
//! headers naming its origin and the reason, then the pipeline moves on. The letter is
//! acknowledged before the caller commits past the original's offset, so a crash in between
//! yields at most a second letter, never a lost record.
//!
//! Guarantee (a dead letter always fits): a letter is a **copy** (header
//! `memos-dlq-form: copy`, or no form header, as written before references existed) whose
//! key and value are the original's bytes exactly, a null key or value staying null, when
//! that copy fits the dead-letter limit; otherwise it is a **reference** (`memos-dlq-form:
//! reference`) with a null key and value whose headers give the original's size and SHA-256
//! (value, and key when it has one): the original stays in its topic at the origin offset,
//! which command topics keep forever. When the broker refuses a copy for its size anyway (a
//! topic configured below [`crate::admin`]'s limits), the reference is sent instead; a
//! reference is a few hundred bytes, so a letter is never retried forever for its size.

use chrono::Utc;
use sha2::{Digest, Sha256};

use crate::headers;
use crate::producer::{CommandProducer, Delivered, ProduceError};

/// Longest error message a letter carries, in bytes (longer ones are cut at a character
/// boundary): the reason must never be what makes a letter too large.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// What a letter's headers may add to the original, at most: the origin, a cut error
/// message, the time and Kafka's per-header framing, with room to spare. The dead-letter
/// topic accepts records this much larger than the command topics (see [`crate::admin`]).
pub const LETTER_OVERHEAD_BYTES: usize = 16 * 1024;

/// A record that could not be applied, and why.
pub struct DeadLetter<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Stable class for metrics and filtering: `not_avro`, `unknown_schema`, `invalid`,
    /// `unstorable`, ...
    pub error_class: &'a str,
    pub error_message: &'a str,
}

/// How a letter holds the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The original key and value bytes.
    Copy,
    /// Origin, size and hash only; the original is read from its topic.
    Reference,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Copy => "copy",
            Form::Reference => "reference",
        }
    }
}

/// A letter ready to append: key and value as they go on the wire (`None` is a Kafka null).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    pub form: Form,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

impl Composed {
    /// Bytes of key, value and headers (names, values and Kafka's per-header varints):
    /// what the broker's size limit is measured against, before batch framing.
    pub fn wire_bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + headers + 64
    }
}

/// `message` cut to [`MAX_ERROR_MESSAGE_BYTES`] at a character boundary.
fn cut(message: &str) -> String {
    if message.len() <= MAX_ERROR_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_ERROR_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The headers a dead letter carries: origin, error class and message, time. A copy's
/// headers; [`reference`] adds the form, sizes and hashes.
pub fn letter_headers(letter: &DeadLetter<'_>) -> Vec<(&'static str, String)> {
    vec![
        (headers::DLQ_ORIGIN_TOPIC, letter.topic.to_owned()),
        (headers::DLQ_ORIGIN_PARTITION, letter.partition.to_string()),
        (headers::DLQ_ORIGIN_OFFSET, letter.offset.to_string()),
        (headers::DLQ_ERROR_CLASS, letter.error_class.to_owned()),
        (headers::DLQ_ERROR_MESSAGE, cut(letter.error_message)),
        (headers::DLQ_TIME, Utc::now().to_rfc3339()),
    ]
}

/// The letter as a copy of the original bytes.
pub fn copy(letter: &DeadLetter<'_>) -> Composed {
    let mut headers = letter_headers(letter);
    headers.push((headers::DLQ_FORM, Form::Copy.as_str().to_owned()));
    Composed {
        form: Form::Copy,
        key: letter.key.map(<[u8]>::to_vec),
        payload: letter.payload.map(<[u8]>::to_vec),
        headers,
    }
}

/// The letter as a reference to the original, which stays in its topic.
pub fn reference(letter: &DeadLetter<'_>) -> Composed {
    let mut headers = letter_headers(letter);
    headers.push((headers::DLQ_FORM, Form::Reference.as_str().to_owned()));
    if let Some(payload) = letter.payload {
        headers.push((headers::DLQ_ORIGIN_SIZE, payload.len().to_string()));
        headers.push((headers::DLQ_ORIGIN_SHA256, sha256_hex(payload)));
    }
    if let Some(key) = letter.key {
        headers.push((headers::DLQ_ORIGIN_KEY_SIZE, key.len().to_string()));
        headers.push((headers::DLQ_ORIGIN_KEY_SHA256, sha256_hex(key)));
    }
    Composed {
        form: Form::Reference,
        key: None,
        payload: None,
        headers,
    }
}

/// A copy when it fits in `max_bytes`, else a reference.
pub fn compose(letter: &DeadLetter<'_>, max_bytes: usize) -> Composed {
    let copy = copy(letter);
    if copy.wire_bytes() <= max_bytes {
        copy
    } else {
        reference(letter)
    }
}

/// Writes `letter` to `dlq_topic` (a copy if it fits `max_bytes`, else a reference) and waits
/// for the broker's acknowledgement. A copy the broker refuses for its size is sent again as
/// a reference; only an unavailable broker is an error (the caller retries).
pub async fn send(
    producer: &CommandProducer,
    dlq_topic: &str,
    letter: &DeadLetter<'_>,
    max_bytes: usize,
) -> Result<(Delivered, Form), ProduceError> {
    let composed = compose(letter, max_bytes);
    match send_composed(producer, dlq_topic, &composed).await {
        Err(ProduceError::TooLarge(e)) if composed.form == Form::Copy => {
            tracing::warn!(error = %e, topic = letter.topic, partition = letter.partition, offset = letter.offset,
                "dead-letter copy refused for its size; sending a reference");
            let reference = reference(letter);
            send_composed(producer, dlq_topic, &reference)
                .await
                .map(|d| (d, Form::Reference))
        }
        other => other.map(|d| (d, composed.form)),
    }
}

async fn send_composed(
    producer: &CommandProducer,
    dlq_topic: &str,
    composed: &Composed,
) -> Result<Delivered, ProduceError> {
    let headers: Vec<(&str, &str)> = composed.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    producer
        .send_bytes(
            dlq_topic,
            composed.key.as_deref(),
            composed.payload.as_deref(),
            &headers,
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> DeadLetter<'a> {
        DeadLetter {
            topic: "memos.memory.commands",
            partition: 2,
            offset: 41,
            key,
            payload,
            error_class: "unstorable",
            error_message: "SQLSTATE 22P05: unsupported Unicode escape sequence",
        }
    }

    fn header<'a>(c: &'a Composed, name: &str) -> Option<&'a str> {
        c.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn copies_keep_null_and_empty_apart() {
        let c = copy(&letter(None, None));
        assert_eq!((c.key, c.payload), (None, None));
        let c = copy(&letter(Some(b""), Some(b"")));
        assert_eq!((c.key, c.payload), (Some(vec![]), Some(vec![])));
        let c = copy(&letter(Some(b"agent"), Some(b"\x00\x01")));
        assert_eq!(c.key.as_deref(), Some(&b"agent"[..]));
        assert_eq!(c.payload.as_deref(), Some(&b"\x00\x01"[..]));
        assert_eq!(header(&c, headers::DLQ_FORM), Some("copy"));
    }

    #[test]
    fn what_does_not_fit_becomes_a_reference() {
        let big = vec![7u8; 10_000];
        let l = letter(Some(b"agent"), Some(&big));
        assert_eq!(compose(&l, 20_000).form, Form::Copy);
        let r = compose(&l, 5_000);
        assert_eq!(r.form, Form::Reference);
        assert_eq!((r.key.as_ref(), r.payload.as_ref()), (None, None));
        assert_eq!(header(&r, headers::DLQ_FORM), Some("reference"));
        assert_eq!(header(&r, headers::DLQ_ORIGIN_SIZE), Some("10000"));
        assert_eq!(
            header(&r, headers::DLQ_ORIGIN_SHA256),
            Some(sha256_hex(&big).as_str())
        );
        assert_eq!(header(&r, headers::DLQ_ORIGIN_KEY_SIZE), Some("5"));
        assert_eq!(header(&r, headers::DLQ_ORIGIN_OFFSET), Some("41"));
        assert!(r.wire_bytes() < 1024, "{}", r.wire_bytes());
    }

    #[test]
    fn hashes_and_messages_are_bounded() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = "é".repeat(10_000);
        let l = DeadLetter {
            error_message: &long,
            ..letter(None, None)
        };
        let message = header(&copy(&l), headers::DLQ_ERROR_MESSAGE).unwrap().to_owned();
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES && message.ends_with("..."));
        assert!(copy(&l).wire_bytes() < LETTER_OVERHEAD_BYTES);
    }
}
