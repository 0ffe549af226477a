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

use memos_runtime::config::PostgresConfig;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Executor, PgPool};

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

/// Opens a pool on the active view schema; fails fast when the server does not answer within
/// the acquire timeout.
pub async fn connect(config: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        // The generation check below is a round trip that also proves the connection alive.
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(use_active_schema(conn)))
        .before_acquire(|conn, _| Box::pin(still_active(conn)))
        .connect(config.url.expose())
        .await
}

/// Applies pending migrations to the active view schema. Safe to call from several
/// processes at once: sqlx serializes them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    crate::bulk::MIGRATOR.run(pool).await
}

/// Creates the HNSW index for embeddings of `dimensions` (cosine distance) if missing. The
/// dimension comes from configuration, so it cannot live in a static migration.
pub async fn ensure_vector_index(pool: &PgPool, dimensions: usize) -> Result<(), sqlx::Error> {
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS memories_embedding_hnsw_{dimensions} ON memories
         USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops)
         WHERE embedding IS NOT NULL AND forgotten_at IS NULL"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}
