//! `memosctl cache rebuild`: refills the Redis hot views from PostgreSQL: every memory's
//! document (removed for a forgotten one), each namespace's recent working set, and the
//! applied positions used by read-your-writes.
//!
//! Guarantee: every write goes through the same position-guarded scripts the projector uses
//! (a key only moves to a newer log position), so the rebuild is safe while projectors run
//! and can be repeated: it never puts an older state over a newer one. After a Redis flush
//! or loss it restores everything the API serves from Redis. Documents get the configured
//! TTL again.

use anyhow::Context;
use clap::Subcommand;
use futures::TryStreamExt;
use memos_postgres::Memory;
use memos_redis::HotViews;
use memos_redis::hot::{HotWrite, Recent};
use memos_runtime::Config;

/// Memories per Redis round trip.
const BATCH: usize = 1000;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Refill Redis from PostgreSQL (idempotent, safe while projectors run).
    Rebuild,
}

pub async fn run(config: &Config, command: CacheCommand) -> anyhow::Result<()> {
    let CacheCommand::Rebuild = command;
    let pool = memos_postgres::connect(&config.postgres)
        .await
        .context("E_POSTGRES: cannot connect to PostgreSQL")?;
    let hot = HotViews::from_config(&config.redis)
        .await
        .context("E_REDIS: cannot connect to Redis")?;
    let mut rows = sqlx::query_as::<_, Memory>(
        "SELECT memory_id, namespace, content, tier, tags, metadata, importance, expires_at,
                embedding::real[] AS embedding, source, version, actor, created_by, created_at,
                updated_at, forgotten_at, log_partition, log_offset
         FROM memories",
    )
    .fetch(&pool);
    let (mut seen, mut written) = (0usize, 0usize);
    let mut batch: Vec<Memory> = Vec::with_capacity(BATCH);
    loop {
        let next = rows
            .try_next()
            .await
            .context("E_POSTGRES: cannot read the memories")?;
        let done = next.is_none();
        if let Some(memory) = next {
            batch.push(memory);
        }
        if batch.len() >= BATCH || (done && !batch.is_empty()) {
            seen += batch.len();
            written += put(&hot, &batch).await?;
            batch.clear();
        }
        if done {
            break;
        }
    }
    drop(rows);
    let offsets = memos_postgres::offsets::load(
        &pool,
        memos_projector::MEMORY_PROJECTION,
        &config.topics.memory_commands,
    )
    .await
    .context("E_POSTGRES: cannot read the projection offsets")?;
    hot.advance_positions(&config.topics.memory_commands, &offsets.into_iter().collect())
        .await
        .context("E_REDIS: cannot write the applied positions")?;
    println!("cache rebuilt: {seen} memories read, {written} keys written (the others were already current)");
    Ok(())
}

async fn put(hot: &HotViews, memories: &[Memory]) -> anyhow::Result<usize> {
    let ids: Vec<String> = memories.iter().map(|m| m.memory_id.to_string()).collect();
    let writes: Vec<HotWrite<'_>> = memories
        .iter()
        .zip(&ids)
        .map(|(memory, id)| HotWrite {
            key: id,
            position: memory.log_offset,
            doc: memory
                .forgotten_at
                .is_none()
                .then(|| serde_json::to_string(memory).expect("memories serialize")),
            recent: Recent {
                namespace: &memory.namespace,
                score: memory.created_at.timestamp_millis(),
                keep: memory.forgotten_at.is_none() && memory.tier == "working",
            },
        })
        .collect();
    hot.put_memories(&writes)
        .await
        .context("E_REDIS: cannot write the hot views")
}
