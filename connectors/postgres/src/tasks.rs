//! The task views (agents, tasks, workflows, templates, the task-event audit trail): loading
//! the rows a batch of task events touches, writing what the task fold decided, and the
//! queries the API serves.
//!
//! Writes are set-based: one statement per table per batch (rows passed as one JSON array and
//! expanded with `jsonb_to_recordset`). They take the caller's transaction, so the projector
//! commits them together with its offsets. Event rows are keyed by their log position, so a
//! replayed record can never be recorded twice.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};

macro_rules! task_columns {
    () => {
        "task_id, workflow_id, step_id, status, agent_id, attempt, required_capabilities, payload, \
         priority, timeout_ms, max_attempts, preferred_agent, actor, result, last_error, deadline, \
         duration_ms, accepted_at, assigned_at, started_at, finished_at, updated_at, log_partition, \
         log_offset"
    };
}

macro_rules! workflow_columns {
    () => {
        "workflow_id, template, template_version, status, input, priority, results, failed_step, \
         reason, actor, started_at, finished_at, duration_ms, updated_at, log_partition, log_offset"
    };
}

macro_rules! event_columns {
    () => {
        "log_topic, log_partition, log_offset, event_id, type, at, task_id, workflow_id, step_id, \
         agent_id, attempt, reason, command_id, command_type, actor, data, traceparent, record_time"
    };
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentRow {
    pub agent_id: String,
    pub capabilities: Vec<String>,
    pub max_concurrent: i32,
    pub metadata: serde_json::Value,
    /// `alive`, `lost` or `deregistered`.
    pub status: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TaskRow {
    pub task_id: String,
    pub workflow_id: Option<String>,
    pub step_id: Option<String>,
    /// `pending`, `assigned`, `running`, `completed`, `failed`, `dead_lettered`, `cancelled`.
    pub status: String,
    /// The holder, or the last one once the task left it.
    pub agent_id: Option<String>,
    pub attempt: i32,
    pub required_capabilities: Vec<String>,
    pub payload: Option<serde_json::Value>,
    pub priority: i32,
    pub timeout_ms: Option<i64>,
    pub max_attempts: Option<i32>,
    pub preferred_agent: Option<String>,
    pub actor: Option<String>,
    pub result: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub deadline: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub log_partition: i32,
    pub log_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct WorkflowRow {
    pub workflow_id: String,
    pub template: String,
    pub template_version: Option<i32>,
    /// `running`, `completed`, `failed` or `cancelled`.
    pub status: String,
    pub input: Option<serde_json::Value>,
    pub priority: i32,
    pub results: Option<serde_json::Value>,
    pub failed_step: Option<String>,
    pub reason: Option<String>,
    pub actor: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub updated_at: DateTime<Utc>,
    pub log_partition: i32,
    pub log_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct TemplateRow {
    pub name: String,
    pub version: i32,
    /// `[{step_id, capability, depends_on, timeout_ms, max_attempts}]`.
    pub steps: serde_json::Value,
    pub actor: Option<String>,
    pub defined_at: DateTime<Utc>,
}

/// One task event as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct EventRow {
    pub log_topic: String,
    pub log_partition: i32,
    pub log_offset: i64,
    pub event_id: String,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub event_type: String,
    pub at: DateTime<Utc>,
    pub task_id: Option<String>,
    pub workflow_id: Option<String>,
    pub step_id: Option<String>,
    pub agent_id: Option<String>,
    pub attempt: Option<i32>,
    pub reason: Option<String>,
    pub command_id: Option<String>,
    pub command_type: Option<String>,
    pub actor: Option<String>,
    pub data: Option<serde_json::Value>,
    pub traceparent: Option<String>,
    pub record_time: DateTime<Utc>,
}

/// The current rows a batch of events touches.
#[derive(Debug, Default, Clone)]
pub struct TaskState {
    pub agents: HashMap<String, AgentRow>,
    pub tasks: HashMap<String, TaskRow>,
    pub workflows: HashMap<String, WorkflowRow>,
}

/// What a batch decided, to be written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct TaskChanges {
    /// Final state of every row the batch changed.
    pub agents: Vec<AgentRow>,
    pub tasks: Vec<TaskRow>,
    pub workflows: Vec<WorkflowRow>,
    pub templates: Vec<TemplateRow>,
    pub events: Vec<EventRow>,
    /// Agents whose inbox or availability may have changed, sorted and unique.
    pub touched_agents: Vec<String>,
}

/// Loads (and locks, in key order) the rows of the given ids.
pub async fn load_state(
    conn: &mut PgConnection,
    agent_ids: &[String],
    task_ids: &[String],
    workflow_ids: &[String],
) -> Result<TaskState, sqlx::Error> {
    let mut state = TaskState::default();
    if !agent_ids.is_empty() {
        let rows: Vec<AgentRow> = sqlx::query_as(
            "SELECT agent_id, capabilities, max_concurrent, metadata, status, last_heartbeat_at,
                    registered_at, updated_at
             FROM agents WHERE agent_id = ANY($1) ORDER BY agent_id FOR UPDATE",
        )
        .bind(agent_ids)
        .fetch_all(&mut *conn)
        .await?;
        state.agents = rows.into_iter().map(|r| (r.agent_id.clone(), r)).collect();
    }
    if !task_ids.is_empty() {
        let rows: Vec<TaskRow> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE task_id = ANY($1) ORDER BY task_id FOR UPDATE"
        ))
        .bind(task_ids)
        .fetch_all(&mut *conn)
        .await?;
        state.tasks = rows.into_iter().map(|r| (r.task_id.clone(), r)).collect();
    }
    if !workflow_ids.is_empty() {
        let rows: Vec<WorkflowRow> = sqlx::query_as(concat!(
            "SELECT ",
            workflow_columns!(),
            " FROM workflows WHERE workflow_id = ANY($1) ORDER BY workflow_id FOR UPDATE"
        ))
        .bind(workflow_ids)
        .fetch_all(&mut *conn)
        .await?;
        state.workflows = rows.into_iter().map(|r| (r.workflow_id.clone(), r)).collect();
    }
    Ok(state)
}

