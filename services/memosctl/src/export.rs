//! `memosctl export --agent X --from T1 --to T2 --format avro|jsonl --output FILE`: the raw
//! commands of a slice of the memory command log, with their positions, timestamps, keys and
//! headers, for auditors and for other systems.
//!
//! Guarantees: every exported record carries the value exactly as it is in the log (the
//! single-object Avro bytes), so the export is evidence, not a reinterpretation; the decoded
//! command (as JSON, in the current reader schema) is added next to it for convenience, and is
//! null for a record that does not decode. Records are selected by agent (namespace or actor)
//! and by their own timestamp in `[from, to)`; the slice is found with Kafka's
//! offsets-for-times and fixed when the command starts. Output is ordered by partition, then
//! offset. The file is written to `FILE.partial` and renamed when complete, so a file with
//! the final name is never half-written.
//!
//! Formats: `avro`, an Avro object container file (schema `memos.export.LogRecord`, see
//! [`export_schema_json`]: position, timestamp, key, headers, the raw value, and the decoded
//! command as a union of the command schemas; uncompressed; readable by any Avro
//! implementation such as `fastavro` or `avro-tools tojson`); `jsonl`, one JSON object per
//! line with the same fields (the value as a hex string, the command as JSON).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use memos_runtime::Config;
use std::collections::HashSet;

use memos_schemas::MemoryCommand;
use memos_schemas::registry::{CommandKind, RELEASED, registry};
use serde_json::{Value, json};

use crate::logread::{self, LogRecord};

/// The schema of an exported record, without its `command` field (added by
/// [`export_schema_json`]).
const EXPORT_SCHEMA_BASE: &str = r#"{
  "type": "record",
  "name": "LogRecord",
  "namespace": "memos.export",
  "doc": "One record of a memOS command topic, exactly as in the log, with its position.",
  "fields": [
    {"name": "topic", "type": "string"},
    {"name": "partition", "type": "int"},
    {"name": "offset", "type": "long"},
    {"name": "timestamp", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "doc": "Kafka record timestamp"},
    {"name": "key", "type": ["null", "bytes"]},
    {"name": "headers", "type": {"type": "array", "items": {
      "type": "record", "name": "Header",
      "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": ["null", "bytes"]}]}}},
    {"name": "value", "type": ["null", "bytes"], "doc": "The record value as in the log: Avro single-object encoding"},
    {"name": "schema", "type": ["null", "string"], "doc": "Full name of the command's schema, when it decodes"},
    {"name": "command_json", "type": ["null", "string"], "doc": "The decoded command as JSON, when it decodes"}
  ]
}"#;

/// The command kinds, in the order of the `command` union's branches (after `null`).
const KINDS: [CommandKind; 6] = [
    CommandKind::WriteMemory,
    CommandKind::UpdateMemory,
    CommandKind::ForgetMemory,
    CommandKind::ShareMemory,
    CommandKind::RevokeShare,
    CommandKind::RegisterTool,
];

/// Replaces every named type defined a second time by a reference to its full name (the
/// command schemas each define the `Tier` enum; a union of them may define it once).
fn dedupe_named(value: &mut Value, namespace: &str, defined: &mut HashSet<String>) {
    match value {
        Value::Object(map) => {
            let named = matches!(
                map.get("type").and_then(Value::as_str),
                Some("record" | "enum" | "fixed")
            );
            let mut inner = namespace.to_owned();
            if named && let Some(name) = map.get("name").and_then(Value::as_str) {
                let space = map
                    .get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(namespace)
                    .to_owned();
                let full = if name.contains('.') || space.is_empty() {
                    name.to_owned()
                } else {
                    format!("{space}.{name}")
                };
                if !defined.insert(full.clone()) {
                    *value = Value::String(full);
                    return;
                }
                inner = full.rsplit_once('.').map_or(String::new(), |(s, _)| s.to_owned());
            }
            for (_, child) in map.iter_mut() {
                dedupe_named(child, &inner, defined);
            }
        }
        Value::Array(items) => {
            for item in items {
                dedupe_named(item, namespace, defined);
            }
        }
        _ => {}
    }
}

