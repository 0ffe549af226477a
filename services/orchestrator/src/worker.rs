//! The transactional loop. One iteration: fold the events other instances committed, take a
//! batch of commands, decide them (and what time and the other events call for) into events,
//! and commit events, ticks, dead letters and the batch's next offsets in one Kafka
//! transaction. Any Kafka error ends the attempt: the open transaction is aborted and the
//! loop starts again from a state rebuilt from the events topic, so nothing decided in an
//! aborted transaction survives anywhere. See the crate documentation for the guarantee.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use memos_kafka::admin::dead_letter_max_bytes;
use memos_kafka::client::{ReadsToEnd, base_config};
use memos_kafka::dlq::{self, DeadLetter, LETTER_OVERHEAD_BYTES};
use memos_runtime::Config;
use memos_runtime::metrics as m;
use memos_schemas::task::{TaskCommand, TaskEvent, TaskEventType, Tick};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::decide::{Rules, decide, reconcile};
use crate::state::{AgentStatus, State};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest time a batch is collected once its first command arrived: under a steady stream
/// the local queue is rarely empty, and waiting for `max_batch_records` would add its
/// collection time to the latency of every command.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// The orchestrator role: runs [`run_once`] until stopped, restarting it after errors.
pub struct Orchestrator {
    config: Arc<Config>,
    shutdown: CancellationToken,
}

impl Orchestrator {
    pub fn new(config: Arc<Config>, shutdown: CancellationToken) -> Self {
        Orchestrator { config, shutdown }
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || supervise(&self.config, &self.shutdown)).await?
    }
}

fn supervise(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match run_once(config, shutdown) {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                tracing::info!(error = %format!("{e:#}"), "orchestrator stopped");
                return Ok(());
            }
            Err(e) => {
                metrics::counter!(m::ORCHESTRATOR_RESTARTS).increment(1);
                tracing::error!(error = %format!("{e:#}"), ?backoff, "orchestrator failed; rebuilding state and restarting");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Partition assignments and revocations seen in the command consumer's rebalance callback,
/// handled by the loop after the poll that ran it.
#[derive(Default)]
struct Ownership {
    changes: Mutex<Vec<(bool, Vec<i32>)>>,
}

impl ClientContext for Ownership {}

impl ConsumerContext for Ownership {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (assigned, tpl) = match rebalance {
            Rebalance::Assign(tpl) => (true, tpl),
            Rebalance::Revoke(tpl) => (false, tpl),
            Rebalance::Error(e) => {
                tracing::error!(error = %e, "rebalance error");
                return;
            }
        };
        let partitions = tpl.elements().iter().map(|e| e.partition()).collect();
        self.changes
            .lock()
            .expect("ownership lock")
            .push((assigned, partitions));
    }
}

/// Offsets of the events this instance's producer wrote, from the delivery reports.
#[derive(Default)]
struct Deliveries {
    events_topic: String,
    next: Mutex<HashMap<i32, i64>>,
    failed: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) if message.topic() == self.events_topic => {
                let mut next = self.next.lock().expect("deliveries lock");
                let entry = next.entry(message.partition()).or_insert(0);
                *entry = (*entry).max(message.offset() + 1);
            }
            Ok(_) => {}
            Err((e, _)) => {
                *self.failed.lock().expect("deliveries lock") = Some(e.to_string());
            }
        }
    }
}

/// Counts of one transaction's decisions; published only when it commits, so an aborted
/// and re-decided batch is not counted twice.
#[derive(Default)]
struct Tally {
    commands: HashMap<(&'static str, &'static str), u64>,
    events: HashMap<&'static str, u64>,
    dead_letters: HashMap<&'static str, u64>,
    completions: Vec<f64>,
}

