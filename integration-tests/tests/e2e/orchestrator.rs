//! The orchestrator against real Kafka: commands appended as any Avro producer would, its
//! committed (`read_committed`) events read back and compared with the commands.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use memos_integration_tests::tasks::{EventLog, TaskClient, decided_offsets, has, until_decided};
use memos_integration_tests::{MemosProcess, TestEnv};
use memos_schemas::task::{TaskCommand, TaskEventType as E};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn orchestrator(env: &TestEnv, instance: &str, heartbeat_window: &str) -> anyhow::Result<MemosProcess> {
    MemosProcess::start(
        env,
        "orchestrator",
        &[
            ("MEMOS__ORCHESTRATOR__INSTANCE_ID", instance),
            ("MEMOS__ORCHESTRATOR__TICK_INTERVAL", "200ms"),
            ("MEMOS__ORCHESTRATOR__HEARTBEAT_WINDOW", heartbeat_window),
            ("MEMOS__ORCHESTRATOR__SESSION_TIMEOUT", "6s"),
            ("RUST_LOG", "info,memos_orchestrator=debug"),
        ],
    )
    .await
}

/// Runs blocking event reads off the runtime's workers.
async fn read<F>(mut log: EventLog, topic: String, what: &'static str, done: F) -> anyhow::Result<EventLog>
where
    F: Fn(&[(i32, i64, memos_schemas::task::TaskEvent)]) -> bool + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        log.read_until(&topic, what, WAIT, done)?;
        Ok(log)
    })
    .await?
}

/// Reads every committed event (to the end of each partition) off the runtime's workers.
async fn read_end(mut log: EventLog, topic: String) -> anyhow::Result<EventLog> {
    tokio::task::spawn_blocking(move || {
        log.read_to_end(&topic)?;
        Ok(log)
    })
    .await?
}

