//! Memory commands: the Rust side of `schemas/avro/memory/*.avsc`, their limits, and their
//! codec. Limits are enforced on both sides of the log: the API answers 4xx before appending,
//! and the projector dead-letters a record from any other producer that breaks them.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::registry::{CommandKind, DecodeError, registry};

/// Largest memory content, in bytes of UTF-8.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Most tags on one memory.
pub const MAX_TAGS: usize = 32;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 128;
/// Largest serialized metadata object, in bytes.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Longest namespace or actor, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// How a memory is used, after the usual taxonomy of agent memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    #[default]
    Working,
    Episodic,
    Semantic,
    Procedural,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Working => "working",
            Tier::Episodic => "episodic",
            Tier::Semantic => "semantic",
            Tier::Procedural => "procedural",
        }
    }
}

/// `memos.memory.WriteMemory`: an agent writes a new memory into its namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteMemory {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    /// Producer clock in Unix milliseconds; informational only.
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub memory_id: String,
    pub content: String,
    pub tier: Tier,
    pub tags: Vec<String>,
    /// A JSON object, serialized.
    pub metadata_json: String,
    pub importance: f64,
    pub expires_at: Option<i64>,
    pub embedding: Option<Vec<f32>>,
}

/// A command that breaks a limit or an invariant of its type.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The offending field, as named in the schema.
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        ValidationError {
            field,
            message: message.into(),
        }
    }

    /// Whether the command is rejected for its size (HTTP 413) rather than its shape (422).
    pub fn is_too_large(&self) -> bool {
        self.message.starts_with("too large")
    }
}

fn check_uuid(field: &'static str, value: &str) -> Result<(), ValidationError> {
    Uuid::parse_str(value)
        .map(|_| ())
        .map_err(|_| ValidationError::new(field, "must be a UUID"))
}

