//! The task views: orchestrator events written straight to the test's events topic (as the
//! orchestrator would, keyed by workflow, task or agent) are projected into PostgreSQL, each
//! agent's inbox and availability in Redis, and the HTTP answers; a restart leaves Redis equal
//! to PostgreSQL and a rebuild from the log gives the same rows; bad task requests get clear
//! errors and append nothing; with the orchestrator, an agent takes a task over HTTP.

use std::time::Duration;

use memos_integration_tests::process::issue_key;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use memos_schemas::task::{TaskCommand, TaskEvent, TaskEventType};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Writes task events as the orchestrator does: one record per event, keyed so that
/// everything about one task, workflow or agent is in one partition.
struct Events {
    producer: FutureProducer,
    topic: String,
    next_id: u32,
}

impl Events {
    fn new(env: &TestEnv) -> anyhow::Result<Events> {
        Ok(Events {
            producer: env.kafka_config().set("enable.idempotence", "true").create()?,
            topic: env.task_events_topic.clone(),
            next_id: 0,
        })
    }

    async fn raw(&self, key: &str, payload: &[u8]) -> anyhow::Result<(i32, i64)> {
        let delivery = self
            .producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        Ok((delivery.partition, delivery.offset))
    }

    /// Appends an event of `kind` at time `at` (ms), filled in by `f`, keyed by `key`.
    async fn send(
        &mut self,
        key: &str,
        kind: TaskEventType,
        at: i64,
        f: impl FnOnce(&mut TaskEvent),
    ) -> anyhow::Result<()> {
        self.next_id += 1;
        let mut event = TaskEvent::new(format!("test:{}", self.next_id), kind, at);
        f(&mut event);
        self.raw(key, &event.encode()?).await.map(|_| ())
    }

    async fn register(
        &mut self,
        agent: &str,
        capabilities: &[&str],
        max: i32,
        at: i64,
    ) -> anyhow::Result<()> {
        let data = json!({"capabilities": capabilities, "max_concurrent": max, "metadata": {"zone": "eu"}});
        self.send(agent, TaskEventType::AgentRegistered, at, |e| {
            e.agent_id = Some(agent.into());
            e.data_json = Some(data.to_string());
        })
        .await
    }

    async fn accept(
        &mut self,
        task: &str,
        workflow: Option<&str>,
        priority: i32,
        at: i64,
    ) -> anyhow::Result<()> {
        let data = json!({
            "required_capabilities": ["summarize"], "payload": {"doc": task}, "priority": priority,
            "timeout_ms": 30_000, "max_attempts": 3, "preferred_agent": null
        });
        self.send(workflow.unwrap_or(task), TaskEventType::TaskAccepted, at, |e| {
            e.task_id = Some(task.into());
            e.workflow_id = workflow.map(str::to_owned);
            e.step_id = workflow.and_then(|_| task.rsplit('/').next().map(str::to_owned));
            e.actor = Some("planner".into());
            e.command_id = Some(uuid::Uuid::new_v4().to_string());
            e.command_type = Some("DelegateTask".into());
            e.data_json = Some(data.to_string());
        })
        .await
    }

    async fn assign(
        &mut self,
        task: &str,
        workflow: Option<&str>,
        agent: &str,
        (attempt, priority): (i32, i32),
        at: i64,
    ) -> anyhow::Result<()> {
        let data = json!({"payload": {"doc": task}, "priority": priority, "deadline": at + 30_000});
        self.send(workflow.unwrap_or(task), TaskEventType::TaskAssigned, at, |e| {
            e.task_id = Some(task.into());
            e.workflow_id = workflow.map(str::to_owned);
            e.agent_id = Some(agent.into());
            e.attempt = Some(attempt);
            e.data_json = Some(data.to_string());
        })
        .await
    }

    async fn task_event(
        &mut self,
        task: &str,
        workflow: Option<&str>,
        kind: TaskEventType,
        at: i64,
        f: impl FnOnce(&mut TaskEvent),
    ) -> anyhow::Result<()> {
        self.send(workflow.unwrap_or(task), kind, at, |e| {
            e.task_id = Some(task.into());
            e.workflow_id = workflow.map(str::to_owned);
            f(e);
        })
        .await
    }
}

async fn redis(env: &TestEnv) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(env.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?)
}

async fn hget(env: &TestEnv, key: &str, field: &str) -> anyhow::Result<Option<String>> {
    let mut redis = redis(env).await?;
    Ok(redis::cmd("HGET")
        .arg(format!("{}:{key}", env.redis_prefix))
        .arg(field)
        .query_async(&mut redis)
        .await?)
}

/// Task ids in an agent's cached inbox, in inbox order.
async fn cached_inbox(env: &TestEnv, agent: &str) -> anyhow::Result<Option<Vec<String>>> {
    let Some(doc) = hget(env, &format!("inbox:{agent}"), "doc").await? else {
        return Ok(None);
    };
    let items: Vec<Value> = serde_json::from_str(&doc)?;
    Ok(Some(
        items
            .iter()
            .map(|i| i["task_id"].as_str().unwrap_or_default().to_owned())
            .collect(),
    ))
}