/// No eligible agent: the task waits and is assigned when one registers. A three-step DAG
/// runs to completion with each step's input holding its dependencies' results. Invalid
/// commands (a complete from an agent that does not hold the task, a template with a cycle)
/// are rejected with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_an_agent_then_runs_a_workflow_dag() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let orchestrator = orchestrator(&env, "one", "60s").await?;
    let client = TaskClient::new(&env)?;
    let topic = env.task_events_topic.clone();

    client.delegate("lonely", "summarize", 3).await?;
    let log = read(EventLog::new(&env)?, topic.clone(), "task accepted", |e| {
        has(e, E::TaskAccepted, "lonely")
    })
    .await?;
    // An agent without the capability registers; once it is decided, and a later command (a
    // tick) of the task's partition too, the task still waits.
    client.register("extractor-only", &["extract"], 4).await?;
    until_decided(&env, &client.sent()).await?;
    let task_partition = log
        .events
        .iter()
        .find(|(_, _, e)| e.event_type == E::TaskAccepted)
        .map(|(p, _, _)| *p)
        .expect("accepted");
    let decided = decided_offsets(&env)?;
    until_decided(
        &env,
        &BTreeMap::from([(task_partition, decided[&task_partition])]),
    )
    .await?;
    let mut log = read_end(log, topic.clone()).await?;
    assert!(
        log.assignment("lonely").is_none(),
        "assigned without an eligible agent"
    );

    client
        .register("summarizer", &["summarize", "extract"], 4)
        .await?;
    log = read(log, topic.clone(), "assigned on registration", |e| {
        has(e, E::TaskAssigned, "lonely")
    })
    .await?;
    assert_eq!(log.assignment("lonely"), Some(("summarizer".to_owned(), 1)));

    // A complete from an agent that does not hold the task is rejected, not dropped.
    client.complete("lonely", "impostor", None, json!("nope")).await?;
    // A template whose steps form a cycle is rejected.
    client
        .define("loop", &[("a", "extract", &["b"]), ("b", "extract", &["a"])])
        .await?;
    log = read(log, topic.clone(), "rejections", |e| {
        e.iter()
            .filter(|(_, _, e)| e.event_type == E::CommandRejected)
            .count()
            >= 2
    })
    .await?;
    let reasons: Vec<String> = log
        .of(E::CommandRejected)
        .filter_map(|e| e.reason.clone())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not held by agent impostor")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("cycle")), "{reasons:?}");
    client
        .complete("lonely", "summarizer", None, json!({"summary": "done"}))
        .await?;

    // extract -> (summarize, extract) -> summarize, results passed along.
    client
        .define(
            "report",
            &[
                ("fetch", "extract", &[]),
                ("digest", "summarize", &["fetch"]),
                ("publish", "summarize", &["fetch", "digest"]),
            ],
        )
        .await?;
    // The template is decided in its own partition; wait until it is known.
    log = read(log, topic.clone(), "template defined", |e| {
        e.iter().any(|(_, _, e)| e.event_type == E::TemplateDefined)
    })
    .await?;
    client
        .start_workflow("wf-1", "report", json!({"url": "https://example.org"}))
        .await?;
    for (step, result) in [
        ("fetch", json!("page")),
        ("digest", json!("short")),
        ("publish", json!("ok")),
    ] {
        let task = format!("wf-1/{step}");
        let t = task.clone();
        log = read(log, topic.clone(), "step assigned", move |e| {
            has(e, E::TaskAssigned, &t)
        })
        .await?;
        let (agent, _) = log.assignment(&task).expect("assigned");
        let assigned = log
            .of(E::TaskAssigned)
            .find(|e| e.task_id.as_deref() == Some(task.as_str()))
            .unwrap()
            .clone();
        let payload: serde_json::Value = serde_json::from_str(assigned.data_json.as_deref().unwrap())?;
        assert_eq!(
            payload["payload"]["input"]["url"], "https://example.org",
            "{payload}"
        );
        if step == "publish" {
            assert_eq!(
                payload["payload"]["steps"],
                json!({"fetch": "page", "digest": "short"})
            );
        }
        client.complete(&task, &agent, Some("wf-1"), result).await?;
    }
    log = read(log, topic.clone(), "workflow completed", |e| {
        e.iter().any(|(_, _, e)| e.event_type == E::WorkflowCompleted)
    })
    .await?;
    let done = log.of(E::WorkflowCompleted).next().unwrap();
    let data: serde_json::Value = serde_json::from_str(done.data_json.as_deref().unwrap())?;
    assert_eq!(
        data["results"],
        json!({"fetch": "page", "digest": "short", "publish": "ok"})
    );
    // A normal run logs no error: reaching the end of a partition while catching up is not one.
    let errors: Vec<String> = std::fs::read_to_string(&orchestrator.log)?
        .lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .map(str::to_owned)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    env.cleanup().await;
    Ok(())
}

/// An agent that stops heartbeating is lost and its task goes to another agent; a task that
/// fails on its last attempt is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_agent_task_moves_then_dead_letters_after_max_attempts() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let _orchestrator = orchestrator(&env, "one", "1500ms").await?;
    let client = TaskClient::new(&env)?;
    let topic = env.task_events_topic.clone();

    client.register("a-silent", &["translate"], 5).await?;
    let mut log = read(EventLog::new(&env)?, topic.clone(), "agent registered", |e| {
        e.iter().any(|(_, _, e)| e.event_type == E::AgentRegistered)
    })
    .await?;
    client.delegate("job", "translate", 2).await?;
    log = read(log, topic.clone(), "assigned to the only agent", |e| {
        has(e, E::TaskAssigned, "job")
    })
    .await?;
    assert_eq!(log.assignment("job"), Some(("a-silent".to_owned(), 1)));

    // A second agent keeps heartbeating; the first never does again.
    client.register("b-alive", &["translate"], 5).await?;
    let beating = {
        let client = TaskClient::new(&env)?;
        // The agent's behaviour, not a wait: a heartbeat every 300 ms (window 1.5 s).
        let mut every = tokio::time::interval(Duration::from_millis(300));
        tokio::spawn(async move {
            loop {
                every.tick().await;
                let _ = client.heartbeat("b-alive").await;
            }
        })
    };
    log = read(log, topic.clone(), "re-delegated to the live agent", |e| {
        e.iter().any(|(_, _, e)| {
            e.event_type == E::TaskAssigned
                && e.agent_id.as_deref() == Some("b-alive")
                && e.attempt == Some(2)
        })
    })
    .await?;
    let lost: Vec<_> = log.of(E::AgentLost).filter_map(|e| e.agent_id.clone()).collect();
    assert_eq!(lost, vec!["a-silent".to_owned()]);
    let moved = log.of(E::TaskRedelegated).next().expect("re-delegated");
    assert_eq!(moved.agent_id.as_deref(), Some("a-silent"));
    assert_eq!(moved.reason.as_deref(), Some("agent lost"));

    // Attempt 2 of 2 fails: dead-lettered, not retried.
    client.fail("job", "b-alive", true).await?;
    log = read(log, topic.clone(), "dead-lettered", |e| {
        has(e, E::TaskDeadLettered, "job")
    })
    .await?;
    let dead = log.of(E::TaskDeadLettered).next().unwrap();
    assert!(
        dead.reason
            .as_deref()
            .unwrap_or_default()
            .contains("max attempts (2)"),
        "{dead:?}"
    );
    assert_eq!(log.per_task(E::TaskAssigned)["job"], 2);
    beating.abort();
    env.cleanup().await;
    Ok(())
}

