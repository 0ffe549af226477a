//! `memosctl bench search` at a tiny size against the real PostgreSQL: it builds its
//! database, runs every mode for ordinary agents and the heavy agent while writing, and
//! reports recall 1.0 for the exact plans, positive latencies and a listing figure per
//! filter; with `memory.search.exact_limit` below the heavy agent's size, its vector searches
//! go to the HNSW index and its hybrid searches are fused, with recall measured. Guards the
//! bench from breaking silently; no wall-clock threshold.

use memos_integration_tests::TestEnv;
use memos_integration_tests::process::{memosctl_as, memosctl_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_search_reports_exact_recall_and_latencies() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let stdout = memosctl_ok(
        &env,
        &[
            "bench",
            "search",
            "--memories",
            "2000",
            "--namespaces",
            "20",
            "--queries",
            "4",
            "--write-rate",
            "50",
        ],
    )?;
    let line = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(line)?;
    assert_eq!(report["bench"], "search");
    assert_eq!(report["memories"], 2000);
    assert_eq!(report["namespaces"], 20);
    assert_eq!(report["heavy_agent_memories"], 200, "{report}");
    assert!(report["memory_shares"].as_i64() > Some(0), "{report}");
    assert!(report["namespace_shares"].as_i64() > Some(0), "{report}");
    for mode in ["text", "vector", "hybrid"] {
        let recall = &report["recall_at_10"][mode];
        assert_eq!(recall["min"].as_f64(), Some(1.0), "{mode}: {report}");
        assert_eq!(recall["mean"].as_f64(), Some(1.0), "{mode}: {report}");
        for agents in ["ordinary", "heavy"] {
            let latency = &report[agents][mode];
            assert_eq!(latency["queries"], 4, "{agents} {mode}: {report}");
            assert!(
                latency["p50_ms"].as_f64() > Some(0.0),
                "{agents} {mode}: {report}"
            );
            assert!(
                latency["p99_ms"].as_f64() >= latency["p50_ms"].as_f64(),
                "{agents} {mode}: {report}"
            );
            assert!(
                latency["mean_results"].as_f64() > Some(0.0),
                "{agents} {mode}: {report}"
            );
        }
    }
    // The database was dropped (no --keep).
    let run_id = report["run_id"].as_str().unwrap_or_default();
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(format!("memos_bench_{run_id}_search"))
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(left, 0, "the bench left its database behind");
    let listing = &report["listing"];
    for agents in ["ordinary", "heavy"] {
        for filter in [
            "none",
            "second_page",
            "tier",
            "tags_any",
            "tags_all",
            "metadata",
            "created_range",
            "matching_nothing",
        ] {
            let timing = &listing[agents][filter];
            assert_eq!(timing["queries"], 4, "listing {agents} {filter}: {report}");
            assert!(
                timing["p50_ms"].as_f64() > Some(0.0),
                "listing {agents} {filter}: {report}"
            );
        }
        assert_eq!(
            listing[agents]["none"]["mean_results"].as_f64(),
            Some(50.0),
            "{report}"
        );
        assert_eq!(
            listing[agents]["matching_nothing"]["mean_results"].as_f64(),
            Some(0.0),
            "{report}"
        );
    }
    for mode in ["vector", "hybrid"] {
        assert_eq!(
            report["heavy"][mode]["plans"],
            serde_json::json!({"exact": 4}),
            "{report}"
        );
    }

    // The heavy agent (200 memories) above the exact limit: the approximate plans answer it.
    let stdout = memosctl_as(
        &env,
        &[("MEMOS__MEMORY__SEARCH__EXACT_LIMIT", "150")],
        &[
            "bench",
            "search",
            "--memories",
            "2000",
            "--namespaces",
            "20",
            "--queries",
            "4",
        ],
    )?;
    anyhow::ensure!(stdout.code == 0, "bench search failed: {}", stdout.stderr);
    let report: serde_json::Value = serde_json::from_str(stdout.stdout.lines().last().unwrap_or_default())?;
    let plans = &report["heavy"]["vector"]["plans"];
    let approximate = plans["approximate"].as_u64().unwrap_or(0);
    assert!(approximate >= 1, "the HNSW index answered none: {report}");
    assert_eq!(
        approximate + plans["approximate_then_exact"].as_u64().unwrap_or(0),
        4,
        "{report}"
    );
    assert_eq!(
        report["heavy"]["hybrid"]["plans"],
        serde_json::json!({"fused": 4}),
        "{report}"
    );
    for mode in ["vector", "hybrid"] {
        let recall = report["recall_at_10"][mode]["mean"].as_f64().unwrap_or(0.0);
        assert!(recall >= 0.9, "{mode} recall@10 {recall}: {report}");
    }
    env.cleanup().await;
    Ok(())
}
