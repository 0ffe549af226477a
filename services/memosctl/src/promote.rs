//! `memosctl promote <schema>`: makes a rebuilt (and verified) schema the one every memOS
//! process reads and writes, atomically and without downtime.
//!
//! How:
//! 1. Catch up: the records between the schema's stored offsets and the live ones are read
//!    from Kafka and applied to it with the projector's own apply step, repeatedly, until
//!    the gap is small. Nothing is locked yet; projectors and the API run as usual.
//! 2. Switch, in one transaction on the control connection: take the view-switch advisory
//!    lock exclusively (it waits for the apply transactions in flight, which hold it shared,
//!    and holds back new ones); apply the last records so that the schema's memory offsets
//!    equal the live ones exactly; copy the tables of the other projections (tasks), which
//!    this build does not rebuild, with their offsets; point `memos_control.active_view` at
//!    the schema with a new generation; commit.
//!
//! Guarantees: no command is applied twice or lost (the target's offsets equal the live
//! ones at the switch, and every apply transaction after it checks the generation and
//! retries on the new schema); no request fails (the API's queries never take the lock;
//! a connection of the old generation is replaced before it is handed out, so no request
//! starts on the old schema once the switch has committed; one already running finishes on
//! the old schema, which is equal up to the switch). The old schema is left in place: to go
//! back, promote it again (it is caught up the same way).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use memos_kafka::CommandProducer;
use memos_postgres::offsets::VIEW_SWITCH_LOCK;
use memos_projector::batch::{self, Sinks};
use memos_projector::fold::FoldConfig;
use memos_redis::HotViews;
use memos_runtime::Config;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

use crate::logread::{self, Range};

/// Catch-up rounds before switching when the gap is below this many records.
const SMALL_GAP: i64 = 2000;
const MAX_ROUNDS: usize = 10;
/// Records per applied batch while catching up.
const BATCH: usize = 2000;

#[derive(Args)]
pub struct PromoteArgs {
    /// The schema to make active (rebuilt with `memosctl replay`, checked with `verify`).
    pub schema: String,
    /// Longest time the switch may hold back the projectors.
    #[arg(long, default_value = "30s", value_parser = crate::bench::parse_duration)]
    pub lock_timeout: Duration,
}

/// The active schema and its generation.
async fn active(conn: &mut PgConnection) -> anyhow::Result<(String, i64)> {
    sqlx::query_as("SELECT schema_name, generation FROM memos_control.active_view")
        .fetch_one(&mut *conn)
        .await
        .context("E_POSTGRES: cannot read memos_control.active_view (run `memos migrate` first)")
}

async fn memory_offsets(
    conn: &mut PgConnection,
    schema: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT partition, next_offset FROM {schema}.projection_offsets WHERE projection = $1 AND topic = $2"
    )))
    .bind(memos_projector::MEMORY_PROJECTION)
    .bind(topic)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("E_POSTGRES: cannot read the offsets of schema {schema}"))?;
    Ok(rows.into_iter().collect())
}

/// The records `target` lacks to stand at `live`.
fn gap(target: &BTreeMap<i32, i64>, live: &BTreeMap<i32, i64>) -> Vec<Range> {
    live.iter()
        .map(|(&partition, &end)| Range {
            partition,
            start: target.get(&partition).copied().unwrap_or(0),
            end,
        })
        .filter(|r| r.start < r.end)
        .collect()
}

