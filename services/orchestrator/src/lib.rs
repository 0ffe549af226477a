//! The orchestrator: the decider for tasks. It reads task commands and writes the decisions
//! (task events) exactly once.
//!
//! Guarantee (exactly once): commands are read with `isolation.level=read_committed` in a
//! consumer group; the events decided for a batch, the ticks, dead letters and the batch's
//! next offsets (with the group metadata, so a fenced member cannot commit) go in one Kafka
//! transaction. A crash before the commit aborts the transaction: the commands are read
//! again and decided again from the same state. The state is the fold of
//! `memos.task.events`, rebuilt at start and on every newly assigned partition before any
//! command of it is decided. Precondition: the events topic has the partition count of the
//! commands topic (an event goes to the partition of its command, so each events partition
//! has one writer: the owner of the command partition).
//!
//! Time: decisions never read the wall clock. Each partition has a clock, the largest trusted
//! record time of its commands (the broker's append time: the command topics are
//! `LogAppendTime`; a producer's `CreateTime` is bounded by this host's clock, and a record
//! that does not decode moves nothing); the owner appends a `Tick` command to each of its partitions
//! every tick interval, so timeouts and agent liveness are decided when a recorded tick (or
//! any command) says the time has come. The decisions are recorded as events, and a rebuild
//! folds the events, never re-decides.
//!
//! - [`state`]: the state and its pure fold over events.
//! - [`decide`]: commands and time in, events out (pure).
//! - [`worker`]: the transactional Kafka loop around them.

pub mod decide;
pub mod state;
pub mod worker;

pub use worker::Orchestrator;
