//! Redis is derived: a write older than what a key already reflects never lands, so retries,
//! replays and racing projectors cannot move the hot views backward.

use std::collections::BTreeMap;
use std::time::Duration;

use memos_redis::HotViews;
use memos_redis::hot::{HotWrite, Recent};

fn doc(version: u32) -> Option<String> {
    Some(format!("{{\"version\":{version}}}"))
}

#[tokio::test]
async fn replays_never_move_hot_views_backward() -> anyhow::Result<()> {
    let env = memos_integration_tests::TestEnv::new().await?;
    let hot = HotViews::connect(&env.redis_url, &env.redis_prefix, Duration::from_secs(60)).await?;
    let write = |position: i64, doc: Option<String>, keep: bool| HotWrite {
        key: "m1",
        position,
        doc,
        recent: Recent {
            namespace: "agent-h",
            score: 1_000,
            keep,
        },
    };
    assert_eq!(hot.put_memories(&[write(10, doc(2), true)]).await?, 1);
    // A replay of an older record, then the same record again: both refused.
    assert_eq!(
        hot.put_memories(&[write(5, doc(1), true), write(10, doc(2), true)])
            .await?,
        0
    );
    assert_eq!(hot.get_memory("m1").await?, doc(2));
    assert_eq!(hot.recent("agent-h", 10).await?, vec!["m1".to_owned()]);
    // A newer forget removes the document and the recent entry; an older write cannot revive it.
    assert_eq!(hot.put_memories(&[write(11, None, false)]).await?, 1);
    assert_eq!(hot.put_memories(&[write(10, doc(2), true)]).await?, 0);
    assert_eq!(hot.get_memory("m1").await?, None);
    assert_eq!(hot.memory_position("m1").await?, Some(11));
    assert!(hot.recent("agent-h", 10).await?.is_empty());

    // Positions only move forward.
    hot.advance_positions("t", &BTreeMap::from([(0, 100)])).await?;
    hot.advance_positions("t", &BTreeMap::from([(0, 40)])).await?;
    assert_eq!(hot.position("t", 0).await?, Some(100));
    env.cleanup().await;
    Ok(())
}
