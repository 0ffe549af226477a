//! The memory pipeline's guarantees, each with a test that could catch its failure: one
//! effect per command id, optimistic concurrency decided in log order, forget keeps history,
//! shares bound every read and search, stable pagination, read-your-writes, and the full
//! command set with tools.

use std::collections::HashSet;
use std::time::Duration;

use memos_integration_tests::api::Api;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use serde_json::{Value, json};

fn s(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_id_gives_one_memory() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let command_id = uuid::Uuid::new_v4().to_string();
    let memory_id = uuid::Uuid::new_v4().to_string();
    let first = api
        .write(
            "agent-r",
            "first send",
            json!({"command_id": command_id, "memory_id": memory_id}),
        )
        .await?;
    // A client retry, and a second API instance sending the same command.
    let second = api
        .write(
            "agent-r",
            "first send",
            json!({"command_id": command_id, "memory_id": memory_id}),
        )
        .await?;
    let third = api
        .write(
            "agent-r",
            "a different body, same id",
            json!({"command_id": command_id}),
        )
        .await?;
    let status = api.decided(&command_id).await?;
    assert_eq!(status["status"], "applied", "{status}");
    assert_eq!(status["log_offset"], first["offset"], "the first append decided");
    let position = format!("{},{}", s(&second["position"]), s(&third["position"]));
    let memory = api
        .get(&format!("/v1/memories/{memory_id}"), None, Some(&position))
        .await?;
    assert_eq!(memory.status, 200);
    assert_eq!(memory.body["content"], "first send");
    assert_eq!(memory.body["version"], 1);
    let (memories, commands, history): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM memories), (SELECT count(*) FROM memory_commands),
                (SELECT count(*) FROM memory_history)",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((memories, commands, history), (1, 1, 1));
    let unknown = api
        .get(&format!("/v1/commands/{}", uuid::Uuid::new_v4()), None, None)
        .await?;
    assert_eq!(unknown.body["status"], "pending");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_updates_at_the_same_version_exactly_one_wins() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let written = api.write("agent-c", "version one", json!({})).await?;
    let id = s(&written["memory_id"]).to_owned();
    api.decided(s(&written["command_id"])).await?;

    let path = format!("/v1/memories/{id}");
    let (a, b) = tokio::join!(
        api.patch(
            &path,
            json!({"agent_id": "agent-c", "expected_version": 1, "content": "from A"})
        ),
        api.patch(
            &path,
            json!({"agent_id": "agent-c", "expected_version": 1, "content": "from B"})
        ),
    );
    let (a, b) = (a?, b?);
    // Each one is refused up front (409, when the other was already applied by then) or
    // appended and decided by the projector in log order; either way exactly one wins.
    let outcome = |answer: &memos_integration_tests::api::Answer| {
        let api = api.clone();
        let (status, command_id) = (answer.status, s(&answer.body["command_id"]).to_owned());
        async move {
            match status {
                409 => anyhow::Ok(json!({"status": "refused"})),
                202 => api.decided(&command_id).await,
                other => anyhow::bail!("update answered {other}"),
            }
        }
    };
    let (sa, sb) = (outcome(&a).await?, outcome(&b).await?);
    let applied = [&sa, &sb].iter().filter(|o| o["status"] == "applied").count();
    assert_eq!(applied, 1, "{sa} {sb}");
    let (winner, loser) = if sa["status"] == "applied" {
        (&a, &sb)
    } else {
        (&b, &sa)
    };
    assert!(
        loser["status"] == "refused" || s(&loser["reason"]).starts_with("version_conflict"),
        "{loser}"
    );
    let winner_content = if winner.body == a.body { "from A" } else { "from B" };
    let memory = api.get(&path, None, Some(s(&winner.body["position"]))).await?;
    assert_eq!(memory.body["version"], 2);
    assert_eq!(memory.body["content"], winner_content);

    let history = api.get(&format!("{path}/history"), None, None).await?;
    let rows = history.body.as_array().unwrap();
    let rejected_in_log = usize::from(loser["status"] == "rejected");
    assert_eq!(rows.len(), 2 + rejected_in_log, "{}", history.body);
    assert_eq!(
        rows.iter().filter(|r| r["status"] == "rejected").count(),
        rejected_in_log
    );
    // Now that the view is at version 2, a third update expecting 1 is refused up front.
    let stale = api
        .patch(
            &path,
            json!({"agent_id": "agent-c", "expected_version": 1, "content": "C"}),
        )
        .await?;
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert!(s(&stale.body["message"]).contains("version 2"));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_memory_is_gone_from_queries_and_its_history_stays() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let written = api
        .write(
            "agent-f",
            "the wifi password is hunter2",
            json!({"tags": ["secret"]}),
        )
        .await?;
    let id = s(&written["memory_id"]).to_owned();
    let path = format!("/v1/memories/{id}");
    let updated = api
        .patch(&path, json!({"agent_id": "agent-f", "tags": ["secret", "wifi"]}))
        .await?;
    assert_eq!(updated.status, 202);
    let forgot = api
        .post(
            &format!("{path}/forget"),
            json!({"agent_id": "agent-f", "reason": "rotated"}),
            None,
        )
        .await?;
    assert_eq!(forgot.status, 202);
    let position = s(&forgot.body["position"]).to_owned();

    let gone = api.get(&path, None, Some(&position)).await?;
    assert_eq!(gone.status, 404, "{}", gone.body);
    let listed = api
        .get("/v1/agents/agent-f/memories", None, Some(&position))
        .await?;
    assert_eq!(listed.body["items"], json!([]));
    let found = api
        .post(
            "/v1/memories/search",
            json!({"agent_id": "agent-f", "query": "wifi password"}),
            None,
        )
        .await?;
    assert_eq!(found.body["items"], json!([]));

    let history = api.get(&format!("{path}/history"), None, None).await?;
    let rows = history.body.as_array().unwrap();
    let ops: Vec<&str> = rows.iter().map(|r| s(&r["operation"])).collect();
    assert_eq!(ops, ["write", "update", "forget"]);
    assert!(rows.iter().all(|r| r["status"] == "applied"));
    // Validity intervals chain: each state ends when the next begins; the last stays open.
    assert_eq!(rows[0]["valid_to"], rows[1]["valid_from"]);
    assert_eq!(rows[1]["valid_to"], rows[2]["valid_from"]);
    assert_eq!(rows[2]["valid_to"], Value::Null);
    assert_eq!(rows[0]["state"]["content"], "the wifi password is hunter2");

    // The API refuses what the projector would certainly reject: 409, nothing appended.
    let late = api
        .patch(&path, json!({"agent_id": "agent-f", "content": "too late"}))
        .await?;
    assert_eq!(
        (late.status, s(&late.body["code"])),
        (409, "conflict"),
        "{}",
        late.body
    );
    let again = api
        .post(&format!("{path}/forget"), json!({"agent_id": "agent-f"}), None)
        .await?;
    assert_eq!(again.status, 409);
    let reused = api.write("agent-f", "same id", json!({"memory_id": id})).await;
    assert!(reused.is_err_and(|e| e.to_string().contains("409")));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_and_revokes_change_what_another_agent_reads_and_finds() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let one = api
        .write(
            "alice",
            "zebra migration notes",
            json!({"embedding": [1.0, 0.0, 0.0]}),
        )
        .await?;
    let two = api
        .write(
            "alice",
            "zebra feeding schedule",
            json!({"embedding": [0.0, 1.0, 0.0]}),
        )
        .await?;
    let (one_id, two_id) = (s(&one["memory_id"]).to_owned(), s(&two["memory_id"]).to_owned());
    let position = format!("{},{}", s(&one["position"]), s(&two["position"]));

    // What bob reads, three ways: by id, by listing alice's namespace, and by search.
    let bob_view = |position: String| {
        let api = api.clone();
        let (one_id, two_id) = (one_id.clone(), two_id.clone());
        async move {
            let mut seen = Vec::new();
            for id in [&one_id, &two_id] {
                let got = api
                    .get(&format!("/v1/memories/{id}"), Some("bob"), Some(&position))
                    .await?;
                seen.push(got.status == 200);
            }
            let listed = api
                .get("/v1/agents/alice/memories", Some("bob"), Some(&position))
                .await?;
            let text = api
                .post(
                    "/v1/memories/search",
                    json!({"agent_id": "bob", "query": "zebra"}),
                    None,
                )
                .await?;
            let vector = api
                .post(
                    "/v1/memories/search",
                    json!({"agent_id": "bob", "embedding": [1.0, 0.1, 0.0]}),
                    None,
                )
                .await?;
            let ids = |v: &Value| -> Vec<String> {
                let mut ids: Vec<String> = v["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| s(&m["memory_id"]).to_owned())
                    .collect();
                ids.sort();
                ids
            };
            anyhow::Ok((seen, ids(&listed.body), ids(&text.body), ids(&vector.body)))
        }
    };
    let mut both = vec![one_id.clone(), two_id.clone()];
    both.sort();
    let none: Vec<String> = vec![];

    let (seen, listed, text, vector) = bob_view(position.clone()).await?;
    assert_eq!(
        (seen, &listed, &text, &vector),
        (vec![false, false], &none, &none, &none)
    );
    let alice_finds = api
        .post(
            "/v1/memories/search",
            json!({"agent_id": "alice", "query": "zebra"}),
            None,
        )
        .await?;
    assert_eq!(alice_finds.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(alice_finds.body["mode"], "text");

    let shared = api
        .post(
            "/v1/shares",
            json!({"agent_id": "alice", "grantee": "bob", "memory_id": one_id}),
            None,
        )
        .await?;
    let (seen, listed, text, vector) = bob_view(s(&shared.body["position"]).to_owned()).await?;
    assert_eq!(seen, vec![true, false]);
    assert_eq!(
        (&listed, &text, &vector),
        (
            &vec![one_id.clone()],
            &vec![one_id.clone()],
            &vec![one_id.clone()]
        )
    );

    let everything = api
        .post("/v1/shares", json!({"agent_id": "alice", "grantee": "bob"}), None)
        .await?;
    let (seen, listed, text, vector) = bob_view(s(&everything.body["position"]).to_owned()).await?;
    assert_eq!(
        (seen, &listed, &text, &vector),
        (vec![true, true], &both, &both, &both)
    );

    api.post(
        "/v1/shares/revoke",
        json!({"agent_id": "alice", "grantee": "bob", "memory_id": one_id}),
        None,
    )
    .await?;
    let revoked = api
        .post(
            "/v1/shares/revoke",
            json!({"agent_id": "alice", "grantee": "bob"}),
            None,
        )
        .await?;
    let (seen, listed, text, vector) = bob_view(s(&revoked.body["position"]).to_owned()).await?;
    assert_eq!(
        (seen, &listed, &text, &vector),
        (vec![false, false], &none, &none, &none)
    );

    // Only the owner shares; revoking what was never shared is refused too.
    let stranger = api
        .post(
            "/v1/shares",
            json!({"agent_id": "alice", "grantee": "mallory"}),
            Some("mallory"),
        )
        .await?;
    let status = api.decided(s(&stranger.body["command_id"])).await?;
    assert!(s(&status["reason"]).starts_with("not_owner"), "{status}");
    let nothing = api
        .post(
            "/v1/shares/revoke",
            json!({"agent_id": "alice", "grantee": "carol"}),
            None,
        )
        .await?;
    let status = api.decided(s(&nothing.body["command_id"])).await?;
    assert!(s(&status["reason"]).starts_with("no_such_share"), "{status}");

    // Hybrid search ranks by both signals.
    let hybrid = api
        .post(
            "/v1/memories/search",
            json!({"agent_id": "alice", "query": "feeding", "embedding": [0.0, 1.0, 0.0], "weight": 0.5}),
            None,
        )
        .await?;
    assert_eq!(hybrid.body["mode"], "hybrid");
    assert_eq!(hybrid.body["items"][0]["memory_id"], two_id.as_str());
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_neither_skips_nor_repeats_under_concurrent_writes() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let mut before = HashSet::new();
    let mut last = String::new();
    for i in 0..45 {
        let w = api
            .write(
                "agent-p",
                &format!("page item {i}"),
                json!({"tags": [format!("t{}", i % 3)]}),
            )
            .await?;
        before.insert(s(&w["memory_id"]).to_owned());
        last = s(&w["position"]).to_owned();
    }
    api.get("/v1/agents/agent-p/memories", None, Some(&last)).await?;

    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..30 {
                api.write("agent-p", &format!("concurrent {i}"), json!({}))
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/agents/agent-p/memories?limit=7&cursor={c}"),
            None => "/v1/agents/agent-p/memories?limit=7".to_owned(),
        };
        let page = api.get(&path, None, None).await?;
        assert_eq!(page.status, 200, "{}", page.body);
        seen.extend(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| s(&m["memory_id"]).to_owned()),
        );
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await??;
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a memory was repeated across pages");
    assert!(
        before.is_subset(&unique),
        "a memory that existed before paging was skipped"
    );

    // Filters: tags any/all and tier.
    let t0 = api
        .get("/v1/agents/agent-p/memories?tags_any=t0&limit=100", None, None)
        .await?;
    assert_eq!(t0.body["items"].as_array().unwrap().len(), 15);
    let none = api
        .get("/v1/agents/agent-p/memories?tags_all=t0,t1", None, None)
        .await?;
    assert_eq!(none.body["items"], json!([]));
    let bad = api
        .get("/v1/agents/agent-p/memories?cursor=garbage", None, None)
        .await?;
    assert_eq!((bad.status, s(&bad.body["code"])), (400, "bad_request"));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_their_position_and_time_out_clearly() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(
        &env,
        "all",
        &[("MEMOS__MEMORY__READ_YOUR_WRITES_TIMEOUT", "700ms")],
    )
    .await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    for i in 0..20 {
        let w = api.write("agent-y", &format!("read me {i}"), json!({})).await?;
        // No polling: the position makes the very first read see the write.
        let got = api
            .get(
                &format!("/v1/memories/{}", s(&w["memory_id"])),
                None,
                Some(s(&w["position"])),
            )
            .await?;
        assert_eq!(got.status, 200, "write {i}: {}", got.body);
    }
    let future = api
        .get("/v1/agents/agent-y/memories", None, Some("0:999999"))
        .await?;
    assert_eq!(future.status, 504);
    assert_eq!(future.body["code"], "not_caught_up");
    assert!(
        s(&future.body["message"]).contains("offset 999999"),
        "{}",
        future.body
    );
    let bad = api
        .get("/v1/agents/agent-y/memories", None, Some("nonsense"))
        .await?;
    assert_eq!(bad.status, 400);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_registered_and_found() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let registered = api
        .post(
            "/v1/tools",
            json!({"agent_id": "toolsmith", "name": "web_search", "description": "Searches the public web",
                   "usage": "web_search(query: str) -> list[url]", "tags": ["search", "web"]}),
            None,
        )
        .await?;
    assert_eq!(registered.status, 202);
    let again = api
        .post(
            "/v1/tools",
            json!({"agent_id": "toolsmith", "name": "calculator", "description": "Evaluates arithmetic",
                   "tags": ["math"]}),
            None,
        )
        .await?;
    let position = format!(
        "{},{}",
        s(&registered.body["position"]),
        s(&again.body["position"])
    );
    let found = api.get("/v1/tools?q=web", None, Some(&position)).await?;
    let names: Vec<&str> = found
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| s(&t["name"]))
        .collect();
    assert_eq!(names, ["web_search"]);
    let by_tag = api.get("/v1/tools?tag=math", None, None).await?;
    assert_eq!(by_tag.body[0]["name"], "calculator");
    let all = api.get("/v1/tools", None, None).await?;
    assert_eq!(all.body.as_array().unwrap().len(), 2);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_when_postgres_is_away_for_ten_seconds() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api_process = MemosProcess::start(&env, "api", &[]).await?;
    let projector = MemosProcess::start(
        &env,
        "projector",
        &[("MEMOS__PROJECTOR__MAX_RETRY_BACKOFF", "1s")],
    )
    .await?;
    let api = Api::new(api_process.base_url.as_deref().unwrap());
    let mut expected = Vec::new();
    for i in 0..100 {
        expected.push(
            api.write(&format!("agent-{}", i % 5), &format!("before {i}"), json!({}))
                .await?,
        );
    }
    env.set_database_available(false).await?;
    let outage = std::time::Instant::now();
    // Writes go on: appending needs only Kafka.
    for i in 0..100 {
        expected.push(
            api.write(&format!("agent-{}", i % 5), &format!("during {i}"), json!({}))
                .await?,
        );
    }
    let remaining = Duration::from_secs(10).saturating_sub(outage.elapsed());
    tokio::time::sleep(remaining).await;
    env.set_database_available(true).await?;
    for i in 0..100 {
        expected.push(
            api.write(&format!("agent-{}", i % 5), &format!("after {i}"), json!({}))
                .await?,
        );
    }

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.database_url)
        .await?;
    eventually(
        "every command applied after the outage",
        Duration::from_secs(120),
        || async {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM memory_commands")
                .fetch_one(&pool)
                .await?;
            Ok((n >= 300).then_some(()))
        },
    )
    .await?;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT memory_id::text, content FROM memories")
        .fetch_all(&pool)
        .await?;
    assert_eq!(rows.len(), 300);
    let expected_ids: HashSet<String> = expected.iter().map(|w| s(&w["memory_id"]).to_owned()).collect();
    let actual_ids: HashSet<String> = rows.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(actual_ids, expected_ids);
    let (applied,): (i64,) = sqlx::query_as("SELECT count(*) FROM memory_commands WHERE status = 'applied'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(applied, 300);
    assert!(
        projector.log_text().contains("projector step failed; retrying"),
        "the outage was noticed"
    );
    pool.close().await;
    env.cleanup().await;
    Ok(())
}
