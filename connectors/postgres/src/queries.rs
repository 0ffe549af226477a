//! The queries the API serves. Every query that takes a [`Reader`] answers only what that
//! agent may read: its own namespace and the team namespaces it is granted, plus the memories
//! and namespaces shared with it. Forgotten memories are never returned; expired ones only
//! when asked for.
//!
//! Guarantee (one definition of visibility, and one the planner can use): every query that
//! reads memories for a reader filters them with the same predicate, [`visibility`]. It
//! resolves what the reader may read before the rows are scanned: the namespaces (its own,
//! its team namespaces, the namespaces shared with it as a whole) as one array, and the
//! memories shared with it one by one as another, both computed once per statement (an
//! `InitPlan`, from the `memory_shares_grantee` index). A row is visible when its namespace
//! is in the first array or its id in the second, which PostgreSQL answers with the
//! namespace index and the primary key (a `BitmapOr`), never with a scan of `memories`.
//! `tests/e2e/search_plans.rs` checks the plan of every statement here on a large table.
//!
//! Every query is built as a [`Statement`] (SQL and arguments) by a `*_statement` function
//! and run by the function of the same name, so a plan test can `EXPLAIN` exactly what runs.

use chrono::{DateTime, Utc};
use memos_runtime::config::{MemoryConfig, SearchConfig};
use serde::{Deserialize, Serialize};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Acquire, Arguments, Encode, Executor, FromRow, PgConnection, PgPool, Postgres, Type};
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

/// What a reader may read, over a row `m` with columns `namespace` and `memory_id`; `$1` is
/// the reader's scope (its agent, then its team namespaces; shares are granted to the
/// agent). Both arrays are uncorrelated subqueries, so PostgreSQL computes them once per
/// statement and uses them as index conditions. A memory-level share counts only for a
/// memory of the namespace that granted it (the join with `memories`, by primary key).
macro_rules! visible_to_1 {
    () => {
        concat!(
            "(m.namespace = ANY (",
            visible_namespaces_1!(),
            ") OR m.memory_id = ANY (",
            shared_memories_1!(),
            "))"
        )
    };
}

/// [`visible_to_1`] for rows of one namespace, `$2`: the same predicate, with the namespace
/// test made on `$2` (equal for every row) instead of on each row. Row-independent, it is a
/// condition the planner does not mistake for a selective one: for a reader of a large
/// namespace the planner then walks the namespace index in listing order and stops at the
/// page's end, instead of collecting the whole namespace (100,000 rows) to sort it.
macro_rules! visible_in_2_to_1 {
    () => {
        concat!(
            "($2 = ANY (",
            visible_namespaces_1!(),
            ") OR m.memory_id = ANY (",
            shared_memories_1!(),
            "))"
        )
    };
}

/// The memories shared with a reader one by one (`$1` its scope), each only for a memory
/// of the namespace that granted it. An uncorrelated array, computed once.
macro_rules! shared_memories_1 {
    () => {
        "ARRAY(SELECT s.memory_id FROM memory_shares s \
               JOIN memories x ON x.memory_id = s.memory_id AND x.namespace = s.namespace \
               WHERE s.grantee = ($1::text[])[1])"
    };
}

/// The namespaces a reader reads whole (`$1` its scope): its own and its team namespaces,
/// and the namespaces shared with it as a whole. An uncorrelated array, computed once.
macro_rules! visible_namespaces_1 {
    () => {
        "ARRAY(SELECT unnest($1::text[]) \
               UNION SELECT s.namespace FROM memory_shares s \
                     WHERE s.grantee = ($1::text[])[1] AND s.memory_id IS NULL)"
    };
}

/// The visibility predicate of every query over memories (alias `m`), `$1` being the
/// reader's scope: [`visible_to_1`] for a reader, no restriction without one. The
/// unrestricted form still names `$1` (bound NULL), so both forms take the same arguments;
/// they are two statements, so neither plan is shaped by the other.
pub fn visibility(reader: Option<&Reader>) -> &'static str {
    match reader {
        Some(_) => visible_to_1!(),
        None => "$1::text[] IS NULL",
    }
}

/// A statement of this module: its SQL and its arguments, exactly as the query function of
/// the same name runs it.
pub struct Statement {
    sql: String,
    args: PgArguments,
    error: Option<BoxDynError>,
    /// Whether the connection keeps it prepared (and PostgreSQL may then reuse a generic plan).
    persistent: bool,
}

