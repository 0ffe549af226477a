//! The keys log (`topics.keys`): one partition of [`KeyEvent`]s, kept forever, keyed by key
//! id. [`append`] writes an event and returns once the broker acknowledged it (`acks=all`);
//! [`read_all`] folds the whole log (for `memosctl keys list`); [`follow`] keeps a shared
//! [`KeyRing`] equal to the log in a background thread, so a revocation reaches a running
//! API process as soon as the broker delivers it. Until the follower has read to the end of
//! the log once, [`Followed::caught_up`] is false and keys cannot be trusted to be known.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use memos_runtime::Config;
use memos_runtime::keys::{KeyEvent, KeyRing};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::CommandProducer;
use crate::client::{ReadsToEnd, base_config};

/// Appends `event` to the keys log.
pub async fn append(producer: &CommandProducer, config: &Config, event: &KeyEvent) -> anyhow::Result<()> {
    producer
        .send(&config.topics.keys, event.key_id(), &event.encode(), &[])
        .await
        .context("append to the keys log")?;
    Ok(())
}

fn reader(config: &Config, suffix: &str) -> anyhow::Result<BaseConsumer<ReadsToEnd>> {
    let mut client = base_config(&config.kafka, suffix);
    client
        .set("group.id", format!("{}-keys", config.kafka.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // A revocation is read as soon as it is appended, not at the next fetch timeout.
        .set("fetch.wait.max.ms", "50");
    let consumer: BaseConsumer<ReadsToEnd> = client
        .create_with_context(ReadsToEnd)
        .context("create the keys reader")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&config.topics.keys, 0, Offset::Beginning)?;
    consumer.assign(&tpl).context("assign the keys log")?;
    Ok(consumer)
}

fn fold(ring: &RwLock<KeyRing>, payload: Option<&[u8]>, offset: i64) {
    match payload.map(KeyEvent::decode) {
        Some(Ok(event)) => ring.write().expect("key ring lock").apply(&event),
        Some(Err(e)) => tracing::warn!(offset, error = %e, "undecodable key event skipped"),
        None => {}
    }
}

/// Every key the log holds, read to its end (blocking; run off the async workers).
pub fn read_all(config: &Config, timeout: Duration) -> anyhow::Result<KeyRing> {
    let consumer = reader(config, "keys-list")?;
    let ring = RwLock::new(KeyRing::new());
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => fold(&ring, message.payload(), message.offset()),
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e).context("read the keys log"),
            None => anyhow::ensure!(
                Instant::now() < deadline,
                "the keys log {} was not read to its end within {timeout:?}",
                config.topics.keys
            ),
        }
    }
    Ok(ring.into_inner().expect("key ring lock"))
}

/// A key ring kept equal to the log by [`follow`].
#[derive(Clone, Default)]
pub struct Followed {
    pub ring: Arc<RwLock<KeyRing>>,
    caught_up: Arc<AtomicBool>,
}

impl Followed {
    /// Whether the follower has read the whole log once.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Waits until the follower has read the whole log once, or `timeout` passed; whether
    /// it has.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.caught_up() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.caught_up()
    }
}

/// Follows the keys log until `shutdown`, in a thread of its own; errors are logged and
/// the reader recreated (the ring keeps what it had: keys do not vanish on a broker outage,
/// and revocations apply as soon as the broker is back).
pub fn follow(config: Arc<Config>, shutdown: CancellationToken) -> Followed {
    let followed = Followed::default();
    let shared = followed.clone();
    std::thread::Builder::new()
        .name("keys-follower".into())
        .spawn(move || {
            let mut next = 0i64;
            while !shutdown.is_cancelled() {
                let consumer = match reader(&config, "keys-follower") {
                    Ok(consumer) => consumer,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "keys log reader failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                let mut tpl = TopicPartitionList::new();
                if tpl
                    .add_partition_offset(&config.topics.keys, 0, Offset::Offset(next))
                    .is_err()
                    || consumer.assign(&tpl).is_err()
                {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                while !shutdown.is_cancelled() {
                    match consumer.poll(Duration::from_millis(200)) {
                        Some(Ok(message)) => {
                            fold(&shared.ring, message.payload(), message.offset());
                            next = message.offset() + 1;
                        }
                        Some(Err(KafkaError::PartitionEOF(_))) => {
                            shared.caught_up.store(true, Ordering::Release);
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "reading the keys log failed; reconnecting");
                            break;
                        }
                        None => {}
                    }
                }
            }
        })
        .expect("spawn the keys follower");
    followed
}