impl Tally {
    fn publish(self, commands_topic: &str) {
        for ((kind, outcome), n) in self.commands {
            metrics::counter!(m::ORCHESTRATOR_COMMANDS, "type" => kind, "outcome" => outcome).increment(n);
        }
        for (kind, n) in self.events {
            metrics::counter!(m::ORCHESTRATOR_EVENTS, "type" => kind).increment(n);
        }
        for (class, n) in self.dead_letters {
            metrics::counter!(m::DLQ_RECORDS, "source" => commands_topic.to_owned(), "reason" => class)
                .increment(n);
        }
        for seconds in self.completions {
            metrics::histogram!(m::ORCHESTRATOR_TASK_COMPLETION_SECONDS).record(seconds);
        }
    }
}

/// Everything one attempt holds; dropped (consumers leave the group) when it ends.
struct Worker<'a> {
    config: &'a Config,
    rules: Rules,
    state: State,
    commands: BaseConsumer<Ownership>,
    reader: BaseConsumer,
    producer: BaseProducer<Deliveries>,
    /// Owned command partitions (caught up) and when a tick was last appended to each.
    owned: BTreeMap<i32, Instant>,
    /// Per events partition, the first offset the reader must fold: events below it were
    /// decided here and are already in the state. `i64::MAX` while the partition is owned.
    fold_from: HashMap<i32, i64>,
    /// Per events partition, the offset after the last event folded from the log.
    folded_next: HashMap<i32, i64>,
    clocks: HashMap<i32, i64>,
    /// What the open transaction decided, counted in the metrics once it commits.
    tally: Tally,
    partitions: i32,
}

