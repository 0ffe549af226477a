//! Hostile inputs interleaved with valid ones, over HTTP and straight to Kafka, against one
//! running `memos run all`. Every input is applied, refused with a clear error, or
//! dead-lettered with its reason; none holds back another, and no worker restarts.
//!
//! The inputs are generated from a seed (`MEMOS_ADVERSARIAL_SEED`, printed), in a number of
//! rounds (`MEMOS_ADVERSARIAL_ROUNDS`, default 150 in CI); a longer run is in
//! `docs/adversarial.md`. After the run the suite checks, with conditions rather than
//! sleeps: every valid memory is readable, the projections' stored offsets reach the end of
//! their topics (lag 0), every record produced straight to a command topic that is not a
//! valid command is in the dead-letter topic with a class and a message, every invalid task
//! command that decodes is rejected with a reason, no HTTP answer is a 5xx and every refusal
//! names what is wrong, and the process never restarted a worker.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use memos_integration_tests::metrics_text;
use memos_integration_tests::tasks::{EventLog, TaskClient, until_decided};
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use memos_schemas::MemoryCommand;
use memos_schemas::task::{TaskCommand, TaskEventType as E};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// splitmix64: a seeded, dependency-free generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What the run sent and what it expects of each input.
#[derive(Default)]
struct Ledger {
    http_accepted: usize,
    http_refused: BTreeMap<u16, usize>,
    /// Memory ids of valid writes (HTTP and Kafka), each must become readable.
    memories: Vec<String>,
    /// Offsets on the memory command topic of records that must be dead-lettered.
    memory_letters: BTreeSet<(i32, i64)>,
    /// Offsets on the task command topic of records that must be dead-lettered.
    task_letters: BTreeSet<(i32, i64)>,
    /// Command ids of task commands that decode but must be rejected.
    task_rejections: BTreeSet<String>,
    /// Task ids of valid delegations, each must be accepted.
    tasks: BTreeSet<String>,
    kafka_sent: usize,
}

fn deep_json(depth: usize) -> Value {
    (0..depth).fold(json!("bottom"), |inner, _| json!({ "d": inner }))
}

