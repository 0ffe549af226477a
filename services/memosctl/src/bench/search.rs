//! `memosctl bench search`: search latency and recall@10 on a large `memories` table.
//!
//! In a database of its own (memOS's migrations, the configured text search configuration,
//! the HNSW index built once after the load), `--memories` memories over `--namespaces`
//! agent namespaces are written by a few `INSERT ... SELECT generate_series` statements
//! (the approach of `integration-tests/src/search_fixture.rs`): one heavy agent holds 10% of
//! them, the others share the rest evenly; every agent shares one memory with the agent
//! before it, every 10th agent shares its whole namespace with the one before it, and the
//! heavy agent shares its whole namespace with agent 1. Every memory has a
//! `memory.embedding_dimensions` embedding and a sentence from a small vocabulary, so the
//! text queries match from about 1% to about 25% of the table. Then `ANALYZE`.
//!
//! Then, for sampled ordinary agents and for the heavy agent, `--queries` text, vector and
//! hybrid searches (limit 10) each, through `memos_postgres::queries::search_planned`, what
//! the API's `/v1/memories/search` runs, while a background task keeps inserting
//! memories (`--write-rate` per second) into random namespaces. Each search is timed, then
//! repeated in the same snapshot (one `REPEATABLE READ` transaction, so concurrent writes
//! cannot differ between the two) with `enable_indexscan` and `enable_bitmapscan` off: a
//! brute-force scan of every row with the same visibility and ranking, the exact answer.
//! recall@10 is the share of the exact top 10 the timed search returned.
//!
//! Guarantees: the result is one JSON line on stdout; the database is dropped at the end
//! unless `--keep`; the run fails rather than report if a search returns an error.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use memos_postgres::queries::{
    self, Cursor, ListFilter, Reader, Scored, SearchMode, SearchPlan, SearchSettings,
};
use memos_runtime::Config;
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::Isolation;
use super::sys::{self, Machine, round};

#[derive(clap::Args)]
pub struct Args {
    /// Memories to build.
    #[arg(long, default_value_t = 100_000)]
    memories: i64,
    /// Agent namespaces (the heavy agent's is one of them).
    #[arg(long, default_value_t = 1000)]
    namespaces: i64,
    /// Timed searches per mode, for the ordinary agents and again for the heavy agent.
    #[arg(long, default_value_t = 30)]
    queries: usize,
    /// Memories inserted per second while the searches run (0: none).
    #[arg(long, default_value_t = 20)]
    write_rate: u32,
    /// Keep the database (its run id is printed, for `--reuse`).
    #[arg(long)]
    keep: bool,
    /// Search the database a previous `--keep` run built (its run id) instead of building
    /// one; `--memories` and `--namespaces` must be the ones it was built with. Kept.
    #[arg(long)]
    reuse: Option<String>,
}

/// Latency of one mode for one kind of agent.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub queries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Mean number of results (at most 10).
    pub mean_results: f64,
    /// The lowest recall@10 of these searches.
    pub recall_min: f64,
    /// How many searches each plan answered (`queries::SearchPlan`).
    pub plans: std::collections::BTreeMap<&'static str, usize>,
}

/// recall@10 of one mode over every sampled search (ordinary and heavy).
#[derive(Debug, Serialize)]
pub struct Recall {
    pub mean: f64,
    pub min: f64,
}

#[derive(Debug, Serialize)]
pub struct Modes<T> {
    pub text: T,
    pub vector: T,
    pub hybrid: T,
}

/// Listing latency by filter, for ordinary agents and the heavy agent.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub ordinary: std::collections::BTreeMap<&'static str, Timing>,
    pub heavy: std::collections::BTreeMap<&'static str, Timing>,
    /// The slowest p99 of any filter, either kind of agent.
    pub worst_p99_ms: f64,
}

/// Latency of one listing filter.
#[derive(Debug, Serialize)]
pub struct Timing {
    pub queries: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_results: f64,
}

#[derive(Debug, Serialize)]
struct Output {
    bench: &'static str,
    date: String,
    run_id: String,
    memories: i64,
    namespaces: i64,
    heavy_agent_memories: i64,
    memory_shares: i64,
    namespace_shares: i64,
    embedding_dimensions: usize,
    text_search_config: String,
    build_seconds: f64,
    sampled_ordinary_agents: usize,
    queries_per_mode: usize,
    write_rate: u32,
    writes_during_searches: u64,
    ordinary: Modes<Latency>,
    heavy: Modes<Latency>,
    recall_at_10: Modes<Recall>,
    /// Listing an agent's own namespace (limit 50, newest first), by filter.
    listing: Listing,
    /// How the exact answer was computed.
    exact: &'static str,
    machine: Machine,
}

