//! Appending commands, and their status. [`append`] (memory commands) and [`append_task`]
//! (task commands) are the only ways the API writes: they validate, encode (Avro
//! single-object), attach the headers (command id, actor, schema, W3C trace context of the
//! request span) and wait for the broker's `acks=all` acknowledgement before the handler
//! answers `202`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use memos_kafka::{Delivered, ProduceError, headers};
use memos_postgres::memories::CommandRow;
use memos_postgres::queries;
use memos_postgres::tasks::{self, EventRow};
use memos_runtime::metrics::{self as m, observe};
use memos_runtime::telemetry;
use memos_schemas::MemoryCommand;
use memos_schemas::task::TaskCommand;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::server::AppState;

/// What every command needs besides its own fields.
pub struct Header {
    pub command_id: String,
    /// `command_id`, parsed.
    pub command_uuid: Uuid,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// The header of a command issued by this request for `subject` (the namespace or agent it
/// acts on; `None` when it acts for no agent). The actor comes from the caller's principal,
/// which must be allowed to act for `subject` ([`Caller::acting_for`]).
pub fn header(
    caller: &Caller,
    headers: &HeaderMap,
    subject: Option<&str>,
    command_id: Option<Uuid>,
) -> Result<Header, ApiError> {
    let actor = caller.acting_for(headers, subject)?;
    // The request span continues the caller's trace (see server::observe); the command
    // carries that span's context through Kafka to the projector.
    let (traceparent, tracestate) = match telemetry::current_traceparent() {
        Some((parent, state)) => (Some(parent), state),
        None => (None, None),
    };
    let command_uuid = command_id.unwrap_or_else(Uuid::now_v7);
    Ok(Header {
        command_id: command_uuid.to_string(),
        command_uuid,
        actor,
        issued_at: Utc::now().timestamp_millis(),
        traceparent,
        tracestate,
    })
}

/// The answer to an accepted command: where it is in the log, and the position token a
/// later read can carry (`X-Memos-Position`) to see its effect.
#[derive(Debug, Serialize, Deserialize)]
pub struct Accepted {
    pub command_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub position: String,
}

/// Validates, encodes and appends `command`; answers once the broker acknowledged it.
pub async fn append(
    state: &AppState,
    command: MemoryCommand,
    tracestate: Option<&str>,
    memory_id: Option<Uuid>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    command.validate()?;
    let payload = command
        .encode()
        .map_err(|e| ApiError::internal("cannot encode the command", e))?;
    let topic = &state.config.topics.memory_commands;
    let delivered = send(
        state,
        topic,
        command.namespace(),
        &payload,
        [
            (headers::COMMAND_ID, command.command_id()),
            (headers::SCHEMA, command.kind().full_name()),
            (headers::ACTOR, command.actor()),
        ],
        command.traceparent(),
        tracestate,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            command_id: Uuid::parse_str(command.command_id()).expect("validated"),
            memory_id,
            task_id: None,
            workflow_id: None,
            agent_id: None,
            topic: topic.clone(),
            partition: delivered.partition,
            offset: delivered.offset,
            position: format!("{}:{}", delivered.partition, delivered.offset),
        }),
    ))
}

/// The ids a task command is about, echoed in its `202` answer.
#[derive(Debug, Default)]
pub struct TaskIds {
    pub task_id: Option<String>,
    pub workflow_id: Option<String>,
    pub agent_id: Option<String>,
}

/// Validates, encodes and appends a task command to `topics.task_commands`, keyed by its
/// routing key; answers once the broker acknowledged it. The position names the command's
/// place in the command log (its effects appear once the orchestrator decided it).
pub async fn append_task(
    state: &AppState,
    command: TaskCommand,
    tracestate: Option<&str>,
    ids: TaskIds,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    command.validate()?;
    let payload = command
        .encode()
        .map_err(|e| ApiError::internal("cannot encode the command", e))?;
    let key = command
        .routing_key()
        .ok_or_else(|| ApiError::bad_request("this command cannot be sent over HTTP"))?;
    let topic = &state.config.topics.task_commands;
    let delivered = send(
        state,
        topic,
        &key,
        &payload,
        [
            (headers::COMMAND_ID, command.command_id()),
            (headers::SCHEMA, command.kind().full_name()),
            (headers::ACTOR, command.actor()),
        ],
        command.traceparent(),
        tracestate,
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            command_id: Uuid::parse_str(command.command_id()).expect("validated"),
            memory_id: None,
            task_id: ids.task_id,
            workflow_id: ids.workflow_id,
            agent_id: ids.agent_id,
            topic: topic.clone(),
            partition: delivered.partition,
            offset: delivered.offset,
            position: format!("{}:{}", delivered.partition, delivered.offset),
        }),
    ))
}

