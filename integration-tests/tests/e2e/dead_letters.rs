//! Records the projector cannot apply go to the dead-letter topic with their origin and
//! reason, and the records after them are applied.

use std::time::Duration;

use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn header(message: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_dead_lettered_and_the_partition_flows_on() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let producer: FutureProducer = env.kafka_config().create()?;
    let agent = "agent-dlq";
    let send = |payload: Vec<u8>| {
        let producer = producer.clone();
        let topic = env.commands_topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(agent).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        }
    };
    // Same key, so the same partition, ahead of a valid command.
    let garbage = send(b"this is not avro".to_vec()).await?;
    let unknown_schema = send(memos_schemas::single_object::encode(0xdead_beef, b"\x02\x04")).await?;

    let http = reqwest::Client::new();
    let accepted: Value = http
        .post(memos.url("/v1/memories"))
        .json(&json!({"agent_id": agent, "content": "after the bad records"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(accepted["partition"].as_i64(), Some(i64::from(garbage.partition)));
    let memory_id = accepted["memory_id"].as_str().unwrap().to_owned();
    eventually("the valid record to be applied", Duration::from_secs(30), || {
        let url = memos.url(&format!("/v1/memories/{memory_id}"));
        let http = http.clone();
        async move { Ok((http.get(url).send().await?.status() == 200).then_some(())) }
    })
    .await?;

    let mut consumer_config = env.kafka_config();
    consumer_config
        .set("group.id", format!("{}-dlq-reader", env.group_id))
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = consumer_config.create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < 2 && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            letters.push((
                message.payload().map(<[u8]>::to_vec),
                message.key().map(<[u8]>::to_vec),
                header(&message, "memos-dlq-origin-topic"),
                header(&message, "memos-dlq-origin-offset").and_then(|o| o.parse::<i64>().ok()),
                header(&message, "memos-dlq-error-class"),
                header(&message, "memos-dlq-error-message"),
                header(&message, "memos-dlq-time"),
            ));
        }
    }
    letters.sort_by_key(|l| l.3);
    assert_eq!(letters.len(), 2, "both bad records dead-lettered");
    let (payload, key, origin, offset, class, message, time) = &letters[0];
    assert_eq!(payload.as_deref(), Some(&b"this is not avro"[..]));
    assert_eq!(key.as_deref(), Some(agent.as_bytes()));
    assert_eq!(origin.as_deref(), Some(env.commands_topic.as_str()));
    assert_eq!(*offset, Some(garbage.offset));
    assert_eq!(class.as_deref(), Some("not_avro"));
    assert!(
        message.as_deref().is_some_and(|m| m.contains("single-object")),
        "{message:?}"
    );
    assert!(time.is_some());
    assert_eq!(letters[1].3, Some(unknown_schema.offset));
    assert_eq!(letters[1].4.as_deref(), Some("unknown_schema"));

    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM memories")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(rows, 1);
    env.cleanup().await;
    Ok(())
}

fn sample_write(agent: &str, content: &str) -> memos_schemas::WriteMemory {
    memos_schemas::WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: agent.into(),
        actor: agent.into(),
        issued_at: 1_790_000_000_000,
        traceparent: None,
        memory_id: uuid::Uuid::new_v4().to_string(),
        content: content.into(),
        tier: memos_schemas::Tier::Episodic,
        tags: vec!["legacy".into()],
        metadata_json: r#"{"from":"v1"}"#.into(),
        importance: 0.25,
        expires_at: None,
        embedding: None,
        source: None,
    }
}

/// Every class of bad input (not Avro, unknown fingerprint, malformed body, fails
/// validation, no value) is dead-lettered with its class, and the partition keeps flowing;
/// a record written with the released version 1 of the schema still projects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_class_is_dead_lettered_and_old_schema_records_project() -> anyhow::Result<()> {
    use apache_avro::types::Value as Avro;

    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let producer: FutureProducer = env.kafka_config().create()?;
    let agent = "agent-classes";
    let send = |payload: Option<Vec<u8>>| {
        let producer = producer.clone();
        let topic = env.commands_topic.clone();
        async move {
            let mut record = FutureRecord::<str, [u8]>::to(&topic).key(agent);
            if let Some(payload) = &payload {
                record = record.payload(payload);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| e)
        }
    };
    let valid = memos_schemas::MemoryCommand::Write(sample_write(agent, "valid")).encode()?;
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 5);
    let mut invalid = sample_write(agent, "bad metadata");
    invalid.metadata_json = "[1, 2]".into();
    let invalid = memos_schemas::MemoryCommand::Write(invalid).encode()?;
    let mut expected = vec![
        (send(Some(b"{\"json\": true}".to_vec())).await?.offset, "not_avro"),
        (
            send(Some(memos_schemas::single_object::encode(7, b"\x00")))
                .await?
                .offset,
            "unknown_schema",
        ),
        (send(Some(truncated)).await?.offset, "malformed"),
        (send(Some(invalid)).await?.offset, "invalid"),
        (send(None).await?.offset, "empty"),
    ];
    expected.sort();

    // A producer still on version 1 of WriteMemory (no `source` field).
    let v1 = apache_avro::Schema::parse_str(
        memos_schemas::registry::RELEASED
            .iter()
            .find(|r| r.kind == memos_schemas::registry::CommandKind::WriteMemory && r.version == 1)
            .unwrap()
            .json,
    )?;
    let legacy = sample_write(agent, "written by an old producer");
    let Avro::Record(fields) = apache_avro::to_value(&legacy)? else {
        unreachable!()
    };
    let fields = fields.into_iter().filter(|(name, _)| name != "source").collect();
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&v1)
        .build()?
        .write_value_to_vec(Avro::Record(fields))?;
    let framed =
        memos_schemas::single_object::encode(memos_schemas::fingerprint::schema_fingerprint(&v1), &body);
    let legacy_offset = send(Some(framed)).await?.offset;

    let http = reqwest::Client::new();
    let memory: Value = eventually(
        "the version-1 record to be projected",
        Duration::from_secs(30),
        || {
            let url = memos.url(&format!("/v1/memories/{}", legacy.memory_id));
            let http = http.clone();
            async move {
                let response = http.get(url).send().await?;
                Ok((response.status() == 200).then_some(response.json::<Value>().await?))
            }
        },
    )
    .await?;
    assert_eq!(memory["content"], "written by an old producer");
    assert_eq!(memory["tier"], "episodic");
    assert_eq!(memory["metadata"], json!({"from": "v1"}));
    assert_eq!(memory["source"], Value::Null);
    assert_eq!(memory["log_offset"], legacy_offset);

    let mut consumer_config = env.kafka_config();
    consumer_config
        .set("group.id", format!("{}-classes", env.group_id))
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = consumer_config.create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while letters.len() < expected.len() && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            let offset = header(&message, "memos-dlq-origin-offset").and_then(|o| o.parse::<i64>().ok());
            let class = header(&message, "memos-dlq-error-class").unwrap_or_default();
            letters.push((offset.unwrap_or(-1), class));
        }
    }
    letters.sort();
    let expected: Vec<(i64, String)> = expected.into_iter().map(|(o, c)| (o, c.to_owned())).collect();
    assert_eq!(letters, expected);
    env.cleanup().await;
    Ok(())
}