async fn task_status(env: &TestEnv, task: &str) -> anyhow::Result<Option<(String, Option<String>, i32)>> {
    Ok(
        sqlx::query_as("SELECT status, agent_id, attempt FROM tasks WHERE task_id = $1")
            .bind(task)
            .fetch_optional(&env.pool)
            .await?,
    )
}

/// Waits until the task's row says `status` (held by `agent`).
async fn until_task(env: &TestEnv, task: &str, status: &str, agent: Option<&str>) -> anyhow::Result<i32> {
    eventually(&format!("task {task} to be {status}"), WAIT, || async {
        Ok(task_status(env, task)
            .await?
            .filter(|(s, a, _)| s == status && a.as_deref() == agent)
            .map(|(_, _, attempt)| attempt))
    })
    .await
}

async fn until_inbox(env: &TestEnv, agent: &str, expected: &[&str]) -> anyhow::Result<()> {
    eventually(&format!("{agent}'s inbox to be {expected:?}"), WAIT, || async {
        Ok(
            (cached_inbox(env, agent).await? == Some(expected.iter().map(|s| s.to_string()).collect()))
                .then_some(()),
        )
    })
    .await
}

async fn get(http: &reqwest::Client, url: String) -> anyhow::Result<(u16, Value)> {
    let response = http.get(url).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_events_become_views_inboxes_and_answers() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The projector and the API without the orchestrator: the events below are its decisions.
    let _projector = MemosProcess::start(&env, "projector", &[]).await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let http = reqwest::Client::new();
    let mut events = Events::new(&env)?;

    events.register("tv-a1", &["summarize"], 2, 1_000).await?;
    events
        .register("tv-a2", &["summarize", "translate"], 1, 1_001)
        .await?;
    events.accept("tv-t1", None, 1, 2_000).await?;
    events.assign("tv-t1", None, "tv-a1", (1, 1), 2_001).await?;
    events.accept("tv-t2", None, 9, 2_100).await?;
    events.assign("tv-t2", None, "tv-a1", (1, 9), 2_101).await?;
    events
        .task_event("tv-t1", None, TaskEventType::TaskStarted, 2_200, |e| {
            e.agent_id = Some("tv-a1".into());
            e.attempt = Some(1);
        })
        .await?;
    // A rejected command about the task is part of its history.
    events
        .task_event("tv-t1", None, TaskEventType::CommandRejected, 2_300, |e| {
            e.agent_id = Some("tv-a2".into());
            e.command_id = Some("0195e7a4-0000-7000-8000-000000000001".into());
            e.command_type = Some("CompleteTask".into());
            e.reason = Some("not_holder: tv-a2 does not hold tv-t1".into());
        })
        .await?;
    // A record the projection cannot decode is dead-lettered and the partition flows on.
    let (bad_partition, bad_offset) = events.raw("tv-t1", b"not an event").await?;

    until_task(&env, "tv-t1", "running", Some("tv-a1")).await?;
    until_task(&env, "tv-t2", "assigned", Some("tv-a1")).await?;
    // Highest priority first.
    until_inbox(&env, "tv-a1", &["tv-t2", "tv-t1"]).await?;
    let availability: Value =
        serde_json::from_str(&hget(&env, "availability:tv-a1", "doc").await?.unwrap_or_default())?;
    assert_eq!(availability["load"], 2);
    assert_eq!(availability["max_concurrent"], 2);
    assert_eq!(availability["status"], "alive");

    let (status, inbox) = get(&http, api.url("/v1/agents/tv-a1/inbox")).await?;
    assert_eq!(status, 200, "{inbox}");
    assert_eq!(inbox["source"], "redis");
    assert_eq!(inbox["items"][0]["task_id"], "tv-t2");
    assert_eq!(inbox["items"][1]["task_id"], "tv-t1");
    assert_eq!(inbox["items"][1]["status"], "running");
    assert_eq!(inbox["items"][1]["payload"], json!({"doc": "tv-t1"}));
    assert_eq!(inbox["items"][1]["attempt"], 1);

    let (status, agents) = get(&http, api.url("/v1/agents")).await?;
    assert_eq!(status, 200);
    let loads: Vec<(String, i64, i64)> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap().to_owned(),
                a["load"].as_i64().unwrap(),
                a["max_concurrent"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(loads, vec![("tv-a1".into(), 2, 2), ("tv-a2".into(), 0, 1)]);
    assert_eq!(
        agents["items"][1]["capabilities"],
        json!(["summarize", "translate"])
    );

    let (status, task) = get(&http, api.url("/v1/tasks/tv-t1")).await?;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["status"], "running");
    assert_eq!(task["required_capabilities"], json!(["summarize"]));
    assert_eq!(task["actor"], "planner");
    let types: Vec<&str> = task["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![
            "TASK_ACCEPTED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "COMMAND_REJECTED"
        ]
    );
    assert_eq!(
        task["events"][3]["reason"],
        "not_holder: tv-a2 does not hold tv-t1"
    );
    let (status, command) = get(
        &http,
        api.url("/v1/commands/0195e7a4-0000-7000-8000-000000000001"),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(command["status"], "rejected", "{command}");
    assert_eq!(command["events"][0]["task_id"], "tv-t1");
    let (_, unknown) = get(&http, api.url(&format!("/v1/commands/{}", uuid::Uuid::now_v7()))).await?;
    assert_eq!(unknown["status"], "pending");
    // A delegation the orchestrator refused leaves no task, but its 404 says why.
    events
        .send("tv-dup", TaskEventType::CommandRejected, 2_400, |e| {
            e.task_id = Some("tv-dup".into());
            e.command_type = Some("DelegateTask".into());
            e.reason = Some("task tv-dup exists".into());
        })
        .await?;
    let missing = eventually("the refused delegation to be recorded", WAIT, || async {
        let (status, body) = get(&http, api.url("/v1/tasks/tv-dup")).await?;
        Ok((status == 404 && body["message"].as_str().is_some_and(|m| m.contains("exists"))).then_some(body))
    })
    .await?;
    assert_eq!(missing["code"], "not_found");

    // The first attempt of tv-t2 times out and it moves to tv-a2; tv-t1 completes.
    events
        .task_event("tv-t1", None, TaskEventType::TaskCompleted, 3_500, |e| {
            e.agent_id = Some("tv-a1".into());
            e.attempt = Some(1);
            e.data_json = Some(json!({"result": {"summary": "short"}, "duration_ms": 1_500}).to_string());
        })
        .await?;
    events
        .task_event("tv-t2", None, TaskEventType::TaskTimedOut, 4_000, |e| {
            e.agent_id = Some("tv-a1".into());
            e.attempt = Some(1);
            e.reason = Some("no completion within 30000 ms".into());
        })
        .await?;
    events
        .task_event("tv-t2", None, TaskEventType::TaskRedelegated, 4_000, |e| {
            e.agent_id = Some("tv-a1".into());
            e.attempt = Some(2);
            e.reason = Some("timed out".into());
        })
        .await?;
    events.assign("tv-t2", None, "tv-a2", (2, 9), 4_001).await?;

    assert_eq!(until_task(&env, "tv-t2", "assigned", Some("tv-a2")).await?, 2);
    until_task(&env, "tv-t1", "completed", Some("tv-a1")).await?;
    until_inbox(&env, "tv-a1", &[]).await?;
    until_inbox(&env, "tv-a2", &["tv-t2"]).await?;
    let (_, task) = get(&http, api.url("/v1/tasks/tv-t1")).await?;
    assert_eq!(task["result"], json!({"summary": "short"}));
    assert_eq!(task["duration_ms"], 1_500);
    let (_, task) = get(&http, api.url("/v1/tasks/tv-t2")).await?;
    assert_eq!(task["last_error"], "timed out");
    assert_eq!(task["attempt"], 2);

    // A three-step workflow: each step's state and result.
    events
        .send("template:etl", TaskEventType::TemplateDefined, 5_000, |e| {
            e.data_json = Some(
                json!({"name": "etl", "version": 1, "steps": [
                    {"step_id": "extract", "capability": "summarize", "depends_on": [], "timeout_ms": 1000, "max_attempts": 2},
                    {"step_id": "transform", "capability": "summarize", "depends_on": ["extract"], "timeout_ms": 1000, "max_attempts": 2},
                    {"step_id": "load", "capability": "summarize", "depends_on": ["transform"], "timeout_ms": 1000, "max_attempts": 2}
                ]})
                .to_string(),
            )
        })
        .await?;
    let wf = Some("tv-w1");
    events
        .send("tv-w1", TaskEventType::WorkflowStarted, 5_100, |e| {
            e.workflow_id = Some("tv-w1".into());
            e.data_json = Some(
                json!({"template": "etl", "template_version": 1, "input": {"rows": 3}, "priority": 2})
                    .to_string(),
            );
        })
        .await?;
    events.accept("tv-w1/extract", wf, 2, 5_101).await?;
    events.assign("tv-w1/extract", wf, "tv-a1", (1, 2), 5_102).await?;
    events
        .task_event("tv-w1/extract", wf, TaskEventType::TaskCompleted, 5_600, |e| {
            e.agent_id = Some("tv-a1".into());
            e.data_json = Some(json!({"result": {"rows": [1, 2, 3]}, "duration_ms": 499}).to_string());
        })
        .await?;
    events.accept("tv-w1/transform", wf, 2, 5_601).await?;

    until_task(&env, "tv-w1/transform", "pending", None).await?;
    let (status, workflow) = get(&http, api.url("/v1/workflows/tv-w1")).await?;
    assert_eq!(status, 200, "{workflow}");
    assert_eq!(workflow["status"], "running");
    assert_eq!(workflow["input"], json!({"rows": 3}));
    let steps: Vec<(&str, &str)> = workflow["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step_id"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("extract", "completed"),
            ("transform", "pending"),
            ("load", "waiting")
        ]
    );
    assert_eq!(workflow["steps"][0]["result"], json!({"rows": [1, 2, 3]}));
    assert_eq!(workflow["steps"][1]["depends_on"], json!(["extract"]));
    let (status, task) = get(&http, api.url("/v1/tasks/tv-w1%2Fextract")).await?;
    assert_eq!(status, 200, "a step's task id is addressed percent-encoded");
    assert_eq!(task["workflow_id"], "tv-w1");
    let (status, template) = get(&http, api.url("/v1/workflow-templates/etl")).await?;
    assert_eq!(status, 200);
    assert_eq!(template["version"], 1);
    assert_eq!(template["steps"][2]["depends_on"], json!(["transform"]));

    let (_, stats) = get(&http, api.url("/v1/orchestrator/stats")).await?;
    assert_eq!(stats["total_tasks_delegated"], 4, "{stats}");
    assert_eq!(stats["active_workflows"], 1);
    assert_eq!(stats["completed_workflows"], 0);
    assert_eq!(stats["average_completion_ms"], 999.5, "{stats}");

    events
        .send("tv-w1", TaskEventType::WorkflowCompleted, 9_100, |e| {
            e.workflow_id = Some("tv-w1".into());
            e.data_json =
                Some(json!({"results": {"extract": {"rows": [1, 2, 3]}}, "duration_ms": 4_000}).to_string());
        })
        .await?;
    let stats = eventually("the workflow to complete", WAIT, || async {
        let (_, stats) = get(&http, api.url("/v1/orchestrator/stats")).await?;
        Ok((stats["completed_workflows"] == 1).then_some(stats))
    })
    .await?;
    assert_eq!(stats["active_workflows"], 0);
    assert_eq!(stats["average_workflow_duration_ms"], 4_000.0);
    let loads: Vec<(&str, i64)> = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["agent_id"].as_str().unwrap(), a["load"].as_i64().unwrap()))
        .collect();
    assert_eq!(loads, vec![("tv-a1", 0), ("tv-a2", 1)]);

    // Listing: filters, newest change first, pages that neither skip nor repeat.
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, completed) = get(&http, api.url("/v1/tasks?status=completed")).await?;
    assert_eq!(ids(&completed), vec!["tv-w1/extract", "tv-t1"]);
    let (_, held) = get(&http, api.url("/v1/tasks?agent_id=tv-a2&status=assigned")).await?;
    assert_eq!(ids(&held), vec!["tv-t2"]);
    let (_, steps) = get(&http, api.url("/v1/tasks?workflow_id=tv-w1")).await?;
    assert_eq!(ids(&steps), vec!["tv-w1/transform", "tv-w1/extract"]);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => api.url(&format!("/v1/tasks?limit=3&cursor={c}")),
            None => api.url("/v1/tasks?limit=3"),
        };
        let (status, page) = get(&http, url).await?;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.replace('/', "%2F")),
            None => break,
        }
    }
    assert_eq!(seen, vec!["tv-w1/transform", "tv-w1/extract", "tv-t2", "tv-t1"]);
    let (status, bad) = get(&http, api.url("/v1/tasks?status=lost")).await?;
    assert_eq!((status, bad["field"].as_str()), (400, Some("status")));

    // The audit trail holds every event once, in log order, and the bad record went to the DLQ.
    let (rows, rejections): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE type = 'COMMAND_REJECTED') FROM task_events")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!((rows, rejections), (i64::from(events.next_id), 2));
    let letter = dead_letter(&env, &env.task_events_topic).await?;
    assert_eq!(letter, (bad_partition, bad_offset, "not_avro".to_owned()));
    env.cleanup().await;
    Ok(())
}

