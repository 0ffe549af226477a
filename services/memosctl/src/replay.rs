//! `memosctl replay --projection memory --into <schema> [--until <time | P:O,...>]`: rebuilds
//! the memory views from the log into a fresh PostgreSQL schema through a bulk path.
//!
//! How: the schema is created and migrated like the live one, then its keys and indexes are
//! dropped. One thread reads the command topic from the start of every partition (assigned,
//! no group, nothing committed) up to the end offsets seen at start or the `--until` bound
//! and decodes the records with the projector's own [`batch::prepare`]; another decides them
//! in chunks with the projector's pure [`fold`], keeping the whole state in memory; the
//! decisions stream into `COPY` (command status and closed history rows as they are
//! decided; the history rows of current states, memories, shares and tools at the end). Keys and indexes are built once the rows are in, and the
//! schema's `projection_offsets` get, per partition, the next offset after the last record
//! replayed. Progress (records, rate, ETA) goes to stderr.
//!
//! Guarantees:
//! - Same decisions as the live projector: the fold is the same pure function, fed the same
//!   records in log order per partition, and a chunk boundary changes nothing (the fold's
//!   result does not depend on how the log is cut into batches). Records that do not decode
//!   are skipped, as the projector dead-letters them (nothing is sent to the dead-letter
//!   topic). So a rebuild up to the live projector's offsets verifies equal to the live views
//!   (`memosctl verify`).
//! - A projector pointed at the rebuilt schema continues exactly where the rebuild stopped:
//!   the stored next offsets are the end of the replayed range.
//! - The live views and consumer groups are never touched. A failed rebuild leaves a partial
//!   schema that `--replace` (or `DROP SCHEMA`) removes; it is never promoted by itself.
//! - A partition whose log no longer starts at offset 0 (retention deleted records) is an
//!   error: the history is incomplete and a rebuild would silently differ.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use memos_postgres::bulk;
use memos_postgres::memories::{HistoryRow, Memory, ShareKey, ShareRow, State, ToolRow};
use memos_projector::batch::{self, Record};
use memos_projector::fold::{self, FoldConfig};
use memos_runtime::Config;
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::logread::{self, Range};

/// Records decided per fold call.
const DEFAULT_CHUNK: usize = 4000;

#[derive(Args)]
pub struct ReplayArgs {
    /// Which views to rebuild: `memory` (from the memory commands) or `tasks` (from the
    /// orchestrator's task events).
    #[arg(long, default_value = "memory")]
    pub projection: String,
    /// The fresh schema to rebuild into (lower-case letters, digits, _).
    #[arg(long, value_name = "SCHEMA")]
    pub into: String,
    /// Stop at this record time (RFC 3339; records at or after it are left out), or at these
    /// next offsets per partition (`P:O,P:O`; offsets below O are replayed; partitions not
    /// named are replayed up to their end).
    #[arg(long)]
    pub until: Option<String>,
    /// Drop the schema first if it exists.
    #[arg(long)]
    pub replace: bool,
    /// Records per fold chunk.
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    pub chunk: usize,
    /// One JSON summary on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where a replay stops.
#[derive(Debug, Clone, PartialEq)]
pub enum Until {
    End,
    Time(chrono::DateTime<chrono::Utc>),
    Offsets(BTreeMap<i32, i64>),
}

pub fn parse_until(text: &str) -> anyhow::Result<Until> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(Until::Time(time.with_timezone(&chrono::Utc)));
    }
    let invalid =
        || anyhow::anyhow!("E_ARGUMENT: --until {text:?} is neither an RFC 3339 time nor P:O,P:O offsets");
    let mut offsets = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (p, o) = part.split_once(':').ok_or_else(invalid)?;
        let p: i32 = p.parse().map_err(|_| invalid())?;
        let o: i64 = o.parse().map_err(|_| invalid())?;
        if p < 0 || o < 0 {
            return Err(invalid());
        }
        offsets.insert(p, o);
    }
    if offsets.is_empty() {
        return Err(invalid());
    }
    Ok(Until::Offsets(offsets))
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub schema: String,
    pub records: u64,
    pub applied: u64,
    pub rejected: u64,
    pub duplicates: u64,
    pub undecodable: u64,
    pub memories: u64,
    pub history_rows: u64,
    /// Next offset per partition stored in the schema.
    pub next_offsets: BTreeMap<i32, i64>,
    /// Reading, deciding and loading the rows.
    pub load_seconds: f64,
    /// Building keys and indexes, then ANALYZE.
    pub index_seconds: f64,
    pub total_seconds: f64,
    /// Records per second over the whole rebuild.
    pub records_per_second: f64,
}

