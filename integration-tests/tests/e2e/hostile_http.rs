//! Hostile clients at the trust boundary: values the views cannot store, over HTTP and
//! straight to Kafka; slow and greedy clients; retries; positions and tokens that do not
//! exist. Each is refused with a clear error (naming the field) or dead-lettered with its
//! reason, and the valid inputs after it are applied.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use memos_integration_tests::api::{Answer, Api};
use memos_integration_tests::tasks::TaskClient;
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use memos_schemas::task::TaskCommand;
use memos_schemas::{MemoryCommand, Tier, WriteMemory};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

/// Longest a raw-socket read waits before the test calls it a hang; the server under test is
/// configured with bounds far below it.
const HANG: Duration = Duration::from_secs(30);

fn assert_refused(answer: &Answer, status: u16, field: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    let named = answer.body["field"].as_str().unwrap_or_default();
    assert!(
        named.starts_with(field),
        "{what}: field {named:?}, want {field:?}: {}",
        answer.body
    );
}

/// One request on a fresh connection: `head` (request line and headers, without the blank
/// line), then `body`. Returns the status code of the answer, or `None` when the server
/// closed the connection without one.
async fn raw_request(addr: String, head: String, body: Vec<u8>) -> anyhow::Result<Option<u16>> {
    tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(HANG))?;
        stream.write_all(head.as_bytes())?;
        if !head.ends_with("\r\n\r\n") && !body.is_empty() {
            anyhow::bail!("a body needs complete headers");
        }
        stream.write_all(&body)?;
        read_status(&mut stream)
    })
    .await?
}