/// The origin partition, offset and error class of the first dead letter from `origin`.
async fn dead_letter(env: &TestEnv, origin: &str) -> anyhow::Result<(i32, i64, String)> {
    let mut config = env.kafka_config();
    config
        .set("group.id", format!("{}-dlq-reader", env.group_id))
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        if header("memos-dlq-origin-topic").as_deref() == Some(origin) {
            return Ok((
                header("memos-dlq-origin-partition").unwrap_or_default().parse()?,
                header("memos-dlq-origin-offset").unwrap_or_default().parse()?,
                header("memos-dlq-error-class").unwrap_or_default(),
            ));
        }
    }
    anyhow::bail!("no dead letter from {origin}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_leave_redis_equal_to_postgresql_and_rebuilds_equal_rows() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut projector = MemosProcess::start(&env, "projector", &[]).await?;
    let mut events = Events::new(&env)?;
    events.register("rs-a1", &["summarize"], 3, 1_000).await?;
    events.accept("rs-t1", None, 0, 1_100).await?;
    events.assign("rs-t1", None, "rs-a1", (1, 0), 1_101).await?;
    until_inbox(&env, "rs-a1", &["rs-t1"]).await?;

    // Killed and restarted: the events appended meanwhile are applied once.
    projector.kill()?;
    events.accept("rs-t2", None, 0, 1_200).await?;
    events.assign("rs-t2", None, "rs-a1", (1, 9), 1_201).await?;
    events
        .task_event("rs-t1", None, TaskEventType::TaskCancelled, 1_300, |e| {
            e.reason = Some("no longer needed".into())
        })
        .await?;
    let mut projector = MemosProcess::start(&env, "projector", &[]).await?;
    until_task(&env, "rs-t1", "cancelled", Some("rs-a1")).await?;
    until_inbox(&env, "rs-a1", &["rs-t2"]).await?;

    // A crash after a commit and before its Redis write: PostgreSQL has a revision Redis never
    // got, and Redis still holds the older snapshot.
    projector.kill()?;
    let (revision,): (i64,) =
        sqlx::query_as("SELECT revision FROM agent_view_revisions WHERE agent_id = 'rs-a1'")
            .fetch_one(&env.pool)
            .await?;
    sqlx::query("UPDATE agent_view_revisions SET synced_revision = 0 WHERE agent_id = 'rs-a1'")
        .execute(&env.pool)
        .await?;
    let mut redis = redis(&env).await?;
    let key = format!("{}:inbox:rs-a1", env.redis_prefix);
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("rev")
        .arg(revision - 1)
        .arg("doc")
        .arg(r#"[{"task_id":"rs-t1"}]"#)
        .query_async(&mut redis)
        .await?;
    assert_eq!(cached_inbox(&env, "rs-a1").await?, Some(vec!["rs-t1".to_owned()]));

    // The restarted projection rewrites the agent from PostgreSQL before its first batch.
    let mut projector = MemosProcess::start(&env, "projector", &[]).await?;
    until_inbox(&env, "rs-a1", &["rs-t2"]).await?;
    // The synced revision is recorded after the Redis write it stands for.
    let synced = eventually("the resync recorded", WAIT, || async {
        let synced: (i64, i64) = sqlx::query_as(
            "SELECT revision, synced_revision FROM agent_view_revisions WHERE agent_id = 'rs-a1'",
        )
        .fetch_one(&env.pool)
        .await?;
        Ok((synced.1 >= revision).then_some(synced))
    })
    .await?;
    assert_eq!(synced, (revision, revision));
    // Nothing was applied twice across the restarts.
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM task_events")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(rows, i64::from(events.next_id));

    // With no Redis copy at all, the API answers the inbox from PostgreSQL.
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let (status, inbox) = get(&reqwest::Client::new(), api.url("/v1/agents/rs-a1/inbox")).await?;
    assert_eq!(status, 200);
    assert_eq!(inbox["source"], "postgres");
    assert_eq!(inbox["items"][0]["task_id"], "rs-t2");
    assert_eq!(inbox["availability"]["load"], 1);

    // Deterministic: the views rebuilt from the log are the same rows.
    projector.kill()?;
    let before = view_rows(&env).await?;
    sqlx::raw_sql(
        "TRUNCATE agents, tasks, workflows, workflow_templates, task_events;
         DELETE FROM projection_offsets WHERE projection = 'tasks'",
    )
    .execute(&env.pool)
    .await?;
    assert!(view_rows(&env).await?.is_empty());
    let _projector = MemosProcess::start(&env, "projector", &[]).await?;
    let after = eventually("the views to be rebuilt", WAIT, || async {
        let rows = view_rows(&env).await?;
        Ok((rows.len() == before.len()).then_some(rows))
    })
    .await?;
    assert_eq!(after, before);
    env.cleanup().await;
    Ok(())
}

/// Every row of the task views (revision bookkeeping aside), as text, in a stable order.
async fn view_rows(env: &TestEnv) -> anyhow::Result<Vec<String>> {
    let mut rows = Vec::new();
    for table in [
        "agents",
        "tasks",
        "workflows",
        "workflow_templates",
        "task_events",
    ] {
        let texts: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT r::text FROM {table} r ORDER BY r::text"
        )))
        .fetch_all(&env.pool)
        .await?;
        rows.extend(texts.into_iter().map(|(text,)| format!("{table}: {text}")));
    }
    Ok(rows)
}

