//! Read-your-writes. A write answers a position token `partition:offset`; a read that sends
//! it back in `X-Memos-Position` (several tokens may be comma-separated) waits until the
//! views have applied every named record, up to `memory.read_your_writes_timeout`, then
//! either serves the read or answers `504 not_caught_up` naming the position reached.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};

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
            tracing::warn!(error = %e, "position unavailable in Redis; reading PostgreSQL");
            let stored = memos_postgres::offsets::load(&state.pool, "memory", topic)
                .await
                .map_err(|e| ApiError::internal("cannot read the projection position", e))?;
            Ok(stored.get(&partition).copied().unwrap_or(0))
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
