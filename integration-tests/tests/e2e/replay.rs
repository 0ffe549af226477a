//! Replay and audit against the real stack: a log with writes, updates, forgets, rejected
//! commands, duplicates, an undecodable record, shares and tools is rebuilt by
//! `memosctl replay` into a fresh schema that `memosctl verify` finds equal to the live views,
//! and a deliberately altered row is reported; as-of reads equal snapshots taken during the
//! run; `memosctl audit` shows every command with its outcome and checks the view against the
//! log; `memosctl export` writes an Avro file that Python's fastavro reads back intact.

use std::collections::BTreeMap;
use std::time::Duration;

use memos_integration_tests::api::Api;
use memos_integration_tests::{MemosProcess, TestEnv, eventually, process, stack};
use memos_schemas::{MemoryCommand, UpdateMemory};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `memosctl` for `env`: exit code, stdout, stderr.
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

/// `memosctl` that must succeed; its stdout.
fn memosctl_ok(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let (code, out, err) = memosctl(env, args)?;
    anyhow::ensure!(code == 0, "memosctl {args:?} exited with {code}: {err}\n{out}");
    Ok(out)
}

fn json_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

async fn produce(env: &TestEnv, key: &str, payload: &[u8]) -> anyhow::Result<(i32, i64)> {
    let producer: FutureProducer = env.kafka_config().create()?;
    let headers = OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some(TRACEPARENT),
    });
    let delivery = producer
        .send(
            FutureRecord::to(&env.commands_topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok((delivery.partition, delivery.offset))
}

/// Waits until the live projector has applied every record of the command topic.
async fn caught_up(env: &TestEnv) -> anyhow::Result<()> {
    caught_up_in(env, "public").await
}

/// Waits until the views in `schema` have applied every record of the command topic.
async fn caught_up_in(env: &TestEnv, schema: &str) -> anyhow::Result<()> {
    eventually("the projector to apply the whole log", Duration::from_secs(60), || async {
        let end: i64 = env
            .high_watermarks(&env.commands_topic)?
            .iter()
            .map(|(_, high)| high)
            .sum();
        let (applied,): (Option<i64>,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT sum(next_offset)::bigint FROM {schema}.projection_offsets WHERE projection = 'memory' AND topic = $1"
        )))
        .bind(&env.commands_topic)
        .fetch_one(&env.pool)
        .await?;
        Ok((applied == Some(end)).then_some(()))
    })
    .await
}

fn stale_update(namespace: &str, memory_id: &str) -> MemoryCommand {
    MemoryCommand::Update(UpdateMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: namespace.into(),
        actor: namespace.into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: memory_id.into(),
        expected_version: Some(1),
        content: Some("a stale edit".into()),
        tier: None,
        tags: None,
        metadata_json: None,
        importance: None,
        expires_at: None,
        clear_expiry: false,
        embedding: None,
    })
}

