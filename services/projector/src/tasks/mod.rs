//! The task-event projection: folds the orchestrator's decisions (`memos.task.events`) into
//! the task views in PostgreSQL (agents, tasks, workflows, templates, the event audit trail)
//! and each agent's inbox and availability in Redis.
//!
//! Guarantee (exactly-once effects): a batch's rows and the next offsets of its partitions
//! are written in one PostgreSQL transaction by its own consumer group
//! (`<projector.group_id>-tasks`, read_committed, so aborted orchestrator transactions are
//! never seen), and on every assignment the consumer seeks to those stored offsets. Redis is
//! written after the commit from a snapshot of PostgreSQL (never incrementally), guarded by
//! a per-agent revision, and an agent whose newest revision has not reached Redis is
//! rewritten when the projection starts: a crash or restart at any point leaves Redis equal
//! to PostgreSQL. Undecodable records are dead-lettered with their origin.
//!
//! - [`fold`]: the pure, deterministic application of a batch of events to the rows.
//! - [`batch`]: one unit of work: decode, dead-letter, apply, cache.
//! - [`worker`]: the loop that takes batches and drives [`batch`].

pub mod batch;
pub mod fold;
pub mod worker;

pub use worker::TaskProjector;

/// The name under which this projection stores its offsets.
pub const TASK_PROJECTION: &str = "tasks";