fn json<T: Serialize>(rows: &T) -> String {
    serde_json::to_string(rows).expect("view rows serialize")
}

/// Writes what a batch decided, one statement per table, and moves the Redis revision of
/// every touched agent.
pub async fn write(conn: &mut PgConnection, changes: &TaskChanges) -> Result<(), sqlx::Error> {
    if !changes.agents.is_empty() {
        sqlx::query(
            "INSERT INTO agents (agent_id, capabilities, max_concurrent, metadata, status,
                                 last_heartbeat_at, registered_at, updated_at)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(agent_id text, capabilities text[],
                  max_concurrent int, metadata jsonb, status text, last_heartbeat_at timestamptz,
                  registered_at timestamptz, updated_at timestamptz)
             ON CONFLICT (agent_id) DO UPDATE SET
                capabilities = EXCLUDED.capabilities, max_concurrent = EXCLUDED.max_concurrent,
                metadata = EXCLUDED.metadata, status = EXCLUDED.status,
                last_heartbeat_at = EXCLUDED.last_heartbeat_at,
                registered_at = EXCLUDED.registered_at, updated_at = EXCLUDED.updated_at",
        )
        .bind(json(&changes.agents))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.tasks.is_empty() {
        sqlx::query(
            "INSERT INTO tasks (task_id, workflow_id, step_id, status, agent_id, attempt,
                                required_capabilities, payload, priority, timeout_ms, max_attempts,
                                preferred_agent, actor, result, last_error, deadline, duration_ms,
                                accepted_at, assigned_at, started_at, finished_at, updated_at,
                                log_partition, log_offset)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(task_id text, workflow_id text,
                  step_id text, status text, agent_id text, attempt int, required_capabilities text[],
                  payload jsonb, priority int, timeout_ms bigint, max_attempts int,
                  preferred_agent text, actor text, result jsonb, last_error text,
                  deadline timestamptz, duration_ms bigint, accepted_at timestamptz,
                  assigned_at timestamptz, started_at timestamptz, finished_at timestamptz,
                  updated_at timestamptz, log_partition int, log_offset bigint)
             ON CONFLICT (task_id) DO UPDATE SET
                workflow_id = EXCLUDED.workflow_id, step_id = EXCLUDED.step_id,
                status = EXCLUDED.status, agent_id = EXCLUDED.agent_id, attempt = EXCLUDED.attempt,
                required_capabilities = EXCLUDED.required_capabilities, payload = EXCLUDED.payload,
                priority = EXCLUDED.priority, timeout_ms = EXCLUDED.timeout_ms,
                max_attempts = EXCLUDED.max_attempts, preferred_agent = EXCLUDED.preferred_agent,
                actor = EXCLUDED.actor, result = EXCLUDED.result, last_error = EXCLUDED.last_error,
                deadline = EXCLUDED.deadline, duration_ms = EXCLUDED.duration_ms,
                accepted_at = EXCLUDED.accepted_at, assigned_at = EXCLUDED.assigned_at,
                started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
                updated_at = EXCLUDED.updated_at, log_partition = EXCLUDED.log_partition,
                log_offset = EXCLUDED.log_offset",
        )
        .bind(json(&changes.tasks))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.workflows.is_empty() {
        sqlx::query(
            "INSERT INTO workflows (workflow_id, template, template_version, status, input, priority,
                                    results, failed_step, reason, actor, started_at, finished_at,
                                    duration_ms, updated_at, log_partition, log_offset)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(workflow_id text, template text,
                  template_version int, status text, input jsonb, priority int, results jsonb,
                  failed_step text, reason text, actor text, started_at timestamptz,
                  finished_at timestamptz, duration_ms bigint, updated_at timestamptz,
                  log_partition int, log_offset bigint)
             ON CONFLICT (workflow_id) DO UPDATE SET
                template = EXCLUDED.template, template_version = EXCLUDED.template_version,
                status = EXCLUDED.status, input = EXCLUDED.input, priority = EXCLUDED.priority,
                results = EXCLUDED.results, failed_step = EXCLUDED.failed_step,
                reason = EXCLUDED.reason, actor = EXCLUDED.actor, started_at = EXCLUDED.started_at,
                finished_at = EXCLUDED.finished_at, duration_ms = EXCLUDED.duration_ms,
                updated_at = EXCLUDED.updated_at, log_partition = EXCLUDED.log_partition,
                log_offset = EXCLUDED.log_offset",
        )
        .bind(json(&changes.workflows))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.templates.is_empty() {
        sqlx::query(
            "INSERT INTO workflow_templates (name, version, steps, actor, defined_at)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(name text, version int, steps jsonb,
                  actor text, defined_at timestamptz)
             ON CONFLICT (name, version) DO NOTHING",
        )
        .bind(json(&changes.templates))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.events.is_empty() {
        sqlx::query(concat!(
            "INSERT INTO task_events (",
            event_columns!(),
            ") SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(log_topic text, log_partition int,
                  log_offset bigint, event_id text, type text, at timestamptz, task_id text,
                  workflow_id text, step_id text, agent_id text, attempt int, reason text,
                  command_id text, command_type text, actor text, data jsonb, traceparent text,
                  record_time timestamptz)
             ON CONFLICT DO NOTHING"
        ))
        .bind(json(&changes.events))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.touched_agents.is_empty() {
        sqlx::query(
            "INSERT INTO agent_view_revisions (agent_id, revision)
             SELECT a, 1 FROM UNNEST($1::text[]) AS a
             ON CONFLICT (agent_id) DO UPDATE SET revision = agent_view_revisions.revision + 1",
        )
        .bind(&changes.touched_agents)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A task an agent holds, as its inbox shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct InboxItem {
    pub task_id: String,
    pub workflow_id: Option<String>,
    pub step_id: Option<String>,
    /// `assigned` or `running`.
    pub status: String,
    pub attempt: i32,
    pub payload: Option<serde_json::Value>,
    pub priority: i32,
    pub deadline: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
}

/// An agent with its current load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentView {
    pub agent_id: String,
    pub status: String,
    /// Tasks assigned or running.
    pub load: i32,
    pub max_concurrent: i32,
    pub capabilities: Vec<String>,
    pub metadata: serde_json::Value,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub registered_at: DateTime<Utc>,
}

/// What Redis holds for an agent as of `revision`: its inbox (a JSON array of
/// [`InboxItem`]s) and availability (a JSON [`AgentView`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AgentSnapshot {
    pub agent_id: String,
    pub revision: i64,
    pub inbox: String,
    /// `None` when the agent never registered (its inbox may still be non-empty).
    pub availability: Option<String>,
}

