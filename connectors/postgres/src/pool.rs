//! Connection pool and schema migrations.
//!
//! Guarantee (one active view schema): every pooled connection resolves unqualified table
//! names to the schema named in `memos_control.active_view` and carries the generation of
//! that row (session setting `memos.generation`). Before an idle connection is handed out,
//! its generation is compared with the row's; a connection of an older generation is closed
//! and replaced by a fresh one, which has no prepared statements planned against the old
//! tables. So after `memosctl promote` commits, no request starts on the old schema. The
//! projector's apply transactions additionally check the generation under a shared lock
//! ([`crate::offsets::lock_and_load`]), so no batch commits into a schema that is no longer
//! active. Before migration `0007` has run, connections keep the server's default
//! `search_path`.
//!
//! Guarantee (nothing holds the views without end): every pooled connection carries the
//! session bounds of [`PostgresConfig`] as startup parameters
//! (`idle_in_transaction_session_timeout`, `lock_timeout`, `statement_timeout`). A process
//! stopped inside a transaction (SIGSTOP, a paused VM) has its session ended by the server
//! after `idle_in_transaction_timeout`, which releases its row locks on the offsets; a
//! projector waiting for those locks fails after `lock_timeout` with a transient error and
//! retries. When the stopped process resumes, its connection is gone, so its transaction
//! cannot commit; its retry reads the offsets the new owner stored and skips what was
//! applied ([`crate::offsets::lock_and_load`]). Migrations and the embedding index build run
//! on a connection of their own without the lock and statement bounds. Connections name
//! their process in `application_name` (`memos[PID]`), so `pg_stat_activity` tells which
//! process holds what.

use std::time::Duration;

use memos_runtime::config::PostgresConfig;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

/// SQLSTATE of "relation does not exist" (before the control table is migrated).
const UNDEFINED_TABLE: &str = "42P01";

fn undefined_table(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == UNDEFINED_TABLE)
}

/// Points a new connection at the active view schema and records its generation.
async fn use_active_schema(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass('memos_control.active_view') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if exists {
        conn.execute(
            "SELECT set_config('search_path', format('%I, public', schema_name), false),
                    set_config('memos.generation', generation::text, false)
             FROM memos_control.active_view",
        )
        .await?;
    }
    Ok(())
}

/// Whether an idle connection still points at the active view schema.
async fn still_active(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let current: Result<(bool,), sqlx::Error> = sqlx::query_as(
        "SELECT generation::text IS NOT DISTINCT FROM nullif(current_setting('memos.generation', true), '')
         FROM memos_control.active_view",
    )
    .fetch_one(&mut *conn)
    .await;
    match current {
        Ok((same,)) => Ok(same),
        // Not migrated yet: nothing to switch.
        Err(e) if undefined_table(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A duration as a PostgreSQL time setting in milliseconds; `0` disables the bound. A
/// non-zero duration below a millisecond is one millisecond, not "disabled".
fn millis(duration: Duration) -> u128 {
    match duration.as_millis() {
        0 if !duration.is_zero() => 1,
        ms => ms,
    }
}

/// The session bounds of `config`, as startup parameters (later ones win over the URL's own
/// `options`).
pub fn session_bounds(config: &PostgresConfig) -> [(&'static str, String); 3] {
    [
        (
            "idle_in_transaction_session_timeout",
            millis(config.idle_in_transaction_timeout).to_string(),
        ),
        ("lock_timeout", millis(config.lock_timeout).to_string()),
        ("statement_timeout", millis(config.statement_timeout).to_string()),
    ]
}

/// `memos[PID]` (the binary's name and this process's id), as `pg_stat_activity` shows it.
fn application_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "memos".into());
    format!("{binary}[{}]", std::process::id())
}

/// Connection options of `config`: its URL, the session bounds, the application name.
pub fn connect_options(config: &PostgresConfig) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = config.url.expose().parse()?;
    Ok(options
        .application_name(&application_name())
        .options(session_bounds(config)))
}

/// Opens a pool on the active view schema, every connection bounded as the module
/// documentation says; fails fast when the server does not answer within the acquire
/// timeout.
pub async fn connect(config: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        // The generation check below is a round trip that also proves the connection alive.
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(use_active_schema(conn)))
        .before_acquire(|conn, _| Box::pin(still_active(conn)))
        .connect_with(connect_options(config)?)
        .await
}

/// A connection of its own, with the pool's options but no lock or statement bound: a
/// migration or an index build may take long on a large table, and waiting for another
/// process's migration (sqlx's advisory lock) must not fail a start. Idle-in-transaction
/// stays bounded.
async fn unbounded(pool: &PgPool) -> Result<PgConnection, sqlx::Error> {
    let options = (*pool.connect_options())
        .clone()
        .options([("lock_timeout", "0"), ("statement_timeout", "0")]);
    let mut conn = options.connect().await?;
    use_active_schema(&mut conn).await?;
    Ok(conn)
}

/// Applies pending migrations to the active view schema, on a connection without lock and
/// statement bounds. Safe to call from several processes at once: sqlx serializes them with
/// an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = unbounded(pool).await?;
    crate::bulk::MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Creates the HNSW index for embeddings of `dimensions` (cosine distance) if missing, on a
