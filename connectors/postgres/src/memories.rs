//! The memory views: applying a batch of memory commands, and the queries the API serves.
//!
//! Apply is replay-safe: a command id already decided is a no-op, so applying the same
//! records twice leaves the views as applying them once. It takes the caller's transaction
//! and never reads the wall clock; every time comes from the record.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One `WriteMemory` record, decoded and validated, with its log position.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRow {
    pub command_id: Uuid,
    pub memory_id: Uuid,
    pub namespace: String,
    pub actor: String,
    pub content: String,
    pub tier: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub expires_at: Option<DateTime<Utc>>,
    pub embedding: Option<Vec<f32>>,
    pub traceparent: Option<String>,
    pub log_partition: i32,
    pub log_offset: i64,
    pub record_time: DateTime<Utc>,
}

/// A memory as the views hold it and the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct MemoryView {
    pub memory_id: Uuid,
    pub namespace: String,
    pub content: String,
    pub tier: String,
    pub tags: Vec<String>,
    pub metadata: serde_json::Value,
    pub importance: f64,
    pub expires_at: Option<DateTime<Utc>>,
    pub embedding: Option<Vec<f32>>,
    pub version: i64,
    pub actor: String,
    pub created_by: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub log_partition: i32,
    pub log_offset: i64,
}

/// Why a command is rejected: the first word of the recorded reason, a metric label.
pub const MEMORY_EXISTS: &str = "memory_exists";
/// Every rejection reason.
pub const REJECTION_REASONS: &[&str] = &[MEMORY_EXISTS];

/// What applying a batch of writes decided.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Memories created, to be copied to the hot cache after commit.
    pub applied: Vec<MemoryView>,
    /// Commands refused, with the reason recorded in `memory_commands`.
    pub rejected: Vec<(Uuid, String)>,
    /// Command ids already decided earlier: no effect.
    pub duplicates: usize,
}

/// The columns of [`MemoryView`], as a literal so statements stay static strings.
macro_rules! view_columns {
    () => {
        "memory_id, namespace, content, tier, tags, metadata, importance, expires_at, embedding, \
         version, actor, created_by, created_at, updated_at, log_partition, log_offset"
    };
}

/// Applies `writes` (in log order) inside the caller's transaction, set-based: one statement
/// records the command ids (the dedupe), one inserts the memories, one marks the refusals.
pub async fn apply_writes(
    conn: &mut PgConnection,
    topic: &str,
    writes: &[WriteRow],
) -> Result<WriteOutcome, sqlx::Error> {
    if writes.is_empty() {
        return Ok(WriteOutcome::default());
    }
    let input = serde_json::to_value(writes).expect("rows serialize");
    let fresh: Vec<(Uuid,)> = sqlx::query_as(
        "INSERT INTO memory_commands (command_id, kind, namespace, memory_id, actor, status,
                                      traceparent, log_topic, log_partition, log_offset, record_time)
         SELECT DISTINCT ON (command_id) command_id, 'WriteMemory', namespace, memory_id, actor,
                'applied', traceparent, $2, log_partition, log_offset, record_time
         FROM jsonb_to_recordset($1::jsonb) AS r(command_id uuid, namespace text, memory_id uuid,
              actor text, traceparent text, log_partition int, log_offset bigint, record_time timestamptz)
         ORDER BY command_id, log_partition, log_offset
         ON CONFLICT (command_id) DO NOTHING
         RETURNING command_id",
    )
    .bind(&input)
    .bind(topic)
    .fetch_all(&mut *conn)
    .await?;
    let fresh: Vec<Uuid> = fresh.into_iter().map(|(id,)| id).collect();
    let duplicates = writes.len() - fresh.len();
    if fresh.is_empty() {
        return Ok(WriteOutcome {
            duplicates,
            ..Default::default()
        });
    }

    let applied: Vec<MemoryView> = sqlx::query_as(concat!(
        "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance,
                               expires_at, embedding, version, actor, created_by, created_at,
                               updated_at, log_topic, log_partition, log_offset)
         SELECT memory_id, namespace, content, tier, tags, metadata, importance, expires_at,
                embedding, 1, actor, command_id, record_time, record_time, $3, log_partition, log_offset
         FROM jsonb_to_recordset($1::jsonb) AS r(command_id uuid, memory_id uuid, namespace text,
              actor text, content text, tier text, tags text[], metadata jsonb, importance float8,
              expires_at timestamptz, embedding real[], log_partition int, log_offset bigint,
              record_time timestamptz)
         WHERE command_id = ANY($2)
         ORDER BY log_partition, log_offset
         ON CONFLICT (memory_id) DO NOTHING
         RETURNING ",
        view_columns!(),
        ""
    ))
    .bind(&input)
    .bind(&fresh)
    .bind(topic)
    .fetch_all(&mut *conn)
    .await?;

    let created: HashSet<Uuid> = applied.iter().map(|m| m.created_by).collect();
    let rejected: Vec<(Uuid, String)> = fresh
        .iter()
        .filter(|id| !created.contains(id))
        .map(|id| {
            (
                *id,
                "memory_exists: a memory with this id already exists".to_owned(),
            )
        })
        .collect();
    if !rejected.is_empty() {
        let ids: Vec<Uuid> = rejected.iter().map(|(id, _)| *id).collect();
        sqlx::query("UPDATE memory_commands SET status = 'rejected', reason = $2 WHERE command_id = ANY($1)")
            .bind(&ids)
            .bind(&rejected[0].1)
            .execute(&mut *conn)
            .await?;
    }
    Ok(WriteOutcome {
        applied,
        rejected,
        duplicates,
    })
}

/// One memory by id.
pub async fn get(pool: &PgPool, memory_id: Uuid) -> Result<Option<MemoryView>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        view_columns!(),
        " FROM memories WHERE memory_id = $1"
    ))
    .bind(memory_id)
    .fetch_optional(pool)
    .await
}

/// Where a page of [`list`] ends: the last row's sort key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub memory_id: Uuid,
}

/// An agent's memories, newest first, keyset-paginated: a page starts strictly after
/// `after`, so rows written while a client pages never shift the pages it has not read.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    after: Option<Cursor>,
    limit: i64,
) -> Result<Vec<MemoryView>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        view_columns!(),
        " FROM memories
         WHERE namespace = $1
           AND ($2::timestamptz IS NULL OR (created_at, memory_id) < ($2, $3))
         ORDER BY created_at DESC, memory_id DESC
         LIMIT $4"
    ))
    .bind(namespace)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.memory_id))
    .bind(limit)
    .fetch_all(pool)
    .await
}