pub async fn run(config: &Config, args: ReplayArgs) -> anyhow::Result<()> {
    let tasks = match args.projection.as_str() {
        "memory" => false,
        "tasks" => true,
        other => anyhow::bail!("E_ARGUMENT: unknown projection {other:?}; expected memory or tasks"),
    };
    let until = args
        .until
        .as_deref()
        .map(parse_until)
        .transpose()?
        .unwrap_or(Until::End);
    if tasks {
        return crate::replay_tasks::run(config, &args, until).await;
    }
    let report = rebuild(config, &args.into, &until, args.replace, args.chunk, true).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "rebuilt schema {}: {} records ({} applied, {} rejected, {} duplicates, {} undecodable) -> {} memories, {} history rows in {:.1}s ({:.0} records/s; load {:.1}s, indexes {:.1}s)",
            report.schema,
            report.records,
            report.applied,
            report.rejected,
            report.duplicates,
            report.undecodable,
            report.memories,
            report.history_rows,
            report.total_seconds,
            report.records_per_second,
            report.load_seconds,
            report.index_seconds,
        );
        let offsets: Vec<String> = report
            .next_offsets
            .iter()
            .map(|(p, o)| format!("{p}:{o}"))
            .collect();
        println!("next offsets: {}", offsets.join(","));
        println!("compare with the live views: memosctl verify {}", report.schema);
    }
    Ok(())
}

/// The replay's ranges: every partition from offset 0 to its end or the `until` bound.
pub(crate) fn plan(
    kafka: &memos_runtime::config::KafkaConfig,
    topic: &str,
    until: &Until,
) -> anyhow::Result<Vec<Range>> {
    let consumer = logread::reader(kafka)?;
    let to = match until {
        Until::Time(t) => Some(*t),
        _ => None,
    };
    let mut ranges = logread::ranges_between(&consumer, topic, None, to)?;
    for range in &mut ranges {
        if range.start > 0 {
            anyhow::bail!(
                "E_LOG_TRUNCATED: partition {} of {topic} starts at offset {}: records were deleted, so the log no longer holds the whole history and cannot be replayed (see memosctl topics check)",
                range.partition,
                range.start
            );
        }
        if let Until::Offsets(offsets) = until
            && let Some(&end) = offsets.get(&range.partition)
        {
            if end > range.end {
                anyhow::bail!(
                    "E_ARGUMENT: --until {}:{end} is past the end of partition {} ({})",
                    range.partition,
                    range.partition,
                    range.end
                );
            }
            range.end = end;
        }
    }
    Ok(ranges)
}

/// The fold's whole state, kept in memory for the length of the rebuild.
struct Rebuilder {
    fold: FoldConfig,
    seen: HashSet<Uuid>,
    memories: HashMap<Uuid, Memory>,
    shares: HashMap<String, HashMap<ShareKey, ShareRow>>,
    tools: HashMap<String, HashMap<(String, String), ToolRow>>,
    /// The history row of each memory's current state, waiting for its `valid_to`. Its
    /// `state` is left out: it is the memory's state in `memories` until the row closes.
    open: HashMap<Uuid, HistoryRow>,
    report: Report,
}

/// `COPY` text decided from one chunk.
#[derive(Default)]
struct Rows {
    history: String,
    commands: String,
}