/// connection without lock and statement bounds (building it on a large table takes long).
/// The dimension comes from configuration, so it cannot live in a static migration.
pub async fn ensure_vector_index(pool: &PgPool, dimensions: usize) -> Result<(), sqlx::Error> {
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS memories_embedding_hnsw_{dimensions} ON memories
         USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops)
         WHERE embedding IS NOT NULL AND forgotten_at IS NULL"
    );
    let mut conn = unbounded(pool).await?;
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

/// Why the full-text column does not follow `memory.text_search_config`.
#[derive(Debug, thiserror::Error)]
pub enum TextSearchError {
    #[error(
        "memory.text_search_config = {0:?}: not a text search configuration name \
         (a plain lowercase identifier such as english or simple)"
    )]
    Name(String),
    #[error(
        "memory.text_search_config = {0:?}: PostgreSQL has no such text search configuration (psql: \\dF)"
    )]
    Unknown(String),
    #[error(
        "memory.text_search_config is {configured:?} but memories.content_tsv was built with {built}; \
         set the configuration back, or run `memosctl text-search apply` to rebuild the column and its \
         index (it rewrites the memories table and locks it meanwhile), or rebuild the views with \
         `memosctl replay` and promote them"
    )]
    Mismatch { configured: String, built: String },
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
}

/// The generated full-text column's expression for `config`, as `pg_get_expr` renders it.
fn tsv_expression(config: &str) -> String {
    format!("to_tsvector('{config}'::regconfig, content)")
}

/// Checks that `config` names a text search configuration of the server.
async fn check_text_search_name(conn: &mut PgConnection, config: &str) -> Result<(), TextSearchError> {
    let plain = config
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && config
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain || config.len() > 63 {
        return Err(TextSearchError::Name(config.to_owned()));
    }
    let (known,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = $1)")
        .bind(config)
        .fetch_one(&mut *conn)
        .await?;
    if !known {
        return Err(TextSearchError::Unknown(config.to_owned()));
    }
    Ok(())
}

/// The expression `memories.content_tsv` is generated by, in the connection's schema.
async fn built_tsv_expression(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    let (expression,): (String,) = sqlx::query_as(
        "SELECT pg_get_expr(d.adbin, d.adrelid)
         FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE a.attrelid = 'memories'::regclass AND a.attname = 'content_tsv'",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(expression)
}

/// Regenerates `memories.content_tsv` (and its GIN index) with `config`, in one transaction.
/// PostgreSQL 15 cannot change a generated column's expression, so the column is dropped and
/// added again: this rewrites the table under an exclusive lock.
async fn regenerate_tsv(conn: &mut PgConnection, config: &str) -> Result<(), sqlx::Error> {
    // `config` passed check_text_search_name: a plain identifier, safe inside the literal.
    let sql = format!(
        "ALTER TABLE memories DROP COLUMN content_tsv;
         ALTER TABLE memories ADD COLUMN content_tsv tsvector GENERATED ALWAYS AS ({}) STORED;
         CREATE INDEX memories_fulltext ON memories USING gin (content_tsv);",
        tsv_expression(config)
    );
    let mut tx = conn.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    tx.commit().await
}

/// Makes `memories.content_tsv` of the connection's schema follow `config` when that is
/// cheap, or refuses: it already does (nothing to do); the table is empty (a fresh database
/// or a fresh rebuild schema: the column is regenerated at once); otherwise
/// [`TextSearchError::Mismatch`], because the change rewrites every memory and must be asked
/// for ([`apply_text_search`]). So a process never searches with a configuration other than
/// the one its column was built with.
pub async fn ensure_text_search_on(conn: &mut PgConnection, config: &str) -> Result<(), TextSearchError> {
    check_text_search_name(conn, config).await?;
    let built = built_tsv_expression(conn).await?;
    if built == tsv_expression(config) {
        return Ok(());
    }
    let (empty,): (bool,) = sqlx::query_as("SELECT NOT EXISTS (SELECT 1 FROM memories)")
        .fetch_one(&mut *conn)
        .await?;
    if !empty {
        return Err(TextSearchError::Mismatch {
            configured: config.to_owned(),
            built,
        });
    }
    regenerate_tsv(conn, config).await?;
    Ok(())
}

/// [`ensure_text_search_on`] for the active view schema, on a connection of its own.
pub async fn ensure_text_search(pool: &PgPool, config: &str) -> Result<(), TextSearchError> {
    let mut conn = unbounded(pool).await?;
    let result = ensure_text_search_on(&mut conn, config).await;
    conn.close().await?;
    result
}

/// Regenerates `memories.content_tsv` of the active view schema with `config` whatever the
/// table holds (`memosctl text-search apply`); returns whether anything changed.
pub async fn apply_text_search(pool: &PgPool, config: &str) -> Result<bool, TextSearchError> {
    let mut conn = unbounded(pool).await?;
    check_text_search_name(&mut conn, config).await?;
    let changed = built_tsv_expression(&mut conn).await? != tsv_expression(config);
    if changed {
        regenerate_tsv(&mut conn, config).await?;
    }
    conn.close().await?;
    Ok(changed)
}
