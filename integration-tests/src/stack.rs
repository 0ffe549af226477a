//! A test's isolated slice of the local stack.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The repository root (this crate lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Reads `KEY=value` lines (with optional `export`) of `.stack/env`.
fn stack_env_file() -> HashMap<String, String> {
    let path = repo_root().join(".stack/env");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ").or(Some(line.trim())))
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_owned(),
                v.trim().trim_matches('"').trim_matches('\'').to_owned(),
            )
        })
        .collect()
}

fn setting(name: &str, file: &HashMap<String, String>) -> anyhow::Result<String> {
    std::env::var(name)
        .ok()
        .or_else(|| file.get(name).cloned())
        .with_context(|| {
            format!("{name} is not set and .stack/env does not name it: run `scripts/stack up` first")
        })
}

/// One test's own topics, database and Redis prefix on the shared stack.
pub struct TestEnv {
    pub brokers: String,
    pub redis_url: String,
    /// URL of this test's own database.
    pub database_url: String,
    admin_url: String,
    pub database: String,
    pub commands_topic: String,
    pub dead_letter_topic: String,
    pub task_commands_topic: String,
    pub task_events_topic: String,
    pub keys_topic: String,
    pub group_id: String,
    pub orchestrator_group_id: String,
    pub redis_prefix: String,
    pub pool: PgPool,
    /// librdkafka properties of the test's own clients ([`TestEnv::kafka_config`]): the
    /// credentials of a broker that wants them (empty on the plaintext stack).
    pub kafka_properties: Vec<(String, String)>,
    /// In every topic name of this test: what [`TestEnv::cleanup`] deletes.
    id: String,
}

impl TestEnv {
    /// Creates a fresh database and names fresh topics (created by the first memos process).
    pub async fn new() -> anyhow::Result<TestEnv> {
        let file = stack_env_file();
        let brokers = setting("MEMOS_KAFKA_BROKERS", &file)?;
        let admin_url = setting("DATABASE_URL", &file)?;
        let redis_url = setting("REDIS_URL", &file)?;
        Self::on(brokers, admin_url, redis_url).await
    }

    /// [`TestEnv::new`] on the stack at these addresses (another stack than `.stack`).
    pub async fn on(brokers: String, admin_url: String, redis_url: String) -> anyhow::Result<TestEnv> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("memos_it_{}", &id[..12]);
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("connect to PostgreSQL")?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await?;
        let database_url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{database}"),
            None => anyhow::bail!("DATABASE_URL has no database name: {admin_url}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await?;
        Ok(TestEnv {
            brokers,
            redis_url,
            database_url,
            admin_url,
            database,
            commands_topic: format!("memos.it.{id}.memory.commands"),
            dead_letter_topic: format!("memos.it.{id}.dlq"),
            task_commands_topic: format!("memos.it.{id}.task.commands"),
            task_events_topic: format!("memos.it.{id}.task.events"),
            keys_topic: format!("memos.it.{id}.keys"),
            group_id: format!("memos-it-{id}"),
            orchestrator_group_id: format!("memos-it-{id}-orchestrator"),
            redis_prefix: format!("memos-it-{id}"),
            pool,
            kafka_properties: Vec::new(),
            id,
        })
    }

    /// The random id in every topic, group and database name of this test.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Environment for a `memos` process bound to this test's resources.
    pub fn process_env(&self) -> Vec<(String, String)> {
        [
            ("MEMOS_KAFKA_BROKERS", self.brokers.as_str()),
            ("DATABASE_URL", self.database_url.as_str()),
            ("REDIS_URL", self.redis_url.as_str()),
            ("MEMOS__TOPICS__MEMORY_COMMANDS", self.commands_topic.as_str()),
            ("MEMOS__TOPICS__DEAD_LETTER", self.dead_letter_topic.as_str()),
            ("MEMOS__TOPICS__TASK_COMMANDS", self.task_commands_topic.as_str()),
            ("MEMOS__TOPICS__TASK_EVENTS", self.task_events_topic.as_str()),
            ("MEMOS__TOPICS__KEYS", self.keys_topic.as_str()),
            (
                "MEMOS__ORCHESTRATOR__GROUP_ID",
                self.orchestrator_group_id.as_str(),
            ),
            ("MEMOS__TOPICS__PARTITIONS", "3"),
            ("MEMOS__PROJECTOR__GROUP_ID", self.group_id.as_str()),
            ("MEMOS__REDIS__KEY_PREFIX", self.redis_prefix.as_str()),
            ("MEMOS__HTTP__BIND", "127.0.0.1:0"),
            // Suites about other things believe the headers; `auth.rs` runs with keys.
            ("MEMOS__HTTP__AUTH", "none"),
            ("MEMOS__MEMORY__EMBEDDING_DIMENSIONS", "3"),
            ("RUST_LOG", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    pub fn kafka_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.kafka_properties {
            config.set(key, value);
        }
        config
    }

    /// End offsets (high watermarks) of every partition of `topic`.
    pub fn high_watermarks(&self, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
        let consumer: BaseConsumer = self.kafka_config().create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .unwrap_or_default();
        partitions
            .into_iter()
            .map(|p| {
                let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                Ok((p, high))
            })
            .collect()
    }

    /// Makes this test's database refuse (false) or accept (true) connections, closing the
    /// open ones: PostgreSQL unavailable to the processes of this test only.
    pub async fn set_database_available(&self, available: bool) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {available}",
            self.database
        )))
        .execute(&mut admin)
        .await?;
        if !available {
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(&self.database)
                .execute(&mut admin)
                .await?;
        }
        Ok(())
    }

    /// Drops this test's database and deletes its topics (best effort): a broker that keeps
    /// every test's partitions takes minutes to start after a few suite runs.
    pub async fn cleanup(self) {
        self.pool.close().await;
        let id = self.id.clone();
        let config = self.kafka_config();
        let listed = config.clone();
        let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
            let consumer: BaseConsumer = listed.create()?;
            let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
            Ok(metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|name| name.contains(&id))
                .collect())
        })
        .await;
        if let (Ok(Ok(topics)), Ok(admin)) = (topics, config.create::<AdminClient<DefaultClientContext>>())
            && !topics.is_empty()
        {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            let _ = admin.delete_topics(&names, &options).await;
        }
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            )))
            .execute(&mut admin)
            .await;
        }
    }
}
