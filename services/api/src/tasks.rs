//! Task endpoints. Commands (each validated, appended to `topics.task_commands` keyed by its
//! routing key, answered `202` once the broker acknowledged): `POST /v1/agents`,
//! `POST /v1/agents/{agent}/heartbeat`, `DELETE /v1/agents/{agent}`, `POST /v1/tasks`,
//! `POST /v1/tasks/{id}/start|complete|fail|cancel`, `POST /v1/workflow-templates`,
//! `POST /v1/workflows`. Queries (from the task views the projector keeps from the
//! orchestrator's events): `GET /v1/agents`, `GET /v1/agents/{agent}/inbox` (Redis, PostgreSQL
//! when Redis has no copy or fails), `GET /v1/tasks` (filters, keyset pagination),
//! `GET /v1/tasks/{id}` (with its event history), `GET /v1/workflow-templates/{name}`, `GET /v1/workflows/{id}` (each step's state and
//! result), `GET /v1/orchestrator/stats`.
//!
//! Read your writes: a query carrying `X-Memos-Command` (command ids from `202` answers,
//! comma-separated) waits, up to `memory.read_your_writes_timeout`, until the views record
//! the orchestrator's decision of each (`504 not_caught_up` otherwise); the inbox is then read
//! from PostgreSQL, which Redis follows. (`X-Memos-Position` names memory-log positions and is
//! not used here: a task command's effect is an event on another topic.)
//!
//! Commands about an existing task are routed to the partition of its workflow, so the API
//! looks the task up first: a task the views do not know yet answers `404`. As for memories,
//! what the orchestrator could only reject answers `409` when the request carries no
//! `command_id` (so it cannot be a retry): a client-chosen task, workflow or template version
//! that exists, a command about a finished task. The orchestrator
//! decides every command in log order; one it refuses shows up as a `COMMAND_REJECTED` event
//! in the task's history. Task ids of workflow steps contain a `/` (`<workflow>/<step>`):
//! send it percent-encoded (`%2F`) in paths.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use memos_postgres::tasks::{self, AgentView, EventRow, InboxItem, TaskRow, TemplateRow};
use memos_runtime::metrics::{self as m, observe};
use memos_schemas::task::{
    AgentHeartbeat, CancelTask, CompleteTask, DefineWorkflowTemplate, DelegateTask, DeregisterAgent,
    FailTask, RegisterAgent, StartTask, StartWorkflow, TaskCommand, WorkflowStep,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::{self, Caller};
use crate::commands::{self, Accepted, TaskIds};
use crate::error::ApiError;
use crate::server::AppState;

/// Attempt timeout when a delegation names none: five minutes.
pub const DEFAULT_TIMEOUT_MS: i64 = 5 * 60 * 1000;
/// Attempts when a delegation names none.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

type Answer = Result<(StatusCode, Json<Accepted>), ApiError>;

/// A JSON body that may be absent (an empty body reads as the default).
fn optional_body<T: DeserializeOwned + Default>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is too large",
            )
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()),
    })
}

fn json_text(value: Option<Value>, default: Value) -> String {
    value.unwrap_or(default).to_string()
}

async fn read<T, E: std::fmt::Display>(
    op: &'static str,
    what: &str,
    future: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ApiError> {
    observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, op, future)
        .await
        .map_err(|e| ApiError::internal(&format!("cannot read {what}"), e))
}

/// Header naming task commands whose decisions a query must include.
pub const COMMAND_HEADER: &str = "x-memos-command";

