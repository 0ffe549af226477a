//! Every released schema version, found by fingerprint, and the current reader schema of each
//! command. A record written with any released version resolves (Avro schema resolution) to
//! the current reader schema; a fingerprint that is not here is an unknown schema, never a
//! guess.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::fingerprint::schema_fingerprint;
use crate::single_object::{self, FramingError};

/// The commands that memOS topics carry, one Avro record type each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    WriteMemory,
    UpdateMemory,
    ForgetMemory,
    ShareMemory,
    RevokeShare,
    RegisterTool,
    RegisterAgent,
    AgentHeartbeat,
    DeregisterAgent,
    DelegateTask,
    StartTask,
    CompleteTask,
    FailTask,
    CancelTask,
    DefineWorkflowTemplate,
    StartWorkflow,
    Tick,
    /// Not a command: the orchestrator's decisions on `memos.task.events`.
    TaskEvent,
}

impl CommandKind {
    /// The Avro full name of the record type.
    pub fn full_name(self) -> &'static str {
        match self {
            CommandKind::WriteMemory => "memos.memory.WriteMemory",
            CommandKind::UpdateMemory => "memos.memory.UpdateMemory",
            CommandKind::ForgetMemory => "memos.memory.ForgetMemory",
            CommandKind::ShareMemory => "memos.memory.ShareMemory",
            CommandKind::RevokeShare => "memos.memory.RevokeShare",
            CommandKind::RegisterTool => "memos.memory.RegisterTool",
            CommandKind::RegisterAgent => "memos.task.RegisterAgent",
            CommandKind::AgentHeartbeat => "memos.task.AgentHeartbeat",
            CommandKind::DeregisterAgent => "memos.task.DeregisterAgent",
            CommandKind::DelegateTask => "memos.task.DelegateTask",
            CommandKind::StartTask => "memos.task.StartTask",
            CommandKind::CompleteTask => "memos.task.CompleteTask",
            CommandKind::FailTask => "memos.task.FailTask",
            CommandKind::CancelTask => "memos.task.CancelTask",
            CommandKind::DefineWorkflowTemplate => "memos.task.DefineWorkflowTemplate",
            CommandKind::StartWorkflow => "memos.task.StartWorkflow",
            CommandKind::Tick => "memos.task.Tick",
            CommandKind::TaskEvent => "memos.task.TaskEvent",
        }
    }
}

/// One released schema version as it is kept in `schemas/avro/`.
pub struct Released {
    pub kind: CommandKind,
    pub version: u32,
    pub json: &'static str,
}

/// Every released version, oldest first. Never remove or edit an entry: records written with
/// it live in the log forever.
pub const RELEASED: &[Released] = &[
    released(
        CommandKind::WriteMemory,
        1,
        include_str!("../avro/memory/WriteMemory.v1.avsc"),
    ),
    released(
        CommandKind::WriteMemory,
        2,
        include_str!("../avro/memory/WriteMemory.v2.avsc"),
    ),
    released(
        CommandKind::UpdateMemory,
        1,
        include_str!("../avro/memory/UpdateMemory.v1.avsc"),
    ),
    released(
        CommandKind::ForgetMemory,
        1,
        include_str!("../avro/memory/ForgetMemory.v1.avsc"),
    ),
    released(
        CommandKind::ShareMemory,
        1,
        include_str!("../avro/memory/ShareMemory.v1.avsc"),
    ),
    released(
        CommandKind::RevokeShare,
        1,
        include_str!("../avro/memory/RevokeShare.v1.avsc"),
    ),
    released(
        CommandKind::RegisterTool,
        1,
        include_str!("../avro/memory/RegisterTool.v1.avsc"),
    ),
    released(
        CommandKind::RegisterAgent,
        1,
        include_str!("../avro/task/RegisterAgent.v1.avsc"),
    ),
    released(
        CommandKind::AgentHeartbeat,
        1,
        include_str!("../avro/task/AgentHeartbeat.v1.avsc"),
    ),
    released(
        CommandKind::DeregisterAgent,
        1,
        include_str!("../avro/task/DeregisterAgent.v1.avsc"),
    ),
    released(
        CommandKind::DelegateTask,
        1,
        include_str!("../avro/task/DelegateTask.v1.avsc"),
    ),
    released(
        CommandKind::StartTask,
        1,
        include_str!("../avro/task/StartTask.v1.avsc"),
    ),
    released(
        CommandKind::CompleteTask,
        1,
        include_str!("../avro/task/CompleteTask.v1.avsc"),
    ),
    released(
        CommandKind::FailTask,
        1,
        include_str!("../avro/task/FailTask.v1.avsc"),
    ),
    released(
        CommandKind::CancelTask,
        1,
        include_str!("../avro/task/CancelTask.v1.avsc"),
    ),
    released(
        CommandKind::DefineWorkflowTemplate,
        1,
        include_str!("../avro/task/DefineWorkflowTemplate.v1.avsc"),
    ),
    released(
        CommandKind::StartWorkflow,
        1,
        include_str!("../avro/task/StartWorkflow.v1.avsc"),
    ),
    released(CommandKind::Tick, 1, include_str!("../avro/task/Tick.v1.avsc")),
    released(
        CommandKind::TaskEvent,
        1,
        include_str!("../avro/task/TaskEvent.v1.avsc"),
    ),
];

const fn released(kind: CommandKind, version: u32, json: &'static str) -> Released {
    Released { kind, version, json }
}

/// A parsed released schema.
pub struct Entry {
    pub kind: CommandKind,
    pub version: u32,
    pub fingerprint: u64,
    pub schema: Schema,
}