/// Topic words; memory `i` names topic `((i / 10) * 31 + i) % 50`, so each matches about 2%
/// of every agent's memories (the heavy agent's are every 10th `i`: the `i / 10` terms keep
/// its words as varied as the others').
const TOPICS: [&str; 50] = [
    "coffee",
    "travel",
    "project",
    "budget",
    "meeting",
    "invoice",
    "garden",
    "recipe",
    "flight",
    "hotel",
    "contract",
    "birthday",
    "doctor",
    "exercise",
    "music",
    "movie",
    "book",
    "language",
    "deploy",
    "database",
    "kernel",
    "network",
    "printer",
    "laptop",
    "phone",
    "password",
    "backup",
    "report",
    "review",
    "hiring",
    "salary",
    "vacation",
    "weather",
    "school",
    "homework",
    "car",
    "insurance",
    "rent",
    "grocery",
    "dinner",
    "wine",
    "tea",
    "running",
    "cycling",
    "swimming",
    "painting",
    "camera",
    "podcast",
    "newsletter",
    "tax",
];

/// Text queries, from common to rare: "user" is in a quarter of the memories (half of the
/// heavy agent's), "preference" in a tenth, a topic in about 2%, "deadline" in 1%.
const TEXT_QUERIES: [&str; 6] = [
    "user",
    "preference",
    "coffee",
    "deadline",
    "travel preference",
    "database backup",
];

fn sql_array(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    format!("ARRAY[{}]", quoted.join(","))
}

/// The content expression of memory `i` (an SQL integer expression).
fn content_sql(i: &str) -> String {
    format!(
        "(ARRAY['user','customer','colleague','manager'])[1 + {i} % 4] || ' ' \
         || (ARRAY['asked about','mentioned','decided on','reminded me of','prefers','dislikes','planned','noted'])[1 + ({i} / 4) % 8] \
         || ' the ' || ({topics})[1 + (({i} / 10) * 31 + {i}) % 50] \
         || CASE WHEN ({i} / 10) % 10 = 3 THEN ' preference' ELSE '' END \
         || CASE WHEN ({i} / 10) % 100 = 7 THEN ' before the deadline' ELSE '' END \
         || ', memory ' || {i}",
        topics = sql_array(&TOPICS)
    )
}

/// The embedding expression of memory `i`: deterministic, its topic's direction (so vector
/// and text search agree, as with real embeddings) plus a pseudo-random part with a frequency
/// of `sqrt(j)` in dimension `j`. The frequencies are incommensurate, so the part never
/// repeats (with frequencies linear in `j` it repeated every ~50,000 memories: clusters of
/// near-copies far apart in the HNSW graph, which the approximate search missed), and the
/// vectors span all dimensions, not a plane.
fn embedding_sql(i: &str, dimensions: usize) -> String {
    format!(
        "array(SELECT sin(((({i} / 10) * 31 + {i}) % 50) * 2.1 + j * 1.3) \
                      + sin({i} * sqrt(j) + j * 0.7) \
               FROM generate_series(1, {dimensions}) j)::vector"
    )
}

fn namespace(prefix: &str, agent: i64) -> String {
    format!("{prefix}{agent}")
}

/// Namespace of memory `i`: every 10th is the heavy agent's (agent 0), the rest spread over
/// agents 1..namespaces.
fn namespace_sql(prefix: &str, i: &str, namespaces: i64) -> String {
    format!("'{prefix}' || CASE WHEN {i} % 10 = 0 THEN 0 ELSE 1 + {i} % ({namespaces} - 1) END")
}

