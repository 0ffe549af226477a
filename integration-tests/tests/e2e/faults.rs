//! Fault injection against the real binaries and servers: processes killed (SIGKILL) or
//! stopped (SIGSTOP), the brokers killed, PostgreSQL stopped, Redis flushed and killed, a
//! three-broker cluster losing its leader and then a second broker. Each scenario keeps
//! clients writing, checks from the outside that every acknowledged command has its
//! decision at the position its `202` named and was applied once, verifies the views equal
//! to a rebuild from the log, and records its figures (`memos_integration_tests::faults`).
//!
//! The tests are `#[ignore]`d: they break the stack they run on, so they run only through
//! `scripts/faults`, which starts a stack of its own (`MEMOS_FAULTS_STACK_DIR`) and refuses
//! the shared one. `MEMOS_FAULTS_FULL=1` runs the full sizes (see docs/reliability.md).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use memos_integration_tests::faults::{Ack, Decision, FaultStack, Figures, Ledger, Verdict, judge, size};
use memos_integration_tests::process::binary;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use serde_json::{Value, json};

/// How long a scenario waits for the views to catch up before it counts what is missing.
const CATCH_UP: Duration = Duration::from_secs(300);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// Records one answer in the ledger: a `202` as an ack, anything else as an error.
async fn record(ledger: &Ledger, response: reqwest::Result<reqwest::Response>) -> Option<Value> {
    match response {
        Ok(response) if response.status() == 202 => match response.json::<Value>().await {
            Ok(body) => {
                ledger.ack(Ack {
                    command_id: body["command_id"].as_str().unwrap_or_default().to_owned(),
                    partition: body["partition"].as_i64().unwrap_or(-1) as i32,
                    offset: body["offset"].as_i64().unwrap_or(-1),
                });
                Some(body)
            }
            Err(_) => {
                ledger.error("transport");
                None
            }
        },
        Ok(response) => {
            ledger.error(response.status().as_str());
            None
        }
        Err(_) => {
            ledger.error("transport");
            None
        }
    }
}

/// Clients writing memories (and, with `updates`, updating the ones acknowledged) until
/// stopped. A failed request is not retried: only acknowledged commands are held to account.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(api: &str, ledger: &Arc<Ledger>, clients: usize, updates: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..clients {
            let (stop, ledger, base, http) = (stop.clone(), ledger.clone(), api.to_owned(), http());
            tasks.spawn(async move {
                let mut mine: Vec<String> = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let agent = format!("agent-{client}");
                    let response = if updates && n.is_multiple_of(4) && !mine.is_empty() {
                        let id = &mine[(n as usize / 4) % mine.len()];
                        http.patch(format!("{base}/v1/memories/{id}"))
                            .json(&json!({"agent_id": agent, "content": format!("update {client}-{n}")}))
                            .send()
                            .await
                    } else {
                        http.post(format!("{base}/v1/memories"))
                            .json(&json!({"agent_id": agent, "content": format!("memory {client}-{n}")}))
                            .send()
                            .await
                    };
                    match record(&ledger, response).await {
                        Some(body) => {
                            if let Some(id) = body["memory_id"].as_str() {
                                mine.push(id.to_owned());
                            }
                        }
                        // Keep failing clients from spinning while a dependency is down.
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            });
        }
        Load { stop, tasks }
    }

    async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Waits until `ledger` has at least `more` acks beyond `from`.
async fn acks_beyond(ledger: &Ledger, from: usize, more: usize) -> anyhow::Result<()> {
    eventually("clients to be acknowledged", CATCH_UP, || async {
        Ok((ledger.ack_count() >= from + more).then_some(()))
    })
    .await
}

async fn memory_decisions(env: &TestEnv) -> anyhow::Result<Vec<Decision>> {
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        "SELECT c.command_id::text, c.log_partition, c.log_offset, coalesce(h.n, 0)
         FROM memory_commands c
         LEFT JOIN (SELECT command_id, count(*) AS n FROM memory_history GROUP BY command_id) h
           USING (command_id)",
    )
    .fetch_all(&env.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(command_id, partition, offset, applications)| Decision {
            command_id,
            partition,
            offset,
            applications,
        })
        .collect())
}

