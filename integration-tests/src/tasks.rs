//! A Kafka-level client of the task pipeline for tests: appends task commands as any Avro
//! producer would, and reads the orchestrator's committed events (`read_committed`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use memos_schemas::task::{
    AgentHeartbeat, CompleteTask, DefineWorkflowTemplate, DelegateTask, FailTask, RegisterAgent,
    StartWorkflow, TaskCommand, TaskEvent, TaskEventType, WorkflowStep,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::TestEnv;

/// Appends task commands to the test's command topic.
pub struct TaskClient {
    producer: FutureProducer,
    topic: String,
    /// The offset of the last command appended to each partition.
    sent: Mutex<BTreeMap<i32, i64>>,
}

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl TaskClient {
    pub fn new(env: &TestEnv) -> anyhow::Result<TaskClient> {
        let producer = env
            .kafka_config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .create()?;
        Ok(TaskClient {
            producer,
            topic: env.task_commands_topic.clone(),
            sent: Mutex::default(),
        })
    }

    /// Appends `command` (keyed by its routing key) and waits for the acknowledgement;
    /// returns where it landed.
    pub async fn send(&self, command: &TaskCommand) -> anyhow::Result<(i32, i64)> {
        let payload = command.encode()?;
        let key = command.routing_key().unwrap_or_default();
        let delivery = self
            .producer
            .send(
                FutureRecord::to(&self.topic).key(&key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .context("append a task command")?;
        let (partition, offset) = (delivery.partition, delivery.offset);
        let mut sent = self.sent.lock().expect("sent lock");
        let last = sent.entry(partition).or_insert(offset);
        *last = (*last).max(offset);
        Ok((partition, offset))
    }

    /// The offset of the last command this client appended to each partition.
    pub fn sent(&self) -> BTreeMap<i32, i64> {
        self.sent.lock().expect("sent lock").clone()
    }

    pub async fn register(&self, agent: &str, capabilities: &[&str], max: i32) -> anyhow::Result<()> {
        self.send(&TaskCommand::RegisterAgent(RegisterAgent {
            command_id: id(),
            actor: agent.into(),
            issued_at: now_ms(),
            traceparent: None,
            agent_id: agent.into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            max_concurrent: max,
            metadata_json: "{}".into(),
        }))
        .await
        .map(drop)
    }

    pub async fn heartbeat(&self, agent: &str) -> anyhow::Result<()> {
        self.send(&TaskCommand::Heartbeat(AgentHeartbeat {
            command_id: id(),
            actor: agent.into(),
            issued_at: now_ms(),
            traceparent: None,
            agent_id: agent.into(),
        }))
        .await
        .map(drop)
    }

    pub fn delegate_command(
        task: &str,
        capability: &str,
        max_attempts: i32,
        timeout_ms: i64,
    ) -> DelegateTask {
        DelegateTask {
            command_id: id(),
            actor: "tester".into(),
            issued_at: now_ms(),
            traceparent: None,
            task_id: task.into(),
            required_capabilities: vec![capability.into()],
            payload_json: format!("{{\"task\":\"{task}\"}}"),
            priority: 0,
            timeout_ms,
            max_attempts,
            preferred_agent: None,
            workflow_id: None,
        }
    }

    pub async fn delegate(&self, task: &str, capability: &str, max_attempts: i32) -> anyhow::Result<()> {
        self.send(&TaskCommand::Delegate(Self::delegate_command(
            task,
            capability,
            max_attempts,
            600_000,
        )))
        .await
        .map(drop)
    }

    pub async fn complete(
        &self,
        task: &str,
        agent: &str,
        workflow: Option<&str>,
        result: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.send(&TaskCommand::Complete(CompleteTask {
            command_id: id(),
            actor: agent.into(),
            issued_at: now_ms(),
            traceparent: None,
            task_id: task.into(),
            agent_id: agent.into(),
            workflow_id: workflow.map(str::to_owned),
            result_json: result.to_string(),
        }))
        .await
        .map(drop)
    }

    pub async fn fail(&self, task: &str, agent: &str, retriable: bool) -> anyhow::Result<()> {
        self.send(&TaskCommand::Fail(FailTask {
            command_id: id(),
            actor: agent.into(),
            issued_at: now_ms(),
            traceparent: None,
            task_id: task.into(),
            agent_id: agent.into(),
            workflow_id: None,
            error: "boom".into(),
            retriable,
        }))
        .await
        .map(drop)
    }

    /// Defines `name` v1 from `(step, capability, depends_on)`.
    pub async fn define(&self, name: &str, steps: &[(&str, &str, &[&str])]) -> anyhow::Result<()> {
        self.send(&TaskCommand::DefineTemplate(DefineWorkflowTemplate {
            command_id: id(),
            actor: "tester".into(),
            issued_at: now_ms(),
            traceparent: None,
            name: name.into(),
            version: 1,
            steps: steps
                .iter()
                .map(|(step, capability, deps)| WorkflowStep {
                    step_id: step.to_string(),
                    capability: capability.to_string(),
                    depends_on: deps.iter().map(|d| d.to_string()).collect(),
                    timeout_ms: 600_000,
                    max_attempts: 2,
                })
                .collect(),
        }))
        .await
        .map(drop)
    }

    pub async fn start_workflow(
        &self,
        workflow: &str,
        template: &str,
        input: serde_json::Value,
    ) -> anyhow::Result<()> {
        self.send(&TaskCommand::StartWorkflow(StartWorkflow {
            command_id: id(),
            actor: "tester".into(),
            issued_at: now_ms(),
            traceparent: None,
            workflow_id: workflow.into(),
            template: template.into(),
            template_version: None,
            input_json: input.to_string(),
            priority: 0,
        }))
        .await
        .map(drop)
    }
}

/// The next offset the orchestrator group has committed (with its decisions, in one
/// transaction) per partition of the command topic.
pub fn decided_offsets(env: &TestEnv) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = env
        .kafka_config()
        .set("group.id", &env.orchestrator_group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&env.task_commands_topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&env.task_commands_topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| {
            e.offset()
                .to_raw()
                .filter(|o| *o >= 0)
                .map(|o| (e.partition(), o))
        })
        .collect())
}

