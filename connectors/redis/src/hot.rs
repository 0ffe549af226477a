//! Hot views. Redis is derived from PostgreSQL and can be thrown away: every write carries
//! the log position it reflects and a server-side script applies it only when that position
//! is newer than the stored one, so retries, replays and racing projectors never move a
//! key backward.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

/// A Redis failure.
pub type Error = redis::RedisError;

/// Sets the document when `position` is newer than the stored one. Returns 1 when written.
const GUARDED_SET: &str = r#"
local stored = redis.call('HGET', KEYS[1], 'pos')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'pos', ARGV[1], 'doc', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

#[derive(Clone)]
pub struct HotViews {
    conn: ConnectionManager,
    prefix: String,
    ttl: Duration,
    guarded_set: Script,
}

/// A document to cache and the log position it reflects.
pub struct HotWrite<'a> {
    pub key: &'a str,
    /// Offset of the record in its partition; a memory lives in one partition.
    pub position: i64,
    pub doc: String,
}

impl HotViews {
    pub async fn connect(url: &str, prefix: &str, ttl: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(HotViews {
            conn,
            prefix: prefix.to_owned(),
            ttl,
            guarded_set: Script::new(GUARDED_SET),
        })
    }

    fn memory_key(&self, id: &str) -> String {
        format!("{}:memory:{id}", self.prefix)
    }

    /// Writes memory documents, each guarded by its log position, in one round trip.
    pub async fn put_memories(&self, writes: &[HotWrite<'_>]) -> redis::RedisResult<usize> {
        if writes.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        let ttl_ms = self.ttl.as_millis() as u64;
        for write in writes {
            let key = self.memory_key(write.key);
            pipe.invoke_script(
                self.guarded_set
                    .key(key)
                    .arg(write.position)
                    .arg(&write.doc)
                    .arg(ttl_ms),
            );
        }
        let mut conn = self.conn.clone();
        // A pipeline calls EVALSHA without falling back to EVAL: load the script once when
        // the server does not know it (first use, restart, SCRIPT FLUSH) and go again.
        let written: Vec<i64> = match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.guarded_set.prepare_invoke().load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            other => other?,
        };
        Ok(written.into_iter().filter(|w| *w == 1).count())
    }

    /// The cached document of a memory, if any.
    pub async fn get_memory(&self, id: &str) -> redis::RedisResult<Option<String>> {
        self.conn.clone().hget(self.memory_key(id), "doc").await
    }

    /// The log position the cached document of a memory reflects.
    pub async fn memory_position(&self, id: &str) -> redis::RedisResult<Option<i64>> {
        self.conn.clone().hget(self.memory_key(id), "pos").await
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").query_async(&mut self.conn.clone()).await
    }
}
