//! A Kafka-level client of the task pipeline for tests: appends task commands as any Avro
//! producer would, and reads the orchestrator's committed events (`read_committed`).

use std::collections::BTreeMap;
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
        })
    }

    /// Appends `command` (keyed by its routing key) and waits for the acknowledgement.
    pub async fn send(&self, command: &TaskCommand) -> anyhow::Result<()> {
        let payload = command.encode()?;
        let key = command.routing_key().unwrap_or_default();
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(&key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .context("append a task command")?;
        Ok(())
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
    }
}

/// The committed task events, read from the beginning and kept in log order per partition.
pub struct EventLog {
    consumer: BaseConsumer,
    pub events: Vec<(i32, i64, TaskEvent)>,
}

impl EventLog {
    pub fn new(env: &TestEnv) -> anyhow::Result<EventLog> {
        let consumer: BaseConsumer = env
            .kafka_config()
            .set("group.id", format!("{}-test-reader", env.orchestrator_group_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?;
        Ok(EventLog {
            consumer,
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