macro_rules! agent_view_select {
    () => {
        "SELECT a.agent_id, a.status, \
         (SELECT count(*) FROM tasks t WHERE t.agent_id = a.agent_id \
            AND t.status IN ('assigned', 'running'))::int AS load, \
         a.max_concurrent, a.capabilities, a.metadata, a.last_heartbeat_at, a.registered_at \
         FROM agents a"
    };
}

/// Most inbox items copied to Redis per agent (the first by priority): rebuilding an agent's
/// whole inbox after every batch that touches it made the projection's cost grow with the
/// agents' load (1,262 delegations/s visible at 5,000/s with agents holding up to 1,000
/// tasks). The API reads PostgreSQL when an agent holds more than this.
pub const INBOX_CACHE_LIMIT: usize = 100;

/// The current inbox (its first [`INBOX_CACHE_LIMIT`] items) and availability of `agent_ids`
/// with their revisions, built as JSON by one statement (one snapshot, so the pieces agree
/// with each other and with the revision).
pub async fn agent_snapshots(pool: &PgPool, agent_ids: &[String]) -> Result<Vec<AgentSnapshot>, sqlx::Error> {
    if agent_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(concat!(
        "SELECT r.agent_id, r.revision,
            coalesce((SELECT json_agg(i ORDER BY i.priority DESC, i.assigned_at, i.task_id)
                      FROM (SELECT task_id, workflow_id, step_id, status, attempt, payload, priority,
                                   deadline, assigned_at
                            FROM tasks t WHERE t.agent_id = r.agent_id
                              AND t.status IN ('assigned', 'running')
                            ORDER BY priority DESC, assigned_at, task_id
                            LIMIT 100) i), '[]')::text AS inbox,
            (SELECT row_to_json(v)::text FROM (",
        agent_view_select!(),
        " WHERE a.agent_id = r.agent_id) v) AS availability
         FROM agent_view_revisions r WHERE r.agent_id = ANY($1)"
    ))
    .bind(agent_ids)
    .fetch_all(pool)
    .await
}

/// Agents whose newest revision has not reached Redis yet.
pub async fn unsynced_agents(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT agent_id FROM agent_view_revisions WHERE revision > synced_revision ORDER BY agent_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(a,)| a).collect())
}

