//! PostgreSQL adapters: the pool and migrations, the projection offset store, and the memory
//! views (batch apply and queries).
//!
//! - [`pool`]: connect and migrate (sqlx migrations in `connectors/postgres/migrations`).
//! - [`offsets`]: the next offset per projection and partition.
//! - [`memories`]: applying a batch of memory commands, and reading the memory views.

pub mod memories;
pub mod offsets;
pub mod pool;

pub use memories::{MemoryView, WriteRow};
pub use pool::{connect, migrate};
