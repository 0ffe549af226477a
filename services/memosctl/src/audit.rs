//! `memosctl audit memory <id>` and `memosctl audit agent <id> --from T1 --to T2`: every
//! command about a memory, or issued by or for an agent (its namespace or its actor) in a
//! time window, with time, actor, operation, outcome (applied, or rejected with the reason),
//! log position and trace id. A table, or one JSON object per line with `--json`.
//!
//! By default the answer comes from the command-status view (`memory_commands`), which holds
//! one row per decided command. `--from-log` reads the same slice straight from Kafka (for an
//! agent, from the offsets Kafka finds for `--from` by timestamp) and joins every record to
//! the view by command id, so an auditor can check the view against the log: a record the
//! projector has passed but the view does not hold, or a view row whose record is not in the
//! log, is a discrepancy; the command then exits with status 2. Records the projector has not
//! reached yet are `pending`; a repeated command id is a `duplicate` (one effect); a record
//! that does not decode is `dead-lettered`.
//!
//! Reading never changes state (no group, no commit, read-only SQL).

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use memos_runtime::Config;
use memos_schemas::MemoryCommand;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::logread::{self, LogRecord};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Every command about one memory, in log order.
    Memory {
        /// The memory id (UUID).
        id: String,
        /// Read the commands from Kafka and check them against the view.
        #[arg(long)]
        from_log: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every command in the agent's namespace or issued by it, between two times.
    Agent {
        /// The agent id (a namespace and an actor).
        id: String,
        /// Start of the window, RFC 3339, inclusive (default: the beginning of the log).
        #[arg(long)]
        from: Option<String>,
        /// End of the window, RFC 3339, exclusive (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Read the commands from Kafka and check them against the view.
        #[arg(long)]
        from_log: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One audited command.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRow {
    pub time: Option<DateTime<Utc>>,
    pub actor: Option<String>,
    pub namespace: Option<String>,
    pub operation: String,
    pub memory_id: Option<Uuid>,
    pub command_id: Option<Uuid>,
    /// `applied`, `rejected`, `pending`, `duplicate`, `dead-lettered`, `missing-from-view`
    /// or `missing-from-log`.
    pub outcome: String,
    pub reason: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub trace_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct ViewRow {
    command_id: Uuid,
    kind: String,
    namespace: String,
    memory_id: Option<Uuid>,
    actor: String,
    status: String,
    reason: Option<String>,
    trace_id: Option<String>,
    log_topic: String,
    log_partition: i32,
    log_offset: i64,
    record_time: DateTime<Utc>,
}

impl ViewRow {
    fn audit(&self) -> AuditRow {
        AuditRow {
            time: Some(self.record_time),
            actor: Some(self.actor.clone()),
            namespace: Some(self.namespace.clone()),
            operation: self.kind.clone(),
            memory_id: self.memory_id,
            command_id: Some(self.command_id),
            outcome: self.status.clone(),
            reason: self.reason.clone(),
            topic: self.log_topic.clone(),
            partition: self.log_partition,
            offset: self.log_offset,
            trace_id: self.trace_id.clone().filter(|t| !t.is_empty()),
        }
    }
}

const VIEW_COLUMNS: &str = "command_id, kind, namespace, memory_id, actor, status, reason, trace_id, \
                            log_topic, log_partition, log_offset, record_time";

/// What to audit.
#[derive(Clone)]
enum Subject {
    Memory(Uuid),
    Agent {
        id: String,
        from: Option<DateTime<Utc>>,
        to: DateTime<Utc>,
    },
}

impl Subject {
    fn matches(&self, command: &MemoryCommand, time: Option<DateTime<Utc>>) -> bool {
        match self {
            Subject::Memory(id) => memory_of(command) == Some(*id),
            Subject::Agent { id, from, to } => {
                let in_window = time.is_some_and(|t| from.is_none_or(|f| t >= f) && t < *to);
                in_window && (command.namespace() == id || command.actor() == id)
            }
        }
    }
}

fn memory_of(command: &MemoryCommand) -> Option<Uuid> {
    let text = match command {
        MemoryCommand::Write(c) => Some(c.memory_id.as_str()),
        MemoryCommand::Update(c) => Some(c.memory_id.as_str()),
        MemoryCommand::Forget(c) => Some(c.memory_id.as_str()),
        MemoryCommand::Share(c) => c.memory_id.as_deref(),
        MemoryCommand::Revoke(c) => c.memory_id.as_deref(),
        MemoryCommand::RegisterTool(_) => None,
    };
    text.and_then(|t| Uuid::parse_str(t).ok())
}

fn operation_of(command: &MemoryCommand) -> String {
    command
        .kind()
        .full_name()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn view_rows(pool: &PgPool, subject: &Subject) -> anyhow::Result<Vec<ViewRow>> {
    let rows = match subject {
        Subject::Memory(id) => {
            let sql = format!(
                "SELECT {VIEW_COLUMNS} FROM memory_commands WHERE memory_id = $1
                 ORDER BY record_time, log_partition, log_offset"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_all(pool)
                .await
        }
        Subject::Agent { id, from, to } => {
            let sql = format!(
                "SELECT {VIEW_COLUMNS} FROM memory_commands
                 WHERE (namespace = $1 OR actor = $1)
                   AND ($2::timestamptz IS NULL OR record_time >= $2) AND record_time < $3
                 ORDER BY record_time, log_partition, log_offset"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
        }
    };
    rows.context("E_POSTGRES: cannot read the command-status view")
}

pub async fn run(config: &Config, command: AuditCommand) -> anyhow::Result<()> {
    let (subject, from_log, json) = match command {
        AuditCommand::Memory { id, from_log, json } => {
            let id = Uuid::parse_str(&id)
                .map_err(|_| anyhow::anyhow!("E_ARGUMENT: memory id {id:?} is not a UUID"))?;
            (Subject::Memory(id), from_log, json)
        }
        AuditCommand::Agent {
            id,
            from,
            to,
            from_log,
            json,
        } => {
            let from = from.map(|t| logread::parse_time("from", &t)).transpose()?;
            let to = match to {
                Some(t) => logread::parse_time("to", &t)?,
                None => Utc::now(),
            };
            if from.is_some_and(|f| f >= to) {
                anyhow::bail!("E_ARGUMENT: --from must be before --to");
            }
            (Subject::Agent { id, from, to }, from_log, json)
        }
    };
    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    let view = view_rows(&pool, &subject).await?;
    let (rows, discrepancies) = if from_log {
        let topic = config.topics.memory_commands.clone();
        let applied = memos_postgres::offsets::load(&pool, memos_projector::MEMORY_PROJECTION, &topic)
            .await
            .context("E_POSTGRES: cannot read the projection offsets")?;
        let records = read_log(config, &subject).await?;
        let by_id = view_by_command(&pool, &view, &records).await?;
        check_against_view(&records, &subject, &view, &by_id, &applied)
    } else {
        (view.iter().map(ViewRow::audit).collect(), 0)
    };
    print(&rows, json)?;
    if discrepancies > 0 {
        eprintln!("E_DISCREPANCY: {discrepancies} record(s) differ between the log and the view");
        std::process::exit(2);
    }
    Ok(())
}

/// The view's decision for every command of the subject's rows and of `records`: a
/// duplicate's first send may lie outside the subject's window, so the ids the log shows
/// are looked up too.
async fn view_by_command(
    pool: &PgPool,
    view: &[ViewRow],
    records: &[(LogRecord, Option<MemoryCommand>)],
) -> anyhow::Result<HashMap<Uuid, AuditRow>> {
    let mut by_id: HashMap<Uuid, AuditRow> = view.iter().map(|r| (r.command_id, r.audit())).collect();
    let missing: Vec<Uuid> = records
        .iter()
        .filter_map(|(_, c)| c.as_ref())
        .filter_map(|c| Uuid::parse_str(c.command_id()).ok())
        .filter(|id| !by_id.contains_key(id))
        .collect();
    if !missing.is_empty() {
        let sql = format!("SELECT {VIEW_COLUMNS} FROM memory_commands WHERE command_id = ANY($1)");
        let more: Vec<ViewRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&missing)
            .fetch_all(pool)
            .await
            .context("E_POSTGRES: cannot read the command-status view")?;
        by_id.extend(more.iter().map(|r| (r.command_id, r.audit())));
    }
    Ok(by_id)
}

async fn read_log(
    config: &Config,
    subject: &Subject,
) -> anyhow::Result<Vec<(LogRecord, Option<MemoryCommand>)>> {
    let kafka = config.kafka.clone();
    let topic = config.topics.memory_commands.clone();
    let (from, to) = match subject {
        Subject::Memory(_) => (None, None),
        // Timestamps are set by producers and may be slightly out of order: start a minute
        // early and filter every record by its own timestamp.
        Subject::Agent { from, to, .. } => (
            from.map(|f| f - chrono::Duration::minutes(1)),
            Some(*to + chrono::Duration::minutes(1)),
        ),
    };
    let subject = subject.clone();
    tokio::task::spawn_blocking(move || {
        let consumer = logread::reader(&kafka)?;
        let ranges = logread::ranges_between(&consumer, &topic, from, to)?;
        let mut records = Vec::new();
        logread::scan(&consumer, &topic, &ranges, |record| {
            let command = record
                .payload
                .as_deref()
                .and_then(|p| MemoryCommand::decode(p).ok());
            let keep = match &command {
                Some(c) => subject.matches(c, record.time()),
                None => matches!(subject, Subject::Agent { .. }),
            };
            if keep {
                records.push((record, command));
            }
            Ok(true)
        })?;
        Ok(records)
    })
    .await?
}

/// Joins the log's records with the view; returns the rows in log-time order and the number
/// of discrepancies.
fn check_against_view(
    records: &[(LogRecord, Option<MemoryCommand>)],
    subject: &Subject,
    view: &[ViewRow],
    by_id: &HashMap<Uuid, AuditRow>,
    applied: &HashMap<i32, i64>,
) -> (Vec<AuditRow>, usize) {
    let mut rows = Vec::new();
    let mut discrepancies = 0;
    let mut seen_positions: HashSet<(String, i32, i64)> = HashSet::new();
    for (record, command) in records {
        let passed = record.offset < applied.get(&record.partition).copied().unwrap_or(0);
        let trace_id = record
            .header(memos_kafka::headers::TRACEPARENT)
            .and_then(|t| memos_runtime::telemetry::trace_id_of(&t).map(str::to_owned));
        let Some(command) = command else {
            // An undecodable record concerns no memory we can name; an agent audit shows it
            // only when its key is the agent's namespace.
            let key = record.key.as_deref().map(String::from_utf8_lossy);
            let shown = match subject {
                Subject::Agent { id, from, to } => {
                    key.as_deref() == Some(id.as_str())
                        && record
                            .time()
                            .is_some_and(|t| from.is_none_or(|f| t >= f) && t < *to)
                }
                Subject::Memory(_) => false,
            };
            if shown {
                rows.push(AuditRow {
                    time: record.time(),
                    actor: record.header(memos_kafka::headers::ACTOR),
                    namespace: key.map(|k| k.into_owned()),
                    operation: record
                        .header(memos_kafka::headers::SCHEMA)
                        .unwrap_or_else(|| "?".into()),
                    memory_id: None,
                    command_id: record
                        .header(memos_kafka::headers::COMMAND_ID)
                        .and_then(|c| Uuid::parse_str(&c).ok()),
                    outcome: "dead-lettered".into(),
                    reason: Some("the record does not decode (see memosctl dlq list)".into()),
                    topic: record.topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                    trace_id,
                });
            }
            continue;
        };
        if !subject.matches(command, record.time()) {
            continue;
        }
        seen_positions.insert((record.topic.clone(), record.partition, record.offset));
        let command_id = Uuid::parse_str(command.command_id()).ok();
        let decided = command_id.and_then(|id| by_id.get(&id));
        let (outcome, reason) = match decided {
            Some(v)
                if v.partition == record.partition
                    && v.offset == record.offset
                    && v.topic == record.topic =>
            {
                (v.outcome.clone(), v.reason.clone())
            }
            Some(v) => (
                "duplicate".to_owned(),
                Some(format!(
                    "command id already decided at {}/{}:{}",
                    v.topic, v.partition, v.offset
                )),
            ),
            None if passed => {
                discrepancies += 1;
                (
                    "missing-from-view".to_owned(),
                    Some("the projector passed this record but the view has no decision for it".into()),
                )
            }
            None => ("pending".to_owned(), None),
        };
        rows.push(AuditRow {
            time: record.time(),
            actor: Some(command.actor().to_owned()),
            namespace: Some(command.namespace().to_owned()),
            operation: operation_of(command),
            memory_id: memory_of(command),
            command_id,
            outcome,
            reason,
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            trace_id: trace_id.or_else(|| {
                command
                    .traceparent()
                    .and_then(memos_runtime::telemetry::trace_id_of)
                    .map(str::to_owned)
            }),
        });
    }
    for row in view {
        if !seen_positions.contains(&(row.log_topic.clone(), row.log_partition, row.log_offset)) {
            discrepancies += 1;
            let mut audit = row.audit();
            audit.outcome = "missing-from-log".into();
            audit.reason = Some(format!(
                "the view decided this command ({}) but the log holds no such record",
                row.status
            ));
            rows.push(audit);
        }
    }
    rows.sort_by_key(|r| (r.time, r.partition, r.offset));
    (rows, discrepancies)
}

fn print(rows: &[AuditRow], json: bool) -> anyhow::Result<()> {
    if json {
        for row in rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    let table: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let outcome = match &r.reason {
                Some(reason) => format!("{} ({reason})", r.outcome),
                None => r.outcome.clone(),
            };
            [
                r.time
                    .map_or("?".into(), |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()),
                r.actor.clone().unwrap_or_else(|| "?".into()),
                r.operation.clone(),
                r.memory_id.map_or("-".into(), |m| m.to_string()),
                format!("{}:{}", r.partition, r.offset),
                r.trace_id.clone().unwrap_or_else(|| "-".into()),
                outcome,
            ]
        })
        .collect();
    let titles = [
        "TIME",
        "ACTOR",
        "OPERATION",
        "MEMORY",
        "POSITION",
        "TRACE",
        "OUTCOME",
    ];
    let mut widths = titles.map(|t| t.chars().count());
    for row in &table {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out
    };
    println!("{}", line(titles));
    for row in &table {
        println!("{}", line(std::array::from_fn(|i| row[i].as_str())));
    }
    if let Some(first) = rows.first() {
        println!("({} commands, topic {})", rows.len(), first.topic);
    } else {
        println!("(no commands)");
    }
    Ok(())
}