fn run_once(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<()> {
    register_series();
    let mut worker = Worker::new(config)?;
    worker.rebuild(shutdown)?;
    worker
        .commands
        .subscribe(&[&config.topics.task_commands])
        .context("subscribe to task commands")?;
    tracing::info!(
        agents = worker.state.agents.len(),
        tasks = worker.state.tasks.len(),
        "orchestrator state rebuilt; joining the group"
    );
    while !shutdown.is_cancelled() {
        if let Err(e) = worker.iteration() {
            let _ = worker.producer.abort_transaction(KAFKA_TIMEOUT);
            metrics::counter!(m::ORCHESTRATOR_TRANSACTIONS, "outcome" => "aborted").increment(1);
            return Err(e);
        }
    }
    Ok(())
}

impl<'a> Worker<'a> {
    fn new(config: &'a Config) -> anyhow::Result<Self> {
        let orchestrator = &config.orchestrator;
        let session_ms = orchestrator.session_timeout.as_millis();
        let mut consumer = base_config(&config.kafka, "orchestrator");
        consumer
            .set("group.id", &orchestrator.group_id)
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", (session_ms / 3).max(100).to_string())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            // A commit (not an append) makes transactional records readable, and the broker
            // does not end a waiting fetch for it: a long fetch wait would be added to the
            // latency of every command behind a tick.
            .set("fetch.wait.max.ms", "10");
        for (key, value) in &config.kafka.properties {
            consumer.set(key, value);
        }
        let commands: BaseConsumer<Ownership> = consumer
            .create_with_context(Ownership::default())
            .context("create the command consumer")?;

        let mut reader = base_config(&config.kafka, "orchestrator-reader");
        reader
            .set("group.id", format!("{}-reader", orchestrator.group_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10");
        let reader: BaseConsumer = reader.create().context("create the events reader")?;

        let mut producer = base_config(&config.kafka, "orchestrator-producer");
        producer
            .set(
                "transactional.id",
                format!("{}-{}", orchestrator.group_id, instance_id(config)),
            )
            .set(
                "transaction.timeout.ms",
                orchestrator.transaction_timeout.as_millis().to_string(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            // The coordinator answers CONCURRENT_TRANSACTIONS while it still writes the
            // previous commit's markers; librdkafka's default 100 ms retry backoff would then
            // be added to every other transaction.
            .set("retry.backoff.ms", "5")
            // Dead letters may be as large as the dead-letter topic accepts (see `dead_letter`).
            .set(
                "message.max.bytes",
                dead_letter_max_bytes(&config.topics).to_string(),
            );
        for (key, value) in &config.kafka.properties {
            producer.set(key, value);
        }
        let producer: BaseProducer<Deliveries> = producer
            .create_with_context(Deliveries {
                events_topic: config.topics.task_events.clone(),
                ..Deliveries::default()
            })
            .context("create the transactional producer")?;
        // Fences an earlier incarnation of this instance and aborts its open transaction.
        producer
            .init_transactions(KAFKA_TIMEOUT)
            .context("init transactions")?;

        let partitions = partition_count(&reader, &config.topics.task_events)?;
        let command_partitions = partition_count(&reader, &config.topics.task_commands)?;
        anyhow::ensure!(
            partitions == command_partitions,
            "{} has {partitions} partitions but {} has {command_partitions}: they must match",
            config.topics.task_events,
            config.topics.task_commands
        );
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&config.topics.task_events, p, Offset::Beginning)?;
        }
        reader.assign(&tpl).context("assign the events partitions")?;
        let heartbeat_window_ms = orchestrator.heartbeat_window.as_millis() as i64;
        Ok(Worker {
            config,
            rules: Rules::for_max_message_bytes(heartbeat_window_ms, config.topics.max_message_bytes),
            state: State::new(),
            commands,
            reader,
            producer,
            owned: BTreeMap::new(),
            fold_from: HashMap::new(),
            folded_next: HashMap::new(),
            clocks: HashMap::new(),
            tally: Tally::default(),
            partitions,
        })
    }

    /// Folds every committed event, to the end of each partition.
    fn rebuild(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let started = Instant::now();
        for p in 0..self.partitions {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            self.catch_up(p)?;
        }
        tracing::info!(elapsed = ?started.elapsed(), "events folded");
        Ok(())
    }

    /// Folds the events of `partition` not folded yet, up to its end: a consumer of that
    /// partition alone reads from the first unfolded offset until it reports the end of the
    /// partition (`enable.partition.eof`: the end of what is committed, past commit markers
    /// and aborted records, which a consumer's position does not step over). The shared
    /// reader then skips what was folded here. Returns the next offset after the last event.
    fn catch_up(&mut self, partition: i32) -> anyhow::Result<i64> {
        let topic = self.config.topics.task_events.clone();
        let from = self
            .fold_from
            .get(&partition)
            .copied()
            .unwrap_or(0)
            .max(self.folded_next.get(&partition).copied().unwrap_or(0));
        let mut config = base_config(&self.config.kafka, "orchestrator-catch-up");
        config
            .set(
                "group.id",
                format!("{}-reader", self.config.orchestrator.group_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10");
        let consumer: BaseConsumer<ReadsToEnd> = config
            .create_with_context(ReadsToEnd)
            .context("create the catch-up reader")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl).context("assign the catch-up reader")?;
        let deadline = Instant::now() + KAFKA_TIMEOUT * 4;
        let mut next = from;
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    next = message.offset() + 1;
                    match message.payload().map(TaskEvent::decode) {
                        Some(Ok(event)) => self.state.apply(partition, &event),
                        Some(Err(e)) => {
                            tracing::warn!(partition, offset = message.offset(), error = %e, "undecodable task event skipped")
                        }
                        None => {}
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e).context("read events"),
                None => anyhow::ensure!(
                    Instant::now() < deadline,
                    "events partition {partition} not read to its end (at offset {next})"
                ),
            }
        }
        self.fold_from.insert(partition, next);
        self.folded_next.insert(partition, next);
        // Saves the shared reader a second read; it skips these events anyway.
        let _ = self
            .reader
            .seek(&topic, partition, Offset::Offset(next), Duration::from_secs(1));
        Ok(next)
    }

    /// Folds events that are available within `wait`; returns how many were folded.
    fn fold_available(&mut self, wait: Duration, max: usize) -> anyhow::Result<usize> {
        let mut folded = 0;
        let mut timeout = wait;
        for _ in 0..max {
            let Some(message) = self.reader.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let message = message.context("read events")?;
            let p = message.partition();
            if message.offset() < self.fold_from.get(&p).copied().unwrap_or(0) {
                continue;
            }
            self.folded_next.insert(p, message.offset() + 1);
            let Some(payload) = message.payload() else {
                continue;
            };
            match TaskEvent::decode(payload) {
                Ok(event) => {
                    self.state.apply(p, &event);
                    folded += 1;
                }
                Err(e) => {
                    tracing::warn!(partition = p, offset = message.offset(), error = %e, "undecodable task event skipped")
                }
            }
        }
        Ok(folded)
    }

    /// Takes the partitions the last polls assigned (after catching up on their events) and
    /// gives up the revoked ones.
    fn handle_ownership(&mut self) -> anyhow::Result<()> {
        let changes = std::mem::take(&mut *self.commands.context().changes.lock().expect("ownership lock"));
        for (assigned, partitions) in changes {
            for p in partitions {
                if assigned {
                    let stable = self.catch_up(p)?;
                    self.deliveries_next().insert(p, stable);
                    self.fold_from.insert(p, i64::MAX);
                    self.owned
                        .insert(p, Instant::now() - self.config.orchestrator.tick_interval);
                    tracing::info!(partition = p, "task partition taken");
                } else {
                    self.owned.remove(&p);
                    self.clocks.remove(&p);
                    // Its agents are reported by their partition's new owner from now on.
                    for agent in self.state.agents.values().filter(|a| a.home == p) {
                        metrics::gauge!(m::ORCHESTRATOR_AGENT_LOAD, "agent" => agent.id.clone()).set(0.0);
                    }
                    let next = self.deliveries_next().get(&p).copied().unwrap_or(0);
                    self.fold_from.insert(p, next);
                    tracing::info!(partition = p, "task partition given up");
                }
            }
        }
        metrics::gauge!(m::CONSUMER_ASSIGNED, "group" => self.config.orchestrator.group_id.clone())
            .set(self.owned.len() as f64);
        Ok(())
    }

    fn deliveries_next(&self) -> std::sync::MutexGuard<'_, HashMap<i32, i64>> {
        self.producer.context().next.lock().expect("deliveries lock")
    }

    fn poll_batch(&mut self) -> anyhow::Result<Vec<OwnedMessage>> {
        let max = self.config.orchestrator.max_batch_records;
        let mut batch = Vec::new();
        let mut timeout = self.config.orchestrator.poll_timeout;
        let mut first: Option<Instant> = None;
        while batch.len() < max && first.is_none_or(|t| t.elapsed() < BATCH_WINDOW) {
            let polled = self
                .commands
                .poll(timeout)
                .map(|m| m.map(|m| m.detach()).context("read task commands"));
            self.handle_ownership()?;
            let Some(message) = polled else { break };
            timeout = Duration::ZERO;
            first.get_or_insert_with(Instant::now);
            batch.push(message?);
        }
        batch.retain(|m| self.owned.contains_key(&m.partition()));
        Ok(batch)
    }

    fn iteration(&mut self) -> anyhow::Result<()> {
        let foreign = self.fold_available(Duration::ZERO, 50_000)?;
        let batch = self.poll_batch()?;
        let tick_interval = self.config.orchestrator.tick_interval;
        let ticks_due: Vec<i32> = self
            .owned
            .iter()
            .filter(|(_, last)| last.elapsed() >= tick_interval)
            .map(|(p, _)| *p)
            .collect();
        if batch.is_empty() && foreign == 0 && ticks_due.is_empty() {
            return Ok(());
        }

        let started = Instant::now();
        self.producer.begin_transaction().context("begin transaction")?;
        self.tally = Tally::default();
        let mut next_offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for message in &batch {
            next_offsets.insert(message.partition(), message.offset() + 1);
            self.decide_record(message)?;
        }
        let to_reconcile: BTreeSet<i32> = if foreign > 0 {
            self.owned.keys().copied().collect()
        } else {
            next_offsets.keys().chain(&ticks_due).copied().collect()
        };
        for p in to_reconcile {
            let Some(now) = self.clocks.get(&p).copied() else {
                continue;
            };
            let events = reconcile(&mut self.state, &self.rules, p, now);
            tracing::debug!(
                partition = p,
                now,
                events = events.len(),
                pending = self.state.pending_count(p),
                agents = self.state.agents.len(),
                "reconciled"
            );
            self.produce_events(p, &events)?;
        }
        for p in ticks_due {
            self.produce_tick(p)?;
            self.owned.insert(p, Instant::now());
        }
        let decided = started.elapsed();
        if !next_offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (p, next) in &next_offsets {
                tpl.add_partition_offset(&self.config.topics.task_commands, *p, Offset::Offset(*next))?;
            }
            let group = self
                .commands
                .group_metadata()
                .context("no consumer group metadata")?;
            self.producer
                .send_offsets_to_transaction(&tpl, &group, KAFKA_TIMEOUT)
                .context("send offsets to the transaction")?;
        }
        let offsets_sent = started.elapsed();
        flush(&self.producer)?;
        self.producer
            .commit_transaction(KAFKA_TIMEOUT)
            .context("commit transaction")?;
        tracing::debug!(
            commands = batch.len(),
            decided_us = decided.as_micros() as u64,
            offsets_sent_us = offsets_sent.as_micros() as u64,
            committed_us = started.elapsed().as_micros() as u64,
            "transaction committed"
        );
        if let Some(failed) = self
            .producer
            .context()
            .failed
            .lock()
            .expect("deliveries lock")
            .take()
        {
            anyhow::bail!("a record of the committed transaction was not delivered: {failed}");
        }
        metrics::counter!(m::ORCHESTRATOR_TRANSACTIONS, "outcome" => "committed").increment(1);
        std::mem::take(&mut self.tally).publish(&self.config.topics.task_commands);
        metrics::histogram!(m::ORCHESTRATOR_TRANSACTION_SECONDS).record(started.elapsed().as_secs_f64());
        self.export_state_gauges();
        Ok(())
    }

    fn decide_record(&mut self, message: &OwnedMessage) -> anyhow::Result<()> {
        let p = message.partition();
        // The events of a command carry its payload (accepted, assigned) or result
        // (completed): a command that fills the topic's limit would make events the broker
        // refuses, and the transaction would be retried forever. It is refused before it
        // decides anything.
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        let budget = self
            .config
            .topics
            .max_message_bytes
            .saturating_sub(LETTER_OVERHEAD_BYTES);
        if size > budget {
            let reason = format!(
                "a task command of {size} bytes: its events would not fit the events topic (commands up to {budget} bytes)"
            );
            return self.dead_letter(message, "too_large", &reason);
        }
        let command = match message.payload().map(TaskCommand::decode_unvalidated) {
            Some(Ok(command)) => command,
            Some(Err(e)) => return self.dead_letter(message, e.class(), &e.to_string()),
            None => return self.dead_letter(message, "not_avro", "empty record"),
        };
        // Only a command moves the clock: a record that is dead-lettered decides nothing.
        let now = {
            let time = trusted_time(message);
            let clock = self.clocks.entry(p).or_insert(time);
            *clock = (*clock).max(time);
            *clock
        };
        let type_name = command.type_name();
        if matches!(command, TaskCommand::Tick(_)) {
            return Ok(());
        }
        let duplicate = self.state.seen(command.command_id());
        let events = decide(&mut self.state, &self.rules, p, now, &command);
        let outcome = if duplicate {
            "duplicate"
        } else if events
            .iter()
            .any(|e| e.event_type == memos_schemas::task::TaskEventType::CommandRejected)
        {
            "rejected"
        } else {
            "decided"
        };
        *self.tally.commands.entry((type_name, outcome)).or_default() += 1;
        self.produce_events(p, &events)
    }

    fn dead_letter(
        &mut self,
        message: &OwnedMessage,
        class: &'static str,
        reason: &str,
    ) -> anyhow::Result<()> {
        tracing::warn!(
            partition = message.partition(),
            offset = message.offset(),
            class,
            reason,
            "task command dead-lettered"
        );
        *self.tally.dead_letters.entry(class).or_default() += 1;
        let letter = DeadLetter {
            topic: &self.config.topics.task_commands,
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            error_class: class,
            error_message: reason,
        };
        // A copy of the original (key and value exactly, nulls kept) when it fits the
        // dead-letter topic, else a reference to it: a letter is never refused for its size,
        // which would abort every retry of this transaction.
        let composed = dlq::compose(&letter, dead_letter_max_bytes(&self.config.topics));
        let headers = composed
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            });
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.config.topics.dead_letter).headers(headers);
        if let Some(key) = &composed.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &composed.payload {
            record = record.payload(payload.as_slice());
        }
        send(&self.producer, record)
    }

    fn produce_events(&mut self, partition: i32, events: &[TaskEvent]) -> anyhow::Result<()> {
        for event in events {
            let payload = event.encode().context("encode a task event")?;
            let key = event
                .workflow_id
                .as_deref()
                .or(event.task_id.as_deref())
                .or(event.agent_id.as_deref())
                .unwrap_or_default();
            let mut headers = OwnedHeaders::new();
            if let Some(traceparent) = &event.traceparent {
                headers = headers.insert(Header {
                    key: memos_kafka::headers::TRACEPARENT,
                    value: Some(traceparent.as_bytes()),
                });
            }
            let record = BaseRecord::to(&self.config.topics.task_events)
                .partition(partition)
                .key(key)
                .payload(&payload)
                .headers(headers);
            send(&self.producer, record)?;
            *self.tally.events.entry(event.event_type.as_str()).or_default() += 1;
            if event.event_type == memos_schemas::task::TaskEventType::TaskCompleted
                && let Some(duration) = event
                    .data_json
                    .as_deref()
                    .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    .and_then(|d| d["duration_ms"].as_f64())
            {
                self.tally.completions.push(duration / 1000.0);
            }
        }
        Ok(())
    }

    fn produce_tick(&mut self, partition: i32) -> anyhow::Result<()> {
        let now = chrono_millis();
        let tick = TaskCommand::Tick(Tick {
            command_id: uuid::Uuid::new_v4().to_string(),
            actor: instance_id(self.config),
            issued_at: now,
            traceparent: None,
            partition,
        });
        let payload = tick.encode().context("encode a tick")?;
        let record = BaseRecord::<[u8], _>::to(&self.config.topics.task_commands)
            .partition(partition)
            .payload(&payload);
        send(&self.producer, record)
    }

    fn export_state_gauges(&self) {
        let stats = &self.state.stats;
        metrics::gauge!(m::ORCHESTRATOR_ACTIVE_WORKFLOWS).set(stats.workflows_active as f64);
        let pending: usize = self.owned.keys().map(|p| self.state.pending_count(*p)).sum();
        metrics::gauge!(m::ORCHESTRATOR_PENDING_TASKS).set(pending as f64);
        // Each instance reports the agents whose liveness it decides (their home partition),
        // so that a sum over instances counts every agent once.
        let mut by_status: HashMap<&str, usize> =
            HashMap::from([("alive", 0), ("lost", 0), ("deregistered", 0)]);
        for agent in self
            .state
            .agents
            .values()
            .filter(|a| self.owned.contains_key(&a.home))
        {
            let status = match agent.status {
                AgentStatus::Alive => "alive",
                AgentStatus::Lost => "lost",
                AgentStatus::Deregistered => "deregistered",
            };
            *by_status.entry(status).or_default() += 1;
            metrics::gauge!(m::ORCHESTRATOR_AGENT_LOAD, "agent" => agent.id.clone())
                .set(agent.holding.len() as f64);
        }
        for (status, count) in by_status {
            metrics::gauge!(m::ORCHESTRATOR_AGENTS, "status" => status).set(count as f64);
        }
    }
}

