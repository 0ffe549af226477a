//! Redis adapters: the hot copies of the memory and task views.
//!
//! - [`breaker`]: the circuit breaker that makes reads skip a Redis that cannot answer.
//! - [`hot`]: memory documents keyed by id, written with a log-position guard.
//! - [`tasks`]: each agent's task inbox and availability, written with a revision guard.

pub mod breaker;
pub mod hot;
pub mod tasks;

pub use hot::HotViews;
