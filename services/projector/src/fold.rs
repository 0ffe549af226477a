//! The memory fold: decides every command of a batch, in log order, against the state the
//! batch loaded, and says what to write. Pure and deterministic: no I/O, no clock, no
//! randomness; every time comes from the records. The same log prefix always gives the same
//! views, which is what makes rebuilds comparable with the live views.
//!
//! Rules: a command id already decided is a no-op (client retries and duplicate sends have
//! one effect). A write of an existing id, a change to an unknown or forgotten memory, a
//! stale `expected_version`, a share or revoke by an agent that does not own the namespace,
//! a revoke of a share that does not exist, or an embedding of the wrong dimension is
//! rejected, with its reason recorded in the command status and the memory's history.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use memos_postgres::memories::{Changes, CommandRow, HistoryRow, Memory, ShareKey, ShareRow, State, ToolRow};
use memos_schemas::MemoryCommand;
use serde_json::Value;
use uuid::Uuid;

/// A decoded command with its place in the log.
#[derive(Debug, Clone)]
pub struct Decided {
    pub command: MemoryCommand,
    pub partition: i32,
    pub offset: i64,
    pub record_time: DateTime<Utc>,
    /// From the record headers, else from the command.
    pub traceparent: Option<String>,
}

/// What the fold needs from configuration.
#[derive(Debug, Clone)]
pub struct FoldConfig {
    pub topic: String,
    /// Required embedding dimension; `None` accepts any.
    pub embedding_dimensions: Option<usize>,
}

/// The decisions of one batch.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: Changes,
    pub applied: usize,
    pub rejected: Vec<(Uuid, String)>,
    pub duplicates: usize,
}

/// Why a command was rejected; the code (text before `:`) is also a metric label.
pub mod reason {
    pub const MEMORY_EXISTS: &str = "memory_exists";
    pub const UNKNOWN_MEMORY: &str = "unknown_memory";
    pub const FORGOTTEN: &str = "forgotten";
    pub const VERSION_CONFLICT: &str = "version_conflict";
    pub const NOT_OWNER: &str = "not_owner";
    pub const NO_SUCH_SHARE: &str = "no_such_share";
    pub const EMBEDDING_DIMENSION: &str = "embedding_dimension";
    /// Every code, for metrics registration.
    pub const ALL: &[&str] = &[
        MEMORY_EXISTS,
        UNKNOWN_MEMORY,
        FORGOTTEN,
        VERSION_CONFLICT,
        NOT_OWNER,
        NO_SUCH_SHARE,
        EMBEDDING_DIMENSION,
    ];
}

fn uuid(text: &str) -> Uuid {
    // Decoding validated every id already; a nil id can only come from a bug upstream.
    Uuid::parse_str(text).unwrap_or(Uuid::nil())
}

fn time_ms(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Ids and keys whose current rows the batch needs (see [`memos_postgres::memories::load_state`]).
pub fn touched(batch: &[Decided]) -> (Vec<Uuid>, Vec<Uuid>, Vec<String>, Vec<String>) {
    let mut commands = BTreeSet::new();
    let mut memories = BTreeSet::new();
    let mut share_namespaces = BTreeSet::new();
    let mut tool_namespaces = BTreeSet::new();
    for d in batch {
        commands.insert(uuid(d.command.command_id()));
        match &d.command {
            MemoryCommand::Write(c) => {
                memories.insert(uuid(&c.memory_id));
            }
            MemoryCommand::Update(c) => {
                memories.insert(uuid(&c.memory_id));
            }
            MemoryCommand::Forget(c) => {
                memories.insert(uuid(&c.memory_id));
            }
            MemoryCommand::Share(c) => {
                memories.extend(c.memory_id.as_deref().map(uuid));
                share_namespaces.insert(c.namespace.clone());
            }
            MemoryCommand::Revoke(c) => {
                memories.extend(c.memory_id.as_deref().map(uuid));
                share_namespaces.insert(c.namespace.clone());
            }
            MemoryCommand::RegisterTool(c) => {
                tool_namespaces.insert(c.namespace.clone());
            }
        }
    }
    (
        commands.into_iter().collect(),
        memories.into_iter().collect(),
        share_namespaces.into_iter().collect(),
        tool_namespaces.into_iter().collect(),
    )
}

/// A memory as its history keeps it: everything but the embedding vector, which stays in
/// the current view only (the history records that it changed and its dimension); it is by
/// far the largest field and no as-of or audit question needs the numbers.
pub fn history_state(memory: &Memory) -> Value {
    let mut value = serde_json::to_value(memory).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        let dimensions = memory.embedding.as_ref().map(Vec::len);
        map.remove("embedding");
        map.insert("embedding_dimensions".into(), dimensions.into());
    }
    value
}

