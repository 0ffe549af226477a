//! Topic administration through the Kafka admin API. Creating a topic that exists is a
//! no-op, so every process may call [`ensure_topics`] at start.
//!
//! Size limits are set together (a dead letter always fits): the command and event topics
//! accept records up to `topics.max_message_bytes` (`max.message.bytes`), and the
//! dead-letter topic accepts [`dead_letter_max_bytes`], that plus the headers a letter adds
//! ([`crate::dlq::LETTER_OVERHEAD_BYTES`]), which is also the dead-letter producer's
//! `message.max.bytes`. So the copy of any record a command topic accepted fits.
//!
//! Record time is the broker's on the command topics (`message.timestamp.type=LogAppendTime`):
//! a producer cannot forge the timestamp that the orchestrator's clock and the views' record
//! times are taken from.
//!
//! Durability: every topic is created with `min.insync.replicas`
//! ([`TopicsConfig::min_insync_replicas`]: 1 for a single replica, otherwise
//! `min(2, replication_factor)` unless configured). With the producers' `acks=all` a write is
//! acknowledged only once that many replicas hold it, so with three replicas an acknowledged
//! write survives the loss of any one broker. It is not changed on existing topics (an
//! operator may have chosen otherwise); `memosctl topics check` reports a command topic of
//! three or more replicas whose value is below 2.
//!
//! The settings in [`TopicSpec::enforced`] are also applied to topics that already exist,
//! when their current value differs (a describe, then an alter of the whole set of the
//! topic's own overrides with the enforced values merged in: rdkafka has no incremental
//! alter, and a plain alter would reset every override it does not name).

use std::collections::HashMap;
use std::time::Duration;

use memos_runtime::config::{KafkaConfig, TopicsConfig};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::client::base_config;
use crate::dlq::LETTER_OVERHEAD_BYTES;

/// The largest record the dead-letter topic accepts: a command topic's largest record plus
/// what a letter's headers add.
pub fn dead_letter_max_bytes(topics: &TopicsConfig) -> usize {
    topics.max_message_bytes + LETTER_OVERHEAD_BYTES
}

/// Dead letters are kept four weeks: long enough to inspect and redrive.
pub const DEAD_LETTER_RETENTION_MS: &str = "2419200000";

/// A topic memOS needs, with the configuration it is created with.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: Vec<(&'static str, String)>,
    /// Keys of `config` also applied to the topic when it already exists.
    pub enforced: Vec<&'static str>,
}

impl TopicSpec {
    /// A command topic: the system of record, so nothing is ever deleted; its record time is
    /// the broker's append time, which no producer can forge.
    pub fn commands(name: &str, topics: &TopicsConfig) -> Self {
        let mut spec = Self::log(name, topics);
        spec.config
            .push(("message.timestamp.type", "LogAppendTime".into()));
        spec.enforced.push("message.timestamp.type");
        spec
    }

    /// A topic kept forever whose record time is its producer's (the task events: the
    /// orchestrator writes them in transactions, with its decision time).
    pub fn events(name: &str, topics: &TopicsConfig) -> Self {
        Self::log(name, topics)
    }

    fn log(name: &str, topics: &TopicsConfig) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
            config: vec![
                ("cleanup.policy", "delete".into()),
                ("retention.ms", "-1".into()),
                ("retention.bytes", "-1".into()),
                ("max.message.bytes", topics.max_message_bytes.to_string()),
                ("min.insync.replicas", topics.min_insync_replicas().to_string()),
            ],
            enforced: vec!["max.message.bytes"],
        }
    }

    /// The keys log: one partition (one order of issues and revocations), kept forever,
    /// with the broker's record time like a command topic.
    pub fn keys(topics: &TopicsConfig) -> Self {
        let mut spec = Self::commands(&topics.keys, topics);
        spec.partitions = 1;
        spec
    }

    /// The dead-letter topic: kept for weeks, not forever.
    pub fn dead_letter(name: &str, topics: &TopicsConfig) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
            config: vec![
                ("cleanup.policy", "delete".into()),
                ("retention.ms", DEAD_LETTER_RETENTION_MS.into()),
                ("max.message.bytes", dead_letter_max_bytes(topics).to_string()),
                ("min.insync.replicas", topics.min_insync_replicas().to_string()),
            ],
            enforced: vec!["max.message.bytes"],
        }
    }
}