impl Statement {
    fn new(sql: String) -> Statement {
        Statement {
            sql,
            args: PgArguments::default(),
            error: None,
            persistent: true,
        }
    }

    /// Planned at every execution with its arguments' values (an unnamed statement): never a
    /// generic plan, which cannot tell a word in every memory from a rare one.
    fn planned_each_time(mut self) -> Statement {
        self.persistent = false;
        self
    }

    fn bind<'t, T: Encode<'t, Postgres> + Type<Postgres>>(mut self, value: T) -> Statement {
        if self.error.is_none()
            && let Err(e) = self.args.add(value)
        {
            self.error = Some(e);
        }
        self
    }

    /// Its SQL.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The same statement with `prefix` before its SQL, e.g. `EXPLAIN (FORMAT JSON) `.
    pub fn prefixed(mut self, prefix: &str) -> Statement {
        self.sql.insert_str(0, prefix);
        self
    }

    fn arguments(&mut self) -> Result<PgArguments, sqlx::Error> {
        match self.error.take() {
            Some(e) => Err(sqlx::Error::Encode(e)),
            None => Ok(std::mem::take(&mut self.args)),
        }
    }

    pub async fn fetch_all<'c, O, E>(mut self, executor: E) -> Result<Vec<O>, sqlx::Error>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
        E: Executor<'c, Database = Postgres>,
    {
        let args = self.arguments()?;
        sqlx::query_as_with(sqlx::AssertSqlSafe(self.sql), args)
            .persistent(self.persistent)
            .fetch_all(executor)
            .await
    }

    pub async fn fetch_optional<'c, O, E>(mut self, executor: E) -> Result<Option<O>, sqlx::Error>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
        E: Executor<'c, Database = Postgres>,
    {
        let args = self.arguments()?;
        sqlx::query_as_with(sqlx::AssertSqlSafe(self.sql), args)
            .persistent(self.persistent)
            .fetch_optional(executor)
            .await
    }

    pub async fn execute<'c, E>(mut self, executor: E) -> Result<(), sqlx::Error>
    where
        E: Executor<'c, Database = Postgres>,
    {
        let args = self.arguments()?;
        sqlx::query_with(sqlx::AssertSqlSafe(self.sql), args)
            .persistent(self.persistent)
            .execute(executor)
            .await
            .map(drop)
    }

    pub async fn fetch_one<'c, O, E>(mut self, executor: E) -> Result<O, sqlx::Error>
    where
        O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
        E: Executor<'c, Database = Postgres>,
    {
        let args = self.arguments()?;
        sqlx::query_as_with(sqlx::AssertSqlSafe(self.sql), args)
            .persistent(self.persistent)
            .fetch_one(executor)
            .await
    }
}

/// The statement of [`memory`].
pub fn memory_statement(reader: Option<&Reader>, id: Uuid) -> Statement {
    let visible = visibility(reader);
    Statement::new(format!(
        "SELECT {} FROM memories m WHERE m.memory_id = $2 AND {visible}",
        memory_columns!()
    ))
    .bind(scope(reader))
    .bind(id)
}

/// One memory, forgotten or not (the caller decides what a forgotten one means).
pub async fn memory(pool: &PgPool, reader: Option<&Reader>, id: Uuid) -> Result<Option<Memory>, sqlx::Error> {
    memory_statement(reader, id).fetch_optional(pool).await
}

/// The statement of [`may_read`]: the visibility predicate over one (namespace, id) pair.
pub fn may_read_statement(reader: &Reader, namespace: &str, id: Uuid) -> Statement {
    Statement::new(format!(
        "SELECT EXISTS (SELECT 1 FROM (SELECT $2::text AS namespace, $3::uuid AS memory_id) m WHERE {})",
        visible_to_1!()
    ))
    .bind(scope(Some(reader)))
    .bind(namespace)
    .bind(id)
}

