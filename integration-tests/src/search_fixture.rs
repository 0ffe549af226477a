//! A large `memories` table for plan tests and search measurements, built by a handful of
//! `INSERT ... SELECT generate_series` statements: `memories` memories spread evenly over
//! `namespaces` namespaces `{prefix}{n}` (every 10th forgotten), with `dimensions`-dimension
//! embeddings, tags, metadata, one applied history row each, a memory-level share from every
//! agent to the one before it and a whole-namespace share from every 10th agent to the one
//! before it. Deterministic: the same sizes give the same rows. The embeddings' frequency
//! in dimension `j` is `sqrt(j)`: incommensurate, so they span every dimension (not a plane)
//! and never repeat, as real ones do not.

/// The statements, to run in order on a migrated, empty view schema (then `ANALYZE`).
pub fn statements(prefix: &str, memories: i64, namespaces: i64, dimensions: usize) -> [String; 4] {
    [
        format!(
            "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance, embedding,
                                   version, actor, created_by, created_at, updated_at, forgotten_at,
                                   log_partition, log_offset)
             SELECT md5('m' || i)::uuid, '{prefix}' || (i % {namespaces}),
                    'memory ' || i || ' notes the user preference for topic ' || (i % 97),
                    CASE WHEN i % 3 = 0 THEN 'episodic' ELSE 'semantic' END,
                    ARRAY['t' || (i % 20), 'g' || (i % 7)], jsonb_build_object('k', i % 10), 0.5,
                    array(SELECT sin(i * sqrt(j) + j * 1.3) FROM generate_series(1, {dimensions}) j)::vector,
                    1, '{prefix}' || (i % {namespaces}), md5('c' || i)::uuid,
                    timestamptz '2026-01-01' + i * interval '1 minute',
                    timestamptz '2026-01-01' + i * interval '1 minute',
                    CASE WHEN i % 10 = 0 THEN timestamptz '2026-06-01' END, 0, i
             FROM generate_series(1, {memories}) i"
        ),
        "INSERT INTO memory_history (memory_id, command_id, version, operation, actor, status, change, state,
                                     log_partition, log_offset, record_time, valid_from, valid_to)
         SELECT memory_id, created_by, 1, 'write', actor, 'applied', '{}',
                to_jsonb(m) - 'content_tsv' - 'embedding' - 'forgotten_at', 0, log_offset, created_at, created_at,
                forgotten_at
         FROM memories m"
            .to_owned(),
        format!(
            "INSERT INTO memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at)
             SELECT '{prefix}' || ((a + 1) % {namespaces}),
                    md5('m' || (((a + 1) % {namespaces}) + {namespaces}))::uuid,
                    '{prefix}' || a, '{prefix}' || ((a + 1) % {namespaces}), md5('s' || a)::uuid,
                    timestamptz '2026-01-02'
             FROM generate_series(0, {namespaces} - 1) a"
        ),
        format!(
            "INSERT INTO memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at)
             SELECT '{prefix}' || ((a + 1) % {namespaces}), NULL, '{prefix}' || a,
                    '{prefix}' || ((a + 1) % {namespaces}), md5('w' || a)::uuid, timestamptz '2026-01-02'
             FROM generate_series(0, {namespaces} - 1, 10) a"
        ),
    ]
}

/// Builds the table in the database of `pool` (migrated here, embedding index for
/// `dimensions`, full-text column with `text_search_config`) and analyzes it.
pub async fn build(
    pool: &sqlx::PgPool,
    prefix: &str,
    memories: i64,
    namespaces: i64,
    dimensions: usize,
    text_search_config: &str,
) -> anyhow::Result<()> {
    memos_postgres::migrate(pool).await?;
    memos_postgres::pool::ensure_text_search(pool, text_search_config).await?;
    for statement in statements(prefix, memories, namespaces, dimensions) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await?;
    }
    // After the load: one index build instead of 100,000 insertions into the graph.
    memos_postgres::pool::ensure_vector_index(pool, dimensions).await?;
    sqlx::raw_sql("ANALYZE").execute(pool).await?;
    Ok(())
}