/// Delegates `count` tasks `task-<first>..`, each command sent twice (a client retry).
async fn delegate_many(client: &TaskClient, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    for i in range {
        let command = TaskCommand::Delegate(TaskClient::delegate_command(
            &format!("task-{i}"),
            "work",
            3,
            600_000,
        ));
        client.send(&command).await?;
        if i % 10 == 0 {
            client.send(&command).await?;
        }
    }
    Ok(())
}

/// Every delegated task was accepted once and assigned once, and nothing else was assigned.
fn assert_exactly_once(log: &EventLog, count: usize) {
    let expected: BTreeSet<String> = (0..count).map(|i| format!("task-{i}")).collect();
    for kind in [E::TaskAccepted, E::TaskAssigned] {
        let per_task = log.per_task(kind);
        let tasks: BTreeSet<String> = per_task.keys().cloned().collect();
        assert_eq!(tasks, expected, "{kind:?}: tasks differ from the commands");
        let doubled: Vec<_> = per_task.iter().filter(|(_, n)| **n != 1).collect();
        assert!(doubled.is_empty(), "{kind:?} more than once: {doubled:?}");
    }
    assert_eq!(
        log.of(E::CommandRejected).count(),
        0,
        "retried commands must be no-ops"
    );
}

/// The orchestrator killed with SIGKILL in the middle of a stream and restarted: every
/// delegated task is accepted and assigned exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_assigns_every_task_exactly_once() -> anyhow::Result<()> {
    const TASKS: usize = 1500;
    let env = TestEnv::new().await?;
    let mut first = orchestrator(&env, "one", "600s").await?;
    let client = TaskClient::new(&env)?;
    for agent in ["w1", "w2", "w3"] {
        client.register(agent, &["work"], 1000).await?;
    }
    delegate_many(&client, 0..TASKS / 2).await?;
    let topic = env.task_events_topic.clone();
    let log = read(EventLog::new(&env)?, topic.clone(), "some assignments", |e| {
        e.iter()
            .filter(|(_, _, e)| e.event_type == E::TaskAssigned)
            .count()
            >= 100
    })
    .await?;
    first.kill()?;
    delegate_many(&client, TASKS / 2..TASKS).await?;
    let _second = orchestrator(&env, "one", "600s").await?;
    let log = read(log, topic, "every task assigned", |e| {
        e.iter()
            .filter(|(_, _, e)| e.event_type == E::TaskAssigned)
            .count()
            >= TASKS
    })
    .await?;
    // Every command decided and committed, then every committed event read: a repeated
    // decision would be among them.
    until_decided(&env, &client.sent()).await?;
    let log = read_end(log, env.task_events_topic.clone()).await?;
    assert_exactly_once(&log, TASKS);
    env.cleanup().await;
    Ok(())
}

