//! `memosctl bench`: performance benchmarks against the local stack.
//!
//! - `bench projector`: a backlog of realistic memory commands, the projector catching up on
//!   it, and two references on the same rows: a plain `COPY` (the ceiling) and one
//!   transaction per record (what a hand-written consumer does).
//! - `bench orchestrator`: task delegations from command to visible assignment.
//! - `bench e2e`: open-loop writes over HTTP at a fixed rate, and the time from publish to
//!   visible.
//! - `bench replay`: rebuilding the memory views from a backlog into a fresh schema.
//! - `bench search`: text, vector and hybrid search latency and recall@10 for ordinary agents
//!   and one heavy agent on a large `memories` table, while writes continue.
//!
//! Each run works on its own resources (database, topics, consumer group, Redis prefix, all
//! named after a short run id) and removes them at the end unless `--keep`. Results are one
//! JSON line on stdout; progress goes to stderr. See `docs/benchmarks.md`.

mod commands;
mod e2e;
mod orchestrator;
mod projector;
mod replay;
mod search;
mod sys;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use memos_kafka::admin::{TopicSpec, ensure_topics};
use memos_runtime::Config;
use memos_runtime::config::TopicsConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

#[derive(Subcommand)]
pub enum Bench {
    /// Projector catch-up on a backlog, against a COPY ceiling and a naive consumer.
    Projector(projector::Args),
    /// Publish-to-visible freshness over HTTP at a fixed write rate.
    E2e(e2e::Args),
    /// Delegations per second from command to visible assignment, transactions on.
    Orchestrator(orchestrator::Args),
    /// Rebuild speed: `memosctl replay` of a backlog into a fresh schema.
    Replay(replay::Args),
    /// Text, vector and hybrid search latency and recall@10 on a large memories table.
    Search(search::Args),
}

pub async fn run(config: &Config, bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Projector(args) => projector::run(config, args).await,
        Bench::E2e(args) => e2e::run(config, args).await,
        Bench::Orchestrator(args) => orchestrator::run(config, args).await,
        Bench::Replay(args) => replay::run(config, args).await,
        Bench::Search(args) => search::run(config, args).await,
    }
}

/// Parses `30s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (use 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown duration unit in {text:?} (use ms, s, m, h)")),
    };
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(format!("not a duration: {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The `memos` binary: `--memos-bin`, else the sibling of this executable (the benchmarks
/// are meant for `cargo build --release` binaries).
pub fn memos_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path,
        None => std::env::current_exe()?
            .parent()
            .context("memosctl has no parent directory")?
            .join("memos"),
    };
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it with `cargo build --release -p memos -p memosctl`, or pass --memos-bin",
        path.display()
    );
    Ok(path)
}

/// A benchmark's own resources on the shared stack.
pub struct Isolation {
    pub id: String,
    admin_url: String,
    databases: Vec<String>,
    pub commands_topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub redis_prefix: String,
    pub partitions: i32,
    topics_created: bool,
}

impl Isolation {
    pub fn new(config: &Config, partitions: i32) -> Isolation {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        Isolation {
            admin_url: config.postgres.url.expose().to_owned(),
            databases: Vec::new(),
            commands_topic: format!("memos.bench.{id}.memory.commands"),
            dead_letter_topic: format!("memos.bench.{id}.dlq"),
            group_id: format!("memos-bench-{id}"),
            redis_prefix: format!("memos-bench-{id}"),
            partitions,
            topics_created: false,
            id,
        }
    }

