//! Read-your-writes. A write answers a position token `partition:offset`; a read that sends
//! it back in `X-Memos-Position` (several tokens may be comma-separated) waits until the
//! views have applied every named record, up to `memory.read_your_writes_timeout`, then
//! either serves the read or answers `504 not_caught_up` naming the position reached. A token
//! naming a partition the memory command topic does not have is a `400` at once: no write
//! could have answered it, and waiting could never succeed.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::error::ApiError;
use crate::server::AppState;

pub const POSITION_HEADER: &str = "x-memos-position";

fn parse(text: &str) -> Result<Vec<(i32, i64)>, ApiError> {
    let invalid = || {
        ApiError::bad_request("X-Memos-Position must be partition:offset tokens as returned by a write")
            .with_field("x-memos-position")
    };
    text.split(',')
        .map(|token| {
            let (partition, offset) = token.trim().split_once(':').ok_or_else(invalid)?;
            Ok((
                partition.parse().map_err(|_| invalid())?,
                offset.parse().map_err(|_| invalid())?,
            ))
        })
        .collect()
}

/// Next offset the views will apply in `partition`: Redis first, PostgreSQL when Redis fails.
async fn applied_up_to(state: &AppState, partition: i32) -> Result<i64, ApiError> {
    let topic = &state.config.topics.memory_commands;
    match state.hot.position(topic, partition).await {
        Ok(position) => Ok(position.unwrap_or(0)),
        Err(e) => {
            // While the breaker is open every wait lands here; it logged the outage once.
            if state.hot.breaker_open() {
                tracing::debug!(error = %e, "position unavailable in Redis; reading PostgreSQL");
            } else {
                tracing::warn!(error = %e, "position unavailable in Redis; reading PostgreSQL");
            }
            let stored = memos_postgres::offsets::load(&state.pool, "memory", topic)
                .await
                .map_err(|e| ApiError::internal("cannot read the projection position", e))?;
            Ok(stored.get(&partition).copied().unwrap_or(0))
        }
    }
}

/// Partition counts by (brokers, topic), with when they were read. Process-wide because the
/// count belongs to the cluster, not to one router; a topic only ever gains partitions.
static PARTITIONS: LazyLock<Mutex<HashMap<TopicKey, (i32, Instant)>>> = LazyLock::new(Mutex::default);

/// Brokers and topic.
type TopicKey = (String, String);

/// How often a token naming an unknown partition may make the API read the topic's metadata
/// again (partitions may have been added since the count was cached).
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The partition count of the memory command topic; `None` when the broker does not tell
/// (the read then waits as it would without the check).
async fn partition_count(state: &AppState, partition: i32) -> Option<i32> {
    let key = (
        state.config.kafka.brokers.clone(),
        state.config.topics.memory_commands.clone(),
    );
    let cached = PARTITIONS.lock().expect("partition cache").get(&key).copied();
    if let Some((count, read_at)) = cached
        && (partition < count || read_at.elapsed() < REFRESH_EVERY)
    {
        return Some(count);
    }
    let kafka = state.config.kafka.clone();
    let topic = key.1.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = memos_kafka::client::base_config(&kafka, "api-metadata").create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        Ok::<_, rdkafka::error::KafkaError>(
            metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32
        )
    })
    .await;
    match fetched {
        Ok(Ok(count)) if count > 0 => {
            PARTITIONS
                .lock()
                .expect("partition cache")
                .insert(key, (count, Instant::now()));
            Some(count)
        }
        Ok(Ok(_)) => cached.map(|(count, _)| count),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the partition count of the memory topic");
            cached.map(|(count, _)| count)
        }
        Err(e) => {
            tracing::warn!(error = %e, "partition count task failed");
            cached.map(|(count, _)| count)
        }
    }
}

/// Waits until the views reflect every position the request names.
pub async fn wait_for(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(POSITION_HEADER) else {
        return Ok(());
    };
    let tokens = parse(
        value
            .to_str()
            .map_err(|_| ApiError::bad_request("X-Memos-Position is not text"))?,
    )?;
    for &(partition, _) in &tokens {
        let unknown = partition < 0
            || partition_count(state, partition)
                .await
                .is_some_and(|count| partition >= count);
        if unknown {
            return Err(ApiError::bad_request(format!(
                "X-Memos-Position names partition {partition}, which the memory command topic does not have"
            ))
            .with_field("x-memos-position"));
        }
    }
    let bound = state.config.memory.read_your_writes_timeout;
    let start = Instant::now();
    for (partition, offset) in tokens {
        let mut pause = Duration::from_millis(2);
        loop {
            let next = applied_up_to(state, partition).await?;
            if next > offset {
                break;
            }
            if start.elapsed() >= bound {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "not_caught_up",
                    format!(
                        "waited {bound:?}: the views have applied partition {partition} up to offset {} \
                         but the request needs offset {offset}; retry later with the same position",
                        next - 1
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_garbage_is_a_400() {
        assert_eq!(parse("3:42").unwrap(), vec![(3, 42)]);
        assert_eq!(parse("0:1, 5:9").unwrap(), vec![(0, 1), (5, 9)]);
        assert_eq!(parse("3-42").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(parse("a:b").unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
