//! `memosctl bench e2e`: open-loop writes over HTTP at a fixed rate, and freshness.
//!
//! Write i is sent at `start + i / rate` whatever the server does (bounded only by
//! `--max-in-flight`; how late sends were is reported as `schedule_lag_ms`), so a slow server
//! shows up as latency, not as a lower rate. For a fraction of the writes, right after the
//! `202` the benchmark reads the memory back with the write's position token in
//! `X-Memos-Position`: the API answers once the views applied that record. Freshness is the
//! time from sending the write to that read's `200`. A read that gives up (`504
//! not_caught_up` after `memory.read_your_writes_timeout`) is counted in `check_timeouts` and
//! enters the freshness quantiles with the time it gave up at, a lower bound (leaving it out
//! would hide exactly the slowest records).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use memos_runtime::Config;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::commands::{Generator, Rng};
use super::sys::{self, CpuUsage, Machine, quantile, round};
use super::{Isolation, MemosProcess};

#[derive(clap::Args)]
pub struct Args {
    /// Base URL of a running memOS API whose process also runs the projector.
    #[arg(long, conflicts_with = "spawn")]
    url: Option<String>,
    /// Start an isolated `memos run all` (own database, topics, group, Redis prefix) and
    /// stop it afterwards, instead of using --url.
    #[arg(long)]
    spawn: bool,
    /// Listen address of the spawned server.
    #[arg(long, default_value = "127.0.0.1:18090")]
    bind: String,
    /// Writes per second.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// How long to write at that rate (after the warm-up).
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    duration: Duration,
    /// Writing at the rate before measuring (connections, caches, JIT of the server's path).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    warmup: Duration,
    /// Share of writes read back for freshness (default 1.0 up to 500/s, else 0.25).
    #[arg(long)]
    check_fraction: Option<f64>,
    /// Most requests in flight; beyond it sends are late (see schedule_lag_ms).
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Embedding dimension of the ~10% writes that carry one (default: configuration).
    #[arg(long)]
    embedding_dimensions: Option<usize>,
    /// Share of writes carrying an embedding.
    #[arg(long, default_value_t = 0.1)]
    embedding_fraction: f64,
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// API key of a service allowed to act for every agent (`memosctl keys create --role
    /// service --agent '*'`); not needed with --spawn.
    #[arg(long, env = "MEMOS_API_KEY")]
    token: Option<String>,
    /// With --spawn: keep the database, topics and Redis keys.
    #[arg(long)]
    keep: bool,
    /// With --spawn: the `memos` binary (default: next to memosctl).
    #[arg(long)]
    memos_bin: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Quantiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn quantiles(values: &mut [f64]) -> Quantiles {
    values.sort_by(f64::total_cmp);
    Quantiles {
        p50: round(quantile(values, 0.5), 2),
        p90: round(quantile(values, 0.9), 2),
        p99: round(quantile(values, 0.99), 2),
        max: round(values.last().copied().unwrap_or(0.0), 2),
    }
}

#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    date: String,
    url: String,
    spawned: bool,
    target_rate: f64,
    achieved_rate: f64,
    embedding_fraction: f64,
    check_fraction: f64,
    duration_seconds: f64,
    writes: u64,
    write_errors: u64,
    checked: u64,
    /// Reads that gave up waiting (504 not_caught_up); in freshness_ms as lower bounds.
    check_timeouts: u64,
    /// Other failed reads (not in freshness_ms).
    check_errors: u64,
    errors_sample: Vec<String>,
    freshness_ms: Quantiles,
    write_latency_ms: Quantiles,
    schedule_lag_ms: Quantiles,
    max_in_flight_seen: usize,
    server_rss_mb: Option<f64>,
    cpu: CpuUsage,
    machine: Machine,
}

#[derive(Default)]
struct Stats {
    writes: u64,
    write_errors: u64,
    checked: u64,
    check_timeouts: u64,
    check_errors: u64,
    errors_sample: Vec<String>,
    write_ms: Vec<f64>,
    fresh_ms: Vec<f64>,
    lag_ms: Vec<f64>,
}

