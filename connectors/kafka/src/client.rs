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
