//! Shares and the tool registry: `POST /v1/shares`, `POST /v1/shares/revoke` (one memory, or
//! the whole namespace when `memory_id` is absent), `POST /v1/tools` (register),
//! `GET /v1/tools?q=&tag=&limit=` (list and full-text search).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use memos_postgres::memories::ToolRow;
use memos_postgres::queries;
use memos_runtime::metrics::{self as m, observe};
use memos_schemas::validate::{self, SearchQuery};
use memos_schemas::{MemoryCommand, RegisterTool, RevokeShare, ShareMemory};
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Caller;
use crate::commands::{self, Accepted};
use crate::error::ApiError;
use crate::server::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// The namespace that gives access (its owner must be the actor).
    pub agent_id: String,
    pub grantee: String,
    /// One memory; absent: the whole namespace.
    #[serde(default)]
    pub memory_id: Option<Uuid>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn share(
    state: State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<ShareRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    share_or_revoke(state, caller, headers, body, true).await
}

pub async fn revoke(
    state: State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<ShareRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    share_or_revoke(state, caller, headers, body, false).await
}

async fn share_or_revoke(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<ShareRequest>, JsonRejection>,
    grant: bool,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(r) = body?;
    let h = commands::header(&caller, &headers, Some(&r.agent_id), r.command_id)?;
    let memory_id = r.memory_id.map(|id| id.to_string());
    let command = if grant {
        MemoryCommand::Share(ShareMemory {
            command_id: h.command_id,
            namespace: r.agent_id,
            actor: h.actor,
            issued_at: h.issued_at,
            traceparent: h.traceparent,
            memory_id,
            grantee: r.grantee,
        })
    } else {
        MemoryCommand::Revoke(RevokeShare {
            command_id: h.command_id,
            namespace: r.agent_id,
            actor: h.actor,
            issued_at: h.issued_at,
            traceparent: h.traceparent,
            memory_id,
            grantee: r.grantee,
        })
    };
    commands::append(&state, command, h.tracestate.as_deref(), r.memory_id).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRequest {
    pub agent_id: String,
    pub name: String,
    pub description: String,
    #[serde(default)]
    pub usage: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn register_tool(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<ToolRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let Json(r) = body?;
    let h = commands::header(&caller, &headers, Some(&r.agent_id), r.command_id)?;
    let command = MemoryCommand::RegisterTool(RegisterTool {
        command_id: h.command_id,
        namespace: r.agent_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        name: r.name,
        description: r.description,
        usage: r.usage,
        tags: r.tags,
    });
    commands::append(&state, command, h.tracestate.as_deref(), None).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolParams {
    pub q: Option<String>,
    pub tag: Option<String>,
    pub limit: Option<i64>,
}

pub async fn tools(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<ToolParams>, QueryRejection>,
) -> Result<Json<Vec<ToolRow>>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 500").with_field("limit"));
    }
    let q = params
        .q
        .filter(|q| !q.trim().is_empty())
        .map(|q| SearchQuery::parse("q", q))
        .transpose()
        .map_err(ApiError::bad_param)?;
    if let Some(tag) = &params.tag {
        validate::check_param("tag", tag).map_err(ApiError::bad_param)?;
    }
    crate::consistency::wait_for(&state, &headers).await?;
    let read = queries::tools(
        &state.pool,
        q.as_ref().map(SearchQuery::as_str),
        params.tag.as_deref(),
        limit,
    );
    let rows = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "tools", read)
        .await
        .map_err(|e| ApiError::internal("cannot read tools", e))?;
    Ok(Json(rows))
}
