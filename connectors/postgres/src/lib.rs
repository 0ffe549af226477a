//! PostgreSQL adapters: the pool and migrations, the projection offset store, and the memory
//! views (batch apply and queries).
//!
//! - [`pool`]: connect and migrate (sqlx migrations in `connectors/postgres/migrations`).
//! - [`offsets`]: the next offset per projection and partition.
//! - [`memories`]: the view rows, loading a batch's state and writing its decisions.
//! - [`queries`]: what the API reads, always within what the asking agent may read.

pub mod memories;
pub mod offsets;
pub mod pool;
pub mod queries;

pub use memories::Memory;
pub use pool::{connect, migrate};