fn build_statements(prefix: &str, memories: i64, namespaces: i64, dimensions: usize) -> Vec<String> {
    let memory = format!(
        "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance, embedding,
                               version, actor, created_by, created_at, updated_at, log_partition, log_offset)
         SELECT md5('m' || i)::uuid, {ns}, {content},
                CASE WHEN i % 3 = 0 THEN 'episodic' ELSE 'semantic' END,
                ARRAY['t' || (i % 20)], jsonb_build_object('k', i % 10), 0.5, {embedding},
                1, {ns}, md5('c' || i)::uuid,
                timestamptz '2026-01-01' + i * interval '1 second',
                timestamptz '2026-01-01' + i * interval '1 second', 0, i
         FROM generate_series(1, {memories}) i",
        ns = namespace_sql(prefix, "i", namespaces),
        content = content_sql("i"),
        embedding = embedding_sql("i", dimensions),
    );
    // One memory of each namespace (its first) shared with the agent before it.
    let memory_shares = format!(
        "INSERT INTO memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at)
         SELECT DISTINCT ON (namespace) namespace, memory_id,
                '{prefix}' || ((substr(namespace, {start})::int + {namespaces} - 1) % {namespaces}),
                namespace, md5('s' || namespace)::uuid, timestamptz '2026-01-02'
         FROM memories ORDER BY namespace, log_offset",
        start = prefix.len() + 1,
    );
    let namespace_shares = format!(
        "INSERT INTO memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at)
         SELECT '{prefix}' || a, NULL::uuid, '{prefix}' || (a - 1), '{prefix}' || a, md5('w' || a)::uuid,
                timestamptz '2026-01-02'
         FROM generate_series(10, {namespaces} - 1, 10) a
         UNION ALL
         SELECT '{prefix}0', NULL::uuid, '{prefix}1', '{prefix}0', md5('heavy')::uuid, timestamptz '2026-01-02'"
    );
    vec![memory, memory_shares, namespace_shares]
}

/// Query embedding `n`: the shape of [`embedding_sql`], a topic's direction plus a
/// pseudo-random part at a non-integer position, so it is near that topic's memories and
/// equal to none of them.
fn query_embedding(n: usize, dimensions: usize) -> Vec<f32> {
    let topic = (n * 7 % 50) as f64;
    let x = 1234.5 + n as f64 * 7.77;
    (1..=dimensions)
        .map(|j| {
            let j = j as f64;
            ((topic * 2.1 + j * 1.3).sin() + (x * j.sqrt() + j * 0.7).sin()) as f32
        })
        .collect()
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.memories >= 100, "--memories must be at least 100");
    anyhow::ensure!(
        args.namespaces >= 3 && args.namespaces * 2 <= args.memories,
        "--namespaces must be at least 3 and at most half of --memories"
    );
    anyhow::ensure!(args.queries > 0, "--queries must be positive");
    let mut iso = Isolation::new(config, 1);
    if let Some(id) = &args.reuse {
        anyhow::ensure!(
            !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "--reuse takes the run id a --keep run printed"
        );
        iso.id = id.clone();
    }
    eprintln!("bench: run {} (database memos_bench_{}_search)", iso.id, iso.id);
    let result = run_isolated(config, &args, &mut iso).await;
    iso.cleanup(config, args.keep || args.reuse.is_some()).await;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}

/// One timed search and its exact counterpart, in the same snapshot.
struct Sample {
    millis: f64,
    results: usize,
    recall: f64,
    plan: SearchPlan,
}

async fn sample(
    pool: &PgPool,
    reader: &Reader,
    mode: &SearchMode,
    settings: &SearchSettings,
) -> anyhow::Result<Sample> {
    let now = Utc::now();
    let mut tx = pool.begin().await?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    // Takes the snapshot now, so the timed statement is not the one paying for it.
    sqlx::raw_sql("SELECT 1").execute(&mut *tx).await?;
    let started = Instant::now();
    let (found, plan) = queries::search_planned(&mut tx, reader, mode, settings, now, 10).await?;
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    sqlx::raw_sql("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_indexonlyscan = off")
        .execute(&mut *tx)
        .await?;
    let exact: Vec<Scored> = queries::exact_search_statement(reader, mode, settings, now, 10)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let got: HashSet<_> = found.iter().map(|s| s.memory.memory_id).collect();
    let recall = if exact.is_empty() {
        if found.is_empty() { 1.0 } else { 0.0 }
    } else {
        exact.iter().filter(|s| got.contains(&s.memory.memory_id)).count() as f64 / exact.len() as f64
    };
    if recall < 1.0 && std::env::var_os("MEMOS_BENCH_DEBUG").is_some() {
        let show = |v: &[Scored]| {
            v.iter()
                .map(|s| format!("{}:{:.4}", &s.memory.memory_id.to_string()[..8], s.score))
                .collect::<Vec<_>>()
        };
        eprintln!(
            "recall {recall} {} {:?}\n found {:?}\n exact {:?}",
            reader.name(),
            plan,
            show(&found),
            show(&exact)
        );
    }
    Ok(Sample {
        millis,
        results: found.len(),
        recall,
        plan,
    })
}

