//! Hot views. Redis is derived from PostgreSQL and can be thrown away: every write carries
//! the log position it reflects and a server-side script applies it only when that position
//! is newer than the stored one, so retries, replays and racing projectors never move a key
//! backward.
//!
//! Keys (prefix configurable): `P:memory:<id>` hash {pos, doc} (doc absent once forgotten);
//! `P:recent:<namespace>` sorted set of the namespace's working memories by creation time,
//! capped and expiring; `P:position:<topic>:<partition>` the next offset the views have
//! applied, for read-your-writes.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

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

#[derive(Clone)]
pub struct HotViews {
    pub(crate) conn: ConnectionManager,
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
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(HotViews {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            memory_script: Script::new(GUARDED_MEMORY),
            position_script: Script::new(GUARDED_POSITION),
        })
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
        let mut conn = self.conn.clone();
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

    /// Writes memory documents, each guarded by its log position, in one round trip.
    pub async fn put_memories(&self, writes: &[HotWrite<'_>]) -> redis::RedisResult<usize> {
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
        self.conn.clone().get(self.position_key(topic, partition)).await
    }

    /// The cached document of a memory, if any.
    pub async fn get_memory(&self, id: &str) -> redis::RedisResult<Option<String>> {
        self.conn.clone().hget(self.memory_key(id), "doc").await
    }

    /// The log position the cached document of a memory reflects.
    pub async fn memory_position(&self, id: &str) -> redis::RedisResult<Option<i64>> {
        self.conn.clone().hget(self.memory_key(id), "pos").await
    }

    /// Ids of a namespace's most recent working memories, newest first.
    pub async fn recent(&self, namespace: &str, limit: isize) -> redis::RedisResult<Vec<String>> {
        self.conn
            .clone()
            .zrevrange(self.recent_key(namespace), 0, limit - 1)
            .await
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").query_async(&mut self.conn.clone()).await
    }
}
