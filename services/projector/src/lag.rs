//! Consumer lag, measured rather than estimated: every interval, for each assigned partition,
//! the log end offset (from the broker) minus the next offset to apply (from [`Positions`],
//! which moves only when a batch commits). It stays correct while the projector is paused on
//! a failing dependency, because it does not depend on the consumer fetching.

use std::time::Duration;

use memos_runtime::config::KafkaConfig;
use memos_runtime::metrics as m;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::consumer::Positions;

/// Spawns the monitor thread; it ends when `shutdown` is cancelled.
pub fn spawn(
    kafka: &KafkaConfig,
    group: String,
    topic: String,
    positions: Positions,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let client: BaseConsumer = memos_kafka::client::base_config(kafka, "lag").create()?;
    Ok(std::thread::Builder::new().name("memos-lag".into()).spawn(move || {
        while !shutdown.is_cancelled() {
            let snapshot: Vec<(i32, i64)> =
                positions.lock().expect("positions lock").iter().map(|(p, o)| (*p, *o)).collect();
            for (partition, next) in snapshot {
                match client.fetch_watermarks(&topic, partition, Duration::from_secs(5)) {
                    Ok((low, high)) => {
                        let lag = (high - next.max(low)).max(0);
                        metrics::gauge!(m::CONSUMER_LAG, "group" => group.clone(), "topic" => topic.clone(), "partition" => partition.to_string())
                            .set(lag as f64);
                    }
                    Err(e) => tracing::debug!(error = %e, partition, "cannot fetch watermarks"),
                }
            }
            let deadline = std::time::Instant::now() + interval;
            while !shutdown.is_cancelled() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })?)
}
