//! Projection offsets: the next offset to apply, per projection, topic and partition.
//!
//! Guarantee: [`lock_and_load`] takes row locks in partition order inside the caller's
//! transaction, so two projector instances that briefly both believe they own a partition
//! (a rebalance in flight) serialize on it, and the second one sees what the first applied.

use std::collections::{BTreeMap, HashMap};

use sqlx::{PgConnection, PgPool};

/// Stored next offsets of `projection` on `topic`; partitions never applied are absent.
pub async fn load(pool: &PgPool, projection: &str, topic: &str) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM projection_offsets WHERE projection = $1 AND topic = $2",
    )
    .bind(projection)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Locks the offset rows of `partitions` (creating them at 0) and returns their next offsets.
pub async fn lock_and_load(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset)
         SELECT $1, $2, p, 0 FROM UNNEST($3::int[]) AS p
         ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .execute(&mut *conn)
    .await?;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM projection_offsets
         WHERE projection = $1 AND topic = $2 AND partition = ANY($3)
         ORDER BY partition FOR UPDATE",
    )
    .bind(projection)
    .bind(topic)
    .bind(partitions)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Moves the next offsets forward (never backward) inside the caller's transaction.
pub async fn advance(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    next: &BTreeMap<i32, i64>,
) -> Result<(), sqlx::Error> {
    let partitions: Vec<i32> = next.keys().copied().collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    sqlx::query(
        "UPDATE projection_offsets o SET next_offset = GREATEST(o.next_offset, u.next_offset)
         FROM UNNEST($3::int[], $4::bigint[]) AS u(partition, next_offset)
         WHERE o.projection = $1 AND o.topic = $2 AND o.partition = u.partition",
    )
    .bind(projection)
    .bind(topic)
    .bind(&partitions)
    .bind(&offsets)
    .execute(conn)
    .await?;
    Ok(())
}