/// `orchestrator.instance_id`, or a name made once per process: `<hostname>-<random>`.
fn instance_id(config: &Config) -> String {
    static GENERATED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    config.orchestrator.instance_id.clone().unwrap_or_else(|| {
        GENERATED
            .get_or_init(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "host".into());
                format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
            })
            .clone()
    })
}

/// Series whose labels are known up front start at zero, so panels and alerts see them.
fn register_series() {
    metrics::counter!(m::ORCHESTRATOR_RESTARTS).increment(0);
    for outcome in ["committed", "aborted"] {
        metrics::counter!(m::ORCHESTRATOR_TRANSACTIONS, "outcome" => outcome).increment(0);
    }
    for kind in [
        TaskEventType::TaskAccepted,
        TaskEventType::TaskAssigned,
        TaskEventType::TaskCompleted,
        TaskEventType::TaskFailed,
        TaskEventType::TaskTimedOut,
        TaskEventType::TaskRedelegated,
        TaskEventType::TaskDeadLettered,
        TaskEventType::WorkflowCompleted,
        TaskEventType::WorkflowFailed,
        TaskEventType::AgentLost,
        TaskEventType::CommandRejected,
    ] {
        metrics::counter!(m::ORCHESTRATOR_EVENTS, "type" => kind.as_str()).increment(0);
    }
}

