//! Dashboards and alerts checked against reality: a real Prometheus scrapes a real memos
//! process under load, then every dashboard expression must return series and every alert
//! rule must evaluate cleanly over metrics that exist. This is where such stacks usually fail:
//! panels whose queries name metrics nobody emits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use memos_integration_tests::stack::repo_root;
use memos_integration_tests::tasks::{EventLog, TaskClient};
use memos_integration_tests::{MemosProcess, TestEnv, eventually};
use memos_runtime::metrics::{CATALOGUE, Kind};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_prometheus(dir: &Path, target: &str, rule_files: &[PathBuf]) -> anyhow::Result<Prometheus> {
    let rules: Vec<String> = rule_files
        .iter()
        .map(|p| format!("  - {}", p.display()))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: memos\n    static_configs:\n      - targets: ['{target}']\n",
        rules.join("\n")
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let port = free_port()?;
    let log = dir.join("prometheus.log");
    let file = std::fs::File::create(&log)?;
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start prometheus ({e}); scripts/check-alerts installs it"))?;
    Ok(Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    })
}

async fn query(http: &reqwest::Client, prometheus: &Prometheus, expr: &str) -> anyhow::Result<Value> {
    let response: Value = http
        .get(format!("{}/api/v1/query", prometheus.url))
        .query(&[("query", expr)])
        .send()
        .await?
        .json()
        .await?;
    Ok(response)
}

