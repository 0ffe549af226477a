//! Every released schema version, found by fingerprint, and the current reader schema of each
//! command. A record written with any released version resolves (Avro schema resolution) to
//! the current reader schema; a fingerprint that is not here is an unknown schema, never a
//! guess.
//!
//! Each released version is found under its fingerprint as the Avro specification defines it
//! (what this build writes, and what any Avro client computes) and, for the versions released
//! before memOS followed the spec, also under the fingerprint memOS framed them with then
//! ([`LEGACY_FINGERPRINTS`]), so records already on the topics stay readable.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::fingerprint;
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

/// The fingerprints memOS framed records with before it computed the Parsing Canonical Form
/// itself: CRC-64-AVRO of apache-avro 0.22's `canonical_form()`, which keeps logical types
/// (see [`crate::fingerprint`]). Records carrying them are on the topics for good, so these
/// stay readable. A closed list of history, never computed: versions released after the fix
/// were only ever written with the spec's fingerprint.
pub const LEGACY_FINGERPRINTS: &[(CommandKind, u32, u64)] = &[
    (CommandKind::WriteMemory, 1, 0xebd3_deaf_3654_c364),
    (CommandKind::WriteMemory, 2, 0xcc5f_21fc_11ee_d860),
    (CommandKind::UpdateMemory, 1, 0x9352_996a_22af_b595),
    (CommandKind::ForgetMemory, 1, 0x6949_5155_4f5f_a9e6),
    (CommandKind::ShareMemory, 1, 0x9dee_bf76_415b_c038),
    (CommandKind::RevokeShare, 1, 0xa290_07d0_417e_f88c),
    (CommandKind::RegisterTool, 1, 0x0d1a_15b7_c7f0_3f51),
    (CommandKind::RegisterAgent, 1, 0x85eb_d24a_47ad_c5d9),
    (CommandKind::AgentHeartbeat, 1, 0xf34f_b620_942c_f13e),
    (CommandKind::DeregisterAgent, 1, 0xb058_df80_df4b_4342),
    (CommandKind::DelegateTask, 1, 0xfa07_481d_bafa_f21c),
    (CommandKind::StartTask, 1, 0x1ee5_f0b7_0027_8d06),
    (CommandKind::CompleteTask, 1, 0x77e0_4ee8_7c38_2813),
    (CommandKind::FailTask, 1, 0xbbfe_04d2_732a_4dde),
    (CommandKind::CancelTask, 1, 0xd83c_b8fc_06c8_837b),
    (CommandKind::DefineWorkflowTemplate, 1, 0x0106_0a23_fbaa_767e),
    (CommandKind::StartWorkflow, 1, 0x64bc_5474_5dbe_77ee),
    (CommandKind::Tick, 1, 0x2150_ab4e_5b99_f189),
    (CommandKind::TaskEvent, 1, 0xfd44_f37e_1c0d_f662),
];

/// A parsed released schema.
pub struct Entry {
    pub kind: CommandKind,
    pub version: u32,
    /// The spec's fingerprint: what this build frames records of this version with.
    pub fingerprint: u64,
    pub schema: Schema,
}

/// Released schemas by fingerprint (spec and legacy), plus the newest (reader) version of
/// each kind.
pub struct Registry {
    entries: Vec<Entry>,
    by_fingerprint: HashMap<u64, usize>,
    current: HashMap<CommandKind, usize>,
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

/// The registry compiled from [`RELEASED`] and [`LEGACY_FINGERPRINTS`].
pub fn registry() -> &'static Registry {
    static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
        let mut registry = Registry {
            entries: Vec::with_capacity(RELEASED.len()),
            by_fingerprint: HashMap::new(),
            current: HashMap::new(),
        };
        for released in RELEASED {
            let schema = Schema::parse_str(released.json).unwrap_or_else(|e| {
                panic!(
                    "released schema {:?} v{} does not parse: {e}",
                    released.kind, released.version
                )
            });
            let fingerprint = fingerprint::fingerprint(released.json)
                .unwrap_or_else(|e| panic!("released schema {:?} v{}: {e}", released.kind, released.version));
            let index = registry.entries.len();
            registry.entries.push(Entry {
                kind: released.kind,
                version: released.version,
                fingerprint,
                schema,
            });
            registry.index(fingerprint, index);
            let newest = registry.current.entry(released.kind).or_insert(index);
            if released.version >= registry.entries[*newest].version {
                *newest = index;
            }
        }
        for &(kind, version, legacy) in LEGACY_FINGERPRINTS {
            let index = registry
                .entries
                .iter()
                .position(|e| e.kind == kind && e.version == version)
                .unwrap_or_else(|| {
                    panic!("legacy fingerprint of {kind:?} v{version}, which is not released")
                });
            registry.index(legacy, index);
        }
        registry
    });
    &REGISTRY
}

impl Registry {
    /// Files entry `index` under `fingerprint`. Two schemas under one fingerprint would make
    /// a record's writer schema ambiguous, so that refuses to build.
    fn index(&mut self, fingerprint: u64, index: usize) {
        if let Some(&other) = self.by_fingerprint.get(&fingerprint)
            && other != index
        {
            let (a, b) = (&self.entries[other], &self.entries[index]);
            panic!(
                "{:?} v{} and {:?} v{} share the fingerprint {fingerprint:#018x}",
                a.kind, a.version, b.kind, b.version
            );
        }
        self.by_fingerprint.insert(fingerprint, index);
    }