/// Appends one encoded command with its headers and waits for the acknowledgement.
async fn send(
    state: &AppState,
    topic: &str,
    key: &str,
    payload: &[u8],
    base_headers: [(&str, &str); 3],
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> Result<Delivered, ApiError> {
    let mut record_headers = base_headers.to_vec();
    if let Some(traceparent) = traceparent {
        record_headers.push((headers::TRACEPARENT, traceparent));
    }
    if let Some(tracestate) = tracestate {
        record_headers.push((headers::TRACESTATE, tracestate));
    }
    state
        .producer
        .send(topic, key, payload, &record_headers)
        .await
        .map_err(|e| match e {
            ProduceError::TooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the command is larger than the broker accepts",
            ),
            ProduceError::NotAuthorized(e) => {
                tracing::error!(error = %e, topic, "the broker refuses this process's Kafka principal");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "misconfigured",
                    "the command log refuses this service's Kafka principal (broker ACLs); an operator must grant it",
                )
            }
            ProduceError::Unavailable(e) => {
                tracing::warn!(error = %e, "append failed");
                ApiError::unavailable(
                    "the log did not acknowledge the command; retry with the same command_id",
                )
            }
        })
}

/// `GET /v1/commands/{id}`: pending until decided; then applied or rejected. A memory command
/// carries its decision row (reason, log position); a task command carries the events the
/// orchestrator wrote for it (a `COMMAND_REJECTED` one with the reason when it was refused).
#[derive(Debug, Serialize, Deserialize)]
pub struct CommandStatus {
    pub command_id: Uuid,
    pub status: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub decision: Option<CommandRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventRow>>,
}

pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<CommandStatus>, ApiError> {
    let command_id = crate::memories::parse_uuid("command_id", &id)?;
    // What an agent may learn of a command: its own (or its granted namespaces').
    let reader = caller.reader(&headers)?;
    let row = observe(
        m::POSTGRES_SECONDS,
        m::POSTGRES_ERRORS,
        "command_status",
        queries::command(&state.pool, command_id),
    )
    .await
    .map_err(|e| ApiError::internal("cannot read the command status", e))?;
    if let Some(row) = row {
        if reader.as_ref().is_some_and(|r| *r != row.namespace) && !caller.may_write(&row.namespace) {
            // Not told apart from a command never decided.
            return Err(ApiError::not_found(format!("no command {command_id} of yours")));
        }
        return Ok(Json(CommandStatus {
            command_id,
            status: row.status.clone(),
            decision: Some(row),
            events: None,
        }));
    }
    let events = observe(
        m::POSTGRES_SECONDS,
        m::POSTGRES_ERRORS,
        "command_status",
        tasks::command_events(&state.pool, &command_id.to_string()),
    )
    .await
    .map_err(|e| ApiError::internal("cannot read the command status", e))?;
    // A task command's decisions: only those about the reader's tasks, agents or commands.
    if let Some(reader) = &reader
        && !events.is_empty()
        && !events
            .iter()
            .any(|e| crate::auth::involves(reader, e.agent_id.as_deref(), e.actor.as_deref()))
    {
        return Err(ApiError::not_found(format!("no command {command_id} of yours")));
    }
    let status = if events.is_empty() {
        "pending"
    } else if events.iter().any(|e| e.event_type == "COMMAND_REJECTED") {
        "rejected"
    } else {
        "applied"
    };
    Ok(Json(CommandStatus {
        command_id,
        status: status.into(),
        decision: None,
        events: (!events.is_empty()).then_some(events),
    }))
}