impl Stats {
    fn error(&mut self, message: String) {
        if self.errors_sample.len() < 5 {
            self.errors_sample.push(message);
        }
    }
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    if !args.spawn {
        let url = args.url.clone().unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let output = load(config, &args, &url, None).await?;
        println!("{}", serde_json::to_string(&output)?);
        return Ok(());
    }
    let memos = super::memos_binary(args.memos_bin.clone())?;
    let mut iso = Isolation::new(config, config.topics.partitions);
    eprintln!("bench: run {} (spawned memos on {})", iso.id, args.bind);
    let result = async {
        let dims = args
            .embedding_dimensions
            .unwrap_or(config.memory.embedding_dimensions);
        let (db_url, pool) = iso.create_database("e2e", dims).await?;
        pool.close().await;
        iso.create_topics(config).await?;
        let mut env = iso.process_env(config, &db_url, dims);
        env.push(("MEMOS__HTTP__BIND".into(), args.bind.clone()));
        // The spawned server is this run's own, on loopback: it measures the pipeline, and a
        // key check (one digest) is not part of what it measures.
        env.push(("MEMOS__HTTP__AUTH".into(), "none".into()));
        let mut server =
            MemosProcess::spawn(&memos, "all", &env, &format!("memos-bench-{}-all.log", iso.id))?;
        eprintln!("bench: memos pid {} log {}", server.pid(), server.log.display());
        let url = format!("http://{}", args.bind);
        wait_ready(&mut server, &url).await?;
        let output = load(config, &args, &url, Some(server.pid())).await;
        server.terminate(Duration::from_secs(30))?;
        output
    }
    .await;
    iso.cleanup(config, args.keep).await;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

async fn wait_ready(server: &mut MemosProcess, url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        server.check_alive()?;
        if let Ok(response) = client.get(format!("{url}/readyz")).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "memos not ready within 60s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn load(config: &Config, args: &Args, url: &str, server_pid: Option<u32>) -> anyhow::Result<Output> {
    let dims = args
        .embedding_dimensions
        .unwrap_or(config.memory.embedding_dimensions);
    let fraction = args
        .check_fraction
        .unwrap_or(if args.rate <= 500.0 { 1.0 } else { 0.25 })
        .clamp(0.0, 1.0);
    let token = args.token.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight)
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()?;
    let url = url.trim_end_matches('/').to_owned();
    let probe = client.get(format!("{url}/healthz")).send().await;
    probe
        .ok()
        .filter(|r| r.status().is_success())
        .with_context(|| format!("no memOS API answers at {url}"))?;

    let mut generator =
        Generator::new(args.seed, args.namespaces, dims).with_embedding_fraction(args.embedding_fraction);
    let mut rng = Rng::new(args.seed.wrapping_add(1));
    let warmup = (args.rate * args.warmup.as_secs_f64()).round() as u64;
    let measured = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let permits = Arc::new(Semaphore::new(args.max_in_flight));
    let mut max_in_flight_seen = 0usize;
    eprintln!(
        "bench: {warmup} warm-up then {measured} writes at {}/s to {url}, reading back {:.0}%",
        args.rate,
        fraction * 100.0
    );

    let start = Instant::now();
    let mut measure_start = start;
    let mut last_send = start;
    let mut cpu_before = None;
    for i in 0..warmup + measured {
        let recorded = i >= warmup;
        if i == warmup {
            measure_start = Instant::now();
            let named: Vec<(u32, &str)> = server_pid.iter().map(|p| (*p, "memos")).collect();
            cpu_before = Some(sys::cpu_snapshot(&named));
        }
        let deadline = start + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(deadline).await;
        let permit = permits.clone().acquire_owned().await?;
        max_in_flight_seen = max_in_flight_seen.max(args.max_in_flight - permits.available_permits());
        let sent = Instant::now();
        last_send = sent;
        let lag_ms = sent.duration_since(deadline).as_secs_f64() * 1000.0;
        let body = body(&mut generator);
        let check = rng.chance(fraction);
        let (client, url, token, stats) = (client.clone(), url.clone(), token.clone(), stats.clone());
        tokio::spawn(async move {
            let outcome = write_and_check(&client, &url, token.as_deref(), body, check).await;
            drop(permit);
            if !recorded {
                return;
            }
            let mut stats = stats.lock().expect("stats lock");
            stats.writes += 1;
            stats.lag_ms.push(lag_ms);
            match outcome {
                Err(e) => {
                    stats.write_errors += 1;
                    stats.error(e);
                }
                Ok((write_ms, fresh)) => {
                    stats.write_ms.push(write_ms);
                    match fresh {
                        None => {}
                        Some(Ok(ms)) => {
                            stats.checked += 1;
                            stats.fresh_ms.push(ms);
                        }
                        Some(Err(Failed::GaveUp(ms, e))) => {
                            stats.checked += 1;
                            stats.check_timeouts += 1;
                            stats.fresh_ms.push(ms);
                            stats.error(e);
                        }
                        Some(Err(Failed::Other(e))) => {
                            stats.check_errors += 1;
                            stats.error(e);
                        }
                    }
                }
            }
        });
    }
    // Every request has finished once all permits are back.
    let _all = permits.acquire_many(args.max_in_flight as u32).await?;
    let named: Vec<(u32, &str)> = server_pid.iter().map(|p| (*p, "memos")).collect();
    let cpu = cpu_before
        .unwrap_or_else(|| sys::cpu_snapshot(&named))
        .usage_until(&sys::cpu_snapshot(&named));
    let send_seconds = last_send.duration_since(measure_start).as_secs_f64();
    let mut stats = std::mem::take(&mut *stats.lock().expect("stats lock"));
    let achieved_rate = if send_seconds > 0.0 && measured > 1 {
        (measured - 1) as f64 / send_seconds
    } else {
        0.0
    };
    Ok(Output {
        bench: "e2e",
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        url,
        spawned: server_pid.is_some(),
        target_rate: args.rate,
        achieved_rate: round(achieved_rate, 1),
        embedding_fraction: args.embedding_fraction,
        check_fraction: fraction,
        duration_seconds: round(send_seconds, 3),
        writes: stats.writes,
        write_errors: stats.write_errors,
        checked: stats.checked,
        check_timeouts: stats.check_timeouts,
        check_errors: stats.check_errors,
        errors_sample: std::mem::take(&mut stats.errors_sample),
        freshness_ms: quantiles(&mut stats.fresh_ms),
        write_latency_ms: quantiles(&mut stats.write_ms),
        schedule_lag_ms: quantiles(&mut stats.lag_ms),
        max_in_flight_seen,
        server_rss_mb: server_pid
            .and_then(sys::rss_kb)
            .map(|(_, hwm)| round(hwm as f64 / 1024.0, 1)),
        cpu,
        machine: sys::machine(),
    })
}

