//! Memory commands: the Rust side of `schemas/avro/memory/*.avsc`, their limits, and their
//! codec. Limits are enforced on both sides of the log: the API answers 4xx before appending,
//! and the projector dead-letters a record from any other producer that breaks them.

use crate::registry::{CommandKind, DecodeError, registry};
use crate::validate::{
    JsonKind, check_bounded_text, check_name, check_optional_text, check_tags, check_text, check_time,
    check_uuid, parse_json,
};
use serde::{Deserialize, Serialize};

/// Largest memory content, in bytes of UTF-8.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Largest serialized metadata object, in bytes.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most dimensions of an embedding (the configured dimension is checked where it is known).
pub const MAX_EMBEDDING_DIMENSIONS: usize = 4096;
pub use crate::validate::{MAX_NAME_BYTES, MAX_TAG_BYTES, MAX_TAGS, ValidationError};

/// Namespace of [`memory_id_for_command`]'s name-based hash.
const MEMORY_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("6d656d4f-532d-4d65-8d6f-72792d696473");

/// The memory a write creates when its producer names none, derived from the command id so
/// that every retry of one command names the same memory (the projector applies a command id
/// once). A UUIDv8: the command id's first 48 bits (its millisecond time when it is a UUIDv7,
/// as the API generates them, so ids stay time-ordered like v7 ids) followed by bits of the
/// command id's SHA-1 (UUIDv5) hash.
pub fn memory_id_for_command(command_id: &uuid::Uuid) -> uuid::Uuid {
    let mut bytes = uuid::Uuid::new_v5(&MEMORY_ID_NAMESPACE, command_id.as_bytes()).into_bytes();
    bytes[..6].copy_from_slice(&command_id.as_bytes()[..6]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

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
    /// Provenance, free text (version 2).
    pub source: Option<String>,
}

/// `memos.memory.UpdateMemory`: a partial update; `None` keeps the current value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateMemory {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub memory_id: String,
    pub expected_version: Option<i64>,
    pub content: Option<String>,
    pub tier: Option<Tier>,
    pub tags: Option<Vec<String>>,
    pub metadata_json: Option<String>,
    pub importance: Option<f64>,
    pub expires_at: Option<i64>,
    pub clear_expiry: bool,
    pub embedding: Option<Vec<f32>>,
}

/// `memos.memory.ForgetMemory`: the memory leaves every query; its history stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetMemory {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub memory_id: String,
    pub expected_version: Option<i64>,
    pub reason: Option<String>,
}

/// `memos.memory.ShareMemory`: read access to one memory, or to the whole namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareMemory {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    /// `None`: the whole namespace.
    pub memory_id: Option<String>,
    pub grantee: String,
}

/// `memos.memory.RevokeShare`: takes back a share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeShare {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub memory_id: Option<String>,
    pub grantee: String,
}

/// `memos.memory.RegisterTool`: a tool in the namespace's registry, for discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterTool {
    pub command_id: String,
    pub namespace: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub name: String,
    pub description: String,
    pub usage: String,
    pub tags: Vec<String>,
}

fn check_content(content: &str) -> Result<(), ValidationError> {
    if content.is_empty() {
        return Err(ValidationError::new("content", "must not be empty"));
    }
    check_bounded_text("content", content, MAX_CONTENT_BYTES)
}

fn check_metadata(metadata_json: &str) -> Result<(), ValidationError> {
    parse_json("metadata", metadata_json, MAX_METADATA_BYTES, JsonKind::Object).map(|_| ())
}

fn check_importance(importance: f64) -> Result<(), ValidationError> {
    if !(0.0..=1.0).contains(&importance) {
        return Err(ValidationError::new("importance", "must be between 0 and 1"));
    }
    Ok(())
}

fn check_embedding(embedding: &[f32]) -> Result<(), ValidationError> {
    if embedding.is_empty() || embedding.len() > MAX_EMBEDDING_DIMENSIONS {
        return Err(ValidationError::new(
            "embedding",
            format!(
                "must have 1 to {MAX_EMBEDDING_DIMENSIONS} dimensions, got {}",
                embedding.len()
            ),
        ));
    }
    if embedding.iter().any(|x| !x.is_finite()) {
        return Err(ValidationError::new("embedding", "must hold finite numbers"));
    }
    Ok(())
}

/// The fields every memory command has.
fn check_header(
    command_id: &str,
    namespace: &str,
    actor: &str,
    issued_at: i64,
    traceparent: Option<&str>,
) -> Result<(), ValidationError> {
    check_uuid("command_id", command_id)?;
    check_name("namespace", namespace)?;
    check_name("actor", actor)?;
    check_time("issued_at", issued_at)?;
    check_optional_text("traceparent", traceparent)
}