/// Waits (up to [`CATCH_UP`]) until every ack is decided and the projector stands at the end
/// of the log; then judges. Returns the verdict and how long the wait took.
async fn settle_memory(env: &TestEnv, ledger: &Ledger) -> anyhow::Result<(Verdict, Duration)> {
    let start = Instant::now();
    let acks = ledger.acks();
    let caught_up = eventually("every acknowledged command decided", CATCH_UP, || async {
        let verdict = judge(&acks, &memory_decisions(env).await?);
        if !verdict.lost.is_empty() {
            return Ok(None);
        }
        let high: i64 = env.high_watermarks(&env.commands_topic)?.iter().map(|(_, h)| h).sum();
        let (stored,): (Option<i64>,) = sqlx::query_as(
            "SELECT sum(next_offset)::bigint FROM projection_offsets WHERE projection = 'memory' AND topic = $1",
        )
        .bind(&env.commands_topic)
        .fetch_one(&env.pool)
        .await?;
        Ok((stored == Some(high)).then_some(()))
    })
    .await;
    let elapsed = start.elapsed();
    if let Err(e) = caught_up {
        eprintln!("faults: not caught up: {e}");
    }
    Ok((judge(&acks, &memory_decisions(env).await?), elapsed))
}

fn memosctl(env: &TestEnv, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let output = std::process::Command::new(binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    ))
}

/// Rebuilds `projection` from the log into a fresh schema and verifies it against the live
/// views: `equal`, or what `memosctl` said.
fn verify(env: &TestEnv, projection: &str) -> anyhow::Result<String> {
    let schema = format!("faults_{projection}");
    let (code, out) = memosctl(
        env,
        &[
            "replay",
            "--projection",
            projection,
            "--into",
            &schema,
            "--replace",
        ],
    )?;
    if code != 0 {
        return Ok(format!("replay failed ({code}): {}", out.trim()));
    }
    let (code, out) = memosctl(env, &["verify", &schema])?;
    Ok(if code == 0 {
        "equal".into()
    } else {
        format!(
            "different ({code}): {}",
            out.lines().take(8).collect::<Vec<_>>().join(" | ")
        )
    })
}

/// Records the figures and fails the scenario if anything was lost, misplaced or doubled,
/// or the views differ from a rebuild.
fn conclude(figures: Figures, verdict: &Verdict) -> anyhow::Result<()> {
    figures.record()?;
    verdict.ensure()?;
    anyhow::ensure!(
        figures.verify == "equal",
        "views differ from a rebuild: {}",
        figures.verify
    );
    Ok(())
}

fn small_batches() -> [(&'static str, &'static str); 1] {
    [("MEMOS__PROJECTOR__MAX_BATCH_RECORDS", "50")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_projector_sigkill_under_writes() -> anyhow::Result<()> {
    FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let mut projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&api.url(""), &ledger, 8, true);
    let kills = size(3, 10);
    let per_kill = size(200, 1_500);
    for _ in 0..kills {
        acks_beyond(&ledger, ledger.ack_count(), per_kill).await?;
        projector.kill()?;
        projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    }
    acks_beyond(&ledger, ledger.ack_count(), per_kill).await?;
    load.finish().await;
    let (verdict, recovery) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "projector SIGKILL",
        format!("{kills} x SIGKILL"),
        &verdict,
        &ledger,
    );
    figures.recovery_s = recovery.as_secs_f64();
    figures.verify = verify(&env, "memory")?;
    drop(projector);
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_broker_kill_and_restart() -> anyhow::Result<()> {
    let stack = FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let _projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&api.url(""), &ledger, 8, false);
    acks_beyond(&ledger, 0, size(100, 2_000)).await?;
    stack.run(&["kill", "kafka", "all"])?;
    tokio::time::sleep(Duration::from_secs(size(5, 20))).await;
    let restarted = Instant::now();
    stack.run(&["start", "kafka", "all"])?;
    let before = ledger.ack_count();
    acks_beyond(&ledger, before, 1).await?;
    let first_ack = restarted.elapsed();
    acks_beyond(&ledger, before, size(100, 2_000)).await?;
    load.finish().await;
    let (verdict, _) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "broker kill -9 and restart",
        format!("every broker SIGKILLed for {} s", size(5, 20)),
        &verdict,
        &ledger,
    );
    figures.recovery_s = first_ack.as_secs_f64();
    figures.notes = "recovery: broker restart to first 202".into();
    figures.verify = verify(&env, "memory")?;
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_postgres_stopped() -> anyhow::Result<()> {
    let stack = FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let _projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&api.url(""), &ledger, 8, true);
    acks_beyond(&ledger, 0, size(100, 2_000)).await?;
    let outage = size(8, 30);
    stack.run(&["stop", "postgres"])?;
    let during = ledger.ack_count();
    tokio::time::sleep(Duration::from_secs(outage)).await;
    let acked_while_down = ledger.ack_count() - during;
    let errors_while_down = ledger.errors();
    stack.run(&["start", "postgres"])?;
    let healed = Instant::now();
    acks_beyond(&ledger, ledger.ack_count(), size(100, 2_000)).await?;
    load.finish().await;
    let (verdict, _) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "PostgreSQL stopped",
        format!("pg_ctl stop for {outage} s"),
        &verdict,
        &ledger,
    );
    figures.recovery_s = healed.elapsed().as_secs_f64();
    figures.notes = format!(
        "{acked_while_down} writes acknowledged while PostgreSQL was down; errors while down: {errors_while_down:?}"
    );
    figures.verify = verify(&env, "memory")?;
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

