//! Redis adapters: the hot copy of the memory views.
//!
//! - [`hot`]: memory documents keyed by id, written with a log-position guard.

pub mod hot;

pub use hot::HotViews;