/// The command's own fields, without the header, as the history's `change` (empty for a
/// write, whose change is its initial `state`). An embedding is recorded by its dimension,
/// as in [`history_state`].
fn change_of(command: &MemoryCommand) -> Value {
    let mut value = match command {
        // A write's change is the whole initial state, which the row's `state` holds.
        MemoryCommand::Write(_) => return Value::Object(Default::default()),
        MemoryCommand::Update(c) => serde_json::to_value(c),
        MemoryCommand::Forget(c) => serde_json::to_value(c),
        MemoryCommand::Share(c) => serde_json::to_value(c),
        MemoryCommand::Revoke(c) => serde_json::to_value(c),
        MemoryCommand::RegisterTool(c) => serde_json::to_value(c),
    }
    .unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        for header in ["command_id", "namespace", "actor", "issued_at", "traceparent"] {
            map.remove(header);
        }
        if let Some(Value::Array(embedding)) = map.remove("embedding") {
            map.insert("embedding_dimensions".into(), embedding.len().into());
        }
        map.retain(|_, v| !v.is_null());
    }
    value
}

fn operation(command: &MemoryCommand) -> &'static str {
    match command {
        MemoryCommand::Write(_) => "write",
        MemoryCommand::Update(_) => "update",
        MemoryCommand::Forget(_) => "forget",
        MemoryCommand::Share(_) => "share",
        MemoryCommand::Revoke(_) => "revoke",
        MemoryCommand::RegisterTool(_) => "register_tool",
    }
}

struct Folder<'a> {
    config: &'a FoldConfig,
    seen: HashSet<Uuid>,
    before: HashSet<Uuid>,
    memories: HashMap<Uuid, Memory>,
    changed: BTreeSet<Uuid>,
    /// Index in `out.changes.history` of the open state row of a memory, for this batch.
    open_row: HashMap<Uuid, usize>,
    closed_before: HashSet<Uuid>,
    shares: HashMap<ShareKey, ShareRow>,
    initial_shares: HashMap<ShareKey, ShareRow>,
    tools: HashMap<(String, String), ToolRow>,
    changed_tools: BTreeSet<(String, String)>,
    out: Outcome,
}

/// A decision about one command: `Ok(Some(memory))` applied with the memory's new state,
/// `Ok(None)` applied without changing a memory, `Err(reason)` rejected.
type Decision = Result<Option<Memory>, String>;

