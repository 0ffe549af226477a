//! Plans of every memory query, on the real PostgreSQL of the stack, in a database of its own:
//! a `memories` table large enough for the planner to prefer indexes (30,000 memories in
//! 1,000 namespaces, with embeddings, history rows, forgotten memories and shares, built by
//! one `INSERT ... SELECT generate_series` each and analyzed: `search_fixture`), then `EXPLAIN (FORMAT JSON)`
//! of every statement exactly as `memos_postgres::queries` builds and binds it (get, may-read,
//! list with each filter, list and get as of an instant, text, vector and hybrid search), as
//! a custom plan (the first executions of a prepared statement) and as a generic plan (what
//! PostgreSQL may switch to later). Each plan must search the intended index by a condition (not walk it whole) and must not scan
//! `memories` sequentially. A test of plans, not of time: no clock is involved.
//!
//! Also full-text stemming: with `english`, "preferences" finds a memory saying
//! "preference"; with `simple` it does not, and a process refuses a configuration other than
//! the one the column was built with.

use chrono::{DateTime, TimeZone, Utc};
use memos_integration_tests::{TestEnv, search_fixture};
use memos_postgres::pool;
use memos_postgres::queries::{
    self, Cursor, ListFilter, Reader, Returning, SearchMode, SearchPlan, SearchSettings, Statement,
};
use serde_json::{Value, json};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

const DIMENSIONS: usize = 16;
const MEMORIES: i64 = 30_000;
const NAMESPACES: i64 = 1_000;

/// A plan node that reads a relation: node type, relation, index.
#[derive(Debug)]
struct Scan {
    node: String,
    relation: Option<String>,
    index: Option<String>,
    /// Whether the index is searched by a condition (not walked whole, in its order).
    condition: bool,
    /// Whether the index produces the rows in the order of an `ORDER BY` (k-NN of HNSW).
    ordered: bool,
}

fn scans(plan: &Value, out: &mut Vec<Scan>) {
    let text = |key: &str| plan.get(key).and_then(Value::as_str).map(str::to_owned);
    out.push(Scan {
        node: text("Node Type").unwrap_or_default(),
        relation: text("Relation Name"),
        index: text("Index Name"),
        condition: plan.get("Index Cond").is_some(),
        ordered: plan.get("Order By").is_some(),
    });
    for child in plan.get("Plans").and_then(Value::as_array).into_iter().flatten() {
        scans(child, out);
    }
}

/// Which indexes of `memories` and `memory_history` a plan would read.
struct Plan {
    scans: Vec<Scan>,
    text: String,
}

impl Plan {
    /// The indexes the plan searches by a condition, or by the distance of an `ORDER BY`.
    fn indexes(&self) -> Vec<&str> {
        self.scans
            .iter()
            .filter(|s| s.condition || s.ordered)
            .filter_map(|s| s.index.as_deref())
            .collect()
    }

    fn sequential(&self, relation: &str) -> bool {
        self.scans
            .iter()
            .any(|s| s.node == "Seq Scan" && s.relation.as_deref() == Some(relation))
    }
}

async fn explain(pool: &PgPool, generic: bool, statement: Statement) -> anyhow::Result<Plan> {
    explain_after(pool, generic, None, statement).await
}

/// [`explain`] in a transaction that first runs `settings` (the session settings a statement
/// runs with, e.g. `queries::approximate_settings_statement`).
async fn explain_after(
    pool: &PgPool,
    generic: bool,
    settings: Option<Statement>,
    statement: Statement,
) -> anyhow::Result<Plan> {
    // One connection, so that the plan cache mode applies to the statement explained.
    let mut conn = pool.begin().await?;
    let mode = if generic { "force_generic_plan" } else { "auto" };
    conn.execute(sqlx::AssertSqlSafe(format!("SET LOCAL plan_cache_mode = {mode}")))
        .await?;
    if let Some(settings) = settings {
        settings.execute(&mut *conn).await?;
    }
    let (json,): (Value,) = statement
        .prefixed("EXPLAIN (FORMAT JSON) ")
        .fetch_one(&mut *conn)
        .await?;
    conn.rollback().await?;
    let mut found = Vec::new();
    scans(&json[0]["Plan"], &mut found);
    Ok(Plan {
        scans: found,
        text: serde_json::to_string_pretty(&json)?,
    })
}

