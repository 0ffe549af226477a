//! `memosctl bench projector`: produces N realistic commands, then measures
//!
//! 1. the real projector (`memos run projector`, a child process) catching up on them, with
//!    every index of the views on, and its resident memory;
//! 2. the ceiling: the rows the projector wrote (memories, memory_history, memory_commands)
//!    loaded with a plain binary `COPY` into a fresh database with the same indexes, in one
//!    transaction;
//! 3. the naive consumer: the first M records applied one transaction per record with the
//!    projector's own functions (`batch::prepare` and `batch::apply`), Redis left out.
//!
//! Rates are events (log records) per second: N over the projector's catch-up time, N over
//! the COPY time, M over the naive apply time.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;
use memos_kafka::CommandProducer;
use memos_kafka::headers;
use memos_projector::batch::{self, Record, Sinks};
use memos_projector::fold::FoldConfig;
use memos_redis::HotViews;
use memos_runtime::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool};

use super::commands::{Generator, Mix};
use super::sys::{self, CpuUsage, Machine, round};
use super::{Isolation, MemosProcess};

#[derive(clap::Args)]
pub struct Args {
    /// Commands to produce and apply.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// `projector.max_batch_records` of the projector under test.
    #[arg(long, default_value_t = 2000)]
    batch_records: usize,
    /// `projector.max_batch_bytes` of the projector under test.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    batch_bytes: usize,
    /// Records the naive consumer applies (at most --events).
    #[arg(long, default_value_t = 20_000)]
    naive_events: u64,
    /// Embedding dimension (default: memory.embedding_dimensions of the configuration).
    #[arg(long)]
    embedding_dimensions: Option<usize>,
    /// Share of writes carrying an embedding (updates: half of it); 0 isolates the cost of
    /// the vector index.
    #[arg(long, default_value_t = 0.1)]
    embedding_fraction: f64,
    /// Agent namespaces the commands spread over.
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Longest wait for the projector to catch up; past it the run stops and reports what
    /// was applied so far (`complete: false`; the references then use the applied rows).
    #[arg(long, default_value = "60m", value_parser = super::parse_duration)]
    timeout: Duration,
    /// How often to scrape the projector's /metrics, as Prometheus would (0: never). The
    /// metrics recorder drains its histogram samples only when rendered.
    #[arg(long, default_value = "15s", value_parser = super::parse_duration)]
    scrape_interval: Duration,
    /// Skip the COPY ceiling and the naive consumer (projector only).
    #[arg(long)]
    skip_references: bool,
    /// Diagnostics: log every statement of the projector's database slower than this many
    /// ms to the PostgreSQL server log (`log_min_duration_statement`; 0 logs all; slows the
    /// run down).
    #[arg(long)]
    statement_log_ms: Option<u64>,
    /// Keep the databases, topics and Redis keys.
    #[arg(long)]
    keep: bool,
    /// The `memos` binary (default: next to memosctl).
    #[arg(long)]
    memos_bin: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    date: String,
    run_id: String,
    events: u64,
    /// False when --timeout stopped the projector before it caught up.
    complete: bool,
    /// Records the projector applied (all of them when complete); the rates use this.
    events_applied: i64,
    partitions: i32,
    batch_records: usize,
    embedding_dimensions: usize,
    embedding_fraction: f64,
    mix: Mix,
    produce_seconds: f64,
    produce_mb: f64,
    events_per_sec: f64,
    catch_up_seconds: f64,
    /// From starting the process to the last offset applied (start-up and group join
    /// included).
    seconds_from_start: f64,
    events_per_sec_from_start: f64,
    /// Catch-up rate over each fifth of the backlog (does it slow down as the tables grow?).
    events_per_sec_by_fifth: Vec<f64>,
    projector_rss_mb: f64,
    projector_rss_end_mb: f64,
    /// Resident memory when each fifth of the backlog had been applied.
    projector_rss_mb_by_fifth: Vec<f64>,
    metrics_scrape_interval_seconds: f64,
    metrics_scrapes: u64,
    projector_cpu: CpuUsage,
    applied: i64,
    rejected: i64,
    rows: BTreeMap<String, i64>,
    table_mb: BTreeMap<String, f64>,
    copy_ceiling_events_per_sec: Option<f64>,
    copy_seconds: Option<f64>,
    copy_mb: Option<f64>,
    /// Seconds of each table's COPY inside the transaction (the commit is in copy_seconds).
    copy_seconds_by_table: Option<BTreeMap<String, f64>>,
    copy_cpu: Option<CpuUsage>,
    naive_events_per_sec: Option<f64>,
    naive_events: Option<u64>,
    naive_seconds: Option<f64>,
    naive_cpu: Option<CpuUsage>,
    ratio_of_copy_ceiling: Option<f64>,
    speedup_over_naive: Option<f64>,
    machine: Machine,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be positive");
    let memos = super::memos_binary(args.memos_bin.clone())?;
    let mut iso = Isolation::new(config, args.partitions);
    eprintln!(
        "bench: run {} (database memos_bench_{}_*, topic {})",
        iso.id, iso.id, iso.commands_topic
    );
    let result = run_isolated(config, &args, &memos, &mut iso).await;
    iso.cleanup(config, args.keep).await;
    let output = result?;
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

async fn run_isolated(
    config: &Config,
    args: &Args,
    memos: &PathBuf,
    iso: &mut Isolation,
) -> anyhow::Result<Output> {
    let dims = args
        .embedding_dimensions
        .unwrap_or(config.memory.embedding_dimensions);
    let (bench_url, bench_pool) = iso.create_database("views", dims).await?;
    if let Some(ms) = args.statement_log_ms {
        iso.alter_database(&bench_url, &format!("log_min_duration_statement = {ms}"))
            .await?;
        iso.alter_database(&bench_url, "log_parameter_max_length = 0")
            .await?;
    }
    iso.create_topics(config).await?;

    // 1. The backlog.
    eprintln!("bench: producing {} commands", args.events);
    let produced = produce(config, &iso.commands_topic, args, dims).await?;
    eprintln!(
        "bench: produced {} commands ({:.1} MB) in {:.1}s",
        args.events,
        produced.bytes as f64 / 1e6,
        produced.seconds
    );
    let end_offsets = end_offsets(config, &iso.commands_topic, args.partitions).await?;
    let total: i64 = end_offsets.values().sum();
    anyhow::ensure!(
        total == args.events as i64,
        "the topic holds {total} records, expected {}",
        args.events
    );

    // 2. The projector.
    iso.checkpoint().await;
    let caught_up = catch_up(config, args, memos, iso, &bench_url, &bench_pool, dims, total).await?;
    let (applied, rejected) = statuses(&bench_pool).await?;
    let (rows, table_mb) = table_stats(&bench_pool).await?;

    // 3. and 4. The references.
    let (mut copy, mut naive) = (None, None);
    if !args.skip_references {
        bench_pool.close().await;
        copy = Some(copy_ceiling(iso, &bench_url, dims, args.keep).await?);
        naive = Some(run_naive(config, args, iso, dims).await?);
    }
    bench_pool.close().await;

    let events = caught_up.applied as f64;
    let events_per_sec = events / caught_up.catch_up_seconds;
    // The rows copied are those of every command decided (a stopped run may have committed
    // one more batch while shutting down).
    let decided = (applied + rejected) as f64;
    let copy_rate = copy.as_ref().map(|c| decided / c.seconds);
    let naive_rate = naive.as_ref().map(|n| n.events as f64 / n.seconds);
    Ok(Output {
        bench: "projector",
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        run_id: iso.id.clone(),
        events: args.events,
        complete: caught_up.applied >= total,
        events_applied: caught_up.applied,
        partitions: args.partitions,
        batch_records: args.batch_records,
        embedding_dimensions: dims,
        embedding_fraction: args.embedding_fraction,
        mix: produced.mix,
        produce_seconds: round(produced.seconds, 3),
        produce_mb: round(produced.bytes as f64 / 1e6, 1),
        events_per_sec: round(events_per_sec, 0),
        catch_up_seconds: round(caught_up.catch_up_seconds, 3),
        seconds_from_start: round(caught_up.from_start_seconds, 3),
        events_per_sec_from_start: round(events / caught_up.from_start_seconds, 0),
        events_per_sec_by_fifth: caught_up.by_fifth,
        projector_rss_mb: round(caught_up.peak_rss_kb as f64 / 1024.0, 1),
        projector_rss_end_mb: round(caught_up.end_rss_kb as f64 / 1024.0, 1),
        projector_rss_mb_by_fifth: caught_up.rss_by_fifth,
        metrics_scrape_interval_seconds: args.scrape_interval.as_secs_f64(),
        metrics_scrapes: caught_up.scrapes,
        projector_cpu: caught_up.cpu,
        applied,
        rejected,
        rows,
        table_mb,
        copy_ceiling_events_per_sec: copy_rate.map(|r| round(r, 0)),
        copy_seconds: copy.as_ref().map(|c| round(c.seconds, 3)),
        copy_mb: copy.as_ref().map(|c| round(c.bytes as f64 / 1e6, 1)),
        copy_seconds_by_table: copy.as_ref().map(|c| c.by_table.clone()),
        copy_cpu: copy.map(|c| c.cpu),
        naive_events_per_sec: naive_rate.map(|r| round(r, 1)),
        naive_events: naive.as_ref().map(|n| n.events),
        naive_seconds: naive.as_ref().map(|n| round(n.seconds, 3)),
        naive_cpu: naive.map(|n| n.cpu),
        ratio_of_copy_ceiling: copy_rate.map(|c| round(events_per_sec / c, 3)),
        speedup_over_naive: naive_rate.map(|n| round(events_per_sec / n, 1)),
        machine: sys::machine(),
    })
}

pub(super) struct Produced {
    pub seconds: f64,
    pub bytes: u64,
    pub mix: Mix,
}

/// Counts delivery reports.
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("lock");
                if first.is_none() {
                    *first = Some(e.to_string());
                }
            }
        }
    }
}