fn latency(samples: &[Sample]) -> Latency {
    let mut times: Vec<f64> = samples.iter().map(|s| s.millis).collect();
    times.sort_by(f64::total_cmp);
    Latency {
        queries: samples.len(),
        p50_ms: round(sys::quantile(&times, 0.5), 3),
        p99_ms: round(sys::quantile(&times, 0.99), 3),
        max_ms: round(times.last().copied().unwrap_or(0.0), 3),
        mean_results: round(
            samples.iter().map(|s| s.results as f64).sum::<f64>() / samples.len().max(1) as f64,
            2,
        ),
        recall_min: round(samples.iter().map(|s| s.recall).fold(1.0, f64::min), 4),
        plans: samples.iter().fold(Default::default(), |mut plans, s| {
            *plans.entry(s.plan.as_str()).or_default() += 1;
            plans
        }),
    }
}

fn recall(a: &[Sample], b: &[Sample]) -> Recall {
    let all: Vec<f64> = a.iter().chain(b).map(|s| s.recall).collect();
    Recall {
        mean: round(all.iter().sum::<f64>() / all.len().max(1) as f64, 4),
        min: round(all.iter().copied().fold(1.0, f64::min), 4),
    }
}

/// The listing filters timed: each filter of `GET /v1/agents/{id}/memories`, one that
/// matches nothing (the whole namespace is read to say so, unless an index answers), and a
/// second page (after the first page's cursor). Memory `i` was created at 2026-01-01 plus
/// `i` seconds: the range is a tenth of the `memories` built, in the middle.
fn list_cases(memories: i64) -> Vec<(&'static str, ListFilter, bool)> {
    let start = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 1, 0, 0, 0).unwrap();
    let at = |i: i64| start + chrono::Duration::seconds(i);
    let tags = |t: &[&str]| Some(t.iter().map(|t| (*t).to_owned()).collect());
    vec![
        ("none", ListFilter::default(), false),
        ("second_page", ListFilter::default(), true),
        (
            "tier",
            ListFilter {
                tier: Some("episodic".into()),
                ..Default::default()
            },
            false,
        ),
        (
            "tags_any",
            ListFilter {
                tags_any: tags(&["t3", "t7"]),
                ..Default::default()
            },
            false,
        ),
        (
            "tags_all",
            ListFilter {
                tags_all: tags(&["t3"]),
                ..Default::default()
            },
            false,
        ),
        (
            "metadata",
            ListFilter {
                metadata: Some(serde_json::json!({"k": 3})),
                ..Default::default()
            },
            false,
        ),
        (
            "created_range",
            ListFilter {
                created_after: Some(at(memories / 2)),
                created_before: Some(at(memories / 2 + memories / 10)),
                ..Default::default()
            },
            false,
        ),
        (
            "matching_nothing",
            ListFilter {
                tags_any: tags(&["absent"]),
                ..Default::default()
            },
            false,
        ),
    ]
}

/// One timed listing of `agent`'s own namespace (the first page untimed for a second page).
async fn list_once(
    pool: &PgPool,
    agent: &str,
    filter: &ListFilter,
    second_page: bool,
) -> anyhow::Result<(f64, usize)> {
    let reader = Reader::agent(agent);
    let now = Utc::now();
    let after = if second_page {
        let first = queries::list_statement(Some(&reader), agent, filter, now, None, 50, None)
            .fetch_all::<memos_postgres::memories::Memory, _>(pool)
            .await?;
        first.last().map(|m| Cursor {
            created_at: m.created_at,
            memory_id: m.memory_id,
        })
    } else {
        None
    };
    let started = Instant::now();
    let page = queries::list_statement(Some(&reader), agent, filter, now, after, 50, None)
        .fetch_all::<memos_postgres::memories::Memory, _>(pool)
        .await?;
    Ok((started.elapsed().as_secs_f64() * 1000.0, page.len()))
}

