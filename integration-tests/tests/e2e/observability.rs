//! Metrics, lag and traces from the real processes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text, process};
use serde_json::{Value, json};
use sqlx::Connection;

async fn scrape(http: &reqwest::Client, memos: &MemosProcess) -> anyhow::Result<String> {
    Ok(http
        .get(memos.url("/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

async fn publish(
    http: &reqwest::Client,
    memos: &MemosProcess,
    n: usize,
    agent_prefix: &str,
) -> anyhow::Result<()> {
    for i in 0..n {
        let response = http
            .post(memos.url("/v1/memories"))
            .json(
                &json!({"agent_id": format!("{agent_prefix}-{}", i % 5), "content": format!("observed {i}")}),
            )
            .send()
            .await?;
        anyhow::ensure!(response.status() == 202, "publish {i}: {}", response.status());
    }
    Ok(())
}

/// The projector is paused on a locked table: lag must show exactly the records published
/// meanwhile, in `/metrics` and in `memosctl lag`; once it resumes, lag returns to zero and
/// throughput and freshness have been recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_exact_while_paused_and_throughput_and_freshness_are_exported() -> anyhow::Result<()> {
    const PUBLISHED: usize = 40;
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__TELEMETRY__LAG_INTERVAL", "100ms")]).await?;
    let http = reqwest::Client::new();
    let group = env.group_id.as_str();
    let lag = |text: &str| metrics_text::sum(text, "memos_consumer_lag_records", &[("group", group)]);

    // Pause: hold an exclusive lock on the view table the projector writes.
    let mut blocker = sqlx::PgConnection::connect(&env.database_url).await?;
    let mut lock = blocker.begin().await?;
    sqlx::query("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    publish(&http, &memos, PUBLISHED, "lag").await?;

    eventually(
        "lag to equal the records published while paused",
        Duration::from_secs(30),
        || async {
            let text = scrape(&http, &memos).await?;
            Ok((lag(&text) == Some(PUBLISHED as f64)).then_some(()))
        },
    )
    .await?;
    let output = std::process::Command::new(process::binary("memosctl")?)
        .args(["lag", "--json", "--group", group])
        .envs(env.process_env())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "memosctl lag: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let projection_lag: i64 = rows
        .iter()
        .filter(|r| r["source"] == "projection" && r["topic"] == env.commands_topic.as_str())
        .map(|r| r["lag"].as_i64().unwrap())
        .sum();
    assert_eq!(projection_lag, PUBLISHED as i64, "{rows:?}");

    lock.rollback().await?;
    let text = eventually(
        "lag back to zero after the pause",
        Duration::from_secs(60),
        || async {
            let text = scrape(&http, &memos).await?;
            Ok((lag(&text) == Some(0.0)).then_some(text))
        },
    )
    .await?;
    let consumed = metrics_text::sum(&text, "memos_consumer_records_total", &[("group", group)]);
    assert_eq!(consumed, Some(PUBLISHED as f64));
    let produced = metrics_text::sum(
        &text,
        "memos_producer_records_total",
        &[("topic", &env.commands_topic)],
    );
    assert_eq!(produced, Some(PUBLISHED as f64));
    let fresh = metrics_text::sum(&text, "memos_projector_freshness_seconds_count", &[]);
    assert_eq!(fresh, Some(PUBLISHED as f64));
    // They waited behind the lock, so their freshness is far above zero.
    let fresh_sum = metrics_text::sum(&text, "memos_projector_freshness_seconds_sum", &[]).unwrap();
    assert!(fresh_sum > 0.0, "{fresh_sum}");
    let applied =
        metrics_text::sum(&text, "memos_projector_commands_total", &[("outcome", "applied")]).unwrap_or(0.0);
    assert_eq!(applied, PUBLISHED as f64);
    let requests = metrics_text::sum(
        &text,
        "memos_http_requests_total",
        &[("route", "/v1/memories"), ("status", "202")],
    );
    assert_eq!(requests, Some(PUBLISHED as f64));
    env.cleanup().await;
    Ok(())
}

/// A minimal OTLP/HTTP (JSON) receiver: every span posted to `/v1/traces`.
async fn otlp_receiver() -> anyhow::Result<(String, Arc<Mutex<Vec<Value>>>)> {
    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                if let Ok(request) = serde_json::from_slice::<Value>(&body) {
                    let mut sink = sink.lock().unwrap();
                    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                            sink.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                        }
                    }
                }
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), spans))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_http_request_through_kafka_to_the_view() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (endpoint, spans) = otlp_receiver().await?;
    let memos = MemosProcess::start(
        &env,
        "all",
        &[
            ("MEMOS__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("MEMOS__TELEMETRY__OTLP_PROTOCOL", "http_json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await?;
    let http = reqwest::Client::new();
    let caller_trace = "0af7651916cd43dd8448eb211c80319c";
    let accepted: Value = http
        .post(memos.url("/v1/memories"))
        .header("traceparent", format!("00-{caller_trace}-b7ad6b7169203331-01"))
        .json(&json!({"agent_id": "traced", "content": "follow me"}))
        .send()
        .await?
        .json()
        .await?;

    let names: Vec<String> = eventually(
        "the HTTP and projector spans of one trace",
        Duration::from_secs(30),
        || async {
            let spans = spans.lock().unwrap().clone();
            let names: Vec<String> = spans
                .iter()
                .filter(|s| {
                    s["traceId"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case(caller_trace))
                })
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect();
            let complete = names.iter().any(|n| n == "POST /v1/memories")
                && names.iter().any(|n| n == "memos.projector.apply");
            Ok(complete.then_some(names))
        },
    )
    .await?;
    assert!(names.len() >= 2, "{names:?}");

    // The history row of the command carries the same trace.
    let (traceparent,): (Option<String>,) =
        sqlx::query_as("SELECT traceparent FROM memory_commands WHERE command_id = $1::uuid")
            .bind(accepted["command_id"].as_str().unwrap())
            .fetch_one(&env.pool)
            .await?;
    assert!(traceparent.is_some_and(|t| t.contains(caller_trace)));
    env.cleanup().await;
    Ok(())
}
