//! The task views rebuilt from the orchestrator's events (`memosctl replay --projection
//! tasks`) verify equal to the live ones, and `memosctl verify` reports an altered row.

use std::time::Duration;

use memos_integration_tests::tasks::{EventLog, TaskClient, until_decided};
use memos_integration_tests::{MemosProcess, TestEnv, eventually, process};
use memos_schemas::task::TaskEventType as E;
use serde_json::{Value, json};

fn memosctl(env: &TestEnv, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let output = std::process::Command::new(process::binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_views_rebuilt_from_the_events_verify_equal_and_an_altered_row_is_reported() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    // A long heartbeat window: no agent is lost (a new event) while the views are compared.
    let _memos = MemosProcess::start(
        &env,
        "all",
        &[
            ("MEMOS__ORCHESTRATOR__TICK_INTERVAL", "200ms"),
            ("MEMOS__ORCHESTRATOR__HEARTBEAT_WINDOW", "600s"),
        ],
    )
    .await?;
    let client = TaskClient::new(&env)?;

    // Agents, tasks completed, failed and re-delegated, a rejected report, a workflow.
    client.register("r-1", &["x", "y"], 10).await?;
    client.register("r-2", &["x"], 10).await?;
    for i in 0..12 {
        client.delegate(&format!("job-{i}"), "x", 2).await?;
    }
    client
        .define("pair", &[("a", "x", &[]), ("b", "y", &["a"])])
        .await?;
    let topic = env.task_events_topic.clone();
    let (log_topic, mut log) = (topic.clone(), EventLog::new(&env)?);
    log = tokio::task::spawn_blocking(move || {
        log.read_until(
            &log_topic,
            "assignments and template",
            Duration::from_secs(60),
            |e| {
                e.iter()
                    .filter(|(_, _, e)| e.event_type == E::TaskAssigned)
                    .count()
                    >= 12
                    && e.iter().any(|(_, _, e)| e.event_type == E::TemplateDefined)
            },
        )?;
        Ok::<_, anyhow::Error>(log)
    })
    .await??;
    for i in 0..12 {
        let task = format!("job-{i}");
        let (agent, _) = log.assignment(&task).expect("assigned");
        match i % 4 {
            0 => client.fail(&task, &agent, true).await?,
            1 => client.complete(&task, "nobody", None, json!("rejected")).await?,
            _ => client.complete(&task, &agent, None, json!({"n": i})).await?,
        }
    }
    client.start_workflow("wf-r", "pair", json!({"doc": 1})).await?;
    let log_topic = topic.clone();
    let log = tokio::task::spawn_blocking(move || {
        log.read_until(
            &log_topic,
            "workflow step a assigned",
            Duration::from_secs(60),
            |e| {
                e.iter().any(|(_, _, e)| {
                    e.event_type == E::TaskAssigned && e.task_id.as_deref() == Some("wf-r/a")
                })
            },
        )?;
        Ok::<_, anyhow::Error>(log)
    })
    .await??;
    let (agent, _) = log.assignment("wf-r/a").expect("assigned");
    client
        .complete("wf-r/a", &agent, Some("wf-r"), json!("A"))
        .await?;

    // Every command decided and committed, then every committed event read: the live views
    // must hold exactly those.
    until_decided(&env, &client.sent()).await?;
    let log_topic = topic.clone();
    let log = tokio::task::spawn_blocking(move || {
        let mut log = log;
        log.read_to_end(&log_topic)?;
        Ok::<_, anyhow::Error>(log)
    })
    .await??;
    let expected = log.events.len() as i64;
    eventually(
        "the task views to hold every event",
        Duration::from_secs(60),
        || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM task_events")
                .fetch_one(&env.pool)
                .await?;
            Ok((n == expected).then_some(()))
        },
    )
    .await?;
    let (rejected,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM task_events WHERE type = 'COMMAND_REJECTED'")
            .fetch_one(&env.pool)
            .await?;
    assert!(rejected >= 3, "rejections are part of the trail: {rejected}");

    let (code, out, err) = memosctl(
        &env,
        &[
            "replay",
            "--projection",
            "tasks",
            "--into",
            "tasks_rebuilt",
            "--chunk",
            "7",
        ],
    )?;
    assert_eq!(code, 0, "replay: {err}\n{out}");
    let (code, out, err) = memosctl(&env, &["verify", "tasks_rebuilt", "--json"])?;
    assert_eq!(code, 0, "verify: {err}\n{out}");
    let tables: Vec<Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let names: Vec<&str> = tables.iter().filter_map(|t| t["table"].as_str()).collect();
    assert_eq!(
        names,
        [
            "agents",
            "tasks",
            "workflows",
            "workflow_templates",
            "task_events",
            "projection_offsets"
        ]
    );
    assert!(tables.iter().all(|t| t["equal"] == true), "{out}");
    assert!(tables.iter().all(|t| t["left_rows"].as_i64() > Some(0)), "{out}");

    // A deliberately altered row is reported with its key.
    sqlx::query("UPDATE tasks_rebuilt.tasks SET status = 'cancelled' WHERE task_id = 'job-2'")
        .execute(&env.pool)
        .await?;
    let (code, out, _) = memosctl(&env, &["verify", "tasks_rebuilt", "--json"])?;
    assert_eq!(code, 2, "{out}");
    let tasks: Value = out
        .lines()
        .map(serde_json::from_str::<Value>)
        .find_map(|t| t.ok().filter(|t| t["table"] == "tasks"))
        .expect("tasks compared");
    assert_eq!(tasks["equal"], false);
    assert_eq!(tasks["differences"], json!([{"key": "job-2", "kind": "changed"}]));
    env.cleanup().await;
    Ok(())
}