fn settings(dimensions: usize, text_search_config: &str) -> SearchSettings {
    let mut memory = memos_runtime::Config::default().memory;
    memory.embedding_dimensions = dimensions;
    memory.text_search_config = text_search_config.into();
    SearchSettings::from_config(&memory)
}

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, day, 0, 0, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_shape_uses_an_index() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.pool.clone();
    search_fixture::build(&pool, "plan-agent-", MEMORIES, NAMESPACES, DIMENSIONS, "english").await?;

    let agent = Reader::agent("plan-agent-7");
    let team = Reader::with_namespaces("plan-agent-9", ["plan-agent-500".to_owned()]);
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    let (id,): (Uuid,) = sqlx::query_as("SELECT md5('m77')::uuid").fetch_one(&pool).await?;
    let embedding: Vec<f32> = (1..=DIMENSIONS)
        .map(|j| (0.37 * 77.0 + j as f32 * 1.3).sin())
        .collect();
    let settings = settings(DIMENSIONS, "english");
    let filters: Vec<(&str, ListFilter)> = vec![
        ("none", ListFilter::default()),
        (
            "tier",
            ListFilter {
                tier: Some("episodic".into()),
                ..Default::default()
            },
        ),
        (
            "tags_any",
            ListFilter {
                tags_any: Some(vec!["t3".into(), "t4".into()]),
                ..Default::default()
            },
        ),
        (
            "tags_all",
            ListFilter {
                tags_all: Some(vec!["t3".into(), "g1".into()]),
                ..Default::default()
            },
        ),
        (
            "metadata",
            ListFilter {
                metadata: Some(json!({"k": 3})),
                ..Default::default()
            },
        ),
        (
            "created",
            ListFilter {
                created_after: Some(at(3)),
                created_before: Some(at(20)),
                ..Default::default()
            },
        ),
        (
            "updated",
            ListFilter {
                updated_after: Some(at(3)),
                updated_before: Some(at(20)),
                include_expired: true,
                ..Default::default()
            },
        ),
    ];
    let cursor = Cursor {
        created_at: at(10),
        memory_id: id,
    };

    let mut failures = Vec::new();
    for generic in [false, true] {
        // (what, statement, an index the plan must read, relations it must not scan)
        let mut shapes: Vec<(String, Statement, &str, &[&str])> = vec![
            (
                "get".into(),
                queries::memory_statement(Some(&agent), id),
                "memories_pkey",
                &["memories"],
            ),
            (
                "get unrestricted".into(),
                queries::memory_statement(None, id),
                "memories_pkey",
                &["memories"],
            ),
            (
                "may_read".into(),
                queries::may_read_statement(&agent, "plan-agent-8", id),
                "memory_shares_grantee",
                &["memories"],
            ),
            (
                "get as of".into(),
                queries::memory_as_of_statement(Some(&agent), id, at(5)),
                "memory_history_pkey",
                &["memories", "memory_history"],
            ),
        ];
        for (name, filter) in &filters {
            for (who, reader) in [
                ("agent", Some(&agent)),
                ("team", Some(&team)),
                ("unrestricted", None),
            ] {
                shapes.push((
                    format!("list {who} filter {name}"),
                    queries::list_statement(reader, "plan-agent-7", filter, now, None, 20, None),
                    "memories_by_namespace",
                    &["memories"],
                ));
            }
            shapes.push((
                format!("list as of, filter {name}"),
                queries::list_statement(Some(&agent), "plan-agent-7", filter, at(5), None, 20, Some(at(5))),
                "memories_by_namespace",
                &["memories", "memory_history"],
            ));
        }
        shapes.push((
            "list after a cursor".into(),
            queries::list_statement(
                Some(&agent),
                "plan-agent-7",
                &ListFilter::default(),
                now,
                Some(cursor),
                20,
                None,
            ),
            "memories_by_namespace",
            &["memories"],
        ));
        for (who, reader) in [("agent", &agent), ("team", &team)] {
            for (mode_name, mode) in [
                ("text", SearchMode::Text("preference".into())),
                ("vector", SearchMode::Vector(embedding.clone())),
                (
                    "hybrid",
                    SearchMode::Hybrid {
                        query: "preference".into(),
                        embedding: embedding.clone(),
                        weight: 0.5,
                    },
                ),
            ] {
                shapes.push((
                    format!("search {mode_name} as {who}"),
                    queries::exact_search_statement(reader, &mode, &settings, now, 10),
                    "memories_by_namespace",
                    &["memories"],
                ));
            }
            // The plans of a reader above memory.search.exact_limit.
            shapes.push((
                format!("count visible as {who}"),
                queries::visible_count_statement(reader, 5_001),
                "memories_by_namespace",
                &["memories"],
            ));
            for returning in [Returning::Memories, Returning::Ids] {
                shapes.push((
                    format!("search vector approximate ({returning:?}) as {who}"),
                    queries::approximate_vector_statement(reader, &embedding, &settings, now, 10, returning),
                    "memories_embedding_hnsw_16",
                    &["memories"],
                ));
            }
            shapes.push((
                format!("search text candidates as {who}"),
                queries::text_search_statement(reader, "preference", &settings, now, 100, Returning::Ids),
                "memories_by_namespace",
                &["memories"],
            ));
            shapes.push((
                format!("search hybrid fused as {who}"),
                queries::hybrid_statement(
                    reader,
                    ("preference", &embedding, 0.5),
                    Some(&[id]),
                    &settings,
                    now,
                    10,
                ),
                "memories_pkey",
                &["memories"],
            ));
        }
        if !generic {
            // "preference" is in every memory: reading it from the full-text index means
            // reading an entry per memory of the table, which is what a search must not
            // grow with. A custom plan knows the word (the configuration is a literal, so
            // the query is a constant) and takes the reader's namespaces instead.
            for (who, reader) in [("agent", &agent), ("team", &team)] {
                let mode = SearchMode::Text("preference".into());
                let plan = explain(
                    &pool,
                    false,
                    queries::exact_search_statement(reader, &mode, &settings, now, 10),
                )
                .await?;
                if plan.indexes().contains(&"memories_fulltext") {
                    failures.push(format!(
                        "search text for a word of every memory as {who}: reads memories_fulltext\n{}",
                        plan.text
                    ));
                }
            }
        }
        for (what, statement, index, no_seq) in shapes {
            // The HNSW statement runs after its session settings, in one transaction.
            let session = what
                .contains("approximate")
                .then(|| queries::approximate_settings_statement(&settings));
            let what = format!("{what} ({} plan)", if generic { "generic" } else { "custom" });
            let plan = explain_after(&pool, generic, session, statement).await?;
            let indexes = plan.indexes();
            if !indexes.contains(&index) {
                failures.push(format!(
                    "{what}: does not search {index} (searches {indexes:?})\n{}",
                    plan.text
                ));
            }
            for relation in no_seq {
                if plan.sequential(relation) {
                    failures.push(format!("{what}: sequential scan of {relation}\n{}", plan.text));
                }
            }
        }
    }
    env.cleanup().await;
    assert!(
        failures.is_empty(),
        "{} plans are wrong:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    Ok(())
}