fn write_command(rng: &mut Rng, namespace: &str) -> memos_schemas::WriteMemory {
    memos_schemas::WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: namespace.into(),
        actor: namespace.into(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        traceparent: None,
        memory_id: uuid::Uuid::now_v7().to_string(),
        content: format!("direct {}", rng.next()),
        tier: memos_schemas::Tier::Episodic,
        tags: vec!["adversarial".into()],
        metadata_json: "{}".into(),
        importance: 0.5,
        expires_at: None,
        embedding: None,
        source: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_interleaved_with_valid_ones_are_each_applied_refused_or_dead_lettered()
-> anyhow::Result<()> {
    let seed = std::env::var("MEMOS_ADVERSARIAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64);
    let rounds: usize = std::env::var("MEMOS_ADVERSARIAL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    eprintln!("adversarial run: MEMOS_ADVERSARIAL_SEED={seed} MEMOS_ADVERSARIAL_ROUNDS={rounds}");
    let mut rng = Rng(seed);

    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__ORCHESTRATOR__TICK_INTERVAL", "200ms")]).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let producer: FutureProducer = env.kafka_config().set("message.max.bytes", "2000000").create()?;
    let tasks = TaskClient::new(&env)?;
    let mut ledger = Ledger::default();
    let started = std::time::Instant::now();

    let agents = ["adv-0", "adv-1", "adv-2"];
    for agent in agents {
        let answer = http
            .post(memos.url("/v1/agents"))
            .json(&json!({"agent_id": agent, "capabilities": ["work"], "max_concurrent": 1000}))
            .send()
            .await?;
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
    }

    for round in 0..rounds {
        let agent = agents[rng.below(agents.len())];
        match rng.below(8) {
            // A valid write over HTTP.
            0 | 1 => {
                let answer = http
                    .post(memos.url("/v1/memories"))
                    .json(&json!({"agent_id": agent, "content": format!("valid {round} {}", rng.next()), "tags": ["ok"]}))
                    .send()
                    .await?;
                assert_eq!(answer.status(), StatusCode::ACCEPTED, "round {round}");
                let body: Value = answer.json().await?;
                ledger
                    .memories
                    .push(body["memory_id"].as_str().unwrap().to_owned());
                ledger.http_accepted += 1;
            }
            // A hostile write or read over HTTP: refused with a 4xx that says why.
            2 | 3 if rng.below(12) == 0 => {
                let status = oversized_body(&memos).await?;
                assert_eq!(status, 413, "round {round}: a body over the limit");
                *ledger.http_refused.entry(status).or_default() += 1;
            }
            2 | 3 => {
                let (what, request) = hostile_request(&http, &memos, &mut rng, agent);
                let answer = request.send().await?;
                let status = answer.status();
                let body = answer.text().await.unwrap_or_default();
                assert!(
                    status.is_client_error(),
                    "round {round}: {what} answered {status}: {body}"
                );
                if status != StatusCode::PAYLOAD_TOO_LARGE {
                    let error: Value = serde_json::from_str(&body)
                        .map_err(|e| anyhow::anyhow!("{what}: not a JSON error ({e}): {body}"))?;
                    assert!(
                        error["message"].as_str().is_some_and(|m| !m.is_empty()),
                        "{what}: {body}"
                    );
                }
                *ledger.http_refused.entry(status.as_u16()).or_default() += 1;
            }
            // A valid write straight to Kafka, sometimes with a forged record time.
            4 => {
                let command = write_command(&mut rng, agent);
                ledger.memories.push(command.memory_id.clone());
                let payload = MemoryCommand::Write(command).encode()?;
                let mut record = FutureRecord::to(&env.commands_topic).key(agent).payload(&payload);
                if rng.below(2) == 0 {
                    record = record.timestamp(chrono::Utc::now().timestamp_millis() + 50 * 60 * 1000);
                }
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)?;
                ledger.kafka_sent += 1;
            }
            // A hostile record straight to the memory command topic: dead-lettered.
            5 => {
                let (key, payload) = hostile_memory_record(&mut rng, agent)?;
                let mut record = FutureRecord::<[u8], [u8]>::to(&env.commands_topic);
                if let Some(key) = &key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &payload {
                    record = record.payload(payload.as_slice());
                }
                if rng.below(2) == 0 {
                    record = record.timestamp(chrono::Utc::now().timestamp_millis() + 50 * 60 * 1000);
                }
                let delivered = producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)?;
                ledger
                    .memory_letters
                    .insert((delivered.partition, delivered.offset));
                ledger.kafka_sent += 1;
            }
            // A valid delegation straight to Kafka.
            6 => {
                let task = format!("adv-task-{round}");
                tasks
                    .send(&TaskCommand::Delegate(TaskClient::delegate_command(
                        &task, "work", 3, 3_600_000,
                    )))
                    .await?;
                ledger.tasks.insert(task);
                ledger.kafka_sent += 1;
            }
            // A hostile record on the task command topic: dead-lettered when it does not
            // decode, rejected with a reason when it decodes but is invalid.
            _ => {
                let forged = chrono::Utc::now().timestamp_millis() + 50 * 60 * 1000;
                let mut command = TaskClient::delegate_command(&format!("bad-task-{round}"), "work", 1, 1000);
                let (payload, rejected) = match rng.below(4) {
                    0 => {
                        let n = 1 + rng.below(64);
                        (rng.bytes(n), None)
                    }
                    1 => {
                        let valid = TaskCommand::Delegate(command).encode()?;
                        (valid[..valid.len() / 2].to_vec(), None)
                    }
                    2 => {
                        command.payload_json = "{\"text\":\"nul \\u0000 here\"}".into();
                        let id = command.command_id.clone();
                        (TaskCommand::Delegate(command).encode()?, Some(id))
                    }
                    _ => {
                        command.max_attempts = 1_000_000;
                        let id = command.command_id.clone();
                        (TaskCommand::Delegate(command).encode()?, Some(id))
                    }
                };
                let delivered = producer
                    .send(
                        FutureRecord::to(&env.task_commands_topic)
                            .key(agent)
                            .payload(&payload)
                            .timestamp(forged),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)?;
                match rejected {
                    Some(id) => {
                        ledger.task_rejections.insert(id);
                    }
                    None => {
                        ledger
                            .task_letters
                            .insert((delivered.partition, delivered.offset));
                    }
                }
                ledger.kafka_sent += 1;
            }
        }
    }
    let sent_for = started.elapsed();

    // Every valid memory becomes readable.
    for memory_id in &ledger.memories {
        let url = memos.url(&format!("/v1/memories/{memory_id}"));
        eventually("every valid memory to be readable", WAIT, || {
            let (http, url) = (http.clone(), url.clone());
            async move { Ok((http.get(url).send().await?.status() == StatusCode::OK).then_some(())) }
        })
        .await?;
    }
    // Lag 0: the projector's stored offsets reach the end of the memory command topic.
    let end: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, high)| high)
        .sum();
    eventually(
        "the projector to reach the end of the command topic",
        WAIT,
        || async {
            let (next,): (Option<i64>,) =
                sqlx::query_as("SELECT sum(next_offset)::bigint FROM projection_offsets WHERE topic = $1")
                    .bind(&env.commands_topic)
                    .fetch_one(&env.pool)
                    .await?;
            Ok((next == Some(end)).then_some(()))
        },
    )
    .await?;
    // The orchestrator decided every task command, and the task views folded every event.
    until_decided(&env, &tasks.sent()).await?;
    let log = tokio::task::spawn_blocking({
        let mut log = EventLog::new(&env)?;
        let topic = env.task_events_topic.clone();
        move || -> anyhow::Result<EventLog> {
            log.read_to_end(&topic)?;
            Ok(log)
        }
    })
    .await??;
    let accepted: BTreeSet<String> = log
        .of(E::TaskAccepted)
        .filter_map(|e| e.task_id.clone())
        .collect();
    let missing: Vec<_> = ledger.tasks.difference(&accepted).collect();
    assert!(missing.is_empty(), "valid delegations not accepted: {missing:?}");
    let rejected: BTreeMap<String, String> = log
        .of(E::CommandRejected)
        .filter_map(|e| Some((e.command_id.clone()?, e.reason.clone().unwrap_or_default())))
        .collect();
    for id in &ledger.task_rejections {
        let reason = rejected.get(id);
        assert!(
            reason.is_some_and(|r| !r.is_empty()),
            "invalid task command {id} not rejected with a reason"
        );
    }
    // The task views folded every event read above. (Not the high watermarks: the last
    // offset of a transactional partition is a commit marker, which no consumer's position
    // steps over.)
    let mut last_events: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, offset, _) in &log.events {
        let last = last_events.entry(*partition).or_insert(*offset);
        *last = (*last).max(*offset);
    }
    eventually("the task views to fold every event", WAIT, || async {
        let stored: Vec<(i32, i64)> =
            sqlx::query_as("SELECT partition, next_offset FROM projection_offsets WHERE topic = $1")
                .bind(&env.task_events_topic)
                .fetch_all(&env.pool)
                .await?;
        let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
        Ok(last_events
            .iter()
            .all(|(p, last)| stored.get(p).is_some_and(|next| next > last))
            .then_some(()))
    })
    .await?;

    // Every hostile record is in the dead-letter topic, with its origin, class and message.
    let expected: BTreeSet<(String, i32, i64)> = ledger
        .memory_letters
        .iter()
        .map(|(p, o)| (env.commands_topic.clone(), *p, *o))
        .chain(
            ledger
                .task_letters
                .iter()
                .map(|(p, o)| (env.task_commands_topic.clone(), *p, *o)),
        )
        .collect();
    let letters = read_letters(&env, &expected)?;
    for (origin, expected) in [
        (&env.commands_topic, &ledger.memory_letters),
        (&env.task_commands_topic, &ledger.task_letters),
    ] {
        let found: BTreeSet<(i32, i64)> = letters
            .iter()
            .filter(|l| &l.topic == origin)
            .map(|l| (l.partition, l.offset))
            .collect();
        let missing: Vec<_> = expected.difference(&found).collect();
        assert!(missing.is_empty(), "not dead-lettered from {origin}: {missing:?}");
    }
    for letter in &letters {
        assert!(
            !letter.class.is_empty() && !letter.message.is_empty(),
            "a dead letter without its reason: {letter:?}"
        );
    }

    // Nothing restarted: the process is up and no worker restarted.
    let metrics = http.get(memos.url("/metrics")).send().await?.text().await?;
    assert_eq!(
        metrics_text::sum(&metrics, "memos_orchestrator_restarts_total", &[]),
        Some(0.0)
    );
    let log_text = memos.log_text();
    let restarts: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("restarting") || l.contains("panicked"))
        .collect();
    assert!(restarts.is_empty(), "{restarts:#?}");
    let refused: usize = ledger.http_refused.values().sum();
    eprintln!(
        "adversarial run: {rounds} rounds in {sent_for:?}; HTTP accepted {}, refused {refused} {:?}; \
         Kafka records {}, of which dead-lettered {} (memory) + {} (task), task commands rejected {}; \
         memories applied {}, tasks accepted {}; dead letters read {}",
        ledger.http_accepted,
        ledger.http_refused,
        ledger.kafka_sent,
        ledger.memory_letters.len(),
        ledger.task_letters.len(),
        ledger.task_rejections.len(),
        ledger.memories.len(),
        ledger.tasks.len(),
        letters.len(),
    );
    env.cleanup().await;
    Ok(())
}

