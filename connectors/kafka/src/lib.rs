//! Kafka adapters: client configuration, topic administration, the command producer, the
//! dead-letter writer, and the header names every memOS record carries.
//!
//! - [`client`]: librdkafka configuration shared by every client, raw properties passed through.
//! - [`admin`]: creates missing topics with their retention (command topics keep everything).
//! - [`producer`]: idempotent `acks=all` producer; a send returns only once the broker acked.
//! - [`dlq`]: writes a record that cannot be applied to the dead-letter topic with its origin.
//! - [`headers`]: header names.
//! - [`keys`]: the keys log: append, read whole, follow into a shared key ring.

pub mod admin;
pub mod client;
pub mod dlq;
pub mod headers;
pub mod keys;
pub mod producer;

pub use producer::{CommandProducer, Delivered, ProduceError};
