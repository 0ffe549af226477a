//! `memosctl dlq` against the real stack: `list` and `show` see the letters the projector
//! wrote and change nothing; `redrive` skips what still does not decode unless forced, and a
//! letter that decodes today goes back to its origin topic and becomes readable, once.

use std::time::Duration;

use memos_integration_tests::{MemosProcess, TestEnv, eventually, process};
use memos_schemas::{MemoryCommand, Tier, WriteMemory};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Runs `memosctl` for `env`; fails with its stderr unless it exits with 0.
fn memosctl(env: &TestEnv, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(process::binary("memosctl")?)
        .args(args)
        .envs(env.process_env())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "memosctl {args:?} exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

fn dlq_list(env: &TestEnv) -> anyhow::Result<Vec<Value>> {
    memosctl(env, &["dlq", "list", "--json"])?
        .lines()
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}

fn total(watermarks: &[(i32, i64)]) -> i64 {
    watermarks.iter().map(|(_, high)| high).sum()
}

/// `redriven P:O -> TOPIC P:O (...)` lines of a redrive's output: the new positions.
fn redriven_positions(output: &str) -> Vec<(String, i32, i64)> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("redriven ")?;
            let (letter, rest) = rest.split_once(" -> ")?;
            let mut words = rest.split_whitespace().skip(1);
            let (partition, offset) = words.next()?.split_once(':')?;
            Some((letter.to_owned(), partition.parse().ok()?, offset.parse().ok()?))
        })
        .collect()
}