/// Waits until the views include the decisions of the commands named in `X-Memos-Command`.
/// Returns whether the request named any.
async fn wait_for_commands(state: &AppState, headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(value) = headers.get(COMMAND_HEADER) else {
        return Ok(false);
    };
    let invalid = || {
        ApiError::bad_request("X-Memos-Command must be command ids (UUIDs), comma-separated")
            .with_field(COMMAND_HEADER)
    };
    let ids: Vec<String> = value
        .to_str()
        .map_err(|_| invalid())?
        .split(',')
        .map(|id| {
            Uuid::parse_str(id.trim())
                .map(|u| u.to_string())
                .map_err(|_| invalid())
        })
        .collect::<Result<_, _>>()?;
    let bound = state.config.memory.read_your_writes_timeout;
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        let decided = read(
            "decided_commands",
            "the decided commands",
            tasks::decided_commands(&state.pool, &ids),
        )
        .await?;
        if decided >= ids.len() as i64 {
            return Ok(true);
        }
        if start.elapsed() >= bound {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "not_caught_up",
                format!(
                    "waited {bound:?}: {decided} of the {} commands are decided in the views; retry later",
                    ids.len()
                ),
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

// ---- agents ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgentRequest {
    pub agent_id: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Most tasks held at once; 1 when absent.
    #[serde(default)]
    pub max_concurrent: Option<i32>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn register_agent(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<RegisterAgentRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    let agent_id = request.agent_id.clone();
    let command = TaskCommand::RegisterAgent(RegisterAgent {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        agent_id: request.agent_id,
        capabilities: request.capabilities,
        max_concurrent: request.max_concurrent.unwrap_or(1),
        metadata_json: json_text(request.metadata, json!({})),
    });
    let ids = TaskIds {
        agent_id: Some(agent_id),
        ..TaskIds::default()
    };
    commands::append_task(&state, command, h.tracestate.as_deref(), ids).await
}

/// The optional body of commands that need nothing but a command id.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandIdOnly {
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn heartbeat(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let request: CommandIdOnly = optional_body(body)?;
    let h = commands::header(&caller, &headers, Some(&agent), request.command_id)?;
    let command = TaskCommand::Heartbeat(AgentHeartbeat {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        agent_id: agent.clone(),
    });
    let ids = TaskIds {
        agent_id: Some(agent),
        ..TaskIds::default()
    };
    commands::append_task(&state, command, h.tracestate.as_deref(), ids).await
}

pub async fn deregister_agent(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let request: CommandIdOnly = optional_body(body)?;
    let h = commands::header(&caller, &headers, Some(&agent), request.command_id)?;
    let command = TaskCommand::DeregisterAgent(DeregisterAgent {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        agent_id: agent.clone(),
    });
    let ids = TaskIds {
        agent_id: Some(agent),
        ..TaskIds::default()
    };
    commands::append_task(&state, command, h.tracestate.as_deref(), ids).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsParams {
    /// `alive`, `lost` or `deregistered`.
    pub status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Agents {
    pub items: Vec<AgentView>,
}

pub async fn agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<AgentsParams>, QueryRejection>,
) -> Result<Json<Agents>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    wait_for_commands(&state, &headers).await?;
    if let Some(status) = params.status.as_deref()
        && !["alive", "lost", "deregistered"].contains(&status)
    {
        return Err(ApiError::bad_request("status must be alive, lost or deregistered").with_field("status"));
    }
    let items = read(
        "agents",
        "the agents",
        tasks::agents(&state.pool, params.status.as_deref()),
    )
    .await?;
    Ok(Json(Agents { items }))
}

/// `GET /v1/agents/{agent}/inbox`: the tasks the agent holds, highest priority first.
#[derive(Debug, Serialize, Deserialize)]
pub struct Inbox {
    pub agent_id: String,
    /// `redis` or `postgres`: where the answer came from.
    pub source: String,
    pub items: Vec<InboxItem>,
    /// Status, load and limit of the agent (absent when it never registered).
    pub availability: Option<AgentView>,
}

pub async fn inbox(
    State(state): State<AppState>,
    Path(agent): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<Inbox>, ApiError> {
    caller.may_read_agent(&headers, &agent)?;
    // After a wait, PostgreSQL has the decisions; Redis follows it by a moment.
    let cached = if wait_for_commands(&state, &headers).await? {
        Ok((None, None))
    } else {
        observe(m::REDIS_SECONDS, m::REDIS_ERRORS, "inbox", async {
            let inbox = state.hot.inbox(&agent).await?;
            let availability = state.hot.availability(&agent).await?;
            Ok::<_, memos_redis::hot::Error>((inbox, availability))
        })
        .await
    };
    match cached {
        Ok((Some(items), availability)) => {
            let items: Result<Vec<InboxItem>, _> = serde_json::from_str(&items);
            let availability: Result<Option<AgentView>, _> =
                availability.map(|a| serde_json::from_str(&a)).transpose();
            // Redis holds the first INBOX_CACHE_LIMIT items; a fuller inbox is read from PostgreSQL.
            if let (Ok(items), Ok(availability)) = (items, availability)
                && availability
                    .as_ref()
                    .is_none_or(|a| usize::try_from(a.load).unwrap_or(0) <= items.len())
            {
                return Ok(Json(Inbox {
                    agent_id: agent,
                    source: "redis".into(),
                    items,
                    availability,
                }));
            }
            tracing::warn!(%agent, "unreadable inbox in Redis; reading PostgreSQL");
        }
        Ok((None, _)) => {}
        // While the breaker is open every read lands here; it logged the outage once.
        Err(e) if state.hot.breaker_open() => {
            tracing::debug!(error = %e, "inbox unavailable in Redis; reading PostgreSQL")
        }
        Err(e) => tracing::warn!(error = %e, "inbox unavailable in Redis; reading PostgreSQL"),
    }
    let (availability, items) =
        read("inbox", "the inbox", tasks::agent_and_inbox(&state.pool, &agent)).await?;
    if availability.is_none() && items.is_empty() {
        return Err(ApiError::not_found(format!("no agent {agent}")));
    }
    Ok(Json(Inbox {
        agent_id: agent,
        source: "postgres".into(),
        items,
        availability,
    }))
}

// ---- tasks ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegateRequest {
    /// Generated (UUIDv7) when absent.
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub required_capabilities: Vec<String>,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub preferred_agent: Option<String>,
    #[serde(default)]
    pub workflow_id: Option<String>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn delegate(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<DelegateRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, None, request.command_id)?;
    let chosen = request.task_id.is_some();
    let task_id = request.task_id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let command = TaskCommand::Delegate(DelegateTask {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        task_id: task_id.clone(),
        required_capabilities: request.required_capabilities,
        payload_json: json_text(request.payload, Value::Null),
        priority: request.priority.unwrap_or(0),
        timeout_ms: request.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
        max_attempts: request.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        preferred_agent: request.preferred_agent,
        workflow_id: request.workflow_id.clone(),
    });
    // Validated before any lookup: a view is never queried with what it cannot hold.
    command.validate()?;
    if chosen
        && request.command_id.is_none()
        && read("task_lookup", "the task", tasks::task(&state.pool, &task_id))
            .await?
            .is_some()
    {
        // A client-chosen id without a command id cannot be a retry of an accepted delegation.
        return Err(conflict(format!("task {task_id} exists")));
    }
    let ids = TaskIds {
        task_id: Some(task_id),
        workflow_id: request.workflow_id,
        agent_id: None,
    };
    commands::append_task(&state, command, h.tracestate.as_deref(), ids).await
}

/// Statuses a task can have.
const TASK_STATUSES: [&str; 7] = [
    "pending",
    "assigned",
    "running",
    "completed",
    "failed",
    "dead_lettered",
    "cancelled",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListTasksParams {
    pub agent_id: Option<String>,
    pub status: Option<String>,
    pub workflow_id: Option<String>,
    /// 1 to 200, 50 when absent.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of tasks, newest change first.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskPage {
    pub items: Vec<TaskRow>,
    /// Pass back as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// `GET /v1/tasks?agent_id&status&workflow_id&limit&cursor`.
pub async fn list_tasks(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<ListTasksParams>, QueryRejection>,
) -> Result<Json<TaskPage>, ApiError> {
    let Query(mut params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    // An agent lists its own tasks (a service those of the agent it reads for).
    if let Some(reader) = caller.reader_for(&headers, params.agent_id.as_deref())? {
        match &params.agent_id {
            Some(agent) if *agent != reader => {
                return Err(auth::deny(
                    StatusCode::FORBIDDEN,
                    "not_own_agent",
                    caller.name(),
                    format!("{reader} may list only its own tasks"),
                ));
            }
            _ => params.agent_id = Some(reader),
        }
    }
    if let Some(status) = params.status.as_deref()
        && !TASK_STATUSES.contains(&status)
    {
        return Err(
            ApiError::bad_request(format!("status must be one of {}", TASK_STATUSES.join(", ")))
                .with_field("status"),
        );
    }
    let limit = params.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 200").with_field("limit"));
    }
    let after = params
        .cursor
        .as_deref()
        .map(|cursor| {
            let (ms, task_id) = cursor.split_once(':').unwrap_or_default();
            let time = ms
                .parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .filter(|_| !task_id.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request("cursor is not one this API gave").with_field("cursor")
                })?;
            Ok::<_, ApiError>((time, task_id.to_owned()))
        })
        .transpose()?;
    wait_for_commands(&state, &headers).await?;
    let filter = tasks::TaskFilter {
        agent_id: params.agent_id,
        status: params.status,
        workflow_id: params.workflow_id,
        after,
        limit,
    };
    let items = read("tasks", "the tasks", tasks::list_tasks(&state.pool, &filter)).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last())
        .flatten()
        .map(|t| format!("{}:{}", t.updated_at.timestamp_millis(), t.task_id));
    Ok(Json(TaskPage { items, next_cursor }))
}

/// `GET /v1/tasks/{id}`: the task and every event about it, in log order.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskWithHistory {
    #[serde(flatten)]
    pub task: TaskRow,
    pub events: Vec<EventRow>,
}

pub async fn task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<TaskWithHistory>, ApiError> {
    let reader = caller.reader(&headers)?;
    wait_for_commands(&state, &headers).await?;
    let task = read("task", "the task", tasks::task(&state.pool, &id)).await?;
    let events = read("task", "the task's history", tasks::task_events(&state.pool, &id)).await?;
    // An agent reads the tasks it delegated or was assigned; not told apart from none.
    if let Some(reader) = reader {
        let mine = task
            .as_ref()
            .is_some_and(|t| auth::involves(&reader, t.agent_id.as_deref(), t.actor.as_deref()))
            || events
                .iter()
                .any(|e| auth::involves(&reader, e.agent_id.as_deref(), e.actor.as_deref()));
        if !mine {
            return Err(ApiError::not_found(format!("no task {id} of yours")));
        }
    }
    match task {
        Some(task) => Ok(Json(TaskWithHistory { task, events })),
        // Only rejected commands name it (a refused delegation): say why.
        None => Err(ApiError::not_found(
            match events.iter().rev().find_map(|e| e.reason.as_deref()) {
                Some(reason) => format!("no task {id}; last rejected command: {reason}"),
                None => format!("no task {id}"),
            },
        )),
    }
}

/// A known task (its workflow is the command's routing key), or `404`.
///
/// Without a `command_id` (so the request cannot be a retry of one already applied), a task
/// that has finished (completed, dead-lettered, cancelled) answers `409`: views only move
/// forward, so the orchestrator could only reject the command.
async fn known_task(state: &AppState, task_id: &str, command_id: Option<Uuid>) -> Result<TaskRow, ApiError> {
    let task = read("task_lookup", "the task", tasks::task(&state.pool, task_id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {task_id}")))?;
    if command_id.is_none() && ["completed", "dead_lettered", "cancelled"].contains(&task.status.as_str()) {
        return Err(conflict(format!("task {task_id} is already {}", task.status)));
    }
    Ok(task)
}

fn conflict(message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", message)
}

/// Appends a command about an existing task: validated first (a bad request is refused before
/// any lookup), then, once the task is known and `allowed` for it, routed to the task's
/// workflow (its routing key).
async fn append_for_task(
    state: &AppState,
    mut command: TaskCommand,
    command_id: Option<Uuid>,
    tracestate: Option<&str>,
    agent_id: Option<String>,
    allowed: impl FnOnce(&TaskRow) -> Result<(), ApiError>,
) -> Answer {
    command.validate()?;
    let (task_id, workflow_id) = match &mut command {
        TaskCommand::Start(c) => (c.task_id.clone(), &mut c.workflow_id),
        TaskCommand::Complete(c) => (c.task_id.clone(), &mut c.workflow_id),
        TaskCommand::Fail(c) => (c.task_id.clone(), &mut c.workflow_id),
        TaskCommand::Cancel(c) => (c.task_id.clone(), &mut c.workflow_id),
        _ => return Err(ApiError::bad_request("not a command about a task")),
    };
    let task = known_task(state, &task_id, command_id).await?;
    allowed(&task)?;
    workflow_id.clone_from(&task.workflow_id);
    let ids = TaskIds {
        task_id: Some(task.task_id),
        workflow_id: task.workflow_id,
        agent_id,
    };
    commands::append_task(state, command, tracestate, ids).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub agent_id: String,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn start(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    let command = TaskCommand::Start(StartTask {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        task_id: id,
        agent_id: request.agent_id.clone(),
        workflow_id: None,
    });
    let agent = Some(request.agent_id);
    append_for_task(
        &state,
        command,
        request.command_id,
        h.tracestate.as_deref(),
        agent,
        // The orchestrator decides whether the agent holds it.
        |_| Ok(()),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    pub agent_id: String,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<CompleteRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    let command = TaskCommand::Complete(CompleteTask {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        task_id: id,
        agent_id: request.agent_id.clone(),
        workflow_id: None,
        result_json: json_text(request.result, Value::Null),
    });
    let agent = Some(request.agent_id);
    append_for_task(
        &state,
        command,
        request.command_id,
        h.tracestate.as_deref(),
        agent,
        // The orchestrator decides whether the agent holds it.
        |_| Ok(()),
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    pub agent_id: String,
    pub error: String,
    /// Whether another attempt may succeed; true when absent.
    #[serde(default)]
    pub retriable: Option<bool>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn fail(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<FailRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, Some(&request.agent_id), request.command_id)?;
    let command = TaskCommand::Fail(FailTask {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        task_id: id,
        agent_id: request.agent_id.clone(),
        workflow_id: None,
        error: request.error,
        retriable: request.retriable.unwrap_or(true),
    });
    let agent = Some(request.agent_id);
    append_for_task(
        &state,
        command,
        request.command_id,
        h.tracestate.as_deref(),
        agent,
        // The orchestrator decides whether the agent holds it.
        |_| Ok(()),
    )
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let request: CancelRequest = optional_body(body)?;
    let h = commands::header(&caller, &headers, None, request.command_id)?;
    let command = TaskCommand::Cancel(CancelTask {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        task_id: id.clone(),
        workflow_id: None,
        reason: request.reason,
    });
    command.validate()?;
    // Only whoever delegated the task, or started its workflow (or a service for them), may
    // cancel it; its holder fails it instead.
    let task = known_task(&state, &id, request.command_id).await?;
    let starter = match &task.workflow_id {
        Some(workflow) => read("workflow", "the workflow", tasks::workflow(&state.pool, workflow))
            .await?
            .and_then(|w| w.actor),
        None => None,
    };
    caller.may_cancel(&headers, &id, &[task.actor.as_deref(), starter.as_deref()])?;
    append_for_task(
        &state,
        command,
        request.command_id,
        h.tracestate.as_deref(),
        None,
        |_| Ok(()),
    )
    .await
}

// ---- workflows ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    pub step_id: String,
    pub capability: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefineTemplateRequest {
    pub name: String,
    /// 1 when absent.
    #[serde(default)]
    pub version: Option<i32>,
    pub steps: Vec<StepRequest>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn define_template(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<DefineTemplateRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, None, request.command_id)?;
    let version = request.version.unwrap_or(1);
    let name = request.name.clone();
    let command = TaskCommand::DefineTemplate(DefineWorkflowTemplate {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        name: request.name,
        version,
        steps: request
            .steps
            .into_iter()
            .map(|s| WorkflowStep {
                step_id: s.step_id,
                capability: s.capability,
                depends_on: s.depends_on,
                timeout_ms: s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
                max_attempts: s.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            })
            .collect(),
    });
    // The steps form a runnable graph (or the answer is 422 naming the step) before any
    // lookup and before the append: the orchestrator would only reject it later.
    command.validate()?;
    if request.command_id.is_none()
        && read(
            "template",
            "the template",
            tasks::template(&state.pool, &name, Some(version)),
        )
        .await?
        .is_some()
    {
        return Err(conflict(format!(
            "workflow template {name} version {version} exists"
        )));
    }
    commands::append_task(&state, command, h.tracestate.as_deref(), TaskIds::default()).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateParams {
    /// The latest version when absent.
    pub version: Option<i32>,
}

pub async fn template(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    params: Result<Query<TemplateParams>, QueryRejection>,
) -> Result<Json<TemplateRow>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    wait_for_commands(&state, &headers).await?;
    read(
        "template",
        "the template",
        tasks::template(&state.pool, &name, params.version),
    )
    .await?
    .map(Json)
    .ok_or_else(|| ApiError::not_found(format!("no workflow template {name}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartWorkflowRequest {
    /// Generated (UUIDv7) when absent.
    #[serde(default)]
    pub workflow_id: Option<String>,
    pub template: String,
    /// The latest version when absent.
    #[serde(default)]
    pub template_version: Option<i32>,
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub priority: Option<i32>,
    #[serde(default)]
    pub command_id: Option<Uuid>,
}

pub async fn start_workflow(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Json<StartWorkflowRequest>, JsonRejection>,
) -> Answer {
    let Json(request) = body?;
    let h = commands::header(&caller, &headers, None, request.command_id)?;
    let chosen = request.workflow_id.is_some();
    let workflow_id = request.workflow_id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let command = TaskCommand::StartWorkflow(StartWorkflow {
        command_id: h.command_id,
        actor: h.actor,
        issued_at: h.issued_at,
        traceparent: h.traceparent,
        workflow_id: workflow_id.clone(),
        template: request.template,
        template_version: request.template_version,
        input_json: json_text(request.input, json!({})),
        priority: request.priority.unwrap_or(0),
    });
    command.validate()?;
    if chosen
        && request.command_id.is_none()
        && read(
            "workflow",
            "the workflow",
            tasks::workflow(&state.pool, &workflow_id),
        )
        .await?
        .is_some()
    {
        return Err(conflict(format!("workflow {workflow_id} exists")));
    }
    let ids = TaskIds {
        workflow_id: Some(workflow_id),
        ..TaskIds::default()
    };
    commands::append_task(&state, command, h.tracestate.as_deref(), ids).await
}

/// One step of a workflow: the template's definition and the state of its task.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepState {
    pub step_id: String,
    pub capability: Option<String>,
    pub depends_on: Vec<String>,
    /// The task's status, or `waiting` while its dependencies have not completed.
    pub status: String,
    pub task_id: Option<String>,
    pub agent_id: Option<String>,
    pub attempt: Option<i32>,
    pub result: Option<Value>,
    pub last_error: Option<String>,
    pub duration_ms: Option<i64>,
}

pub async fn workflow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let reader = caller.reader(&headers)?;
    wait_for_commands(&state, &headers).await?;
    let workflow = read("workflow", "the workflow", tasks::workflow(&state.pool, &id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no workflow {id}")))?;
    let template = read(
        "template",
        "the workflow's template",
        tasks::template(&state.pool, &workflow.template, workflow.template_version),
    )
    .await?;
    let mut tasks = read(
        "workflow",
        "the workflow's tasks",
        tasks::workflow_tasks(&state.pool, &id),
    )
    .await?;
    // An agent reads the workflows it started, or holds or delegated a task of; not told
    // apart from none.
    if let Some(reader) = reader
        && !auth::involves(&reader, None, workflow.actor.as_deref())
        && !tasks
            .iter()
            .any(|t| auth::involves(&reader, t.agent_id.as_deref(), t.actor.as_deref()))
    {
        return Err(ApiError::not_found(format!("no workflow {id} of yours")));
    }
    let defined: Vec<WorkflowStep> = template
        .and_then(|t| serde_json::from_value(t.steps).ok())
        .unwrap_or_default();
    let mut steps: Vec<StepState> = defined
        .into_iter()
        .map(|step| {
            let task = tasks
                .iter()
                .position(|t| t.step_id.as_deref() == Some(step.step_id.as_str()))
                .map(|i| tasks.remove(i));
            step_state(step.step_id, Some(step.capability), step.depends_on, task)
        })
        .collect();
    // Tasks of the workflow that no template step names (delegated with its id).
    steps.extend(tasks.into_iter().map(|task| {
        let step_id = task.step_id.clone().unwrap_or_else(|| task.task_id.clone());
        step_state(step_id, None, Vec::new(), Some(task))
    }));
    let mut body = serde_json::to_value(&workflow).map_err(|e| ApiError::internal("cannot encode", e))?;
    body["steps"] = serde_json::to_value(&steps).map_err(|e| ApiError::internal("cannot encode", e))?;
    Ok(Json(body).into_response())
}

fn step_state(
    step_id: String,
    capability: Option<String>,
    depends_on: Vec<String>,
    task: Option<TaskRow>,
) -> StepState {
    match task {
        Some(task) => StepState {
            step_id,
            capability: capability.or_else(|| task.required_capabilities.first().cloned()),
            depends_on,
            status: task.status,
            task_id: Some(task.task_id),
            agent_id: task.agent_id,
            attempt: Some(task.attempt),
            result: task.result,
            last_error: task.last_error,
            duration_ms: task.duration_ms,
        },
        None => StepState {
            step_id,
            capability,
            depends_on,
            status: "waiting".into(),
            task_id: None,
            agent_id: None,
            attempt: None,
            result: None,
            last_error: None,
            duration_ms: None,
        },
    }
}

// ---- figures ----

/// `GET /v1/orchestrator/stats`: the seed's figures, from the views.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub completed_workflows: i64,
    pub active_workflows: i64,
    pub failed_workflows: i64,
    pub total_tasks_delegated: i64,
    /// Mean time from acceptance to completion of completed tasks.
    pub average_completion_ms: Option<f64>,
    pub average_workflow_duration_ms: Option<f64>,
    pub tasks: TaskCounts,
    /// Every registered agent with its load.
    pub agents: Vec<AgentLoad>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskCounts {
    pub pending: i64,
    pub in_progress: i64,
    pub completed: i64,
    pub dead_lettered: i64,
    pub cancelled: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentLoad {
    pub agent_id: String,
    pub status: String,
    pub load: i32,
    pub max_concurrent: i32,
}

pub async fn stats(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
) -> Result<Json<Stats>, ApiError> {
    wait_for_commands(&state, &headers).await?;
    let figures = read("orchestrator_stats", "the figures", tasks::stats(&state.pool)).await?;
    let agents = read("agents", "the agents", tasks::agents(&state.pool, None)).await?;
    Ok(Json(Stats {
        completed_workflows: figures.workflows_completed,
        active_workflows: figures.workflows_active,
        failed_workflows: figures.workflows_failed,
        total_tasks_delegated: figures.tasks_delegated,
        average_completion_ms: figures.average_completion_ms,
        average_workflow_duration_ms: figures.average_workflow_ms,
        tasks: TaskCounts {
            pending: figures.tasks_pending,
            in_progress: figures.tasks_in_progress,
            completed: figures.tasks_completed,
            dead_lettered: figures.tasks_dead_lettered,
            cancelled: figures.tasks_cancelled,
        },
        agents: agents
            .into_iter()
            .map(|a| AgentLoad {
                agent_id: a.agent_id,
                status: a.status,
                load: a.load,
                max_concurrent: a.max_concurrent,
            })
            .collect(),
    }))
}
