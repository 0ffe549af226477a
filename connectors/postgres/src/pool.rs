//! Connection pool and schema migrations.

use memos_runtime::config::PostgresConfig;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// Opens a pool; fails fast when the server does not answer within the acquire timeout.
pub async fn connect(config: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect(config.url.expose())
        .await
}

/// Applies pending migrations. Safe to call from several processes at once: sqlx serializes
/// them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
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
