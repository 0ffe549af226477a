//! Topic administration through the Kafka admin API. Creating a topic that exists is a
//! no-op, so every process may call [`ensure_topics`] at start.

use std::time::Duration;

use memos_runtime::config::{KafkaConfig, TopicsConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::client::base_config;

/// Dead letters are kept four weeks: long enough to inspect and redrive.
pub const DEAD_LETTER_RETENTION_MS: &str = "2419200000";

/// A topic memOS needs, with the configuration it is created with.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: Vec<(&'static str, String)>,
}

impl TopicSpec {
    /// A command topic: the system of record, so nothing is ever deleted.
    pub fn commands(name: &str, topics: &TopicsConfig) -> Self {
        TopicSpec {
            name: name.to_owned(),
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
            config: vec![
                ("cleanup.policy", "delete".into()),
                ("retention.ms", "-1".into()),
                ("retention.bytes", "-1".into()),
            ],
        }
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
            ],
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
        TopicSpec::commands(&topics.task_events, topics),
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
    specs
}

/// Creates the topics that do not exist yet; existing topics are left as they are.
pub async fn ensure_topics(kafka: &KafkaConfig, specs: &[TopicSpec]) -> anyhow::Result<()> {
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
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}
