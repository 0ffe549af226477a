//! librdkafka configuration shared by every memOS client.

use memos_runtime::config::KafkaConfig;
use rdkafka::ClientConfig;

/// Base configuration: brokers, client id, then the operator's raw properties, which win.
pub fn base_config(kafka: &KafkaConfig, client_suffix: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", format!("{}-{client_suffix}", kafka.client_id))
        .set("log_level", "4");
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Context of a consumer that reads partitions to their end with `enable.partition.eof`:
/// librdkafka reports each end of partition through the error callback too, which the
/// default context logs at ERROR on every normal start. The end is read from `poll` as
/// `KafkaError::PartitionEOF`; every other error is logged as the default context does.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadsToEnd;

impl rdkafka::ClientContext for ReadsToEnd {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!(%error, reason, "librdkafka error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReadsToEnd {}