/// Released schemas by fingerprint, plus the newest (reader) version of each kind.
pub struct Registry {
    by_fingerprint: HashMap<u64, Entry>,
    current: HashMap<CommandKind, u64>,
}

/// Why a record could not be turned into a command.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a single-object Avro record: {0}")]
    Framing(#[from] FramingError),
    #[error("unknown writer schema fingerprint {0:#018x}")]
    UnknownSchema(u64),
    #[error("Avro body does not match its writer schema {schema}: {message}")]
    Malformed { schema: &'static str, message: String },
    #[error("{0}")]
    Invalid(#[from] crate::memory::ValidationError),
    #[error("{schema} does not belong on this topic")]
    WrongTopic { schema: &'static str },
}

impl DecodeError {
    /// Every value [`DecodeError::class`] can take.
    pub const CLASSES: &'static [&'static str] = &["not_avro", "unknown_schema", "malformed", "invalid"];

    /// A stable, low-cardinality class for metrics and dead-letter headers.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Framing(_) => "not_avro",
            DecodeError::UnknownSchema(_) => "unknown_schema",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::Invalid(_) => "invalid",
            DecodeError::WrongTopic { .. } => "unknown_schema",
        }
    }
}

/// The registry compiled from [`RELEASED`].
pub fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
        let mut by_fingerprint = HashMap::new();
        let mut current: HashMap<CommandKind, (u32, u64)> = HashMap::new();
        for released in RELEASED {
            let schema = Schema::parse_str(released.json).unwrap_or_else(|e| {
                panic!(
                    "released schema {:?} v{} does not parse: {e}",
                    released.kind, released.version
                )
            });
            let fingerprint = schema_fingerprint(&schema);
            let newest = current.entry(released.kind).or_insert((0, fingerprint));
            if released.version >= newest.0 {
                *newest = (released.version, fingerprint);
            }
            by_fingerprint.insert(
                fingerprint,
                Entry {
                    kind: released.kind,
                    version: released.version,
                    fingerprint,
                    schema,
                },
            );
        }
        Registry {
            by_fingerprint,
            current: current.into_iter().map(|(k, (_, fp))| (k, fp)).collect(),
        }
    });
    &REGISTRY
}

impl Registry {
    /// The released schema with this fingerprint.
    pub fn get(&self, fingerprint: u64) -> Option<&Entry> {
        self.by_fingerprint.get(&fingerprint)
    }

    /// The newest released version of `kind`: what this build writes and reads into.
    pub fn current(&self, kind: CommandKind) -> &Entry {
        &self.by_fingerprint[&self.current[&kind]]
    }

    /// Frames `value` with the current schema of `kind`.
    pub fn encode<T: serde::Serialize>(
        &self,
        kind: CommandKind,
        value: &T,
    ) -> Result<Vec<u8>, apache_avro::Error> {
        let entry = self.current(kind);
        let body = GenericDatumWriter::builder(&entry.schema)
            .build()?
            .write_ser_to_vec(value)?;
        Ok(single_object::encode(entry.fingerprint, &body))
    }

    /// Reads a framed record into the current reader schema of its kind.
    pub fn decode_value(
        &self,
        bytes: &[u8],
    ) -> Result<(CommandKind, apache_avro::types::Value), DecodeError> {
        let (fingerprint, mut body) = single_object::decode(bytes)?;
        let writer = self
            .get(fingerprint)
            .ok_or(DecodeError::UnknownSchema(fingerprint))?;
        let reader = self.current(writer.kind);
        let malformed = |e: apache_avro::Error| DecodeError::Malformed {
            schema: writer.kind.full_name(),
            message: e.to_string(),
        };
        let value = GenericDatumReader::builder(&writer.schema)
            .reader_schema(&reader.schema)
            .build()
            .map_err(malformed)?
            .read_value(&mut body)
            .map_err(malformed)?;
        if !body.is_empty() {
            return Err(DecodeError::Malformed {
                schema: writer.kind.full_name(),
                message: format!("{} trailing bytes after the record", body.len()),
            });
        }
        Ok((writer.kind, value))
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::schema_compatibility::SchemaCompatibility;

    use super::*;

    /// Each released version reads, and is read by, every other version of its command
    /// (full compatibility, checked by Avro's own resolution rules).
    #[test]
    fn every_version_reads_and_is_read_by_every_other() {
        let registry = registry();
        for a in RELEASED {
            for b in RELEASED.iter().filter(|b| b.kind == a.kind) {
                let writer = &registry
                    .get(schema_fingerprint(&Schema::parse_str(a.json).unwrap()))
                    .unwrap()
                    .schema;
                let reader = &registry
                    .get(schema_fingerprint(&Schema::parse_str(b.json).unwrap()))
                    .unwrap()
                    .schema;
                SchemaCompatibility::mutual_read(writer, reader).unwrap_or_else(|e| {
                    panic!(
                        "{:?} v{} and v{} are not compatible: {e}",
                        a.kind, a.version, b.version
                    )
                });
            }
        }
    }

    #[test]
    fn fingerprints_are_unique_and_names_match_kinds() {
        let registry = registry();
        assert_eq!(
            registry.by_fingerprint.len(),
            RELEASED.len(),
            "a schema was released twice"
        );
        for entry in registry.by_fingerprint.values() {
            let name = entry.schema.name().map(|n| n.fullname(None)).unwrap_or_default();
            assert_eq!(name, entry.kind.full_name());
        }
    }
}
