//! What every memOS process shares: typed layered configuration, logging, and shutdown.
//!
//! - [`config`]: defaults, then a TOML file, then environment; unknown keys are errors.
//! - [`telemetry`]: JSON log lines with trace ids, OpenTelemetry traces over OTLP.
//! - [`metrics`]: the catalogue of Prometheus metrics and the recorder that exports them.
//! - [`shutdown`]: one cancellation token tripped by SIGINT or SIGTERM.
//! - [`keys`]: API keys, the principals and roles they stand for, and their log.

pub mod config;
pub mod keys;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, Secret};