/// Reads an answer's status line; `None` on a closed connection; an error when nothing came
/// within [`HANG`].
fn read_status(stream: &mut TcpStream) -> anyhow::Result<Option<u16>> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                seen.extend_from_slice(&buffer[..n]);
                if let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&seen[..end]).into_owned();
                    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
                    anyhow::ensure!(status.is_some(), "not an HTTP answer: {line}");
                    return Ok(status);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return Ok(None);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                anyhow::bail!("no answer within {HANG:?}: the server holds the connection");
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn host_port(memos: &MemosProcess) -> String {
    memos.url("").trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_views_cannot_store_are_refused_naming_the_field() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(&memos.url(""));
    let agent = "agent-hostile";
    let deep = |depth: usize| {
        serde_json::from_str::<Value>(&format!("{}1{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
    };
    let memory_cases = [
        (json!({"expires_at": "+200000-01-01T00:00:00Z"}), "expires_at"),
        (json!({"expires_at": "10000-01-01T00:00:00Z"}), "expires_at"),
        (json!({"content": "before\u{0}after"}), "content"),
        (json!({"tags": ["ok", "t\u{0}"]}), "tags"),
        (json!({"source": "\u{0}"}), "source"),
        (json!({"metadata": {"k": "v\u{0}"}}), "metadata.k"),
        (json!({"metadata": {"a": {"k\u{0}": 1}}}), "metadata.a"),
        (json!({"metadata": {"a": [0, [1, "\u{0}"]]}}), "metadata.a[1][1]"),
        (json!({"metadata": {"deep": deep(40)}}), "metadata"),
    ];
    for (extra, field) in memory_cases {
        let mut body = json!({"agent_id": agent, "content": "hostile"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let answer = api.post("/v1/memories", body.clone(), None).await?;
        assert_refused(&answer, 422, field, &body.to_string());
    }
    let answer = api
        .post(
            "/v1/memories",
            json!({"agent_id": agent, "content": "ok"}),
            Some("act\u{0}or"),
        )
        .await;
    // A header cannot carry NUL: the client itself refuses to send it.
    assert!(answer.is_err());

    let task_cases = [
        ("/v1/tasks", json!({"payload": {"x": "\u{0}"}}), "payload.x"),
        ("/v1/tasks", json!({"payload": deep(33)}), "payload"),
        ("/v1/tasks", json!({"task_id": "t\u{0}"}), "task_id"),
        (
            "/v1/tasks",
            json!({"required_capabilities": ["c\u{0}"]}),
            "required_capabilities",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "a1", "metadata": {"\u{0}": 1}}),
            "metadata",
        ),
        (
            "/v1/tasks/some-task/complete",
            json!({"agent_id": "a1", "result": ["\u{0}"]}),
            "result[0]",
        ),
        (
            "/v1/tasks/some-task/fail",
            json!({"agent_id": "a1", "error": "boom\u{0}"}),
            "error",
        ),
        (
            "/v1/workflows",
            json!({"template": "etl", "input": {"rows": "\u{0}"}}),
            "input.rows",
        ),
    ];
    for (path, body, field) in task_cases {
        let answer = api.post(path, body.clone(), None).await?;
        assert_refused(&answer, 422, field, &format!("{path} {body}"));
    }

    let step = |id: &str, deps: &[&str]| json!({"step_id": id, "capability": "c", "depends_on": deps});
    let templates = [
        (vec![step("a", &["b"]), step("b", &["a"])], "steps", "cycle"),
        (vec![step("a", &["a"])], "steps.depends_on", "itself"),
        (
            vec![step("a", &[]), step("b", &["zz"])],
            "steps.depends_on",
            "unknown",
        ),
        (vec![step("a", &[]), step("a", &[])], "steps.step_id", "twice"),
        (
            (0..65).map(|i| step(&format!("s{i}"), &[])).collect(),
            "steps",
            "between 1 and 64",
        ),
        (vec![], "steps", "between 1 and 64"),
        (vec![step("a\u{0}", &[])], "steps.step_id", "U+0000"),
    ];
    for (steps, field, message) in templates {
        let body = json!({"name": "hostile", "steps": steps});
        let answer = api.post("/v1/workflow-templates", body, None).await?;
        assert_refused(&answer, 422, field, message);
        let text = answer.body["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{text}");
    }
    // Nothing was appended, and the pipeline flows: a valid write after them is applied.
    let accepted = api
        .write(agent, "a valid memory after the hostile ones", json!({}))
        .await?;
    let decided = api.decided(accepted["command_id"].as_str().unwrap()).await?;
    assert_eq!(decided["status"], "applied", "{decided}");
    let appended: i64 = env
        .high_watermarks(&env.commands_topic)?
        .iter()
        .map(|(_, high)| high)
        .sum();
    assert_eq!(appended, 1, "only the valid command reached the log");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_parameters_with_nul_or_over_limits_are_400_naming_them() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "api", &[]).await?;
    let api = Api::new(&memos.url(""));
    let nul_json = "%7B%22k%22%3A%22%5Cu0000%22%7D"; // {"k":"\u0000"}
    let gets = [
        ("/v1/agents/a%00b/memories".to_owned(), "agent"),
        ("/v1/agents/a/memories?tags_any=x%00".to_owned(), "tags_any"),
        ("/v1/agents/a/memories?tags_all=x,%00".to_owned(), "tags_all"),
        (format!("/v1/agents/a/memories?metadata={nul_json}"), "metadata.k"),
        (
            "/v1/agents/a/memories?created_after=%2B200000-01-01T00:00:00Z".to_owned(),
            "created_after",
        ),
        (
            "/v1/agents/a/memories?as_of=%2B200000-01-01T00:00:00Z".to_owned(),
            "as_of",
        ),
        ("/v1/agents/a%00/recent".to_owned(), "agent"),
        ("/v1/tools?q=coffee%00".to_owned(), "q"),
        ("/v1/tools?tag=%00".to_owned(), "tag"),
        (format!("/v1/tools?q={}", vec!["word"; 4_000].join("+")), "q"),
        ("/v1/tasks/t%00".to_owned(), "id"),
        ("/v1/tasks?agent_id=a%00".to_owned(), "agent_id"),
        ("/v1/tasks?workflow_id=%00".to_owned(), "workflow_id"),
        ("/v1/agents/a%00/inbox".to_owned(), "agent"),
        ("/v1/workflows/w%00".to_owned(), "id"),
        ("/v1/workflow-templates/n%00".to_owned(), "name"),
        (
            format!("/v1/agents/a/memories?tags_any={}", "x".repeat(5000)),
            "tags_any",
        ),
    ];
    for (path, field) in gets {
        let answer = api.get(&path, None, None).await?;
        assert_refused(&answer, 400, field, &path[..path.len().min(80)]);
    }
    let forty_thousand_words = vec!["w"; 40_000].join(" ");
    let searches = [
        (json!({"agent_id": "a", "query": "dark\u{0}roast"}), "query"),
        (json!({"agent_id": "a", "query": forty_thousand_words}), "query"),
        (
            json!({"agent_id": "a", "query": vec!["w"; 33].join(" ")}),
            "query",
        ),
        (json!({"agent_id": "a\u{0}", "query": "coffee"}), "agent_id"),
    ];
    for (body, field) in searches {
        let answer = api.post("/v1/memories/search", body, None).await?;
        assert_refused(&answer, 400, field, field);
    }
    // Within the limits the same reads answer.
    let answer = api
        .post(
            "/v1/memories/search",
            json!({"agent_id": "a", "query": vec!["w"; 32].join(" ")}),
            None,
        )
        .await?;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(api.get("/v1/tools?q=coffee", None, None).await?.status, 200);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_get_an_answer_or_a_closed_connection() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__BODY_READ_TIMEOUT", "1s"),
            ("MEMOS__HTTP__HEADER_READ_TIMEOUT", "1s"),
        ],
    )
    .await?;
    let addr = host_port(&memos);
    let post = |length: usize| {
        format!(
            "POST /v1/memories HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        )
    };
    // Declares a body and sends 2 bytes of it: 408 once the body timeout passes, instead of
    // a task held for as long as the client likes (over the body limit or within it).
    for declared in [300_000, 100_000] {
        let status = raw_request(addr.clone(), post(declared), b"{\"".to_vec()).await?;
        assert_eq!(status, Some(408), "Content-Length: {declared}");
    }
    // Declares far more than the body limit: refused before any byte of it is read.
    let status = raw_request(addr.clone(), post(2_000_000), b"{\"".to_vec()).await?;
    assert_eq!(status, Some(413));
    // Sends a whole body over the limit: reads its 413 (never a reset).
    let mut body = br#"{"agent_id":"a","content":""#.to_vec();
    body.resize(300_000, b'x');
    body.extend_from_slice(br#""}"#);
    let status = raw_request(addr.clone(), post(body.len()), body).await?;
    assert_eq!(status, Some(413));
    // Never finishes its headers: the connection is closed.
    let partial = format!("POST /v1/memories HTTP/1.1\r\nHost: {addr}\r\nContent-Type: appl");
    let status = raw_request(addr.clone(), partial, Vec::new()).await?;
    assert!(matches!(status, None | Some(408)), "{status:?}");
    // And the server still serves.
    let api = Api::new(&memos.url(""));
    assert_eq!(api.get("/v1/tools", None, None).await?.status, 200);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_limits_are_answered_at_once() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__MAX_CONCURRENT_REQUESTS", "2"),
            ("MEMOS__HTTP__BODY_READ_TIMEOUT", "120s"),
            ("MEMOS__HTTP__REQUEST_TIMEOUT", "120s"),
        ],
    )
    .await?;
    let addr = host_port(&memos);
    let api = Api::new(&memos.url(""));
    // Three requests whose bodies never finish: two hold the permits, the third is shed with
    // an answer at once (which one is the server's order, not the test's).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(&addr)?;
        stream.write_all(
            format!(
                "POST /v1/tools HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: 10\r\n\r\n{{\""
            )
            .as_bytes(),
        )?;
        stream.set_nonblocking(true)?;
        streams.push((tokio::net::TcpStream::from_std(stream)?, Vec::new()));
    }
    // Waits on the sockets' readiness (no polling interval) until one holds the shed answer.
    let shed = tokio::time::timeout(HANG, async {
        loop {
            let ready = tokio::select! {
                r = streams[0].0.readable() => r.map(|()| 0),
                r = streams[1].0.readable() => r.map(|()| 1),
                r = streams[2].0.readable() => r.map(|()| 2),
            }?;
            let (stream, seen) = &mut streams[ready];
            let mut buffer = [0u8; 1024];
            match stream.try_read(&mut buffer) {
                Ok(0) => anyhow::bail!("a held request's connection closed without an answer"),
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if String::from_utf8_lossy(seen).contains("overloaded") {
                return Ok(ready);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no request was shed within {HANG:?}"))??;
    let (_, answer) = streams.remove(shed);
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    // A request that would complete is shed as well while the two are held.
    let response = api.http.get(memos.url("/v1/tools")).send().await?;
    assert_eq!(response.status(), 503);
    // Health and metrics are not limited.
    assert_eq!(api.http.get(memos.url("/healthz")).send().await?.status(), 200);
    // The held requests finish with an answer, and their permits come back.
    for (stream, seen) in streams {
        assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
        let mut stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(HANG))?;
        stream.write_all(b"x\":1234}")?;
        let status = tokio::task::spawn_blocking(move || read_status(&mut stream)).await??;
        assert_eq!(status, Some(422));
    }
    eventually("permits to come back", HANG, || async {
        Ok((api.get("/v1/tools", None, None).await?.status == 200).then_some(()))
    })
    .await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_request_timeout_is_answered_503() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__REQUEST_TIMEOUT", "1s"),
            ("MEMOS__MEMORY__READ_YOUR_WRITES_TIMEOUT", "120s"),
        ],
    )
    .await?;
    let api = Api::new(&memos.url(""));
    // A position no write reached yet: the read would wait for the views up to 120 s.
    let id = uuid::Uuid::now_v7();
    let answer = api
        .get(&format!("/v1/memories/{id}"), None, Some("0:1000000"))
        .await?;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.body["code"], "timeout");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_answers_one_memory_and_positions_name_real_partitions() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(&memos.url(""));
    let command_id = uuid::Uuid::now_v7().to_string();
    let body = json!({"agent_id": "agent-retry", "content": "once", "command_id": command_id});
    let mut memory_ids = std::collections::BTreeSet::new();
    let mut position = String::new();
    for _ in 0..10 {
        let answer = api.post("/v1/memories", body.clone(), None).await?;
        assert_eq!(answer.status, 202, "{}", answer.body);
        memory_ids.insert(answer.body["memory_id"].as_str().unwrap().to_owned());
        position = answer.body["position"].as_str().unwrap().to_owned();
    }
    assert_eq!(memory_ids.len(), 1, "{memory_ids:?}");
    let memory_id = memory_ids.pop_first().unwrap();
    let read = api
        .get(&format!("/v1/memories/{memory_id}"), None, Some(&position))
        .await?;
    assert_eq!(
        read.status, 200,
        "the memory every retry named exists: {}",
        read.body
    );
    assert_eq!(read.body["content"], "once");

    for bad in ["99999:0", "3:0", "-1:0", "0:1, 99999:0"] {
        let answer = api
            .get(&format!("/v1/memories/{memory_id}"), None, Some(bad))
            .await?;
        assert_refused(&answer, 400, "x-memos-position", bad);
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let key = memos_integration_tests::process::issue_key(&env, "tests", "service", &["--agent", "*"])?;
    let memos = MemosProcess::start(&env, "api", &[("MEMOS__HTTP__AUTH", "keys")]).await?;
    let http = reqwest::Client::new();
    let status = |value: String| {
        let request = http
            .get(memos.url("/v1/tools"))
            .header("authorization", value)
            .send();
        async move { Ok::<_, anyhow::Error>(request.await?.status().as_u16()) }
    };
    for scheme in ["Bearer ", "bearer ", "BEARER ", "bEaReR  "] {
        assert_eq!(status(format!("{scheme}{key}")).await?, 200, "{scheme}");
    }
    let mut wrong = key.clone().into_bytes();
    let last = wrong.len() - 1;
    wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong)?;
    for refused in [
        format!("Bearer {}", &key[..key.len() - 1]),
        format!("Bearer {key}2"),
        format!("Bearer {wrong}"),
        format!("Basic {key}"),
        "bearer".to_owned(),
        key.clone(),
    ] {
        assert_eq!(status(refused.clone()).await?, 401, "{refused}");
    }
    env.cleanup().await;
    Ok(())
}

