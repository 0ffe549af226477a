//! The queries the API serves. Every query that takes a [`Reader`] answers only what that
//! agent may read: its own namespace and the team namespaces it is granted, plus the memories
//! and namespaces shared with it. Forgotten memories are never returned; expired ones only
//! when asked for.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::memories::{CommandRow, HistoryRow, Memory, ToolRow};

macro_rules! memory_columns {
    () => {
        "m.memory_id, m.namespace, m.content, m.tier, m.tags, m.metadata, m.importance, m.expires_at, \
         m.embedding::real[] AS embedding, m.source, m.version, m.actor, m.created_by, m.created_at, \
         m.updated_at, m.forgotten_at, m.log_partition, m.log_offset"
    };
}

/// Who a query reads as: an agent, and the team namespaces it may read besides its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// The agent first, then its team namespaces: bound as one `text[]`.
    scope: Vec<String>,
}

impl Reader {
    /// An agent reading its own namespace and what is shared with it.
    pub fn agent(agent: impl Into<String>) -> Reader {
        Reader {
            scope: vec![agent.into()],
        }
    }

    /// An agent that also reads the namespaces it is granted (team namespaces).
    pub fn with_namespaces(agent: impl Into<String>, namespaces: impl IntoIterator<Item = String>) -> Reader {
        let mut reader = Reader::agent(agent);
        for namespace in namespaces {
            if !reader.scope.contains(&namespace) {
                reader.scope.push(namespace);
            }
        }
        reader
    }

    /// The agent it reads as (the grantee of shares).
    pub fn name(&self) -> &str {
        &self.scope[0]
    }

    /// Whether every memory of `namespace` is readable without a share.
    pub fn reads_namespace(&self, namespace: &str) -> bool {
        self.scope.iter().any(|n| n == namespace)
    }
}

fn scope(reader: Option<&Reader>) -> Option<&[String]> {
    reader.map(|r| r.scope.as_slice())
}

/// `$1` is the reader's scope (NULL: no restriction): its agent, then its team namespaces;
/// shares are granted to the agent.
macro_rules! readable_by_1 {
    () => {
        "($1::text[] IS NULL OR m.namespace = ANY($1::text[]) OR EXISTS (SELECT 1 FROM memory_shares s \
         WHERE s.namespace = m.namespace AND s.grantee = ($1::text[])[1] \
         AND (s.memory_id IS NULL OR s.memory_id = m.memory_id)))"
    };
}

/// One memory, forgotten or not (the caller decides what a forgotten one means).
pub async fn memory(pool: &PgPool, reader: Option<&Reader>, id: Uuid) -> Result<Option<Memory>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        memory_columns!(),
        " FROM memories m WHERE m.memory_id = $2 AND ",
        readable_by_1!()
    ))
    .bind(scope(reader))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Whether `reader` may read memory `id` of `namespace`.
pub async fn may_read(
    pool: &PgPool,
    reader: &Reader,
    namespace: &str,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    if reader.reads_namespace(namespace) {
        return Ok(true);
    }
    let (shared,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM memory_shares WHERE namespace = $1 AND grantee = $2
                        AND (memory_id IS NULL OR memory_id = $3))",
    )
    .bind(namespace)
    .bind(reader.name())
    .bind(id)
    .fetch_one(pool)
    .await?;
    Ok(shared)
}

/// Where a page of [`list`] ends: the last row's sort key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub memory_id: Uuid,
}

/// Filters of an agent's memory listing.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub tier: Option<String>,
    pub tags_any: Option<Vec<String>>,
    pub tags_all: Option<Vec<String>>,
    pub metadata: Option<serde_json::Value>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    pub include_expired: bool,
}

/// The memories as they were at `$16`, with the columns of `memories` (embeddings excepted:
/// the history does not keep the vectors), rebuilt from the applied history rows whose
/// validity interval `[valid_from, valid_to)` contains that instant.
/// The namespace's memories are found through `memories` (which keeps a row for every
/// memory ever written, forgotten ones included, and a memory never changes namespace) and
/// its namespace index, then their history by primary key: an index on the history's
/// namespace would cost every projector write a detoast of the state (it cut the projector's
/// rate by two thirds, docs/benchmarks.md).
macro_rules! memories_as_of_16 {
    () => {
        "(SELECT (jsonb_populate_record(NULL::memories, h.state)).* \
         FROM memories n JOIN memory_history h ON h.memory_id = n.memory_id \
         WHERE n.namespace = $2 AND h.status = 'applied' \
           AND h.valid_from <= $16 AND (h.valid_to IS NULL OR h.valid_to > $16))"
    };
}