/// Waits until the orchestrator has decided and committed past `offsets` (the last offset
/// to cover, per partition).
pub async fn until_decided(env: &TestEnv, offsets: &BTreeMap<i32, i64>) -> anyhow::Result<()> {
    crate::eventually(
        "the orchestrator to decide the commands",
        Duration::from_secs(60),
        || async {
            let decided = decided_offsets(env)?;
            Ok(offsets
                .iter()
                .all(|(p, o)| decided.get(p).is_some_and(|d| d > o))
                .then_some(()))
        },
    )
    .await
}

/// The committed task events, read from the beginning and kept in log order per partition.
pub struct EventLog {
    consumer: BaseConsumer,
    kafka: rdkafka::ClientConfig,
    group: String,
    pub events: Vec<(i32, i64, TaskEvent)>,
}

impl EventLog {
    pub fn new(env: &TestEnv) -> anyhow::Result<EventLog> {
        let consumer: BaseConsumer = env
            .kafka_config()
            .set("group.id", format!("{}-test-reader", env.orchestrator_group_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        Ok(EventLog {
            consumer,
            kafka: env.kafka_config(),
            group: format!("{}-test-reader", env.orchestrator_group_id),
            events: Vec::new(),
        })
    }

    /// Assigns every partition of the topic once it exists.
    fn assign(&self, topic: &str) -> anyhow::Result<bool> {
        if !self.consumer.assignment()?.elements().is_empty() {
            return Ok(true);
        }
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        if partitions == 0 {
            return Ok(false);
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        self.consumer.assign(&tpl)?;
        Ok(true)
    }

    /// Reads until `done(events)` holds, failing after `deadline`.
    pub fn read_until(
        &mut self,
        topic: &str,
        what: &str,
        deadline: Duration,
        done: impl Fn(&[(i32, i64, TaskEvent)]) -> bool,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.assign(topic)? {
                while let Some(message) = self.consumer.poll(Duration::from_millis(100)) {
                    let message = message?;
                    let event = TaskEvent::decode(message.payload().unwrap_or_default())?;
                    self.events.push((message.partition(), message.offset(), event));
                }
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
            if done(&self.events) {
                return Ok(());
            }
            if start.elapsed() > deadline {
                let summary: Vec<String> = self
                    .events
                    .iter()
                    .rev()
                    .take(30)
                    .map(|(_, _, e)| {
                        format!(
                            "{} task={:?} agent={:?} reason={:?}",
                            e.event_type.as_str(),
                            e.task_id,
                            e.agent_id,
                            e.reason
                        )
                    })
                    .collect();
                anyhow::bail!(
                    "{what}: not seen within {deadline:?}; {} events, last: {summary:#?}",
                    self.events.len()
                );
            }
        }
    }

    /// Reads every committed event again, from the beginning to the end of every partition
    /// as of now (the consumer reports the end: `enable.partition.eof`, which, unlike its
    /// position, also steps over the commit markers and aborted records that close a
    /// transactional partition).
    pub fn read_to_end(&mut self, topic: &str) -> anyhow::Result<()> {
        let consumer: BaseConsumer = self
            .kafka
            .clone()
            .set("group.id", format!("{}-end", self.group))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        anyhow::ensure!(partitions > 0, "topic {topic} does not exist");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut events = Vec::new();
        let mut at_end = std::collections::BTreeSet::new();
        let start = Instant::now();
        while at_end.len() < partitions as usize {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "{topic} not read to its end"
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    let event = TaskEvent::decode(message.payload().unwrap_or_default())?;
                    events.push((message.partition(), message.offset(), event));
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }
        self.events = events;
        Ok(())
    }

    /// Events of `kind`.
    pub fn of(&self, kind: TaskEventType) -> impl Iterator<Item = &TaskEvent> {
        self.events
            .iter()
            .map(|(_, _, e)| e)
            .filter(move |e| e.event_type == kind)
    }

    /// How many events of `kind` each task has.
    pub fn per_task(&self, kind: TaskEventType) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for event in self.of(kind) {
            *counts
                .entry(event.task_id.clone().unwrap_or_default())
                .or_default() += 1;
        }
        counts
    }

    /// The last assignment of `task`: (agent, attempt).
    pub fn assignment(&self, task: &str) -> Option<(String, i32)> {
        self.of(TaskEventType::TaskAssigned)
            .filter(|e| e.task_id.as_deref() == Some(task))
            .last()
            .map(|e| (e.agent_id.clone().unwrap_or_default(), e.attempt.unwrap_or(0)))
    }
}

/// Whether `events` hold an event of `kind` about `task`.
pub fn has(events: &[(i32, i64, TaskEvent)], kind: TaskEventType, task: &str) -> bool {
    events
        .iter()
        .any(|(_, _, e)| e.event_type == kind && e.task_id.as_deref() == Some(task))
}
