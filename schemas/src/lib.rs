//! memOS wire contracts: the Avro schemas in `schemas/avro/`, the Rust types they map to, and
//! the single-object framing that lets any record name its exact writer schema.
//!
//! Guarantee: every schema version ever released is compiled into [`registry`], so a record
//! written with any of them decodes (resolved to the current reader schema) for as long as
//! this crate lives.
//!
//! - [`fingerprint`]: CRC-64-AVRO over the Parsing Canonical Form, as the Avro spec defines it.
//! - [`single_object`]: the `C3 01` + fingerprint + body framing.
//! - [`registry`]: released schemas by fingerprint, and the reader schema of each command.
//! - [`memory`]: memory commands (`WriteMemory`, ...) and their codec.
//! - [`task`]: task commands (`DelegateTask`, ...), the orchestrator's `TaskEvent`, their codec.
//! - [`validate`]: validation to what the views can store, shared by the API and the decoders.

pub mod fingerprint;
pub mod memory;
pub mod registry;
pub mod single_object;
pub mod task;
pub mod validate;

pub use memory::{
    ForgetMemory, MemoryCommand, RegisterTool, RevokeShare, ShareMemory, Tier, UpdateMemory, WriteMemory,
};
pub use registry::DecodeError;