/// Every topic of the memory pipeline.
pub fn memory_topics(topics: &TopicsConfig) -> Vec<TopicSpec> {
    vec![
        TopicSpec::commands(&topics.memory_commands, topics),
        TopicSpec::dead_letter(&topics.dead_letter, topics),
    ]
}

/// Every topic of the task pipeline: commands and events are both records kept forever, with
/// the same partition count (an event goes to the partition of the command that caused it).
pub fn task_topics(topics: &TopicsConfig) -> Vec<TopicSpec> {
    vec![
        TopicSpec::commands(&topics.task_commands, topics),
        TopicSpec::events(&topics.task_events, topics),
        TopicSpec::dead_letter(&topics.dead_letter, topics),
    ]
}

/// Every topic memOS uses.
pub fn all_topics(topics: &TopicsConfig) -> Vec<TopicSpec> {
    let mut specs = memory_topics(topics);
    specs.extend(
        task_topics(topics)
            .into_iter()
            .filter(|t| t.name != topics.dead_letter),
    );
    specs.push(TopicSpec::keys(topics));
    specs
}

/// Creates the topics that do not exist yet, and applies the [`TopicSpec::enforced`]
/// settings to those that do.
pub async fn ensure_topics(kafka: &KafkaConfig, specs: &[TopicSpec]) -> anyhow::Result<()> {
    for spec in specs {
        check_replication(spec)?;
    }
    let admin: AdminClient<DefaultClientContext> = base_config(kafka, "admin").create()?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            spec.config.iter().fold(
                NewTopic::new(
                    &spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut existing = Vec::new();
    for (spec, result) in specs
        .iter()
        .zip(admin.create_topics(&new_topics, &options).await?)
    {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(spec),
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    for spec in existing {
        enforce(&admin, spec).await?;
    }
    Ok(())
}

/// Refuses a spec whose `min.insync.replicas` its replicas cannot meet (every write would
/// fail with `NOT_ENOUGH_REPLICAS`) or that is below 1.
pub fn check_replication(spec: &TopicSpec) -> anyhow::Result<()> {
    let Some((_, value)) = spec.config.iter().find(|(k, _)| *k == "min.insync.replicas") else {
        return Ok(());
    };
    let min: i32 = value.parse()?;
    anyhow::ensure!(
        (1..=spec.replication_factor).contains(&min),
        "topic {}: min.insync.replicas {min} must be between 1 and the replication factor {}",
        spec.name,
        spec.replication_factor
    );
    Ok(())
}

/// The overrides `current` (the topic's own settings, name to value) must have so that
/// `spec`'s enforced settings hold, or `None` when they already do.
pub fn reconciled(spec: &TopicSpec, current: &HashMap<String, String>) -> Option<HashMap<String, String>> {
    let mut wanted = current.clone();
    let mut changed = false;
    for key in &spec.enforced {
        let Some((_, value)) = spec.config.iter().find(|(k, _)| k == key) else {
            continue;
        };
        if current.get(*key) != Some(value) {
            wanted.insert((*key).to_owned(), value.clone());
            changed = true;
        }
    }
    changed.then_some(wanted)
}

/// Applies `spec`'s enforced settings to an existing topic whose values differ.
async fn enforce(admin: &AdminClient<DefaultClientContext>, spec: &TopicSpec) -> anyhow::Result<()> {
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(&spec.name)], &options)
        .await?;
    let resource = match described.into_iter().next() {
        Some(Ok(resource)) => resource,
        Some(Err(code)) => anyhow::bail!("cannot describe topic {}: {code}", spec.name),
        None => anyhow::bail!("cannot describe topic {}: no answer", spec.name),
    };
    // Only the topic's own overrides: an alter replaces exactly this set.
    let current: HashMap<String, String> = resource
        .entries
        .iter()
        .filter(|e| matches!(e.source, ConfigSource::DynamicTopic) && !e.is_sensitive)
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let Some(wanted) = reconciled(spec, &current) else {
        return Ok(());
    };
    let alter = wanted.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(&spec.name)),
        |a, (k, v)| a.set(k, v),
    );
    for result in admin.alter_configs(&[alter], &options).await? {
        if let Err((_, code)) = result {
            anyhow::bail!("cannot configure topic {}: {code}", spec.name);
        }
    }
    let changed: Vec<String> = spec
        .enforced
        .iter()
        .filter_map(|k| wanted.get(*k).map(|v| format!("{k}={v}")))
        .collect();
    tracing::info!(topic = %spec.name, settings = %changed.join(" "), "topic configuration updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> TopicsConfig {
        memos_runtime::Config::default().topics
    }

    fn value<'a>(spec: &'a TopicSpec, key: &str) -> Option<&'a str> {
        spec.config
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn limits_are_consistent_and_command_time_is_the_brokers() {
        let topics = topics();
        let all = all_topics(&topics);
        let dlq = all.iter().find(|t| t.name == topics.dead_letter).unwrap();
        let dlq_max: usize = value(dlq, "max.message.bytes").unwrap().parse().unwrap();
        assert_eq!(dlq_max, dead_letter_max_bytes(&topics));
        for spec in all.iter().filter(|t| t.name != topics.dead_letter) {
            let max: usize = value(spec, "max.message.bytes").unwrap().parse().unwrap();
            assert_eq!(max, topics.max_message_bytes, "{}", spec.name);
            assert!(max + crate::dlq::LETTER_OVERHEAD_BYTES <= dlq_max);
            let time = value(spec, "message.timestamp.type");
            if spec.name == topics.task_events {
                assert_eq!(time, None, "events keep the orchestrator's time");
            } else {
                assert_eq!(time, Some("LogAppendTime"), "{}", spec.name);
            }
        }
    }

    #[test]
    fn every_topic_waits_for_two_replicas_when_replicated() {
        let mut topics = topics();
        for (rf, set, expected) in [(1, None, "1"), (2, None, "2"), (3, None, "2"), (3, Some(3), "3")] {
            topics.replication_factor = rf;
            topics.min_insync_replicas = set;
            for spec in all_topics(&topics) {
                assert_eq!(spec.replication_factor, rf);
                assert_eq!(
                    value(&spec, "min.insync.replicas"),
                    Some(expected),
                    "{} rf={rf}",
                    spec.name
                );
                assert!(
                    !spec.enforced.contains(&"min.insync.replicas"),
                    "existing topics keep theirs"
                );
                check_replication(&spec).unwrap();
            }
        }
        topics.replication_factor = 1;
        topics.min_insync_replicas = Some(2);
        let spec = TopicSpec::commands("c", &topics);
        assert!(
            check_replication(&spec).is_err(),
            "more in-sync replicas than replicas"
        );
        topics.min_insync_replicas = Some(0);
        let spec = TopicSpec::commands("c", &topics);
        assert!(check_replication(&spec).is_err());
    }

    #[test]
    fn existing_overrides_are_kept_and_enforced_ones_set() {
        let spec = TopicSpec::commands("c", &topics());
        let mut current: HashMap<String, String> = [("retention.ms".to_owned(), "-1".to_owned())].into();
        let wanted = reconciled(&spec, &current).expect("a change");
        assert_eq!(wanted["retention.ms"], "-1");
        assert_eq!(wanted["message.timestamp.type"], "LogAppendTime");
        assert_eq!(wanted["max.message.bytes"], "1048576");
        current = wanted;
        assert_eq!(reconciled(&spec, &current), None, "nothing to do twice");
    }
}