/// Reads one memory repeatedly; returns the slowest read and the errors by status.
async fn timed_reads(api: &str, id: &str, agent: &str, n: usize) -> (Duration, Vec<String>) {
    let http = http();
    let mut slowest = Duration::ZERO;
    let mut errors = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let answer = http
            .get(format!("{api}/v1/memories/{id}"))
            .header("x-memos-agent", agent)
            .send()
            .await;
        slowest = slowest.max(start.elapsed());
        match answer {
            Ok(a) if a.status() == 200 => {}
            Ok(a) => errors.push(a.status().as_str().to_owned()),
            Err(_) => errors.push("transport".into()),
        }
    }
    (slowest, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_redis_flushall_and_sigkill() -> anyhow::Result<()> {
    let stack = FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let _projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let base = api.url("");
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&base, &ledger, 6, true);
    acks_beyond(&ledger, 0, size(100, 2_000)).await?;
    let probe = api::write_probe(&base).await?;
    stack.run(&["flush", "redis"])?;
    let (after_flush, flush_errors) = timed_reads(&base, &probe, "probe", 5).await;
    acks_beyond(&ledger, ledger.ack_count(), size(100, 1_000)).await?;
    stack.run(&["kill", "redis"])?;
    let (while_down, down_errors) = timed_reads(&base, &probe, "probe", 5).await;
    acks_beyond(&ledger, ledger.ack_count(), size(50, 1_000)).await?;
    stack.run(&["start", "redis"])?;
    let healed = Instant::now();
    acks_beyond(&ledger, ledger.ack_count(), size(100, 1_000)).await?;
    load.finish().await;
    let (verdict, _) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "Redis FLUSHALL and SIGKILL",
        "FLUSHALL, then SIGKILL and restart".into(),
        &verdict,
        &ledger,
    );
    figures.recovery_s = healed.elapsed().as_secs_f64();
    figures.notes = format!(
        "slowest read after FLUSHALL {:.2} s (errors {flush_errors:?}), while Redis down {:.2} s (errors {down_errors:?})",
        after_flush.as_secs_f64(),
        while_down.as_secs_f64()
    );
    figures.verify = verify(&env, "memory")?;
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

mod api {
    use super::*;