impl Folder<'_> {
    fn check_dimensions(&self, embedding: Option<&Vec<f32>>) -> Result<(), String> {
        match (embedding, self.config.embedding_dimensions) {
            (Some(e), Some(dim)) if e.len() != dim => Err(format!(
                "{}: embedding has {} dimensions, this deployment stores {dim}",
                reason::EMBEDDING_DIMENSION,
                e.len()
            )),
            _ => Ok(()),
        }
    }

    /// The live memory `id` of `namespace`, or why there is none.
    fn live(&self, namespace: &str, id: Uuid, expected: Option<i64>) -> Result<Memory, String> {
        let memory = self
            .memories
            .get(&id)
            .filter(|m| m.namespace == namespace)
            .ok_or_else(|| {
                format!(
                    "{}: no memory {id} in namespace {namespace}",
                    reason::UNKNOWN_MEMORY
                )
            })?;
        if memory.forgotten_at.is_some() {
            return Err(format!("{}: memory {id} was forgotten", reason::FORGOTTEN));
        }
        if let Some(expected) = expected
            && expected != memory.version
        {
            return Err(format!(
                "{}: expected version {expected}, memory is at version {}",
                reason::VERSION_CONFLICT,
                memory.version
            ));
        }
        Ok(memory.clone())
    }

    fn owner(&self, namespace: &str, actor: &str) -> Result<(), String> {
        if actor != namespace {
            return Err(format!(
                "{}: {actor} does not own namespace {namespace}",
                reason::NOT_OWNER
            ));
        }
        Ok(())
    }

    fn decide(&mut self, d: &Decided) -> Decision {
        let at = d.record_time;
        let touch = |mut m: Memory, actor: &str| {
            m.version += 1;
            m.updated_at = at;
            m.actor = actor.to_owned();
            m.log_partition = d.partition;
            m.log_offset = d.offset;
            m
        };
        match &d.command {
            MemoryCommand::Write(c) => {
                let id = uuid(&c.memory_id);
                if self.memories.contains_key(&id) {
                    return Err(format!(
                        "{}: a memory with id {id} already exists",
                        reason::MEMORY_EXISTS
                    ));
                }
                self.check_dimensions(c.embedding.as_ref())?;
                Ok(Some(Memory {
                    memory_id: id,
                    namespace: c.namespace.clone(),
                    content: c.content.clone(),
                    tier: c.tier.as_str().to_owned(),
                    tags: c.tags.clone(),
                    metadata: serde_json::from_str(&c.metadata_json).unwrap_or_default(),
                    importance: c.importance,
                    expires_at: c.expires_at.and_then(time_ms),
                    embedding: c.embedding.clone(),
                    source: c.source.clone(),
                    version: 1,
                    actor: c.actor.clone(),
                    created_by: uuid(&c.command_id),
                    created_at: at,
                    updated_at: at,
                    forgotten_at: None,
                    log_partition: d.partition,
                    log_offset: d.offset,
                }))
            }
            MemoryCommand::Update(c) => {
                let mut m = self.live(&c.namespace, uuid(&c.memory_id), c.expected_version)?;
                self.check_dimensions(c.embedding.as_ref())?;
                if let Some(content) = &c.content {
                    m.content = content.clone();
                }
                if let Some(tier) = c.tier {
                    m.tier = tier.as_str().to_owned();
                }
                if let Some(tags) = &c.tags {
                    m.tags = tags.clone();
                }
                if let Some(metadata) = &c.metadata_json {
                    m.metadata = serde_json::from_str(metadata).unwrap_or_default();
                }
                if let Some(importance) = c.importance {
                    m.importance = importance;
                }
                if c.clear_expiry {
                    m.expires_at = None;
                } else if let Some(ms) = c.expires_at {
                    m.expires_at = time_ms(ms);
                }
                if let Some(embedding) = &c.embedding {
                    m.embedding = Some(embedding.clone());
                }
                Ok(Some(touch(m, &c.actor)))
            }
            MemoryCommand::Forget(c) => {
                let mut m = self.live(&c.namespace, uuid(&c.memory_id), c.expected_version)?;
                m.forgotten_at = Some(at);
                Ok(Some(touch(m, &c.actor)))
            }
            MemoryCommand::Share(c) => {
                self.owner(&c.namespace, &c.actor)?;
                let memory_id = c.memory_id.as_deref().map(uuid);
                if let Some(id) = memory_id {
                    self.live(&c.namespace, id, None)?;
                }
                let key = (c.namespace.clone(), memory_id, c.grantee.clone());
                // Sharing what is already shared changes nothing and is not an error.
                self.shares.entry(key).or_insert_with(|| ShareRow {
                    namespace: c.namespace.clone(),
                    memory_id,
                    grantee: c.grantee.clone(),
                    granted_by: c.actor.clone(),
                    command_id: uuid(&c.command_id),
                    granted_at: at,
                });
                Ok(None)
            }
            MemoryCommand::Revoke(c) => {
                self.owner(&c.namespace, &c.actor)?;
                let key = (
                    c.namespace.clone(),
                    c.memory_id.as_deref().map(uuid),
                    c.grantee.clone(),
                );
                if self.shares.remove(&key).is_none() {
                    return Err(format!(
                        "{}: {} has no such share",
                        reason::NO_SUCH_SHARE,
                        c.grantee
                    ));
                }
                Ok(None)
            }
            MemoryCommand::RegisterTool(c) => {
                let key = (c.namespace.clone(), c.name.clone());
                let version = self.tools.get(&key).map_or(1, |t| t.version + 1);
                self.tools.insert(
                    key.clone(),
                    ToolRow {
                        namespace: c.namespace.clone(),
                        name: c.name.clone(),
                        description: c.description.clone(),
                        usage: c.usage.clone(),
                        tags: c.tags.clone(),
                        version,
                        registered_by: c.actor.clone(),
                        command_id: uuid(&c.command_id),
                        updated_at: at,
                    },
                );
                self.changed_tools.insert(key);
                Ok(None)
            }
        }
    }

    fn memory_id_of(command: &MemoryCommand) -> Option<Uuid> {
        match command {
            MemoryCommand::Write(c) => Some(uuid(&c.memory_id)),
            MemoryCommand::Update(c) => Some(uuid(&c.memory_id)),
            MemoryCommand::Forget(c) => Some(uuid(&c.memory_id)),
            MemoryCommand::Share(c) => c.memory_id.as_deref().map(uuid),
            MemoryCommand::Revoke(c) => c.memory_id.as_deref().map(uuid),
            MemoryCommand::RegisterTool(_) => None,
        }
    }

    fn step(&mut self, d: &Decided) {
        let command_id = uuid(d.command.command_id());
        if !self.seen.insert(command_id) {
            self.out.duplicates += 1;
            return;
        }
        let decision = self.decide(d);
        let memory_id = Self::memory_id_of(&d.command);
        let trace_id = d
            .traceparent
            .as_deref()
            .and_then(memos_runtime::telemetry::trace_id_of)
            .map(str::to_owned);
        let (status, reason) = match &decision {
            Ok(_) => ("applied", None),
            Err(reason) => ("rejected", Some(reason.clone())),
        };
        match &decision {
            Ok(_) => self.out.applied += 1,
            Err(reason) => self.out.rejected.push((command_id, reason.clone())),
        }
        if let Some(id) = memory_id {
            let mut row = HistoryRow {
                memory_id: id,
                command_id,
                version: self.memories.get(&id).map_or(0, |m| m.version),
                operation: operation(&d.command).to_owned(),
                actor: d.command.actor().to_owned(),
                status: status.to_owned(),
                reason: reason.clone(),
                change: change_of(&d.command),
                state: None,
                log_partition: d.partition,
                log_offset: d.offset,
                record_time: d.record_time,
                trace_id,
                valid_from: None,
                valid_to: None,
            };
            if let Ok(Some(memory)) = &decision {
                row.version = memory.version;
                row.state = Some(history_state(memory));
                row.valid_from = Some(d.record_time);
                // The state this one replaces stops being current now.
                match self.open_row.get(&id) {
                    Some(&index) => self.out.changes.history[index].valid_to = Some(d.record_time),
                    None if self.before.contains(&id) && self.closed_before.insert(id) => {
                        self.out.changes.close_history.push((id, d.record_time));
                    }
                    None => {}
                }
                self.open_row.insert(id, self.out.changes.history.len());
            }
            self.out.changes.history.push(row);
        }
        if let Ok(Some(memory)) = decision {
            self.changed.insert(memory.memory_id);
            self.memories.insert(memory.memory_id, memory);
        }
        self.out.changes.commands.push(CommandRow {
            command_id,
            kind: d
                .command
                .kind()
                .full_name()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
            namespace: d.command.namespace().to_owned(),
            memory_id,
            actor: d.command.actor().to_owned(),
            status: status.to_owned(),
            reason,
            traceparent: d.traceparent.clone(),
            log_topic: self.config.topic.clone(),
            log_partition: d.partition,
            log_offset: d.offset,
            record_time: d.record_time,
        });
    }

    fn finish(mut self) -> Outcome {
        let changed: Vec<Uuid> = self.changed.iter().copied().collect();
        self.out.changes.memories = changed.iter().filter_map(|id| self.memories.remove(id)).collect();
        for (key, row) in &self.initial_shares {
            match self.shares.get(key) {
                Some(now) if now == row => {}
                _ => self.out.changes.shares_removed.push(key.clone()),
            }
        }
        let mut added: Vec<ShareRow> = self
            .shares
            .into_iter()
            .filter(|(key, row)| self.initial_shares.get(key) != Some(row))
            .map(|(_, row)| row)
            .collect();
        added.sort_by_key(|a| a.key());
        self.out.changes.shares_removed.sort();
        self.out.changes.shares_added = added;
        self.out.changes.tools = self
            .changed_tools
            .iter()
            .filter_map(|key| self.tools.get(key).cloned())
            .collect();
        self.out
    }
}