/// Records that Redis holds these revisions (never moves backward).
pub async fn mark_synced(pool: &PgPool, synced: &[(String, i64)]) -> Result<(), sqlx::Error> {
    if synced.is_empty() {
        return Ok(());
    }
    let agents: Vec<&str> = synced.iter().map(|(a, _)| a.as_str()).collect();
    let revisions: Vec<i64> = synced.iter().map(|(_, r)| *r).collect();
    sqlx::query(
        "UPDATE agent_view_revisions v SET synced_revision = GREATEST(v.synced_revision, s.revision)
         FROM UNNEST($1::text[], $2::bigint[]) AS s(agent_id, revision)
         WHERE v.agent_id = s.agent_id",
    )
    .bind(&agents)
    .bind(&revisions)
    .execute(pool)
    .await?;
    Ok(())
}

// ---- queries the API serves ----

/// Every registered agent with its load, optionally only those of `status`.
pub async fn agents(pool: &PgPool, status: Option<&str>) -> Result<Vec<AgentView>, sqlx::Error> {
    sqlx::query_as(concat!(
        agent_view_select!(),
        " WHERE ($1::text IS NULL OR a.status = $1) ORDER BY a.agent_id"
    ))
    .bind(status)
    .fetch_all(pool)
    .await
}

pub async fn agent<'e>(
    db: impl sqlx::PgExecutor<'e>,
    agent_id: &str,
) -> Result<Option<AgentView>, sqlx::Error> {
    sqlx::query_as(concat!(agent_view_select!(), " WHERE a.agent_id = $1"))
        .bind(agent_id)
        .fetch_optional(db)
        .await
}

/// The tasks `agent_id` holds, highest priority first (the order of the cached inbox).
pub async fn inbox<'e>(db: impl sqlx::PgExecutor<'e>, agent_id: &str) -> Result<Vec<InboxItem>, sqlx::Error> {
    sqlx::query_as(
        "SELECT task_id, workflow_id, step_id, status, attempt, payload, priority, deadline, assigned_at
         FROM tasks WHERE agent_id = $1 AND status IN ('assigned', 'running')
         ORDER BY priority DESC, assigned_at, task_id",
    )
    .bind(agent_id)
    .fetch_all(db)
    .await
}

/// An agent's row and the tasks it holds, read in one snapshot (`REPEATABLE READ`), so its
/// load and its inbox agree: two reads on their own could straddle a projector commit.
pub async fn agent_and_inbox(
    pool: &PgPool,
    agent_id: &str,
) -> Result<(Option<AgentView>, Vec<InboxItem>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let availability = agent(&mut *tx, agent_id).await?;
    let items = inbox(&mut *tx, agent_id).await?;
    tx.commit().await?;
    Ok((availability, items))
}

pub async fn task(pool: &PgPool, task_id: &str) -> Result<Option<TaskRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE task_id = $1"
    ))
    .bind(task_id)
    .fetch_optional(pool)
    .await
}