    /// Writes one memory and waits until it can be read: the probe of read latency.
    pub async fn write_probe(base: &str) -> anyhow::Result<String> {
        let http = http();
        let body: Value = http
            .post(format!("{base}/v1/memories"))
            .json(&json!({"agent_id": "probe", "content": "probe"}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = body["memory_id"].as_str().unwrap_or_default().to_owned();
        let position = body["position"].as_str().unwrap_or_default().to_owned();
        eventually("the probe to be readable", CATCH_UP, || async {
            let answer = http
                .get(format!("{base}/v1/memories/{id}"))
                .header("x-memos-agent", "probe")
                .header("x-memos-position", &position)
                .send()
                .await?;
            Ok((answer.status() == 200).then_some(()))
        })
        .await?;
        Ok(id)
    }
}

/// The broker id leading `partition` of `topic`.
fn leader(env: &TestEnv, topic: &str, partition: i32) -> anyhow::Result<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = env.kafka_config().create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let leader = metadata
        .topics()
        .first()
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .map(|p| p.leader())
        .ok_or_else(|| anyhow::anyhow!("no partition {partition} of {topic}"))?;
    Ok(leader)
}

/// `min.insync.replicas` of `topic` as the brokers report it.
async fn min_insync(env: &TestEnv, topic: &str) -> anyhow::Result<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = env.kafka_config().create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await?;
    let resource = results
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no config of {topic}"))?
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(resource
        .get("min.insync.replicas")
        .and_then(|e| e.value.clone())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_cluster_loses_leader_then_second_broker() -> anyhow::Result<()> {
    let stack = FaultStack::from_env()?;
    if stack.brokers < 3 {
        eprintln!("faults: the cluster scenario needs scripts/stack up --brokers 3; skipped");
        return Ok(());
    }
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let _projector = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&api.url(""), &ledger, 8, false);
    acks_beyond(&ledger, 0, size(100, 2_000)).await?;
    let isr = min_insync(&env, &env.commands_topic).await?;
    let first = leader(&env, &env.commands_topic, 0)?;
    stack.run(&["kill", "kafka", &first.to_string()])?;
    acks_beyond(&ledger, ledger.ack_count(), size(100, 2_000)).await?;
    let second = eventually("a new leader", CATCH_UP, || async {
        let l = leader(&env, &env.commands_topic, 0)?;
        Ok((l != first && l > 0).then_some(l))
    })
    .await?;
    stack.run(&["kill", "kafka", &second.to_string()])?;
    let before = ledger.ack_count();
    let errors_before = ledger.errors().values().sum::<u64>();
    tokio::time::sleep(Duration::from_secs(size(6, 30))).await;
    let acked_on_one = ledger.ack_count() - before;
    let errors_on_one = ledger.errors().values().sum::<u64>() - errors_before;
    // Both at once: the brokers that run are left alone, the two killed start together.
    stack.run(&["start", "kafka", "all"])?;
    let healed = Instant::now();
    acks_beyond(&ledger, ledger.ack_count(), size(100, 2_000)).await?;
    load.finish().await;
    let (verdict, _) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "3 brokers: leader lost, then a second broker",
        format!("SIGKILL broker {first} (leader), then broker {second}; both restarted"),
        &verdict,
        &ledger,
    );
    figures.recovery_s = healed.elapsed().as_secs_f64();
    figures.notes = format!(
        "command topic min.insync.replicas={isr}; with one broker (and one controller of three) \
         left for {} s: {acked_on_one} writes acknowledged, {errors_on_one} errors",
        size(6, 30)
    );
    figures.verify = verify(&env, "memory")?;
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_projector_sigstop() -> anyhow::Result<()> {
    FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let mut first = MemosProcess::start(&env, "projector", &small_batches()).await?;
    first.wait_for_log("partition assigned", CATCH_UP).await?;
    let _second = MemosProcess::start(&env, "projector", &small_batches()).await?;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(&api.url(""), &ledger, 8, false);
    acks_beyond(&ledger, 0, size(100, 2_000)).await?;
    let pause = size(15, 60);
    first.signal("STOP")?;
    let stopped = Instant::now();
    // While the first is stopped, does the other one go on deciding? Time until an ack
    // written after the stop is decided (or the pause ends).
    let marker = ledger.ack_count();
    acks_beyond(&ledger, marker, 20).await?;
    let probe = ledger.acks()[marker..].to_vec();
    let mut taken_over = None;
    while stopped.elapsed() < Duration::from_secs(pause) {
        let decided: HashSet<String> = memory_decisions(&env)
            .await?
            .into_iter()
            .map(|d| d.command_id)
            .collect();
        if probe.iter().all(|a| decided.contains(&a.command_id)) {
            taken_over = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(pause).saturating_sub(stopped.elapsed())).await;
    first.signal("CONT")?;
    let healed = Instant::now();
    acks_beyond(&ledger, ledger.ack_count(), size(100, 2_000)).await?;
    load.finish().await;
    let (verdict, _) = settle_memory(&env, &ledger).await?;
    let mut figures = Figures::new(
        "projector SIGSTOP",
        format!("one of two projectors SIGSTOPped for {pause} s"),
        &verdict,
        &ledger,
    );
    figures.recovery_s = healed.elapsed().as_secs_f64();
    figures.notes = match taken_over {
        Some(t) => format!(
            "writes after the stop decided by the other projector within {:.1} s",
            t.as_secs_f64()
        ),
        None => {
            format!("writes after the stop not all decided during the {pause} s stop (projection stalled)")
        }
    };
    figures.verify = verify(&env, "memory")?;
    conclude(figures, &verdict)?;
    env.cleanup().await;
    Ok(())
}

/// Task decisions: every command id the orchestrator wrote events for, with the most times
/// one kind of event about one task or workflow was written for it (one, unless a command
/// was decided twice). Task events live on their own topic, so no position is compared.
async fn task_decisions(env: &TestEnv) -> anyhow::Result<Vec<Decision>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT command_id, max(n) FROM (
             SELECT command_id, count(*) AS n FROM task_events WHERE command_id IS NOT NULL
             GROUP BY command_id, type, coalesce(task_id, ''), coalesce(workflow_id, '')) per_kind
         GROUP BY command_id",
    )
    .fetch_all(&env.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(command_id, applications)| Decision {
            command_id,
            partition: -1,
            offset: -1,
            applications,
        })
        .collect())
}