/// Whether `reader` may read memory `id` of `namespace`, by the same predicate as every query.
pub async fn may_read(
    pool: &PgPool,
    reader: &Reader,
    namespace: &str,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    // The first arm of the predicate, answered without a round trip.
    if reader.reads_namespace(namespace) {
        return Ok(true);
    }
    let (allowed,): (bool,) = may_read_statement(reader, namespace, id).fetch_one(pool).await?;
    Ok(allowed)
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
/// its namespace index (not partial, so it holds the forgotten ones), then their history by
/// primary key: an index on the history's namespace would cost every projector write a
/// detoast of the state (it cut the projector's rate by two thirds, docs/benchmarks.md).
macro_rules! memories_as_of_16 {
    () => {
        "(SELECT (jsonb_populate_record(NULL::memories, h.state)).* \
         FROM memories n JOIN memory_history h ON h.memory_id = n.memory_id \
         WHERE n.namespace = $2 AND h.status = 'applied' \
           AND h.valid_from <= $16 AND (h.valid_to IS NULL OR h.valid_to > $16))"
    };
}

/// The filters of a listing, over a row `m` (`$3..$14`).
macro_rules! list_conditions {
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
           AND ($13::timestamptz IS NULL OR (m.created_at, m.memory_id) < ($13, $14))"
    };
}

/// A listing's order and page size (`$15`).
macro_rules! list_page {
    () => {
        " ORDER BY m.created_at DESC, m.memory_id DESC LIMIT $15"
    };
}

/// Most memories of a namespace a listing reads in listing order before it lets the filter
/// indexes answer instead (at least this many, and at least 10 pages' worth).
pub const LIST_WALK: i64 = 1_000;

/// The statement of [`list`]: `$1` reader, `$2` namespace, `$3..$15` filters and page,
/// `$16` the instant of an as-of listing, or else the walk bound.
///
/// A current listing is answered in one of two ways, decided while it runs:
/// - **Walk.** The namespace index read in listing order (from the page's cursor, within the
///   created range), each memory tested against visibility and the filters, stopping at the
///   page's end or after [`LIST_WALK`] memories. What it found is the page if it is full:
///   the first matches in listing order.
/// - **Filter indexes.** Otherwise, the matches found by the planner's cheapest way to find
///   them all (the tags and metadata indexes, intersected with the namespace index), sorted.
///   Planned apart from any order (a materialized CTE), so a selective filter is never
///   answered by walking the whole namespace. Only run when the walk did not fill the page.
///
/// The planner cannot choose between the two itself: it estimates a filter's selectivity on
/// the whole table, so a tag common in the table but absent from one large namespace looks
/// cheap to find by walking it (measured: 0.46 s to walk 100,000 memories and find none).
#[allow(clippy::too_many_arguments)]
pub fn list_statement(
    reader: Option<&Reader>,
    namespace: &str,
    filter: &ListFilter,
    now: DateTime<Utc>,
    after: Option<Cursor>,
    limit: i64,
    as_of: Option<DateTime<Utc>>,
) -> Statement {
    // For a reader, visibility as tested for one namespace (`$2`, see `visible_in_2_to_1`).
    let visible = match reader {
        Some(_) => visible_in_2_to_1!(),
        None => visibility(None),
    };
    let columns = memory_columns!();
    let sql = match as_of {
        None => format!(
            "WITH walk AS (
               SELECT {columns} FROM (
                 SELECT * FROM memories m
                 WHERE m.namespace = $2 AND m.forgotten_at IS NULL
                   AND ($7::timestamptz IS NULL OR m.created_at >= $7)
                   AND ($8::timestamptz IS NULL OR m.created_at < $8)
                   AND ($13::timestamptz IS NULL OR (m.created_at, m.memory_id) < ($13, $14))
                 ORDER BY m.created_at DESC, m.memory_id DESC LIMIT $16) m
               WHERE {visible}{conditions}{page}),
             matching AS MATERIALIZED (
               SELECT m.memory_id, m.created_at FROM memories m
               WHERE m.namespace = $2 AND m.forgotten_at IS NULL AND {visible}{conditions})
             SELECT * FROM walk WHERE (SELECT count(*) FROM walk) >= $15
             UNION ALL
             SELECT {columns}
             FROM (SELECT memory_id FROM matching m{page}) f JOIN memories m USING (memory_id)
             WHERE (SELECT count(*) FROM walk) < $15
             ORDER BY created_at DESC, memory_id DESC",
            conditions = list_conditions!(),
            page = list_page!(),
        ),
        Some(_) => format!(
            "SELECT {columns} FROM {} m WHERE m.namespace = $2 AND m.forgotten_at IS NULL AND {visible}{}{}",
            memories_as_of_16!(),
            list_conditions!(),
            list_page!()
        ),
    };
    let statement = Statement::new(sql)
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
    // Planned with the namespace and filters it is run with: a generic plan knows neither
    // whether the namespace holds a hundred memories or a hundred thousand nor which filters
    // are unset (`$n IS NULL OR ...`), so it could not use the tags and metadata indexes, and
    // it sorted a large namespace whole (measured: 0.5-0.7 s for 100,000 memories).
    match as_of {
        Some(at) => statement.bind(at),
        None => statement.bind(LIST_WALK.max(limit.saturating_mul(10))),
    }
    .planned_each_time()
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
    list_statement(reader, namespace, filter, now, after, limit, as_of)
        .fetch_all(pool)
        .await
}