fn header(message: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Dead letters of `origin`: (offset, class, message), until `count` are read.
fn dead_letters(env: &TestEnv, origin: &str, count: usize) -> anyhow::Result<Vec<(i64, String, String)>> {
    let mut config = env.kafka_config();
    config
        .set(
            "group.id",
            format!("{}-dlq-{}", env.group_id, uuid::Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[env.dead_letter_topic.as_str()])?;
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while letters.len() < count && std::time::Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            if header(&message, "memos-dlq-origin-topic").as_deref() == Some(origin) {
                letters.push((
                    header(&message, "memos-dlq-origin-offset")
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(-1),
                    header(&message, "memos-dlq-error-class").unwrap_or_default(),
                    header(&message, "memos-dlq-error-message").unwrap_or_default(),
                ));
            }
        }
    }
    letters.sort();
    Ok(letters)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_records_the_views_cannot_store_are_dead_lettered_naming_the_field() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[]).await?;
    let api = Api::new(&memos.url(""));
    let producer: FutureProducer = env.kafka_config().create()?;
    let agent = "agent-direct";
    let write = |content: &str| WriteMemory {
        command_id: uuid::Uuid::new_v4().to_string(),
        namespace: agent.into(),
        actor: agent.into(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        traceparent: None,
        memory_id: uuid::Uuid::new_v4().to_string(),
        content: content.into(),
        tier: Tier::Episodic,
        tags: vec![],
        metadata_json: "{}".into(),
        importance: 0.5,
        expires_at: None,
        embedding: None,
        source: None,
    };
    let far: chrono::DateTime<chrono::Utc> = "+200000-01-01T00:00:00Z".parse()?;
    let mut hostile = Vec::new();
    hostile.push(("content", write("before\u{0}after")));
    let mut w = write("far expiry");
    w.expires_at = Some(far.timestamp_millis());
    hostile.push(("expires_at", w));
    let mut w = write("nul metadata");
    w.metadata_json = r#"{"k":{"deep":"\u0000"}}"#.into();
    hostile.push(("metadata.k.deep", w));
    let mut w = write("nul tag");
    w.tags = vec!["t\u{0}".into()];
    hostile.push(("tags", w));
    let valid = write("the valid record after them");
    let mut offsets = Vec::new();
    for (_, command) in &hostile {
        let payload = MemoryCommand::Write(command.clone()).encode()?;
        let delivery = producer
            .send(
                FutureRecord::to(&env.commands_topic).key(agent).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        offsets.push(delivery.offset);
    }
    let payload = MemoryCommand::Write(valid.clone()).encode()?;
    producer
        .send(
            FutureRecord::to(&env.commands_topic).key(agent).payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    eventually(
        "the valid record to be applied",
        Duration::from_secs(60),
        || async {
            let answer = api
                .get(&format!("/v1/memories/{}", valid.memory_id), None, None)
                .await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;
    let letters = dead_letters(&env, &env.commands_topic, hostile.len())?;
    assert_eq!(letters.len(), hostile.len(), "{letters:?}");
    for ((offset, class, message), ((field, _), sent)) in letters.iter().zip(hostile.iter().zip(&offsets)) {
        assert_eq!(offset, sent);
        assert_eq!(class, "invalid", "{message}");
        assert!(message.starts_with(&format!("{field}: ")), "{field}: {message}");
    }

    // The task topic: a payload the views cannot store is rejected with the field named (the
    // rejection is stored, the payload is not); an id they cannot store is dead-lettered.
    let tasks = TaskClient::new(&env)?;
    let mut bad_payload = TaskClient::delegate_command("t-bad-payload", "cap", 1, 60_000);
    bad_payload.payload_json = r#"{"x":["\u0000"]}"#.into();
    tasks.send(&TaskCommand::Delegate(bad_payload)).await?;
    let bad_id = TaskClient::delegate_command("t-bad\u{0}id", "cap", 1, 60_000);
    let (_, bad_id_offset) = tasks.send(&TaskCommand::Delegate(bad_id)).await?;
    let mut far_issued = TaskClient::delegate_command("t-far", "cap", 1, 60_000);
    far_issued.issued_at = far.timestamp_millis();
    tasks.send(&TaskCommand::Delegate(far_issued)).await?;
    tasks.delegate("t-valid", "cap", 1).await?;
    eventually("the valid task in the views", Duration::from_secs(60), || async {
        Ok((api.get("/v1/tasks/t-valid", None, None).await?.status == 200).then_some(()))
    })
    .await?;
    for (task, field) in [("t-bad-payload", "payload.x[0]"), ("t-far", "issued_at")] {
        let answer = eventually("the rejection in the views", Duration::from_secs(60), || async {
            let answer = api.get(&format!("/v1/tasks/{task}"), None, None).await?;
            Ok(
                (answer.status == 404 && answer.body["message"].as_str().unwrap_or("").contains("rejected"))
                    .then_some(answer),
            )
        })
        .await?;
        let message = answer.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("invalid: {field}: ")), "{message}");
    }
    let letters = dead_letters(&env, &env.task_commands_topic, 1)?;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, bad_id_offset);
    assert_eq!(letters[0].1, "invalid");
    assert!(letters[0].2.starts_with("task_id: "), "{}", letters[0].2);
    env.cleanup().await;
    Ok(())
}
