//! Degraded operation: a dependency that fails or hangs costs the API that dependency's
//! capability, bounded in time, and nothing else. Each test cuts its own processes off from
//! PostgreSQL, Redis or Kafka through a [`FaultProxy`] or a dead address; the shared stack
//! keeps running for everyone else.

use std::collections::BTreeMap;
use std::time::Duration;

use memos_integration_tests::api::{Answer, Api};
use memos_integration_tests::proxy::{FaultProxy, Mode, url_addr};
use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text};
use memos_redis::HotViews;
use memos_redis::hot::{HotWrite, Recent};
use memos_redis::tasks::AgentWrite;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A client whose timeout only turns a hung answer into a failure, never a slow one.
fn client(base: &str) -> Api {
    Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        base: base.trim_end_matches('/').to_owned(),
    }
}

async fn metrics(api: &Api) -> anyhow::Result<String> {
    Ok(api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await?
        .text()
        .await?)
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics_text::sum(text, name, labels).unwrap_or(0.0)
}

async fn readyz(api: &Api, query: &str) -> anyhow::Result<Answer> {
    let start = std::time::Instant::now();
    let answer = api.get(&format!("/readyz{query}"), None, None).await?;
    // A figure for the record, not a threshold.
    eprintln!(
        "readyz{query}: {} {} in {:?}",
        answer.status,
        answer.body["status"],
        start.elapsed()
    );
    Ok(answer)
}

/// A listener that accepts connections and never answers: a hung server.
async fn black_hole() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok((addr, task))
}