/// Query embedding `n`, of the fixture's shape at a position between its memories.
fn query_embedding(n: usize) -> Vec<f32> {
    let x = 1000.5 + n as f64 * 2_345.6;
    (1..=DIMENSIONS)
        .map(|j| (x * (j as f64).sqrt() + j as f64 * 1.3).sin() as f32)
        .collect()
}

fn ids(found: &[queries::Scored]) -> Vec<Uuid> {
    found.iter().map(|s| s.memory.memory_id).collect()
}

/// A reader above `memory.search.exact_limit` is answered from the HNSW index (vector) and
/// by fusing two candidate lists (hybrid): only memories it may read, nearest first, and what
/// exact search finds; when the index scan gives up before `limit` visible memories, the
/// exact plan answers; a reader under the limit gets the exact plans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_readers_are_answered_from_the_vector_index_as_exact_search_would() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.pool.clone();
    search_fixture::build(&pool, "knn-agent-", MEMORIES, NAMESPACES, DIMENSIONS, "english").await?;
    let mut conn = pool.acquire().await?;
    let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
    // A team reader of 100 namespaces: about 3,000 memories, a tenth of the table.
    let team = Reader::with_namespaces("knn-agent-0", (1..100).map(|n| format!("knn-agent-{n}")));
    let single = Reader::agent("knn-agent-500");
    let mut large = settings(DIMENSIONS, "english");
    large.tuning.exact_limit = 100;

    let mut found_of_exact = (0, 0);
    for n in 0..5 {
        let embedding = query_embedding(n);
        let vector = SearchMode::Vector(embedding.clone());
        let (found, plan) = queries::search_planned(&mut conn, &team, &vector, &large, now, 10).await?;
        assert_eq!(
            plan,
            SearchPlan::Approximate,
            "a reader of 3,000 memories above a limit of 100"
        );
        assert_eq!(found.len(), 10);
        for s in &found {
            assert!(
                team.reads_namespace(&s.memory.namespace),
                "{} is not visible",
                s.memory.namespace
            );
            assert!(s.memory.forgotten_at.is_none());
        }
        assert!(
            found.windows(2).all(|w| w[0].score >= w[1].score),
            "nearest first: {:?}",
            found.iter().map(|s| s.score).collect::<Vec<_>>()
        );
        let exact = queries::exact_search_statement(&team, &vector, &large, now, 10)
            .fetch_all::<queries::Scored, _>(&mut *conn)
            .await?;
        let approximate = ids(&found);
        found_of_exact.0 += ids(&exact).iter().filter(|id| approximate.contains(id)).count();
        found_of_exact.1 += exact.len();

        let hybrid = SearchMode::Hybrid {
            query: "preference".into(),
            embedding,
            weight: 0.7,
        };
        let (fused, plan) = queries::search_planned(&mut conn, &team, &hybrid, &large, now, 10).await?;
        assert_eq!(plan, SearchPlan::Fused);
        let exact = queries::exact_search_statement(&team, &hybrid, &large, now, 10)
            .fetch_all::<queries::Scored, _>(&mut *conn)
            .await?;
        assert_eq!(
            ids(&fused),
            ids(&exact),
            "fused hybrid finds the exact top 10, in order"
        );
    }
    // HNSW is approximate: recall@10 against exact search over five queries.
    assert!(
        found_of_exact.0 * 100 >= found_of_exact.1 * 95,
        "recall@10 {} of {}",
        found_of_exact.0,
        found_of_exact.1
    );

    // A reader of 30 memories (0.1% of the table) above the limit: the first entries of the
    // index hold none of its memories, and a scan budget of one entry gives up at once.
    let mut budget = large.clone();
    budget.tuning.max_scan_tuples = 1;
    budget.tuning.exact_limit = 10;
    let vector = SearchMode::Vector(query_embedding(7));
    let (found, plan) = queries::search_planned(&mut conn, &single, &vector, &budget, now, 10).await?;
    assert_eq!(plan, SearchPlan::ApproximateThenExact);
    let exact = queries::exact_search_statement(&single, &vector, &budget, now, 10)
        .fetch_all::<queries::Scored, _>(&mut *conn)
        .await?;
    assert_eq!(ids(&found), ids(&exact));
    assert_eq!(found.len(), 10);

    // Under the limit (the default 5,000): exact, as before.
    let defaults = settings(DIMENSIONS, "english");
    let (found, plan) = queries::search_planned(&mut conn, &team, &vector, &defaults, now, 10).await?;
    assert_eq!(plan, SearchPlan::Exact);
    let exact = queries::exact_search_statement(&team, &vector, &defaults, now, 10)
        .fetch_all::<queries::Scored, _>(&mut *conn)
        .await?;
    assert_eq!(ids(&found), ids(&exact));
    drop(conn);
    env.cleanup().await;
    Ok(())
}

