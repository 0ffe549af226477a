//! A projector stopped with SIGSTOP inside its apply transaction (not dead: its sockets stay
//! open) does not stall the memory projection: PostgreSQL ends its idle transaction after
//! `postgres.idle_in_transaction_timeout`, which frees the offset rows it locked, and the
//! projector that took its partitions over applies them. When the stopped one resumes
//! (SIGCONT) its transaction cannot commit, and its retry skips what the other applied:
//! every command is applied exactly once and the views equal a rebuild from the log.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memos_integration_tests::{MemosProcess, TestEnv, eventually, process};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

async fn write_range(
    http: &reqwest::Client,
    url: &str,
    range: std::ops::Range<usize>,
) -> anyhow::Result<Vec<(String, String)>> {
    let permits = Arc::new(Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for i in range {
        let permit = permits.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            let content = format!("stalled memory {i}");
            let response = http
                .post(url)
                .json(&json!({"agent_id": format!("agent-{}", i % 9), "content": content}))
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

fn signal(process: &MemosProcess, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &process.pid().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} failed");
    Ok(())
}

/// Whether `process`'s session is idle inside a transaction that has locked offset rows
/// (`SELECT ... FOR UPDATE` takes `RowShareLock` on the table, held to the end).
async fn holds_offset_rows(env: &TestEnv, process: &MemosProcess) -> anyhow::Result<bool> {
    let (held,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (
             SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
             WHERE a.application_name = $1 AND a.state = 'idle in transaction'
               AND l.locktype = 'relation' AND l.relation = 'projection_offsets'::regclass
               AND l.mode = 'RowShareLock' AND l.granted)",
    )
    .bind(format!("memos[{}]", process.pid()))
    .fetch_one(&env.pool)
    .await?;
    Ok(held)
}

/// Whether `process` has a statement running on the server (it settles once stopped).
async fn running_statement(env: &TestEnv, process: &MemosProcess) -> anyhow::Result<bool> {
    let (active,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND state = 'active')",
    )
    .bind(format!("memos[{}]", process.pid()))
    .fetch_one(&env.pool)
    .await?;
    Ok(active)
}

async fn counts(env: &TestEnv) -> anyhow::Result<(i64, i64)> {
    let (commands, stored): (i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM memory_commands),
                (SELECT sum(next_offset)::bigint FROM projection_offsets WHERE topic = $1)",
    )
    .bind(&env.commands_topic)
    .fetch_one(&env.pool)
    .await?;
    Ok((commands, stored.unwrap_or(0)))
}

fn memosctl_ok(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(process::binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .output()?;
    let (out, err) = (
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    );
    anyhow::ensure!(output.status.success(), "memosctl {args:?}: {err}\n{out}");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_projector_loses_its_locks_and_the_other_applies_every_command_once() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let api = MemosProcess::start(&env, "api", &[]).await?;
    // Small batches keep the projectors inside transactions most of the time; the shortest
    // session the broker allows makes the group move the stopped one's partitions soon.
    let settings = [
        ("MEMOS__PROJECTOR__MAX_BATCH_RECORDS", "5"),
        ("MEMOS__PROJECTOR__SESSION_TIMEOUT", "6s"),
    ];
    let mut stopped = MemosProcess::start(&env, "projector", &settings).await?;
    stopped
        .wait_for_log("partition assigned", Duration::from_secs(60))
        .await?;
    let mut other = MemosProcess::start(&env, "projector", &settings).await?;
    other
        .wait_for_log("partition assigned", Duration::from_secs(60))
        .await?;
    let http = reqwest::Client::new();
    let url = api.url("/v1/memories");
    let mut written = write_range(&http, &url, 0..100).await?;

    // Stop the first projector at a moment it holds offset rows inside its transaction,
    // while writes go on: SIGSTOP, and SIGCONT again when it was stopped elsewhere.
    let writer = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { write_range(&http, &url, 100..1100).await })
    };
    let mut attempts = 0;
    let stopped_at = loop {
        attempts += 1;
        anyhow::ensure!(
            attempts <= 500 && !writer.is_finished(),
            "never caught the projector inside its transaction ({attempts} attempts)"
        );
        signal(&stopped, "STOP")?;
        eventually(
            "the stopped process's statement to end",
            Duration::from_secs(30),
            || async { Ok((!running_statement(&env, &stopped).await?).then_some(())) },
        )
        .await?;
        if holds_offset_rows(&env, &stopped).await? {
            break Instant::now();
        }
        signal(&stopped, "CONT")?;
        tokio::time::sleep(Duration::from_millis(attempts % 7 * 10)).await;
    };
    written.extend(writer.await??);
    let total = written.len() as i64;

    // The other projector takes the partitions over and applies every write, although the
    // stopped one never resumed.
    eventually(
        "every write applied while one projector is stopped",
        Duration::from_secs(120),
        || async {
            let high: i64 = env
                .high_watermarks(&env.commands_topic)?
                .iter()
                .map(|(_, h)| h)
                .sum();
            Ok((counts(&env).await? == (total, high)).then_some(()))
        },
    )
    .await?;
    let recovered = stopped_at.elapsed();
    eprintln!(
        "stall: caught after {attempts} attempts; all {total} writes applied {recovered:?} after SIGSTOP"
    );
    assert!(
        !holds_offset_rows(&env, &stopped).await?,
        "the stopped projector's transaction was ended"
    );

    // It resumes: its transaction is gone, its retry fails or skips, nothing is applied twice.
    let log_before = stopped.log_text().len();
    signal(&stopped, "CONT")?;
    eventually(
        "the resumed projector to find its transaction ended",
        Duration::from_secs(60),
        || async {
            let text = stopped.log_text();
            Ok(text
                .get(log_before..)
                .unwrap_or_default()
                .contains("projector step failed; retrying")
                .then_some(()))
        },
    )
    .await?;
    written.extend(write_range(&http, &url, 1100..1200).await?);
    let total = written.len() as i64;
    eventually(
        "the writes after resuming applied",
        Duration::from_secs(120),
        || async {
            let high: i64 = env
                .high_watermarks(&env.commands_topic)?
                .iter()
                .map(|(_, h)| h)
                .sum();
            Ok((counts(&env).await? == (total, high)).then_some(()))
        },
    )
    .await?;
    assert!(stopped.terminate(Duration::from_secs(60)).await?.success());
    assert!(other.terminate(Duration::from_secs(60)).await?.success());

    let high: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, h)| h)
        .sum();
    assert_eq!(high, total, "one record per accepted write");
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT memory_id::text, content FROM memories")
        .fetch_all(&env.pool)
        .await?;
    let expected: HashMap<String, String> = written.into_iter().collect();
    assert_eq!(expected.len() as i64, total);
    let actual: HashMap<String, String> = rows.into_iter().collect();
    assert_eq!(actual, expected, "every memory present once with its own content");
    let (histories, applied): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM memory_history),
                (SELECT count(*) FROM memory_commands WHERE status = 'applied')",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((histories, applied), (total, total), "nothing applied twice");
    // The views equal a rebuild from the log.
    memosctl_ok(&env, &["replay", "--into", "rebuilt"])?;
    let out = memosctl_ok(&env, &["verify", "rebuilt"])?;
    assert!(out.contains("equal: rebuilt matches public"), "{out}");
    drop(api);
    env.cleanup().await;
    Ok(())
}
