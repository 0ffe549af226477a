//! The bulk path of a rebuild: a fresh schema migrated like the live one, its indexes and
//! keys dropped while rows are loaded with `COPY` and built once afterwards, and the `COPY`
//! text encoding of every view row.
//!
//! Guarantee: a row encoded here is stored exactly as the live projector's set-based
//! statements store the same row (same columns, same values: times in RFC 3339 with their
//! full precision, floats in their shortest round-trip form, JSON as `jsonb` normalizes
//! it), so a rebuilt schema compares equal, row for row, with the live one. The schema gets
//! every migration (including other projections' tables) and its own `_sqlx_migrations`
//! table, so the migrations of a later release apply to it as they do to the live schema.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::memories::{CommandRow, HistoryRow, Memory, ShareRow, ToolRow};

/// Every migration of the views, the same set `memos migrate` applies.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The memory projection's tables, in load order.
pub const MEMORY_TABLES: &[&str] = &[
    "memories",
    "memory_history",
    "memory_commands",
    "memory_shares",
    "tools",
    "projection_offsets",
];

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error(
        "E_SCHEMA_NAME: {0:?} is not a valid schema name (lower-case letters, digits and _, starting with a letter, at most 63 characters)"
    )]
    SchemaName(String),
    #[error("E_SCHEMA_EXISTS: schema {0} already exists; choose another name or pass --replace")]
    SchemaExists(String),
    #[error("E_SCHEMA_LIVE: schema {0} is the live schema; it cannot be rebuilt in place")]
    SchemaLive(String),
    #[error("E_POSTGRES: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("E_MIGRATE: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("E_TEXT_SEARCH: {0}")]
    TextSearch(#[from] crate::pool::TextSearchError),
}

/// Checks that `name` is a plain identifier, so it can be written into SQL unquoted.
pub fn check_schema_name(name: &str) -> Result<(), BulkError> {
    let mut chars = name.chars();
    let valid = name.len() <= 63
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_");
    if valid {
        Ok(())
    } else {
        Err(BulkError::SchemaName(name.to_owned()))
    }
}

/// The schema the pool's connections resolve unqualified names to (the live views).
pub async fn current_schema(pool: &PgPool) -> Result<String, sqlx::Error> {
    let (schema,): (String,) = sqlx::query_as("SELECT current_schema()").fetch_one(pool).await?;
    Ok(schema)
}