/// The export schema: [`EXPORT_SCHEMA_BASE`] plus a `command` field, a union of `null` and
/// the current schema of every command, holding the decoded command.
pub fn export_schema_json() -> String {
    let mut base: Value = serde_json::from_str(EXPORT_SCHEMA_BASE).expect("export schema is JSON");
    let mut defined = HashSet::new();
    let mut branches = vec![Value::String("null".into())];
    for kind in KINDS {
        let current = registry().current(kind);
        let released = RELEASED
            .iter()
            .find(|r| r.kind == kind && r.version == current.version)
            .expect("the current schema is released");
        let mut schema: Value = serde_json::from_str(released.json).expect("released schemas are JSON");
        dedupe_named(&mut schema, "", &mut defined);
        branches.push(schema);
    }
    let field = json!({
        "name": "command",
        "type": branches,
        "doc": "The decoded command in its current schema (null when the record does not decode)",
        "default": null,
    });
    if let Some(Value::Array(fields)) = base.get_mut("fields") {
        fields.push(field);
    }
    base.to_string()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Avro,
    Jsonl,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Only commands in this agent's namespace or issued by it (default: every command).
    #[arg(long)]
    agent: Option<String>,
    /// Start, RFC 3339, inclusive (default: the beginning of the log).
    #[arg(long)]
    from: Option<String>,
    /// End, RFC 3339, exclusive (default: now).
    #[arg(long)]
    to: Option<String>,
    #[arg(long, value_enum, default_value = "avro")]
    format: Format,
    /// The file to write.
    #[arg(long)]
    output: PathBuf,
}

/// A record with its decoded command, ready to write.
struct Exported {
    record: LogRecord,
    command: Option<MemoryCommand>,
}

fn command_json(command: &MemoryCommand) -> Value {
    let body = match command {
        MemoryCommand::Write(c) => serde_json::to_value(c),
        MemoryCommand::Update(c) => serde_json::to_value(c),
        MemoryCommand::Forget(c) => serde_json::to_value(c),
        MemoryCommand::Share(c) => serde_json::to_value(c),
        MemoryCommand::Revoke(c) => serde_json::to_value(c),
        MemoryCommand::RegisterTool(c) => serde_json::to_value(c),
    };
    body.unwrap_or(Value::Null)
}

fn nullable(value: Option<Avro>) -> Avro {
    match value {
        None => Avro::Union(0, Box::new(Avro::Null)),
        Some(v) => Avro::Union(1, Box::new(v)),
    }
}

fn avro_value(e: &Exported) -> Avro {
    let r = &e.record;
    let headers = r
        .headers
        .iter()
        .map(|(k, v)| {
            Avro::Record(vec![
                ("key".into(), Avro::String(k.clone())),
                ("value".into(), nullable(v.clone().map(Avro::Bytes))),
            ])
        })
        .collect();
    Avro::Record(vec![
        ("topic".into(), Avro::String(r.topic.clone())),
        ("partition".into(), Avro::Int(r.partition)),
        ("offset".into(), Avro::Long(r.offset)),
        (
            "timestamp".into(),
            nullable(r.timestamp_ms.map(Avro::TimestampMillis)),
        ),
        ("key".into(), nullable(r.key.clone().map(Avro::Bytes))),
        ("headers".into(), Avro::Array(headers)),
        ("value".into(), nullable(r.payload.clone().map(Avro::Bytes))),
        (
            "schema".into(),
            nullable(
                e.command
                    .as_ref()
                    .map(|c| Avro::String(c.kind().full_name().into())),
            ),
        ),
        (
            "command_json".into(),
            nullable(
                e.command
                    .as_ref()
                    .map(|c| Avro::String(command_json(c).to_string())),
            ),
        ),
        ("command".into(), command_union(e)),
    ])
}

/// The decoded command as a branch of the `command` union: the record read into the current
/// schema of its kind, exactly as the projector reads it.
fn command_union(e: &Exported) -> Avro {
    let decoded = e
        .command
        .as_ref()
        .and(e.record.payload.as_deref())
        .and_then(|payload| registry().decode_value(payload).ok());
    match decoded {
        Some((kind, value)) => match KINDS.iter().position(|k| *k == kind) {
            Some(i) => Avro::Union(i as u32 + 1, Box::new(value)),
            None => Avro::Union(0, Box::new(Avro::Null)),
        },
        None => Avro::Union(0, Box::new(Avro::Null)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn json_value(e: &Exported) -> Value {
    let r = &e.record;
    json!({
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "time": r.time().map(|t| t.to_rfc3339()),
        "key": r.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": r.headers.iter().map(|(k, v)| json!({
            "key": k,
            "value": v.as_deref().map(|v| String::from_utf8_lossy(v).into_owned()),
        })).collect::<Vec<_>>(),
        "value_hex": r.payload.as_deref().map(hex),
        "schema": e.command.as_ref().map(|c| c.kind().full_name()),
        "command": e.command.as_ref().map(command_json),
    })
}