fn has_series(response: &Value) -> bool {
    match response["data"]["resultType"].as_str() {
        Some("scalar") | Some("string") => true,
        _ => response["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
    }
}

/// Every Prometheus expression of every dashboard, Grafana variables substituted.
fn dashboard_expressions() -> anyhow::Result<Vec<(String, String)>> {
    fn walk(panels: &[Value], file: &str, out: &mut Vec<(String, String)>) {
        for panel in panels {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let datasource = target["datasource"]["uid"]
                    .as_str()
                    .or(panel["datasource"]["uid"].as_str());
                if datasource == Some("loki") {
                    continue;
                }
                if let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                    let title = panel["title"].as_str().unwrap_or("?");
                    out.push((format!("{file}: {title}"), expr.to_owned()));
                }
            }
            walk(
                panel["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                file,
                out,
            );
        }
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("dashboards"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            walk(
                dashboard["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                &file,
                &mut out,
            );
        }
    }
    Ok(out
        .into_iter()
        .map(|(name, expr)| {
            let expr = expr
                .replace("$__rate_interval", "20s")
                .replace("$__interval", "10s")
                .replace("$__range", "1m")
                .replace("$instance", ".*");
            (name, expr)
        })
        .collect())
}

fn rule_files() -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("alerts"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// (alert name, expression) of every alerting rule.
fn alert_expressions(files: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for file in files {
        let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(file)?)?;
        for group in rules["groups"].as_sequence().into_iter().flatten() {
            for rule in group["rules"].as_sequence().into_iter().flatten() {
                if let (Some(alert), Some(expr)) = (rule["alert"].as_str(), rule["expr"].as_str()) {
                    out.push((alert.to_owned(), expr.to_owned()));
                }
            }
        }
    }
    Ok(out)
}

/// Metric names an expression selects: `memos_*` and `up`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        if is_word(bytes[i]) && (i == 0 || !is_word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_word(bytes[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            if word.starts_with("memos_") || (word == "up" && expr[i..].trim_start().starts_with('{')) {
                names.push(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_finds_series_for_every_dashboard_panel_and_alert_rule() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let memos = MemosProcess::start(&env, "all", &[("MEMOS__TELEMETRY__LAG_INTERVAL", "200ms")]).await?;
    let http = reqwest::Client::new();
    let dir = std::env::temp_dir().join(format!("{}-prometheus", env.database));
    std::fs::create_dir_all(&dir)?;
    let files = rule_files()?;
    anyhow::ensure!(!files.is_empty(), "no rule files in alerts/");
    let target = memos
        .base_url
        .as_deref()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    let prometheus = start_prometheus(&dir, &target, &files)?;

    // Load: writes, reads (hits and a miss), a bad request and a record for the DLQ.
    let producer: FutureProducer = env.kafka_config().create()?;
    producer
        .send(
            FutureRecord::to(&env.commands_topic)
                .key("agent-0")
                .payload("not avro"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    // Task load: an agent, three tasks delegated, assigned and completed.
    let tasks = TaskClient::new(&env)?;
    tasks.register("metrics-agent", &["x"], 10).await?;
    for i in 0..3 {
        tasks.delegate(&format!("m-{i}"), "x", 2).await?;
    }
    let (mut log, topic) = (EventLog::new(&env)?, env.task_events_topic.clone());
    tokio::task::spawn_blocking(move || {
        log.read_until(&topic, "three assignments", Duration::from_secs(60), |e| {
            e.iter()
                .filter(|(_, _, e)| e.event_type == memos_schemas::task::TaskEventType::TaskAssigned)
                .count()
                >= 3
        })
    })
    .await??;
    for i in 0..3 {
        tasks
            .complete(&format!("m-{i}"), "metrics-agent", None, json!(i))
            .await?;
    }
    let mut ids = Vec::new();
    for round in 0..3 {
        for i in 0..20 {
            let accepted: Value = http
                .post(memos.url("/v1/memories"))
                .json(
                    &json!({"agent_id": format!("agent-{}", i % 4), "content": format!("load {round}-{i}")}),
                )
                .send()
                .await?
                .json()
                .await?;
            ids.push(accepted["memory_id"].as_str().unwrap().to_owned());
        }
        for id in ids.iter().rev().take(5) {
            http.get(memos.url(&format!("/v1/memories/{id}"))).send().await?;
        }
        http.get(memos.url("/v1/agents/agent-1/memories")).send().await?;
        http.get(memos.url(&format!("/v1/memories/{}", uuid::Uuid::new_v4())))
            .send()
            .await?;
        http.post(memos.url("/v1/memories")).body("{").send().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eventually(
        "Prometheus to have scraped memos several times",
        Duration::from_secs(60),
        || async {
            let response = query(&http, &prometheus, "count_over_time(up{job=\"memos\"}[1m])").await?;
            let samples = response["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            Ok(samples.filter(|n| *n >= 8.0).map(|_| ()))
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; prometheus log:\n{}",
            std::fs::read_to_string(&prometheus.log).unwrap_or_default()
        )
    })?;

    let mut failures = Vec::new();
    let dashboards = dashboard_expressions()?;
    anyhow::ensure!(
        dashboards.len() >= 10,
        "only {} dashboard expressions found",
        dashboards.len()
    );
    for (panel, expr) in &dashboards {
        let response = query(&http, &prometheus, expr).await?;
        if response["status"] != "success" {
            failures.push(format!(
                "{panel}: does not evaluate: {expr}: {}",
                response["error"]
            ));
        } else if !has_series(&response) {
            failures.push(format!("{panel}: no series: {expr}"));
        }
    }
    let alerts = alert_expressions(&files)?;
    anyhow::ensure!(alerts.len() >= 15, "only {} alerts", alerts.len());
    for (alert, expr) in &alerts {
        let response = query(&http, &prometheus, expr).await?;
        if response["status"] != "success" {
            failures.push(format!("alert {alert}: does not evaluate: {}", response["error"]));
        }
        for name in metric_names(expr) {
            let response = query(
                &http,
                &prometheus,
                &format!("{{__name__=\"{name}\",job=\"memos\"}}"),
            )
            .await?;
            if !has_series(&response) {
                failures.push(format!("alert {alert}: no series named {name}"));
            }
        }
    }
    for def in CATALOGUE {
        let name = if def.kind == Kind::Histogram {
            format!("{}_bucket", def.name)
        } else {
            def.name.to_owned()
        };
        let response = query(
            &http,
            &prometheus,
            &format!("{{__name__=\"{name}\",job=\"memos\"}}"),
        )
        .await?;
        if !has_series(&response) {
            failures.push(format!("catalogue metric {name} is not exported"));
        }
    }
    // Prometheus itself evaluated every rule without error.
    let rules: Value = http
        .get(format!("{}/api/v1/rules", prometheus.url))
        .send()
        .await?
        .json()
        .await?;
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            evaluated += 1;
            if rule["health"] != "ok" {
                failures.push(format!(
                    "rule {}: health {} {}",
                    rule["name"], rule["health"], rule["lastError"]
                ));
            }
        }
    }
    anyhow::ensure!(
        evaluated >= alerts.len(),
        "Prometheus loaded {evaluated} rules of {}",
        alerts.len()
    );
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
    env.cleanup().await;
    Ok(())
}

#[test]
fn metric_names_are_found_in_expressions() {
    assert_eq!(
        metric_names("sum(rate(memos_a_total{job=\"memos\"}[5m])) / up{job=\"memos\"} > memos_b"),
        vec!["memos_a_total", "memos_b", "up"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (le) (x))"),
        Vec::<String>::new()
    );
}
