//! The memory views: loading the state a batch needs, writing what the fold decided, and the
//! queries the API serves.
//!
//! Writes are set-based: each table gets one statement per batch (rows passed as one JSON
//! array and expanded with `jsonb_to_recordset`), never one statement per record. They take
//! the caller's transaction, so the projector commits them together with its offsets.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

/// A memory as the views hold it and the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Memory {
    pub memory_id: Uuid,
    pub namespace: String,
    pub content: String,
    pub tier: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub expires_at: Option<DateTime<Utc>>,
    pub embedding: Option<Vec<f32>>,
    pub source: Option<String>,
    pub version: i64,
    /// Who made the last change.
    pub actor: String,
    pub created_by: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub forgotten_at: Option<DateTime<Utc>>,
    pub log_partition: i32,
    pub log_offset: i64,
}

/// One decided command about a memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct HistoryRow {
    pub memory_id: Uuid,
    pub command_id: Uuid,
    pub version: i64,
    pub operation: String,
    pub actor: String,
    pub status: String,
    pub reason: Option<String>,
    pub change: serde_json::Value,
    /// The memory after the change (applied changes to its state only).
    pub state: Option<serde_json::Value>,
    pub log_partition: i32,
    pub log_offset: i64,
    pub record_time: DateTime<Utc>,
    pub trace_id: Option<String>,
    pub valid_from: Option<DateTime<Utc>>,
    pub valid_to: Option<DateTime<Utc>>,
}

/// The status of one decided command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CommandRow {
    pub command_id: Uuid,
    pub kind: String,
    pub namespace: String,
    pub memory_id: Option<Uuid>,
    pub actor: String,
    pub status: String,
    pub reason: Option<String>,
    pub traceparent: Option<String>,
    pub log_topic: String,
    pub log_partition: i32,
    pub log_offset: i64,
    pub record_time: DateTime<Utc>,
}

