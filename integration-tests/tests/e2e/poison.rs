//! No single record holds back the others (issue #16, findings 2 and 3). Records produced
//! straight to Kafka, bypassing the API, that PostgreSQL refuses (a time out of its range,
//! U+0000 in text or jsonb) are isolated and dead-lettered while every valid record around
//! them is applied; a record too large for a copy in the dead-letter topic is dead-lettered
//! as a reference; nulls stay nulls; an outage of PostgreSQL is waited out, never a reason to
//! skip anything.
//!
//! Records are framed here with the schema registry's released schemas directly (not through
//! memOS's command encoder), so they reach the projector whatever the encoder validates. When
//! the decoder refuses such a record first (validation at the edge), its letter carries the
//! decoder's class instead of `unstorable`; both are accepted, the isolation itself is
//! tested against the apply path in `services/projector/tests/isolation.rs`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{TimeZone, Utc};
use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text, process};
use memos_schemas::registry::{CommandKind, RELEASED};
use memos_schemas::task::{TaskEvent, TaskEventType};
use memos_schemas::{Tier, UpdateMemory, WriteMemory};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::PgPool;

/// `value` framed with the newest released schema of `kind`.
fn framed<T: serde::Serialize>(kind: CommandKind, value: &T) -> anyhow::Result<Vec<u8>> {
    let released = RELEASED
        .iter()
        .filter(|r| r.kind == kind)
        .max_by_key(|r| r.version)
        .expect("a released schema");
    let schema = apache_avro::Schema::parse_str(released.json)?;
    let body = GenericDatumWriter::builder(&schema)
        .build()?
        .write_ser_to_vec(value)?;
    let fingerprint = memos_schemas::fingerprint::schema_fingerprint(&schema);
    Ok(memos_schemas::single_object::encode(fingerprint, &body))
}

fn write(namespace: &str, content: &str) -> WriteMemory {
    WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: namespace.into(),
        actor: namespace.into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: uuid::Uuid::new_v4().to_string(),
        content: content.into(),
        tier: Tier::Semantic,
        tags: vec![],
        metadata_json: "{}".into(),
        importance: 0.5,
        expires_at: None,
        embedding: None,
        source: None,
    }
}

/// A producer that may send records of up to 4 MiB (librdkafka's default is 1,000,000).
fn producer(env: &TestEnv) -> anyhow::Result<FutureProducer> {
    let mut config = env.kafka_config();
    config.set("message.max.bytes", (4 << 20).to_string());
    Ok(config.create()?)
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> anyhow::Result<(i32, i64)> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    let delivered = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    Ok((delivered.partition, delivered.offset))
}

/// One record of the dead-letter topic.
#[derive(Debug)]
struct Letter {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: HashMap<String, String>,
}

impl Letter {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn origin(&self) -> (i32, i64) {
        (
            self.header("memos-dlq-origin-partition")
                .unwrap()
                .parse()
                .unwrap(),
            self.header("memos-dlq-origin-offset").unwrap().parse().unwrap(),
        )
    }

    fn class(&self) -> &str {
        self.header("memos-dlq-error-class").unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.header("memos-dlq-error-message").unwrap_or_default()
    }
}

