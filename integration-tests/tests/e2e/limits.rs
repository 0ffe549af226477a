//! Limits per principal (`http.limits`, `services/api/src/limits.rs`) on the running API: a
//! principal past its burst gets `429 rate_limited` with `Retry-After` while another principal
//! of the same role is still served; a principal with as many requests in flight as its role
//! allows gets `429 too_many_concurrent` until one of them ends; every `429` is counted in
//! `memos_http_limited_total{role, limit}`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use memos_integration_tests::api::Keyed;
use memos_integration_tests::process::issue_key;
use memos_integration_tests::{MemosProcess, TestEnv, eventually, metrics_text};
use reqwest::Method;
use tokio::io::AsyncWriteExt;

/// Longest a change of state may take to be seen.
const WAIT: Duration = Duration::from_secs(30);

async fn limited(base: &str, role: &str, limit: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await?.text().await?;
    metrics_text::sum(
        &text,
        "memos_http_limited_total",
        &[("role", role), ("limit", limit)],
    )
    .ok_or_else(|| anyhow::anyhow!("memos_http_limited_total{{role={role},limit={limit}}} is not exported"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_principal_has_its_own_rate_and_concurrency() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let alice = issue_key(&env, "alice", "agent", &[])?;
    let bob = issue_key(&env, "bob", "agent", &[])?;
    let ingest = issue_key(&env, "ingest", "service", &["--agent", "alice"])?;
    let memos = MemosProcess::start(
        &env,
        "api",
        &[
            ("MEMOS__HTTP__AUTH", "keys"),
            // A burst of 3, then one request per 100 s: the test takes far less than that,
            // so however slow this machine, the fourth request is over the rate.
            ("MEMOS__HTTP__LIMITS__AGENT__REQUESTS_PER_SECOND", "0.01"),
            ("MEMOS__HTTP__LIMITS__AGENT__BURST", "3"),
            ("MEMOS__HTTP__LIMITS__SERVICE__CONCURRENT_REQUESTS", "1"),
            // The request held in flight below sends its body slowly.
            ("MEMOS__HTTP__BODY_READ_TIMEOUT", "120s"),
        ],
    )
    .await?;
    let base = memos.url("");
    assert_eq!(limited(&base, "agent", "rate").await?, 0.0, "exported from zero");

    // Rate: alice's burst, then 429 with the wait; bob, of the same role, is still served.
    let alice = Keyed::new(&base, Some(&alice));
    let list = "/v1/agents/alice/memories";
    for i in 0..3 {
        let answer = alice.call(Method::GET, list, None, &[]).await?;
        assert_eq!(answer.status, 200, "request {i} of the burst: {}", answer.body);
    }
    let mut refused = 0;
    for _ in 0..2 {
        let answer = alice.call(Method::GET, list, None, &[]).await?;
        assert_eq!(answer.status, 429, "past the burst: {}", answer.body);
        assert_eq!(answer.body["code"], "rate_limited");
        let wait: u64 = answer
            .retry_after
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("429 without Retry-After"))?
            .parse()?;
        assert!(
            (1..=100).contains(&wait),
            "Retry-After {wait} s, for one request per 100 s"
        );
        refused += 1;
    }
    let bob = Keyed::new(&base, Some(&bob));
    for _ in 0..3 {
        let answer = bob
            .call(Method::GET, "/v1/agents/bob/memories", None, &[])
            .await?;
        assert_eq!(
            answer.status, 200,
            "bob has an allowance of his own: {}",
            answer.body
        );
    }
    assert_eq!(limited(&base, "agent", "rate").await?, f64::from(refused));

    // Concurrency: a write whose body never finishes holds the service's one slot.
    let addr = base.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(addr).await?;
    slow.write_all(
        format!(
            "POST /v1/memories HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ingest}\r\n\
             content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await?;
    let service = Keyed::new(&base, Some(&ingest));
    let tools = "/v1/tools";
    // Until the server has read the slow request's headers, the service is still served.
    let busy = eventually("the slow write holds the service's slot", WAIT, || async {
        let answer = service.call(Method::GET, tools, None, &[]).await?;
        match answer.status {
            200 => Ok(None),
            429 => Ok(Some(answer)),
            other => anyhow::bail!("{other} {}", answer.body),
        }
    })
    .await?;
    assert_eq!(busy.body["code"], "too_many_concurrent", "{}", busy.body);
    assert_eq!(busy.retry_after.as_deref(), Some("1"));
    drop(slow);
    // The slot comes back when the slow write ends (its connection closed); every 429 seen
    // meanwhile is counted too.
    let refused = AtomicU32::new(1);
    eventually("the slot comes back", WAIT, || async {
        let answer = service.call(Method::GET, tools, None, &[]).await?;
        match answer.status {
            200 => Ok(Some(())),
            429 => {
                refused.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            other => anyhow::bail!("{other} {}", answer.body),
        }
    })
    .await?;
    let refused = refused.into_inner();
    assert_eq!(
        limited(&base, "service", "concurrency").await?,
        f64::from(refused)
    );
    Ok(())
}
