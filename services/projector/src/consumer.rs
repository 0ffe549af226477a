//! A Kafka consumer whose positions come from PostgreSQL. On every (incremental) assignment
//! the rebalance callback reads the stored next offsets of the projection and assigns the
//! partitions at exactly those offsets (the beginning of the log when none is stored), so a
//! restart, a crash or a rebalance resumes after the last committed transaction, never at
//! the group's committed offset.
//!
//! Precondition: the consumer is polled from a thread outside the tokio runtime (the
//! callback blocks on the database through the runtime handle).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memos_runtime::config::{KafkaConfig, ProjectorConfig};
use memos_runtime::metrics::{self as m, observe};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;

/// Next offset to apply per assigned partition: set from PostgreSQL on assignment, moved
/// forward after each committed batch, removed on revocation. The lag monitor reads it.
pub type Positions = Arc<Mutex<BTreeMap<i32, i64>>>;

/// Rebalance handling that seeks to the offsets stored with the views.
pub struct SeekToStored {
    pub pool: PgPool,
    pub handle: Handle,
    pub projection: String,
    pub group: String,
    pub positions: Positions,
}

impl ClientContext for SeekToStored {}

impl SeekToStored {
    /// Stored offsets of every topic in `tpl`, retried until PostgreSQL answers: assigning
    /// at a guessed offset could skip or repeat records.
    fn set_stored_offsets(&self, tpl: &mut TopicPartitionList) {
        let topics: std::collections::BTreeSet<String> =
            tpl.elements().iter().map(|e| e.topic().to_owned()).collect();
        for topic in topics {
            let mut backoff = Duration::from_millis(100);
            let stored = loop {
                let load = memos_postgres::offsets::load(&self.pool, &self.projection, &topic);
                let load = observe(m::POSTGRES_SECONDS, m::POSTGRES_ERRORS, "load_offsets", load);
                match self.handle.block_on(load) {
                    Ok(stored) => break stored,
                    Err(e) => {
                        tracing::warn!(error = %e, %topic, "cannot read stored offsets; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let partitions: Vec<i32> = tpl
                .elements_for_topic(&topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            for partition in partitions {
                let offset = stored
                    .get(&partition)
                    .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                let position = stored.get(&partition).copied().unwrap_or(0);
                self.positions
                    .lock()
                    .expect("positions lock")
                    .insert(partition, position);
                if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                    tracing::error!(error = %e, %topic, partition, "cannot set assignment offset");
                }
                tracing::info!(%topic, partition, ?offset, "partition assigned");
            }
        }
    }
}

impl ConsumerContext for SeekToStored {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(m::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "assign")
                    .increment(1);
                self.set_stored_offsets(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(m::CONSUMER_REBALANCES, "group" => self.group.clone(), "kind" => "revoke")
                    .increment(1);
                for e in tpl.elements() {
                    tracing::info!(topic = e.topic(), partition = e.partition(), "partition revoked");
                    self.positions
                        .lock()
                        .expect("positions lock")
                        .remove(&e.partition());
                    // Another member reports this partition's lag from now on.
                    metrics::gauge!(m::CONSUMER_LAG, "group" => self.group.clone(), "topic" => e.topic().to_owned(), "partition" => e.partition().to_string()).set(0.0);
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                if cooperative { Ok(()) } else { consumer.unassign() }
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply rebalance");
        }
        let assigned = self.positions.lock().expect("positions lock").len();
        metrics::gauge!(m::CONSUMER_ASSIGNED, "group" => self.group.clone()).set(assigned as f64);
    }
}

/// A consumer in `group_id`, cooperative-sticky, auto-commit off, read_committed, positions
/// from PostgreSQL.
pub fn create(
    kafka: &KafkaConfig,
    projector: &ProjectorConfig,
    group_id: &str,
    context: SeekToStored,
) -> KafkaResult<BaseConsumer<SeekToStored>> {
    let mut config = memos_kafka::client::base_config(kafka, "projector");
    let session_ms = projector.session_timeout.as_millis();
    config
        .set("group.id", group_id)
        .set("session.timeout.ms", session_ms.to_string())
        .set("heartbeat.interval.ms", (session_ms / 3).max(100).to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        // Bounded prefetch: the projector applies in batches, so a few MiB of read-ahead keep
        // it busy; librdkafka's 64 MiB default would dominate its memory with a backlog.
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608");
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config.create_with_context(context)
}
