//! `memosctl bench orchestrator`: delegations per second from command to visible assignment,
//! with Kafka transactions on, and the assignment latency.
//!
//! The benchmark starts an isolated `memos run orchestrator` (its own topics and consumer
//! group), registers enough agents to take every task, then appends `DelegateTask` commands
//! (open loop at `--rate`, or as fast as the producer goes with `--rate 0`). A
//! `read_committed` consumer of the events topic sees each `TASK_ASSIGNED` once the
//! orchestrator's transaction committed: latency is that moment minus the command's send
//! time, on one clock. Throughput is tasks over the time from the first send to the last
//! visible assignment.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use memos_kafka::admin::{TopicSpec, ensure_topics};
use memos_runtime::Config;
use memos_schemas::task::{DelegateTask, RegisterAgent, TaskCommand, TaskEvent, TaskEventType};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::time::Instant;

use super::sys::{self, CpuUsage, Machine, quantile, round};
use super::{Isolation, MemosProcess};

#[derive(clap::Args)]
pub struct Args {
    /// Tasks to delegate.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Delegations per second appended (open loop); 0 appends as fast as the producer goes.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Partitions of the task topics.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Most commands the orchestrator decides per transaction.
    #[arg(long, default_value_t = 2000)]
    max_batch: usize,
    /// The `memos` binary (default: next to this executable).
    #[arg(long)]
    memos_bin: Option<PathBuf>,
    /// Keep the topics afterwards.
    #[arg(long)]
    keep: bool,
    /// Also run `memos run projector` on a fresh database and measure until every assignment
    /// is visible in the task views (PostgreSQL `tasks`), as the HTTP API serves them.
    #[arg(long)]
    views: bool,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    tasks: usize,
    rate_target: f64,
    partitions: i32,
    agents: usize,
    max_batch: usize,
    delegations_per_sec: f64,
    send_rate: f64,
    assign_latency_ms_p50: f64,
    assign_latency_ms_p99: f64,
    assign_latency_ms_max: f64,
    transactions: f64,
    mean_transaction_ms: f64,
    /// With `--views`: tasks over the time from the first send until every assignment was
    /// in the PostgreSQL views, and how long after the last decision they got there.
    views_delegations_per_sec: Option<f64>,
    views_behind_decisions_ms: Option<f64>,
    orchestrator_rss_mb: f64,
    orchestrator_peak_rss_mb: f64,
    cpu: CpuUsage,
    machine: Machine,
}