/// The statement of [`memory_as_of`].
pub fn memory_as_of_statement(reader: Option<&Reader>, id: Uuid, at: DateTime<Utc>) -> Statement {
    Statement::new(format!(
        "SELECT {} FROM (SELECT (jsonb_populate_record(NULL::memories, h.state)).* FROM memory_history h
                WHERE h.memory_id = $2 AND h.status = 'applied'
                  AND h.valid_from <= $3 AND (h.valid_to IS NULL OR h.valid_to > $3)) m
         WHERE {}",
        memory_columns!(),
        visibility(reader)
    ))
    .bind(scope(reader))
    .bind(id)
    .bind(at)
}

/// One memory as it was at `at` (forgotten or not; `None` if it did not exist yet or `reader`
/// may not read it), from the history's validity intervals, without its embedding.
pub async fn memory_as_of(
    pool: &PgPool,
    reader: Option<&Reader>,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<Option<Memory>, sqlx::Error> {
    memory_as_of_statement(reader, id, at).fetch_optional(pool).await
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
    /// Cosine similarity to `embedding`, exact over what the reader may read.
    Vector(Vec<f32>),
    /// `weight` × vector similarity + (1 − `weight`) × normalized text rank.
    Hybrid {
        query: String,
        embedding: Vec<f32>,
        weight: f64,
    },
}

/// How a search is run: the embedding dimension (the vector expressions name it), the
/// text search configuration of `memories.content_tsv` (see [`crate::pool::ensure_text_search`])
/// and the choice between exact and approximate plans (`memory.search`).
#[derive(Debug, Clone)]
pub struct SearchSettings {
    pub dimensions: usize,
    pub text_search_config: String,
    pub tuning: SearchConfig,
}

impl SearchSettings {
    /// The settings of a process configured with `memory`.
    pub fn from_config(memory: &MemoryConfig) -> SearchSettings {
        SearchSettings {
            dimensions: memory.embedding_dimensions,
            text_search_config: memory.text_search_config.clone(),
            tuning: memory.search,
        }
    }

    /// The configuration as an SQL string literal. It is written into the statement, not
    /// bound: `websearch_to_tsquery` of a constant configuration is immutable, so PostgreSQL
    /// folds the query into a constant and estimates how many memories match it from the
    /// column's statistics (a common word matches nearly all of them, and reading them from
    /// the full-text index would cost more than the reader's namespace does). With a bound
    /// `$n::regconfig` (a stable cast) the estimate is a blind guess. Quotes are doubled, so
    /// whatever the setting holds stays a literal; the startup check only lets a known name
    /// through.
    fn config_literal(&self) -> String {
        format!("'{}'", self.text_search_config.replace('\'', "''"))
    }
}

/// How a search was answered ([`search_planned`]); `memos_search_total{mode,plan}` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchPlan {
    /// Full-text matches found by the full-text index or the reader's namespaces, ranked.
    Text,
    /// Every visible memory's distance, sorted: the reader holds at most `exact_limit`.
    Exact,
    /// The HNSW index, scanned iteratively until `limit` visible memories were found.
    Approximate,
    /// The HNSW scan ran out of `max_scan_tuples` before finding `limit` visible memories, so
    /// the exact plan answered.
    ApproximateThenExact,
    /// Hybrid over a large reader: its best text and vector candidates, fused.
    Fused,
}

impl SearchPlan {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchPlan::Text => "text",
            SearchPlan::Exact => "exact",
            SearchPlan::Approximate => "approximate",
            SearchPlan::ApproximateThenExact => "approximate_then_exact",
            SearchPlan::Fused => "fused",
        }
    }
}