    /// URL of `database` on the server of `DATABASE_URL`.
    pub fn database_url(&self, database: &str) -> anyhow::Result<String> {
        let (base, query) = match self.admin_url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (self.admin_url.as_str(), None),
        };
        let Some((server, _)) = base.rsplit_once('/') else {
            anyhow::bail!("DATABASE_URL has no database name");
        };
        Ok(match query {
            Some(query) => format!("{server}/{database}?{query}"),
            None => format!("{server}/{database}"),
        })
    }

    async fn admin(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.admin_url)
            .await
            .context("cannot connect to PostgreSQL (DATABASE_URL)")
    }

    /// Creates `memos_bench_<id>_<suffix>`, migrated, with the embedding index: every index
    /// the views have in production. Returns its URL and a small pool.
    pub async fn create_database(
        &mut self,
        suffix: &str,
        dimensions: usize,
    ) -> anyhow::Result<(String, PgPool)> {
        let (url, pool) = self.create_migrated_database(suffix).await?;
        memos_postgres::pool::ensure_vector_index(&pool, dimensions).await?;
        Ok((url, pool))
    }

    /// [`Isolation::create_database`] without the embedding index, for a bench that loads
    /// its rows first and builds the index once afterwards.
    pub async fn create_migrated_database(&mut self, suffix: &str) -> anyhow::Result<(String, PgPool)> {
        let name = format!("memos_bench_{}_{suffix}", self.id);
        let mut admin = self.admin().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        self.databases.push(name.clone());
        let url = self.database_url(&name)?;
        let pool = PgPoolOptions::new().max_connections(2).connect(&url).await?;
        memos_postgres::migrate(&pool).await.context("migration failed")?;
        Ok((url, pool))
    }

    /// Runs `ALTER DATABASE <name> SET <setting>` (new sessions of that database only).
    pub async fn alter_database(&self, url: &str, setting: &str) -> anyhow::Result<()> {
        let name = url
            .split('?')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .context("database url")?;
        let mut admin = self.admin().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} SET {setting}"
        )))
        .execute(&mut admin)
        .await?;
        Ok(())
    }

    /// Takes a database out of the way once its phase is over, so that its background work
    /// (autovacuum of the dead tuples a projector leaves, which for an HNSW index is heavy)
    /// does not run during the next timed phase: dropped, or with `keep` kept with autovacuum
    /// off on its tables and any running worker stopped.
    pub async fn retire_database(&mut self, url: &str, keep: bool) -> anyhow::Result<()> {
        let name = url
            .split('?')
            .next()
            .and_then(|u| u.rsplit('/').next())
            .context("database url")?
            .to_owned();
        let mut admin = self.admin().await?;
        if keep {
            let mut conn = PgConnection::connect(url).await?;
            for table in ["memories", "memory_history", "memory_commands"] {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {table} SET (autovacuum_enabled = false)"
                )))
                .execute(&mut conn)
                .await?;
            }
            conn.close().await?;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND backend_type = 'autovacuum worker'",
            )
            .bind(&name)
            .execute(&mut admin)
            .await?;
        } else {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
            self.databases.retain(|d| *d != name);
        }
        Ok(())
    }

    /// Flushes dirty buffers so that a timed phase does not pay for the previous one's.
    pub async fn checkpoint(&self) {
        if let Ok(mut admin) = self.admin().await
            && let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&mut admin).await
        {
            eprintln!("bench: CHECKPOINT failed ({e}); continuing");
        }
    }

    pub fn topics_config(&self, config: &Config) -> TopicsConfig {
        TopicsConfig {
            memory_commands: self.commands_topic.clone(),
            dead_letter: self.dead_letter_topic.clone(),
            partitions: self.partitions,
            ..config.topics.clone()
        }
    }

    pub async fn create_topics(&mut self, config: &Config) -> anyhow::Result<()> {
        let topics = self.topics_config(config);
        ensure_topics(
            &config.kafka,
            &[
                TopicSpec::commands(&self.commands_topic, &topics),
                TopicSpec::dead_letter(&self.dead_letter_topic, &topics),
            ],
        )
        .await?;
        self.topics_created = true;
        Ok(())
    }

    /// Environment of a `memos` process bound to these resources and `database_url`.
    pub fn process_env(
        &self,
        config: &Config,
        database_url: &str,
        dimensions: usize,
    ) -> Vec<(String, String)> {
        [
            ("MEMOS_KAFKA_BROKERS", config.kafka.brokers.as_str()),
            ("DATABASE_URL", database_url),
            ("REDIS_URL", config.redis.url.expose()),
            ("MEMOS__TOPICS__MEMORY_COMMANDS", self.commands_topic.as_str()),
            ("MEMOS__TOPICS__DEAD_LETTER", self.dead_letter_topic.as_str()),
            ("MEMOS__TOPICS__PARTITIONS", &self.partitions.to_string()),
            ("MEMOS__PROJECTOR__GROUP_ID", self.group_id.as_str()),
            ("MEMOS__REDIS__KEY_PREFIX", self.redis_prefix.as_str()),
            ("MEMOS__MEMORY__EMBEDDING_DIMENSIONS", &dimensions.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// Drops the databases, deletes the topics and the Redis keys; `keep` only tells where
    /// they are.
    pub async fn cleanup(&self, config: &Config, keep: bool) {
        if keep {
            eprintln!(
                "bench: kept databases {:?}, topics {} and {}, Redis prefix {}",
                self.databases, self.commands_topic, self.dead_letter_topic, self.redis_prefix
            );
            return;
        }
        if let Ok(mut admin) = self.admin().await {
            for name in &self.databases {
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop)).execute(&mut admin).await {
                    eprintln!("bench: cannot drop database {name}: {e}");
                }
            }
        }
        if self.topics_created
            && let Err(e) = self.delete_topics(config).await
        {
            eprintln!("bench: cannot delete topics: {e}");
        }
        if let Err(e) = delete_redis_keys(config.redis.url.expose(), &self.redis_prefix).await {
            eprintln!("bench: cannot delete Redis keys {}:*: {e}", self.redis_prefix);
        }
    }

    async fn delete_topics(&self, config: &Config) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            memos_kafka::client::base_config(&config.kafka, "bench-admin").create()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin
            .delete_topics(&[&self.commands_topic, &self.dead_letter_topic], &options)
            .await?
        {
            if let Err((name, code)) = result {
                eprintln!("bench: cannot delete topic {name}: {code}");
            }
        }
        Ok(())
    }
}

/// Deletes every key under `prefix:` (SCAN + UNLINK, so the server never blocks long).
async fn delete_redis_keys(url: &str, prefix: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(2000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A `memos` child process; stopped (SIGKILL) if still running when dropped.
pub struct MemosProcess {
    child: Child,
    pub log: PathBuf,
    pub started: Instant,
}

impl MemosProcess {
    pub fn spawn(
        binary: &PathBuf,
        role: &str,
        env: &[(String, String)],
        log_name: &str,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(log_name);
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(binary);
        command
            .args(["run", role])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(MemosProcess { child, log, started })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "memos exited early ({status}); log {}:\n{}",
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `deadline` for a clean exit (SIGKILL after that).
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("bench: memos did not stop within {deadline:?} after SIGTERM; killing it");
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for MemosProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10 parsecs").is_err());
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(sys::quantile(&values, 0.5), 50.0);
        assert_eq!(sys::quantile(&values, 0.99), 99.0);
        assert_eq!(sys::quantile(&values, 1.0), 100.0);
        assert_eq!(sys::quantile(&[], 0.5), 0.0);
    }
}
