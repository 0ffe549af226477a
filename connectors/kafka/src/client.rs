//! librdkafka configuration shared by every memOS client.
//!
//! [`base_config`] is the one place a client's configuration starts: every producer,
//! consumer and admin client memOS creates (the API's producer and keys follower, the
//! projector's consumers and dead-letter producer, the orchestrator's consumers and
//! transactional producer, `memosctl`'s readers and admin clients) is built from it, so all
//! of them connect with `kafka.security_protocol` and authenticate as `kafka.sasl`'s
//! principal. The broker's ACLs then apply to that principal (see `docs/security.md`).

use memos_runtime::config::KafkaConfig;
use rdkafka::ClientConfig;

/// Base configuration: brokers, client id, security protocol and SASL credentials, then the
/// operator's raw properties, which win.
pub fn base_config(kafka: &KafkaConfig, client_suffix: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", format!("{}-{client_suffix}", kafka.client_id))
        .set("log_level", "4")
        .set("security.protocol", kafka.security_protocol.librdkafka());
    if let Some(sasl) = &kafka.sasl {
        config
            .set("sasl.mechanism", sasl.mechanism.librdkafka())
            .set("sasl.username", &sasl.username)
            .set("sasl.password", sasl.password.expose());
    }
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

#[cfg(test)]
mod tests {
    use memos_runtime::config::{SaslConfig, SaslMechanism, Secret, SecurityProtocol};

    use super::*;

    #[test]
    fn every_client_carries_the_principal() {
        let mut kafka = memos_runtime::Config::default().kafka;
        let plain = base_config(&kafka, "t");
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.username"), None);

        kafka.security_protocol = SecurityProtocol::SaslPlaintext;
        kafka.sasl = Some(SaslConfig {
            mechanism: SaslMechanism::ScramSha512,
            username: "memos-api".into(),
            password: Secret::new("pw"),
        });
        let config = base_config(&kafka, "t");
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("memos-api"));
        assert_eq!(config.get("sasl.password"), Some("pw"));
        // librdkafka accepts the combination (it refuses SCRAM when built without TLS).
        let _: rdkafka::producer::BaseProducer = config.create().expect("a SCRAM client");

        kafka.properties.insert("sasl.mechanism".into(), "PLAIN".into());
        assert_eq!(
            base_config(&kafka, "t").get("sasl.mechanism"),
            Some("PLAIN"),
            "raw properties win"
        );
    }
}