/// A `POST /v1/memories` body.
fn body(generator: &mut Generator) -> serde_json::Value {
    let agent = generator.agent();
    let m = generator.new_memory();
    let mut body = serde_json::json!({
        "agent_id": agent,
        "content": m.content,
        "tags": m.tags,
        "metadata": m.metadata,
        "tier": m.tier,
        "importance": m.importance,
    });
    if let Some(embedding) = m.embedding {
        body["embedding"] = embedding.into();
    }
    if let Some(source) = m.source {
        body["source"] = source.into();
    }
    body
}

/// Why a read-back did not see the write.
enum Failed {
    /// The API waited its read-your-writes timeout (ms since the write was sent, message).
    GaveUp(f64, String),
    Other(String),
}

type Checked = Option<Result<f64, Failed>>;

/// Sends one write; when `check`, reads it back with its position token. Returns the write
/// latency and, when checked, the freshness (both ms from sending the write).
async fn write_and_check(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: serde_json::Value,
    check: bool,
) -> Result<(f64, Checked), String> {
    let sent = Instant::now();
    let mut request = client.post(format!("{url}/v1/memories")).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| format!("write: {e}"))?;
    let status = response.status();
    if status.as_u16() != 202 {
        let text = response.text().await.unwrap_or_default();
        return Err(format!(
            "write: {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    let accepted: serde_json::Value = response.json().await.map_err(|e| format!("write answer: {e}"))?;
    let write_ms = sent.elapsed().as_secs_f64() * 1000.0;
    if !check {
        return Ok((write_ms, None));
    }
    let (Some(id), Some(position)) = (accepted["memory_id"].as_str(), accepted["position"].as_str()) else {
        return Ok((
            write_ms,
            Some(Err(Failed::Other(format!(
                "write answer without id or position: {accepted}"
            )))),
        ));
    };
    let mut read = client
        .get(format!("{url}/v1/memories/{id}"))
        .header("x-memos-position", position);
    if let Some(token) = token {
        read = read.bearer_auth(token);
    }
    let checked = match read.send().await {
        Ok(r) if r.status().is_success() => {
            // The body is part of being visible.
            match r.bytes().await {
                Ok(_) => Ok(sent.elapsed().as_secs_f64() * 1000.0),
                Err(e) => Err(Failed::Other(format!("read body: {e}"))),
            }
        }
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let message = format!("read: {status}: {}", text.chars().take(200).collect::<String>());
            if status.as_u16() == 504 {
                Err(Failed::GaveUp(sent.elapsed().as_secs_f64() * 1000.0, message))
            } else {
                Err(Failed::Other(message))
            }
        }
        Err(e) => Err(Failed::Other(format!("read: {e}"))),
    };
    Ok((write_ms, Some(checked)))
}