/// An agent that completes every task assigned to it, as read from the task view, and
/// heartbeats; each command's answer goes to the ledger.
fn worker(
    api: &str,
    env: &TestEnv,
    ledger: &Arc<Ledger>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (api, pool, ledger, stop, http) = (
        api.to_owned(),
        env.pool.clone(),
        ledger.clone(),
        stop.clone(),
        http(),
    );
    tokio::spawn(async move {
        let mut sent: HashSet<String> = HashSet::new();
        let mut beat = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if beat.elapsed() > Duration::from_secs(5) {
                let r = http
                    .post(format!("{api}/v1/agents/w1/heartbeat"))
                    .json(&json!({}))
                    .send()
                    .await;
                record(&ledger, r).await;
                beat = Instant::now();
            }
            let held: Vec<(String,)> = sqlx::query_as(
                "SELECT task_id FROM tasks WHERE agent_id = 'w1' AND status IN ('assigned', 'running') LIMIT 200",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for (task,) in held {
                if sent.contains(&task) {
                    continue;
                }
                // A workflow step's task id is `workflow/step`: one path segment, escaped.
                let path = task.replace('%', "%25").replace('/', "%2F");
                let r = http
                    .post(format!("{api}/v1/tasks/{path}/complete"))
                    .json(&json!({"agent_id": "w1", "result": {"ok": true}}))
                    .send()
                    .await;
                if record(&ledger, r).await.is_some() {
                    sent.insert(task);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: run by scripts/faults on a stack of its own"]
async fn faults_orchestrator_sigkill_under_tasks_and_workflows() -> anyhow::Result<()> {
    FaultStack::from_env()?;
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let _projector = MemosProcess::start(&env, "projector", &[]).await?;
    let mut orchestrator = MemosProcess::start(&env, "orchestrator", &[]).await?;
    let base = api.url("");
    let http = http();
    let ledger = Arc::new(Ledger::default());
    let tasks: usize = size(200, 3_000);
    let workflows: usize = size(20, 200);
    let kills: usize = size(2, 5);

    let r = http
        .post(format!("{base}/v1/agents"))
        .json(&json!({"agent_id": "w1", "capabilities": ["work"], "max_concurrent": 1_000}))
        .send()
        .await;
    record(&ledger, r)
        .await
        .ok_or_else(|| anyhow::anyhow!("register refused"))?;
    let r = http
        .post(format!("{base}/v1/workflow-templates"))
        .json(&json!({"name": "pair", "steps": [
            {"step_id": "a", "capability": "work"},
            {"step_id": "b", "capability": "work", "depends_on": ["a"]}]}))
        .send()
        .await;
    record(&ledger, r)
        .await
        .ok_or_else(|| anyhow::anyhow!("template refused"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let agent = worker(&base, &env, &ledger, &stop);

    // Delegations and workflow starts go in while the orchestrator is killed between them.
    let mut workflow_ids = Vec::new();
    let per_round = (tasks + workflows).div_ceil(kills + 1);
    let mut sent = 0;
    for round in 0..=kills {
        while sent < per_round * (round + 1) && sent < tasks + workflows {
            let r = if sent % (tasks / workflows + 1) == 0 && workflow_ids.len() < workflows {
                let id = format!("wf-{sent}");
                workflow_ids.push(id.clone());
                http.post(format!("{base}/v1/workflows"))
                    .json(&json!({"workflow_id": id, "template": "pair"}))
                    .send()
                    .await
            } else {
                http.post(format!("{base}/v1/tasks"))
                    .json(&json!({"task_id": format!("t-{sent}"), "required_capabilities": ["work"]}))
                    .send()
                    .await
            };
            record(&ledger, r).await;
            sent += 1;
        }
        if round < kills {
            orchestrator.kill()?;
            orchestrator = MemosProcess::start(&env, "orchestrator", &[]).await?;
        }
    }
    let healed = Instant::now();
    // Done when every task and workflow finished, or nothing moved for longer than any timer
    // of the orchestrator that could still move something: a task held by an incarnation
    // killed mid-transaction waits for the transaction timeout (10 s), a re-delegation for
    // the heartbeat window (30 s). Giving up after 20 s counted such recoveries as stuck.
    let patience = Duration::from_secs(60);
    let total_tasks = (sent - workflow_ids.len() + 2 * workflow_ids.len()) as i64;
    let mut last = (-1, -1);
    let mut still = Instant::now();
    let finished = loop {
        let (tasks_done,): (i64,) = sqlx::query_as("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(&env.pool)
            .await?;
        let (workflows_done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM workflows WHERE status = 'completed'")
                .fetch_one(&env.pool)
                .await?;
        if tasks_done >= total_tasks && workflows_done >= workflow_ids.len() as i64 {
            break (tasks_done, workflows_done);
        }
        if (tasks_done, workflows_done) != last {
            last = (tasks_done, workflows_done);
            still = Instant::now();
        } else if still.elapsed() > patience {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let recovery = healed.elapsed();
    stop.store(true, Ordering::Relaxed);
    agent.await?;
    let acks = ledger.acks();
    let verdict = eventually("every task command decided", CATCH_UP, || async {
        let verdict = judge(&acks, &task_decisions(&env).await?);
        Ok(verdict.lost.is_empty().then_some(verdict))
    })
    .await
    .or(anyhow::Ok(judge(&acks, &task_decisions(&env).await?)))?;
    let mut figures = Figures::new(
        "orchestrator SIGKILL",
        format!("{kills} x SIGKILL under {tasks} tasks and {workflows} workflows"),
        &verdict,
        &ledger,
    );
    figures.recovery_s = recovery.as_secs_f64();
    figures.notes = format!(
        "{} of {total_tasks} tasks and {} of {} workflows completed ({} workflows stuck)",
        finished.0,
        finished.1,
        workflow_ids.len(),
        workflow_ids.len() as i64 - finished.1
    );
    figures.verify = verify(&env, "tasks")?;
    drop(orchestrator);
    figures.record()?;
    verdict.ensure()?;
    anyhow::ensure!(
        figures.verify == "equal",
        "task views differ from a rebuild: {}",
        figures.verify
    );
    anyhow::ensure!(
        finished.1 == workflow_ids.len() as i64,
        "{} workflows never finished",
        workflow_ids.len() as i64 - finished.1
    );
    env.cleanup().await;
    Ok(())
}