/// Every listing case `queries` times for each of `agents` in turn.
async fn time_listings(
    pool: &PgPool,
    agents: &[String],
    queries: usize,
    memories: i64,
) -> anyhow::Result<std::collections::BTreeMap<&'static str, Timing>> {
    let mut out = std::collections::BTreeMap::new();
    for (name, filter, second_page) in list_cases(memories) {
        // Warm-up: the first listing of a filter loads its index pages.
        list_once(pool, &agents[0], &filter, second_page).await?;
        let mut times = Vec::new();
        let mut results = 0;
        for n in 0..queries {
            let (millis, found) = list_once(pool, &agents[n % agents.len()], &filter, second_page).await?;
            times.push(millis);
            results += found;
        }
        times.sort_by(f64::total_cmp);
        out.insert(
            name,
            Timing {
                queries,
                p50_ms: round(sys::quantile(&times, 0.5), 3),
                p99_ms: round(sys::quantile(&times, 0.99), 3),
                mean_results: round(results as f64 / queries as f64, 2),
            },
        );
    }
    Ok(out)
}

/// The background writer: memory numbers from `first` on, over `namespaces`.
struct Writer {
    pool: PgPool,
    prefix: String,
    first: i64,
    namespaces: i64,
    dimensions: usize,
    rate: u32,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

/// Inserts memories at `rate` per second into random namespaces until `stop`.
async fn write_continuously(w: Writer) -> anyhow::Result<()> {
    let Writer {
        pool,
        prefix,
        first,
        namespaces,
        dimensions,
        rate,
        stop,
        written,
    } = w;
    let sql = format!(
        "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance, embedding,
                               version, actor, created_by, created_at, updated_at, log_partition, log_offset)
         SELECT md5('live' || i)::uuid, {ns}, {content}, 'episodic', ARRAY['live'], '{{}}', 0.5, {embedding},
                1, {ns}, md5('live-c' || i)::uuid, now(), now(), 1, i
         FROM (SELECT $1::bigint AS i) x",
        ns = namespace_sql(&prefix, "i", namespaces),
        content = content_sql("i"),
        embedding = embedding_sql("i", dimensions),
    );
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // A pseudo-random memory number, so writes land in every namespace, the heavy one too.
        let n = first + (i - first).wrapping_mul(7919) % 1_000_003;
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(n)
            .execute(&pool)
            .await?;
        written.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    Ok(())
}

