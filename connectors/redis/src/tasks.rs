//! Each agent's task inbox and availability, derived from the task views in PostgreSQL.
//!
//! Keys (prefix configurable): `P:inbox:<agent>` hash {rev, doc} where doc is the JSON array of
//! the tasks the agent holds (assigned or running), highest priority first;
//! `P:availability:<agent>` hash {rev, doc} where doc is `{agent_id, status, load,
//! max_concurrent, capabilities, ...}`. Both are whole snapshots read from PostgreSQL after a
//! commit, written together by a script that applies them only when their revision (which
//! PostgreSQL moves with every batch touching the agent) is newer than the stored one: a
//! late writer holding an older snapshot can never overwrite a newer one.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use crate::HotViews;

/// KEYS: inbox hash, availability hash. ARGV: revision, inbox doc, availability doc ('' when
/// the agent is not registered). Returns 1 when written, 0 when stale.
static GUARDED_AGENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local stored = redis.call('HGET', KEYS[1], 'rev')
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'doc', ARGV[2])
if ARGV[3] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], 'rev', ARGV[1], 'doc', ARGV[3])
end
return 1
"#,
    )
});

/// One agent's snapshot to cache.
pub struct AgentWrite<'a> {
    pub agent_id: &'a str,
    pub revision: i64,
    /// JSON array of inbox items.
    pub inbox: &'a str,
    /// JSON object; `None` when the agent is not registered.
    pub availability: Option<&'a str>,
}

impl HotViews {
    fn inbox_key(&self, agent: &str) -> String {
        format!("{}:inbox:{agent}", self.prefix)
    }

    fn availability_key(&self, agent: &str) -> String {
        format!("{}:availability:{agent}", self.prefix)
    }

    /// Writes agents' inbox and availability, each guarded by its revision, in round trips of
    /// at most `max_pipeline` scripts. Returns how many were newer than what Redis held.
    pub async fn put_agents(&self, writes: &[AgentWrite<'_>]) -> redis::RedisResult<usize> {
        let mut written = 0;
        for chunk in writes.chunks(self.max_pipeline()) {
            written += self.put_agent_chunk(chunk).await?;
        }
        Ok(written)
    }

    async fn put_agent_chunk(&self, writes: &[AgentWrite<'_>]) -> redis::RedisResult<usize> {
        if writes.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for write in writes {
            pipe.invoke_script(
                GUARDED_AGENT
                    .key(self.inbox_key(write.agent_id))
                    .key(self.availability_key(write.agent_id))
                    .arg(write.revision)
                    .arg(write.inbox)
                    .arg(write.availability.unwrap_or("")),
            );
        }
        let written = self.run(&pipe, &[&GUARDED_AGENT]).await?;
        Ok(written.into_iter().filter(|w| *w == 1).count())
    }

    /// An agent's cached inbox (JSON array), `None` when Redis has none.
    pub async fn inbox(&self, agent: &str) -> redis::RedisResult<Option<String>> {
        let key = self.inbox_key(agent);
        self.read("inbox", |mut c| async move { c.hget(key, "doc").await })
            .await
    }

    /// An agent's cached availability (JSON object), `None` when Redis has none.
    pub async fn availability(&self, agent: &str) -> redis::RedisResult<Option<String>> {
        let key = self.availability_key(agent);
        self.read("availability", |mut c| async move { c.hget(key, "doc").await })
            .await
    }
}