/// The memories a text search as `agent` finds.
async fn found(pool: &PgPool, agent: &str, query: &str, config: &str) -> anyhow::Result<Vec<String>> {
    let settings = settings(DIMENSIONS, config);
    let results = queries::search(
        &mut *pool.acquire().await?,
        &Reader::agent(agent),
        &SearchMode::Text(query.into()),
        &settings,
        Utc::now(),
        10,
    )
    .await?;
    Ok(results.into_iter().map(|s| s.memory.content).collect())
}

async fn write_one(pool: &PgPool, namespace: &str, content: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO memories (memory_id, namespace, content, tier, importance, version, actor, created_by,
                               created_at, updated_at, log_partition, log_offset)
         VALUES ($1, $2, $3, 'semantic', 0.5, 1, $2, $1, now(), now(), 0, 0)",
    )
    .bind(Uuid::new_v4())
    .bind(namespace)
    .bind(content)
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn english_stems_and_simple_does_not() -> anyhow::Result<()> {
    let stemmed = TestEnv::new().await?;
    memos_postgres::migrate(&stemmed.pool).await?;
    pool::ensure_text_search(&stemmed.pool, "english").await?;
    write_one(&stemmed.pool, "stem-agent", "The user's preference is tea").await?;
    let english = found(&stemmed.pool, "stem-agent", "preferences", "english").await?;

    // A non-empty table built with `english` refuses `simple`, until it is rebuilt.
    let refused = pool::ensure_text_search(&stemmed.pool, "simple").await;
    let refusal = refused
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        matches!(refused, Err(pool::TextSearchError::Mismatch { .. }))
            && refusal.contains("memosctl text-search apply"),
        "a mismatch is refused with the way out: {refusal:?}"
    );
    assert!(
        pool::apply_text_search(&stemmed.pool, "simple").await?,
        "the column is rebuilt"
    );
    pool::ensure_text_search(&stemmed.pool, "simple").await?;
    let simple = found(&stemmed.pool, "stem-agent", "preferences", "simple").await?;
    let simple_exact = found(&stemmed.pool, "stem-agent", "preference", "simple").await?;
    let unknown = pool::ensure_text_search(&stemmed.pool, "klingon").await;
    stemmed.cleanup().await;

    assert_eq!(
        english,
        vec!["The user's preference is tea"],
        "english stems plurals"
    );
    assert!(simple.is_empty(), "simple matches words as written: {simple:?}");
    assert_eq!(simple_exact.len(), 1, "simple finds the word as written");
    assert!(
        matches!(unknown, Err(pool::TextSearchError::Unknown(_))),
        "an unknown configuration is refused: {unknown:?}"
    );
    Ok(())
}

