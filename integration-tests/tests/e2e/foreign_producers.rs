//! Any Avro client that follows the spec can write: records framed by fastavro (Python) with
//! its own single-object framing, `C3 01` + the CRC-64-AVRO fingerprint fastavro computes +
//! fastavro's `schemaless_writer` body, produced by confluent-kafka, use no memOS code at all,
//! and are applied like the API's own. Records framed with the fingerprints memOS used before
//! it followed the spec, as the topics still hold them, are applied too.

use std::io::Write;
use std::process::{Command, Stdio};

use memos_integration_tests::api::Api;
use memos_integration_tests::{MemosProcess, TestEnv, stack};
use memos_schemas::registry::{CommandKind, LEGACY_FINGERPRINTS};
use serde_json::{Value, json};

/// Reads `{"brokers", "topic", "records": [{"schema": path, "key", "value", "fingerprint"?}]}`
/// on stdin, frames each value with fastavro (with the fingerprint fastavro computes, unless
/// the record names one) and produces it; prints one `{"partition", "offset", "fingerprint"}`
/// line per record, in order.
const PRODUCER: &str = r#"
import json, sys, io
from confluent_kafka import Producer
import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

request = json.load(sys.stdin)
producer = Producer({"bootstrap.servers": request["brokers"], "enable.idempotence": True})
delivered = []
def report(err, msg):
    if err is not None:
        raise SystemExit(f"delivery failed: {err}")
    delivered.append((msg.partition(), msg.offset()))
framed_with = []
for record in request["records"]:
    with open(record["schema"], encoding="utf-8") as f:
        raw = json.load(f)
    # Single-object encoding, as the Avro spec defines it: marker, 8-byte little-endian
    # fingerprint of the Parsing Canonical Form, then the binary body.
    fp = fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO")
    if "fingerprint" in record:
        fp = record["fingerprint"].to_bytes(8, "little").hex()
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(raw), record["value"])
    producer.produce(request["topic"], key=record["key"].encode(),
                     value=b"\xc3\x01" + bytes.fromhex(fp) + body.getvalue(), on_delivery=report)
    producer.flush(30)
    framed_with.append(int.from_bytes(bytes.fromhex(fp), "little"))
for (partition, offset), fp in zip(delivered, framed_with):
    print(json.dumps({"partition": partition, "offset": offset, "fingerprint": fp}))
"#;

/// Runs [`PRODUCER`] with fastavro and confluent-kafka from `.cache/python`.
fn produce_with_fastavro(env: &TestEnv, records: Vec<Value>) -> anyhow::Result<Vec<Value>> {
    let request = json!({"brokers": env.brokers, "topic": env.commands_topic, "records": records});
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PRODUCER)
        .env("PYTHONPATH", stack::repo_root().join(".cache/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(request.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "the fastavro producer failed (run scripts/python-deps): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)?
        .lines()
        .map(|line| Ok(serde_json::from_str(line)?))
        .collect()
}

fn schema_path(file: &str) -> String {
    stack::repo_root()
        .join("schemas/avro/memory")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_framed_by_fastavro_and_legacy_records_are_applied() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // The first memos process creates the test's topics.
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(memos.base_url.as_deref().unwrap());
    let agent = "agent-fastavro";
    let issued_at = chrono::Utc::now().timestamp_millis();
    let v2_id = uuid::Uuid::new_v4().to_string();
    let v2_command = uuid::Uuid::new_v4().to_string();
    let v2 = json!({
        "command_id": v2_command,
        "namespace": agent,
        "actor": agent,
        "issued_at": issued_at,
        "traceparent": null,
        "memory_id": v2_id,
        "content": "written by fastavro, no memOS code",
        "tier": "semantic",
        "tags": ["python", "fastavro"],
        "metadata_json": "{\"client\":\"fastavro\"}",
        "importance": 0.75,
        "expires_at": issued_at + 86_400_000,
        "embedding": [0.5, -1.0, 2.0],
        "source": "foreign-producer",
    });
    // A client still on version 1 (no `source`).
    let v1_id = uuid::Uuid::new_v4().to_string();
    let mut v1 = v2.clone();
    v1.as_object_mut().unwrap().remove("source");
    v1["command_id"] = json!(uuid::Uuid::new_v4().to_string());
    v1["memory_id"] = json!(v1_id);
    v1["content"] = json!("version 1, written by fastavro");
    // A record as memOS framed it before it followed the spec.
    let legacy_id = uuid::Uuid::new_v4().to_string();
    let mut legacy = v2.clone();
    legacy["command_id"] = json!(uuid::Uuid::new_v4().to_string());
    legacy["memory_id"] = json!(legacy_id);
    legacy["content"] = json!("framed with the legacy fingerprint");
    let legacy_fingerprint = LEGACY_FINGERPRINTS
        .iter()
        .find(|(kind, version, _)| *kind == CommandKind::WriteMemory && *version == 2)
        .unwrap()
        .2;
    let produced = produce_with_fastavro(
        &env,
        vec![
            json!({"schema": schema_path("WriteMemory.v2.avsc"), "key": agent, "value": v2}),
            json!({"schema": schema_path("WriteMemory.v1.avsc"), "key": agent, "value": v1}),
            json!({"schema": schema_path("WriteMemory.v2.avsc"), "key": agent, "value": legacy,
                   "fingerprint": legacy_fingerprint}),
        ],
    )?;
    assert_eq!(produced.len(), 3);
    assert_eq!(produced[2]["fingerprint"], json!(0xcc5f_21fc_11ee_d860u64));
    // fastavro framed with the spec's fingerprints (memOS's before the fix was 0xcc5f21fc11eed860).
    assert_eq!(produced[0]["fingerprint"], json!(0x72aa_f545_c174_1940u64));

    for (memory_id, record, content) in [
        (&v2_id, &produced[0], "written by fastavro, no memOS code"),
        (&v1_id, &produced[1], "version 1, written by fastavro"),
        (&legacy_id, &produced[2], "framed with the legacy fingerprint"),
    ] {
        // Read after the record's own position: once the projector is past it, the memory is
        // there, or the record was refused (a 404 here, not a timeout).
        let position = format!("{}:{}", record["partition"], record["offset"]);
        let memory = api
            .get(&format!("/v1/memories/{memory_id}"), Some(agent), Some(&position))
            .await?;
        assert_eq!(memory.status, 200, "{content}: {}", memory.body);
        assert_eq!(memory.body["content"], content);
        assert_eq!(memory.body["tier"], "semantic");
        assert_eq!(memory.body["tags"], json!(["python", "fastavro"]));
        assert_eq!(memory.body["metadata"], json!({"client": "fastavro"}));
        assert_eq!(memory.body["log_offset"], record["offset"]);
    }
    let status = api.decided(&v2_command).await?;
    assert_eq!(status["status"], "applied", "{status}");

    let (content, source, importance): (String, Option<String>, f64) =
        sqlx::query_as("SELECT content, source, importance FROM memories WHERE memory_id = $1::uuid")
            .bind(&v2_id)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(content, "written by fastavro, no memOS code");
    assert_eq!(source.as_deref(), Some("foreign-producer"));
    assert_eq!(importance, 0.75);
    let (v1_source,): (Option<String>,) =
        sqlx::query_as("SELECT source FROM memories WHERE memory_id = $1::uuid")
            .bind(&v1_id)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(v1_source, None);
    drop(memos);
    env.cleanup().await;
    Ok(())
}
