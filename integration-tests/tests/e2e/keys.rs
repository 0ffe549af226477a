//! API keys through `memosctl keys` against the real broker: a key is printed once and only
//! its digest reaches the keys log; `list` shows who issued what for whom; a revocation
//! reaches a process following the log, which then refuses the key.

use std::sync::Arc;
use std::time::Duration;

use memos_integration_tests::process::{memosctl, memosctl_ok};
use memos_integration_tests::{TestEnv, eventually};
use memos_runtime::keys::{Refusal, Role};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn config(env: &TestEnv) -> anyhow::Result<memos_runtime::Config> {
    let mut config = memos_runtime::Config::default();
    config.kafka.brokers = env.brokers.clone();
    config.topics.keys = env.keys_topic.clone();
    Ok(config)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_issued_once_listed_and_revoked_on_a_running_follower() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let out = memosctl_ok(
        &env,
        &[
            "keys",
            "create",
            "--principal",
            "alice",
            "--role",
            "agent",
            "--namespace",
            "team-x",
            "--by",
            "ops-1",
            "--note",
            "e2e",
            "--json",
        ],
    )?;
    let issued: Value = serde_json::from_str(out.trim())?;
    let token = issued["key"].as_str().expect("the key is printed").to_owned();
    let key_id = issued["key_id"].as_str().unwrap().to_owned();
    // The secret is base64url, so it may hold `_` itself: it is all after the key id.
    let secret = token
        .strip_prefix(&format!("memos_{key_id}_"))
        .unwrap_or_else(|| panic!("{token} is not memos_<key id>_<secret>"))
        .to_owned();
    assert_eq!(secret.len(), 43, "{token}");

    // A process following the log knows the key.
    let shutdown = CancellationToken::new();
    let followed = memos_kafka::keys::follow(Arc::new(config(&env)?), shutdown.clone());
    let f = followed.clone();
    let t = token.clone();
    eventually("the follower read the log and knows the key", WAIT, || {
        let f = f.clone();
        let t = t.clone();
        async move {
            let known = f.ring.read().unwrap().verify(&t, now_ms()).is_ok();
            Ok((known && f.caught_up()).then_some(()))
        }
    })
    .await?;
    {
        let ring = followed.ring.read().unwrap();
        let (_, principal) = ring.verify(&token, now_ms()).unwrap();
        assert_eq!((principal.name.as_str(), principal.role), ("alice", Role::Agent));
        assert!(principal.namespaces.contains("team-x"));
    }

    // `list` shows it, with who issued it, and no secret.
    let listed = memosctl_ok(&env, &["keys", "list", "--json"])?;
    assert!(!listed.contains(&secret), "the secret is listed");
    let row: Value = serde_json::from_str(listed.lines().next().unwrap())?;
    assert_eq!(row["key_id"], key_id.as_str());
    assert_eq!(row["issued_by"], "ops-1");
    assert_eq!(row["principal"]["name"], "alice");
    assert!(row["revoked_at"].is_null());

    // The log holds the digest, never the secret.
    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", format!("{}-keys-read", env.group_id))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[env.keys_topic.as_str()])?;
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while records.is_empty() && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            records.push(String::from_utf8(
                message?.payload().unwrap_or_default().to_vec(),
            )?);
        }
    }
    assert_eq!(records.len(), 1);
    assert!(!records[0].contains(&secret), "the secret reached the log");
    assert!(records[0].contains(&key_id));

    // Revoked: the running follower refuses the key, `list` says who revoked it.
    memosctl_ok(
        &env,
        &["keys", "revoke", &key_id, "--reason", "leaked", "--by", "ops-2"],
    )?;
    let ring = followed.ring.clone();
    let t = token.clone();
    eventually("the follower refuses the revoked key", WAIT, || {
        let ring = ring.clone();
        let t = t.clone();
        async move {
            let refused = ring.read().unwrap().verify(&t, now_ms()).err() == Some(Refusal::Revoked);
            Ok(refused.then_some(()))
        }
    })
    .await?;
    let listed = memosctl_ok(&env, &["keys", "list", "--json"])?;
    let row: Value = serde_json::from_str(listed.lines().next().unwrap())?;
    assert_eq!(row["revoked_by"], "ops-2");
    assert_eq!(row["revoke_reason"], "leaked");

    // Refusals: an unknown id to revoke, an agent grant on a non-service key, a bad role.
    let unknown = memosctl(&env, &["keys", "revoke", "0123456789abcdef"])?;
    assert_ne!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("no key 0123456789abcdef"),
        "{}",
        unknown.stderr
    );
    let wrong = memosctl(
        &env,
        &[
            "keys",
            "create",
            "--principal",
            "bob",
            "--role",
            "agent",
            "--agent",
            "x",
        ],
    )?;
    assert_ne!(wrong.code, 0);
    assert!(
        wrong.stderr.contains("--agent is for service principals"),
        "{}",
        wrong.stderr
    );
    let bad = memosctl(&env, &["keys", "create", "--principal", "bob", "--role", "root"])?;
    assert_ne!(bad.code, 0);
    shutdown.cancel();
    env.cleanup().await;
    Ok(())
}