/// Reads the record at `partition:offset` of `topic`: its key and decoded task command.
fn command_at(
    env: &TestEnv,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<(String, TaskCommand)> {
    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", format!("{}-peek", env.group_id))
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            return Ok((key, TaskCommand::decode(message.payload().unwrap_or_default())?));
        }
    }
    anyhow::bail!("no record at {topic} {partition}:{offset}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_requests_are_validated_routed_and_answered() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let key = issue_key(&env, "tests", "service", &["--agent", "*"])?;
    let api = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__AUTH", "keys"),
            ("MEMOS__MEMORY__READ_YOUR_WRITES_TIMEOUT", "300ms"),
        ],
    )
    .await?;
    let http = reqwest::Client::new();
    let post = |path: &str, body: String| {
        http.post(api.url(path))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    for (method, path) in [
        (reqwest::Method::POST, "/v1/tasks"),
        (reqwest::Method::GET, "/v1/agents"),
        (reqwest::Method::GET, "/v1/orchestrator/stats"),
        (reqwest::Method::DELETE, "/v1/agents/x"),
    ] {
        let response = http
            .request(method, api.url(path))
            .json(&json!({}))
            .send()
            .await?;
        assert_eq!(response.status(), 401, "{path}");
        assert_eq!(response.json::<Value>().await?["code"], "unauthorized");
    }

    // Rows as the projector would have left them: a finished task, a workflow, a template.
    sqlx::raw_sql(
        "INSERT INTO tasks (task_id, status, attempt, priority, updated_at, log_partition, log_offset)
             VALUES ('done-1', 'completed', 1, 0, now(), 0, 0);
         INSERT INTO workflows (workflow_id, template, status, priority, started_at, updated_at,
                                log_partition, log_offset)
             VALUES ('wf-1', 'etl', 'running', 0, now(), now(), 0, 0);
         INSERT INTO workflow_templates (name, version, steps, defined_at) VALUES ('etl', 1, '[]', now())",
    )
    .execute(&env.pool)
    .await?;
    let big = "x".repeat(70 * 1024);
    let cases = [
        ("/v1/agents", "{not json".to_owned(), 400, "malformed_json", None),
        (
            "/v1/agents",
            json!({"capabilities": []}).to_string(),
            422,
            "invalid",
            None,
        ),
        (
            "/v1/agents",
            json!({"agent_id": "a", "max_concurrent": 0}).to_string(),
            422,
            "invalid",
            Some("max_concurrent"),
        ),
        (
            "/v1/agents",
            json!({"agent_id": "a", "metadata": [1]}).to_string(),
            422,
            "invalid",
            Some("metadata"),
        ),
        (
            "/v1/tasks",
            json!({"task_id": " "}).to_string(),
            422,
            "invalid",
            Some("task_id"),
        ),
        (
            "/v1/tasks",
            json!({"preferred_agent": ""}).to_string(),
            422,
            "invalid",
            Some("preferred_agent"),
        ),
        (
            "/v1/tasks",
            json!({"timeout_ms": 0}).to_string(),
            422,
            "invalid",
            Some("timeout_ms"),
        ),
        (
            "/v1/tasks",
            json!({"max_attempts": 1000}).to_string(),
            422,
            "invalid",
            Some("max_attempts"),
        ),
        (
            "/v1/tasks",
            json!({"payload": big}).to_string(),
            413,
            "too_large",
            Some("payload"),
        ),
        (
            "/v1/tasks",
            json!({"surprise": 1}).to_string(),
            422,
            "invalid",
            None,
        ),
        ("/v1/tasks", "x".repeat(300 * 1024), 413, "too_large", None),
        (
            "/v1/workflow-templates",
            json!({"name": "t", "steps": []}).to_string(),
            422,
            "invalid",
            Some("steps"),
        ),
        (
            "/v1/workflow-templates",
            json!({"name": "t", "steps": [{"step_id": "a", "capability": "c", "max_attempts": 0}]})
                .to_string(),
            422,
            "invalid",
            Some("steps.max_attempts"),
        ),
        (
            "/v1/workflows",
            json!({"template": "t", "input": big}).to_string(),
            413,
            "too_large",
            Some("input"),
        ),
        (
            "/v1/tasks/nope/complete",
            json!({"agent_id": "a"}).to_string(),
            404,
            "not_found",
            None,
        ),
        (
            "/v1/tasks/nope/start",
            json!({"agent_id": "a"}).to_string(),
            404,
            "not_found",
            None,
        ),
        ("/v1/tasks/nope/cancel", String::new(), 404, "not_found", None),
        // Checked before the lookup: a bad command about an unknown task is a 413/422, not a 404.
        (
            "/v1/tasks/nope/complete",
            json!({"agent_id": "a", "result": big}).to_string(),
            413,
            "too_large",
            Some("result"),
        ),
        // What the orchestrator could only reject, from a request that cannot be a retry.
        (
            "/v1/tasks",
            json!({"task_id": "done-1"}).to_string(),
            409,
            "conflict",
            None,
        ),
        (
            "/v1/tasks/done-1/complete",
            json!({"agent_id": "a"}).to_string(),
            409,
            "conflict",
            None,
        ),
        ("/v1/tasks/done-1/cancel", String::new(), 409, "conflict", None),
        (
            "/v1/workflows",
            json!({"workflow_id": "wf-1", "template": "etl"}).to_string(),
            409,
            "conflict",
            None,
        ),
        (
            "/v1/workflow-templates",
            json!({"name": "etl", "steps": [{"step_id": "a", "capability": "c"}]}).to_string(),
            409,
            "conflict",
            None,
        ),
        (
            "/v1/agents/a/heartbeat",
            "{not json".to_owned(),
            400,
            "malformed_json",
            None,
        ),
    ];
    for (path, body, status, code, field) in cases {
        let response = post(path, body.clone()).await?;
        let got = response.status().as_u16();
        let answer: Value = response.json().await?;
        assert_eq!(got, status, "{path} {}: {answer}", &body[..body.len().min(60)]);
        assert_eq!(answer["code"], code, "{path}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["field"], field, "{path}: {answer}");
        }
    }
    let not_json = http
        .post(api.url("/v1/tasks"))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await?;
    assert_eq!(not_json.status(), 415);
    for path in [
        "/v1/tasks/nope",
        "/v1/workflows/nope",
        "/v1/agents/nobody/inbox",
        "/v1/workflow-templates/none",
    ] {
        let response = http.get(api.url(path)).bearer_auth(&key).send().await?;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(response.json::<Value>().await?["code"], "not_found");
    }
    // A read naming a command the views have not decided waits, then says so; a bad id is a 400.
    for (header, status, code) in [
        (uuid::Uuid::now_v7().to_string(), 504, "not_caught_up"),
        ("not-a-uuid".to_owned(), 400, "bad_request"),
    ] {
        let response = http
            .get(api.url("/v1/orchestrator/stats"))
            .bearer_auth(&key)
            .header("x-memos-command", header)
            .send()
            .await?;
        assert_eq!(response.status(), status);
        assert_eq!(response.json::<Value>().await?["code"], code);
    }
    assert!(
        env.high_watermarks(&env.task_commands_topic)?
            .iter()
            .all(|(_, high)| *high == 0),
        "refused requests append nothing"
    );

    // Accepted commands are keyed by their routing key: the task, the workflow, the agent.
    let accepted: Value = post(
        "/v1/tasks",
        json!({"required_capabilities": ["summarize"], "payload": {"doc": 1}}).to_string(),
    )
    .await?
    .json()
    .await?;
    let task_id = accepted["task_id"]
        .as_str()
        .expect("a generated task id")
        .to_owned();
    assert_eq!(accepted["topic"], env.task_commands_topic.as_str());
    let (key, command) = command_at(
        &env,
        &env.task_commands_topic,
        accepted["partition"].as_i64().unwrap() as i32,
        accepted["offset"].as_i64().unwrap(),
    )?;
    assert_eq!(key, task_id);
    let TaskCommand::Delegate(delegate) = command else {
        anyhow::bail!("not a delegation: {command:?}")
    };
    assert_eq!(delegate.command_id, accepted["command_id"].as_str().unwrap());
    assert_eq!(delegate.payload_json, r#"{"doc":1}"#);
    assert_eq!((delegate.timeout_ms, delegate.max_attempts), (300_000, 3));

    let accepted: Value = post(
        "/v1/tasks",
        json!({"task_id": "w9/extra", "workflow_id": "w9", "required_capabilities": []}).to_string(),
    )
    .await?
    .json()
    .await?;
    let (key, _) = command_at(
        &env,
        &env.task_commands_topic,
        accepted["partition"].as_i64().unwrap() as i32,
        accepted["offset"].as_i64().unwrap(),
    )?;
    assert_eq!(key, "w9");

    // With a command id it may be a retry of an accepted command: appended, the orchestrator decides.
    let retry = json!({"reason": "stop", "command_id": uuid::Uuid::now_v7()}).to_string();
    assert_eq!(post("/v1/tasks/done-1/cancel", retry).await?.status(), 202);

    let response = post("/v1/agents/a7/heartbeat", String::new()).await?;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await?;
    assert_eq!(accepted["agent_id"], "a7");
    let (key, command) = command_at(
        &env,
        &env.task_commands_topic,
        accepted["partition"].as_i64().unwrap() as i32,
        accepted["offset"].as_i64().unwrap(),
    )?;
    assert_eq!(key, "a7");
    assert!(matches!(command, TaskCommand::Heartbeat(_)), "{command:?}");
    env.cleanup().await;
    Ok(())
}

/// Over HTTP only, with the orchestrator deciding: an agent registers, a task is delegated
/// and shows up in its inbox, the agent starts and completes it, and the figures follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_takes_a_task_through_the_api() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(memos.url(path)).json(&body).send();

    let response = post(
        "/v1/agents",
        json!({"agent_id": "api-a1", "capabilities": ["summarize"], "max_concurrent": 2, "metadata": {"model": "small"}}),
    )
    .await?;
    assert_eq!(response.status(), 202);
    let response = post("/v1/agents/api-a1/heartbeat", json!({})).await?;
    assert_eq!(response.status(), 202);
    let response = post(
        "/v1/tasks",
        json!({"task_id": "api-t1", "required_capabilities": ["summarize"], "payload": {"text": "long"}, "priority": 3}),
    )
    .await?;
    assert_eq!(response.status(), 202);
    let delegated: Value = response.json().await?;
    assert_eq!(delegated["task_id"], "api-t1");

    let inbox = eventually("the task in the agent's inbox", WAIT, || async {
        let (status, inbox) = get(&http, memos.url("/v1/agents/api-a1/inbox")).await?;
        Ok((status == 200 && inbox["items"].as_array().is_some_and(|i| !i.is_empty())).then_some(inbox))
    })
    .await?;
    assert_eq!(inbox["items"][0]["task_id"], "api-t1");
    assert_eq!(inbox["items"][0]["payload"], json!({"text": "long"}));
    assert_eq!(inbox["items"][0]["attempt"], 1);
    assert_eq!(inbox["availability"]["load"], 1);

    let response = post("/v1/tasks/api-t1/start", json!({"agent_id": "api-a1"})).await?;
    assert_eq!(response.status(), 202);
    // Another agent cannot complete it: the orchestrator rejects that, and says why.
    let response = post("/v1/tasks/api-t1/complete", json!({"agent_id": "api-intruder"})).await?;
    assert_eq!(response.status(), 202);
    let intruder: Value = response.json().await?;
    let response = post(
        "/v1/tasks/api-t1/complete",
        json!({"agent_id": "api-a1", "result": {"summary": "short"}}),
    )
    .await?;
    assert_eq!(response.status(), 202);

    let completed: Value = response.json().await?;
    // Read your writes: the read waits until the views include the completion.
    let task: Value = http
        .get(memos.url("/v1/tasks/api-t1"))
        .header("x-memos-command", completed["command_id"].as_str().unwrap())
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], json!({"summary": "short"}));
    assert_eq!(task["agent_id"], "api-a1");
    let types: Vec<&str> = task["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![
            "TASK_ACCEPTED",
            "TASK_ASSIGNED",
            "TASK_STARTED",
            "COMMAND_REJECTED",
            "TASK_COMPLETED"
        ]
    );
    assert_eq!(task["events"][3]["command_type"], "CompleteTask");
    // Each command's status says what became of it.
    let status = |answer: &Value| {
        let url = memos.url(&format!(
            "/v1/commands/{}",
            answer["command_id"].as_str().unwrap()
        ));
        let http = http.clone();
        async move { get(&http, url).await }
    };
    let (code, delegation) = status(&delegated).await?;
    assert_eq!(code, 200);
    assert_eq!(delegation["status"], "applied", "{delegation}");
    assert_eq!(delegation["events"][0]["type"], "TASK_ACCEPTED");
    let (_, refused) = status(&intruder).await?;
    assert_eq!(refused["status"], "rejected", "{refused}");
    assert_eq!(refused["events"][0]["reason"], task["events"][3]["reason"]);
    assert!(
        task["events"][3]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );

    let stats = eventually("the figures to include the completion", WAIT, || async {
        let (_, stats) = get(&http, memos.url("/v1/orchestrator/stats")).await?;
        Ok((stats["tasks"]["completed"] == 1).then_some(stats))
    })
    .await?;
    assert_eq!(stats["total_tasks_delegated"], 1);
    assert!(
        stats["average_completion_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 0.0),
        "{stats}"
    );
    assert_eq!(
        stats["agents"],
        json!([{"agent_id": "api-a1", "status": "alive", "load": 0, "max_concurrent": 2}])
    );
    until_inbox(&env, "api-a1", &[]).await?;
    env.cleanup().await;
    Ok(())
}