/// Decides `batch` (in log order) against `state`.
pub fn fold(state: State, batch: &[Decided], config: &FoldConfig) -> Outcome {
    let mut folder = Folder {
        config,
        seen: state.seen,
        before: state.memories.keys().copied().collect(),
        memories: state.memories,
        changed: BTreeSet::new(),
        open_row: HashMap::new(),
        closed_before: HashSet::new(),
        initial_shares: state.shares.clone(),
        shares: state.shares,
        tools: state.tools,
        changed_tools: BTreeSet::new(),
        out: Outcome::default(),
    };
    for decided in batch {
        folder.step(decided);
    }
    folder.finish()
}

#[cfg(test)]
mod tests {
    use memos_schemas::{ForgetMemory, Tier, UpdateMemory, WriteMemory};

    use super::*;

    const NS: &str = "agent-1";

    fn at(offset: i64) -> Decided {
        Decided {
            command: MemoryCommand::Forget(ForgetMemory {
                command_id: Uuid::new_v4().to_string(),
                namespace: NS.into(),
                actor: NS.into(),
                issued_at: 0,
                traceparent: None,
                memory_id: Uuid::nil().to_string(),
                expected_version: None,
                reason: None,
            }),
            partition: 0,
            offset,
            record_time: Utc
                .timestamp_millis_opt(1_790_000_000_000 + offset * 1000)
                .unwrap(),
            traceparent: None,
        }
    }