pub async fn run(config: &Config, args: ExportArgs) -> anyhow::Result<()> {
    let from = args
        .from
        .as_deref()
        .map(|t| logread::parse_time("from", t))
        .transpose()?;
    let to = match args.to.as_deref() {
        Some(t) => logread::parse_time("to", t)?,
        None => Utc::now(),
    };
    if from.is_some_and(|f| f >= to) {
        anyhow::bail!("E_ARGUMENT: --from must be before --to");
    }
    let kafka = config.kafka.clone();
    let topic = config.topics.memory_commands.clone();
    let agent = args.agent.clone();
    let selected =
        tokio::task::spawn_blocking(move || select(&kafka, &topic, agent.as_deref(), from, to)).await??;
    let count = selected.len();
    write(&args.output, args.format, &selected)?;
    eprintln!(
        "exported {count} records to {} ({:?})",
        args.output.display(),
        args.format
    );
    Ok(())
}

fn select(
    kafka: &memos_runtime::config::KafkaConfig,
    topic: &str,
    agent: Option<&str>,
    from: Option<DateTime<Utc>>,
    to: DateTime<Utc>,
) -> anyhow::Result<Vec<Exported>> {
    let consumer = logread::reader(kafka)?;
    // Producers set the timestamps, which may be slightly out of order: widen the offsets
    // window and select by each record's own timestamp.
    let ranges = logread::ranges_between(
        &consumer,
        topic,
        from.map(|f| f - chrono::Duration::minutes(1)),
        Some(to + chrono::Duration::minutes(1)),
    )?;
    let mut out = Vec::new();
    logread::scan(&consumer, topic, &ranges, |record| {
        let in_window = record
            .time()
            .is_some_and(|t| from.is_none_or(|f| t >= f) && t < to);
        if !in_window {
            return Ok(true);
        }
        let command = record
            .payload
            .as_deref()
            .and_then(|p| MemoryCommand::decode(p).ok());
        let selected = match (agent, &command) {
            (None, _) => true,
            (Some(a), Some(c)) => c.namespace() == a || c.actor() == a,
            // An undecodable record belongs to the namespace it is keyed by.
            (Some(a), None) => record.key.as_deref() == Some(a.as_bytes()),
        };
        if selected {
            out.push(Exported { record, command });
        }
        Ok(true)
    })?;
    out.sort_by_key(|e| (e.record.partition, e.record.offset));
    Ok(out)
}

fn write(path: &Path, format: Format, records: &[Exported]) -> anyhow::Result<()> {
    let partial = path.with_extension(match path.extension() {
        Some(ext) => format!("{}.partial", ext.to_string_lossy()),
        None => "partial".into(),
    });
    let file =
        File::create(&partial).with_context(|| format!("E_OUTPUT: cannot create {}", partial.display()))?;
    let mut out = BufWriter::new(file);
    match format {
        Format::Avro => {
            let schema = Schema::parse_str(&export_schema_json()).context("export schema")?;
            let mut writer = apache_avro::Writer::new(&schema, &mut out)?;
            for record in records {
                writer
                    .append_value(avro_value(record))
                    .context("E_OUTPUT: cannot encode an exported record")?;
            }
            writer.flush()?;
        }
        Format::Jsonl => {
            for record in records {
                serde_json::to_writer(&mut out, &json_value(record))?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    out.into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()
        .with_context(|| format!("E_OUTPUT: cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| {
        format!(
            "E_OUTPUT: cannot rename {} to {}",
            partial.display(),
            path.display()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_schema_parses_and_accepts_a_record() {
        let schema = Schema::parse_str(&export_schema_json()).unwrap();
        let exported = Exported {
            record: LogRecord {
                topic: "t".into(),
                partition: 1,
                offset: 2,
                timestamp_ms: Some(1_790_000_000_000),
                key: Some(b"agent".to_vec()),
                payload: Some(vec![0xc3, 0x01, 0, 1]),
                headers: vec![("h".into(), Some(b"v".to_vec())), ("n".into(), None)],
            },
            command: None,
        };
        let mut writer = apache_avro::Writer::new(&schema, Vec::new()).unwrap();
        writer.append_value(avro_value(&exported)).unwrap();
        let bytes = writer.into_inner().unwrap();
        let reader = apache_avro::Reader::new(&bytes[..]).unwrap();
        assert_eq!(reader.count(), 1);
    }
}
