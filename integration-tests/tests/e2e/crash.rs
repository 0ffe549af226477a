//! The projector killed with SIGKILL in the middle of a stream and restarted applies every
//! command exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const WRITES: usize = 1000;

async fn write_range(
    http: &reqwest::Client,
    url: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<(String, String)>> {
    let permits = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in range {
        let permit = permits.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            let content = format!("memory number {i}");
            let response = http
                .post(url)
                .json(&json!({"agent_id": format!("agent-{}", i % 7), "content": content, "tags": [format!("n{i}")]}))
                .send()
                .await?;
            anyhow::ensure!(response.status() == 202, "write {i}: {}", response.status());
            let accepted: Value = response.json().await?;
            drop(permit);
            Ok((accepted["memory_id"].as_str().unwrap().to_owned(), content))
        });
    }
    let mut written = Vec::new();
    while let Some(result) = tasks.join_next().await {
        written.push(result??);
    }
    Ok(written)
}

async fn applied_rows(env: &TestEnv) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM memories")
        .fetch_one(&env.pool)
        .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_projector_applies_every_command_exactly_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The API runs in its own process so writes go on while the projector is dead. Small
    // batches make many transactions, so the kill lands among them.
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let small_batches = [("MEMOS__PROJECTOR__MAX_BATCH_RECORDS", "20")];
    let mut projector = MemosProcess::start(&env, "projector", &small_batches).await?;
    let http = reqwest::Client::new();
    let url = api.url("/v1/memories");

    let mut written = write_range(&http, &url, 0..WRITES / 2).await?;
    eventually(
        "the projector to apply some rows",
        Duration::from_secs(60),
        || async { Ok((applied_rows(&env).await? > 0).then_some(())) },
    )
    .await?;
    projector.kill()?;
    let at_kill = applied_rows(&env).await?;
    assert!(
        at_kill < WRITES as i64,
        "the kill must land before the end of the stream"
    );

    written.extend(write_range(&http, &url, WRITES / 2..WRITES).await?);
    let mut projector = MemosProcess::start(&env, "projector", &small_batches).await?;
    eventually(
        "all rows applied after restart",
        Duration::from_secs(120),
        || async { Ok((applied_rows(&env).await? >= WRITES as i64).then_some(())) },
    )
    .await?;
    // Let the restarted projector reach the end of the log, then check nothing more appears.
    let high: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, h)| h)
        .sum();
    eventually(
        "offsets stored up to the end of the log",
        Duration::from_secs(60),
        || async {
            let (stored,): (Option<i64>,) =
                sqlx::query_as("SELECT sum(next_offset)::bigint FROM projection_offsets WHERE topic = $1")
                    .bind(&env.commands_topic)
                    .fetch_one(&env.pool)
                    .await?;
            Ok((stored == Some(high)).then_some(()))
        },
    )
    .await?;
    projector.terminate(Duration::from_secs(30)).await?;

    assert_eq!(high, WRITES as i64, "exactly one record per accepted write");
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT memory_id::text, content FROM memories")
        .fetch_all(&env.pool)
        .await?;
    assert_eq!(rows.len(), WRITES, "killed at {at_kill} rows");
    let expected: HashMap<String, String> = written.into_iter().collect();
    assert_eq!(expected.len(), WRITES);
    let actual: HashMap<String, String> = rows.into_iter().collect();
    assert_eq!(actual, expected, "every memory present once with its own content");
    let (commands, applied): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE status = 'applied') FROM memory_commands")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!((commands, applied), (WRITES as i64, WRITES as i64));
    env.cleanup().await;
    Ok(())
}

/// Cooperative rebalancing: a second projector joins mid-stream and the first one leaves
/// (SIGTERM), while writes go on; every command is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projectors_joining_and_leaving_mid_stream_apply_every_command_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    let small_batches = [("MEMOS__PROJECTOR__MAX_BATCH_RECORDS", "10")];
    let mut first = MemosProcess::start(&env, "projector", &small_batches).await?;
    let http = reqwest::Client::new();
    let url = api.url("/v1/memories");

    first
        .wait_for_log("partition assigned", Duration::from_secs(60))
        .await?;
    let mut written = write_range(&http, &url, 0..300).await?;
    // The second joins while writes go on; the group moves some partitions to it
    // (incremental revoke on the first, assignment on the second) before the first leaves.
    let mut second = MemosProcess::start(&env, "projector", &small_batches).await?;
    let writer = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { write_range(&http, &url, 300..600).await })
    };
    second
        .wait_for_log("partition assigned", Duration::from_secs(60))
        .await?;
    first
        .wait_for_log("partition revoked", Duration::from_secs(60))
        .await?;
    written.extend(writer.await??);
    let status = first.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "graceful stop: {status}");
    written.extend(write_range(&http, &url, 600..900).await?);

    eventually("all 900 commands decided", Duration::from_secs(120), || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM memory_commands")
            .fetch_one(&env.pool)
            .await?;
        Ok((n >= 900).then_some(()))
    })
    .await?;
    let high: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, h)| h)
        .sum();
    assert_eq!(high, 900);
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT memory_id::text, content FROM memories")
        .fetch_all(&env.pool)
        .await?;
    let expected: HashMap<String, String> = written.into_iter().collect();
    let actual: HashMap<String, String> = rows.into_iter().collect();
    assert_eq!(actual, expected);
    let (histories,): (i64,) = sqlx::query_as("SELECT count(*) FROM memory_history")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(histories, 900, "one history row per command");
    env.cleanup().await;
    Ok(())
}
