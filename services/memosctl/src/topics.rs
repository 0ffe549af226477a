//! `memosctl topics check`: the command topics are the system of record, so they must keep
//! every record forever. For each command topic (the configured ones, plus any named with
//! `--topic`) it reads the broker's effective configuration and warns when history could be
//! lost: `cleanup.policy` other than exactly `delete` (compaction keeps only the last record
//! per key, which is a namespace here), a finite `retention.ms`, or a finite
//! `retention.bytes`. Exit status 0 when every topic is safe, 1 otherwise (and when a topic
//! does not exist or the broker cannot be asked). Read-only.
//!
//! `memosctl topics create`: creates the memOS topics that do not exist yet and applies the
//! enforced settings to those that do (`max.message.bytes` on every topic, the dead-letter
//! topic's large enough for a copy of any command; `message.timestamp.type=LogAppendTime`
//! on the command topics), exactly as `memos` does at start
//! ([`memos_kafka::admin::ensure_topics`]). Retention of existing topics is never changed.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use memos_runtime::Config;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde::Serialize;

#[derive(Subcommand)]
pub enum TopicsCommand {
    /// Creates missing topics; applies size limits and broker record time to existing ones.
    Create,
    /// Warns (exit 1) when a command topic's retention or cleanup policy would lose history.
    Check {
        /// Also check this topic (repeatable).
        #[arg(long = "topic", value_name = "TOPIC")]
        topics: Vec<String>,
        /// One JSON object per topic instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The topics that hold commands (kept forever).
fn command_topics(config: &Config) -> Vec<String> {
    vec![config.topics.memory_commands.clone()]
}

#[derive(Debug, Serialize)]
struct Verdict {
    topic: String,
    cleanup_policy: Option<String>,
    retention_ms: Option<String>,
    retention_bytes: Option<String>,
    problems: Vec<String>,
}

/// What is wrong with a command topic's settings; empty when it keeps everything forever.
fn problems(
    cleanup_policy: Option<&str>,
    retention_ms: Option<&str>,
    retention_bytes: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    match cleanup_policy.map(str::trim) {
        Some("delete") => {}
        Some(policy) if policy.contains("compact") => out.push(format!(
            "cleanup.policy is {policy:?}: compaction keeps only the newest record per key and loses history; use \"delete\" with infinite retention"
        )),
        Some(policy) => out.push(format!("cleanup.policy is {policy:?}; expected \"delete\"")),
        None => out.push("cleanup.policy is not reported by the broker".into()),
    }
    let infinite = |v: Option<&str>| {
        v.and_then(|v| v.trim().parse::<i64>().ok())
            .is_some_and(|v| v < 0)
    };
    if !infinite(retention_ms) {
        out.push(format!(
            "retention.ms is {}: records older than that are deleted; set -1",
            retention_ms.unwrap_or("unknown")
        ));
    }
    if !infinite(retention_bytes) {
        out.push(format!(
            "retention.bytes is {}: old segments are deleted past that size; set -1",
            retention_bytes.unwrap_or("unknown")
        ));
    }
    out
}

pub async fn run(config: &Config, command: TopicsCommand) -> anyhow::Result<()> {
    let (extra, json) = match command {
        TopicsCommand::Create => {
            let specs = memos_kafka::admin::all_topics(&config.topics);
            memos_kafka::admin::ensure_topics(&config.kafka, &specs)
                .await
                .context("E_KAFKA: cannot create or configure the topics")?;
            for spec in &specs {
                let settings: Vec<String> = spec
                    .config
                    .iter()
                    .filter(|(k, _)| spec.enforced.contains(k))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("ok    {}: {}", spec.name, settings.join(" "));
            }
            return Ok(());
        }
        TopicsCommand::Check { topics, json } => (topics, json),
    };
    let mut topics = command_topics(config);
    for topic in extra {
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    let admin: AdminClient<DefaultClientContext> =
        memos_kafka::client::base_config(&config.kafka, "memosctl")
            .create()
            .context("E_KAFKA: cannot create the admin client")?;
    let specifiers: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .describe_configs(&specifiers, &options)
        .await
        .context("E_KAFKA: cannot describe the topics' configuration")?;
    let mut verdicts = Vec::new();
    for (topic, result) in topics.iter().zip(results) {
        let verdict = match result {
            Ok(resource) => {
                let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
                let (policy, ms, bytes) = (
                    value("cleanup.policy"),
                    value("retention.ms"),
                    value("retention.bytes"),
                );
                Verdict {
                    topic: topic.clone(),
                    problems: problems(policy.as_deref(), ms.as_deref(), bytes.as_deref()),
                    cleanup_policy: policy,
                    retention_ms: ms,
                    retention_bytes: bytes,
                }
            }
            Err(code) => Verdict {
                topic: topic.clone(),
                cleanup_policy: None,
                retention_ms: None,
                retention_bytes: None,
                problems: vec![format!("cannot describe the topic: {code} (does it exist?)")],
            },
        };
        verdicts.push(verdict);
    }
    let unsafe_topics = verdicts.iter().filter(|v| !v.problems.is_empty()).count();
    for v in &verdicts {
        if json {
            println!("{}", serde_json::to_string(v)?);
            continue;
        }
        if v.problems.is_empty() {
            println!(
                "ok    {}: cleanup.policy=delete retention.ms={} retention.bytes={} (kept forever)",
                v.topic,
                v.retention_ms.as_deref().unwrap_or("?"),
                v.retention_bytes.as_deref().unwrap_or("?")
            );
        } else {
            println!("WARN  {}: history can be lost", v.topic);
            for p in &v.problems {
                println!("      - {p}");
            }
        }
    }
    if unsafe_topics > 0 {
        anyhow::bail!("E_RETENTION: {unsafe_topics} command topic(s) would lose history");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::problems;

    #[test]
    fn only_delete_with_infinite_retention_is_safe() {
        assert!(problems(Some("delete"), Some("-1"), Some("-1")).is_empty());
        assert_eq!(problems(Some("compact"), Some("-1"), Some("-1")).len(), 1);
        assert_eq!(problems(Some("compact,delete"), Some("-1"), Some("-1")).len(), 1);
        assert_eq!(problems(Some("delete"), Some("604800000"), Some("-1")).len(), 1);
        assert_eq!(problems(Some("delete"), Some("-1"), Some("1073741824")).len(), 1);
        assert_eq!(problems(None, None, None).len(), 3);
    }
}
