//! Memory endpoints: `POST /v1/memories` appends a `WriteMemory` command;
//! `GET /v1/memories/{id}` reads one memory (Redis first, PostgreSQL on a miss);
//! `GET /v1/agents/{agent}/memories` pages through an agent's memories.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use memos_kafka::{ProduceError, headers};
use memos_postgres::memories::{self, Cursor, MemoryView};
use memos_schemas::{MemoryCommand, Tier, WriteMemory};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use memos_runtime::metrics::{self as m, observe};
use memos_runtime::telemetry;

use crate::error::ApiError;
use crate::server::AppState;

/// Header naming who issues a command; defaults to the agent itself.
pub const ACTOR_HEADER: &str = "x-memos-actor";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteMemoryRequest {
    pub agent_id: String,
    pub content: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub importance: Option<f64>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    /// Chosen by the client to make retries idempotent; generated when absent.
    #[serde(default)]
    pub command_id: Option<Uuid>,
    #[serde(default)]
    pub memory_id: Option<Uuid>,
}

/// The answer to an accepted command: where it is in the log.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub command_id: Uuid,
    pub memory_id: Uuid,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

pub async fn write(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<WriteMemoryRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(request) = body?;
    let actor = match headers.get(ACTOR_HEADER) {
        Some(value) => value
            .to_str()
            .map_err(|_| ApiError::bad_request("x-memos-actor is not text").with_field("actor"))?
            .to_owned(),
        None => request.agent_id.clone(),
    };
    // The request span continues the caller's trace (see server::observe); the command
    // carries that span's context through Kafka to the projector.
    let (traceparent, tracestate) = match telemetry::current_traceparent() {
        Some((parent, state)) => (Some(parent), state),
        None => (None, None),
    };
    let metadata = match request.metadata {
        None => serde_json::Value::Object(Default::default()),
        Some(value @ serde_json::Value::Object(_)) => value,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "must be a JSON object",
            )
            .with_field("metadata"));
        }
    };
    let command_id = request.command_id.unwrap_or_else(Uuid::now_v7);
    let memory_id = request.memory_id.unwrap_or_else(Uuid::now_v7);
    let command = MemoryCommand::Write(WriteMemory {
        command_id: command_id.to_string(),
        namespace: request.agent_id,
        actor,
        issued_at: Utc::now().timestamp_millis(),
        traceparent: traceparent.clone(),
        memory_id: memory_id.to_string(),
        content: request.content,
        tier: request.tier.unwrap_or_default(),
        tags: request.tags,
        metadata_json: metadata.to_string(),
        importance: request.importance.unwrap_or(0.5),
        expires_at: request.expires_at.map(|t| t.timestamp_millis()),
        embedding: request.embedding,
    });
    command.validate()?;
    let payload = command
        .encode()
        .map_err(|e| ApiError::internal("cannot encode the command", e))?;

    let topic = &state.config.topics.memory_commands;
    let command_id_text = command_id.to_string();
    let mut record_headers = vec![
        (headers::COMMAND_ID, command_id_text.as_str()),
        (headers::SCHEMA, command.kind().full_name()),
    ];
    let MemoryCommand::Write(write) = &command;
    record_headers.push((headers::ACTOR, write.actor.as_str()));
    if let Some(tp) = &traceparent {
        record_headers.push((headers::TRACEPARENT, tp.as_str()));
    }
    if let Some(ts) = &tracestate {
        record_headers.push((headers::TRACESTATE, ts.as_str()));
    }
    let delivered = state
        .producer
        .send(topic, command.namespace(), &payload, &record_headers)
        .await
        .map_err(|e| match e {
            ProduceError::TooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the command is larger than the broker accepts",
            ),
            ProduceError::Unavailable(e) => {
                tracing::warn!(error = %e, "append failed");
                ApiError::unavailable(
                    "the log did not acknowledge the command; retry with the same command_id",
                )
            }
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            command_id,
            memory_id,
            topic: topic.clone(),
            partition: delivered.partition,
            offset: delivered.offset,
        }),
    ))
}

fn parse_uuid(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(value)
        .map_err(|_| ApiError::bad_request(format!("{field} must be a UUID")).with_field(field))
}

pub async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let memory_id = parse_uuid("memory_id", &id)?;
    match observe(
        m::REDIS_SECONDS,
        m::REDIS_ERRORS,
        "get_memory",
        state.hot.get_memory(&id),
    )
    .await
    {
        Ok(Some(doc)) => {
            return Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response());
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "hot view unavailable; reading PostgreSQL"),
    }
    let memory = observe(
        m::POSTGRES_SECONDS,
        m::POSTGRES_ERRORS,
        "get_memory",
        memories::get(&state.pool, memory_id),
    )
    .await
    .map_err(|e| ApiError::internal("cannot read the memory", e))?
    .ok_or_else(|| ApiError::not_found(format!("no memory {memory_id}")))?;
    Ok(Json(memory).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    pub items: Vec<MemoryView>,
    /// Pass as `cursor` to read the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Largest page.
pub const MAX_PAGE: i64 = 500;

fn encode_cursor(cursor: &Cursor) -> String {
    format!("{}_{}", cursor.created_at.timestamp_micros(), cursor.memory_id)
}

fn decode_cursor(text: &str) -> Result<Cursor, ApiError> {
    let invalid = || ApiError::bad_request("cursor is not one this API returned").with_field("cursor");
    let (micros, id) = text.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    Ok(Cursor {
        created_at: DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?,
        memory_id: Uuid::parse_str(id).map_err(|_| invalid())?,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")).with_field("limit"));
    }
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let list = memories::list(&state.pool, &agent, after, limit);
    let items = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "list_memories", list)
        .await
        .map_err(|e| ApiError::internal("cannot list memories", e))?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last())
        .flatten()
        .map(|m| {
            encode_cursor(&Cursor {
                created_at: m.created_at,
                memory_id: m.memory_id,
            })
        });
    Ok(Json(Page { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap(),
            memory_id: Uuid::now_v7(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        assert_eq!(decode_cursor("nope").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(
            decode_cursor("12_notauuid").unwrap_err().field.as_deref(),
            Some("cursor")
        );
    }
}