/// [`check_header`] of any command struct.
macro_rules! header {
    ($c:expr) => {
        check_header(
            &$c.command_id,
            &$c.namespace,
            &$c.actor,
            $c.issued_at,
            $c.traceparent.as_deref(),
        )
    };
}

impl WriteMemory {
    /// Checks every limit of the command; the first broken one is reported.
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_uuid("memory_id", &self.memory_id)?;
        check_content(&self.content)?;
        check_tags("tags", &self.tags)?;
        check_metadata(&self.metadata_json)?;
        check_importance(self.importance)?;
        if let Some(expires_at) = self.expires_at {
            check_time("expires_at", expires_at)?;
        }
        if let Some(embedding) = &self.embedding {
            check_embedding(embedding)?;
        }
        if let Some(source) = &self.source {
            check_bounded_text("source", source, MAX_NAME_BYTES)?;
        }
        Ok(())
    }
}

impl UpdateMemory {
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_uuid("memory_id", &self.memory_id)?;
        if let Some(content) = &self.content {
            check_content(content)?;
        }
        if let Some(tags) = &self.tags {
            check_tags("tags", tags)?;
        }
        if let Some(expires_at) = self.expires_at {
            check_time("expires_at", expires_at)?;
        }
        if let Some(metadata) = &self.metadata_json {
            check_metadata(metadata)?;
        }
        if let Some(importance) = self.importance {
            check_importance(importance)?;
        }
        if let Some(embedding) = &self.embedding {
            check_embedding(embedding)?;
        }
        if self.clear_expiry && self.expires_at.is_some() {
            return Err(ValidationError::new(
                "expires_at",
                "cannot both set and clear the expiry",
            ));
        }
        if self.expected_version.is_some_and(|v| v < 1) {
            return Err(ValidationError::new("expected_version", "versions start at 1"));
        }
        let changes_nothing = self.content.is_none()
            && self.tier.is_none()
            && self.tags.is_none()
            && self.metadata_json.is_none()
            && self.importance.is_none()
            && self.expires_at.is_none()
            && !self.clear_expiry
            && self.embedding.is_none();
        if changes_nothing {
            return Err(ValidationError::new("update", "changes nothing"));
        }
        Ok(())
    }
}

impl ForgetMemory {
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_uuid("memory_id", &self.memory_id)?;
        if let Some(reason) = &self.reason {
            check_bounded_text("reason", reason, MAX_CONTENT_BYTES)?;
        }
        Ok(())
    }
}

fn check_share(namespace: &str, memory_id: Option<&str>, grantee: &str) -> Result<(), ValidationError> {
    if let Some(id) = memory_id {
        check_uuid("memory_id", id)?;
    }
    check_name("grantee", grantee)?;
    if grantee == namespace {
        return Err(ValidationError::new(
            "grantee",
            "the namespace already reads its own memories",
        ));
    }
    Ok(())
}

impl ShareMemory {
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_share(&self.namespace, self.memory_id.as_deref(), &self.grantee)
    }
}

impl RevokeShare {
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_share(&self.namespace, self.memory_id.as_deref(), &self.grantee)
    }
}

impl RegisterTool {
    pub fn validate(&self) -> Result<(), ValidationError> {
        header!(self)?;
        check_name("name", &self.name)?;
        if self.description.trim().is_empty() {
            return Err(ValidationError::new("description", "must not be empty"));
        }
        if self.description.len() + self.usage.len() > MAX_CONTENT_BYTES {
            return Err(ValidationError::new(
                "description",
                format!("too large: at most {MAX_CONTENT_BYTES} bytes with usage"),
            ));
        }
        check_text("description", &self.description)?;
        check_text("usage", &self.usage)?;
        check_tags("tags", &self.tags)
    }
}

/// Any command of the memory topic.
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryCommand {
    Write(WriteMemory),
    Update(UpdateMemory),
    Forget(ForgetMemory),
    Share(ShareMemory),
    Revoke(RevokeShare),
    RegisterTool(RegisterTool),
}

/// Calls `$body` with the inner command bound to `$c`, whatever the variant.
macro_rules! each {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            MemoryCommand::Write($c) => $body,
            MemoryCommand::Update($c) => $body,
            MemoryCommand::Forget($c) => $body,
            MemoryCommand::Share($c) => $body,
            MemoryCommand::Revoke($c) => $body,
            MemoryCommand::RegisterTool($c) => $body,
        }
    };
}

