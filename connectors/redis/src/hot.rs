//! Hot views. Redis is derived from PostgreSQL and can be thrown away: every write carries
//! the log position it reflects and a server-side script applies it only when that position
//! is newer than the stored one, so retries, replays and racing projectors never move a key
//! backward.
//!
//! Keys (prefix configurable): `P:memory:<id>` hash {pos, doc} (doc absent once forgotten);
//! `P:recent:<namespace>` sorted set of the namespace's working memories by creation time,
//! capped and expiring; `P:position:<topic>:<partition>` the next offset the views have
//! applied, for read-your-writes.
//!
//! Two connections, each with its own bound: reads (a document, a position, a ping) answer
//! within `read_timeout` or fail, and go through a [circuit breaker](crate::breaker) so a
//! Redis that is down costs a read microseconds, not reconnect attempts; bulk writes (the
//! projector's batches, `memosctl cache rebuild`) are sent in pipelines of at most
//! `max_pipeline` scripts and may take up to `write_timeout`, and never wait behind or block
//! a read on the same socket.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use memos_runtime::config::RedisConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::breaker::{Admission, Breaker, is_unavailable};

/// A Redis failure.
pub type Error = redis::RedisError;

/// Most working memories kept per namespace in the recent set.
pub const RECENT_CAP: i64 = 100;

/// KEYS: memory hash, recent set. ARGV: position, doc ('' when forgotten), ttl ms,
/// score, keep in recent (1/0), member, cap. Returns 1 when written, 0 when stale.
const GUARDED_MEMORY: &str = r#"
local stored = redis.call('HGET', KEYS[1], 'pos')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'doc')
  redis.call('HSET', KEYS[1], 'pos', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'pos', ARGV[1], 'doc', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[7]))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('ZREM', KEYS[2], ARGV[6])
end
return 1
"#;

/// KEYS: position key. ARGV: next offset. Moves the position forward only.
const GUARDED_POSITION: &str = r#"
local stored = redis.call('GET', KEYS[1])
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#;

/// How the hot views talk to Redis (see [`RedisConfig`] for each bound's meaning).
#[derive(Debug, Clone)]
pub struct Settings {
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub connect_timeout: Duration,
    pub breaker_cooldown: Duration,
    pub max_pipeline: usize,
}

impl From<&RedisConfig> for Settings {
    fn from(config: &RedisConfig) -> Settings {
        Settings {
            read_timeout: config.read_timeout,
            write_timeout: config.write_timeout,
            connect_timeout: config.connect_timeout,
            breaker_cooldown: config.breaker_cooldown,
            max_pipeline: config.max_pipeline.max(1),
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings::from(&memos_runtime::Config::default().redis)
    }
}

#[derive(Clone)]
pub struct HotViews {
    /// Reads: bounded by `read_timeout`, behind the breaker.
    read: ConnectionManager,
    /// Bulk writes: bounded by `write_timeout`, retried by their callers.
    write: ConnectionManager,
    breaker: Arc<Breaker>,
    read_timeout: Duration,
    max_pipeline: usize,
    pub(crate) prefix: String,
    ttl: Duration,
    memory_script: Script,
    position_script: Script,
}

/// A memory's membership in its namespace's recent working set.
pub struct Recent<'a> {
    pub namespace: &'a str,
    /// Creation time in Unix milliseconds.
    pub score: i64,
    /// Whether it belongs in the set (a live working memory) or must leave it.
    pub keep: bool,
}

/// A document to cache and the log position it reflects.
pub struct HotWrite<'a> {
    pub key: &'a str,
    /// Offset of the record in its partition; a memory lives in one partition.
    pub position: i64,
    /// `None`: the memory is gone (forgotten).
    pub doc: Option<String>,
    pub recent: Recent<'a>,
}

impl HotViews {
    /// Connects with the default [`Settings`].
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> redis::RedisResult<Self> {
        Self::connect_with(url, prefix, ttl, &Settings::default()).await
    }

    /// Connects as configured.
    pub async fn from_config(config: &RedisConfig) -> redis::RedisResult<Self> {
        Self::connect_with(
            config.url.expose(),
            &config.key_prefix,
            config.memory_ttl,
            &Settings::from(config),
        )
        .await
    }

