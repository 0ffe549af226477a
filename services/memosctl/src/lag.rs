//! `memosctl lag`: for each consumer group, each partition it has committed, the committed
//! offset, the log end offset and their difference; then, for each projection, the same from
//! the next offsets stored in PostgreSQL with the views (the projector's real position: its
//! group commit only reports progress).

use std::time::Duration;

use memos_runtime::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
struct Row {
    source: &'static str,
    group: String,
    topic: String,
    partition: i32,
    current_offset: i64,
    log_end_offset: i64,
    lag: i64,
}

pub async fn run(config: &Config, only_group: Option<&str>, json: bool) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    let only = only_group.map(str::to_owned);
    let mut rows = tokio::task::spawn_blocking(move || group_rows(&kafka, only.as_deref())).await??;
    match projection_rows(config).await {
        Ok(projections) => rows.extend(projections),
        Err(e) => eprintln!("projections: PostgreSQL not readable ({e}); showing group commits only"),
    }
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    println!(
        "{:<10} {:<32} {:<36} {:>9} {:>14} {:>14} {:>10}",
        "SOURCE", "GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG"
    );
    for r in &rows {
        println!(
            "{:<10} {:<32} {:<36} {:>9} {:>14} {:>14} {:>10}",
            r.source, r.group, r.topic, r.partition, r.current_offset, r.log_end_offset, r.lag
        );
    }
    Ok(())
}

fn group_rows(kafka: &memos_runtime::config::KafkaConfig, only: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let client: BaseConsumer = memos_kafka::client::base_config(kafka, "memosctl").create()?;
    let metadata = client.fetch_metadata(None, TIMEOUT)?;
    let mut all = TopicPartitionList::new();
    for topic in metadata.topics().iter().filter(|t| !t.name().starts_with("__")) {
        for partition in topic.partitions() {
            all.add_partition(topic.name(), partition.id());
        }
    }
    let mut groups: Vec<String> = client
        .fetch_group_list(None, TIMEOUT)?
        .groups()
        .iter()
        .map(|g| g.name().to_owned())
        .collect();
    groups.sort();
    let mut rows = Vec::new();
    for group in groups.into_iter().filter(|g| only.is_none_or(|o| o == g)) {
        let mut config = memos_kafka::client::base_config(kafka, "memosctl");
        config.set("group.id", &group).set("enable.auto.commit", "false");
        let reader: BaseConsumer = config.create()?;
        let committed = reader.committed_offsets(all.clone(), TIMEOUT)?;
        for element in committed.elements() {
            let Offset::Offset(current) = element.offset() else {
                continue;
            };
            let (_, high) = client.fetch_watermarks(element.topic(), element.partition(), TIMEOUT)?;
            rows.push(Row {
                source: "group",
                group: group.clone(),
                topic: element.topic().to_owned(),
                partition: element.partition(),
                current_offset: current,
                log_end_offset: high,
                lag: (high - current).max(0),
            });
        }
    }
    Ok(rows)
}

/// The projections memOS runs, with the topic each one folds.
fn projections(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        (
            memos_projector::MEMORY_PROJECTION,
            config.topics.memory_commands.clone(),
        ),
        (
            memos_projector::tasks::TASK_PROJECTION,
            config.topics.task_events.clone(),
        ),
    ]
}

async fn projection_rows(config: &Config) -> anyhow::Result<Vec<Row>> {
    let pool = memos_postgres::connect(&config.postgres).await?;
    let mut wanted = Vec::new();
    for (projection, topic) in projections(config) {
        // A partition with no stored offset has applied nothing: its position is the start.
        let stored = memos_postgres::offsets::load(&pool, projection, &topic).await?;
        wanted.push((projection, topic, stored));
    }
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = memos_kafka::client::base_config(&kafka, "memosctl").create()?;
        let mut rows = Vec::new();
        for (projection, topic, stored) in wanted {
            let metadata = client.fetch_metadata(Some(&topic), TIMEOUT)?;
            let Some(topic_metadata) = metadata.topics().first() else {
                continue;
            };
            let mut partitions: Vec<i32> = topic_metadata.partitions().iter().map(|p| p.id()).collect();
            partitions.sort_unstable();
            for partition in partitions {
                let (low, high) = client.fetch_watermarks(&topic, partition, TIMEOUT)?;
                let next = stored.get(&partition).copied().unwrap_or(0).max(low);
                rows.push(Row {
                    source: "projection",
                    group: projection.to_owned(),
                    topic: topic.clone(),
                    partition,
                    current_offset: next,
                    log_end_offset: high,
                    lag: (high - next).max(0),
                });
            }
        }
        Ok(rows)
    })
    .await?
}
