//! A memory goes in over HTTP, through Kafka, into PostgreSQL and Redis, and comes back.

use std::time::Duration;

use memos_integration_tests::process::issue_key;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_over_http_then_read_back() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let http = reqwest::Client::new();

    let response = http
        .post(memos.url("/v1/memories"))
        .json(&json!({
            "agent_id": "agent-42",
            "content": "The deploy key rotates every Friday",
            "tags": ["ops", "security"],
            "metadata": {"source": "runbook", "page": 7},
            "tier": "procedural",
            "importance": 0.9
        }))
        .send()
        .await?;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await?;
    let memory_id = accepted["memory_id"].as_str().unwrap().to_owned();
    assert!(accepted["offset"].as_i64().unwrap() >= 0, "{accepted}");
    assert_eq!(accepted["topic"], env.commands_topic.as_str());

    let memory: Value = eventually("the memory to be readable", Duration::from_secs(30), || {
        let url = memos.url(&format!("/v1/memories/{memory_id}"));
        let http = http.clone();
        async move {
            let response = http.get(url).send().await?;
            Ok((response.status() == 200).then_some(response.json::<Value>().await?))
        }
    })
    .await?;
    assert_eq!(memory["content"], "The deploy key rotates every Friday");
    assert_eq!(memory["tags"], json!(["ops", "security"]));
    assert_eq!(memory["metadata"], json!({"source": "runbook", "page": 7}));
    assert_eq!(memory["tier"], "procedural");
    assert_eq!(memory["namespace"], "agent-42");
    assert_eq!(memory["log_offset"], accepted["offset"]);

    // The view row and the Redis copy agree.
    let (content,): (String,) = sqlx::query_as("SELECT content FROM memories WHERE memory_id = $1::uuid")
        .bind(&memory_id)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(content, "The deploy key rotates every Friday");
    let redis = redis::Client::open(env.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = format!("{}:memory:{memory_id}", env.redis_prefix);
    // Redis is written right after the PostgreSQL commit, so it may trail the first read.
    let cached: String = eventually(
        "the memory to be cached in Redis",
        Duration::from_secs(30),
        || {
            let (mut redis, key) = (redis.clone(), key.clone());
            async move {
                Ok(redis::cmd("HGET")
                    .arg(key)
                    .arg("doc")
                    .query_async(&mut redis)
                    .await?)
            }
        },
    )
    .await?;
    let cached: Value = serde_json::from_str(&cached)?;
    assert_eq!(cached, memory);

    let page: Value = http
        .get(memos.url("/v1/agents/agent-42/memories"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["memory_id"], memory_id.as_str());
    let other: Value = http
        .get(memos.url("/v1/agents/someone-else/memories"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(other["items"], json!([]));

    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_append_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let key = issue_key(&env, "tests", "service", &["--agent", "*"])?;
    let memos = MemosProcess::start(&env, "api", &[("MEMOS__HTTP__AUTH", "keys")]).await?;
    let http = reqwest::Client::new();
    let post = |body: String| {
        http.post(memos.url("/v1/memories"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let unauthorized = http
        .post(memos.url("/v1/memories"))
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.json::<Value>().await?["code"], "unauthorized");

    let cases = [
        ("{not json".to_owned(), 400, "malformed_json", None),
        (json!({"agent_id": "a"}).to_string(), 422, "invalid", None),
        (
            json!({"agent_id": "a", "content": ""}).to_string(),
            422,
            "invalid",
            Some("content"),
        ),
        (
            json!({"agent_id": "a", "content": "x", "metadata": [1]}).to_string(),
            422,
            "invalid",
            Some("metadata"),
        ),
        (
            json!({"agent_id": "a", "content": "x", "importance": 3}).to_string(),
            422,
            "invalid",
            Some("importance"),
        ),
        (
            json!({"agent_id": "a", "content": "x", "tags": vec!["t"; 33]}).to_string(),
            413,
            "too_large",
            Some("tags"),
        ),
        (
            json!({"agent_id": "a", "content": "x".repeat(64 * 1024 + 1)}).to_string(),
            413,
            "too_large",
            Some("content"),
        ),
        (
            json!({"agent_id": "a", "content": "x".repeat(300 * 1024)}).to_string(),
            413,
            "too_large",
            None,
        ),
        (
            json!({"agent_id": "a", "content": "x", "surprise": 1}).to_string(),
            422,
            "invalid",
            None,
        ),
    ];
    for (body, status, code, field) in cases {
        let response = post(body.clone()).await?;
        assert_eq!(response.status(), status, "{}", &body[..body.len().min(80)]);
        let error: Value = response.json().await?;
        assert_eq!(error["code"], code, "{error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        if let Some(field) = field {
            assert_eq!(error["field"], field, "{error}");
        }
    }
    let not_found = http
        .get(memos.url(&format!("/v1/memories/{}", uuid::Uuid::new_v4())))
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(not_found.status(), 404);
    assert_eq!(not_found.json::<Value>().await?["code"], "not_found");

    // Nothing was appended: every partition of the command topic is still empty.
    let appended: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, high)| high)
        .sum();
    assert_eq!(appended, 0);
    env.cleanup().await;
    Ok(())
}
