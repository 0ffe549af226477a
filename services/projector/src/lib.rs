//! The projector: folds the memory command log, and the orchestrator's task events, into the
//! PostgreSQL and Redis views.
//!
//! Guarantee (exactly-once effects): the view rows of a batch and the next offsets of its
//! partitions are written in one PostgreSQL transaction, and on every assignment the
//! consumer seeks to those stored offsets; the Kafka group commit only reports progress.
//! A record that cannot be decoded or validated, or whose values PostgreSQL refuses to store,
//! is dead-lettered (acknowledged by the broker before the offset moves past it), and the
//! partition keeps flowing. A failing PostgreSQL, Redis or broker pauses the loop with
//! backoff; offsets never move past an unapplied record. See `docs/projector.md`.
//!
//! - [`consumer`]: the Kafka consumer that seeks to stored offsets on assignment.
//! - [`fold`]: the pure, deterministic decision of a batch of memory commands.
//! - [`batch`]: one unit of work: decode, dead-letter, apply, cache.
//! - [`isolate`]: transient failures retried, records PostgreSQL refuses bisected out.
//! - [`lag`]: measures consumer lag from the broker's end offsets and the applied positions.
//! - [`worker`]: the loop that takes batches adaptively and drives [`batch`].
//! - [`tasks`]: the task-event projection (agents, tasks, workflows, inboxes), same guarantee.

pub mod batch;
pub mod consumer;
pub mod fold;
pub mod isolate;
pub mod lag;
pub mod tasks;
pub mod worker;

pub use tasks::TaskProjector;
pub use worker::Projector;

/// The name under which this projection stores its offsets.
pub const MEMORY_PROJECTION: &str = "memory";

/// Every error class a projection's dead letters carry (metric label `reason`): the
/// decoder's, `empty` (no value) and [`isolate::UNSTORABLE`].
pub fn dead_letter_classes() -> impl Iterator<Item = &'static str> {
    memos_schemas::DecodeError::CLASSES
        .iter()
        .copied()
        .chain(["empty", isolate::UNSTORABLE])
}