/// Every record of `topic`, read from the beginning until `expected` were read and the topic
/// stays quiet for a moment (so that unexpected extra letters are seen too).
fn read_topic(env: &TestEnv, topic: &str, expected: usize) -> anyhow::Result<Vec<Letter>> {
    let mut config = env.kafka_config();
    config.set(
        "group.id",
        format!("{}-poison-{}", env.group_id, uuid::Uuid::new_v4()),
    );
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut quiet = 0;
    while std::time::Instant::now() < deadline && (letters.len() < expected || quiet < 5) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(message) => {
                let m = message?;
                quiet = 0;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                                (h.key.to_owned(), value.unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                letters.push(Letter {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            None => quiet += 1,
        }
    }
    letters.sort_by_key(|l| (l.header("memos-dlq-origin-topic").map(str::to_owned), l.origin()));
    Ok(letters)
}

/// Waits until the memory projection's stored offsets reach the end of the command topic.
async fn until_caught_up(env: &TestEnv, projection: &str, topic: &str) -> anyhow::Result<()> {
    let ends: BTreeMap<i32, i64> = env
        .high_watermarks(topic)?
        .into_iter()
        .filter(|(_, h)| *h > 0)
        .collect();
    eventually("lag 0", Duration::from_secs(120), || async {
        let stored: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM projection_offsets WHERE projection = $1 AND topic = $2",
        )
        .bind(projection)
        .bind(topic)
        .fetch_all(&env.pool)
        .await?;
        let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
        Ok(ends
            .iter()
            .all(|(p, end)| stored.get(p) == Some(end))
            .then_some(()))
    })
    .await
}

/// The process still answers: it never crashed or stopped.
async fn alive(memos: &MemosProcess) -> anyhow::Result<()> {
    let status = reqwest::get(memos.url("/healthz")).await?.status();
    anyhow::ensure!(status.is_success(), "healthz answered {status}");
    Ok(())
}

/// A letter for a record that PostgreSQL refuses: `unstorable` with the database's reason,
/// or (once the decoder validates to what the views can store) the decoder's refusal.
fn assert_refused(letter: &Letter) {
    match letter.class() {
        "unstorable" => assert!(letter.message().starts_with("SQLSTATE 22"), "{letter:?}"),
        "invalid" => assert!(!letter.message().is_empty(), "{letter:?}"),
        other => panic!("unexpected class {other}: {letter:?}"),
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(pool).await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_commands_postgres_refuses_are_dead_lettered_and_every_valid_one_applied() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let producer = producer(&env)?;
    let topic = env.commands_topic.clone();
    let far = Utc
        .with_ymd_and_hms(200_000, 1, 1, 0, 0, 0)
        .unwrap()
        .timestamp_millis();

    let mut too_far = write("agent-a", "expires in the year 200000");
    too_far.expires_at = Some(far);
    let second = write("agent-a", "second");
    let update = UpdateMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: "agent-a".into(),
        actor: "agent-a".into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: second.memory_id.clone(),
        expected_version: Some(1),
        content: Some("second, updated after the bad ones".into()),
        tier: None,
        tags: None,
        metadata_json: None,
        importance: None,
        expires_at: None,
        clear_expiry: false,
        embedding: None,
    };
    let mut nul_metadata = write("agent-c", "NUL in metadata");
    nul_metadata.metadata_json = r#"{"k":"a\u0000b"}"#.into();
    let send = |key: &'static str, kind: CommandKind, bytes: Vec<u8>| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            // The kind names what the bytes are, for the reader of this test.
            let _ = kind;
            produce(&producer, &topic, Some(key.as_bytes()), Some(&bytes)).await
        }
    };
    let w = CommandKind::WriteMemory;
    let mut bad = Vec::new();
    send("agent-a", w, framed(w, &write("agent-a", "first"))?).await?;
    send("agent-b", w, framed(w, &write("agent-b", "b1"))?).await?;
    bad.push(send("agent-a", w, framed(w, &too_far)?).await?);
    send("agent-c", w, framed(w, &write("agent-c", "c1"))?).await?;
    send("agent-a", w, framed(w, &second)?).await?;
    bad.push(
        send(
            "agent-a",
            w,
            framed(w, &write("agent-a", "NUL \u{0} in content"))?,
        )
        .await?,
    );
    send("agent-b", w, framed(w, &write("agent-b", "b2"))?).await?;
    bad.push(send("agent-c", w, framed(w, &nul_metadata)?).await?);
    let u = CommandKind::UpdateMemory;
    send("agent-a", u, framed(u, &update)?).await?;
    send("agent-a", w, framed(w, &write("agent-a", "last"))?).await?;
    send("agent-c", w, framed(w, &write("agent-c", "c2"))?).await?;

    until_caught_up(&env, "memory", &topic).await?;
    let mut contents: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT namespace, content, version FROM memories")
            .fetch_all(&env.pool)
            .await?;
    contents.sort();
    let expected: Vec<(String, String, i64)> = [
        ("agent-a", "first", 1),
        ("agent-a", "last", 1),
        ("agent-a", "second, updated after the bad ones", 2),
        ("agent-b", "b1", 1),
        ("agent-b", "b2", 1),
        ("agent-c", "c1", 1),
        ("agent-c", "c2", 1),
    ]
    .into_iter()
    .map(|(n, c, v)| (n.to_owned(), c.to_owned(), v))
    .collect();
    assert_eq!(contents, expected, "every valid command applied, in order");
    assert_eq!(
        count(
            &env.pool,
            "SELECT count(*) FROM memory_commands WHERE status = 'applied'"
        )
        .await?,
        8
    );

    let letters = read_topic(&env, &env.dead_letter_topic, bad.len())?;
    let origins: Vec<(i32, i64)> = letters.iter().map(Letter::origin).collect();
    bad.sort();
    assert_eq!(
        origins, bad,
        "exactly the refused records dead-lettered: {letters:?}"
    );
    for letter in &letters {
        assert_refused(letter);
        assert_eq!(letter.header("memos-dlq-form"), Some("copy"));
    }
    alive(&memos).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_event_postgres_refuses_is_dead_lettered_and_the_task_views_flow_on() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "projector", &[]).await?;
    let producer = producer(&env)?;
    let topic = env.task_events_topic.clone();
    let accepted = |task: &str, payload: &str| {
        let mut event = TaskEvent::new(
            uuid::Uuid::new_v4().to_string(),
            TaskEventType::TaskAccepted,
            Utc::now().timestamp_millis(),
        );
        event.task_id = Some(task.into());
        event.actor = Some("boss".into());
        event.data_json = Some(format!(
            r#"{{"required_capabilities":["x"],"payload":{payload},"priority":0,"timeout_ms":60000,"max_attempts":1,"preferred_agent":null}}"#
        ));
        framed(CommandKind::TaskEvent, &event)
    };
    let e = |p: &str| -> anyhow::Result<Vec<u8>> { accepted(p, r#"{"n":1}"#) };
    produce(&producer, &topic, Some(b"wf-1"), Some(&e("t1")?)).await?;
    let bad = produce(
        &producer,
        &topic,
        Some(b"wf-1"),
        Some(&accepted("t2", r#"{"text":"a\u0000b"}"#)?),
    )
    .await?;
    produce(&producer, &topic, Some(b"wf-1"), Some(&e("t3")?)).await?;
    produce(&producer, &topic, Some(b"wf-2"), Some(&e("t4")?)).await?;

    until_caught_up(&env, "tasks", &topic).await?;
    let tasks: Vec<(String,)> = sqlx::query_as("SELECT task_id FROM tasks ORDER BY task_id")
        .fetch_all(&env.pool)
        .await?;
    let tasks: Vec<String> = tasks.into_iter().map(|(t,)| t).collect();
    assert_eq!(tasks, ["t1", "t3", "t4"]);
    let letters = read_topic(&env, &env.dead_letter_topic, 1)?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].origin(), bad);
    assert_eq!(letters[0].header("memos-dlq-origin-topic"), Some(topic.as_str()));
    assert_refused(&letters[0]);
    alive(&memos).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_megabyte_record_is_dead_lettered_as_a_copy_and_nulls_stay_null() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let producer = producer(&env)?;
    let topic = env.commands_topic.clone();
    // Within the command topic's limit (1 MiB), above librdkafka's default message.max.bytes.
    let big: Vec<u8> = (0..1_040_000u32).map(|i| (i % 251) as u8).collect();
    let mut expected = vec![
        produce(&producer, &topic, Some(b"agent-big"), Some(&big)).await?,
        produce(&producer, &topic, None, None).await?,
        produce(&producer, &topic, None, Some(b"no key")).await?,
        produce(&producer, &topic, Some(b""), Some(b"")).await?,
    ];
    let after = write("agent-big", "after the big one");
    produce(
        &producer,
        &topic,
        Some(b"agent-big"),
        Some(&framed(CommandKind::WriteMemory, &after)?),
    )
    .await?;

    until_caught_up(&env, "memory", &topic).await?;
    let (content,): (String,) = sqlx::query_as("SELECT content FROM memories WHERE memory_id = $1::uuid")
        .bind(&after.memory_id)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(content, "after the big one");
    let mut letters = read_topic(&env, &env.dead_letter_topic, 4)?;
    expected.sort();
    letters.sort_by_key(Letter::origin);
    let origins: Vec<(i32, i64)> = letters.iter().map(Letter::origin).collect();
    assert_eq!(origins, expected);
    let by_origin: HashMap<(i32, i64), &Letter> = letters.iter().map(|l| (l.origin(), l)).collect();
    let copy = by_origin[&expected[0].min(expected[1])];
    let copy = if copy.payload.as_ref().is_some_and(|p| p.len() > 1000) {
        copy
    } else {
        letters
            .iter()
            .find(|l| l.payload.as_ref().is_some_and(|p| p.len() > 1000))
            .expect("the big record's letter")
    };
    assert_eq!(copy.header("memos-dlq-form"), Some("copy"));
    assert_eq!(copy.payload.as_deref(), Some(&big[..]), "the original bytes");
    assert_eq!(copy.key.as_deref(), Some(&b"agent-big"[..]));
    let nulls: Vec<&&Letter> = by_origin.values().filter(|l| l.payload.is_none()).collect();
    assert_eq!(nulls.len(), 1, "{letters:?}");
    assert_eq!((nulls[0].key.as_ref(), nulls[0].class()), (None, "empty"));
    let keyless = by_origin
        .values()
        .find(|l| l.payload.as_deref() == Some(b"no key"))
        .unwrap();
    assert_eq!(keyless.key, None, "a null key stays null");
    let empty = by_origin
        .values()
        .find(|l| l.payload.as_deref() == Some(b""))
        .unwrap();
    assert_eq!(empty.key.as_deref(), Some(&b""[..]), "an empty key stays empty");
    alive(&memos).await?;
    env.cleanup().await;
    Ok(())
}

fn memosctl(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(process::binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .env("MEMOS__TOPICS__MAX_MESSAGE_BYTES", "65536")
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "memosctl {args:?} exited with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_a_copy_is_dead_lettered_as_a_reference_and_redriven() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // Topics sized for 64 KiB records; then the operator raises the command topic's limit
    // (and not the dead-letter topic's), so a record arrives that no copy can hold.
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__TOPICS__MAX_MESSAGE_BYTES", "65536")]).await?;
    let admin: AdminClient<DefaultClientContext> = env.kafka_config().create()?;
    let commands = env.commands_topic.clone();
    let raise = AlterConfig::new(ResourceSpecifier::Topic(&commands))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1")
        .set("message.timestamp.type", "LogAppendTime")
        .set("max.message.bytes", "2097152");
    for result in admin.alter_configs(&[raise], &AdminOptions::new()).await? {
        result.map_err(|(_, code)| anyhow::anyhow!("cannot raise the limit: {code}"))?;
    }
    let producer = producer(&env)?;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    // The broker may take a moment to apply the new limit.
    let origin = eventually("the raised limit", Duration::from_secs(30), || async {
        Ok(produce(&producer, &commands, Some(b"agent-ref"), Some(&big))
            .await
            .ok())
    })
    .await?;
    let after = write("agent-ref", "after the reference");
    produce(
        &producer,
        &commands,
        Some(b"agent-ref"),
        Some(&framed(CommandKind::WriteMemory, &after)?),
    )
    .await?;
    until_caught_up(&env, "memory", &commands).await?;
    assert_eq!(
        count(&env.pool, "SELECT count(*) FROM memories").await?,
        1,
        "the record after it applied"
    );

    let letters = read_topic(&env, &env.dead_letter_topic, 1)?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.origin(), origin);
    assert_eq!(letter.header("memos-dlq-form"), Some("reference"));
    assert_eq!((letter.key.as_ref(), letter.payload.as_ref()), (None, None));
    assert_eq!(letter.header("memos-dlq-origin-size"), Some("300000"));
    assert_eq!(
        letter.header("memos-dlq-origin-sha256"),
        Some(memos_kafka::dlq::sha256_hex(&big).as_str())
    );
    assert_eq!(letter.class(), "not_avro");

    // memosctl reads the original from its origin.
    let id = format!("{}:{}", letter.partition, letter.offset);
    let shown: Value = serde_json::from_str(&memosctl(&env, &["dlq", "show", &id, "--json"])?)?;
    assert_eq!(shown["form"], "reference");
    assert_eq!(shown["payload_bytes"], 300_000);
    assert_eq!(shown["key"], "agent-ref");
    let scratch = format!("{}.redriven", env.commands_topic);
    let new = NewTopic::new(&scratch, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "2097152");
    for result in admin.create_topics(&[new], &AdminOptions::new()).await? {
        result.map_err(|(t, code)| anyhow::anyhow!("cannot create {t}: {code}"))?;
    }
    let out = memosctl(&env, &["dlq", "redrive", &id, "--force", "--to", &scratch])?;
    assert!(out.contains("redriven 1"), "{out}");
    let redriven = read_topic(&env, &scratch, 1)?;
    assert_eq!(redriven.len(), 1);
    assert_eq!(
        redriven[0].payload.as_deref(),
        Some(&big[..]),
        "the original bytes"
    );
    assert_eq!(redriven[0].key.as_deref(), Some(&b"agent-ref"[..]));
    let _ = admin.delete_topics(&[&scratch], &AdminOptions::new()).await;
    alive(&memos).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_postgres_is_retried_and_only_the_refused_record_is_dead_lettered() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__PROJECTOR__MAX_RETRY_BACKOFF", "500ms")]).await?;
    let producer = producer(&env)?;
    let topic = env.commands_topic.clone();
    let w = CommandKind::WriteMemory;
    let mut sent = 0i64;
    for i in 0..50 {
        let ns = format!("agent-{}", i % 5);
        produce(
            &producer,
            &topic,
            Some(ns.as_bytes()),
            Some(&framed(w, &write(&ns, &format!("before {i}")))?),
        )
        .await?;
        sent += 1;
    }
    until_caught_up(&env, "memory", &topic).await?;

    // Every connection of the projector is terminated and new ones are refused.
    env.set_database_available(false).await?;
    let mut bad = None;
    for i in 0..50 {
        let ns = format!("agent-{}", i % 5);
        if i == 25 {
            let poison = write(&ns, "NUL \u{0} during the outage");
            bad = Some(produce(&producer, &topic, Some(ns.as_bytes()), Some(&framed(w, &poison)?)).await?);
        }
        produce(
            &producer,
            &topic,
            Some(ns.as_bytes()),
            Some(&framed(w, &write(&ns, &format!("during {i}")))?),
        )
        .await?;
        sent += 1;
    }
    let http = reqwest::Client::new();
    eventually("the projector to retry", Duration::from_secs(60), || async {
        let text = http.get(memos.url("/metrics")).send().await?.text().await?;
        let retries = metrics_text::sum(
            &text,
            "memos_projector_retries_total",
            &[("projection", "memory"), ("step", "apply")],
        );
        Ok(retries.is_some_and(|r| r > 0.0).then_some(()))
    })
    .await?;
    env.set_database_available(true).await?;
    for i in 0..50 {
        let ns = format!("agent-{}", i % 5);
        produce(
            &producer,
            &topic,
            Some(ns.as_bytes()),
            Some(&framed(w, &write(&ns, &format!("after {i}")))?),
        )
        .await?;
        sent += 1;
    }

    until_caught_up(&env, "memory", &topic).await?;
    assert_eq!(count(&env.pool, "SELECT count(*) FROM memories").await?, sent);
    assert_eq!(
        count(
            &env.pool,
            "SELECT count(*) FROM memory_commands WHERE status = 'applied'"
        )
        .await?,
        sent
    );
    assert_eq!(
        count(
            &env.pool,
            "SELECT count(*) FROM (SELECT memory_id FROM memory_history GROUP BY memory_id HAVING count(*) > 1) d"
        )
        .await?,
        0,
        "each command applied exactly once"
    );
    let letters = read_topic(&env, &env.dead_letter_topic, 1)?;
    assert!(!letters.is_empty());
    assert!(
        letters.iter().all(|l| Some(l.origin()) == bad),
        "only the refused record is dead-lettered, none of the outage's: {letters:?}"
    );
    assert_refused(&letters[0]);
    alive(&memos).await?;
    env.cleanup().await;
    Ok(())
}
