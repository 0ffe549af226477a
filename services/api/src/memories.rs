//! Memory endpoints. Commands: `POST /v1/memories` (write), `PATCH /v1/memories/{id}`
//! (update), `POST /v1/memories/{id}/forget`. Queries: `GET /v1/memories/{id}` (Redis first,
//! PostgreSQL on a miss), `GET /v1/memories/{id}/history`, `GET /v1/agents/{agent}/memories`
//! (filters, keyset pagination), `GET /v1/agents/{agent}/recent` (hot working memory),
//! `POST /v1/memories/search` (full-text, vector, hybrid).
//!
//! `GET /v1/memories/{id}?as_of=T` and `GET /v1/agents/{agent}/memories?as_of=T` answer as
//! the view stood at instant `T` (record time), from the history's validity intervals: the
//! state whose interval `[valid_from, valid_to)` contains `T`. They equal what the live view
//! answered then, except that embeddings are `null` (the history keeps their dimension
//! only) and read access is judged by today's shares.
//!
//! Reads are made as the caller's reader ([`crate::auth::Caller::reader`]: an agent's key reads
//! as that agent, a service's as the agent it names in `X-Memos-Agent`, auditors and
//! operators everything): only what that agent may read (its namespace, the team namespaces
//! its key is granted, and shares) is answered, and anything else is a 404. Search reads as its `agent_id`, which must be the
//! caller's reader. Every read honours `X-Memos-Position` (read-your-writes).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use memos_postgres::memories::{HistoryRow, Memory};
use memos_postgres::queries::{self, Cursor, ListFilter, Reader, Scored, SearchMode, SearchSettings};
use memos_runtime::metrics::{self as m, observe};
use memos_schemas::memory::MAX_METADATA_BYTES;
use memos_schemas::validate::{self, JsonKind, SearchQuery};
use memos_schemas::{ForgetMemory, MemoryCommand, Tier, UpdateMemory, WriteMemory};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Caller;
use crate::commands::{self, Accepted};
use crate::consistency;
use crate::error::ApiError;
use crate::server::AppState;

pub fn parse_uuid(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(value)
        .map_err(|_| ApiError::bad_request(format!("{field} must be a UUID")).with_field(field))
}

fn metadata_json(metadata: Option<serde_json::Value>) -> Result<Option<String>, ApiError> {
    match metadata {
        None => Ok(None),
        Some(value @ serde_json::Value::Object(_)) => Ok(Some(value.to_string())),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "must be a JSON object",
        )
        .with_field("metadata")),
    }
}

fn check_dimensions(state: &AppState, embedding: Option<&Vec<f32>>) -> Result<(), ApiError> {
    let expected = state.config.memory.embedding_dimensions;
    match embedding {
        Some(e) if e.len() != expected => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!(
                "embedding has {} dimensions; this deployment stores {expected}",
                e.len()
            ),
        )
        .with_field("embedding")),
        _ => Ok(()),
    }
}

/// Refuses, before appending, a command the projector would certainly reject: views only
/// move forward, so a memory id that already exists, a forgotten memory, or a version
/// already past `expected_version` can never become acceptable. Anything else is decided
/// by the projector in log order (`GET /v1/commands/{id}`).
///
/// The check is an optimisation, so writes depend on Kafka alone: when PostgreSQL fails or
/// does not answer within `memory.conflict_check_timeout`, the command is appended
/// unchecked (and counted), and the projector still rejects it if it conflicts.
async fn refuse_certain_conflict(
    state: &AppState,
    memory_id: Uuid,
    expected_version: Option<i64>,
    writing: bool,
) -> Result<(), ApiError> {
    let read = queries::memory(&state.pool, None, memory_id);
    let bound = state.config.memory.conflict_check_timeout;
    let read = tokio::time::timeout(
        bound,
        observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "get_memory", read),
    );
    let current = match read.await {
        Ok(Ok(current)) => current,
        Ok(Err(e)) => return skip_conflict_check("error", &e),
        Err(_) => return skip_conflict_check("timeout", &format!("no answer within {bound:?}")),
    };
    let conflict = |message: String| Err(ApiError::new(StatusCode::CONFLICT, "conflict", message));
    match current {
        Some(_) if writing => conflict(format!("memory {memory_id} already exists")),
        Some(memory) if memory.forgotten_at.is_some() => {
            conflict(format!("memory {memory_id} was forgotten"))
        }
        Some(memory) if expected_version.is_some_and(|v| v < memory.version) => conflict(format!(
            "expected version {}, memory {memory_id} is already at version {}",
            expected_version.unwrap_or_default(),
            memory.version
        )),
        _ => Ok(()),
    }
}