/// The body of [`list`] after `FROM`: `$1` reader, `$2` namespace, `$3..$15` filters, page.
macro_rules! list_where {
    () => {
        " m WHERE m.namespace = $2 AND m.forgotten_at IS NULL AND "
    };
}

macro_rules! list_filters {
    () => {
        " AND ($3::text IS NULL OR m.tier = $3)
           AND ($4::text[] IS NULL OR m.tags && $4)
           AND ($5::text[] IS NULL OR m.tags @> $5)
           AND ($6::jsonb IS NULL OR m.metadata @> $6)
           AND ($7::timestamptz IS NULL OR m.created_at >= $7)
           AND ($8::timestamptz IS NULL OR m.created_at < $8)
           AND ($9::timestamptz IS NULL OR m.updated_at >= $9)
           AND ($10::timestamptz IS NULL OR m.updated_at < $10)
           AND ($11 OR m.expires_at IS NULL OR m.expires_at > $12)
           AND ($13::timestamptz IS NULL OR (m.created_at, m.memory_id) < ($13, $14))
         ORDER BY m.created_at DESC, m.memory_id DESC
         LIMIT $15"
    };
}

/// A namespace's memories, newest first, keyset-paginated: a page starts strictly after
/// `after` in (created_at, memory_id) order, so memories written while a client pages never
/// make it skip or repeat one. With `as_of`, the memories as they were at that instant (from
/// the history's validity intervals; `now` should then be `as_of`, so expiry is judged then
/// too), without their embeddings.
#[allow(clippy::too_many_arguments)]
pub async fn list(
    pool: &PgPool,
    reader: Option<&Reader>,
    namespace: &str,
    filter: &ListFilter,
    now: DateTime<Utc>,
    after: Option<Cursor>,
    limit: i64,
    as_of: Option<DateTime<Utc>>,
) -> Result<Vec<Memory>, sqlx::Error> {
    let sql = match as_of {
        None => concat!(
            "SELECT ",
            memory_columns!(),
            " FROM memories",
            list_where!(),
            readable_by_1!(),
            list_filters!()
        ),
        Some(_) => concat!(
            "SELECT ",
            memory_columns!(),
            " FROM ",
            memories_as_of_16!(),
            list_where!(),
            readable_by_1!(),
            list_filters!()
        ),
    };
    let mut query = sqlx::query_as(sql)
        .bind(scope(reader))
        .bind(namespace)
        .bind(&filter.tier)
        .bind(&filter.tags_any)
        .bind(&filter.tags_all)
        .bind(&filter.metadata)
        .bind(filter.created_after)
        .bind(filter.created_before)
        .bind(filter.updated_after)
        .bind(filter.updated_before)
        .bind(filter.include_expired)
        .bind(now)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.memory_id))
        .bind(limit);
    if let Some(at) = as_of {
        query = query.bind(at);
    }
    query.fetch_all(pool).await
}

/// One memory as it was at `at` (forgotten or not; `None` if it did not exist yet or `reader`
/// may not read it), from the history's validity intervals, without its embedding.
pub async fn memory_as_of(
    pool: &PgPool,
    reader: Option<&Reader>,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<Option<Memory>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        memory_columns!(),
        " FROM (SELECT (jsonb_populate_record(NULL::memories, h.state)).* FROM memory_history h
                WHERE h.memory_id = $2 AND h.status = 'applied'
                  AND h.valid_from <= $3 AND (h.valid_to IS NULL OR h.valid_to > $3)) m
         WHERE ",
        readable_by_1!()
    ))
    .bind(scope(reader))
    .bind(id)
    .bind(at)
    .fetch_optional(pool)
    .await
}

/// A search result: the memory and its score (higher is better).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Scored {
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub memory: Memory,
    pub score: f64,
}

/// How to rank a search.
#[derive(Debug, Clone)]
pub enum SearchMode {
    /// Full-text rank of `query` over content.
    Text(String),
    /// Cosine similarity to `embedding` (HNSW index).
    Vector(Vec<f32>),
    /// `weight` × vector similarity + (1 − `weight`) × normalized text rank.
    Hybrid {
        query: String,
        embedding: Vec<f32>,
        weight: f64,
    },
}