async fn memory_row(env: &TestEnv, id: &str) -> anyhow::Result<Option<(i64, bool)>> {
    Ok(
        sqlx::query_as("SELECT version, forgotten_at IS NOT NULL FROM memories WHERE memory_id = $1::uuid")
            .bind(id)
            .fetch_optional(&env.pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_forgets_are_accepted_while_postgres_hangs_or_refuses() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let proxy = FaultProxy::start(url_addr(&env.database_url)?).await?;
    let database_url = proxy.url_for(&env.database_url)?;
    // The API reaches PostgreSQL through the proxy; the projector directly.
    let api_process = MemosProcess::start(&env, "api", &[("DATABASE_URL", &database_url)]).await?;
    let _projector = MemosProcess::start(&env, "projector", &[]).await?;
    let api = client(api_process.base_url.as_deref().unwrap());
    let written = api.write("agent-d", "first", json!({})).await?;
    let id = written["memory_id"].as_str().unwrap().to_owned();
    eventually("the write applied", Duration::from_secs(60), || async {
        Ok(memory_row(&env, &id).await?.filter(|(v, _)| *v == 1))
    })
    .await?;

    // A PostgreSQL that accepts connections and never answers: the update is appended
    // after the conflict check's bound, not after the pool's or the request's timeout.
    proxy.set(Mode::Hang);
    let hung = std::time::Instant::now();
    let update = api
        .patch(
            &format!("/v1/memories/{id}"),
            json!({"agent_id": "agent-d", "content": "second", "expected_version": 1}),
        )
        .await?;
    assert_eq!(
        update.status, 202,
        "update while PostgreSQL hangs: {}",
        update.body
    );
    eprintln!("update with PostgreSQL hung answered in {:?}", hung.elapsed());
    eventually("the update applied", Duration::from_secs(60), || async {
        Ok(memory_row(&env, &id).await?.filter(|(v, _)| *v == 2))
    })
    .await?;
    let text = metrics(&api).await?;
    assert!(
        metric(
            &text,
            "memos_api_conflict_checks_skipped_total",
            &[("reason", "timeout")]
        ) >= 1.0,
        "a skipped check is counted:\n{text}"
    );

    // A PostgreSQL that refuses this database (connections cut, new ones refused).
    proxy.set(Mode::Forward);
    env.set_database_available(false).await?;
    let forget = api
        .post(
            &format!("/v1/memories/{id}/forget"),
            json!({"agent_id": "agent-d", "expected_version": 2}),
            None,
        )
        .await?;
    assert_eq!(
        forget.status, 202,
        "forget while PostgreSQL refuses: {}",
        forget.body
    );
    env.set_database_available(true).await?;
    eventually("the forget applied", Duration::from_secs(60), || async {
        Ok(memory_row(&env, &id).await?.filter(|(_, forgotten)| *forgotten))
    })
    .await?;
    let text = metrics(&api).await?;
    assert!(
        metric(&text, "memos_api_conflict_checks_skipped_total", &[]) >= 2.0,
        "both skipped checks counted:\n{text}"
    );

    // With PostgreSQL back, the check refuses at once again what can only be rejected.
    let stale = api
        .patch(
            &format!("/v1/memories/{id}"),
            json!({"agent_id": "agent-d", "content": "third", "expected_version": 1}),
        )
        .await?;
    assert_eq!(stale.status, 409, "{}", stale.body);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_per_dependency_what_the_api_can_do() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let postgres = FaultProxy::start(url_addr(&env.database_url)?).await?;
    let redis = FaultProxy::start(url_addr(&env.redis_url)?).await?;
    let (database_url, redis_url) = (
        postgres.url_for(&env.database_url)?,
        redis.url_for(&env.redis_url)?,
    );
    let healthy = MemosProcess::start(
        &env,
        "api",
        &[("DATABASE_URL", &database_url), ("REDIS_URL", &redis_url)],
    )
    .await?;
    let api = client(healthy.base_url.as_deref().unwrap());

    let answer = readyz(&api, "").await?;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "ready", "{}", answer.body);
    assert_eq!(
        (answer.body["writes"].clone(), answer.body["reads"].clone()),
        (json!(true), json!(true))
    );
    for dependency in ["kafka", "postgres", "redis"] {
        assert_eq!(answer.body["checks"][dependency]["ok"], true, "{}", answer.body);
    }

    // Redis hangs: a cache, so still ready for both, degraded.
    redis.set(Mode::Hang);
    let answer = readyz(&api, "?require=all").await?;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "degraded", "{}", answer.body);
    assert_eq!(answer.body["checks"]["redis"]["ok"], false, "{}", answer.body);
    assert_eq!(
        (answer.body["writes"].clone(), answer.body["reads"].clone()),
        (json!(true), json!(true))
    );

    // PostgreSQL hangs too: writes only. A balancer that needs reads is told 503.
    postgres.set(Mode::Hang);
    let answer = readyz(&api, "").await?;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["status"], "degraded", "{}", answer.body);
    assert_eq!(
        (answer.body["writes"].clone(), answer.body["reads"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(answer.body["checks"]["postgres"]["ok"], false, "{}", answer.body);
    assert_eq!(readyz(&api, "?require=reads").await?.status, 503);
    assert_eq!(readyz(&api, "?require=writes").await?.status, 200);
    assert_eq!(readyz(&api, "?require=nonsense").await?.status, 400);
    postgres.set(Mode::Forward);
    redis.set(Mode::Forward);

    // A broker that accepts connections and never answers, for a second API process (the
    // first one created the topics).
    let (broker, _hole) = black_hole().await?;
    let no_kafka = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS_KAFKA_BROKERS", &broker),
            ("MEMOS__TOPICS__CREATE", "false"),
            ("DATABASE_URL", &database_url),
        ],
    )
    .await?;
    let no_kafka = client(no_kafka.base_url.as_deref().unwrap());
    let answer = readyz(&no_kafka, "").await?;
    assert_eq!(answer.status, 200, "reads are still served: {}", answer.body);
    assert_eq!(answer.body["status"], "degraded", "{}", answer.body);
    assert_eq!(
        (answer.body["writes"].clone(), answer.body["reads"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(answer.body["checks"]["kafka"]["ok"], false, "{}", answer.body);
    assert_eq!(readyz(&no_kafka, "?require=writes").await?.status, 503);

    // Kafka and PostgreSQL both gone: nothing can be served.
    postgres.set(Mode::Hang);
    let answer = readyz(&no_kafka, "").await?;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["status"], "unavailable", "{}", answer.body);
    postgres.set(Mode::Forward);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_skip_a_redis_that_does_not_answer() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let redis = FaultProxy::start(url_addr(&env.redis_url)?).await?;
    let redis_url = redis.url_for(&env.redis_url)?;
    let api_process = MemosProcess::start(&env, "api", &[("REDIS_URL", &redis_url)]).await?;
    let _projector = MemosProcess::start(&env, "projector", &[]).await?;
    let api = client(api_process.base_url.as_deref().unwrap());
    let written = api.write("agent-r", "cached", json!({})).await?;
    let id = written["memory_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/memories/{id}");
    eventually("the memory readable", Duration::from_secs(60), || async {
        Ok((api.get(&path, None, None).await?.status == 200).then_some(()))
    })
    .await?;

    for (mode, reads) in [(Mode::Hang, 40), (Mode::Refuse, 40)] {
        let before = metrics(&api).await?;
        redis.set(mode);
        let start = std::time::Instant::now();
        for _ in 0..reads {
            let answer = api.get(&path, None, None).await?;
            assert_eq!(
                answer.status, 200,
                "{mode:?}: served from PostgreSQL: {}",
                answer.body
            );
            assert_eq!(answer.body["content"], "cached");
        }
        eprintln!("{reads} reads with Redis {mode:?}: {:?}", start.elapsed());
        let after = metrics(&api).await?;
        let delta = |name: &str, labels: &[(&str, &str)]| {
            metric(&after, name, labels) - metric(&before, name, labels)
        };
        let rejected = delta("memos_redis_breaker_rejected_total", &[("op", "get_memory")]);
        // Only the first failure and the probes (one per cool-down) reach Redis.
        assert!(
            rejected >= f64::from(reads / 2),
            "{mode:?}: {rejected} of {reads} reads failed fast:\n{after}"
        );
        assert!(
            metric(&after, "memos_redis_breaker_opens_total", &[]) >= 1.0,
            "{mode:?}:\n{after}"
        );
        // Back: a probe closes the breaker and reads use Redis again.
        redis.set(Mode::Forward);
        eventually("the breaker closed", Duration::from_secs(30), || async {
            api.get(&path, None, None).await?;
            let text = metrics(&api).await?;
            Ok((metric(&text, "memos_redis_breaker_open", &[]) == 0.0).then_some(()))
        })
        .await?;
    }

    // The task inbox reads through the same breaker.
    let direct = HotViews::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(60)).await?;
    direct
        .put_agents(&[AgentWrite {
            agent_id: "agent-i",
            revision: 1,
            inbox: "[]",
            availability: None,
        }])
        .await?;
    let inbox = api.get("/v1/agents/agent-i/inbox", None, None).await?;
    assert_eq!(
        (inbox.status, inbox.body["source"].clone()),
        (200, json!("redis")),
        "{}",
        inbox.body
    );
    let before = metrics(&api).await?;
    redis.set(Mode::Hang);
    for _ in 0..20 {
        // PostgreSQL answers: it has never heard of this agent.
        let inbox = api.get("/v1/agents/agent-i/inbox", None, None).await?;
        assert_eq!(inbox.status, 404, "{}", inbox.body);
    }
    let after = metrics(&api).await?;
    let rejected = metric(&after, "memos_redis_breaker_rejected_total", &[("op", "inbox")])
        - metric(&before, "memos_redis_breaker_rejected_total", &[("op", "inbox")]);
    assert!(
        rejected >= 10.0,
        "{rejected} of 20 inbox reads failed fast:\n{after}"
    );
    redis.set(Mode::Forward);
    env.cleanup().await;
    Ok(())
}

/// A batch of cache writes on a Redis slower than the client's read bound (and than the
/// client library's default 500 ms) still lands: bulk writes have their own, larger bound.
#[tokio::test]
async fn bulk_cache_writes_outlast_a_slow_redis() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let proxy = FaultProxy::start(url_addr(&env.redis_url)?).await?;
    let hot = HotViews::connect(
        &proxy.url_for(&env.redis_url)?,
        &env.redis_prefix,
        Duration::from_secs(60),
    )
    .await?;
    let ids: Vec<String> = (0..2000).map(|i| format!("slow-{i}")).collect();
    let writes: Vec<HotWrite<'_>> = ids
        .iter()
        .map(|id| HotWrite {
            key: id,
            position: 1,
            doc: Some(format!("{{\"id\":\"{id}\"}}")),
            recent: Recent {
                namespace: "agent-slow",
                score: 1,
                keep: false,
            },
        })
        .collect();
    // Every answer of the server now arrives 700 ms late.
    proxy.set(Mode::Delay(Duration::from_millis(700)));
    assert_eq!(hot.put_memories(&writes).await?, 2000);
    hot.advance_positions("slow-topic", &BTreeMap::from([(0, 2000)]))
        .await?;
    // What landed, read straight from the server.
    let direct = HotViews::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(60)).await?;
    assert_eq!(direct.memory_position("slow-1999").await?, Some(1));
    assert_eq!(direct.position("slow-topic", 0).await?, Some(2000));
    let value: Option<Value> = direct
        .get_memory("slow-0")
        .await?
        .map(|d| serde_json::from_str(&d))
        .transpose()?;
    assert_eq!(value, Some(json!({"id": "slow-0"})));
    env.cleanup().await;
    Ok(())
}
