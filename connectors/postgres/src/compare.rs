//! Comparing two schemas' copies of the memory views, or of the task views (`memosctl verify`): per table the row
//! count and an order-independent checksum (the sum of a 64-bit hash of every whole row's
//! text), and, when they differ, the keys of the rows that differ. Only the memory
//! projection's rows of `projection_offsets` are compared (other projections share it).
//!
//! Guarantee: two tables compare equal only if they hold the same number of rows and the
//! same multiset of row hashes; any changed column value changes that row's hash, so a
//! single altered, missing or extra row is reported with its key (up to a limit per table).
//! Read-only.

use serde::Serialize;
use sqlx::PgPool;

use crate::bulk::check_schema_name;

/// A table of the memory views and the columns that identify one of its rows.
pub struct Table {
    pub name: &'static str,
    /// SQL expressions over alias `t`, rendered as text to name a differing row.
    pub key: &'static [&'static str],
    /// Which rows belong to the memory projection (SQL over alias `t`).
    pub rows: &'static str,
}

/// Every memory view table, with its key.
pub const MEMORY_TABLES: &[Table] = &[
    Table {
        name: "memories",
        key: &["t.memory_id"],
        rows: "true",
    },
    Table {
        name: "memory_history",
        key: &["t.memory_id", "t.log_partition", "t.log_offset"],
        rows: "true",
    },
    Table {
        name: "memory_commands",
        key: &["t.command_id"],
        rows: "true",
    },
    Table {
        name: "memory_shares",
        key: &["t.namespace", "t.memory_id", "t.grantee"],
        rows: "true",
    },
    Table {
        name: "tools",
        key: &["t.namespace", "t.name"],
        rows: "true",
    },
    Table {
        name: "projection_offsets",
        key: &["t.projection", "t.topic", "t.partition"],
        // Other projections (tasks) keep their offsets in the same table.
        rows: "t.projection = 'memory'",
    },
];

/// Every task view table (the task projection's), with its key. `agent_view_revisions` is
/// left out: it counts the batches that touched each agent, for the Redis copy, and so
/// depends on how the log was cut into batches.
pub const TASK_TABLES: &[Table] = &[
    Table {
        name: "agents",
        key: &["t.agent_id"],
        rows: "true",
    },
    Table {
        name: "tasks",
        key: &["t.task_id"],
        rows: "true",
    },
    Table {
        name: "workflows",
        key: &["t.workflow_id"],
        rows: "true",
    },
    Table {
        name: "workflow_templates",
        key: &["t.name", "t.version"],
        rows: "true",
    },
    Table {
        name: "task_events",
        key: &["t.log_topic", "t.log_partition", "t.log_offset"],
        rows: "true",
    },
    Table {
        name: "projection_offsets",
        key: &["t.projection", "t.topic", "t.partition"],
        rows: "t.projection = 'tasks'",
    },
];

/// The tables of a projection by name (`memory` or `tasks`).
pub fn tables_of(projection: &str) -> Option<&'static [Table]> {
    match projection {
        "memory" => Some(MEMORY_TABLES),
        "tasks" => Some(TASK_TABLES),
        _ => None,
    }
}

/// The projections whose offsets `schema` holds (what a rebuild into it replayed).
pub async fn projections_in(pool: &PgPool, schema: &str) -> Result<Vec<String>, crate::bulk::BulkError> {
    check_schema_name(schema)?;
    let sql = format!("SELECT DISTINCT projection FROM {schema}.projection_offsets ORDER BY 1");
    let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(p,)| p).collect())
}

/// The comparison of one table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableComparison {
    pub table: String,
    pub left_rows: i64,
    pub right_rows: i64,
    pub left_checksum: String,
    pub right_checksum: String,
    pub equal: bool,
    /// Keys of differing rows (`left-only`, `right-only` or `changed`), at most the limit.
    pub differences: Vec<Difference>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    pub key: String,
    pub kind: String,
}

/// Row count and checksum of `schema.table`.
async fn summary(pool: &PgPool, schema: &str, table: &Table) -> Result<(i64, String), sqlx::Error> {
    // md5 of the row's text, first 16 hex digits as a signed 64-bit integer, summed as numeric
    // (no overflow): independent of row order and of physical layout.
    let sql = format!(
        "SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint::numeric), 0)::text
         FROM {schema}.{name} t WHERE {rows}",
        name = table.name,
        rows = table.rows
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await
}

/// Keys of the rows that differ between `left.table` and `right.table`.
async fn differences(
    pool: &PgPool,
    left: &str,
    right: &str,
    table: &Table,
    limit: i64,
) -> Result<Vec<Difference>, sqlx::Error> {
    let key = table
        .key
        .iter()
        .map(|k| format!("coalesce({k}::text, '∅')"))
        .collect::<Vec<_>>()
        .join(" || '/' || ");
    let (name, rows) = (table.name, table.rows);
    let sql = format!(
        "WITH l AS (SELECT {key} AS k, md5(t::text) AS h FROM {left}.{name} t WHERE {rows}),
              r AS (SELECT {key} AS k, md5(t::text) AS h FROM {right}.{name} t WHERE {rows})
         SELECT coalesce(l.k, r.k),
                CASE WHEN r.k IS NULL THEN 'left-only' WHEN l.k IS NULL THEN 'right-only' ELSE 'changed' END
         FROM l FULL OUTER JOIN r ON l.k = r.k
         WHERE l.h IS DISTINCT FROM r.h
         ORDER BY 1 LIMIT $1"
    );
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(key, kind)| Difference { key, kind })
        .collect())
}

/// Compares every memory view table of schema `left` with schema `right`.
pub async fn compare(
    pool: &PgPool,
    left: &str,
    right: &str,
    limit: i64,
) -> Result<Vec<TableComparison>, crate::bulk::BulkError> {
    compare_tables(pool, left, right, limit, MEMORY_TABLES).await
}

/// Compares `tables` of schema `left` with schema `right`.
pub async fn compare_tables(
    pool: &PgPool,
    left: &str,
    right: &str,
    limit: i64,
    tables: &[Table],
) -> Result<Vec<TableComparison>, crate::bulk::BulkError> {
    check_schema_name(left)?;
    check_schema_name(right)?;
    let mut out = Vec::new();
    for table in tables {
        let (left_rows, left_checksum) = summary(pool, left, table).await?;
        let (right_rows, right_checksum) = summary(pool, right, table).await?;
        let equal = left_rows == right_rows && left_checksum == right_checksum;
        let differences = if equal {
            Vec::new()
        } else {
            differences(pool, left, right, table, limit).await?
        };
        out.push(TableComparison {
            table: table.name.to_owned(),
            left_rows,
            right_rows,
            left_checksum,
            right_checksum,
            equal,
            differences,
        });
    }
    Ok(out)
}
