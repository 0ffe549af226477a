//! `memosctl bench replay`: produces N realistic commands (the generator of `bench
//! projector`: ~70% writes, 20% updates, 10% forgets, 10% of writes with an embedding), then
//! times `memosctl replay` rebuilding the memory views from them into a fresh schema, in
//! isolation (its own database and topic). The rate is log records per second over the whole
//! rebuild: reading, deciding, `COPY`, building every key and index (GIN full text, tags,
//! metadata; HNSW on the embeddings) and `ANALYZE`. With `--verify` the live projector is not
//! run; instead the rebuild is done twice with different chunk sizes and the two schemas must
//! compare equal (determinism at scale).

use std::time::Instant;

use memos_runtime::Config;
use serde::Serialize;

use super::Isolation;
use super::commands::Mix;
use super::projector::{Backlog, produce_backlog};
use super::sys::{self, CpuUsage, Machine, round};
use crate::replay::{self, Report, Until};

#[derive(clap::Args)]
pub struct Args {
    /// Commands to produce and replay.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Embedding dimension (default: memory.embedding_dimensions of the configuration).
    #[arg(long)]
    embedding_dimensions: Option<usize>,
    /// Share of writes carrying an embedding.
    #[arg(long, default_value_t = 0.1)]
    embedding_fraction: f64,
    /// Records per fold chunk.
    #[arg(long, default_value_t = 4000)]
    chunk: usize,
    /// Rebuild a second time with another chunk size and compare the two schemas.
    #[arg(long)]
    verify: bool,
    /// Keep the database and topics.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    date: String,
    run_id: String,
    events: u64,
    partitions: i32,
    embedding_dimensions: usize,
    embedding_fraction: f64,
    mix: Mix,
    produce_seconds: f64,
    produce_mb: f64,
    replay: Report,
    records_per_sec: f64,
    /// Reading, deciding and loading only (before keys and indexes).
    load_records_per_sec: f64,
    memosctl_peak_rss_mb: f64,
    cpu: CpuUsage,
    /// With --verify: whether a second rebuild with another chunking compared equal.
    verified_equal: Option<bool>,
    machine: Machine,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be positive");
    let mut iso = Isolation::new(config, args.partitions);
    eprintln!(
        "bench: run {} (database memos_bench_{}_views, topic {})",
        iso.id, iso.id, iso.commands_topic
    );
    let result = run_isolated(config, &args, &mut iso).await;
    iso.cleanup(config, args.keep).await;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

async fn run_isolated(config: &Config, args: &Args, iso: &mut Isolation) -> anyhow::Result<Output> {
    let dims = args
        .embedding_dimensions
        .unwrap_or(config.memory.embedding_dimensions);
    let (url, pool) = iso.create_database("views", dims).await?;
    pool.close().await;
    iso.create_topics(config).await?;
    eprintln!("bench: producing {} commands", args.events);
    let spec = Backlog {
        events: args.events,
        seed: args.seed,
        namespaces: args.namespaces,
        embedding_fraction: args.embedding_fraction,
        dimensions: dims,
    };
    let produced = produce_backlog(config, &iso.commands_topic, &spec).await?;
    eprintln!(
        "bench: produced {} commands ({:.1} MB) in {:.1}s",
        args.events,
        produced.bytes as f64 / 1e6,
        produced.seconds
    );

    let mut bench_config = config.clone();
    bench_config.postgres.url = memos_runtime::config::Secret::new(url);
    bench_config.topics = iso.topics_config(config);
    bench_config.memory.embedding_dimensions = dims;
    iso.checkpoint().await;
    let me = std::process::id();
    let before = sys::cpu_snapshot(&[(me, "memosctl")]);
    let started = Instant::now();
    let report = replay::rebuild(&bench_config, "rebuilt", &Until::End, false, args.chunk, true).await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = before.usage_until(&sys::cpu_snapshot(&[(me, "memosctl")]));
    let peak_rss_kb = sys::rss_kb(me).map_or(0, |(_, peak)| peak);
    anyhow::ensure!(
        report.records == args.events,
        "replayed {} records, expected {}",
        report.records,
        args.events
    );
    let verified_equal = if args.verify {
        let other_chunk = (args.chunk / 3).max(1);
        replay::rebuild(
            &bench_config,
            "rebuilt_again",
            &Until::End,
            false,
            other_chunk,
            true,
        )
        .await?;
        let pool = memos_postgres::connect(&bench_config.postgres).await?;
        let tables = memos_postgres::compare::compare(&pool, "rebuilt", "rebuilt_again", 5).await?;
        pool.close().await;
        Some(tables.iter().all(|t| t.equal))
    } else {
        None
    };
    Ok(Output {
        bench: "replay",
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        run_id: iso.id.clone(),
        events: args.events,
        partitions: args.partitions,
        embedding_dimensions: dims,
        embedding_fraction: args.embedding_fraction,
        mix: produced.mix,
        produce_seconds: round(produced.seconds, 3),
        produce_mb: round(produced.bytes as f64 / 1e6, 1),
        records_per_sec: round(report.records as f64 / seconds, 0),
        load_records_per_sec: round(report.records as f64 / report.load_seconds, 0),
        replay: report,
        memosctl_peak_rss_mb: round(peak_rss_kb as f64 / 1024.0, 1),
        cpu,
        verified_equal,
        machine: sys::machine(),
    })
}