fn vector_literal(embedding: &[f32]) -> String {
    let parts: Vec<String> = embedding.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// The filter every search applies besides visibility: live, unexpired memories (`$2` now).
macro_rules! searchable_to_1 {
    () => {
        concat!(
            "m.forgotten_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > $2) AND ",
            visible_to_1!()
        )
    };
}

/// What a ranking statement returns: whole memories, or only their ids (candidates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returning {
    Memories,
    Ids,
}

impl Returning {
    fn columns(self) -> &'static str {
        match self {
            Returning::Memories => memory_columns!(),
            Returning::Ids => "m.memory_id",
        }
    }
}

/// Full-text search, best rank first: `$1` reader, `$2` now, `$3` query, `$4` limit.
pub fn text_search_statement(
    reader: &Reader,
    query: &str,
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
    returning: Returning,
) -> Statement {
    let (config, columns) = (settings.config_literal(), returning.columns());
    Statement::new(format!(
        "SELECT {columns}, ts_rank_cd(m.content_tsv, q)::float8 AS score
         FROM memories m, websearch_to_tsquery({config}, $3) q
         WHERE m.content_tsv @@ q AND {}
         ORDER BY score DESC, m.memory_id LIMIT $4",
        searchable_to_1!()
    ))
    .bind(scope(Some(reader)))
    .bind(now)
    .bind(query)
    .bind(limit)
    .planned_each_time()
}

/// Exact k-NN: the reader's visible memories (found by index) sorted by cosine distance.
/// `$1` reader, `$2` now, `$3` embedding, `$4` limit.
pub fn exact_vector_statement(
    reader: &Reader,
    embedding: &[f32],
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
    returning: Returning,
) -> Statement {
    // The dimension is a number from configuration, so formatting it keeps the SQL safe; it
    // must appear literally for the planner to match the embedding index's expression.
    let (d, columns) = (settings.dimensions, returning.columns());
    Statement::new(format!(
        "SELECT {columns}, (1 - (m.embedding::vector({d}) <=> $3::vector({d})))::float8 AS score
         FROM memories m
         WHERE m.embedding IS NOT NULL AND {}
         ORDER BY m.embedding::vector({d}) <=> $3::vector({d}), m.memory_id LIMIT $4",
        searchable_to_1!()
    ))
    .bind(scope(Some(reader)))
    .bind(now)
    .bind(vector_literal(embedding))
    .bind(limit)
    .planned_each_time()
}

/// The session settings of [`approximate_vector_statement`], for the current transaction:
/// iterative scans in relaxed order (the statement sorts its results again),
/// `hnsw.ef_search` and `hnsw.max_scan_tuples` from `memory.search`, and no bitmap scans.
/// The planner cannot know how many memories the visibility arrays select (computed at run
/// time, estimated at about a thousand), so left to itself it takes the reader's memories by
/// the namespace index and sorts them: exact, and 0.5-15 s for a reader of 100,000 at
/// 1,000,000 memories (measured). This statement is only run for a reader known to be large,
/// and without bitmap scans the visibility can only filter the index's nearest entries.
pub fn approximate_settings_statement(settings: &SearchSettings) -> Statement {
    Statement::new(
        "SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true),
                set_config('hnsw.ef_search', $1, true),
                set_config('hnsw.max_scan_tuples', $2, true),
                set_config('enable_bitmapscan', 'off', true)"
            .into(),
    )
    .bind(settings.tuning.ef_search.to_string())
    .bind(settings.tuning.max_scan_tuples.to_string())
}

/// Approximate k-NN from the HNSW index, its nearest entries filtered by visibility as the
/// iterative scan goes (it keeps scanning until `limit` rows pass or `hnsw.max_scan_tuples`
/// entries were visited). Ordered by distance alone, so the index can produce the order; the
/// relaxed order of the scan is sorted again outside. Run after
/// [`approximate_settings_statement`] in one transaction. `$1` reader, `$2` now, `$3`
/// embedding, `$4` limit.
pub fn approximate_vector_statement(
    reader: &Reader,
    embedding: &[f32],
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
    returning: Returning,
) -> Statement {
    let (d, columns) = (settings.dimensions, returning.columns());
    Statement::new(format!(
        "WITH nearest AS MATERIALIZED (
           SELECT m.memory_id, m.embedding::vector({d}) <=> $3::vector({d}) AS distance
           FROM memories m
           WHERE m.embedding IS NOT NULL AND {}
           ORDER BY m.embedding::vector({d}) <=> $3::vector({d}) LIMIT $4)
         SELECT {columns}, (1 - n.distance)::float8 AS score
         FROM nearest n JOIN memories m USING (memory_id)
         ORDER BY n.distance, m.memory_id",
        searchable_to_1!()
    ))
    .bind(scope(Some(reader)))
    .bind(now)
    .bind(vector_literal(embedding))
    .bind(limit)
    .planned_each_time()
}