/// Filters and page of [`list_tasks`]; `None` filters match everything.
#[derive(Debug, Default, Clone)]
pub struct TaskFilter {
    pub agent_id: Option<String>,
    pub status: Option<String>,
    pub workflow_id: Option<String>,
    /// Only tasks strictly after this `(updated_at, task_id)` in the order of the listing.
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

/// Tasks by last change, newest first (ties by task id, descending).
pub async fn list_tasks(pool: &PgPool, filter: &TaskFilter) -> Result<Vec<TaskRow>, sqlx::Error> {
    let (after_time, after_id) = filter.after.clone().unzip();
    sqlx::query_as(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE ($1::text IS NULL OR agent_id = $1) AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR workflow_id = $3)
            AND ($4::timestamptz IS NULL OR (updated_at, task_id) < ($4, $5))
          ORDER BY updated_at DESC, task_id DESC LIMIT $6"
    ))
    .bind(&filter.agent_id)
    .bind(&filter.status)
    .bind(&filter.workflow_id)
    .bind(after_time)
    .bind(after_id)
    .bind(filter.limit)
    .fetch_all(pool)
    .await
}

/// The events about a task, in log order.
pub async fn task_events(pool: &PgPool, task_id: &str) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        event_columns!(),
        " FROM task_events WHERE task_id = $1 ORDER BY log_partition, log_offset"
    ))
    .bind(task_id)
    .fetch_all(pool)
    .await
}

/// The events a command caused, in log order (a rejected command has one `COMMAND_REJECTED`).
pub async fn command_events(pool: &PgPool, command_id: &str) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        event_columns!(),
        " FROM task_events WHERE command_id = $1 ORDER BY log_partition, log_offset"
    ))
    .bind(command_id)
    .fetch_all(pool)
    .await
}

/// How many of `command_ids` the task views have recorded an event of (decided and projected).
pub async fn decided_commands(pool: &PgPool, command_ids: &[String]) -> Result<i64, sqlx::Error> {
    let (count,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT command_id) FROM task_events WHERE command_id = ANY($1)")
            .bind(command_ids)
            .fetch_one(pool)
            .await?;
    Ok(count)
}

/// The latest version of a template, or the given one.
pub async fn template(
    pool: &PgPool,
    name: &str,
    version: Option<i32>,
) -> Result<Option<TemplateRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, version, steps, actor, defined_at FROM workflow_templates
         WHERE name = $1 AND ($2::int IS NULL OR version = $2) ORDER BY version DESC LIMIT 1",
    )
    .bind(name)
    .bind(version)
    .fetch_optional(pool)
    .await
}

pub async fn workflow(pool: &PgPool, workflow_id: &str) -> Result<Option<WorkflowRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        workflow_columns!(),
        " FROM workflows WHERE workflow_id = $1"
    ))
    .bind(workflow_id)
    .fetch_optional(pool)
    .await
}

pub async fn workflow_tasks(pool: &PgPool, workflow_id: &str) -> Result<Vec<TaskRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks WHERE workflow_id = $1 ORDER BY accepted_at, task_id"
    ))
    .bind(workflow_id)
    .fetch_all(pool)
    .await
}

/// The orchestrator's figures, from the views.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Stats {
    pub workflows_completed: i64,
    pub workflows_active: i64,
    pub workflows_failed: i64,
    /// Every task ever accepted.
    pub tasks_delegated: i64,
    pub tasks_pending: i64,
    pub tasks_in_progress: i64,
    pub tasks_completed: i64,
    pub tasks_dead_lettered: i64,
    pub tasks_cancelled: i64,
    /// Mean time from acceptance to completion of completed tasks, in milliseconds.
    pub average_completion_ms: Option<f64>,
    pub average_workflow_ms: Option<f64>,
}

pub async fn stats(pool: &PgPool) -> Result<Stats, sqlx::Error> {
    sqlx::query_as(
        "SELECT
            (SELECT count(*) FROM workflows WHERE status = 'completed') AS workflows_completed,
            (SELECT count(*) FROM workflows WHERE status = 'running') AS workflows_active,
            (SELECT count(*) FROM workflows WHERE status = 'failed') AS workflows_failed,
            t.delegated AS tasks_delegated, t.pending AS tasks_pending,
            t.in_progress AS tasks_in_progress, t.completed AS tasks_completed,
            t.dead_lettered AS tasks_dead_lettered, t.cancelled AS tasks_cancelled,
            t.average_completion_ms,
            (SELECT avg(duration_ms)::float8 FROM workflows WHERE status = 'completed') AS average_workflow_ms
         FROM (SELECT count(*) AS delegated,
                      count(*) FILTER (WHERE status = 'pending') AS pending,
                      count(*) FILTER (WHERE status IN ('assigned', 'running')) AS in_progress,
                      count(*) FILTER (WHERE status = 'completed') AS completed,
                      count(*) FILTER (WHERE status = 'dead_lettered') AS dead_lettered,
                      count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                      (avg(duration_ms) FILTER (WHERE status = 'completed'))::float8 AS average_completion_ms
               FROM tasks) t",
    )
    .fetch_one(pool)
    .await
}