fn check_name(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(ValidationError::new(
            field,
            format!("too large: at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "must not contain control characters"));
    }
    Ok(())
}

impl WriteMemory {
    /// Checks every limit of the command; the first broken one is reported.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_uuid("command_id", &self.command_id)?;
        check_uuid("memory_id", &self.memory_id)?;
        check_name("namespace", &self.namespace)?;
        check_name("actor", &self.actor)?;
        if self.content.is_empty() {
            return Err(ValidationError::new("content", "must not be empty"));
        }
        if self.content.len() > MAX_CONTENT_BYTES {
            return Err(ValidationError::new(
                "content",
                format!(
                    "too large: {} bytes, at most {MAX_CONTENT_BYTES}",
                    self.content.len()
                ),
            ));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(ValidationError::new(
                "tags",
                format!("too large: {} tags, at most {MAX_TAGS}", self.tags.len()),
            ));
        }
        if let Some(tag) = self.tags.iter().find(|t| t.is_empty() || t.len() > MAX_TAG_BYTES) {
            return Err(ValidationError::new(
                "tags",
                format!("each tag must be 1 to {MAX_TAG_BYTES} bytes, got {}", tag.len()),
            ));
        }
        if self.metadata_json.len() > MAX_METADATA_BYTES {
            return Err(ValidationError::new(
                "metadata",
                format!(
                    "too large: {} bytes, at most {MAX_METADATA_BYTES}",
                    self.metadata_json.len()
                ),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&self.metadata_json) {
            Ok(serde_json::Value::Object(_)) => {}
            _ => return Err(ValidationError::new("metadata", "must be a JSON object")),
        }
        if !(0.0..=1.0).contains(&self.importance) {
            return Err(ValidationError::new("importance", "must be between 0 and 1"));
        }
        if let Some(embedding) = &self.embedding
            && embedding.iter().any(|x| !x.is_finite())
        {
            return Err(ValidationError::new("embedding", "must hold finite numbers"));
        }
        Ok(())
    }
}

/// Any command of the memory topic.
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryCommand {
    Write(WriteMemory),
}

impl MemoryCommand {
    pub fn kind(&self) -> CommandKind {
        match self {
            MemoryCommand::Write(_) => CommandKind::WriteMemory,
        }
    }

    pub fn command_id(&self) -> &str {
        match self {
            MemoryCommand::Write(c) => &c.command_id,
        }
    }

    /// The Kafka key: every command of a namespace goes to one partition, in order.
    pub fn namespace(&self) -> &str {
        match self {
            MemoryCommand::Write(c) => &c.namespace,
        }
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            MemoryCommand::Write(c) => c.validate(),
        }
    }

    /// Single-object encoding with the current schema of the command's kind.
    pub fn encode(&self) -> Result<Vec<u8>, apache_avro::Error> {
        match self {
            MemoryCommand::Write(c) => registry().encode(self.kind(), c),
        }
    }

    /// Decodes a record written with any released schema version and validates it.
    pub fn decode(bytes: &[u8]) -> Result<MemoryCommand, DecodeError> {
        let (kind, value) = registry().decode_value(bytes)?;
        let malformed = |e: apache_avro::Error| DecodeError::Malformed {
            schema: kind.full_name(),
            message: e.to_string(),
        };
        let command = match kind {
            CommandKind::WriteMemory => {
                MemoryCommand::Write(apache_avro::from_value(&value).map_err(malformed)?)
            }
        };
        command.validate()?;
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::schema_fingerprint;
    use crate::single_object;

    pub(crate) fn sample() -> WriteMemory {
        WriteMemory {
            command_id: Uuid::new_v4().to_string(),
            namespace: "agent-7".into(),
            actor: "agent-7".into(),
            issued_at: 1_790_000_000_123,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            memory_id: Uuid::new_v4().to_string(),
            content: "The user prefers dark roast coffee ☕".into(),
            tier: Tier::Semantic,
            tags: vec!["preference".into(), "coffee".into()],
            metadata_json: r#"{"source":"chat","turn":3}"#.into(),
            importance: 0.8,
            expires_at: Some(1_800_000_000_000),
            embedding: Some(vec![0.25, -1.5, 3.0]),
        }
    }

    #[test]
    fn round_trips_through_avro() {
        let command = MemoryCommand::Write(sample());
        let bytes = command.encode().unwrap();
        assert_eq!(MemoryCommand::decode(&bytes).unwrap(), command);
    }

    #[test]
    fn round_trips_optional_fields_absent() {
        let mut write = sample();
        write.traceparent = None;
        write.expires_at = None;
        write.embedding = None;
        write.tags.clear();
        let command = MemoryCommand::Write(write);
        assert_eq!(
            MemoryCommand::decode(&command.encode().unwrap()).unwrap(),
            command
        );
    }

    #[test]
    fn header_names_the_writer_schema_fingerprint() {
        let bytes = MemoryCommand::Write(sample()).encode().unwrap();
        let schema =
            apache_avro::Schema::parse_str(include_str!("../avro/memory/WriteMemory.v1.avsc")).unwrap();
        assert_eq!(&bytes[..2], &single_object::MAGIC);
        assert_eq!(bytes[2..10], schema_fingerprint(&schema).to_le_bytes());
    }

    #[test]
    fn unknown_fingerprint_and_garbage_are_classified() {
        let unknown = single_object::encode(42, b"\x02");
        let err = MemoryCommand::decode(&unknown).unwrap_err();
        assert_eq!(err.class(), "unknown_schema", "{err}");
        let err = MemoryCommand::decode(b"not avro at all").unwrap_err();
        assert_eq!(err.class(), "not_avro", "{err}");
        let mut truncated = MemoryCommand::Write(sample()).encode().unwrap();
        truncated.truncate(20);
        assert_eq!(
            MemoryCommand::decode(&truncated).unwrap_err().class(),
            "malformed"
        );
    }

    #[test]
    fn limits_are_enforced_on_decode() {
        let mut write = sample();
        write.content = "x".repeat(MAX_CONTENT_BYTES + 1);
        let bytes = MemoryCommand::Write(write).encode().unwrap();
        let err = MemoryCommand::decode(&bytes).unwrap_err();
        assert_eq!(err.class(), "invalid");

        let mut write = sample();
        write.metadata_json = "[1,2]".into();
        assert_eq!(write.validate().unwrap_err().field, "metadata");
        let mut write = sample();
        write.tags = (0..=MAX_TAGS).map(|i| i.to_string()).collect();
        assert!(write.validate().unwrap_err().is_too_large());
        let mut write = sample();
        write.importance = 1.5;
        assert_eq!(write.validate().unwrap_err().field, "importance");
    }
}