    fn write(offset: i64, memory: Uuid) -> Decided {
        Decided {
            command: MemoryCommand::Write(WriteMemory {
                command_id: Uuid::new_v4().to_string(),
                namespace: NS.into(),
                actor: NS.into(),
                issued_at: 0,
                traceparent: None,
                memory_id: memory.to_string(),
                content: format!("content at {offset}"),
                tier: Tier::Working,
                tags: vec![],
                metadata_json: "{}".into(),
                importance: 0.5,
                expires_at: None,
                embedding: None,
                source: None,
            }),
            ..at(offset)
        }
    }

    fn update(offset: i64, memory: Uuid, expected: Option<i64>, content: &str) -> Decided {
        Decided {
            command: MemoryCommand::Update(UpdateMemory {
                command_id: Uuid::new_v4().to_string(),
                namespace: NS.into(),
                actor: NS.into(),
                issued_at: 0,
                traceparent: None,
                memory_id: memory.to_string(),
                expected_version: expected,
                content: Some(content.into()),
                tier: None,
                tags: None,
                metadata_json: None,
                importance: None,
                expires_at: None,
                clear_expiry: false,
                embedding: None,
            }),
            ..at(offset)
        }
    }

    fn config() -> FoldConfig {
        FoldConfig {
            topic: "t".into(),
            embedding_dimensions: Some(3),
        }
    }