/// Generates and produces the commands as fast as the producer takes them, with the headers
/// the API sets; key = namespace, as the API does.
async fn produce(config: &Config, topic: &str, args: &Args, dims: usize) -> anyhow::Result<Produced> {
    let spec = Backlog {
        events: args.events,
        seed: args.seed,
        namespaces: args.namespaces,
        embedding_fraction: args.embedding_fraction,
        dimensions: dims,
    };
    produce_backlog(config, topic, &spec).await
}

/// What [`produce_backlog`] generates.
pub(super) struct Backlog {
    pub events: u64,
    pub seed: u64,
    pub namespaces: usize,
    pub embedding_fraction: f64,
    pub dimensions: usize,
}

/// Produces `spec.events` seeded commands to `topic` and waits for every acknowledgement.
pub(super) async fn produce_backlog(
    config: &Config,
    topic: &str,
    spec: &Backlog,
) -> anyhow::Result<Produced> {
    let dims = spec.dimensions;
    let mut client = memos_kafka::client::base_config(&config.kafka, "bench-producer");
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576");
    let producer: ThreadedProducer<Deliveries> = client.create_with_context(Deliveries::default())?;
    let topic = topic.to_owned();
    let (events, seed, namespaces, fraction) =
        (spec.events, spec.seed, spec.namespaces, spec.embedding_fraction);
    tokio::task::spawn_blocking(move || {
        let mut generator = Generator::new(seed, namespaces, dims).with_embedding_fraction(fraction);
        let start = Instant::now();
        let mut bytes = 0u64;
        for i in 0..events {
            let command = generator.next_command();
            let payload = command.encode()?;
            bytes += payload.len() as u64;
            let record_headers = OwnedHeaders::new()
                .insert(Header {
                    key: headers::COMMAND_ID,
                    value: Some(command.command_id()),
                })
                .insert(Header {
                    key: headers::SCHEMA,
                    value: Some(command.kind().full_name()),
                })
                .insert(Header {
                    key: headers::ACTOR,
                    value: Some(command.actor()),
                });
            let mut record = BaseRecord::to(&topic)
                .key(command.namespace())
                .payload(&payload)
                .headers(record_headers);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err((e, _)) => anyhow::bail!("cannot produce: {e}"),
                }
            }
            if (i + 1) % 200_000 == 0 {
                eprintln!("bench: {} produced", i + 1);
            }
        }
        producer.flush(Duration::from_secs(300))?;
        let context = producer.context();
        let failed = context.failed.load(Ordering::Relaxed);
        anyhow::ensure!(
            failed == 0,
            "{failed} records were not delivered; first error: {:?}",
            context.first_error.lock().expect("lock")
        );
        anyhow::ensure!(context.delivered.load(Ordering::Relaxed) == events);
        Ok(Produced {
            seconds: start.elapsed().as_secs_f64(),
            bytes,
            mix: generator.mix,
        })
    })
    .await?
}