/// A write declaring a body of 2 MB (over `http.max_body_bytes`), sent without it: the
/// answer must come from the declared length alone, before any body is read. Raw TCP, since
/// an HTTP client that streams the body may see the server close the connection first.
async fn oversized_body(memos: &MemosProcess) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = memos.url("").trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream
        .write_all(
            format!(
                "POST /v1/memories HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: 2000000\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut answer)).await??;
    let head = String::from_utf8_lossy(&answer[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {head:?}"))
}

/// One hostile HTTP request: what it is, and the request.
fn hostile_request(
    http: &reqwest::Client,
    memos: &MemosProcess,
    rng: &mut Rng,
    agent: &str,
) -> (&'static str, reqwest::RequestBuilder) {
    let write = |body: Value| http.post(memos.url("/v1/memories")).json(&body);
    match rng.below(11) {
        0 => (
            "NUL in content",
            write(json!({"agent_id": agent, "content": "a\u{0}b"})),
        ),
        1 => (
            "expires_at beyond PostgreSQL",
            write(json!({"agent_id": agent, "content": "x", "expires_at": "+200000-01-01T00:00:00Z"})),
        ),
        2 => (
            "metadata nested 200 deep",
            write(json!({"agent_id": agent, "content": "x", "metadata": {"deep": deep_json(200)}})),
        ),
        3 => (
            "NUL in a tag",
            write(json!({"agent_id": agent, "content": "x", "tags": ["t\u{0}"]})),
        ),
        4 => (
            "NUL in tags_any",
            http.get(memos.url(&format!("/v1/agents/{agent}/memories?tags_any=a%00b"))),
        ),
        5 => (
            "NUL in a search query",
            http.post(memos.url("/v1/memories/search"))
                .json(&json!({"agent_id": agent, "query": "coffee\u{0}"})),
        ),
        6 => (
            "a 40,000-word search query",
            http.post(memos.url("/v1/memories/search"))
                .json(&json!({"agent_id": agent, "query": "word ".repeat(40_000)})),
        ),
        7 => (
            "a position on a partition that does not exist",
            http.get(memos.url(&format!("/v1/agents/{agent}/memories")))
                .header("x-memos-position", "99999:0"),
        ),
        8 => (
            "a template with a cycle",
            http.post(memos.url("/v1/workflow-templates")).json(&json!({
                "name": format!("cyclic-{}", rng.next()),
                "steps": [
                    {"step_id": "a", "capability": "work", "depends_on": ["b"]},
                    {"step_id": "b", "capability": "work", "depends_on": ["a"]}
                ]
            })),
        ),
        9 => (
            "a template step depending on itself",
            http.post(memos.url("/v1/workflow-templates")).json(&json!({
                "name": format!("selfish-{}", rng.next()),
                "steps": [{"step_id": "a", "capability": "work", "depends_on": ["a"]}]
            })),
        ),
        _ => (
            "NUL in a task payload",
            http.post(memos.url("/v1/tasks")).json(&json!({
                "required_capabilities": ["work"], "payload": {"text": "nul \u{0}"}
            })),
        ),
    }
}

/// A record's key and value; `None` is a Kafka null.
type Record = (Option<Vec<u8>>, Option<Vec<u8>>);

/// One hostile record for the memory command topic.
fn hostile_memory_record(rng: &mut Rng, agent: &str) -> anyhow::Result<Record> {
    let key = Some(agent.as_bytes().to_vec());
    let valid = || MemoryCommand::Write(write_command(&mut Rng(7), agent));
    Ok(match rng.below(9) {
        0 => {
            let n = 1 + rng.below(256);
            (key, Some(rng.bytes(n)))
        }
        1 => {
            let bytes = valid().encode()?;
            let cut = 10 + rng.below(bytes.len() - 10);
            (key, Some(bytes[..cut].to_vec()))
        }
        2 => (
            key,
            Some(memos_schemas::single_object::encode(rng.next(), &rng.bytes(32))),
        ),
        3 => {
            let mut command = write_command(rng, agent);
            command.content = "nul \u{0} inside".into();
            (key, Some(MemoryCommand::Write(command).encode()?))
        }
        4 => {
            let mut command = write_command(rng, agent);
            // Year +200000: beyond what PostgreSQL's timestamptz holds.
            command.expires_at = Some(6_249_223_902_000_000);
            (key, Some(MemoryCommand::Write(command).encode()?))
        }
        5 => {
            let mut command = write_command(rng, agent);
            command.metadata_json = deep_json(200).to_string();
            (key, Some(MemoryCommand::Write(command).encode()?))
        }
        6 => (key, Some(rng.bytes(900_000))),
        7 => (None, None),
        _ => {
            let mut command = write_command(rng, agent);
            command.metadata_json = json!({"k": "v\u{0}"}).to_string();
            (key, Some(MemoryCommand::Write(command).encode()?))
        }
    })
}

#[derive(Debug)]
struct Letter {
    topic: String,
    partition: i32,
    offset: i64,
    class: String,
    message: String,
}

/// Reads the dead-letter topic until it holds a letter for every origin in `expected` (a
/// record may have two: a letter is sent again when its offset did not move before a retry),
/// or until the deadline.
fn read_letters(env: &TestEnv, expected: &BTreeSet<(String, i32, i64)>) -> anyhow::Result<Vec<Letter>> {
    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", format!("{}-adversarial-dlq", env.group_id))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    let mut missing = expected.clone();
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let header = |name: &str| {
            message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        let letter = Letter {
            topic: header("memos-dlq-origin-topic"),
            partition: header("memos-dlq-origin-partition").parse().unwrap_or(-1),
            offset: header("memos-dlq-origin-offset").parse().unwrap_or(-1),
            class: header("memos-dlq-error-class"),
            message: header("memos-dlq-error-message"),
        };
        missing.remove(&(letter.topic.clone(), letter.partition, letter.offset));
        letters.push(letter);
    }
    Ok(letters)
}