/// Reads `ranges` from the log and applies them to the schema of `sinks.pool` in batches.
async fn apply_ranges(config: &Config, sinks: &Sinks, ranges: Vec<Range>) -> anyhow::Result<u64> {
    if ranges.is_empty() {
        return Ok(0);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<batch::Record>>(4);
    let kafka = config.kafka.clone();
    let topic = sinks.topic.clone();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer = logread::reader(&kafka)?;
        let mut pending = Vec::with_capacity(BATCH);
        logread::scan(&consumer, &topic, &ranges, |record| {
            pending.push(batch::Record {
                traceparent: record.header(memos_kafka::headers::TRACEPARENT),
                tracestate: record.header(memos_kafka::headers::TRACESTATE),
                partition: record.partition,
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                key: record.key,
                payload: record.payload,
            });
            if pending.len() >= BATCH {
                return Ok(tx.blocking_send(std::mem::take(&mut pending)).is_ok());
            }
            Ok(true)
        })?;
        if !pending.is_empty() {
            let _ = tx.blocking_send(pending);
        }
        Ok(())
    });
    let mut applied = 0u64;
    while let Some(records) = rx.recv().await {
        let prepared = batch::prepare(&records);
        batch::apply(sinks, &prepared)
            .await
            .context("E_POSTGRES: applying the catch-up batch failed")?;
        applied += records.len() as u64;
    }
    reader.await??;
    Ok(applied)
}

/// A pool whose connections write into `schema` (not the active one), for the catch-up.
async fn schema_pool(url: &str, schema: &str) -> anyhow::Result<PgPool> {
    let set = format!("SET search_path TO {schema}, public");
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .after_connect(move |conn, _| {
            let set = set.clone();
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(set)).await?;
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// Columns of `schema.table` that can be inserted (not generated).
async fn insertable_columns(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<String>> {
    let columns: Vec<(String,)> = sqlx::query_as(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2 AND is_generated = 'NEVER'
         ORDER BY ordinal_position",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(columns.into_iter().map(|(c,)| format!("\"{c}\"")).collect())
}

/// Copies every table of `from` that the memory projection does not own into `to`
/// (replacing what `to` has), with sequence positions and the other projections' offsets.
/// Tables are copied in name order; the views have no foreign keys between tables (a
/// migration adding one would have to order this copy).
async fn carry_other_tables(conn: &mut PgConnection, from: &str, to: &str) -> anyhow::Result<Vec<String>> {
    let memory: Vec<&str> = memos_postgres::compare::MEMORY_TABLES
        .iter()
        .map(|t| t.name)
        .collect();
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT a.table_name::text FROM information_schema.tables a
         JOIN information_schema.tables b ON b.table_name = a.table_name AND b.table_schema = $2
         WHERE a.table_schema = $1 AND a.table_type = 'BASE TABLE'
           AND a.table_name <> '_sqlx_migrations' AND a.table_name <> ALL($3)
         ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(&memory)
    .fetch_all(&mut *conn)
    .await?;
    let mut carried = Vec::new();
    for (table,) in tables {
        let columns = insertable_columns(conn, from, &table).await?.join(", ");
        conn.execute(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {to}.\"{table}\";
             INSERT INTO {to}.\"{table}\" ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM {from}.\"{table}\""
        )))
        .await
        .with_context(|| format!("E_POSTGRES: cannot carry table {table} over to {to}"))?;
        carried.push(table);
    }
    // Sequences owned by those tables continue where the live ones are.
    let sequences: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT sequencename::text, last_value FROM pg_sequences WHERE schemaname = $1")
            .bind(from)
            .fetch_all(&mut *conn)
            .await?;
    for (sequence, last) in sequences {
        if let Some(last) = last {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT setval(to_regclass('{to}.\"{sequence}\"'), $1) WHERE to_regclass('{to}.\"{sequence}\"') IS NOT NULL"
            )))
            .bind(last)
            .execute(&mut *conn)
            .await?;
        }
    }
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {to}.projection_offsets WHERE projection <> '{memory}';
         INSERT INTO {to}.projection_offsets SELECT * FROM {from}.projection_offsets WHERE projection <> '{memory}'",
        memory = memos_projector::MEMORY_PROJECTION
    )))
    .await?;
    Ok(carried)
}