/// Two instances share the partitions (each takes some) without assigning any task twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_without_double_assignment() -> anyhow::Result<()> {
    const TASKS: usize = 1200;
    let env = TestEnv::new().await?;
    let mut first = orchestrator(&env, "one", "600s").await?;
    let mut second = orchestrator(&env, "two", "600s").await?;
    let client = TaskClient::new(&env)?;
    for agent in ["w1", "w2"] {
        client.register(agent, &["work"], 1000).await?;
    }
    first.wait_for_log("task partition taken", WAIT).await?;
    second.wait_for_log("task partition taken", WAIT).await?;
    delegate_many(&client, 0..TASKS).await?;
    let log = read(
        EventLog::new(&env)?,
        env.task_events_topic.clone(),
        "every task assigned",
        |e| {
            e.iter()
                .filter(|(_, _, e)| e.event_type == E::TaskAssigned)
                .count()
                >= TASKS
        },
    )
    .await?;
    // Every command decided and committed, then every committed event read: a repeated
    // decision would be among them.
    until_decided(&env, &client.sent()).await?;
    let log = read_end(log, env.task_events_topic.clone()).await?;
    assert_exactly_once(&log, TASKS);
    // Both instances decided: each wrote to the partitions it owns.
    let partitions: BTreeSet<i32> = log.events.iter().map(|(p, _, _)| *p).collect();
    assert!(partitions.len() >= 2, "events in partitions {partitions:?}");
    let taken = |p: &MemosProcess| p.log_text().matches("task partition taken").count();
    assert!(
        taken(&first) >= 1 && taken(&second) >= 1,
        "both instances own partitions"
    );
    env.cleanup().await;
    Ok(())
}

/// A record that is not a task command goes to the dead-letter topic (in the orchestrator's
/// transaction) with its origin and class; a decodable command that breaks a limit is
/// rejected with the reason; the partition keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_dead_lettered_invalid_commands_rejected_and_the_partition_flows()
-> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new().await?;
    let _orchestrator = orchestrator(&env, "one", "60s").await?;
    let producer: FutureProducer = env.kafka_config().create()?;
    // One key, so every record lands in the same partition, in this order.
    let key = "same-key";
    let mut unknown = vec![0xC3, 0x01];
    unknown.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    unknown.extend_from_slice(b"body");
    let mut too_many = TaskClient::delegate_command(key, "work", 1000, 1000);
    too_many.max_attempts = 1000;
    let valid = TaskClient::delegate_command("after-the-bad-ones", "work", 1, 1000);
    let valid = TaskCommand::Delegate(memos_schemas::task::DelegateTask {
        workflow_id: Some(key.into()),
        ..valid
    });
    for payload in [
        b"not avro at all".to_vec(),
        unknown,
        TaskCommand::Delegate(too_many).encode()?,
        valid.encode()?,
    ] {
        producer
            .send(
                FutureRecord::to(&env.task_commands_topic)
                    .key(key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let log = read(
        EventLog::new(&env)?,
        env.task_events_topic.clone(),
        "the valid command accepted",
        |e| has(e, E::TaskAccepted, "after-the-bad-ones"),
    )
    .await?;
    let rejected: Vec<_> = log.of(E::CommandRejected).collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("max_attempts"),
        "{rejected:?}"
    );
    assert_eq!(rejected[0].command_type.as_deref(), Some("DelegateTask"));

    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", format!("{}-dlq", env.orchestrator_group_id))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while letters.len() < 2 && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            letters.push((
                header("memos-dlq-origin-topic"),
                header("memos-dlq-error-class"),
                message.key().map(<[u8]>::to_vec),
            ));
        }
    }
    let classes: BTreeSet<Option<String>> = letters.iter().map(|l| l.1.clone()).collect();
    assert_eq!(
        classes,
        BTreeSet::from([Some("not_avro".to_owned()), Some("unknown_schema".to_owned())])
    );
    for (origin, _, letter_key) in &letters {
        assert_eq!(origin.as_deref(), Some(env.task_commands_topic.as_str()));
        assert_eq!(letter_key.as_deref(), Some(key.as_bytes()));
    }
    env.cleanup().await;
    Ok(())
}