    pub async fn connect_with(
        url: &str,
        prefix: &str,
        ttl: Duration,
        settings: &Settings,
    ) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let manager = |response_timeout: Duration| {
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(settings.connect_timeout))
        };
        let read = ConnectionManager::new_with_config(client.clone(), manager(settings.read_timeout)).await?;
        let write = ConnectionManager::new_with_config(client, manager(settings.write_timeout)).await?;
        // A probe answers or times out within the read bound; one silent for twice that was
        // dropped by its caller.
        let breaker = Breaker::new(settings.breaker_cooldown, settings.read_timeout * 2);
        Ok(HotViews {
            read,
            write,
            breaker: Arc::new(breaker),
            read_timeout: settings.read_timeout,
            max_pipeline: settings.max_pipeline.max(1),
            prefix: prefix.to_owned(),
            ttl,
            memory_script: Script::new(GUARDED_MEMORY),
            position_script: Script::new(GUARDED_POSITION),
        })
    }

    /// Runs one read through the breaker, bounded by the read timeout. The timeout also
    /// covers waiting for a reconnect, which the connection manager would otherwise retry
    /// for seconds.
    pub(crate) async fn read<T, F, Fut>(&self, op: &'static str, call: F) -> redis::RedisResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.breaker.admit(op) == Admission::Rejected {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis unavailable (circuit breaker open)",
            )));
        }
        let result = match tokio::time::timeout(self.read_timeout, call(self.read.clone())).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("redis read timed out after {:?}", self.read_timeout),
            )
            .into()),
        };
        self.breaker.record(result.as_ref().is_err_and(is_unavailable));
        result
    }

    pub(crate) fn max_pipeline(&self) -> usize {
        self.max_pipeline
    }

    /// Whether reads are currently skipping Redis.
    pub fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    fn memory_key(&self, id: &str) -> String {
        format!("{}:memory:{id}", self.prefix)
    }

    fn recent_key(&self, namespace: &str) -> String {
        format!("{}:recent:{namespace}", self.prefix)
    }

    fn position_key(&self, topic: &str, partition: i32) -> String {
        format!("{}:position:{topic}:{partition}", self.prefix)
    }

    /// Runs a pipeline of script calls, loading the scripts once when the server does not
    /// know them (first use, restart, SCRIPT FLUSH): a pipeline calls EVALSHA without
    /// falling back to EVAL.
    pub(crate) async fn run(
        &self,
        pipe: &redis::Pipeline,
        scripts: &[&Script],
    ) -> redis::RedisResult<Vec<i64>> {
        let mut conn = self.write.clone();
        match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                for script in scripts {
                    script.prepare_invoke().load_async(&mut conn).await?;
                }
                pipe.query_async(&mut conn).await
            }
            other => other,
        }
    }

    /// Writes memory documents, each guarded by its log position, in round trips of at most
    /// `max_pipeline` scripts. Returns how many were newer than what Redis held. On an error
    /// some chunks may be written: the guard makes the caller's retry of the whole batch safe.
    pub async fn put_memories(&self, writes: &[HotWrite<'_>]) -> redis::RedisResult<usize> {
        let mut written = 0;
        for chunk in writes.chunks(self.max_pipeline) {
            written += self.put_memory_chunk(chunk).await?;
        }
        Ok(written)
    }

    async fn put_memory_chunk(&self, writes: &[HotWrite<'_>]) -> redis::RedisResult<usize> {
        if writes.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let ttl_ms = self.ttl.as_millis() as u64;
        for write in writes {
            pipe.invoke_script(
                self.memory_script
                    .key(self.memory_key(write.key))
                    .key(self.recent_key(write.recent.namespace))
                    .arg(write.position)
                    .arg(write.doc.as_deref().unwrap_or(""))
                    .arg(ttl_ms)
                    .arg(write.recent.score)
                    .arg(if write.recent.keep { "1" } else { "0" })
                    .arg(write.key)
                    .arg(RECENT_CAP),
            );
        }
        let written = self.run(&pipe, &[&self.memory_script]).await?;
        Ok(written.into_iter().filter(|w| *w == 1).count())
    }

    /// Records that the views applied everything below `next` in each partition.
    pub async fn advance_positions(&self, topic: &str, next: &BTreeMap<i32, i64>) -> redis::RedisResult<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (partition, offset) in next {
            pipe.invoke_script(
                self.position_script
                    .key(self.position_key(topic, *partition))
                    .arg(*offset),
            );
        }
        self.run(&pipe, &[&self.position_script]).await.map(|_| ())
    }

    /// The next offset the views will apply in a partition, as far as Redis knows.
    pub async fn position(&self, topic: &str, partition: i32) -> redis::RedisResult<Option<i64>> {
        let key = self.position_key(topic, partition);
        self.read("position", |mut c| async move { c.get(key).await })
            .await
    }

    /// The cached document of a memory, if any.
    pub async fn get_memory(&self, id: &str) -> redis::RedisResult<Option<String>> {
        let key = self.memory_key(id);
        self.read("get_memory", |mut c| async move { c.hget(key, "doc").await })
            .await
    }

    /// The log position the cached document of a memory reflects.
    pub async fn memory_position(&self, id: &str) -> redis::RedisResult<Option<i64>> {
        let key = self.memory_key(id);
        self.read("memory_position", |mut c| async move { c.hget(key, "pos").await })
            .await
    }

    /// Ids of a namespace's most recent working memories, newest first.
    pub async fn recent(&self, namespace: &str, limit: isize) -> redis::RedisResult<Vec<String>> {
        let key = self.recent_key(namespace);
        self.read(
            "recent",
            |mut c| async move { c.zrevrange(key, 0, limit - 1).await },
        )
        .await
    }

    /// One round trip on the read connection, through the breaker (readiness).
    pub async fn ping(&self) -> redis::RedisResult<()> {
        self.read("ping", |mut c| async move {
            redis::cmd("PING").query_async(&mut c).await
        })
        .await
    }
}