pub async fn schema_exists(pool: &PgPool, schema: &str) -> Result<bool, sqlx::Error> {
    let (exists,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(pool)
        .await?;
    Ok(exists)
}

/// Creates `schema` (dropping it first when `replace`) and applies every migration inside it,
/// its full-text column generated with `text_search_config`
/// ([`crate::pool::ensure_text_search_on`]). The migrations run on a connection of their own
/// whose `search_path` is `schema, public` (`public` holds the `vector` extension); the
/// connection is closed afterwards.
pub async fn create_schema(
    pool: &PgPool,
    url: &str,
    schema: &str,
    replace: bool,
    text_search_config: &str,
) -> Result<(), BulkError> {
    check_schema_name(schema)?;
    // The live schema first: it then names itself in memos_control.active_view, so that the
    // migrations run inside the new schema below cannot make that one active.
    crate::pool::migrate(pool).await?;
    let (plain,): (bool,) = sqlx::query_as("SELECT quote_ident($1) = $1")
        .bind(schema)
        .fetch_one(pool)
        .await?;
    if !plain {
        return Err(BulkError::SchemaName(schema.to_owned()));
    }
    if current_schema(pool).await? == schema {
        return Err(BulkError::SchemaLive(schema.to_owned()));
    }
    if schema_exists(pool, schema).await? {
        if !replace {
            return Err(BulkError::SchemaExists(schema.to_owned()));
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(pool)
            .await?;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(pool)
        .await?;
    let mut conn = PgConnection::connect(url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET search_path TO {schema}, public"
    )))
    .execute(&mut conn)
    .await?;
    MIGRATOR.run(&mut conn).await?;
    crate::pool::ensure_text_search_on(&mut conn, text_search_config).await?;
    conn.close().await?;
    Ok(())
}

/// An index or key of a table, as dropped before a bulk load and created again after it.
#[derive(Debug, Clone)]
pub struct IndexDef {
    pub table: String,
    pub name: String,
    /// A primary key or unique constraint (created with `ALTER TABLE`, which locks the table
    /// exclusively), not a plain index.
    pub constraint: bool,
    drop: String,
    create: String,
}

impl IndexDef {
    /// The statement that creates it again.
    pub fn create_statement(&self) -> &str {
        &self.create
    }
}

/// A row of the index catalogue query: table, index, index definition, and the key
/// constraint's name and definition when the index backs one.
type IndexRow = (String, String, String, Option<String>, Option<String>);

/// Drops every index and primary or unique key of `tables` in `schema`, returning how to
/// create them again.
pub async fn drop_indexes(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[&str],
) -> Result<Vec<IndexDef>, sqlx::Error> {
    let rows: Vec<IndexRow> = sqlx::query_as(
        "SELECT t.relname::text, ic.relname::text, pg_get_indexdef(i.indexrelid),
                c.conname::text, pg_get_constraintdef(c.oid)
         FROM pg_index i
         JOIN pg_class t ON t.oid = i.indrelid
         JOIN pg_class ic ON ic.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype IN ('p', 'u')
         WHERE n.nspname = $1 AND t.relname = ANY($2)
         ORDER BY t.relname, ic.relname",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?;
    let mut defs = Vec::new();
    for (table, index, index_def, constraint, constraint_def) in rows {
        let def = match (constraint, constraint_def) {
            (Some(name), Some(def)) => IndexDef {
                drop: format!("ALTER TABLE {schema}.{table} DROP CONSTRAINT {name}"),
                create: format!("ALTER TABLE {schema}.{table} ADD CONSTRAINT {name} {def}"),
                table,
                name,
                constraint: true,
            },
            _ => IndexDef {
                drop: format!("DROP INDEX {schema}.{index}"),
                create: index_def,
                table,
                name: index,
                constraint: false,
            },
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(def.drop.clone()))
            .execute(&mut *conn)
            .await?;
        defs.push(def);
    }
    Ok(defs)
}

/// Creates indexes dropped by [`drop_indexes`].
pub async fn create_indexes(conn: &mut PgConnection, defs: &[IndexDef]) -> Result<(), sqlx::Error> {
    for def in defs {
        sqlx::raw_sql(sqlx::AssertSqlSafe(def.create.clone()))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The `COPY` statements of the memory tables in `schema`, text format, with the column
/// order the `*_line` encoders write (generated columns are computed by PostgreSQL).
pub fn copy_memories(schema: &str) -> String {
    format!(
        "COPY {schema}.memories (memory_id, namespace, content, tier, tags, metadata, importance, expires_at, \
         embedding, source, version, actor, created_by, created_at, updated_at, forgotten_at, log_partition, \
         log_offset) FROM STDIN"
    )
}

pub fn copy_history(schema: &str) -> String {
    format!(
        "COPY {schema}.memory_history (memory_id, command_id, version, operation, actor, status, reason, change, \
         state, log_partition, log_offset, record_time, trace_id, valid_from, valid_to) FROM STDIN"
    )
}

pub fn copy_commands(schema: &str) -> String {
    format!(
        "COPY {schema}.memory_commands (command_id, kind, namespace, memory_id, actor, status, reason, \
         traceparent, log_topic, log_partition, log_offset, record_time) FROM STDIN"
    )
}

pub fn copy_shares(schema: &str) -> String {
    format!(
        "COPY {schema}.memory_shares (namespace, memory_id, grantee, granted_by, command_id, granted_at) FROM STDIN"
    )
}

pub fn copy_tools(schema: &str) -> String {
    format!(
        "COPY {schema}.tools (namespace, name, description, usage, tags, version, registered_by, command_id, \
         updated_at) FROM STDIN"
    )
}

/// Appends `text` escaped for `COPY ... FROM STDIN` text format.
fn escaped(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let replacement = match b {
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            _ => continue,
        };
        // The special characters are ASCII, so `start..i` lies on character boundaries.
        out.push_str(&text[start..i]);
        out.push_str(replacement);
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// One line of `COPY` text: fields separated by tabs, `\N` for NULL.
struct Line<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Line<'a> {
    fn new(out: &'a mut String) -> Self {
        Line { out, first: true }
    }

    fn sep(&mut self) {
        if !self.first {
            self.out.push('\t');
        }
        self.first = false;
    }

    fn text(&mut self, text: &str) -> &mut Self {
        self.sep();
        escaped(self.out, text);
        self
    }

    fn null(&mut self) -> &mut Self {
        self.sep();
        self.out.push_str("\\N");
        self
    }

    fn opt_text(&mut self, text: Option<&str>) -> &mut Self {
        match text {
            Some(t) => self.text(t),
            None => self.null(),
        }
    }

    fn display(&mut self, value: impl std::fmt::Display) -> &mut Self {
        self.sep();
        let _ = write!(self.out, "{value}");
        self
    }

    fn uuid(&mut self, id: Uuid) -> &mut Self {
        self.display(id.hyphenated())
    }

    fn opt_uuid(&mut self, id: Option<Uuid>) -> &mut Self {
        match id {
            Some(id) => self.uuid(id),
            None => self.null(),
        }
    }

    fn time(&mut self, time: DateTime<Utc>) -> &mut Self {
        self.display(time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    fn opt_time(&mut self, time: Option<DateTime<Utc>>) -> &mut Self {
        match time {
            Some(t) => self.time(t),
            None => self.null(),
        }
    }

    fn json(&mut self, value: &serde_json::Value) -> &mut Self {
        let text = serde_json::to_string(value).expect("JSON values serialize");
        self.text(&text)
    }

    fn opt_json(&mut self, value: Option<&serde_json::Value>) -> &mut Self {
        match value {
            Some(v) => self.json(v),
            None => self.null(),
        }
    }

    /// A `text[]` literal: every element double-quoted, `"` and `\` backslash-escaped.
    fn text_array(&mut self, items: &[String]) -> &mut Self {
        let mut literal = String::from("{");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                literal.push(',');
            }
            literal.push('"');
            for c in item.chars() {
                if c == '"' || c == '\\' {
                    literal.push('\\');
                }
                literal.push(c);
            }
            literal.push('"');
        }
        literal.push('}');
        self.text(&literal)
    }

    /// A pgvector literal `[x,y,...]`, each float in its shortest round-trip form.
    fn vector(&mut self, values: Option<&[f32]>) -> &mut Self {
        let Some(values) = values else {
            return self.null();
        };
        self.sep();
        self.out.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{v}");
        }
        self.out.push(']');
        self
    }

    fn end(&mut self) {
        self.out.push('\n');
    }
}

/// Appends a `memories` row (columns of [`copy_memories`]).
pub fn memory_line(out: &mut String, m: &Memory) {
    Line::new(out)
        .uuid(m.memory_id)
        .text(&m.namespace)
        .text(&m.content)
        .text(&m.tier)
        .text_array(&m.tags)
        .json(&m.metadata)
        .display(m.importance)
        .opt_time(m.expires_at)
        .vector(m.embedding.as_deref())
        .opt_text(m.source.as_deref())
        .display(m.version)
        .text(&m.actor)
        .uuid(m.created_by)
        .time(m.created_at)
        .time(m.updated_at)
        .opt_time(m.forgotten_at)
        .display(m.log_partition)
        .display(m.log_offset)
        .end();
}

/// Appends a `memory_history` row without its last column, `valid_to`, and without the line
/// end: an open state's row is kept like this until a later command closes it
/// ([`history_line_end`]).
pub fn history_line_start(out: &mut String, h: &HistoryRow) {
    Line::new(out)
        .uuid(h.memory_id)
        .uuid(h.command_id)
        .display(h.version)
        .text(&h.operation)
        .text(&h.actor)
        .text(&h.status)
        .opt_text(h.reason.as_deref())
        .json(&h.change)
        .opt_json(h.state.as_ref())
        .display(h.log_partition)
        .display(h.log_offset)
        .time(h.record_time)
        .opt_text(h.trace_id.as_deref())
        .opt_time(h.valid_from);
}

/// Ends a row begun by [`history_line_start`] with its `valid_to`.
pub fn history_line_end(out: &mut String, valid_to: Option<DateTime<Utc>>) {
    let mut line = Line { out, first: false };
    line.opt_time(valid_to).end();
}

/// Appends a `memory_commands` row (columns of [`copy_commands`]).
pub fn command_line(out: &mut String, c: &CommandRow) {
    Line::new(out)
        .uuid(c.command_id)
        .text(&c.kind)
        .text(&c.namespace)
        .opt_uuid(c.memory_id)
        .text(&c.actor)
        .text(&c.status)
        .opt_text(c.reason.as_deref())
        .opt_text(c.traceparent.as_deref())
        .text(&c.log_topic)
        .display(c.log_partition)
        .display(c.log_offset)
        .time(c.record_time)
        .end();
}

/// Appends a `memory_shares` row (columns of [`copy_shares`]).
pub fn share_line(out: &mut String, s: &ShareRow) {
    Line::new(out)
        .text(&s.namespace)
        .opt_uuid(s.memory_id)
        .text(&s.grantee)
        .text(&s.granted_by)
        .uuid(s.command_id)
        .time(s.granted_at)
        .end();
}

/// Appends a `tools` row (columns of [`copy_tools`]).
pub fn tool_line(out: &mut String, t: &ToolRow) {
    Line::new(out)
        .text(&t.namespace)
        .text(&t.name)
        .text(&t.description)
        .text(&t.usage)
        .text_array(&t.tags)
        .display(t.version)
        .text(&t.registered_by)
        .uuid(t.command_id)
        .time(t.updated_at)
        .end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_separators_and_arrays() {
        let mut out = String::new();
        Line::new(&mut out)
            .text("a\tb\nc\\d")
            .null()
            .text_array(&["x\"y".into(), "z\\".into()])
            .vector(Some(&[0.1, 2.0]))
            .end();
        assert_eq!(
            out,
            "a\\tb\\nc\\\\d\t\\N\t{\"x\\\\\"y\",\"z\\\\\\\\\"}\t[0.1,2]\n"
        );
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(check_schema_name("rebuild_2026_01").is_ok());
        for bad in ["", "Public", "1abc", "a-b", "a b", "pg_temp", "x;drop"] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }
}