impl Rebuilder {
    /// Decides one decoded chunk of `records` records.
    fn chunk(&mut self, prepared: &batch::Prepared, records: usize) -> Rows {
        self.report.records += records as u64;
        self.report.undecodable += prepared.dead.len() as u64;
        let (command_ids, memory_ids, share_namespaces, tool_namespaces) = fold::touched(&prepared.commands);
        let mut state = State {
            seen: command_ids
                .into_iter()
                .filter(|id| self.seen.contains(id))
                .collect(),
            memories: memory_ids
                .iter()
                .filter_map(|id| self.memories.get(id).map(|m| (*id, m.clone())))
                .collect(),
            ..State::default()
        };
        for namespace in &share_namespaces {
            if let Some(shares) = self.shares.get(namespace) {
                state
                    .shares
                    .extend(shares.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        for namespace in &tool_namespaces {
            if let Some(tools) = self.tools.get(namespace) {
                state
                    .tools
                    .extend(tools.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        let outcome = fold::fold(state, &prepared.commands, &self.fold);
        self.report.applied += outcome.applied as u64;
        self.report.rejected += outcome.rejected.len() as u64;
        self.report.duplicates += outcome.duplicates as u64;
        let changes = outcome.changes;
        let mut rows = Rows::default();
        // `self.memories` still holds the states before this chunk: those of the open rows.
        for (id, until) in &changes.close_history {
            if let Some(row) = self.open.remove(id) {
                write_open(&mut rows.history, row, self.memories.get(id), Some(*until));
            }
        }
        for row in &changes.history {
            self.report.history_rows += 1;
            let opens = row.status == "applied" && row.valid_from.is_some() && row.valid_to.is_none();
            if opens {
                let open = HistoryRow {
                    memory_id: row.memory_id,
                    command_id: row.command_id,
                    version: row.version,
                    operation: row.operation.clone(),
                    actor: row.actor.clone(),
                    status: row.status.clone(),
                    reason: row.reason.clone(),
                    change: row.change.clone(),
                    state: None,
                    log_partition: row.log_partition,
                    log_offset: row.log_offset,
                    record_time: row.record_time,
                    trace_id: row.trace_id.clone(),
                    valid_from: row.valid_from,
                    valid_to: None,
                };
                if let Some(earlier) = self.open.insert(row.memory_id, open) {
                    // Cannot happen (the fold closes the earlier state); never lose a row.
                    let memory = self.memories.get(&row.memory_id);
                    write_open(&mut rows.history, earlier, memory, Some(row.record_time));
                }
            } else {
                bulk::history_line_start(&mut rows.history, row);
                bulk::history_line_end(&mut rows.history, row.valid_to);
            }
        }
        for command in &changes.commands {
            self.seen.insert(command.command_id);
            bulk::command_line(&mut rows.commands, command);
        }
        for memory in changes.memories {
            self.memories.insert(memory.memory_id, memory);
        }
        for key in &changes.shares_removed {
            if let Some(shares) = self.shares.get_mut(&key.0) {
                shares.remove(key);
            }
        }
        for share in changes.shares_added {
            self.shares
                .entry(share.namespace.clone())
                .or_default()
                .insert(share.key(), share);
        }
        for tool in changes.tools {
            self.tools
                .entry(tool.namespace.clone())
                .or_default()
                .insert((tool.namespace.clone(), tool.name.clone()), tool);
        }
        rows
    }
}

/// Writes an open history row with the state it stands for (the memory as it was while the
/// row was open) and its end.
fn write_open(
    out: &mut String,
    mut row: HistoryRow,
    memory: Option<&Memory>,
    valid_to: Option<chrono::DateTime<chrono::Utc>>,
) {
    row.state = memory.map(fold::history_state);
    bulk::history_line_start(out, &row);
    bulk::history_line_end(out, valid_to);
}

fn to_record(record: logread::LogRecord) -> Record {
    Record {
        traceparent: record.header(memos_kafka::headers::TRACEPARENT),
        tracestate: record.header(memos_kafka::headers::TRACESTATE),
        partition: record.partition,
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        payload: record.payload,
    }
}

/// Prints progress to stderr every second until `done` reaches `total` or `stop` is set.
fn progress(
    total: u64,
    done: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let tty = std::io::stderr().is_terminal();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let finished = stop.load(Ordering::Relaxed);
            let n = done.load(Ordering::Relaxed);
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let rate = n as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}s", total.saturating_sub(n) as f64 / rate)
            } else {
                "?".into()
            };
            let pct = (n * 100).checked_div(total).unwrap_or(100);
            let width = 30usize;
            let filled = (pct as usize * width / 100).min(width);
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
            let line = format!("replay [{bar}] {n}/{total} records ({pct}%), {rate:.0} records/s, ETA {eta}");
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            if finished || (total > 0 && n >= total) {
                if tty {
                    eprintln!();
                }
                if !finished {
                    eprintln!("replay: every record decided; writing the current states");
                }
                return;
            }
        }
    })
}

/// Rebuilds the memory views into `schema`; see the module documentation.
pub async fn rebuild(
    config: &Config,
    schema: &str,
    until: &Until,
    replace: bool,
    chunk: usize,
    show_progress: bool,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let url = config.postgres.url.expose().to_owned();
    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    bulk::create_schema(&pool, &url, schema, replace, &config.memory.text_search_config).await?;
    let mut admin = PgConnection::connect(&url)
        .await
        .context("E_POSTGRES: cannot connect")?;
    let loaded_tables = [
        "memories",
        "memory_history",
        "memory_commands",
        "memory_shares",
        "tools",
    ];
    let indexes = bulk::drop_indexes(&mut admin, schema, &loaded_tables).await?;

    let topic = config.topics.memory_commands.clone();
    let ranges = {
        let (kafka, topic, until) = (config.kafka.clone(), topic.clone(), until.clone());
        tokio::task::spawn_blocking(move || plan(&kafka, &topic, &until)).await??
    };
    let total: u64 = ranges.iter().map(|r| (r.end - r.start).max(0) as u64).sum();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let printer = show_progress.then(|| progress(total, done.clone(), stop.clone()));

    // Reader thread -> fold thread -> COPY streams, each hand-off bounded.
    let chunk = chunk.max(1);
    // Decoding happens on the reader thread, deciding on the fold thread: two cores' worth
    // of pipeline besides PostgreSQL.
    let (records_tx, mut records_rx) = mpsc::channel::<(batch::Prepared, usize)>(4);
    let reader = {
        let (kafka, topic, ranges) = (config.kafka.clone(), topic.clone(), ranges.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let consumer = logread::reader(&kafka)?;
            let mut pending = Vec::with_capacity(chunk);
            logread::scan(&consumer, &topic, &ranges, |record| {
                pending.push(to_record(record));
                if pending.len() >= chunk {
                    let full = std::mem::replace(&mut pending, Vec::with_capacity(chunk));
                    // A closed channel means the fold stopped on an error; stop reading.
                    let decoded = (batch::prepare(&full), full.len());
                    return Ok(records_tx.blocking_send(decoded).is_ok());
                }
                Ok(true)
            })?;
            if !pending.is_empty() {
                let _ = records_tx.blocking_send((batch::prepare(&pending), pending.len()));
            }
            Ok(())
        })
    };
    let (rows_tx, mut rows_rx) = mpsc::channel::<Rows>(4);
    let folder = {
        let fold_config = FoldConfig {
            topic: topic.clone(),
            embedding_dimensions: Some(config.memory.embedding_dimensions),
        };
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let mut rebuilder = Rebuilder {
                fold: fold_config,
                seen: HashSet::new(),
                memories: HashMap::new(),
                shares: HashMap::new(),
                tools: HashMap::new(),
                open: HashMap::new(),
                report: Report::default(),
            };
            while let Some((prepared, records)) = records_rx.blocking_recv() {
                let rows = rebuilder.chunk(&prepared, records);
                done.fetch_add(records as u64, Ordering::Relaxed);
                if rows_tx.blocking_send(rows).is_err() {
                    break;
                }
            }
            rebuilder
        })
    };

    let mut history_conn = PgConnection::connect(&url).await?;
    let mut commands_conn = PgConnection::connect(&url).await?;
    let loaded: anyhow::Result<Rebuilder> = async {
        let mut history = history_conn.copy_in_raw(&bulk::copy_history(schema)).await?;
        let mut commands = commands_conn.copy_in_raw(&bulk::copy_commands(schema)).await?;
        while let Some(rows) = rows_rx.recv().await {
            if !rows.history.is_empty() {
                history.send(rows.history.as_bytes()).await?;
            }
            if !rows.commands.is_empty() {
                commands.send(rows.commands.as_bytes()).await?;
            }
        }
        reader.await?.context("reading the log")?;
        let mut rebuilder = folder.await?;
        commands.finish().await?;
        // The states still current (no end yet) and the current memories, concurrently on
        // the two connections.
        let open = std::mem::take(&mut rebuilder.open);
        let memories = Arc::new(std::mem::take(&mut rebuilder.memories));
        // Encoding runs on two blocking threads, sending on the two connections here.
        let (history_tx, mut history_rx) = mpsc::channel::<String>(4);
        let encode_history = {
            let memories = memories.clone();
            tokio::task::spawn_blocking(move || {
                let mut buffer = String::new();
                for (id, row) in open {
                    write_open(&mut buffer, row, memories.get(&id), None);
                    if buffer.len() > 4 << 20
                        && history_tx.blocking_send(std::mem::take(&mut buffer)).is_err()
                    {
                        return;
                    }
                }
                if !buffer.is_empty() {
                    let _ = history_tx.blocking_send(buffer);
                }
            })
        };
        let (memories_tx, mut memories_rx) = mpsc::channel::<String>(4);
        let encode_memories = {
            let memories = memories.clone();
            tokio::task::spawn_blocking(move || {
                let mut buffer = String::new();
                for memory in memories.values() {
                    bulk::memory_line(&mut buffer, memory);
                    if buffer.len() > 4 << 20
                        && memories_tx.blocking_send(std::mem::take(&mut buffer)).is_err()
                    {
                        return;
                    }
                }
                if !buffer.is_empty() {
                    let _ = memories_tx.blocking_send(buffer);
                }
            })
        };
        let flush_history = async {
            while let Some(buffer) = history_rx.recv().await {
                history.send(buffer.as_bytes()).await?;
            }
            history.finish().await?;
            Ok::<_, sqlx::Error>(())
        };
        let copy_memories = async {
            let mut copy = commands_conn.copy_in_raw(&bulk::copy_memories(schema)).await?;
            while let Some(buffer) = memories_rx.recv().await {
                copy.send(buffer.as_bytes()).await?;
            }
            copy.finish().await?;
            Ok::<_, sqlx::Error>(())
        };
        tokio::try_join!(flush_history, copy_memories)?;
        encode_history.await?;
        encode_memories.await?;
        rebuilder.memories = Arc::try_unwrap(memories).unwrap_or_else(|shared| (*shared).clone());
        Ok(rebuilder)
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    if let Some(printer) = printer {
        let _ = printer.await;
    }
    let rebuilder = loaded?;
    if show_progress {
        eprintln!(
            "replay: rows loaded after {:.1}s; building keys and indexes",
            started.elapsed().as_secs_f64()
        );
    }

    let mut buffer = String::new();
    let mut copy = admin.copy_in_raw(&bulk::copy_shares(schema)).await?;
    for share in rebuilder.shares.values().flat_map(|s| s.values()) {
        bulk::share_line(&mut buffer, share);
    }
    copy.send(std::mem::take(&mut buffer).as_bytes()).await?;
    copy.finish().await?;
    let mut copy = admin.copy_in_raw(&bulk::copy_tools(schema)).await?;
    for tool in rebuilder.tools.values().flat_map(|t| t.values()) {
        bulk::tool_line(&mut buffer, tool);
    }
    copy.send(std::mem::take(&mut buffer).as_bytes()).await?;
    copy.finish().await?;

    // Where a projector continues: after the last replayed record of every partition that
    // has one (the live projector stores a row once it applied a partition's first batch).
    let next: BTreeMap<i32, i64> = ranges
        .iter()
        .filter(|r| r.end > 0)
        .map(|r| (r.partition, r.end))
        .collect();
    let partitions: Vec<i32> = next.keys().copied().collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.projection_offsets (projection, topic, partition, next_offset)
         SELECT $1, $2, p, o FROM UNNEST($3::int[], $4::bigint[]) AS u(p, o)"
    )))
    .bind(memos_projector::MEMORY_PROJECTION)
    .bind(&topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(&mut admin)
    .await?;
    let load_seconds = started.elapsed().as_secs_f64();

    // Keys first (each `ALTER TABLE` locks its table), then the other indexes, heaviest
    // first, each on a connection of its own, a few at a time. The vector index's dimension
    // comes from configuration.
    let index_start = Instant::now();
    let dimensions = config.memory.embedding_dimensions;
    let (keys, others): (Vec<bulk::IndexDef>, Vec<bulk::IndexDef>) =
        indexes.into_iter().partition(|d| d.constraint);
    let mut heavy_first: Vec<(String, &str)> = vec![(
        format!(
            "CREATE INDEX IF NOT EXISTS memories_embedding_hnsw_{dimensions} ON {schema}.memories
             USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops)
             WHERE embedding IS NOT NULL AND forgotten_at IS NULL"
        ),
        // An HNSW build is much faster while its graph fits in maintenance_work_mem.
        "1GB",
    )];
    let mut rest: Vec<&bulk::IndexDef> = others.iter().collect();
    rest.sort_by_key(|d| {
        (
            !d.create_statement().contains("USING gin"),
            d.table.clone(),
            d.name.clone(),
        )
    });
    heavy_first.extend(rest.iter().map(|d| (d.create_statement().to_owned(), "256MB")));
    let stages = [
        keys.iter()
            .map(|d| (d.create_statement().to_owned(), "256MB"))
            .collect::<Vec<_>>(),
        heavy_first,
    ];
    for stage in stages {
        let builds = stage.into_iter().map(|(statement, memory)| {
            let url = url.clone();
            async move {
                let mut conn = PgConnection::connect(&url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "SET maintenance_work_mem = '{memory}'"
                )))
                .execute(&mut conn)
                .await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                Ok::<_, sqlx::Error>(())
            }
        });
        let results: Vec<Result<(), sqlx::Error>> =
            futures::stream::iter(builds).buffer_unordered(3).collect().await;
        for result in results {
            result.context("E_POSTGRES: building the rebuilt schema's indexes failed")?;
        }
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ANALYZE {schema}.memories; ANALYZE {schema}.memory_history; ANALYZE {schema}.memory_commands;
         ANALYZE {schema}.memory_shares; ANALYZE {schema}.tools; ANALYZE {schema}.projection_offsets;"
    )))
    .execute(&mut admin)
    .await
    .context("E_POSTGRES: ANALYZE of the rebuilt schema failed")?;
    admin.close().await?;
    history_conn.close().await?;
    commands_conn.close().await?;

    let total_seconds = started.elapsed().as_secs_f64();
    let mut rebuilder = rebuilder;
    let report = &mut rebuilder.report;
    report.schema = schema.to_owned();
    report.memories = rebuilder.memories.len() as u64;
    report.next_offsets = next;
    report.load_seconds = load_seconds;
    report.index_seconds = index_start.elapsed().as_secs_f64();
    report.total_seconds = total_seconds;
    report.records_per_second = report.records as f64 / total_seconds.max(0.001);
    Ok(rebuilder.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_a_time_or_offsets() {
        assert!(matches!(
            parse_until("2026-01-02T03:04:05Z").unwrap(),
            Until::Time(_)
        ));
        assert_eq!(
            parse_until("0:10,2:5").unwrap(),
            Until::Offsets(BTreeMap::from([(0, 10), (2, 5)]))
        );
        for bad in ["", "x", "0:", "-1:3", "1:-3", "yesterday"] {
            assert!(parse_until(bad).is_err(), "{bad}");
        }
    }
}