/// The ids of a namespace's memories matching `condition` (SQL over `m`), listing order: the
/// answer of a plain scan, to compare listings with.
async fn listed_by_scan(pool: &PgPool, namespace: &str, condition: &str) -> anyhow::Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT m.memory_id FROM memories m
         WHERE m.namespace = $1 AND m.forgotten_at IS NULL AND {condition}
         ORDER BY m.created_at DESC, m.memory_id DESC"
    )))
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Every page of a listing, following its cursors.
async fn listed_by_pages(
    pool: &PgPool,
    reader: &Reader,
    namespace: &str,
    filter: &ListFilter,
    limit: i64,
) -> anyhow::Result<Vec<Uuid>> {
    let (mut all, mut after) = (Vec::new(), None);
    loop {
        let page = queries::list(
            pool,
            Some(reader),
            namespace,
            filter,
            Utc::now(),
            after,
            limit,
            None,
        )
        .await?;
        all.extend(page.iter().map(|m| m.memory_id));
        match page.last() {
            Some(last) if page.len() as i64 == limit => {
                after = Some(Cursor {
                    created_at: last.created_at,
                    memory_id: last.memory_id,
                })
            }
            _ => return Ok(all),
        }
    }
}

/// A namespace larger than a listing's walk ([`queries::LIST_WALK`]), with memories only a
/// filter index finds in time: three tagged `rare`, older than all the others, so the walk
/// in listing order meets none of them. Every listing, page by page, must be what a plain
/// scan finds, whether the walk fills its pages (no filter, a tier) or the filter indexes
/// answer (a rare tag, metadata, a tag absent from the namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_of_a_large_namespace_find_what_a_scan_finds() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let pool = env.pool.clone();
    // Four namespaces of 1,500: namespace 0 holds the memories i ≡ 0 (mod 4), so tags t0, t4,
    // t8, t12, t16 and metadata k of 0, 2, 4, 6, 8 only.
    search_fixture::build(&pool, "walk-", 6_000, 4, DIMENSIONS, "english").await?;
    sqlx::query(
        "INSERT INTO memories (memory_id, namespace, content, tier, tags, metadata, importance, version,
                               actor, created_by, created_at, updated_at, log_partition, log_offset)
         SELECT md5('rare' || r)::uuid, 'walk-0', 'rare ' || r, 'semantic', ARRAY['rare'],
                jsonb_build_object('k', 'rare'), 0.5, 1, 'walk-0', md5('rare' || r)::uuid,
                timestamptz '2025-12-01' + r * interval '1 hour', now(), 0, 0
         FROM generate_series(1, 3) r",
    )
    .execute(&pool)
    .await?;
    sqlx::raw_sql("ANALYZE memories").execute(&pool).await?;
    let large = listed_by_scan(&pool, "walk-0", "true").await?.len() as i64;
    assert!(
        large > queries::LIST_WALK,
        "the namespace ({large}) must be larger than the walk"
    );
    let reader = Reader::agent("walk-0");
    let tags = |t: &[&str]| Some(t.iter().map(|t| (*t).to_owned()).collect::<Vec<_>>());
    let cases: Vec<(&str, ListFilter, &str)> = vec![
        ("none", ListFilter::default(), "true"),
        (
            "tier",
            ListFilter {
                tier: Some("episodic".into()),
                ..Default::default()
            },
            "m.tier = 'episodic'",
        ),
        (
            "a rare tag",
            ListFilter {
                tags_any: tags(&["rare", "t1"]),
                ..Default::default()
            },
            "m.tags && ARRAY['rare', 't1']",
        ),
        (
            "rare metadata",
            ListFilter {
                metadata: Some(json!({"k": "rare"})),
                ..Default::default()
            },
            "m.metadata @> '{\"k\": \"rare\"}'",
        ),
        (
            "a tag absent from the namespace",
            ListFilter {
                tags_all: tags(&["t3"]),
                ..Default::default()
            },
            "m.tags @> ARRAY['t3']",
        ),
        (
            "a rare tag and a created range",
            ListFilter {
                tags_any: tags(&["rare"]),
                created_before: Some(Utc.with_ymd_and_hms(2025, 12, 1, 2, 30, 0).unwrap()),
                ..Default::default()
            },
            "m.tags && ARRAY['rare'] AND m.created_at < '2025-12-01 02:30:00+00'",
        ),
    ];
    for (name, filter, condition) in &cases {
        let expected = listed_by_scan(&pool, "walk-0", condition).await?;
        for limit in [2, 50, 200] {
            let listed = listed_by_pages(&pool, &reader, "walk-0", filter, limit).await?;
            assert_eq!(
                listed.len(),
                expected.len(),
                "listing by {name}, pages of {limit}: as many as the scan finds"
            );
            assert_eq!(listed, expected, "listing by {name}, pages of {limit}");
        }
    }
    env.cleanup().await;
    Ok(())
}