/// How many memories the reader's namespaces and memory-level shares hold, counted up to
/// `bound` (each part stops at `bound`: the count costs at most that many index entries).
/// Forgotten memories and memories without an embedding count too: it chooses a plan, it
/// is not an answer. `$1` reader, `$2` bound.
pub fn visible_count_statement(reader: &Reader, bound: i64) -> Statement {
    Statement::new(format!(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM memories m
                                       WHERE m.namespace = ANY ({}) LIMIT $2) n)
              + (SELECT count(*) FROM (SELECT 1 FROM memory_shares s
                                       WHERE s.grantee = ($1::text[])[1] AND s.memory_id IS NOT NULL
                                       LIMIT $2) s)",
        visible_namespaces_1!()
    ))
    .bind(scope(Some(reader)))
    .bind(bound)
}

/// The score of hybrid search over row `m` and query `q`: `$5` × cosine similarity to `$3`
/// (0 without an embedding) + (1 − `$5`) × text rank normalized to [0, 1) (`ts_rank_cd`
/// flag 32), for embeddings of dimension `d`.
fn hybrid_score(d: usize) -> String {
    format!(
        "($5 * CASE WHEN m.embedding IS NULL THEN 0
                    ELSE 1 - (m.embedding::vector({d}) <=> $3::vector({d})) END
          + (1 - $5) * coalesce(ts_rank_cd(m.content_tsv, q, 32), 0))::float8"
    )
}

/// Hybrid search: every visible memory that matches the query or has an embedding (or only
/// the `candidates`, ids from the text and the vector ranking, found by primary key), scored
/// `weight` × vector similarity + (1 − `weight`) × normalized text rank. `$1` reader, `$2`
/// now, `$3` embedding, `$4` query, `$5` weight, `$6` limit, `$7` the candidates.
pub fn hybrid_statement(
    reader: &Reader,
    (query, embedding, weight): (&str, &[f32], f64),
    candidates: Option<&[Uuid]>,
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
) -> Statement {
    let (config, columns) = (settings.config_literal(), memory_columns!());
    let among = if candidates.is_some() {
        "m.memory_id = ANY ($7::uuid[]) AND "
    } else {
        ""
    };
    let statement = Statement::new(format!(
        "WITH scored AS (
           SELECT m.memory_id, {score} AS score
           FROM memories m, websearch_to_tsquery({config}, $4) q
           WHERE {among}(m.content_tsv @@ q OR m.embedding IS NOT NULL) AND {visible}
         )
         SELECT {columns}, s.score FROM scored s JOIN memories m USING (memory_id)
         ORDER BY score DESC, m.memory_id LIMIT $6",
        score = hybrid_score(settings.dimensions),
        visible = searchable_to_1!(),
    ))
    .bind(scope(Some(reader)))
    .bind(now)
    .bind(vector_literal(embedding))
    .bind(query)
    .bind(weight)
    .bind(limit);
    match candidates {
        Some(ids) => statement.bind(ids),
        None => statement,
    }
    .planned_each_time()
}

/// The exact statement of a mode, as [`search`] runs for a reader whose memories are few:
/// what the benchmark and the tests compare approximate answers with.
pub fn exact_search_statement(
    reader: &Reader,
    mode: &SearchMode,
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
) -> Statement {
    match mode {
        SearchMode::Text(query) => {
            text_search_statement(reader, query, settings, now, limit, Returning::Memories)
        }
        SearchMode::Vector(embedding) => {
            exact_vector_statement(reader, embedding, settings, now, limit, Returning::Memories)
        }
        SearchMode::Hybrid {
            query,
            embedding,
            weight,
        } => hybrid_statement(reader, (query, embedding, *weight), None, settings, now, limit),
    }
}