/// Records stamped 50 minutes ahead (garbage, truncated, and valid commands) on the agent's
/// and the task's partitions: no clock moves past now, so the live agent is not lost and its
/// task (timeout 1 h) is not timed out. The check is made once commands appended after the
/// forged ones have been decided, with ticks in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_record_times_move_no_clock() -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new().await?;
    // Far longer than the test runs: only a forged clock could lose the agent.
    let _orchestrator = orchestrator(&env, "one", "10m").await?;
    let client = TaskClient::new(&env)?;
    let topic = env.task_events_topic.clone();
    client.register("a-live", &["translate"], 5).await?;
    client.heartbeat("a-live").await?;
    client
        .send(&TaskCommand::Delegate(TaskClient::delegate_command(
            "long-job",
            "translate",
            3,
            3_600_000,
        )))
        .await?;
    let log = read(EventLog::new(&env)?, topic.clone(), "assigned", |e| {
        has(e, E::TaskAssigned, "long-job")
    })
    .await?;
    assert_eq!(log.assignment("long-job"), Some(("a-live".to_owned(), 1)));

    let producer: FutureProducer = env.kafka_config().create()?;
    let future = chrono::Utc::now().timestamp_millis() + 50 * 60 * 1000;
    let valid = TaskCommand::Delegate(TaskClient::delegate_command("forged", "none", 1, 1000)).encode()?;
    for key in ["a-live", "long-job"] {
        for payload in [
            b"garbage".to_vec(),
            valid[..valid.len() / 2].to_vec(),
            valid.clone(),
        ] {
            producer
                .send(
                    FutureRecord::to(&env.task_commands_topic)
                        .key(key)
                        .payload(&payload)
                        .timestamp(future),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    // Commands after the forged ones, on both partitions, decided with ticks in between.
    client.heartbeat("a-live").await?;
    client
        .send(&TaskCommand::Delegate(TaskClient::delegate_command(
            "long-job",
            "translate",
            3,
            3_600_000,
        )))
        .await?;
    until_decided(&env, &client.sent()).await?;
    let log = read_end(log, topic.clone()).await?;
    let lost: Vec<_> = log.of(E::AgentLost).collect();
    assert!(lost.is_empty(), "a forged time lost the agent: {lost:?}");
    let timed_out: Vec<_> = log.of(E::TaskTimedOut).collect();
    assert!(
        timed_out.is_empty(),
        "a forged time timed out the task: {timed_out:?}"
    );
    assert_eq!(log.per_task(E::TaskAssigned)["long-job"], 1);
    for event in log.of(E::TaskAccepted).chain(log.of(E::TaskAssigned)) {
        assert!(
            event.at < future - 40 * 60 * 1000,
            "decided at a forged time: {event:?}"
        );
    }
    env.cleanup().await;
    Ok(())
}

/// Records as large as the command topic accepts: garbage (its dead letter with headers is
/// larger than the record) and a valid delegation whose events could not fit the events
/// topic. Both are dead-lettered, the command after them is decided, and the orchestrator
/// never restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_fill_the_topic_are_dead_lettered_and_the_partition_flows() -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new().await?;
    let orchestrator = orchestrator(&env, "one", "60s").await?;
    let producer: FutureProducer = env.kafka_config().set("message.max.bytes", "1100000").create()?;
    let key = "big-key";
    let mut big = TaskClient::delegate_command("big", "work", 1, 1000);
    big.workflow_id = Some(key.into());
    big.payload_json = serde_json::to_string(&json!({"text": "x".repeat(1_040_000)}))?;
    let mut after = TaskClient::delegate_command("after-the-big-ones", "work", 1, 1000);
    after.workflow_id = Some(key.into());
    let mut offsets = Vec::new();
    for payload in [
        vec![0xAB; 1_020_000],
        TaskCommand::Delegate(big).encode()?,
        TaskCommand::Delegate(after).encode()?,
    ] {
        let delivered = producer
            .send(
                FutureRecord::to(&env.task_commands_topic)
                    .key(key)
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        offsets.push(delivered.offset);
    }
    let log = read(
        EventLog::new(&env)?,
        env.task_events_topic.clone(),
        "the command after the big ones accepted",
        |e| has(e, E::TaskAccepted, "after-the-big-ones"),
    )
    .await?;
    assert_eq!(log.per_task(E::TaskAccepted).get("big"), None);

    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", format!("{}-dlq", env.orchestrator_group_id))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = BTreeMap::new();
    let deadline = std::time::Instant::now() + WAIT;
    while letters.len() < 2 && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            let header = |name: &str| {
                message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            letters.insert(
                header("memos-dlq-origin-offset").parse::<i64>()?,
                (
                    header("memos-dlq-error-class"),
                    message.payload().map(<[u8]>::len),
                ),
            );
        }
    }
    assert_eq!(letters.get(&offsets[0]).map(|l| l.0.as_str()), Some("not_avro"));
    assert_eq!(letters.get(&offsets[1]).map(|l| l.0.as_str()), Some("too_large"));
    assert!(
        !orchestrator.log_text().contains("restarting"),
        "{}",
        orchestrator.log_text()
    );
    env.cleanup().await;
    Ok(())
}

/// Redis keeps the first 100 items of an inbox; an agent holding more gets its whole inbox
/// from PostgreSQL through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_inbox_is_served_whole() -> anyhow::Result<()> {
    const TASKS: usize = 130;
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let client = TaskClient::new(&env)?;
    client.register("busy", &["work"], 500).await?;
    for i in 0..TASKS {
        client.delegate(&format!("inbox-{i}"), "work", 1).await?;
    }
    let http = reqwest::Client::new();
    let url = memos.url("/v1/agents/busy/inbox");
    let inbox = memos_integration_tests::eventually("the whole inbox", WAIT, || async {
        let answer: serde_json::Value = http.get(&url).send().await?.json().await?;
        let items = answer["items"].as_array().map_or(0, Vec::len);
        Ok((items == TASKS).then_some(answer))
    })
    .await?;
    assert_eq!(
        inbox["source"], "postgres",
        "more than Redis holds: read from PostgreSQL"
    );
    assert_eq!(inbox["availability"]["load"], TASKS);
    let ids: BTreeSet<&str> = inbox["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["task_id"].as_str())
        .collect();
    assert_eq!(ids.len(), TASKS);
    env.cleanup().await;
    Ok(())
}

/// Workflows started on partitions read before their template's partition, then the
/// orchestrator killed and restarted: its state is rebuilt by reading the events partitions
/// one after the other, and every workflow still runs to completion (before, a start read
/// before its template had no steps, and its workflow never finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_finish_after_a_restart_whatever_partition_their_template_is_on() -> anyhow::Result<()> {
    const WORKFLOWS: usize = 16;
    let env = TestEnv::new().await?;
    let mut first = orchestrator(&env, "one", "600s").await?;
    let client = TaskClient::new(&env)?;
    let topic = env.task_events_topic.clone();
    client.register("worker", &["work"], 1000).await?;
    // Templates land on the partition of their name: take the one on the highest partition,
    // so that workflows on lower partitions are read before it.
    for n in 0..8 {
        client
            .define(
                &format!("pipeline-{n}"),
                &[("first", "work", &[]), ("second", "work", &["first"])],
            )
            .await?;
    }
    let log = read(EventLog::new(&env)?, topic.clone(), "templates defined", |e| {
        e.iter()
            .filter(|(_, _, e)| e.event_type == E::TemplateDefined)
            .count()
            >= 8
    })
    .await?;
    let (template_partition, template) = log
        .events
        .iter()
        .filter(|(_, _, e)| e.event_type == E::TemplateDefined)
        .map(|(p, _, e)| {
            let data: serde_json::Value = serde_json::from_str(e.data_json.as_deref().unwrap()).unwrap();
            (*p, data["name"].as_str().unwrap().to_owned())
        })
        .max()
        .expect("templates");
    for n in 0..WORKFLOWS {
        client
            .start_workflow(&format!("wf-{n}"), &template, json!({"n": n}))
            .await?;
    }
    let log = read(log, topic.clone(), "first steps assigned", |e| {
        (0..WORKFLOWS).all(|n| has(e, E::TaskAssigned, &format!("wf-{n}/first")))
    })
    .await?;
    let earlier: Vec<i32> = log
        .events
        .iter()
        .filter(|(p, _, e)| e.event_type == E::WorkflowStarted && *p < template_partition)
        .map(|(p, _, _)| *p)
        .collect();
    assert!(
        !earlier.is_empty(),
        "no workflow on a partition before the template's ({template_partition}): the test could not fail"
    );

    first.kill()?;
    let _second = orchestrator(&env, "one", "600s").await?;
    for n in 0..WORKFLOWS {
        client
            .complete(
                &format!("wf-{n}/first"),
                "worker",
                Some(&format!("wf-{n}")),
                json!(n),
            )
            .await?;
    }
    let log = read(log, topic.clone(), "second steps assigned", |e| {
        (0..WORKFLOWS).all(|n| has(e, E::TaskAssigned, &format!("wf-{n}/second")))
    })
    .await?;
    for n in 0..WORKFLOWS {
        client
            .complete(
                &format!("wf-{n}/second"),
                "worker",
                Some(&format!("wf-{n}")),
                json!(n),
            )
            .await?;
    }
    let log = read(log, topic, "every workflow completed", |e| {
        e.iter()
            .filter(|(_, _, e)| e.event_type == E::WorkflowCompleted)
            .count()
            >= WORKFLOWS
    })
    .await?;
    let completed: BTreeSet<String> = log
        .of(E::WorkflowCompleted)
        .filter_map(|e| e.workflow_id.clone())
        .collect();
    assert_eq!(completed.len(), WORKFLOWS, "{completed:?}");
    env.cleanup().await;
    Ok(())
}