fn skip_conflict_check(reason: &'static str, error: &dyn std::fmt::Display) -> Result<(), ApiError> {
    metrics::counter!(m::CONFLICT_CHECKS_SKIPPED, "reason" => reason).increment(1);
    tracing::warn!(%error, "conflict pre-check skipped: PostgreSQL did not answer; the projector decides");
    Ok(())
}

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
    #[serde(default)]
    pub source: Option<String>,
    /// Chosen by the client to make retries idempotent; generated when absent.
    #[serde(default)]
    pub command_id: Option<Uuid>,
    #[serde(default)]
    pub memory_id: Option<Uuid>,
}

pub async fn write(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<WriteMemoryRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    check_dimensions(&state, request.embedding.as_ref())?;
    // Derived from the command id, so a retried command names the same memory every time.
    let memory_id = request
        .memory_id
        .unwrap_or_else(|| memos_schemas::memory::memory_id_for_command(&h.command_uuid));
    if request.memory_id.is_some() && request.command_id.is_none() {
        // A client-chosen id without a command id cannot be a retry of an accepted write.
        refuse_certain_conflict(&state, memory_id, None, true).await?;
    }
    let command = MemoryCommand::Write(WriteMemory {
        command_id: h.command_id,
        namespace: request.agent_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        memory_id: memory_id.to_string(),
        content: request.content,
        tier: request.tier.unwrap_or_default(),
        tags: request.tags,
        metadata_json: metadata_json(request.metadata)?.unwrap_or_else(|| "{}".into()),
        importance: request.importance.unwrap_or(0.5),
        expires_at: request.expires_at.map(|t| t.timestamp_millis()),
        embedding: request.embedding,
        source: request.source,
    });
    commands::append(&state, command, h.tracestate.as_deref(), Some(memory_id)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateMemoryRequest {
    /// The namespace that owns the memory.
    pub agent_id: String,
    #[serde(default)]
    pub expected_version: Option<i64>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub importance: Option<f64>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub clear_expiry: bool,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<UpdateMemoryRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let memory_id = parse_uuid("memory_id", &id)?;
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    check_dimensions(&state, request.embedding.as_ref())?;
    refuse_certain_conflict(&state, memory_id, request.expected_version, false).await?;
    let command = MemoryCommand::Update(UpdateMemory {
        command_id: h.command_id,
        namespace: request.agent_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        memory_id: memory_id.to_string(),
        expected_version: request.expected_version,
        content: request.content,
        tier: request.tier,
        tags: request.tags,
        metadata_json: metadata_json(request.metadata)?,
        importance: request.importance,
        expires_at: request.expires_at.map(|t| t.timestamp_millis()),
        clear_expiry: request.clear_expiry,
        embedding: request.embedding,
    });
    commands::append(&state, command, h.tracestate.as_deref(), Some(memory_id)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgetMemoryRequest {
    pub agent_id: String,
    #[serde(default)]
    pub expected_version: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn forget(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<ForgetMemoryRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let memory_id = parse_uuid("memory_id", &id)?;
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    refuse_certain_conflict(&state, memory_id, request.expected_version, false).await?;
    let command = MemoryCommand::Forget(ForgetMemory {
        command_id: h.command_id,
        namespace: request.agent_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        memory_id: memory_id.to_string(),
        expected_version: request.expected_version,
        reason: request.reason,
    });
    commands::append(&state, command, h.tracestate.as_deref(), Some(memory_id)).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetParams {
    /// Answer as the view stood at this instant (RFC 3339), from the history.
    pub as_of: Option<DateTime<Utc>>,
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<GetParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let memory_id = parse_uuid("memory_id", &id)?;
    validate::check_time_param("as_of", params.as_of.as_ref()).map_err(ApiError::bad_param)?;
    let reader = caller.memory_reader(&headers, None)?;
    consistency::wait_for(&state, &headers).await?;
    let not_found = || ApiError::not_found(format!("no memory {memory_id}"));
    if let Some(at) = params.as_of {
        // As of an instant: from the history's validity intervals, never from the hot cache.
        let read = queries::memory_as_of(&state.pool, reader.as_ref(), memory_id, at);
        let memory = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "get_memory_as_of", read)
            .await
            .map_err(|e| ApiError::internal("cannot read the memory's history", e))?
            .filter(|m| m.forgotten_at.is_none())
            .ok_or_else(|| ApiError::not_found(format!("no memory {memory_id} at {}", at.to_rfc3339())))?;
        return Ok(Json(memory).into_response());
    }
    match observe(
        m::REDIS_SECONDS,
        m::REDIS_ERRORS,
        "get_memory",
        state.hot.get_memory(&id),
    )
    .await
    {
        Ok(Some(doc)) => {
            let allowed = match &reader {
                None => true,
                Some(reader) => {
                    let memory: Memory = serde_json::from_str(&doc)
                        .map_err(|e| ApiError::internal("corrupt cached memory", e))?;
                    let check = queries::may_read(&state.pool, reader, &memory.namespace, memory_id);
                    observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "may_read", check)
                        .await
                        .map_err(|e| ApiError::internal("cannot check read access", e))?
                }
            };
            if !allowed {
                return Err(not_found());
            }
            return Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response());
        }
        Ok(None) => {}
        // While the breaker is open every read lands here; it logged the outage once.
        Err(e) if state.hot.breaker_open() => {
            tracing::debug!(error = %e, "hot view unavailable; reading PostgreSQL")
        }
        Err(e) => tracing::warn!(error = %e, "hot view unavailable; reading PostgreSQL"),
    }
    let read = queries::memory(&state.pool, reader.as_ref(), memory_id);
    let memory = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "get_memory", read)
        .await
        .map_err(|e| ApiError::internal("cannot read the memory", e))?
        .filter(|m| m.forgotten_at.is_none())
        .ok_or_else(not_found)?;
    Ok(Json(memory).into_response())
}

pub async fn history(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<Vec<HistoryRow>>, ApiError> {
    let memory_id = parse_uuid("memory_id", &id)?;
    let reader = caller.memory_reader(&headers, None)?;
    consistency::wait_for(&state, &headers).await?;
    let rows = observe(
        m::POSTGRES_SECONDS,
        m::POSTGRES_ERRORS,
        "history",
        queries::history(&state.pool, memory_id),
    )
    .await
    .map_err(|e| ApiError::internal("cannot read the history", e))?;
    // The history outlives a forget, so access is checked against the namespace of record.
    if let (Some(reader), Some(first)) = (&reader, rows.first()) {
        let namespace = first
            .state
            .as_ref()
            .and_then(|s| s["namespace"].as_str())
            .unwrap_or_default();
        let allowed = queries::may_read(&state.pool, reader, namespace, memory_id)
            .await
            .map_err(|e| ApiError::internal("cannot check read access", e))?;
        if !allowed {
            return Err(ApiError::not_found(format!("no memory {memory_id}")));
        }
    }
    if rows.is_empty() {
        return Err(ApiError::not_found(format!("no memory {memory_id}")));
    }
    Ok(Json(rows))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub tier: Option<Tier>,
    /// Comma-separated: memories with at least one of these tags.
    pub tags_any: Option<String>,
    /// Comma-separated: memories with every one of these tags.
    pub tags_all: Option<String>,
    /// A JSON object the metadata must contain.
    pub metadata: Option<String>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    #[serde(default)]
    pub include_expired: bool,
    /// List the memories as they were at this instant (RFC 3339), from the history.
    pub as_of: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    pub items: Vec<Memory>,
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

fn split_tags(text: Option<String>) -> Option<Vec<String>> {
    text.map(|t| {
        t.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

pub async fn list(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let reader = caller.memory_reader(&headers, Some(&agent))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}")).with_field("limit"));
    }
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let metadata = params
        .metadata
        .as_deref()
        .map(|m| {
            validate::parse_json("metadata", m, MAX_METADATA_BYTES, JsonKind::Object)
                .map_err(ApiError::bad_param)
        })
        .transpose()?;
    for (field, time) in [
        ("created_after", &params.created_after),
        ("created_before", &params.created_before),
        ("updated_after", &params.updated_after),
        ("updated_before", &params.updated_before),
        ("as_of", &params.as_of),
    ] {
        validate::check_time_param(field, time.as_ref()).map_err(ApiError::bad_param)?;
    }
    let filter = ListFilter {
        tier: params.tier.map(|t| t.as_str().to_owned()),
        tags_any: split_tags(params.tags_any),
        tags_all: split_tags(params.tags_all),
        metadata,
        created_after: params.created_after,
        created_before: params.created_before,
        updated_after: params.updated_after,
        updated_before: params.updated_before,
        include_expired: params.include_expired,
    };
    consistency::wait_for(&state, &headers).await?;
    let list = queries::list(
        &state.pool,
        reader.as_ref(),
        &agent,
        &filter,
        // As of an instant, expiry is judged at that instant, as the live view did then.
        params.as_of.unwrap_or_else(Utc::now),
        after,
        limit,
        params.as_of,
    );
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

/// `GET /v1/agents/{agent}/recent`: the agent's most recent working memories, from Redis.
pub async fn recent(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    // Working memory is private to its agent.
    caller.may_read_agent(&headers, &agent)?;
    consistency::wait_for(&state, &headers).await?;
    let ids = observe(
        m::REDIS_SECONDS,
        m::REDIS_ERRORS,
        "recent",
        state.hot.recent(&agent, 50),
    )
    .await
    .map_err(|e| ApiError::unavailable(format!("hot views unavailable: {e}")))?;
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        if let Ok(Some(doc)) = state.hot.get_memory(&id).await
            && let Ok(value) = serde_json::from_str(&doc)
        {
            items.push(value);
        }
    }
    Ok(Json(items))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The asking agent: results are limited to what it may read.
    pub agent_id: String,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    pub embedding: Option<Vec<f32>>,
    /// Weight of vector similarity in a hybrid search (0 to 1, default 0.5).
    #[serde(default)]
    pub weight: Option<f64>,
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SearchResults {
    pub mode: String,
    pub items: Vec<Scored>,
}

/// The `(mode, plan)` pairs `memos_search_total` is exported with from the start.
pub const SEARCH_LABELS: &[(&str, &str)] = &[
    ("text", "text"),
    ("vector", "exact"),
    ("vector", "approximate"),
    ("vector", "approximate_then_exact"),
    ("hybrid", "exact"),
    ("hybrid", "fused"),
];

pub async fn search(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<SearchResults>, ApiError> {
    let Json(request) = body?;
    let limit = request.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100").with_field("limit"));
    }
    check_dimensions(&state, request.embedding.as_ref())?;
    validate::check_param("agent_id", &request.agent_id).map_err(ApiError::bad_param)?;
    // The search reads as `agent_id`, which must be the caller's reader (an auditor or
    // operator may search as anyone).
    let reader = match caller.memory_reader(&headers, Some(&request.agent_id))? {
        Some(reader) if reader.name() != request.agent_id => {
            return Err(crate::auth::deny(
                StatusCode::FORBIDDEN,
                "impersonation",
                caller.name(),
                format!("{} may not search as {}", reader.name(), request.agent_id),
            )
            .with_field("agent_id"));
        }
        Some(reader) => reader,
        None => Reader::agent(request.agent_id.clone()),
    };
    let query = request
        .query
        .filter(|q| !q.trim().is_empty())
        .map(|q| SearchQuery::parse("query", q).map(SearchQuery::into_inner))
        .transpose()
        .map_err(ApiError::bad_param)?;
    let (mode, name) = match (query, request.embedding) {
        (Some(query), None) => (SearchMode::Text(query), "text"),
        (None, Some(embedding)) => (SearchMode::Vector(embedding), "vector"),
        (Some(query), Some(embedding)) => {
            let weight = request.weight.unwrap_or(0.5);
            if !(0.0..=1.0).contains(&weight) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    "must be between 0 and 1",
                )
                .with_field("weight"));
            }
            (
                SearchMode::Hybrid {
                    query,
                    embedding,
                    weight,
                },
                "hybrid",
            )
        }
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "give a query, an embedding, or both",
            ));
        }
    };
    consistency::wait_for(&state, &headers).await?;
    let settings = SearchSettings::from_config(&state.config.memory);
    let search = async {
        let mut conn = state.pool.acquire().await?;
        queries::search_planned(&mut conn, &reader, &mode, &settings, Utc::now(), limit).await
    };
    let (items, plan) = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "search", search)
        .await
        .map_err(|e| ApiError::internal("search failed", e))?;
    metrics::counter!(m::SEARCHES, "mode" => name, "plan" => plan.as_str()).increment(1);
    Ok(Json(SearchResults {
        mode: name.into(),
        items,
    }))
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