async fn run_isolated(config: &Config, args: &Args, iso: &mut Isolation) -> anyhow::Result<Output> {
    let dims = config.memory.embedding_dimensions;
    let text_config = config.memory.text_search_config.clone();
    let prefix = format!("sb-{}-agent-", iso.id);
    let build_seconds = if args.reuse.is_some() {
        0.0
    } else {
        let (url, small) = iso.create_migrated_database("search").await?;
        small.close().await;
        let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
        eprintln!(
            "bench: building {} memories in {} namespaces",
            args.memories, args.namespaces
        );
        let started = Instant::now();
        memos_postgres::pool::ensure_text_search(&pool, &text_config).await?;
        for statement in build_statements(&prefix, args.memories, args.namespaces, dims) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await?;
        }
        // After the load: one index build instead of N insertions into the graph.
        memos_postgres::pool::ensure_vector_index(&pool, dims).await?;
        sqlx::raw_sql("ANALYZE").execute(&pool).await?;
        pool.close().await;
        let build_seconds = started.elapsed().as_secs_f64();
        eprintln!("bench: built in {build_seconds:.1}s");
        build_seconds
    };
    let url = iso.database_url(&format!("memos_bench_{}_search", iso.id))?;
    let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
    let (heavy_agent_memories, memory_shares, namespace_shares): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM memories WHERE namespace = $1),
                (SELECT count(*) FROM memory_shares WHERE memory_id IS NOT NULL),
                (SELECT count(*) FROM memory_shares WHERE memory_id IS NULL)",
    )
    .bind(namespace(&prefix, 0))
    .fetch_one(&pool)
    .await?;

    let settings = SearchSettings::from_config(&config.memory);
    // Ordinary agents spread over the range; agent 1 (which reads the heavy namespace through
    // its share) is not among them, agents with a whole-namespace share are.
    let sampled: Vec<i64> = (0..10)
        .map(|k| 2 + k * (args.namespaces - 3) / 9)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let modes = |n: usize| {
        let text = TEXT_QUERIES[n % TEXT_QUERIES.len()].to_owned();
        let embedding = query_embedding(n, dims);
        [
            SearchMode::Text(text.clone()),
            SearchMode::Vector(embedding.clone()),
            SearchMode::Hybrid {
                query: text,
                embedding,
                weight: 0.5,
            },
        ]
    };

    // Past every memory number written so far (a reused database holds earlier runs' writes).
    let (next_live,): (i64,) = sqlx::query_as("SELECT coalesce(max(log_offset), 0) + 1 FROM memories")
        .fetch_one(&pool)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = (args.write_rate > 0).then(|| {
        let pool = pool.clone();
        tokio::spawn(write_continuously(Writer {
            pool,
            prefix: prefix.clone(),
            first: next_live,
            namespaces: args.namespaces,
            dimensions: dims,
            rate: args.write_rate,
            stop: stop.clone(),
            written: written.clone(),
        }))
    });

    // Warm-up: the first searches of a connection load the catalog and the index pages.
    for (n, mode) in modes(0).iter().enumerate() {
        sample(
            &pool,
            &Reader::agent(namespace(&prefix, sampled[n % sampled.len()])),
            mode,
            &settings,
        )
        .await?;
        sample(&pool, &Reader::agent(namespace(&prefix, 0)), mode, &settings).await?;
    }
    let mut ordinary: [Vec<Sample>; 3] = Default::default();
    let mut heavy: [Vec<Sample>; 3] = Default::default();
    let searches = async {
        for n in 0..args.queries {
            let agent = Reader::agent(namespace(&prefix, sampled[n % sampled.len()]));
            let heavy_agent = Reader::agent(namespace(&prefix, 0));
            for (m, mode) in modes(n + 1).iter().enumerate() {
                ordinary[m].push(sample(&pool, &agent, mode, &settings).await?);
                heavy[m].push(sample(&pool, &heavy_agent, mode, &settings).await?);
            }
        }
        anyhow::Ok(())
    }
    .await;
    let listing = async {
        let ordinary_agents: Vec<String> = sampled.iter().map(|a| namespace(&prefix, *a)).collect();
        let ordinary = time_listings(&pool, &ordinary_agents, args.queries, args.memories).await?;
        let heavy = time_listings(&pool, &[namespace(&prefix, 0)], args.queries, args.memories).await?;
        let worst_p99_ms = ordinary
            .values()
            .chain(heavy.values())
            .map(|t| t.p99_ms)
            .fold(0.0, f64::max);
        anyhow::Ok(Listing {
            ordinary,
            heavy,
            worst_p99_ms,
        })
    };
    let listing = match searches {
        Ok(()) => listing.await,
        Err(e) => Err(e),
    };
    stop.store(true, Ordering::Relaxed);
    if let Some(writer) = writer {
        writer.await??;
    }
    let listing = listing?;
    pool.close().await;
    let [ot, ov, oh] = ordinary;
    let [ht, hv, hh] = heavy;
    Ok(Output {
        bench: "search",
        date: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        run_id: iso.id.clone(),
        memories: args.memories,
        namespaces: args.namespaces,
        heavy_agent_memories,
        memory_shares,
        namespace_shares,
        embedding_dimensions: dims,
        text_search_config: text_config,
        build_seconds: round(build_seconds, 1),
        sampled_ordinary_agents: sampled.len(),
        queries_per_mode: args.queries,
        write_rate: args.write_rate,
        writes_during_searches: written.load(Ordering::Relaxed),
        recall_at_10: Modes {
            text: recall(&ot, &ht),
            vector: recall(&ov, &hv),
            hybrid: recall(&oh, &hh),
        },
        listing,
        ordinary: Modes {
            text: latency(&ot),
            vector: latency(&ov),
            hybrid: latency(&oh),
        },
        heavy: Modes {
            text: latency(&ht),
            vector: latency(&hv),
            hybrid: latency(&hh),
        },
        exact: "queries::exact_search_statement in the same REPEATABLE READ snapshot with \
                enable_indexscan, enable_bitmapscan and enable_indexonlyscan off (a scan of every row)",
        machine: sys::machine(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_statements_name_the_prefix_and_sizes() {
        let statements = build_statements("p-", 2000, 20, 4);
        assert_eq!(statements.len(), 3);
        assert!(statements[0].contains("generate_series(1, 2000)"));
        assert!(statements[0].contains("% (20 - 1)"));
        assert!(statements[2].contains("'p-0', NULL::uuid, 'p-1'"));
    }
}