/// The time a command happened at, as far as the orchestrator may trust it: timeouts and
/// liveness are decided by it, so a producer must not be able to move it. The command topics
/// are created with `message.timestamp.type=LogAppendTime`, and then the broker stamps every
/// record as it appends it. On a topic left at `CreateTime` the timestamp is the producer's
/// claim: it is bounded by this host's clock, so a forged future time moves no clock past
/// now (a forged past time never moves it back: the clock only advances).
fn trusted_time(message: &OwnedMessage) -> i64 {
    match message.timestamp() {
        Timestamp::LogAppendTime(t) => t,
        Timestamp::CreateTime(t) => t.min(chrono_millis()),
        Timestamp::NotAvailable => chrono_millis(),
    }
}

fn chrono_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Waits until every record of the open transaction is acknowledged, serving the delivery
/// reports. rust-rdkafka's own flush (which `commit_transaction` calls first) polls in 100 ms
/// slices, adding up to 100 ms to every commit, and its polls shorter than a millisecond
/// spin; this checks often and sleeps in between.
fn flush(producer: &BaseProducer<Deliveries>) -> anyhow::Result<()> {
    let deadline = Instant::now() + KAFKA_TIMEOUT;
    loop {
        producer.poll(Duration::ZERO);
        match producer.flush(Duration::ZERO) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(250)),
            Err(e) => return Err(e).context("records of the transaction not acknowledged"),
        }
    }
}

/// Enqueues a record in the open transaction, waiting while librdkafka's queue is full.
fn send<K, P>(producer: &BaseProducer<Deliveries>, mut record: BaseRecord<'_, K, P>) -> anyhow::Result<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(50));
                record = back;
            }
            Err((e, _)) => return Err(e).context("enqueue a record"),
        }
    }
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .with_context(|| format!("read metadata of {topic}"))?;
    let count = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    anyhow::ensure!(count > 0, "topic {topic} does not exist");
    Ok(count)
}