/// Writes, updates, forgets, rejected commands, a duplicate, an undecodable record, shares and
/// a tool; returns the memory ids written.
async fn busy_log(env: &TestEnv, api: &Api) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for (i, agent) in ["agent-a", "agent-b", "agent-c"]
        .iter()
        .cycle()
        .take(12)
        .enumerate()
    {
        let tier = ["working", "episodic", "semantic"][i % 3];
        let extra = json!({
            "tags": [format!("t{}", i % 3), "replay"],
            "metadata": {"i": i, "note": "tab\there, \"quoted\", back\\slash"},
            "tier": tier,
            "importance": 0.1 + i as f64 / 20.0,
            "embedding": if i % 4 == 0 { json!([0.25, -1.5, 3.0e-7]) } else { Value::Null },
        });
        let written = api
            .write(agent, &format!("memory {i}\nsecond line"), extra)
            .await?;
        api.decided(written["command_id"].as_str().unwrap()).await?;
        ids.push(written["memory_id"].as_str().unwrap().to_owned());
    }
    // Updates (one with the right expected version), and forgets.
    for (n, id) in ids.iter().enumerate().take(6) {
        let agent = ["agent-a", "agent-b", "agent-c"][n % 3];
        let body = json!({"agent_id": agent, "content": format!("updated {n}"), "expected_version": 1, "tags": ["u"]});
        let answer = api.patch(&format!("/v1/memories/{id}"), body).await?;
        assert_eq!(answer.status, 202, "{}", answer.body);
        api.decided(answer.body["command_id"].as_str().unwrap()).await?;
    }
    for (n, id) in ids.iter().enumerate().skip(9) {
        let agent = ["agent-a", "agent-b", "agent-c"][n % 3];
        let answer = api
            .post(
                &format!("/v1/memories/{id}/forget"),
                json!({"agent_id": agent, "reason": "obsolete"}),
                None,
            )
            .await?;
        assert_eq!(answer.status, 202, "{}", answer.body);
        api.decided(answer.body["command_id"].as_str().unwrap()).await?;
    }
    // Shares: one kept, one revoked, one by a non-owner (rejected), a revoke of nothing (rejected).
    let share = |agent: &str, grantee: &str, memory: Option<&str>, actor: Option<&str>, revoke: bool| {
        let mut body = json!({"agent_id": agent, "grantee": grantee});
        if let Some(m) = memory {
            body["memory_id"] = json!(m);
        }
        let path = if revoke { "/v1/shares/revoke" } else { "/v1/shares" };
        let (api, actor) = (api.clone(), actor.map(str::to_owned));
        async move {
            let answer = api.post(path, body, actor.as_deref()).await?;
            anyhow::ensure!(answer.status == 202, "{}", answer.body);
            api.decided(answer.body["command_id"].as_str().unwrap()).await
        }
    };
    assert_eq!(
        share("agent-a", "agent-b", None, None, false).await?["status"],
        "applied"
    );
    assert_eq!(
        share("agent-a", "agent-c", Some(&ids[3]), None, false).await?["status"],
        "applied"
    );
    assert_eq!(
        share("agent-a", "agent-c", Some(&ids[3]), None, true).await?["status"],
        "applied"
    );
    assert_eq!(
        share("agent-b", "agent-c", None, Some("mallory"), false).await?["status"],
        "rejected"
    );
    assert_eq!(
        share("agent-c", "agent-a", None, None, true).await?["status"],
        "rejected"
    );
    let tool = api
        .post(
            "/v1/tools",
            json!({"agent_id": "agent-a", "name": "search", "description": "web search", "tags": ["web"]}),
            None,
        )
        .await?;
    assert_eq!(tool.status, 202, "{}", tool.body);
    api.decided(tool.body["command_id"].as_str().unwrap()).await?;
    // Straight to Kafka: a stale update (rejected), the same command again (a duplicate), and
    // a record that does not decode (dead-lettered).
    let stale = stale_update("agent-a", &ids[0]);
    let payload = stale.encode()?;
    produce(env, "agent-a", &payload).await?;
    produce(env, "agent-a", &payload).await?;
    produce(env, "agent-b", b"not avro at all").await?;
    api.decided(stale.command_id()).await?;
    caught_up(env).await?;
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_into_a_fresh_schema_verifies_equal_and_verify_reports_altered_rows() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let ids = busy_log(&env, &api).await?;
    let (rejected,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM memory_commands WHERE status = 'rejected'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(rejected, 3, "the log holds rejected commands");
    // Another projection's offsets share the table; verify compares the memory projection's.
    sqlx::query("INSERT INTO projection_offsets VALUES ('tasks', 'memos.task.events', 0, 5)")
        .execute(&env.pool)
        .await?;

    let out = memosctl_ok(
        &env,
        &[
            "replay",
            "--projection",
            "memory",
            "--into",
            "rebuilt",
            "--json",
            "--chunk",
            "7",
        ],
    )?;
    let report: Value = serde_json::from_str(out.trim())?;
    assert_eq!(report["undecodable"], 1, "{report}");
    assert_eq!(report["duplicates"], 1, "{report}");
    assert_eq!(report["rejected"], 3, "{report}");
    let out = memosctl_ok(&env, &["verify", "rebuilt"])?;
    assert!(out.contains("equal: rebuilt matches public"), "{out}");
    // Built after the load, the rebuilt schema has every key and index of the live one.
    let indexes = |schema: &'static str| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT tablename::text, indexname::text FROM pg_indexes WHERE schemaname = $1
                 AND tablename IN ('memories', 'memory_history', 'memory_commands', 'memory_shares', 'tools', 'projection_offsets')
                 ORDER BY 1, 2",
            )
            .bind(schema)
            .fetch_all(&pool)
            .await?;
            anyhow::Ok(rows)
        }
    };
    let live_indexes = indexes("public").await?;
    assert!(
        live_indexes
            .iter()
            .any(|(_, i)| i.starts_with("memories_embedding_hnsw")),
        "{live_indexes:?}"
    );
    assert_eq!(indexes("rebuilt").await?, live_indexes);
    let tables = json_lines(&memosctl_ok(&env, &["verify", "rebuilt", "--json"])?)?;
    assert_eq!(tables.len(), 6);
    for table in &tables {
        assert_eq!(table["equal"], true, "{table}");
        assert!(table["left_rows"].as_i64().unwrap() > 0, "{table}");
    }

    // A replayed schema is the same whatever the chunking, and rebuilding again is allowed
    // only with --replace.
    let (code, _, err) = memosctl(&env, &["replay", "--into", "rebuilt"])?;
    assert_ne!(code, 0);
    assert!(err.contains("E_SCHEMA_EXISTS"), "{err}");
    for bad in ["check", "public", "Bad-Name"] {
        let (code, _, err) = memosctl(&env, &["replay", "--into", bad])?;
        assert_ne!(code, 0);
        assert!(
            err.contains("E_SCHEMA_NAME") || err.contains("E_SCHEMA_LIVE"),
            "{bad}: {err}"
        );
    }
    memosctl_ok(
        &env,
        &["replay", "--into", "rebuilt", "--replace", "--chunk", "100000"],
    )?;
    memosctl_ok(&env, &["verify", "rebuilt"])?;

    // One altered column, one deleted history row, one extra share: each reported by key.
    sqlx::query("UPDATE rebuilt.memories SET importance = importance + 0.001 WHERE memory_id = $1::uuid")
        .bind(&ids[4])
        .execute(&env.pool)
        .await?;
    sqlx::query("DELETE FROM rebuilt.memory_history WHERE memory_id = $1::uuid AND operation = 'update'")
        .bind(&ids[5])
        .execute(&env.pool)
        .await?;
    let (code, out, err) = memosctl(&env, &["verify", "rebuilt", "--json"])?;
    assert_eq!(code, 2, "{out}{err}");
    let tables = json_lines(&out)?;
    let by_name: BTreeMap<String, &Value> = tables
        .iter()
        .map(|t| (t["table"].as_str().unwrap().to_owned(), t))
        .collect();
    assert_eq!(by_name["memories"]["equal"], false);
    assert_eq!(
        by_name["memories"]["differences"],
        json!([{"key": ids[4], "kind": "changed"}])
    );
    assert_eq!(by_name["memory_history"]["equal"], false);
    let history_diffs = by_name["memory_history"]["differences"].as_array().unwrap();
    assert_eq!(history_diffs.len(), 1, "{history_diffs:?}");
    assert!(history_diffs[0]["key"].as_str().unwrap().starts_with(&ids[5]));
    assert_eq!(history_diffs[0]["kind"], "right-only");
    for table in ["memory_commands", "memory_shares", "tools", "projection_offsets"] {
        assert_eq!(by_name[table]["equal"], true, "{table}");
    }

    // --until offsets: the rebuilt schema stands exactly there, and a projector pointed at
    // it would continue from there.
    let (partition, _) = env
        .high_watermarks(&env.commands_topic)?
        .into_iter()
        .find(|(_, high)| *high > 2)
        .expect("a partition with records");
    let until = format!("{partition}:2");
    let out = memosctl_ok(
        &env,
        &["replay", "--into", "partial", "--until", &until, "--json"],
    )?;
    let report: Value = serde_json::from_str(out.trim())?;
    assert_eq!(report["next_offsets"][partition.to_string()], 2, "{report}");
    let (stored,): (i64,) =
        sqlx::query_as("SELECT next_offset FROM partial.projection_offsets WHERE partition = $1")
            .bind(partition)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(stored, 2);
    let (code, out, _) = memosctl(&env, &["verify", "partial", "--json"])?;
    assert_eq!(code, 2, "a partial rebuild differs from the live views: {out}");

    // --until a time: before the first record nothing, after the last one everything.
    let out = memosctl_ok(
        &env,
        &[
            "replay",
            "--into",
            "early",
            "--until",
            "2001-01-01T00:00:00Z",
            "--json",
        ],
    )?;
    let report: Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        (report["records"].as_i64(), report["next_offsets"].clone()),
        (Some(0), json!({}))
    );
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    memosctl_ok(&env, &["replay", "--into", "late", "--until", &later])?;
    memosctl_ok(&env, &["verify", "late"])?;

    let (code, _, err) = memosctl(&env, &["replay", "--projection", "nonsense", "--into", "t"])?;
    assert_ne!(code, 0);
    assert!(err.contains("E_ARGUMENT"), "{err}");

    // Redis lost everything: `cache rebuild` refills it from PostgreSQL.
    let mut redis = redis::Client::open(env.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", env.redis_prefix))
        .query_async(&mut redis)
        .await?;
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
    let out = memosctl_ok(&env, &["cache", "rebuild"])?;
    assert!(out.contains("12 memories read"), "{out}");
    for (i, id) in ids.iter().enumerate() {
        let doc: Option<String> = redis::cmd("HGET")
            .arg(format!("{}:memory:{id}", env.redis_prefix))
            .arg("doc")
            .query_async(&mut redis)
            .await?;
        if i >= 9 {
            assert_eq!(doc, None, "forgotten memory {id} is not cached");
            continue;
        }
        let cached: Value = serde_json::from_str(&doc.expect("cached"))?;
        let (row,): (Value,) = sqlx::query_as(
            "SELECT to_jsonb(m) - 'content_tsv' FROM (SELECT memory_id, namespace, content, tier, tags, metadata,
                    importance, expires_at, embedding::real[] AS embedding, source, version, actor, created_by,
                    created_at, updated_at, forgotten_at, log_partition, log_offset FROM memories) m
             WHERE memory_id = $1::uuid",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await?;
        assert_eq!(cached["content"], row["content"]);
        assert_eq!(cached["version"], row["version"]);
        assert_eq!(cached["metadata"], row["metadata"]);
        assert_eq!(cached["log_offset"], row["log_offset"]);
    }
    let recent = api.get("/v1/agents/agent-a/recent", None, None).await?;
    assert_eq!(recent.status, 200, "{}", recent.body);
    let positions: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:position:*", env.redis_prefix))
        .query_async(&mut redis)
        .await?;
    assert!(!positions.is_empty(), "read-your-writes positions restored");
    drop(memos);
    env.cleanup().await;
    Ok(())
}