    /// The released schema with this fingerprint (the spec's, or a legacy one).
    pub fn get(&self, fingerprint: u64) -> Option<&Entry> {
        self.by_fingerprint.get(&fingerprint).map(|&i| &self.entries[i])
    }

    /// The newest released version of `kind`: what this build writes and reads into.
    pub fn current(&self, kind: CommandKind) -> &Entry {
        &self.entries[self.current[&kind]]
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
        // apache-avro 0.22 reads a union at the end of its input as null instead of failing,
        // so a record cut before a trailing optional field would decode as a different
        // command. One sentinel byte after the body turns that end into a byte to read: a
        // whole record leaves exactly the sentinel unread, a truncated one does not.
        let mut framed = Vec::with_capacity(body.len() + 1);
        framed.extend_from_slice(body);
        framed.push(0);
        body = framed.as_slice();
        let value = GenericDatumReader::builder(&writer.schema)
            .reader_schema(&reader.schema)
            .build()
            .map_err(malformed)?
            .read_value(&mut body)
            .map_err(malformed)?;
        match body.len() {
            1 => {}
            0 => {
                return Err(DecodeError::Malformed {
                    schema: writer.kind.full_name(),
                    message: "the record ends before its last field".into(),
                });
            }
            n => {
                return Err(DecodeError::Malformed {
                    schema: writer.kind.full_name(),
                    message: format!("{} trailing bytes after the record", n - 1),
                });
            }
        }
        Ok((writer.kind, value))
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::schema_compatibility::SchemaCompatibility;

    use super::*;
    use crate::fingerprint::crc64_avro;

    fn spec_fingerprint(released: &Released) -> u64 {
        fingerprint::fingerprint(released.json).unwrap()
    }

    /// Each released version reads, and is read by, every other version of its command
    /// (full compatibility, checked by Avro's own resolution rules).
    #[test]
    fn every_version_reads_and_is_read_by_every_other() {
        let registry = registry();
        for a in RELEASED {
            for b in RELEASED.iter().filter(|b| b.kind == a.kind) {
                let writer = &registry.get(spec_fingerprint(a)).unwrap().schema;
                let reader = &registry.get(spec_fingerprint(b)).unwrap().schema;
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
        assert_eq!(registry.entries.len(), RELEASED.len());
        // Every schema has a logical type, so each legacy fingerprint differs from the
        // spec's and both are filed; `Registry::index` refuses any collision.
        assert_eq!(
            registry.by_fingerprint.len(),
            RELEASED.len() + LEGACY_FINGERPRINTS.len()
        );
        for entry in &registry.entries {
            let name = entry.schema.name().map(|n| n.fullname(None)).unwrap_or_default();
            assert_eq!(name, entry.kind.full_name());
        }
    }

    /// What this build writes: the spec's fingerprint (fastavro and Java Avro compute
    /// 0x72aaf545c1741940 for WriteMemory v2), never the legacy one.
    #[test]
    fn new_records_are_framed_with_the_spec_fingerprint() {
        let registry = registry();
        assert_eq!(registry.current(CommandKind::WriteMemory).version, 2);
        assert_eq!(
            registry.current(CommandKind::WriteMemory).fingerprint,
            0x72aa_f545_c174_1940
        );
        let bytes = registry.encode(CommandKind::Tick, &tick()).unwrap();
        let (framed_with, _) = single_object::decode(&bytes).unwrap();
        assert_eq!(framed_with, 0x26c4_d5ae_1f4a_a3c0, "Tick v1 by fastavro and Java");
    }

    /// The legacy list is what memOS wrote before: CRC-64-AVRO of apache-avro 0.22's
    /// `canonical_form()`. Should a later apache-avro change that form, this check goes, not
    /// the constants: they are what the topics hold.
    #[test]
    fn legacy_fingerprints_are_what_apache_avro_0_22_framed_with() {
        for &(kind, version, legacy) in LEGACY_FINGERPRINTS {
            let released = RELEASED
                .iter()
                .find(|r| (r.kind, r.version) == (kind, version))
                .unwrap();
            let form = Schema::parse_str(released.json).unwrap().canonical_form();
            assert_eq!(crc64_avro(form.as_bytes()), legacy, "{kind:?} v{version}");
        }
    }

    /// A record framed with a legacy fingerprint decodes exactly like the same body framed
    /// with the spec's, and every legacy fingerprint names its own version.
    #[test]
    fn records_framed_with_a_legacy_fingerprint_stay_readable() {
        let registry = registry();
        for &(kind, version, legacy) in LEGACY_FINGERPRINTS {
            let entry = registry.get(legacy).unwrap();
            assert_eq!((entry.kind, entry.version), (kind, version));
        }
        let framed = registry.encode(CommandKind::Tick, &tick()).unwrap();
        let legacy = LEGACY_FINGERPRINTS
            .iter()
            .find(|(kind, _, _)| *kind == CommandKind::Tick)
            .unwrap()
            .2;
        let old = single_object::encode(legacy, &framed[single_object::HEADER_LEN..]);
        assert_ne!(old, framed);
        assert_eq!(
            registry.decode_value(&old).unwrap(),
            registry.decode_value(&framed).unwrap()
        );
    }

    /// Tick v1 as a plain serde value, so this test does not lean on the command types.
    #[derive(serde::Serialize)]
    struct Tick {
        command_id: String,
        actor: String,
        issued_at: i64,
        traceparent: Option<String>,
        partition: i32,
    }

    fn tick() -> Tick {
        Tick {
            command_id: "c-1".into(),
            actor: "orchestrator".into(),
            issued_at: 1_790_000_000_123,
            traceparent: None,
            partition: 2,
        }
    }
}