pub async fn run(config: &Config, args: PromoteArgs) -> anyhow::Result<()> {
    let target = args.schema.as_str();
    memos_postgres::bulk::check_schema_name(target)?;
    let url = config.postgres.url.expose().to_owned();
    let topic = config.topics.memory_commands.clone();
    let mut control = PgConnection::connect(&url)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    let (live, generation) = active(&mut control).await?;
    memos_postgres::bulk::check_schema_name(&live)?;
    if live == target {
        anyhow::bail!("E_ALREADY_ACTIVE: schema {target} is already the active view schema");
    }
    let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{target}.projection_offsets"))
        .fetch_one(&mut control)
        .await?;
    if !exists {
        anyhow::bail!(
            "E_NO_SCHEMA: schema {target} does not hold rebuilt views (run memosctl replay --into {target})"
        );
    }
    let sinks = Sinks {
        pool: schema_pool(&url, target).await?,
        hot: HotViews::from_config(&config.redis)
            .await
            .context("E_REDIS: cannot connect to Redis")?,
        producer: CommandProducer::new(&config.kafka).context("E_KAFKA: cannot create a producer")?,
        topic: topic.clone(),
        dead_letter_topic: config.topics.dead_letter.clone(),
        dead_letter_max_bytes: memos_kafka::admin::dead_letter_max_bytes(&config.topics),
        projection: memos_projector::MEMORY_PROJECTION.to_owned(),
        fold: FoldConfig {
            topic: topic.clone(),
            embedding_dimensions: Some(config.memory.embedding_dimensions),
        },
    };

    // 1. Catch up while everything runs.
    for round in 1..=MAX_ROUNDS {
        let live_offsets = memory_offsets(&mut control, &live, &topic).await?;
        let target_offsets = memory_offsets(&mut control, target, &topic).await?;
        let ranges = gap(&target_offsets, &live_offsets);
        let missing: i64 = ranges.iter().map(|r| r.end - r.start).sum();
        eprintln!("promote: catch-up round {round}: {target} is {missing} records behind {live}");
        if missing <= SMALL_GAP {
            break;
        }
        apply_ranges(config, &sinks, ranges).await?;
    }

    // 2. Switch.
    let started = Instant::now();
    let mut tx = control.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{}ms'",
        args.lock_timeout.as_millis()
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(VIEW_SWITCH_LOCK)
        .execute(&mut *tx)
        .await
        .context("E_LOCK: the projectors' apply transactions did not yield the view-switch lock in time")?;
    let (still_live, still_generation): (String, i64) =
        sqlx::query_as("SELECT schema_name, generation FROM memos_control.active_view FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    if (still_live.as_str(), still_generation) != (live.as_str(), generation) {
        anyhow::bail!("E_CONCURRENT: another promote switched to {still_live} meanwhile; nothing changed");
    }
    let live_offsets = memory_offsets(&mut tx, &live, &topic).await?;
    let target_offsets = memory_offsets(&mut tx, target, &topic).await?;
    let last = apply_ranges(config, &sinks, gap(&target_offsets, &live_offsets)).await?;
    let target_offsets = memory_offsets(&mut tx, target, &topic).await?;
    let behind: Vec<String> = live_offsets
        .iter()
        .filter(|(p, o)| target_offsets.get(p).copied().unwrap_or(0) != **o)
        .map(|(p, o)| {
            format!(
                "{p}: live {o}, {target} {}",
                target_offsets.get(p).copied().unwrap_or(0)
            )
        })
        .collect();
    if !behind.is_empty() || target_offsets.len() != live_offsets.len() {
        anyhow::bail!(
            "E_POSITION: {target} does not stand at the live offsets ({}); nothing changed",
            behind.join("; ")
        );
    }
    let carried = carry_other_tables(&mut tx, &live, target).await?;
    sqlx::query("UPDATE memos_control.active_view SET schema_name = $1, generation = generation + 1")
        .bind(target)
        .execute(&mut *tx)
        .await?;
    tx.commit()
        .await
        .context("E_POSTGRES: the switch did not commit; nothing changed")?;
    let held = started.elapsed();
    sinks.pool.close().await;
    control.close().await?;
    println!(
        "promoted {target} (generation {}): it replaces {live}; the switch applied the last {last} records and held the projectors back {:.0} ms{}",
        generation + 1,
        held.as_secs_f64() * 1000.0,
        if carried.is_empty() {
            String::new()
        } else {
            format!("; carried over {}", carried.join(", "))
        }
    );
    println!("the previous views stay in schema {live}; `memosctl promote {live}` switches back");
    Ok(())
}
