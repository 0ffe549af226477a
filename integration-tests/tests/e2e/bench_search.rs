//! `memosctl bench search` at a tiny size against the real PostgreSQL: it builds its
//! database, runs every mode for ordinary agents and the heavy agent while writing, and
//! reports recall 1.0 for today's exact searches and positive latencies. Guards the bench
//! from breaking silently; no wall-clock threshold.

use memos_integration_tests::TestEnv;
use memos_integration_tests::process::memosctl_ok;

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
    env.cleanup().await;
    Ok(())
}