/// Searches everything `reader` may read (never forgotten or expired memories), best first.
pub async fn search(
    conn: &mut PgConnection,
    reader: &Reader,
    mode: &SearchMode,
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Scored>, sqlx::Error> {
    Ok(search_planned(conn, reader, mode, settings, now, limit).await?.0)
}

/// [`search`], and how it was answered.
///
/// - Text: one statement, the full-text index and the reader's namespaces (whichever the
///   planner estimates smaller), every match ranked.
/// - Vector: while the reader's namespaces and shares hold at most `memory.search.exact_limit`
///   memories (a count bounded by it), exact k-NN. Above, the HNSW index with iterative
///   scans, which finds the nearest visible memories of a large reader without reading the
///   others; if the scan budget (`max_scan_tuples`) runs out before `limit` are found, the
///   exact plan answers, so a search never returns fewer results than exact search would.
/// - Hybrid: for a reader under the limit, exact (every visible memory scored). Above, the
///   best `hybrid_candidates` of the text ranking and of the vector ranking (as above) are
///   fused: scored by the same formula, best `limit` returned.
pub async fn search_planned(
    conn: &mut PgConnection,
    reader: &Reader,
    mode: &SearchMode,
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<(Vec<Scored>, SearchPlan), sqlx::Error> {
    match mode {
        SearchMode::Text(query) => {
            let found = text_search_statement(reader, query, settings, now, limit, Returning::Memories)
                .fetch_all(&mut *conn)
                .await?;
            Ok((found, SearchPlan::Text))
        }
        SearchMode::Vector(embedding) => {
            if !is_large(conn, reader, settings).await? {
                let found =
                    exact_vector_statement(reader, embedding, settings, now, limit, Returning::Memories)
                        .fetch_all(&mut *conn)
                        .await?;
                return Ok((found, SearchPlan::Exact));
            }
            approximate_vector(conn, reader, embedding, settings, now, limit, Returning::Memories).await
        }
        SearchMode::Hybrid {
            query,
            embedding,
            weight,
        } => {
            let hybrid = (query.as_str(), embedding.as_slice(), *weight);
            if !is_large(conn, reader, settings).await? {
                let found = hybrid_statement(reader, hybrid, None, settings, now, limit)
                    .fetch_all(&mut *conn)
                    .await?;
                return Ok((found, SearchPlan::Exact));
            }
            let n = limit.max(i64::from(settings.tuning.hybrid_candidates));
            let text: Vec<Candidate> = text_search_statement(reader, query, settings, now, n, Returning::Ids)
                .fetch_all(&mut *conn)
                .await?;
            let (vector, _) =
                approximate_vector(conn, reader, embedding, settings, now, n, Returning::Ids).await?;
            let mut candidates: Vec<Uuid> = text.iter().chain(&vector).map(|c| c.memory_id).collect();
            candidates.sort_unstable();
            candidates.dedup();
            let found = hybrid_statement(reader, hybrid, Some(&candidates), settings, now, limit)
                .fetch_all(&mut *conn)
                .await?;
            Ok((found, SearchPlan::Fused))
        }
    }
}

/// A candidate of a fused search: a memory id and its score in one ranking.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Candidate {
    memory_id: Uuid,
}

/// Whether `reader` may read more than `exact_limit` memories (then exact k-NN is too slow).
async fn is_large(
    conn: &mut PgConnection,
    reader: &Reader,
    settings: &SearchSettings,
) -> Result<bool, sqlx::Error> {
    let bound = i64::from(settings.tuning.exact_limit) + 1;
    let (visible,): (i64,) = visible_count_statement(reader, bound)
        .fetch_one(&mut *conn)
        .await?;
    Ok(visible >= bound)
}

/// The HNSW plan in a transaction of its own (its settings are local to it; inside a
/// caller's transaction, a savepoint), falling back to the exact plan when it found fewer
/// than `limit`: the scan gave up, or the reader has fewer than `limit` memories.
async fn approximate_vector<O>(
    conn: &mut PgConnection,
    reader: &Reader,
    embedding: &[f32],
    settings: &SearchSettings,
    now: DateTime<Utc>,
    limit: i64,
    returning: Returning,
) -> Result<(Vec<O>, SearchPlan), sqlx::Error>
where
    O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    let mut tx = conn.begin().await?;
    approximate_settings_statement(settings).execute(&mut *tx).await?;
    let found: Vec<O> = approximate_vector_statement(reader, embedding, settings, now, limit, returning)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    if found.len() as i64 >= limit {
        return Ok((found, SearchPlan::Approximate));
    }
    let found = exact_vector_statement(reader, embedding, settings, now, limit, returning)
        .fetch_all(&mut *conn)
        .await?;
    Ok((found, SearchPlan::ApproximateThenExact))
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