/// High watermark of every partition of `topic`.
async fn end_offsets(config: &Config, topic: &str, partitions: i32) -> anyhow::Result<BTreeMap<i32, i64>> {
    let kafka = config.kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = memos_kafka::client::base_config(&kafka, "bench").create()?;
        (0..partitions)
            .map(|p| {
                let (_, high) = client.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
                Ok((p, high))
            })
            .collect()
    })
    .await?
}

struct CaughtUp {
    applied: i64,
    catch_up_seconds: f64,
    from_start_seconds: f64,
    by_fifth: Vec<f64>,
    rss_by_fifth: Vec<f64>,
    scrapes: u64,
    peak_rss_kb: u64,
    end_rss_kb: u64,
    cpu: CpuUsage,
}

async fn applied_offsets(pool: &PgPool, topic: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM projection_offsets WHERE topic = $1",
    )
    .bind(topic)
    .fetch_one(pool)
    .await?)
}

/// Starts `memos run projector` on the bench resources and waits until it has applied every
/// record, sampling its memory.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    config: &Config,
    args: &Args,
    memos: &PathBuf,
    iso: &Isolation,
    url: &str,
    pool: &PgPool,
    dims: usize,
    total: i64,
) -> anyhow::Result<CaughtUp> {
    let mut env = iso.process_env(config, url, dims);
    env.extend(
        [
            ("MEMOS__HTTP__BIND", "127.0.0.1:0".to_owned()),
            (
                "MEMOS__PROJECTOR__MAX_BATCH_RECORDS",
                args.batch_records.to_string(),
            ),
            ("MEMOS__PROJECTOR__MAX_BATCH_BYTES", args.batch_bytes.to_string()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let cpu_before = sys::cpu_snapshot(&[]);
    let mut process = MemosProcess::spawn(
        memos,
        "projector",
        &env,
        &format!("memos-bench-{}-projector.log", iso.id),
    )?;
    // The child is absent from the snapshot taken before it started: all its time counts.
    let pid = process.pid();
    eprintln!(
        "bench: projector pid {pid} started, log {}",
        process.log.display()
    );
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = (!args.scrape_interval.is_zero())
        .then(|| tokio::spawn(scrape(process.log.clone(), args.scrape_interval, scrapes.clone())));
    let mut first_commit: Option<Instant> = None;
    let mut peak_rss = 0u64;
    let mut end_rss = 0u64;
    let mut last_report = Instant::now();
    let mut samples: Vec<(Instant, i64, u64)> = Vec::new();
    let mut applied;
    let done = loop {
        process.check_alive()?;
        applied = applied_offsets(pool, &iso.commands_topic).await?;
        let now = Instant::now();
        if let Some((rss, hwm)) = sys::rss_kb(pid) {
            peak_rss = peak_rss.max(rss).max(hwm);
            end_rss = rss;
        }
        if applied > 0 && first_commit.is_none() {
            first_commit = Some(now);
        }
        samples.push((now, applied, end_rss));
        if applied >= total {
            break now;
        }
        if process.started.elapsed() > args.timeout {
            eprintln!(
                "bench: timeout: the projector applied {applied} of {total} records within {:?}; \
                 reporting a partial run",
                args.timeout
            );
            break now;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            let rate = first_commit.map_or(0.0, |t| applied as f64 / t.elapsed().as_secs_f64());
            eprintln!(
                "bench: {applied}/{total} applied ({rate:.0}/s), rss {:.0} MB",
                end_rss as f64 / 1024.0
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some((rss, hwm)) = sys::rss_kb(pid) {
        peak_rss = peak_rss.max(rss).max(hwm);
        end_rss = rss;
    }
    let cpu = cpu_before.usage_until(&sys::cpu_snapshot(&[(pid, "projector")]));
    if let Some(scraper) = scraper {
        scraper.abort();
    }
    process.terminate(Duration::from_secs(30))?;
    let first = first_commit.context("the projector applied nothing before the timeout")?;
    let catch_up_seconds = done.duration_since(first).as_secs_f64().max(0.001);
    // Time at which each fifth of what was applied was applied.
    let mut marks = vec![first];
    let mut rss_by_fifth = Vec::new();
    for fifth in 1..=5 {
        let target = applied * fifth / 5;
        let (at, rss) = samples
            .iter()
            .find(|(_, applied, _)| *applied >= target)
            .map_or((done, end_rss), |(t, _, rss)| (*t, *rss));
        marks.push(at);
        rss_by_fifth.push(round(rss as f64 / 1024.0, 1));
    }
    let by_fifth = marks
        .windows(2)
        .map(|w| {
            let seconds = w[1].duration_since(w[0]).as_secs_f64().max(0.1);
            round(applied as f64 / 5.0 / seconds, 0)
        })
        .collect();
    Ok(CaughtUp {
        applied,
        catch_up_seconds,
        from_start_seconds: done.duration_since(process.started).as_secs_f64(),
        by_fifth,
        rss_by_fifth,
        scrapes: scrapes.load(Ordering::Relaxed),
        peak_rss_kb: peak_rss,
        end_rss_kb: end_rss,
        cpu,
    })
}

/// Scrapes `/metrics` of the process whose log is `log` every `interval`, as Prometheus
/// would, once its operations endpoint is listening.
async fn scrape(log: PathBuf, interval: Duration, scrapes: Arc<AtomicU64>) {
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let addr = text
            .lines()
            .filter(|l| l.contains("operations endpoint listening"))
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned));
        if let Some(addr) = addr {
            break addr;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let client = reqwest::Client::new();
    loop {
        tokio::time::sleep(interval).await;
        if let Ok(response) = client.get(format!("http://{addr}/metrics")).send().await
            && response.bytes().await.is_ok()
        {
            scrapes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn statuses(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM memory_commands GROUP BY status")
            .fetch_all(pool)
            .await?;
    let count = |s: &str| rows.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
    Ok((count("applied"), count("rejected")))
}

const TABLES: &[&str] = &["memories", "memory_history", "memory_commands"];

type TableStats = (BTreeMap<String, i64>, BTreeMap<String, f64>);

/// Rows and total size (heap, indexes, TOAST) of the view tables.
async fn table_stats(pool: &PgPool) -> anyhow::Result<TableStats> {
    let (mut rows, mut sizes) = (BTreeMap::new(), BTreeMap::new());
    for table in TABLES {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(pool)
            .await?;
        let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
            .bind(*table)
            .fetch_one(pool)
            .await?;
        rows.insert((*table).to_owned(), count);
        sizes.insert((*table).to_owned(), round(bytes as f64 / 1e6, 1));
    }
    Ok((rows, sizes))
}

/// The stored columns of each table (generated ones cannot be copied in).
const COPY_COLUMNS: &[(&str, &str)] = &[
    (
        "memories",
        "memory_id, namespace, content, tier, tags, metadata, importance, expires_at, embedding, \
         source, version, actor, created_by, created_at, updated_at, forgotten_at, log_partition, log_offset",
    ),
    (
        "memory_history",
        "memory_id, command_id, version, operation, actor, status, reason, change, state, \
         log_partition, log_offset, record_time, trace_id, valid_from, valid_to",
    ),
    (
        "memory_commands",
        "command_id, kind, namespace, memory_id, actor, status, reason, traceparent, log_topic, \
         log_partition, log_offset, record_time",
    ),
];

struct Timed {
    seconds: f64,
    bytes: u64,
    by_table: BTreeMap<String, f64>,
    cpu: CpuUsage,
}

/// Copies the projector's rows out (binary) to files, then times loading them into a fresh
/// database with the same indexes, all three tables in one transaction.
async fn copy_ceiling(
    iso: &mut Isolation,
    source_url: &str,
    dims: usize,
    keep: bool,
) -> anyhow::Result<Timed> {
    eprintln!("bench: COPY ceiling");
    let (target_url, target_pool) = iso.create_database("copy", dims).await?;
    target_pool.close().await;
    let dir = std::env::temp_dir();
    let mut files = Vec::new();
    let mut source = PgConnection::connect(source_url).await?;
    for (table, columns) in COPY_COLUMNS {
        let path = dir.join(format!("memos-bench-{}-{table}.copy", iso.id));
        let mut file = BufWriter::new(std::fs::File::create(&path)?);
        let mut stream = source
            .copy_out_raw(&format!("COPY {table} ({columns}) TO STDOUT (FORMAT binary)"))
            .await?;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk)?;
        }
        drop(stream);
        file.flush()?;
        files.push((*table, *columns, path));
    }
    source.close().await?;
    iso.retire_database(source_url, keep).await?;

    let mut target = PgConnection::connect(&target_url).await?;
    iso.checkpoint().await;
    let result = async {
        let cpu_before = sys::cpu_snapshot(&[]);
        let start = Instant::now();
        let mut bytes = 0u64;
        let mut by_table = BTreeMap::new();
        let mut tx = target.begin().await?;
        for (table, columns, path) in &files {
            let table_start = Instant::now();
            let mut copy = tx
                .copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN (FORMAT binary)"))
                .await?;
            let mut file = std::fs::File::open(path)?;
            let mut buffer = vec![0u8; 4 << 20];
            loop {
                let n = file.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                bytes += n as u64;
                copy.send(&buffer[..n]).await?;
            }
            copy.finish().await?;
            by_table.insert((*table).to_owned(), round(table_start.elapsed().as_secs_f64(), 3));
        }
        tx.commit().await?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu = cpu_before.usage_until(&sys::cpu_snapshot(&[]));
        anyhow::Ok(Timed {
            seconds,
            bytes,
            by_table,
            cpu,
        })
    }
    .await;
    for (_, _, path) in &files {
        let _ = std::fs::remove_file(path);
    }
    let _ = target.close().await;
    let timed = result.context("COPY into the ceiling database failed")?;
    iso.retire_database(&target_url, keep).await?;
    eprintln!(
        "bench: COPY of {:.1} MB took {:.2}s",
        timed.bytes as f64 / 1e6,
        timed.seconds
    );
    Ok(timed)
}

struct Naive {
    events: u64,
    seconds: f64,
    cpu: CpuUsage,
}

/// Reads the first M records, then applies each in its own transaction with the projector's
/// functions (no Redis).
async fn run_naive(config: &Config, args: &Args, iso: &mut Isolation, dims: usize) -> anyhow::Result<Naive> {
    let wanted = args.naive_events.min(args.events) as usize;
    eprintln!("bench: naive consumer on {wanted} records");
    let (_, pool) = iso.create_database("naive", dims).await?;
    let records = read_records(config, iso, wanted).await?;
    let sinks = Sinks {
        pool: pool.clone(),
        hot: HotViews::connect_with(
            config.redis.url.expose(),
            &format!("{}-naive", iso.redis_prefix),
            config.redis.memory_ttl,
            &memos_redis::hot::Settings::from(&config.redis),
        )
        .await?,
        producer: CommandProducer::new(&config.kafka)?,
        topic: iso.commands_topic.clone(),
        dead_letter_topic: iso.dead_letter_topic.clone(),
        dead_letter_max_bytes: memos_kafka::admin::dead_letter_max_bytes(&config.topics),
        projection: memos_projector::MEMORY_PROJECTION.to_owned(),
        fold: FoldConfig {
            topic: iso.commands_topic.clone(),
            embedding_dimensions: Some(dims),
        },
    };
    iso.checkpoint().await;
    let cpu_before = sys::cpu_snapshot(&[]);
    let start = Instant::now();
    for record in &records {
        let prepared = batch::prepare(std::slice::from_ref(record));
        batch::apply(&sinks, &prepared).await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_before.usage_until(&sys::cpu_snapshot(&[]));
    let (applied, rejected) = statuses(&pool).await?;
    anyhow::ensure!(
        applied + rejected == wanted as i64,
        "naive consumer decided {} of {wanted} commands",
        applied + rejected
    );
    pool.close().await;
    eprintln!("bench: naive applied {wanted} records in {seconds:.2}s");
    Ok(Naive {
        events: wanted as u64,
        seconds,
        cpu,
    })
}

/// The first `wanted` records of the bench topic (every partition from its beginning, in
/// the order the consumer delivers them; per partition that is log order).
async fn read_records(config: &Config, iso: &Isolation, wanted: usize) -> anyhow::Result<Vec<Record>> {
    let mut client = memos_kafka::client::base_config(&config.kafka, "bench-naive");
    client
        .set("group.id", format!("{}-naive", iso.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = client.create()?;
    let mut tpl = TopicPartitionList::new();
    for partition in 0..iso.partitions {
        tpl.add_partition_offset(&iso.commands_topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    tokio::task::spawn_blocking(move || {
        let mut records = Vec::with_capacity(wanted);
        let deadline = Instant::now() + Duration::from_secs(300);
        while records.len() < wanted {
            anyhow::ensure!(Instant::now() < deadline, "could not read {wanted} records");
            let Some(message) = consumer.poll(Duration::from_secs(1)) else {
                continue;
            };
            let message = message?;
            let header = |name: &str| {
                message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_owned)
                })
            };
            records.push(Record {
                partition: message.partition(),
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis(),
                key: message.key().map(<[u8]>::to_vec),
                traceparent: header(headers::TRACEPARENT),
                tracestate: header(headers::TRACESTATE),
                payload: message.payload().map(<[u8]>::to_vec),
            });
        }
        Ok(records)
    })
    .await?
}
