//! The HTTP API: validates and appends commands, serves the views.
//!
//! Guarantee (durable before acknowledged): a write answers `202` only after the broker
//! acknowledged the append with `acks=all`; the answer carries the command id and the
//! record's partition and offset. Every error is a JSON body `{code, message, field?}` with a
//! 4xx or 5xx status; database and broker internals never reach the client.
//!
//! - [`auth`]: who is asking: API keys or JWTs, the actor and the reader from the principal.
//! - [`commands`]: appending commands; their status.
//! - [`consistency`]: read-your-writes with position tokens.
//! - [`edge`]: the bounds every request meets first: timeouts, concurrency, parameters.
//! - [`error`]: the error body and its status codes.
//! - [`jwt`]: JWT bearer tokens from an identity provider: verification and principal.
//! - [`limits`]: request rate and concurrency per principal (`429`).
//! - [`memories`]: memory commands and memory queries.
//! - [`registry`]: shares and the tool registry.
//! - [`server`]: the router, the listener and graceful shutdown.
//! - [`tasks`]: agents, tasks, workflow templates and workflows: commands and queries.

pub mod auth;
pub mod commands;
pub mod consistency;
pub mod edge;
pub mod error;
pub mod jwt;
pub mod limits;
pub mod memories;
pub mod registry;
pub mod server;
pub mod tasks;

pub use server::{Api, AppState};