/// The live answers of a memory and of an agent's listing, as a reader sees them.
async fn snapshot(api: &Api, ids: &[String]) -> anyhow::Result<(Vec<(u16, Value)>, Value)> {
    let mut memories = Vec::new();
    for id in ids {
        let answer = api
            .get(&format!("/v1/memories/{id}"), Some("agent-s"), None)
            .await?;
        memories.push((answer.status, answer.body));
    }
    let list = api
        .get("/v1/agents/agent-s/memories?limit=50", Some("agent-s"), None)
        .await?;
    assert_eq!(list.status, 200, "{}", list.body);
    Ok((memories, list.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_reads_equal_snapshots_taken_during_the_run() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let before_anything = chrono::Utc::now();
    memos_integration_tests::past_millisecond(before_anything).await;

    let mut ids: Vec<String> = Vec::new();
    let mut snapshots = Vec::new();
    let steps = 8;
    for step in 0..steps {
        let command_id = match step {
            0..=2 => {
                let w = api
                    .write(
                        "agent-s",
                        &format!("fact {step}"),
                        json!({"tags": ["s"], "metadata": {"step": step}}),
                    )
                    .await?;
                ids.push(w["memory_id"].as_str().unwrap().to_owned());
                w["command_id"].as_str().unwrap().to_owned()
            }
            3 | 4 => {
                let id = &ids[step - 3];
                let answer = api
                    .patch(
                        &format!("/v1/memories/{id}"),
                        json!({"agent_id": "agent-s", "content": format!("revised at {step}"), "importance": 0.9}),
                    )
                    .await?;
                answer.body["command_id"].as_str().unwrap().to_owned()
            }
            5 => {
                let answer = api
                    .post(
                        &format!("/v1/memories/{}/forget", ids[1]),
                        json!({"agent_id": "agent-s"}),
                        None,
                    )
                    .await?;
                answer.body["command_id"].as_str().unwrap().to_owned()
            }
            _ => {
                let w = api
                    .write("agent-s", &format!("late fact {step}"), json!({}))
                    .await?;
                ids.push(w["memory_id"].as_str().unwrap().to_owned());
                w["command_id"].as_str().unwrap().to_owned()
            }
        };
        let decided = api.decided(&command_id).await?;
        assert_eq!(decided["status"], "applied", "{decided}");
        // The view has applied this step; what it answers now is the state at `at`.
        let snap = snapshot(&api, &ids).await?;
        let at = chrono::Utc::now();
        snapshots.push((at, ids.clone(), snap));
        // The next command's record time (milliseconds) must be later than `at`.
        memos_integration_tests::past_millisecond(at).await;
    }

    for (at, ids_then, (memories, list)) in &snapshots {
        let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        for (id, (status, body)) in ids_then.iter().zip(memories) {
            let answer = api
                .get(
                    &format!("/v1/memories/{id}?as_of={}", urlencode(&at)),
                    Some("agent-s"),
                    None,
                )
                .await?;
            assert_eq!(answer.status, *status, "memory {id} as of {at}: {}", answer.body);
            if *status == 200 {
                assert_eq!(&answer.body, body, "memory {id} as of {at}");
            }
        }
        let answer = api
            .get(
                &format!("/v1/agents/agent-s/memories?limit=50&as_of={}", urlencode(&at)),
                Some("agent-s"),
                None,
            )
            .await?;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(&answer.body, list, "listing as of {at}");
    }
    // Before the first write nothing existed; another agent may not read them as of any time.
    let first = &ids[0];
    let before = before_anything.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let answer = api
        .get(
            &format!("/v1/memories/{first}?as_of={}", urlencode(&before)),
            Some("agent-s"),
            None,
        )
        .await?;
    assert_eq!(answer.status, 404, "{}", answer.body);
    let (at, _, _) = snapshots.last().unwrap();
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let answer = api
        .get(
            &format!("/v1/memories/{first}?as_of={}", urlencode(&at)),
            Some("stranger"),
            None,
        )
        .await?;
    assert_eq!(answer.status, 404, "{}", answer.body);
    let answer = api
        .get(&format!("/v1/memories/{first}?as_of=yesterday"), None, None)
        .await?;
    assert_eq!(answer.status, 400, "{}", answer.body);
    drop(memos);
    env.cleanup().await;
    Ok(())
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_checks_the_view_against_the_log_and_export_reads_back_in_fastavro() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let window_start = chrono::Utc::now() - chrono::Duration::seconds(1);
    let ids = busy_log(&env, &api).await?;
    let window_end = chrono::Utc::now() + chrono::Duration::seconds(1);
    let audited = &ids[0];

    // From the view: write, update, then the stale update (rejected, with its reason).
    let rows = json_lines(&memosctl_ok(&env, &["audit", "memory", audited, "--json"])?)?;
    let outcomes: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["operation"].as_str().unwrap(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("WriteMemory", "applied"),
            ("UpdateMemory", "applied"),
            ("UpdateMemory", "rejected")
        ]
    );
    assert!(
        rows[2]["reason"]
            .as_str()
            .unwrap()
            .starts_with("version_conflict"),
        "{}",
        rows[2]
    );
    assert_eq!(rows[2]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    for row in &rows {
        assert_eq!(row["actor"], "agent-a");
        assert_eq!(row["topic"], env.commands_topic.as_str());
        assert!(
            row["offset"].as_i64().is_some() && row["time"].as_str().is_some(),
            "{row}"
        );
    }
    let table = memosctl_ok(&env, &["audit", "memory", audited])?;
    assert!(
        table.contains("version_conflict") && table.contains("POSITION"),
        "{table}"
    );

    // From the log: the same commands plus the duplicate send, all consistent with the view.
    let log_rows = json_lines(&memosctl_ok(
        &env,
        &["audit", "memory", audited, "--from-log", "--json"],
    )?)?;
    let log_outcomes: Vec<&str> = log_rows.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(log_outcomes, ["applied", "applied", "rejected", "duplicate"]);
    for (view, log) in rows.iter().zip(&log_rows) {
        for field in [
            "command_id",
            "partition",
            "offset",
            "time",
            "actor",
            "operation",
            "reason",
        ] {
            assert_eq!(view[field], log[field], "{field}");
        }
    }

    // An agent's window: every command in agent-a's namespace or by agent-a, none outside.
    let from = window_start.to_rfc3339();
    let to = window_end.to_rfc3339();
    let agent_rows = json_lines(&memosctl_ok(
        &env,
        &[
            "audit", "agent", "agent-a", "--from", &from, "--to", &to, "--json",
        ],
    )?)?;
    let (in_view,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM memory_commands WHERE namespace = 'agent-a' OR actor = 'agent-a'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(agent_rows.len() as i64, in_view);
    let (code, out, _) = memosctl(
        &env,
        &[
            "audit",
            "agent",
            "agent-a",
            "--from",
            &from,
            "--to",
            &to,
            "--from-log",
            "--json",
        ],
    )?;
    assert_eq!(code, 0, "{out}");
    let empty = json_lines(&memosctl_ok(
        &env,
        &[
            "audit",
            "agent",
            "agent-a",
            "--from",
            "2001-01-01T00:00:00Z",
            "--to",
            "2001-01-02T00:00:00Z",
            "--json",
        ],
    )?)?;
    assert!(empty.is_empty());

    // A view that lost a decision is caught by the log check.
    sqlx::query("DELETE FROM memory_commands WHERE memory_id = $1::uuid AND status = 'rejected'")
        .bind(audited)
        .execute(&env.pool)
        .await?;
    let (code, out, err) = memosctl(&env, &["audit", "memory", audited, "--from-log", "--json"])?;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("E_DISCREPANCY"), "{err}");
    assert!(out.contains("missing-from-view"), "{out}");

    // Export, read back by an independent Avro reader.
    let dir = std::env::temp_dir().join(format!("{}-export", env.database));
    std::fs::create_dir_all(&dir)?;
    let avro = dir.join("agent-a.avro");
    let jsonl = dir.join("agent-a.jsonl");
    let avro_path = avro.to_str().unwrap();
    memosctl_ok(
        &env,
        &[
            "export", "--agent", "agent-a", "--from", &from, "--to", &to, "--format", "avro", "--output",
            avro_path,
        ],
    )?;
    memosctl_ok(
        &env,
        &[
            "export",
            "--agent",
            "agent-a",
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "jsonl",
            "--output",
            jsonl.to_str().unwrap(),
        ],
    )?;
    let script = r#"
import json, sys
import fastavro
with open(sys.argv[1], "rb") as f:
    reader = fastavro.reader(f)
    schema = reader.writer_schema
    out = []
    for r in reader:
        ts = r["timestamp"]
        out.append({
            "topic": r["topic"], "partition": r["partition"], "offset": r["offset"],
            "timestamp": None if ts is None else round(ts.timestamp() * 1000),
            "key": None if r["key"] is None else r["key"].decode(),
            "headers": {h["key"]: None if h["value"] is None else h["value"].decode() for h in r["headers"]},
            "value_hex": None if r["value"] is None else r["value"].hex(),
            "schema": r["schema"],
            "command": None if r["command_json"] is None else json.loads(r["command_json"]),
            "record": r["command"],
        })
print(json.dumps({"schema": schema["name"], "records": out}, default=str))
"#;
    let python = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(avro_path)
        .env("PYTHONPATH", stack::repo_root().join(".cache/python"))
        .output()?;
    anyhow::ensure!(
        python.status.success(),
        "fastavro could not read the export (run scripts/python-deps): {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let read: Value = serde_json::from_slice(&python.stdout)?;
    assert_eq!(read["schema"], "memos.export.LogRecord");
    let records = read["records"].as_array().unwrap();
    let lines = json_lines(&std::fs::read_to_string(&jsonl)?)?;
    assert_eq!(records.len(), lines.len());
    // Every agent-a command is there: the view's decisions plus the duplicate send.
    assert_eq!(records.len() as i64, in_view + 1);
    for (record, line) in records.iter().zip(&lines) {
        for field in [
            "topic",
            "partition",
            "offset",
            "timestamp",
            "key",
            "value_hex",
            "schema",
            "command",
        ] {
            assert_eq!(record[field], line[field], "{field}");
        }
        let value = hex_decode(record["value_hex"].as_str().unwrap());
        let command = MemoryCommand::decode(&value)?;
        assert_eq!(record["command"]["command_id"], command.command_id());
        // The decoded record, a branch of the `command` union, read by fastavro itself.
        assert_eq!(record["record"]["command_id"], command.command_id());
        assert_eq!(record["record"]["namespace"], command.namespace());
        assert_eq!(record["record"]["actor"], command.actor());
        if let MemoryCommand::Write(w) = &command {
            assert_eq!(record["record"]["content"], w.content.as_str());
            assert_eq!(record["record"]["tier"], w.tier.as_str());
        }
        assert!(command.namespace() == "agent-a" || command.actor() == "agent-a");
    }
    // The bytes are the log's own: each command id's position matches the view.
    for record in records {
        let command_id = record["command"]["command_id"].as_str().unwrap();
        let (partition, offset): (i32, i64) = sqlx::query_as(
            "SELECT log_partition, log_offset FROM memory_commands WHERE command_id = $1::uuid",
        )
        .bind(command_id)
        .fetch_optional(&env.pool)
        .await?
        .unwrap_or((record["partition"].as_i64().unwrap() as i32, -1));
        assert_eq!(partition as i64, record["partition"].as_i64().unwrap());
        if offset >= 0 && record["offset"] != json!(offset) {
            // The duplicate send: same command id, a later offset.
            assert!(record["offset"].as_i64().unwrap() > offset);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(memos);
    env.cleanup().await;
    Ok(())
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// What the load loop saw.
#[derive(Default)]
struct Load {
    writes: usize,
    writes_after_promote: usize,
    failures: Vec<String>,
    written: Vec<(String, String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_under_load_switches_every_process_and_loses_no_request() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    busy_log(&env, &api).await?;
    memosctl_ok(&env, &["replay", "--into", "rebuilt"])?;
    memosctl_ok(&env, &["verify", "rebuilt"])?;

    // Writes and reads-after-write keep coming while the views are switched.
    let promoted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (api, promoted) = (api.clone(), promoted.clone());
        tokio::spawn(async move {
            let mut load = Load::default();
            let mut i = 0;
            while load.writes_after_promote < 40 && i < 2000 {
                i += 1;
                let agent = ["agent-a", "agent-b", "agent-c"][i % 3];
                let content = format!("under load {i}");
                let after = promoted.load(std::sync::atomic::Ordering::SeqCst);
                let answer = match api
                    .post(
                        "/v1/memories",
                        json!({"agent_id": agent, "content": content, "tier": "episodic"}),
                        None,
                    )
                    .await
                {
                    Ok(a) => a,
                    Err(e) => {
                        load.failures.push(format!("write {i}: {e}"));
                        continue;
                    }
                };
                if answer.status != 202 {
                    load.failures
                        .push(format!("write {i}: {} {}", answer.status, answer.body));
                    continue;
                }
                load.writes += 1;
                if after {
                    load.writes_after_promote += 1;
                }
                let position = answer.body["position"].as_str().unwrap_or_default().to_owned();
                let memory_id = answer.body["memory_id"].as_str().unwrap_or_default().to_owned();
                // Read your write from PostgreSQL (the listing and the command status).
                let page = api
                    .get(
                        &format!("/v1/agents/{agent}/memories?limit=5"),
                        Some(agent),
                        Some(&position),
                    )
                    .await;
                match page {
                    Ok(p)
                        if p.status == 200
                            && p.body["items"].as_array().is_some_and(|items| {
                                items.iter().any(|m| m["memory_id"] == memory_id.as_str())
                            }) => {}
                    Ok(p) => load
                        .failures
                        .push(format!("read after write {i}: {} {}", p.status, p.body)),
                    Err(e) => load.failures.push(format!("read after write {i}: {e}")),
                }
                let status = api
                    .get(
                        &format!(
                            "/v1/commands/{}",
                            answer.body["command_id"].as_str().unwrap_or_default()
                        ),
                        None,
                        Some(&position),
                    )
                    .await;
                match status {
                    Ok(s) if s.status == 200 && s.body["status"] == "applied" => {}
                    Ok(s) => load
                        .failures
                        .push(format!("status of write {i}: {} {}", s.status, s.body)),
                    Err(e) => load.failures.push(format!("status of write {i}: {e}")),
                }
                load.written.push((agent.to_owned(), memory_id, content));
            }
            load
        })
    };
    // Switch once the load is under way.
    eventually("writes under load", Duration::from_secs(60), || async {
        let (count,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM memories WHERE content LIKE 'under load %'")
                .fetch_one(&env.pool)
                .await?;
        Ok((count >= 20).then_some(()))
    })
    .await?;
    let out = {
        let env_vars = env.process_env();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(process::binary("memosctl")?)
                .args(["promote", "rebuilt"])
                .envs(env_vars)
                .output()
                .map_err(anyhow::Error::from)
        })
        .await??
    };
    promoted.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        out.status.success(),
        "promote failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let load = load.await?;
    assert!(
        load.failures.is_empty(),
        "requests failed during the switch: {:#?}",
        load.failures
    );
    assert!(
        load.writes_after_promote >= 40 && load.writes > 60,
        "{} writes",
        load.writes
    );
    let (active,): (String,) = sqlx::query_as("SELECT schema_name FROM memos_control.active_view")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(active, "rebuilt");

    // Every write is in the promoted views exactly once, and the old views stopped moving.
    caught_up_in(&env, "rebuilt").await?;
    for (agent, memory_id, content) in &load.written {
        let (found,): (String,) = sqlx::query_as(
            "SELECT content FROM rebuilt.memories WHERE memory_id = $1::uuid AND namespace = $2",
        )
        .bind(memory_id)
        .bind(agent)
        .fetch_one(&env.pool)
        .await?;
        assert_eq!(&found, content);
    }
    let (in_public,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM public.memories WHERE content LIKE 'under load %'")
            .fetch_one(&env.pool)
            .await?;
    assert!(
        (in_public as usize) < load.written.len(),
        "the old schema no longer receives writes"
    );
    // A fresh replay of the whole log equals the promoted views: nothing lost, nothing twice.
    memosctl_ok(&env, &["replay", "--into", "recheck"])?;
    let out = memosctl_ok(&env, &["verify", "recheck"])?;
    assert!(out.contains("equal: recheck matches rebuilt"), "{out}");

    // And back: the previous schema is caught up from the log and becomes active again.
    memosctl_ok(&env, &["promote", "public"])?;
    let (active,): (String,) = sqlx::query_as("SELECT schema_name FROM memos_control.active_view")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(active, "public");
    let out = memosctl_ok(&env, &["verify", "recheck"])?;
    assert!(out.contains("equal: recheck matches public"), "{out}");
    let w = api.write("agent-a", "after switching back", json!({})).await?;
    assert_eq!(
        api.decided(w["command_id"].as_str().unwrap()).await?["status"],
        "applied"
    );
    caught_up_in(&env, "public").await?;
    drop(memos);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_check_flags_command_topics_that_would_lose_history() -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;

    let env = TestEnv::new().await?;
    // The topics memOS creates keep everything forever.
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let out = memosctl_ok(&env, &["topics", "check"])?;
    assert!(out.contains(&format!("ok    {}", env.commands_topic)), "{out}");

    let admin: AdminClient<DefaultClientContext> = env.kafka_config().create()?;
    let compacted = format!("{}.compacted", env.commands_topic);
    let week = format!("{}.week", env.commands_topic);
    let topics = [
        NewTopic::new(&compacted, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact"),
        NewTopic::new(&week, 1, TopicReplication::Fixed(1))
            .set("cleanup.policy", "delete")
            .set("retention.ms", "604800000"),
    ];
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("cannot create {topic}: {code}"))?;
    }
    let (code, out, err) = memosctl(
        &env,
        &[
            "topics", "check", "--topic", &compacted, "--topic", &week, "--json",
        ],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("E_RETENTION: 2 command topic(s)"), "{err}");
    let verdicts = json_lines(&out)?;
    assert_eq!(verdicts.len(), 4, "memory and task commands, then the named ones");
    assert_eq!(verdicts[0]["problems"], json!([]));
    assert_eq!(verdicts[1]["topic"], env.task_commands_topic.as_str());
    assert_eq!(verdicts[1]["problems"], json!([]));
    assert!(
        verdicts[2]["problems"][0].as_str().unwrap().contains("compact"),
        "{}",
        verdicts[2]
    );
    assert!(
        verdicts[3]["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("retention.ms is 604800000"),
        "{}",
        verdicts[3]
    );
    let (code, _, err) = memosctl(&env, &["topics", "check", "--topic", "memos.no.such.topic"])?;
    assert_eq!(code, 1);
    assert!(err.contains("E_RETENTION"), "{err}");
    let _ = admin
        .delete_topics(&[&compacted, &week], &AdminOptions::new())
        .await;
    drop(memos);
    env.cleanup().await;
    Ok(())
}

/// `memosctl topics create` sets `min.insync.replicas` on the topics it creates (1 for the one
/// replica of this stack), refuses a value the replicas cannot meet, and `topics check` reads
/// the value back from the broker and flags a command topic whose writes could be acknowledged
/// by a single broker (three replicas, when the cluster has three brokers) or would all be
/// refused (more in-sync replicas than replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_get_min_insync_replicas_and_check_flags_fragile_ones() -> anyhow::Result<()> {
    use rdkafka::admin::{
        AdminClient, AdminOptions, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
    };
    use rdkafka::client::DefaultClientContext;

    let env = TestEnv::new().await?;
    let out = memosctl_ok(&env, &["topics", "create"])?;
    assert!(out.contains(&env.commands_topic), "{out}");
    let admin: AdminClient<DefaultClientContext> = env.kafka_config().create()?;
    let created = [
        &env.commands_topic,
        &env.task_commands_topic,
        &env.task_events_topic,
        &env.dead_letter_topic,
        &env.keys_topic,
    ];
    let specifiers: Vec<ResourceSpecifier<'_>> =
        created.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    for (topic, described) in created
        .iter()
        .zip(admin.describe_configs(&specifiers, &AdminOptions::new()).await?)
    {
        let resource = described.map_err(|code| anyhow::anyhow!("describe {topic}: {code}"))?;
        let entry = resource
            .get("min.insync.replicas")
            .ok_or_else(|| anyhow::anyhow!("{topic}: no min.insync.replicas"))?;
        assert_eq!(entry.value.as_deref(), Some("1"), "{topic}");
        assert!(
            matches!(entry.source, ConfigSource::DynamicTopic),
            "{topic}: set on the topic, not the broker's default: {:?}",
            entry.source
        );
    }

    // A value the replicas cannot meet is refused before anything is created.
    let output = std::process::Command::new(process::binary("memosctl")?)
        .args(["topics", "create"])
        .envs(env.process_env())
        .env(
            "MEMOS__TOPICS__MEMORY_COMMANDS",
            format!("{}.unmet", env.commands_topic),
        )
        .env("MEMOS__TOPICS__MIN_INSYNC_REPLICAS", "2")
        .output()?;
    let err = String::from_utf8(output.stderr)?;
    assert!(!output.status.success());
    assert!(
        err.contains("min.insync.replicas 2 must be between 1 and the replication factor 1"),
        "{err}"
    );

    // What the broker holds is what the check reports.
    let out = memosctl_ok(&env, &["topics", "check", "--json"])?;
    let verdicts = json_lines(&out)?;
    assert_eq!(verdicts.len(), 2, "{out}");
    for verdict in &verdicts {
        assert_eq!(verdict["replication_factor"], 1, "{verdict}");
        assert_eq!(verdict["min_insync_replicas"], "1", "{verdict}");
        assert_eq!(verdict["problems"], json!([]), "{verdict}");
    }

    // A command topic that refuses every write, and, on a cluster of three brokers, one of
    // three replicas acknowledged by a single one.
    let unmet = format!("{}.unmet", env.commands_topic);
    let single = format!("{}.single", env.commands_topic);
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let three_brokers = metadata.brokers().len() >= 3;
    let mut topics = vec![
        NewTopic::new(&unmet, 1, TopicReplication::Fixed(1))
            .set("retention.ms", "-1")
            .set("min.insync.replicas", "2"),
    ];
    if three_brokers {
        topics.push(
            NewTopic::new(&single, 1, TopicReplication::Fixed(3))
                .set("retention.ms", "-1")
                .set("min.insync.replicas", "1"),
        );
    }
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("cannot create {topic}: {code}"))?;
    }
    let mut args = vec!["topics", "check", "--json", "--topic", &unmet];
    if three_brokers {
        args.extend(["--topic", &single]);
    }
    let (code, out, err) = memosctl(&env, &args)?;
    assert_eq!(code, 1, "{out}{err}");
    let flagged = if three_brokers { 2 } else { 1 };
    assert!(
        err.contains(&format!("E_REPLICATION: {flagged} command topic(s)")),
        "{err}"
    );
    let verdicts = json_lines(&out)?;
    assert_eq!(verdicts[2]["min_insync_replicas"], "2", "{}", verdicts[2]);
    assert!(
        verdicts[2]["problems"][0]
            .as_str()
            .unwrap()
            .contains("NOT_ENOUGH_REPLICAS"),
        "{}",
        verdicts[2]
    );
    if three_brokers {
        assert_eq!(verdicts[3]["replication_factor"], 3, "{}", verdicts[3]);
        assert!(
            verdicts[3]["problems"][0]
                .as_str()
                .unwrap()
                .contains("single broker"),
            "{}",
            verdicts[3]
        );
    }
    let _ = admin
        .delete_topics(&[&unmet, &single], &AdminOptions::new())
        .await;
    env.cleanup().await;
    Ok(())
}