    #[test]
    fn commands_in_one_batch_apply_in_log_order() {
        let id = Uuid::new_v4();
        let batch = vec![
            write(0, id),
            update(1, id, Some(1), "second"),
            update(2, id, Some(1), "stale"),
        ];
        let outcome = fold(State::default(), &batch, &config());
        assert_eq!(outcome.applied, 2);
        assert_eq!(outcome.rejected.len(), 1);
        assert!(outcome.rejected[0].1.starts_with(reason::VERSION_CONFLICT));
        let memory = &outcome.changes.memories[0];
        assert_eq!((memory.version, memory.content.as_str()), (2, "second"));
        let history = &outcome.changes.history;
        assert_eq!(history.len(), 3);
        assert_eq!(history[0].valid_to, history[1].valid_from, "states chain");
        assert_eq!(history[1].valid_to, None);
        assert_eq!(history[2].status, "rejected");
    }

    #[test]
    fn the_same_batch_always_decides_the_same() {
        let id = Uuid::new_v4();
        let batch = vec![write(0, id), update(1, id, None, "x"), write(2, id)];
        let a = fold(State::default(), &batch, &config());
        let b = fold(State::default(), &batch, &config());
        assert_eq!(a.changes.memories, b.changes.memories);
        assert_eq!(a.changes.history, b.changes.history);
        assert_eq!(a.changes.commands, b.changes.commands);
        assert!(a.rejected[0].1.starts_with(reason::MEMORY_EXISTS));
    }

    #[test]
    fn a_command_id_seen_before_is_a_no_op() {
        let id = Uuid::new_v4();
        let first = write(0, id);
        let mut again = write(1, Uuid::new_v4());
        again.command = first.command.clone();
        let mut state = State::default();
        let outcome = fold(state.clone(), &[first.clone(), again], &config());
        assert_eq!((outcome.applied, outcome.duplicates), (1, 1));
        state
            .seen
            .insert(Uuid::parse_str(first.command.command_id()).unwrap());
        let replay = fold(state, &[first], &config());
        assert_eq!((replay.applied, replay.duplicates), (0, 1));
        assert!(replay.changes.memories.is_empty() && replay.changes.commands.is_empty());
    }

    #[test]
    fn changes_to_earlier_states_close_their_open_history_once() {
        let id = Uuid::new_v4();
        let first = fold(State::default(), &[write(0, id)], &config());
        let mut state = State::default();
        state.memories.insert(id, first.changes.memories[0].clone());
        let batch = vec![update(1, id, Some(1), "a"), update(2, id, Some(2), "b")];
        let outcome = fold(state, &batch, &config());
        assert_eq!(outcome.changes.close_history, vec![(id, batch[0].record_time)]);
        assert_eq!(outcome.changes.memories[0].version, 3);
    }

    #[test]
    fn wrong_embedding_dimension_is_rejected() {
        let id = Uuid::new_v4();
        let mut w = write(0, id);
        if let MemoryCommand::Write(c) = &mut w.command {
            c.embedding = Some(vec![1.0; 4]);
        }
        let outcome = fold(State::default(), &[w], &config());
        assert!(outcome.rejected[0].1.starts_with(reason::EMBEDDING_DIMENSION));
        assert!(outcome.changes.memories.is_empty());
    }
}
