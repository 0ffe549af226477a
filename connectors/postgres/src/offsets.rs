//! Projection offsets: the next offset to apply, per projection, topic and partition.
//!
//! Guarantee: [`lock_and_load`] takes row locks in partition order inside the caller's
//! transaction, so two projector instances that briefly both believe they own a partition
//! (a rebalance in flight) serialize on it, and the second one sees what the first applied.
//! It first takes the view-switch lock in shared mode and checks that the connection still
//! points at the active view schema (`memosctl promote` holds that lock exclusively while it
//! switches): a batch never commits into a schema that is no longer active; it fails with
//! [`SCHEMA_SWITCHED`] and the projector retries it on a fresh connection.

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

/// Key of the advisory lock that orders view-schema switches with apply transactions.
pub const VIEW_SWITCH_LOCK: i64 = 0x6d656d6f_73766965; // "memosvie"

/// Message of the error an apply transaction fails with after a switch of the view schema.
pub const SCHEMA_SWITCHED: &str =
    "the active view schema changed (memosctl promote); the batch is retried on the new schema";

/// Inside an apply transaction: waits while a view-schema switch is in progress, then
/// fails if this connection no longer points at the active schema. Connections that were
/// not opened by [`crate::pool::connect`] (no generation recorded) are not checked.
pub async fn check_active_schema(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (managed,): (bool,) =
        sqlx::query_as("SELECT nullif(current_setting('memos.generation', true), '') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !managed {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(VIEW_SWITCH_LOCK)
        .execute(&mut *conn)
        .await?;
    // A statement of its own, so that its snapshot is taken after the lock was granted.
    let row: Option<(bool,)> = sqlx::query_as(
        "SELECT generation::text = current_setting('memos.generation', true) FROM memos_control.active_view",
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some((false,)) => Err(sqlx::Error::Protocol(SCHEMA_SWITCHED.into())),
        _ => Ok(()),
    }
}

/// Locks the offset rows of `partitions` (creating them at 0) and returns their next offsets.
/// Checks first that the connection writes into the active view schema
/// ([`check_active_schema`]).
pub async fn lock_and_load(
    conn: &mut PgConnection,
    projection: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, i64>, sqlx::Error> {
    check_active_schema(conn).await?;
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
