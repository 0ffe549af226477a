//! Search figures for docs/search.md: builds 100,000 memories in 1,000 namespaces with
//! 384-dimension embeddings (`search_fixture`, in a database of its own on the stack's
//! PostgreSQL, dropped at the end), then times one text and one vector search for ordinary
//! agents three ways: the statements of `memos_postgres::queries` (visibility resolved once
//! per statement), the same with the visibility resolved by a first query and bound as two
//! arrays (two round trips), and the visibility predicate of main before issue 15 (a
//! correlated `EXISTS` per row; text search with the same `english` configuration, so only
//! visibility differs). Prints a Markdown table of the median and the slowest of 20 runs
//! after 3 warm-up runs.
//!
//! Run: `cargo run --release -p memos-integration-tests --example search_figures`
//! (sizes: `SEARCH_FIGURES_MEMORIES`, `SEARCH_FIGURES_NAMESPACES`).

use std::time::{Duration, Instant};

use chrono::Utc;
use memos_integration_tests::{TestEnv, search_fixture};
use memos_postgres::queries::{self, Reader, Scored, SearchMode, SearchSettings};
use sqlx::PgPool;

const DIMENSIONS: usize = 384;
const PREFIX: &str = "fig-agent-";

/// The visibility of main before issue 15, over `$1` (the reader's scope).
const BEFORE: &str = "($1::text[] IS NULL OR m.namespace = ANY($1::text[]) OR EXISTS (SELECT 1 FROM memory_shares s \
     WHERE s.namespace = m.namespace AND s.grantee = ($1::text[])[1] \
     AND (s.memory_id IS NULL OR s.memory_id = m.memory_id)))";

/// Visibility bound as resolved arrays (`$5` namespaces, `$6` memory ids).
const BOUND: &str = "(m.namespace = ANY($5::text[]) OR m.memory_id = ANY($6::uuid[]))";

fn sql(mode: &str, visible: &str) -> String {
    let live = "m.forgotten_at IS NULL AND (m.expires_at IS NULL OR m.expires_at > $2)";
    match mode {
        "text" => format!(
            "SELECT m.memory_id, ts_rank_cd(m.content_tsv, q)::float8 AS score
             FROM memories m, websearch_to_tsquery('english', $3) q
             WHERE m.content_tsv @@ q AND {live} AND {visible}
             ORDER BY score DESC, m.memory_id LIMIT $4"
        ),
        _ => format!(
            "SELECT m.memory_id, (1 - (m.embedding::vector({DIMENSIONS}) <=> $3::vector({DIMENSIONS})))::float8 AS score
             FROM memories m
             WHERE m.embedding IS NOT NULL AND {live} AND {visible}
             ORDER BY m.embedding::vector({DIMENSIONS}) <=> $3::vector({DIMENSIONS}), m.memory_id LIMIT $4"
        ),
    }
}

fn vector_literal(embedding: &[f32]) -> String {
    let parts: Vec<String> = embedding.iter().map(|x| x.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// `text` query or vector literal, as `$3` of [`sql`].
async fn raw(pool: &PgPool, sql: &str, agent: &str, arg: &str, resolve: bool) -> anyhow::Result<usize> {
    let scope = vec![agent.to_owned()];
    let mut query = sqlx::query_as::<_, (uuid::Uuid, f64)>(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(&scope)
        .bind(Utc::now())
        .bind(arg)
        .bind(10_i64);
    if resolve {
        let (namespaces, ids): (Vec<String>, Vec<uuid::Uuid>) = sqlx::query_as(
            "SELECT ARRAY(SELECT unnest($1::text[]) UNION SELECT namespace FROM memory_shares
                          WHERE grantee = ($1::text[])[1] AND memory_id IS NULL),
                    ARRAY(SELECT s.memory_id FROM memory_shares s
                          JOIN memories x ON x.memory_id = s.memory_id AND x.namespace = s.namespace
                          WHERE s.grantee = ($1::text[])[1])",
        )
        .bind(&scope)
        .fetch_one(pool)
        .await?;
        query = query.bind(namespaces).bind(ids);
    }
    Ok(query.fetch_all(pool).await?.len())
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.2} | {:.2}",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let size = |var: &str, default: i64| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let memories = size("SEARCH_FIGURES_MEMORIES", 100_000);
    let namespaces = size("SEARCH_FIGURES_NAMESPACES", 1_000);
    let env = TestEnv::new().await?;
    let pool = env.pool.clone();
    let started = Instant::now();
    search_fixture::build(&pool, PREFIX, memories, namespaces, DIMENSIONS, "english").await?;
    eprintln!("built {memories} memories in {:?}", started.elapsed());

    let i = 12_345.0_f32;
    let embedding: Vec<f32> = (1..=DIMENSIONS)
        .map(|j| (i * 0.37 + j as f32 * 1.3).sin())
        .collect();
    let literal = vector_literal(&embedding);
    let settings = SearchSettings::from_config(&memos_runtime::Config::default().memory);
    println!(
        "{memories} memories, {namespaces} namespaces, {DIMENSIONS} dimensions; median | slowest of 20, ms\n"
    );
    println!("| agent | search | statement | median ms | slowest ms |");
    println!("| --- | --- | --- | --- | --- |");
    // An agent with a memory-level share, and one that also has a whole namespace shared.
    for agent in [format!("{PREFIX}7"), format!("{PREFIX}10")] {
        for mode in ["text", "vector"] {
            let arg = if mode == "text" {
                "preference"
            } else {
                literal.as_str()
            };
            let search_mode = match mode {
                "text" => SearchMode::Text(arg.into()),
                _ => SearchMode::Vector(embedding.clone()),
            };
            let reader = Reader::agent(agent.clone());
            for variant in [
                "queries.rs (one statement)",
                "resolved first (two round trips)",
                "before (main)",
            ] {
                let mut times = Vec::new();
                for run in 0..23 {
                    let t = Instant::now();
                    let rows = match variant {
                        "queries.rs (one statement)" => {
                            let found: Vec<Scored> = queries::exact_search_statement(
                                &reader,
                                &search_mode,
                                &settings,
                                Utc::now(),
                                10,
                            )
                            .fetch_all(&pool)
                            .await?;
                            found.len()
                        }
                        "resolved first (two round trips)" => {
                            raw(&pool, &sql(mode, BOUND), &agent, arg, true).await?
                        }
                        _ => raw(&pool, &sql(mode, BEFORE), &agent, arg, false).await?,
                    };
                    anyhow::ensure!(rows == 10, "{variant} {mode} found {rows} rows");
                    if run >= 3 {
                        times.push(t.elapsed());
                    }
                }
                println!("| {agent} | {mode} | {variant} | {} |", summary(&mut times));
            }
        }
    }
    env.cleanup().await;
    Ok(())
}