fn vector_literal(embedding: &[f32]) -> String {
    let parts: Vec<String> = embedding.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// Searches everything `reader` may read (never forgotten or expired memories).
pub async fn search(
    pool: &PgPool,
    reader: &Reader,
    mode: &SearchMode,
    dimensions: usize,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Scored>, sqlx::Error> {
    // The dimension is a number from configuration, so formatting it keeps the SQL safe; it
    // must appear literally for the planner to use the HNSW index on that expression.
    let visible = concat!(
        "m.forgotten_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > $2) AND ",
        readable_by_1!()
    );
    let columns = memory_columns!();
    match mode {
        SearchMode::Text(query) => {
            let sql = format!(
                "SELECT {columns}, ts_rank_cd(m.content_tsv, q)::float8 AS score
                 FROM memories m, websearch_to_tsquery('simple', $3) q
                 WHERE m.content_tsv @@ q AND {visible}
                 ORDER BY score DESC, m.memory_id LIMIT $4"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(scope(Some(reader)))
                .bind(now)
                .bind(query)
                .bind(limit)
                .fetch_all(pool)
                .await
        }
        SearchMode::Vector(embedding) => {
            let sql = format!(
                "SELECT {columns}, (1 - (m.embedding::vector({dimensions}) <=> $3::vector({dimensions})))::float8 AS score
                 FROM memories m
                 WHERE m.embedding IS NOT NULL AND {visible}
                 ORDER BY m.embedding::vector({dimensions}) <=> $3::vector({dimensions}), m.memory_id LIMIT $4"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(scope(Some(reader)))
                .bind(now)
                .bind(vector_literal(embedding))
                .bind(limit)
                .fetch_all(pool)
                .await
        }
        SearchMode::Hybrid {
            query,
            embedding,
            weight,
        } => {
            let sql = format!(
                "WITH scored AS (
                   SELECT m.memory_id,
                          coalesce(ts_rank_cd(m.content_tsv, q, 32), 0)::float8 AS text_score,
                          CASE WHEN m.embedding IS NULL THEN 0
                               ELSE 1 - (m.embedding::vector({dimensions}) <=> $3::vector({dimensions})) END::float8 AS vector_score
                   FROM memories m, websearch_to_tsquery('simple', $4) q
                   WHERE (m.content_tsv @@ q OR m.embedding IS NOT NULL) AND {visible}
                 )
                 SELECT {columns}, ($5 * s.vector_score + (1 - $5) * s.text_score)::float8 AS score
                 FROM scored s JOIN memories m USING (memory_id)
                 ORDER BY score DESC, m.memory_id LIMIT $6"
            );
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(scope(Some(reader)))
                .bind(now)
                .bind(vector_literal(embedding))
                .bind(query)
                .bind(weight)
                .bind(limit)
                .fetch_all(pool)
                .await
        }
    }
}

/// Every decided command about a memory, in log order.
pub async fn history(pool: &PgPool, id: Uuid) -> Result<Vec<HistoryRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT memory_id, command_id, version, operation, actor, status, reason, change, state,
                log_partition, log_offset, record_time, trace_id, valid_from, valid_to
         FROM memory_history WHERE memory_id = $1 ORDER BY log_partition, log_offset",
    )
    .bind(id)
    .fetch_all(pool)
    .await
}

/// The decision on one command, if the projector has made it.
pub async fn command(pool: &PgPool, id: Uuid) -> Result<Option<CommandRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, kind, namespace, memory_id, actor, status, reason, traceparent, log_topic,
                log_partition, log_offset, record_time
         FROM memory_commands WHERE command_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Registered tools, optionally matching a full-text query and/or a tag, best match first.
pub async fn tools(
    pool: &PgPool,
    query: Option<&str>,
    tag: Option<&str>,
    limit: i64,
) -> Result<Vec<ToolRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT namespace, name, description, usage, tags, version, registered_by, command_id, updated_at
         FROM tools t
         WHERE ($1::text IS NULL OR t.search_tsv @@ websearch_to_tsquery('simple', $1))
           AND ($2::text IS NULL OR $2 = ANY(t.tags))
         ORDER BY CASE WHEN $1::text IS NULL THEN 0
                       ELSE ts_rank_cd(t.search_tsv, websearch_to_tsquery('simple', $1)) END DESC,
                  t.namespace, t.name
         LIMIT $3",
    )
    .bind(query)
    .bind(tag)
    .bind(limit)
    .fetch_all(pool)
    .await
}
