//! `memosctl topics check`: the command topics are the system of record, so they must keep
//! every record forever. For each command topic (the configured ones, plus any named with
//! `--topic`) it reads the broker's effective configuration and warns when history could be
//! lost: `cleanup.policy` other than exactly `delete` (compaction keeps only the last record
//! per key, which is a namespace here), a finite `retention.ms`, or a finite
//! `retention.bytes`. It also warns when an acknowledged write could be held by a single
//! broker: a topic of three or more replicas whose `min.insync.replicas` is below 2 (the
//! producers write with `acks=all`, which waits for that many replicas, no more), and when
//! `min.insync.replicas` exceeds the replicas (every write is refused). The replication
//! factor is the smallest replica count of the topic's partitions, from the broker's
//! metadata. Exit status 0 when every topic is safe, 1 otherwise (and when a topic does not
//! exist or the broker cannot be asked). Read-only.
//!
//! `memosctl topics create`: creates the memOS topics that do not exist yet and applies the
//! enforced settings to those that do (`max.message.bytes` on every topic, the dead-letter
//! topic's large enough for a copy of any command; `message.timestamp.type=LogAppendTime`
//! on the command topics), exactly as `memos` does at start
//! ([`memos_kafka::admin::ensure_topics`]); created topics get `min.insync.replicas`
//! (`topics.min_insync_replicas`). Retention and `min.insync.replicas` of existing topics
//! are never changed.

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
    /// Warns (exit 1) when a command topic's retention or cleanup policy would lose history,
    /// or its replication lets a single broker acknowledge a write.
    Check {
        /// Also check this topic (repeatable).
        #[arg(long = "topic", value_name = "TOPIC")]
        topics: Vec<String>,
        /// One JSON object per topic instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The topics that hold commands (kept forever, written with `acks=all`).
fn command_topics(config: &Config) -> Vec<String> {
    vec![
        config.topics.memory_commands.clone(),
        config.topics.task_commands.clone(),
    ]
}

#[derive(Debug, Default, Serialize)]
struct Verdict {
    topic: String,
    cleanup_policy: Option<String>,
    retention_ms: Option<String>,
    retention_bytes: Option<String>,
    replication_factor: Option<i32>,
    min_insync_replicas: Option<String>,
    /// Everything wrong, retention first.
    problems: Vec<String>,
    #[serde(skip)]
    retention_problems: usize,
}

/// What is wrong with a command topic's replication; empty when an acknowledged write is
/// held by at least two brokers whenever the topic has three or more replicas.
fn replication_problems(replication_factor: Option<i32>, min_insync_replicas: Option<&str>) -> Vec<String> {
    let Some(replicas) = replication_factor else {
        return vec!["the replication factor is not reported by the broker".into()];
    };
    let Some(min) = min_insync_replicas.and_then(|v| v.trim().parse::<i32>().ok()) else {
        return vec![format!(
            "min.insync.replicas is {}",
            min_insync_replicas.unwrap_or("not reported by the broker")
        )];
    };
    let mut out = Vec::new();
    if replicas >= 3 && min < 2 {
        out.push(format!(
            "min.insync.replicas is {min} with {replicas} replicas: a write is acknowledged (acks=all) once a single broker holds it, and lost with that broker; set 2"
        ));
    }
    if min > replicas {
        out.push(format!(
            "min.insync.replicas is {min} with {replicas} replicas: every write is refused (NOT_ENOUGH_REPLICAS); set at most {replicas}"
        ));
    }
    out
}

/// The smallest replica count of `topic`'s partitions, from the broker's metadata.
fn replication_factor(admin: &AdminClient<DefaultClientContext>, topic: &str) -> anyhow::Result<Option<i32>> {
    let metadata =
        tokio::task::block_in_place(|| admin.inner().fetch_metadata(Some(topic), Duration::from_secs(15)))
            .context("E_KAFKA: cannot read the topics' metadata")?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().map(|p| p.replicas().len() as i32).min()))
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
                let (policy, ms, bytes, min_isr) = (
                    value("cleanup.policy"),
                    value("retention.ms"),
                    value("retention.bytes"),
                    value("min.insync.replicas"),
                );
                let replicas = replication_factor(&admin, topic)?;
                let mut found = problems(policy.as_deref(), ms.as_deref(), bytes.as_deref());
                let retention_problems = found.len();
                found.extend(replication_problems(replicas, min_isr.as_deref()));
                Verdict {
                    topic: topic.clone(),
                    problems: found,
                    retention_problems,
                    cleanup_policy: policy,
                    retention_ms: ms,
                    retention_bytes: bytes,
                    replication_factor: replicas,
                    min_insync_replicas: min_isr,
                }
            }
            Err(code) => Verdict {
                topic: topic.clone(),
                problems: vec![format!("cannot describe the topic: {code} (does it exist?)")],
                retention_problems: 1,
                ..Verdict::default()
            },
        };
        verdicts.push(verdict);
    }
    let unsafe_topics = verdicts.iter().filter(|v| v.retention_problems > 0).count();
    let fragile_topics = verdicts
        .iter()
        .filter(|v| v.retention_problems == 0 && !v.problems.is_empty())
        .count();
    for v in &verdicts {
        if json {
            println!("{}", serde_json::to_string(v)?);
            continue;
        }
        if v.problems.is_empty() {
            println!(
                "ok    {}: cleanup.policy=delete retention.ms={} retention.bytes={} (kept forever), replication factor {}, min.insync.replicas={}",
                v.topic,
                v.retention_ms.as_deref().unwrap_or("?"),
                v.retention_bytes.as_deref().unwrap_or("?"),
                v.replication_factor.map_or("?".into(), |r| r.to_string()),
                v.min_insync_replicas.as_deref().unwrap_or("?")
            );
        } else {
            let what = if v.retention_problems > 0 {
                "history can be lost"
            } else {
                "acknowledged writes can be lost or refused"
            };
            println!("WARN  {}: {what}", v.topic);
            for p in &v.problems {
                println!("      - {p}");
            }
        }
    }
    if unsafe_topics > 0 {
        anyhow::bail!("E_RETENTION: {unsafe_topics} command topic(s) would lose history");
    }
    if fragile_topics > 0 {
        anyhow::bail!(
            "E_REPLICATION: {fragile_topics} command topic(s) can lose or refuse acknowledged writes (min.insync.replicas)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{problems, replication_problems};

    #[test]
    fn three_replicas_need_two_in_sync() {
        assert!(
            replication_problems(Some(1), Some("1")).is_empty(),
            "a single broker"
        );
        assert!(replication_problems(Some(2), Some("1")).is_empty());
        assert!(replication_problems(Some(3), Some("2")).is_empty());
        assert!(replication_problems(Some(5), Some("3")).is_empty());
        let flagged = replication_problems(Some(3), Some("1"));
        assert_eq!(flagged.len(), 1);
        assert!(flagged[0].contains("single broker"), "{flagged:?}");
        assert_eq!(replication_problems(Some(4), Some("1")).len(), 1);
        let refused = replication_problems(Some(1), Some("2"));
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("NOT_ENOUGH_REPLICAS"), "{refused:?}");
        assert_eq!(replication_problems(None, Some("2")).len(), 1);
        assert_eq!(replication_problems(Some(3), None).len(), 1);
        assert_eq!(replication_problems(Some(3), Some("x")).len(), 1);
    }

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