/// The headers of the record at `partition:offset` of `topic`.
fn record_headers(
    env: &TestEnv,
    topic: &str,
    partition: i32,
    offset: i64,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut config = env.kafka_config();
    config
        .set("group.id", format!("{}-dlq-cli-reader", env.group_id))
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            anyhow::ensure!(message.offset() == offset, "no record at {partition}:{offset}");
            return Ok(message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                            (h.key.to_owned(), value.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default());
        }
    }
    anyhow::bail!("record {topic} {partition}:{offset} not read within 30s")
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn write_memory(namespace: &str, metadata_json: &str, traceparent: Option<&str>) -> WriteMemory {
    WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: namespace.into(),
        actor: namespace.into(),
        issued_at: 1_790_000_000_000,
        traceparent: traceparent.map(str::to_owned),
        memory_id: uuid::Uuid::new_v4().to_string(),
        content: "redriven from the dead-letter topic".into(),
        tier: Tier::Episodic,
        tags: vec!["dlq".into()],
        metadata_json: metadata_json.into(),
        importance: 0.5,
        expires_at: None,
        embedding: None,
        source: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_cli_lists_shows_and_redrives_dead_letters() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let producer: FutureProducer = env.kafka_config().create()?;
    let agent = "agent-x";
    let send = |topic: String, key: String, payload: Vec<u8>, headers: OwnedHeaders| {
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        }
    };

    // Two records the projector dead-letters: garbage, and a command that breaks a limit
    // (`encode` does not validate, `decode` does).
    let garbage_payload = b"definitely not avro".to_vec();
    let garbage = send(
        env.commands_topic.clone(),
        agent.into(),
        garbage_payload.clone(),
        OwnedHeaders::new(),
    )
    .await?;
    let invalid_command = MemoryCommand::Write(write_memory(agent, "[1]", None));
    let invalid = send(
        env.commands_topic.clone(),
        agent.into(),
        invalid_command.encode()?,
        OwnedHeaders::new(),
    )
    .await?;

    let letters = eventually(
        "both records listed as dead letters",
        Duration::from_secs(60),
        || async {
            let rows = dlq_list(&env)?;
            Ok((rows.len() >= 2).then_some(rows))
        },
    )
    .await?;
    assert_eq!(letters.len(), 2, "{letters:#?}");
    let find = |origin_offset: i64| {
        letters
            .iter()
            .find(|r| r["origin_offset"].as_i64() == Some(origin_offset))
            .cloned()
            .unwrap_or_else(|| panic!("no letter of origin offset {origin_offset}: {letters:#?}"))
    };
    let garbage_row = find(garbage.offset);
    let invalid_row = find(invalid.offset);
    for (row, class, delivered) in [
        (&garbage_row, "not_avro", &garbage),
        (&invalid_row, "invalid", &invalid),
    ] {
        assert_eq!(row["error_class"], class, "{row}");
        assert_eq!(row["origin_topic"], env.commands_topic.as_str(), "{row}");
        assert_eq!(
            row["origin_partition"].as_i64(),
            Some(i64::from(delivered.partition)),
            "{row}"
        );
        assert_eq!(row["key"], agent, "{row}");
        assert_eq!(
            row["id"].as_str().unwrap(),
            format!("{}:{}", row["partition"], row["offset"])
        );
    }
    assert_eq!(
        garbage_row["payload_bytes"].as_u64(),
        Some(garbage_payload.len() as u64)
    );
    assert!(
        invalid_row["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("metadata")),
        "{invalid_row}"
    );
    let filtered = memosctl(&env, &["dlq", "list", "--json", "--class", "invalid"])?;
    assert_eq!(filtered.lines().count(), 1, "{filtered}");
    let table = memosctl(&env, &["dlq", "list"])?;
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");

    // show: the garbage letter's headers, payload, and why it still does not decode.
    let garbage_id = garbage_row["id"].as_str().unwrap().to_owned();
    let shown: Value = serde_json::from_str(&memosctl(&env, &["dlq", "show", &garbage_id, "--json"])?)?;
    let headers = &shown["headers"];
    assert_eq!(
        headers["memos-dlq-origin-topic"],
        env.commands_topic.as_str(),
        "{shown:#}"
    );
    assert_eq!(
        headers["memos-dlq-origin-offset"],
        garbage.offset.to_string(),
        "{shown:#}"
    );
    assert_eq!(
        headers["memos-dlq-origin-partition"],
        garbage.partition.to_string(),
        "{shown:#}"
    );
    assert_eq!(headers["memos-dlq-error-class"], "not_avro", "{shown:#}");
    assert!(headers["memos-dlq-time"].is_string(), "{shown:#}");
    assert_eq!(shown["key"], agent);
    let hex: String = garbage_payload.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(shown["payload_hex"], hex.as_str());
    assert_eq!(shown["decoded"], Value::Null);
    assert_eq!(shown["decode_error"]["class"], "not_avro");
    let text = memosctl(&env, &["dlq", "show", &garbage_id])?;
    assert!(text.contains("6e 6f 74 20 61  |definitely not a|"), "{text}");
    assert!(text.contains("decodes now  no: not_avro"), "{text}");

    // Bad ids fail with a clear message and status 1.
    let bad = std::process::Command::new(process::binary("memosctl")?)
        .args(["dlq", "show", "zero:one"])
        .envs(env.process_env())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("expected PARTITION:OFFSET"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let missing = std::process::Command::new(process::binary("memosctl")?)
        .args(["dlq", "redrive", "0:1000000"])
        .envs(env.process_env())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no dead letter 0:1000000"));

    // A dry run sends nothing, even forced.
    let commands_before = env.high_watermarks(&env.commands_topic)?;
    let dlq_before = env.high_watermarks(&env.dead_letter_topic)?;
    let dry = memosctl(&env, &["dlq", "redrive", "--all", "--dry-run", "--force"])?;
    assert!(dry.contains("dry run: would redrive 2, skipped 0"), "{dry}");
    // Without --force, records that still fail to decode are skipped.
    let skipped = memosctl(&env, &["dlq", "redrive", "--all"])?;
    assert!(skipped.contains("redriven 0, skipped 2"), "{skipped}");
    assert!(skipped.contains("still does not decode (not_avro"), "{skipped}");
    assert!(skipped.contains("still does not decode (invalid"), "{skipped}");
    assert_eq!(env.high_watermarks(&env.commands_topic)?, commands_before);
    // Listing and showing changed nothing either.
    assert_eq!(env.high_watermarks(&env.dead_letter_topic)?, dlq_before);

    // Forced, both go back to the commands topic, in origin order, and dead-letter again.
    let forced = memosctl(&env, &["dlq", "redrive", "--all", "--force"])?;
    assert!(forced.contains("redriven 2, skipped 0"), "{forced}");
    assert_eq!(
        total(&env.high_watermarks(&env.commands_topic)?),
        total(&commands_before) + 2
    );
    let positions = redriven_positions(&forced);
    assert_eq!(positions.len(), 2, "{forced}");
    assert_eq!(positions[0].0, garbage_id, "origin order: {forced}");
    assert!(positions[0].2 < positions[1].2, "{forced}");
    let copy = record_headers(&env, &env.commands_topic, positions[0].1, positions[0].2)?;
    assert_eq!(
        header(&copy, "memos-redrive-of"),
        Some(format!("{}/{garbage_id}", env.dead_letter_topic).as_str()),
        "{copy:?}"
    );
    let again = eventually(
        "the redriven records to dead-letter again",
        Duration::from_secs(60),
        || async {
            let rows = dlq_list(&env)?;
            Ok((rows.len() >= 4).then_some(rows))
        },
    )
    .await?;
    assert_eq!(again.len(), 4, "{again:#?}");
    for (_, partition, offset) in &positions {
        assert!(
            again
                .iter()
                .any(|r| r["origin_partition"].as_i64() == Some(i64::from(*partition))
                    && r["origin_offset"].as_i64() == Some(*offset)),
            "no new letter for {partition}:{offset}: {again:#?}"
        );
    }
    assert_eq!(
        memosctl(&env, &["dlq", "list", "--json", "--limit", "1"])?
            .lines()
            .count(),
        1
    );

    // A letter that decodes today (as if dead-lettered by an older, buggy build) is redriven
    // by id and becomes readable.
    let healthy = MemoryCommand::Write(write_memory("agent-y", r#"{"from":"dlq"}"#, None));
    let MemoryCommand::Write(write) = &healthy else {
        unreachable!()
    };
    let memory_id = write.memory_id.clone();
    let command_id = write.command_id.clone();
    let dlq_headers = [
        ("memos-dlq-origin-topic", env.commands_topic.as_str()),
        ("memos-dlq-origin-partition", "0"),
        ("memos-dlq-origin-offset", "4242"),
        ("memos-dlq-error-class", "unknown_schema"),
        (
            "memos-dlq-error-message",
            "simulated: a build that lacked the schema",
        ),
        ("memos-dlq-time", "2026-01-01T00:00:00+00:00"),
        ("traceparent", TRACEPARENT),
    ]
    .iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        })
    });
    let letter = send(
        env.dead_letter_topic.clone(),
        "agent-y".into(),
        healthy.encode()?,
        dlq_headers,
    )
    .await?;
    let letter_id = format!("{}:{}", letter.partition, letter.offset);
    let shown: Value = serde_json::from_str(&memosctl(&env, &["dlq", "show", &letter_id, "--json"])?)?;
    assert_eq!(
        shown["decoded"]["schema"], "memos.memory.WriteMemory",
        "{shown:#}"
    );
    assert_eq!(shown["decoded"]["command"]["memory_id"], memory_id.as_str());
    assert_eq!(shown["decode_error"], Value::Null);

    let http = reqwest::Client::new();
    let mut applied_at = Vec::new();
    for attempt in 0..2 {
        let output = memosctl(&env, &["dlq", "redrive", &letter_id])?;
        assert!(output.contains("redriven 1, skipped 0"), "{output}");
        let positions = redriven_positions(&output);
        let (_, partition, offset) = positions[0].clone();
        let copy = record_headers(&env, &env.commands_topic, partition, offset)?;
        assert_eq!(
            header(&copy, "memos-redrive-of"),
            Some(format!("{}/{letter_id}", env.dead_letter_topic).as_str())
        );
        assert_eq!(header(&copy, "traceparent"), Some(TRACEPARENT));
        // Read-your-writes on the copy's position: the projector has decided on it.
        let memory: Value = eventually(
            "the redriven memory to be readable",
            Duration::from_secs(30),
            || {
                let request = http
                    .get(memos.url(&format!("/v1/memories/{memory_id}")))
                    .header("x-memos-position", format!("{partition}:{offset}"));
                async move {
                    let response = request.send().await?;
                    Ok((response.status() == 200).then_some(response.json::<Value>().await?))
                }
            },
        )
        .await?;
        assert_eq!(
            memory["content"], "redriven from the dead-letter topic",
            "attempt {attempt}"
        );
        assert_eq!(memory["namespace"], "agent-y");
        assert_eq!(memory["version"], 1, "redriving twice applies once: {memory}");
        applied_at.push((partition, offset));
    }
    // The command was applied once, from the first copy, with the letter's trace context.
    let (log_offset, traceparent): (i64, Option<String>) =
        sqlx::query_as("SELECT log_offset, traceparent FROM memory_commands WHERE command_id = $1::uuid")
            .bind(&command_id)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(log_offset, applied_at[0].1);
    assert_eq!(traceparent.as_deref(), Some(TRACEPARENT));
    let (history,): (i64,) = sqlx::query_as("SELECT count(*) FROM memory_history WHERE memory_id = $1::uuid")
        .bind(&memory_id)
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(history, 1);

    drop(memos);
    env.cleanup().await;
    Ok(())
}