/// A workflow whose steps' results are together larger than an event may be: the step that
/// joins them gets their tasks' ids, and the completion names the steps' tasks, instead of
/// copies of the results (before, the events topic refused the events, the transaction
/// aborted, and the orchestrator restarted forever on the same decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_results_exceed_an_event_completes() -> anyhow::Result<()> {
    // Results are at most 64 KiB each: twenty of 60 KB are more than the 1 MiB records.
    const FAN: usize = 20;
    let env = TestEnv::new().await?;
    let orchestrator = orchestrator(&env, "one", "600s").await?;
    let client = TaskClient::new(&env)?;
    let topic = env.task_events_topic.clone();
    client.register("worker", &["work"], 100).await?;
    let names: Vec<String> = (0..FAN).map(|n| format!("s{n}")).collect();
    let parts: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut steps: Vec<(&str, &str, &[&str])> = parts.iter().map(|n| (*n, "work", &[][..])).collect();
    steps.push(("join", "work", &parts));
    client.define("fan-in", &steps).await?;
    let log = read(EventLog::new(&env)?, topic.clone(), "template defined", |e| {
        e.iter().any(|(_, _, e)| e.event_type == E::TemplateDefined)
    })
    .await?;
    client.start_workflow("big", "fan-in", json!({})).await?;
    let log = read(log, topic.clone(), "steps assigned", |e| {
        (0..FAN).all(|n| has(e, E::TaskAssigned, &format!("big/s{n}")))
    })
    .await?;
    let result = json!("r".repeat(60_000));
    for name in &names {
        client
            .complete(&format!("big/{name}"), "worker", Some("big"), result.clone())
            .await?;
    }
    let log = read(log, topic.clone(), "join assigned", |e| {
        has(e, E::TaskAssigned, "big/join")
    })
    .await?;
    let accepted = log
        .of(E::TaskAccepted)
        .find(|e| e.task_id.as_deref() == Some("big/join"))
        .unwrap();
    let data: serde_json::Value = serde_json::from_str(accepted.data_json.as_deref().unwrap())?;
    assert_eq!(data["payload"]["step_tasks"]["s7"], "big/s7");
    assert!(data["payload"]["steps"].is_null(), "the results were copied");
    client.complete("big/join", "worker", Some("big"), result).await?;
    let log = read(log, topic, "workflow completed", |e| {
        e.iter().any(|(_, _, e)| e.event_type == E::WorkflowCompleted)
    })
    .await?;
    let done = log.of(E::WorkflowCompleted).next().unwrap();
    let data: serde_json::Value = serde_json::from_str(done.data_json.as_deref().unwrap())?;
    assert!(data["results"].is_null(), "the results were copied");
    assert_eq!(data["result_tasks"]["join"], "big/join");
    assert!(
        !orchestrator.log_text().contains("restarting"),
        "{}",
        orchestrator.log_text()
    );
    env.cleanup().await;
    Ok(())
}