/// Identity of a share: namespace, memory (`None`: all of them), grantee.
pub type ShareKey = (String, Option<Uuid>, String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ShareRow {
    pub namespace: String,
    pub memory_id: Option<Uuid>,
    pub grantee: String,
    pub granted_by: String,
    pub command_id: Uuid,
    pub granted_at: DateTime<Utc>,
}

impl ShareRow {
    pub fn key(&self) -> ShareKey {
        (self.namespace.clone(), self.memory_id, self.grantee.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ToolRow {
    pub namespace: String,
    pub name: String,
    pub description: String,
    pub usage: String,
    pub tags: Vec<String>,
    pub version: i64,
    pub registered_by: String,
    pub command_id: Uuid,
    pub updated_at: DateTime<Utc>,
}

/// What a batch needs to know before deciding: ids already decided, and the current rows
/// its commands touch.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub seen: HashSet<Uuid>,
    pub memories: HashMap<Uuid, Memory>,
    pub shares: HashMap<ShareKey, ShareRow>,
    pub tools: HashMap<(String, String), ToolRow>,
}

/// What a batch decided, to be written in one transaction.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Final state of every memory the batch changed.
    pub memories: Vec<Memory>,
    pub history: Vec<HistoryRow>,
    pub commands: Vec<CommandRow>,
    /// Memories whose open history row (from an earlier batch) ends at the given time.
    pub close_history: Vec<(Uuid, DateTime<Utc>)>,
    pub shares_added: Vec<ShareRow>,
    pub shares_removed: Vec<ShareKey>,
    pub tools: Vec<ToolRow>,
}

/// The columns of [`Memory`], as a literal so statements stay static strings.
macro_rules! memory_columns {
    () => {
        "memory_id, namespace, content, tier, tags, metadata, importance, expires_at, \
         embedding::real[] AS embedding, source, version, actor, created_by, created_at, updated_at, \
         forgotten_at, log_partition, log_offset"
    };
}

/// Loads the rows the commands of a batch touch, locking the memories for the transaction.
pub async fn load_state(
    conn: &mut PgConnection,
    command_ids: &[Uuid],
    memory_ids: &[Uuid],
    share_namespaces: &[String],
    tool_namespaces: &[String],
) -> Result<State, sqlx::Error> {
    let mut state = State::default();
    if !command_ids.is_empty() {
        let seen: Vec<(Uuid,)> =
            sqlx::query_as("SELECT command_id FROM memory_commands WHERE command_id = ANY($1)")
                .bind(command_ids)
                .fetch_all(&mut *conn)
                .await?;
        state.seen = seen.into_iter().map(|(id,)| id).collect();
    }
    if !memory_ids.is_empty() {
        let memories: Vec<Memory> = sqlx::query_as(concat!(
            "SELECT ",
            memory_columns!(),
            " FROM memories WHERE memory_id = ANY($1) ORDER BY memory_id FOR UPDATE"
        ))
        .bind(memory_ids)
        .fetch_all(&mut *conn)
        .await?;
        state.memories = memories.into_iter().map(|m| (m.memory_id, m)).collect();
    }
    if !share_namespaces.is_empty() {
        let shares: Vec<ShareRow> = sqlx::query_as(
            "SELECT namespace, memory_id, grantee, granted_by, command_id, granted_at
             FROM memory_shares WHERE namespace = ANY($1)",
        )
        .bind(share_namespaces)
        .fetch_all(&mut *conn)
        .await?;
        state.shares = shares.into_iter().map(|s| (s.key(), s)).collect();
    }
    if !tool_namespaces.is_empty() {
        let tools: Vec<ToolRow> = sqlx::query_as(
            "SELECT namespace, name, description, usage, tags, version, registered_by, command_id, updated_at
             FROM tools WHERE namespace = ANY($1)",
        )
        .bind(tool_namespaces)
        .fetch_all(&mut *conn)
        .await?;
        state.tools = tools
            .into_iter()
            .map(|t| ((t.namespace.clone(), t.name.clone()), t))
            .collect();
    }
    Ok(state)
}

/// Rows as one JSON text, cast to `jsonb` by the statement: no intermediate value tree.
fn json<T: Serialize>(rows: &T) -> String {
    serde_json::to_string(rows).expect("view rows serialize")
}

/// Writes what a batch decided: one set-based statement per table.
pub async fn write(conn: &mut PgConnection, changes: &Changes) -> Result<(), sqlx::Error> {
    if !changes.memories.is_empty() {
        sqlx::query(
            "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance,
                                   expires_at, embedding, source, version, actor, created_by, created_at,
                                   updated_at, forgotten_at, log_partition, log_offset)
             SELECT memory_id, namespace, content, tier, tags, metadata, importance, expires_at,
                    embedding::vector, source, version, actor, created_by, created_at, updated_at,
                    forgotten_at, log_partition, log_offset
             FROM jsonb_to_recordset($1::jsonb) AS r(memory_id uuid, namespace text, content text,
                  tier text, tags text[], metadata jsonb, importance float8, expires_at timestamptz,
                  embedding real[], source text, version bigint, actor text, created_by uuid,
                  created_at timestamptz, updated_at timestamptz, forgotten_at timestamptz,
                  log_partition int, log_offset bigint)
             ON CONFLICT (memory_id) DO UPDATE SET
                content = EXCLUDED.content, tier = EXCLUDED.tier, tags = EXCLUDED.tags,
                metadata = EXCLUDED.metadata, importance = EXCLUDED.importance,
                expires_at = EXCLUDED.expires_at, embedding = EXCLUDED.embedding,
                source = EXCLUDED.source, version = EXCLUDED.version, actor = EXCLUDED.actor,
                updated_at = EXCLUDED.updated_at, forgotten_at = EXCLUDED.forgotten_at,
                log_partition = EXCLUDED.log_partition, log_offset = EXCLUDED.log_offset",
        )
        .bind(json(&changes.memories))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.close_history.is_empty() {
        let ids: Vec<Uuid> = changes.close_history.iter().map(|(id, _)| *id).collect();
        let until: Vec<DateTime<Utc>> = changes.close_history.iter().map(|(_, t)| *t).collect();
        sqlx::query(
            "UPDATE memory_history h SET valid_to = c.valid_to
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS c(memory_id, valid_to)
             WHERE h.memory_id = c.memory_id AND h.valid_to IS NULL AND h.status = 'applied'
               AND h.valid_from IS NOT NULL",
        )
        .bind(&ids)
        .bind(&until)
        .execute(&mut *conn)
        .await?;
    }
    if !changes.history.is_empty() {
        sqlx::query(
            "INSERT INTO memory_history (memory_id, command_id, version, operation, actor, status, reason,
                                         change, state, log_partition, log_offset, record_time, trace_id,
                                         valid_from, valid_to)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(memory_id uuid, command_id uuid,
                  version bigint, operation text, actor text, status text, reason text, change jsonb,
                  state jsonb, log_partition int, log_offset bigint, record_time timestamptz,
                  trace_id text, valid_from timestamptz, valid_to timestamptz)",
        )
        .bind(json(&changes.history))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.commands.is_empty() {
        sqlx::query(
            "INSERT INTO memory_commands (command_id, kind, namespace, memory_id, actor, status, reason,
                                          traceparent, log_topic, log_partition, log_offset, record_time)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(command_id uuid, kind text, namespace text,
                  memory_id uuid, actor text, status text, reason text, traceparent text, log_topic text,
                  log_partition int, log_offset bigint, record_time timestamptz)",
        )
        .bind(json(&changes.commands))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.shares_removed.is_empty() {
        let namespaces: Vec<&str> = changes.shares_removed.iter().map(|k| k.0.as_str()).collect();
        let memories: Vec<Option<Uuid>> = changes.shares_removed.iter().map(|k| k.1).collect();
        let grantees: Vec<&str> = changes.shares_removed.iter().map(|k| k.2.as_str()).collect();
        sqlx::query(
            "DELETE FROM memory_shares s
             USING UNNEST($1::text[], $2::uuid[], $3::text[]) AS r(namespace, memory_id, grantee)
             WHERE s.namespace = r.namespace AND s.grantee = r.grantee
               AND s.memory_id IS NOT DISTINCT FROM r.memory_id",
        )
        .bind(&namespaces)
        .bind(&memories)
        .bind(&grantees)
        .execute(&mut *conn)
        .await?;
    }
    if !changes.shares_added.is_empty() {
        sqlx::query(
            "INSERT INTO memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(namespace text, memory_id uuid,
                  grantee text, granted_by text, command_id uuid, granted_at timestamptz)",
        )
        .bind(json(&changes.shares_added))
        .execute(&mut *conn)
        .await?;
    }
    if !changes.tools.is_empty() {
        sqlx::query(
            "INSERT INTO tools (namespace, name, description, usage, tags, version, registered_by,
                                command_id, updated_at)
             SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(namespace text, name text,
                  description text, usage text, tags text[], version bigint, registered_by text,
                  command_id uuid, updated_at timestamptz)
             ON CONFLICT (namespace, name) DO UPDATE SET
                description = EXCLUDED.description, usage = EXCLUDED.usage, tags = EXCLUDED.tags,
                version = EXCLUDED.version, registered_by = EXCLUDED.registered_by,
                command_id = EXCLUDED.command_id, updated_at = EXCLUDED.updated_at",
        )
        .bind(json(&changes.tools))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