/// An older snapshot of an agent never replaces a newer one in Redis, whichever writer is late.
#[tokio::test]
async fn an_older_agent_snapshot_never_lands() -> anyhow::Result<()> {
    use memos_redis::HotViews;
    use memos_redis::tasks::AgentWrite;

    let env = TestEnv::new().await?;
    let hot = HotViews::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(60)).await?;
    fn write<'a>(revision: i64, inbox: &'a str, availability: Option<&'a str>) -> AgentWrite<'a> {
        AgentWrite {
            agent_id: "g-a1",
            revision,
            inbox,
            availability,
        }
    }
    assert_eq!(
        hot.put_agents(&[write(5, r#"[{"task_id":"t5"}]"#, Some(r#"{"load":1}"#))])
            .await?,
        1
    );
    // A late writer holding revision 4, and the same revision again: both refused.
    assert_eq!(
        hot.put_agents(&[write(4, "[]", Some(r#"{"load":0}"#)), write(5, "[]", None)])
            .await?,
        0
    );
    assert_eq!(hot.inbox("g-a1").await?.as_deref(), Some(r#"[{"task_id":"t5"}]"#));
    assert_eq!(hot.availability("g-a1").await?.as_deref(), Some(r#"{"load":1}"#));
    // A newer snapshot without an agent row (never registered) drops the availability.
    assert_eq!(hot.put_agents(&[write(6, "[]", None)]).await?, 1);
    assert_eq!(hot.inbox("g-a1").await?.as_deref(), Some("[]"));
    assert_eq!(hot.availability("g-a1").await?, None);
    env.cleanup().await;
    Ok(())
}