impl MemoryCommand {
    pub fn kind(&self) -> CommandKind {
        match self {
            MemoryCommand::Write(_) => CommandKind::WriteMemory,
            MemoryCommand::Update(_) => CommandKind::UpdateMemory,
            MemoryCommand::Forget(_) => CommandKind::ForgetMemory,
            MemoryCommand::Share(_) => CommandKind::ShareMemory,
            MemoryCommand::Revoke(_) => CommandKind::RevokeShare,
            MemoryCommand::RegisterTool(_) => CommandKind::RegisterTool,
        }
    }

    pub fn command_id(&self) -> &str {
        each!(self, c => &c.command_id)
    }

    /// The Kafka key: every command of a namespace goes to one partition, in order.
    pub fn namespace(&self) -> &str {
        each!(self, c => &c.namespace)
    }

    pub fn actor(&self) -> &str {
        each!(self, c => &c.actor)
    }

    pub fn traceparent(&self) -> Option<&str> {
        each!(self, c => c.traceparent.as_deref())
    }

    pub fn issued_at(&self) -> i64 {
        each!(self, c => c.issued_at)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        each!(self, c => c.validate())
    }

    /// Single-object encoding with the current schema of the command's kind.
    pub fn encode(&self) -> Result<Vec<u8>, apache_avro::Error> {
        let kind = self.kind();
        each!(self, c => registry().encode(kind, c))
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
            CommandKind::UpdateMemory => {
                MemoryCommand::Update(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::ForgetMemory => {
                MemoryCommand::Forget(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::ShareMemory => {
                MemoryCommand::Share(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::RevokeShare => {
                MemoryCommand::Revoke(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::RegisterTool => {
                MemoryCommand::RegisterTool(apache_avro::from_value(&value).map_err(malformed)?)
            }
            other => {
                return Err(DecodeError::WrongTopic {
                    schema: other.full_name(),
                });
            }
        };
        command.validate()?;
        Ok(command)
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

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
            source: Some("chat:42".into()),
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
            apache_avro::Schema::parse_str(include_str!("../avro/memory/WriteMemory.v2.avsc")).unwrap();
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

    /// One command of each kind, every optional string present.
    fn one_of_each() -> Vec<MemoryCommand> {
        let write = sample();
        let id = || Uuid::new_v4().to_string();
        let head = |w: &WriteMemory| (id(), w.namespace.clone(), w.actor.clone(), w.traceparent.clone());
        let (c1, ns, actor, tp) = head(&write);
        vec![
            MemoryCommand::Write(write.clone()),
            MemoryCommand::Update(UpdateMemory {
                command_id: c1,
                namespace: ns.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: tp.clone(),
                memory_id: write.memory_id.clone(),
                expected_version: Some(1),
                content: Some("new".into()),
                tier: Some(Tier::Episodic),
                tags: Some(vec!["x".into()]),
                metadata_json: Some(r#"{"k":"v"}"#.into()),
                importance: Some(0.1),
                expires_at: Some(1),
                clear_expiry: false,
                embedding: None,
            }),
            MemoryCommand::Forget(ForgetMemory {
                command_id: id(),
                namespace: ns.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: tp.clone(),
                memory_id: write.memory_id.clone(),
                expected_version: None,
                reason: Some("obsolete".into()),
            }),
            MemoryCommand::Share(ShareMemory {
                command_id: id(),
                namespace: ns.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: tp.clone(),
                memory_id: Some(write.memory_id.clone()),
                grantee: "agent-8".into(),
            }),
            MemoryCommand::Revoke(RevokeShare {
                command_id: id(),
                namespace: ns.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: tp.clone(),
                memory_id: None,
                grantee: "agent-8".into(),
            }),
            MemoryCommand::RegisterTool(RegisterTool {
                command_id: id(),
                namespace: ns,
                actor,
                issued_at: 1,
                traceparent: tp,
                name: "web_search".into(),
                description: "Searches the web".into(),
                usage: "web_search(query)".into(),
                tags: vec!["search".into()],
            }),
        ]
    }

    fn poisoned(command: &MemoryCommand) -> Vec<(String, MemoryCommand)> {
        use crate::validate::each_string_poisoned;
        fn wrap<T, F>(c: &T, f: F) -> Vec<(String, MemoryCommand)>
        where
            T: Serialize + serde::de::DeserializeOwned,
            F: Fn(T) -> MemoryCommand,
        {
            each_string_poisoned(c)
                .into_iter()
                .map(|(p, c)| (p, f(c)))
                .collect()
        }
        match command {
            MemoryCommand::Write(c) => wrap(c, MemoryCommand::Write),
            MemoryCommand::Update(c) => wrap(c, MemoryCommand::Update),
            MemoryCommand::Forget(c) => wrap(c, MemoryCommand::Forget),
            MemoryCommand::Share(c) => wrap(c, MemoryCommand::Share),
            MemoryCommand::Revoke(c) => wrap(c, MemoryCommand::Revoke),
            MemoryCommand::RegisterTool(c) => wrap(c, MemoryCommand::RegisterTool),
        }
    }

    /// U+0000 in any string of any command, wherever it is, is refused by the API's check and
    /// dead-lettered as `invalid` by the decoder, naming the field.
    #[test]
    fn nul_in_any_string_of_any_command_is_invalid_and_named() {
        let mut checked = 0;
        for command in one_of_each() {
            assert_eq!(command.validate(), Ok(()), "{command:?}");
            for (path, bad) in poisoned(&command) {
                let top = path.trim_start_matches('/').split('/').next().unwrap();
                let field = top.strip_suffix("_json").unwrap_or(top);
                let err = bad.validate().unwrap_err();
                assert!(err.field.starts_with(field), "{path}: {err}");
                let decoded = MemoryCommand::decode(&bad.encode().unwrap()).unwrap_err();
                assert_eq!(decoded.class(), "invalid", "{path}");
                assert!(decoded.to_string().starts_with(field), "{path}: {decoded}");
                checked += 1;
            }
        }
        assert!(checked >= 40, "only {checked} strings poisoned");
    }

    #[test]
    fn derived_memory_ids_are_stable_distinct_and_time_ordered() {
        let a = Uuid::now_v7();
        assert_eq!(memory_id_for_command(&a), memory_id_for_command(&a));
        assert_eq!(memory_id_for_command(&a).get_version_num(), 8);
        assert_eq!(memory_id_for_command(&a).as_bytes()[..6], a.as_bytes()[..6]);
        let ids: std::collections::BTreeSet<Uuid> = (0..10_000)
            .map(|_| memory_id_for_command(&Uuid::new_v4()))
            .collect();
        assert_eq!(ids.len(), 10_000);
        assert_ne!(memory_id_for_command(&a), a);
        // Fixed forever: ids already in the log were derived with it.
        let fixed = Uuid::parse_str("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
        assert_eq!(
            memory_id_for_command(&fixed).to_string(),
            "01890a5d-ac96-8dcd-8960-91e29fba17d7"
        );
    }

    #[test]
    fn times_out_of_range_and_deep_metadata_are_invalid_on_decode() {
        let far = crate::validate::MAX_TIME_MS + 1;
        let mut cases: Vec<(&str, MemoryCommand)> = Vec::new();
        let mut write = sample();
        write.expires_at = Some(far);
        cases.push(("expires_at", MemoryCommand::Write(write)));
        let mut write = sample();
        write.issued_at = i64::MIN;
        cases.push(("issued_at", MemoryCommand::Write(write)));
        let mut write = sample();
        write.metadata_json = format!(r#"{{"a":{}1{}}}"#, "[".repeat(40), "]".repeat(40));
        cases.push(("metadata", MemoryCommand::Write(write)));
        let mut write = sample();
        write.metadata_json = r#"{"a":{"b\u0000":1}}"#.into();
        cases.push(("metadata.a.<key>", MemoryCommand::Write(write)));
        let [MemoryCommand::Update(update), ..] = &one_of_each()[1..] else {
            unreachable!()
        };
        let mut update = update.clone();
        update.expires_at = Some(-far);
        cases.push(("expires_at", MemoryCommand::Update(update)));
        for (field, command) in cases {
            let err = command.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            let err = MemoryCommand::decode(&command.encode().unwrap()).unwrap_err();
            assert_eq!(err.class(), "invalid");
            assert!(err.to_string().starts_with(&format!("{field}: ")), "{err}");
        }
        let mut write = sample();
        write.expires_at = Some(crate::validate::MAX_TIME_MS);
        assert_eq!(write.validate(), Ok(()));
    }
}

#[cfg(test)]
mod evolution {
    use apache_avro::Schema;
    use apache_avro::reader::datum::GenericDatumReader;
    use apache_avro::types::Value;
    use apache_avro::writer::datum::GenericDatumWriter;

    use uuid::Uuid;

    use super::tests::sample;
    use super::*;
    use crate::fingerprint::schema_fingerprint;
    use crate::single_object;

    fn schema(json: &str) -> Schema {
        Schema::parse_str(json).unwrap()
    }

    /// A record written by a version-1 producer (no `source`) still decodes and projects.
    #[test]
    fn version_1_records_decode_into_the_current_reader() {
        let v1 = schema(include_str!("../avro/memory/WriteMemory.v1.avsc"));
        let mut expected = sample();
        expected.source = None;
        let Value::Record(fields) = apache_avro::to_value(&expected).unwrap() else {
            panic!()
        };
        let v1_value = Value::Record(fields.into_iter().filter(|(name, _)| name != "source").collect());
        let body = GenericDatumWriter::builder(&v1)
            .build()
            .unwrap()
            .write_value_to_vec(v1_value)
            .unwrap();
        let framed = single_object::encode(schema_fingerprint(&v1), &body);
        assert_eq!(
            MemoryCommand::decode(&framed).unwrap(),
            MemoryCommand::Write(expected)
        );
    }

    /// A version-1 consumer reads what this build writes, ignoring the new field.
    #[test]
    fn current_records_are_readable_with_version_1() {
        let v1 = schema(include_str!("../avro/memory/WriteMemory.v1.avsc"));
        let v2 = schema(include_str!("../avro/memory/WriteMemory.v2.avsc"));
        let bytes = MemoryCommand::Write(sample()).encode().unwrap();
        let (fingerprint, mut body) = single_object::decode(&bytes).unwrap();
        assert_eq!(fingerprint, schema_fingerprint(&v2));
        let value = GenericDatumReader::builder(&v2)
            .reader_schema(&v1)
            .build()
            .unwrap()
            .read_value(&mut body)
            .unwrap();
        let Value::Record(fields) = value else {
            panic!("not a record")
        };
        assert!(fields.iter().all(|(name, _)| name != "source"));
        assert!(
            fields
                .iter()
                .any(|(name, v)| name == "content" && *v == Value::String(sample().content))
        );
    }

    /// A record cut short anywhere after its header never decodes: it names a writer
    /// schema whose fields it does not hold.
    #[test]
    fn a_truncated_record_never_decodes() {
        let bytes = MemoryCommand::Write(sample()).encode().unwrap();
        for cut in 10..bytes.len() {
            let decoded = MemoryCommand::decode(&bytes[..cut]);
            assert!(
                decoded.is_err(),
                "{cut} of {} bytes decoded: {decoded:?}",
                bytes.len()
            );
        }
    }

    #[test]
    fn every_command_round_trips() {
        let header = |id: &str| (id.to_owned(), "agent-7".to_owned(), "agent-7".to_owned());
        let (command_id, namespace, actor) = header(&Uuid::new_v4().to_string());
        let memory_id = Uuid::new_v4().to_string();
        let commands = vec![
            MemoryCommand::Update(UpdateMemory {
                command_id: command_id.clone(),
                namespace: namespace.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: None,
                memory_id: memory_id.clone(),
                expected_version: Some(3),
                content: Some("new".into()),
                tier: Some(Tier::Episodic),
                tags: Some(vec!["x".into()]),
                metadata_json: Some("{}".into()),
                importance: Some(0.1),
                expires_at: None,
                clear_expiry: true,
                embedding: Some(vec![1.0]),
            }),
            MemoryCommand::Forget(ForgetMemory {
                command_id: command_id.clone(),
                namespace: namespace.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: None,
                memory_id: memory_id.clone(),
                expected_version: None,
                reason: Some("obsolete".into()),
            }),
            MemoryCommand::Share(ShareMemory {
                command_id: command_id.clone(),
                namespace: namespace.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: None,
                memory_id: None,
                grantee: "agent-8".into(),
            }),
            MemoryCommand::Revoke(RevokeShare {
                command_id: command_id.clone(),
                namespace: namespace.clone(),
                actor: actor.clone(),
                issued_at: 1,
                traceparent: None,
                memory_id: Some(memory_id.clone()),
                grantee: "agent-8".into(),
            }),
            MemoryCommand::RegisterTool(RegisterTool {
                command_id,
                namespace,
                actor,
                issued_at: 1,
                traceparent: None,
                name: "web_search".into(),
                description: "Searches the web".into(),
                usage: "web_search(query)".into(),
                tags: vec!["search".into()],
            }),
        ];
        for command in commands {
            let bytes = command.encode().unwrap();
            assert_eq!(MemoryCommand::decode(&bytes).unwrap(), command);
        }
    }
}
