//! PostgreSQL adapters: the pool and migrations, the projection offset store, the memory
//! views and the task views (batch apply and queries).
//!
//! - [`pool`]: connect and migrate (sqlx migrations in `connectors/postgres/migrations`).
//! - [`errors`]: whether a failure is transient (retry) or caused by a value (isolate).
//! - [`offsets`]: the next offset per projection and partition.
//! - [`memories`]: the view rows, loading a batch's state and writing its decisions.
//! - [`queries`]: what the API reads, always within what the asking agent may read.
//! - [`tasks`]: agents, tasks, workflows, templates and the task-event audit trail.
//! - [`bulk`]: a rebuild's fresh schema, index handling and `COPY` encoding of view rows.
//! - [`compare`]: row counts, checksums and differing keys of two schemas' views.

pub mod bulk;
pub mod compare;
pub mod errors;
pub mod memories;
pub mod offsets;
pub mod pool;
pub mod queries;
pub mod tasks;

pub use memories::Memory;
pub use pool::{connect, migrate};