const CAPACITY_PER_AGENT: usize = 1000;

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    let binary = super::memos_binary(args.memos_bin.clone())?;
    let mut iso = Isolation::new(config, args.partitions);
    let commands_topic = format!("memos.bench.{}.task.commands", iso.id);
    let events_topic = format!("memos.bench.{}.task.events", iso.id);
    let mut topics = iso.topics_config(config);
    topics.task_commands = commands_topic.clone();
    topics.task_events = events_topic.clone();
    ensure_topics(
        &config.kafka,
        &[
            TopicSpec::commands(&commands_topic, &topics),
            TopicSpec::events(&events_topic, &topics),
            TopicSpec::dead_letter(&iso.dead_letter_topic, &topics),
        ],
    )
    .await?;
    let result = measure(config, &args, &binary, &mut iso, &commands_topic, &events_topic).await;
    if args.views {
        // The projector's database, memory topics, dead-letter topic and Redis keys.
        iso.cleanup(config, args.keep).await;
    }
    if !args.keep {
        let admin: AdminClient<DefaultClientContext> =
            memos_kafka::client::base_config(&config.kafka, "bench-admin").create()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let mut names = vec![commands_topic.as_str(), events_topic.as_str()];
        if !args.views {
            names.push(iso.dead_letter_topic.as_str());
        }
        if let Err(e) = admin.delete_topics(&names, &options).await {
            eprintln!("bench: cannot delete topics: {e}");
        }
    } else {
        eprintln!("bench: kept topics {commands_topic}, {events_topic}");
    }
    let report = result?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn command_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn measure(
    config: &Config,
    args: &Args,
    binary: &PathBuf,
    iso: &mut Isolation,
    commands_topic: &str,
    events_topic: &str,
) -> anyhow::Result<Report> {
    let env: Vec<(String, String)> = [
        ("MEMOS_KAFKA_BROKERS", config.kafka.brokers.clone()),
        ("MEMOS__TOPICS__TASK_COMMANDS", commands_topic.to_owned()),
        ("MEMOS__TOPICS__TASK_EVENTS", events_topic.to_owned()),
        ("MEMOS__TOPICS__DEAD_LETTER", iso.dead_letter_topic.clone()),
        ("MEMOS__TOPICS__PARTITIONS", args.partitions.to_string()),
        (
            "MEMOS__ORCHESTRATOR__GROUP_ID",
            format!("{}-orchestrator", iso.group_id),
        ),
        (
            "MEMOS__ORCHESTRATOR__MAX_BATCH_RECORDS",
            args.max_batch.to_string(),
        ),
        ("MEMOS__ORCHESTRATOR__HEARTBEAT_WINDOW", "1h".to_owned()),
        ("MEMOS__HTTP__BIND", "127.0.0.1:0".to_owned()),
        (
            "RUST_LOG",
            std::env::var("MEMOS_BENCH_LOG").unwrap_or_else(|_| "info".to_owned()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut process = MemosProcess::spawn(
        binary,
        "orchestrator",
        &env,
        &format!("memos-bench-{}.log", iso.id),
    )?;
    let started = Instant::now();
    loop {
        process.check_alive()?;
        let log = std::fs::read_to_string(&process.log).unwrap_or_default();
        if log.contains("task partition taken") {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "orchestrator did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut views = if args.views {
        let (url, pool) = iso.create_database("tasks", 3).await?;
        let mut env = iso.process_env(config, &url, 3);
        env.extend(
            [
                ("MEMOS__TOPICS__TASK_COMMANDS", commands_topic.to_owned()),
                ("MEMOS__TOPICS__TASK_EVENTS", events_topic.to_owned()),
                ("MEMOS__HTTP__BIND", "127.0.0.1:0".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        let projector = MemosProcess::spawn(
            binary,
            "projector",
            &env,
            &format!("memos-bench-{}-projector.log", iso.id),
        )?;
        Some((projector, pool))
    } else {
        None
    };

    let producer: FutureProducer = memos_kafka::client::base_config(&config.kafka, "bench-producer")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let agents = args.tasks.div_ceil(CAPACITY_PER_AGENT) + 1;
    for a in 0..agents {
        let command = TaskCommand::RegisterAgent(RegisterAgent {
            command_id: command_id(),
            actor: "bench".into(),
            issued_at: now_ms(),
            traceparent: None,
            agent_id: format!("agent-{a}"),
            capabilities: vec!["work".into()],
            max_concurrent: CAPACITY_PER_AGENT as i32,
            metadata_json: "{}".into(),
        });
        send(&producer, commands_topic, &command).await?;
    }

    // The reader: one clock with the sender (Instant), so latency needs no clock sync.
    let origin = Instant::now();
    let (assigned_tx, mut assigned_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Duration)>();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let consumer: BaseConsumer = memos_kafka::client::base_config(&config.kafka, "bench-reader")
            .set("group.id", format!("{}-reader", iso.group_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..args.partitions {
            tpl.add_partition_offset(events_topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = stop.clone();
        let origin = origin.into_std();
        tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
            let mut agents_seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let Some(message) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let message = message?;
                let seen = origin.elapsed();
                let event = TaskEvent::decode(message.payload().unwrap_or_default())?;
                match event.event_type {
                    TaskEventType::AgentRegistered => agents_seen += 1,
                    TaskEventType::TaskAssigned => {
                        if let Some(i) = event.task_id.as_deref().and_then(|t| t.strip_prefix("t-")) {
                            let _ = assigned_tx.send((i.parse()?, seen));
                        }
                    }
                    _ => {}
                }
            }
            Ok(agents_seen)
        })
    };

    eprintln!(
        "bench: {agents} agents registered; delegating {} tasks",
        args.tasks
    );
    let cpu_before = sys::cpu_snapshot(&[(process.pid(), "memos")]);
    let mut sent_at: Vec<Duration> = Vec::with_capacity(args.tasks);
    let first_send = origin.elapsed();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for i in 0..args.tasks {
        if args.rate > 0.0 {
            let due = origin + first_send + Duration::from_secs_f64(i as f64 / args.rate);
            tokio::time::sleep_until(due).await;
        }
        let command = TaskCommand::Delegate(DelegateTask {
            command_id: command_id(),
            actor: "bench".into(),
            issued_at: now_ms(),
            traceparent: None,
            task_id: format!("t-{i}"),
            required_capabilities: vec!["work".into()],
            payload_json: format!("{{\"n\":{i}}}"),
            priority: (i % 3) as i32,
            timeout_ms: 3_600_000,
            max_attempts: 3,
            preferred_agent: None,
            workflow_id: None,
        });
        let payload = command.encode()?;
        let key = command.routing_key().unwrap_or_default();
        sent_at.push(origin.elapsed());
        let delivery = producer
            .send_result(FutureRecord::to(commands_topic).key(&key).payload(&payload))
            .map_err(|(e, _)| e)
            .context("enqueue a delegation")?;
        in_flight.push(delivery);
        while in_flight.len() > 50_000 {
            use futures::StreamExt;
            in_flight.next().await;
        }
    }
    let send_done = origin.elapsed();
    producer.flush(Duration::from_secs(60))?;

    let mut latencies = Vec::with_capacity(args.tasks);
    let mut seen: HashMap<usize, Duration> = HashMap::with_capacity(args.tasks);
    let deadline = Instant::now() + Duration::from_secs(120 + args.tasks as u64 / 500);
    while seen.len() < args.tasks {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, assigned_rx.recv()).await {
            Ok(Some((i, at))) => {
                if i < sent_at.len() && seen.insert(i, at).is_none() {
                    latencies.push((at.saturating_sub(sent_at[i])).as_secs_f64() * 1000.0);
                }
            }
            _ => anyhow::bail!(
                "only {} of {} tasks assigned before the deadline",
                seen.len(),
                args.tasks
            ),
        }
    }
    let last_visible = seen.values().max().copied().unwrap_or_default();
    let mut views_visible = None;
    if let Some((projector, pool)) = &mut views {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (assigned,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasks WHERE status = 'assigned'")
                .fetch_one(&*pool)
                .await?;
            if assigned as usize >= args.tasks {
                views_visible = Some(origin.elapsed());
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "views hold {assigned} of {} assignments",
                args.tasks
            );
            projector.check_alive()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (transactions, transaction_ms) = transaction_stats(&process).await.unwrap_or((0.0, 0.0));
    let cpu_after = sys::cpu_snapshot(&[(process.pid(), "memos")]);
    let rss = sys::rss_kb(process.pid()).unwrap_or((0, 0));
    stop.store(true, Ordering::Relaxed);
    let agents_seen = reader.await??;
    anyhow::ensure!(
        agents_seen == agents,
        "saw {agents_seen} of {agents} agent registrations"
    );
    process.terminate(Duration::from_secs(20))?;
    if let Some((mut projector, pool)) = views {
        pool.close().await;
        projector.terminate(Duration::from_secs(20))?;
    }

    latencies.sort_by(f64::total_cmp);
    let elapsed = (last_visible - first_send).as_secs_f64();
    Ok(Report {
        benchmark: "orchestrator",
        tasks: args.tasks,
        rate_target: args.rate,
        partitions: args.partitions,
        agents,
        max_batch: args.max_batch,
        delegations_per_sec: round(args.tasks as f64 / elapsed, 0),
        send_rate: round(args.tasks as f64 / (send_done - first_send).as_secs_f64(), 0),
        assign_latency_ms_p50: round(quantile(&latencies, 0.5), 1),
        assign_latency_ms_p99: round(quantile(&latencies, 0.99), 1),
        assign_latency_ms_max: round(latencies.last().copied().unwrap_or(0.0), 1),
        transactions,
        mean_transaction_ms: round(transaction_ms, 2),
        views_delegations_per_sec: views_visible
            .map(|v| round(args.tasks as f64 / (v - first_send).as_secs_f64(), 0)),
        views_behind_decisions_ms: views_visible
            .map(|v| round((v.saturating_sub(last_visible)).as_secs_f64() * 1000.0, 0)),
        orchestrator_rss_mb: round(rss.0 as f64 / 1024.0, 1),
        orchestrator_peak_rss_mb: round(rss.1 as f64 / 1024.0, 1),
        cpu: cpu_before.usage_until(&cpu_after),
        machine: sys::machine(),
    })
}

/// Committed transactions and their mean duration (ms), from the orchestrator's /metrics.
async fn transaction_stats(process: &MemosProcess) -> anyhow::Result<(f64, f64)> {
    let log = std::fs::read_to_string(&process.log)?;
    let line = log
        .lines()
        .find(|l| l.contains("operations endpoint listening"))
        .context("no listening line")?;
    let value: serde_json::Value = serde_json::from_str(line)?;
    let addr = value["fields"]["addr"].as_str().context("no addr")?;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    let sample = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let count = sample("memos_orchestrator_transaction_seconds_count");
    let sum = sample("memos_orchestrator_transaction_seconds_sum");
    Ok((count, if count > 0.0 { sum / count * 1000.0 } else { 0.0 }))
}

async fn send(producer: &FutureProducer, topic: &str, command: &TaskCommand) -> anyhow::Result<()> {
    let payload = command.encode()?;
    let key = command.routing_key().unwrap_or_default();
    producer
        .send(
            FutureRecord::to(topic).key(&key).payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .context("append a command")?;
    Ok(())
}
