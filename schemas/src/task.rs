//! Task commands and the orchestrator's events: the Rust side of `schemas/avro/task/*.avsc`,
//! their limits and their codec. Commands travel on `memos.task.commands` keyed by
//! [`TaskCommand::routing_key`], so that everything about one workflow (or one lone task, or
//! one agent) is ordered in one partition; [`TaskEvent`]s are the orchestrator's decisions on
//! `memos.task.events`. Limits are enforced by the API before appending and by the
//! orchestrator, which rejects (never drops) a command from any other producer that breaks
//! them.

use serde::{Deserialize, Serialize};

use crate::registry::{CommandKind, DecodeError, registry};
pub use crate::validate::MAX_STEPS;
use crate::validate::{
    JsonKind, ValidationError, WorkflowDag, check_bounded_text, check_name, check_optional_text, check_tags,
    check_text, check_time, check_uuid, parse_json,
};

/// Largest task payload, task result or workflow input, in bytes of serialized JSON.
pub const MAX_JSON_BYTES: usize = 64 * 1024;
/// Most tasks an agent may hold at once.
pub const MAX_CONCURRENT: i32 = 1000;
/// Most attempts of a task.
pub const MAX_ATTEMPTS: i32 = 100;
/// Longest attempt timeout: one week.
pub const MAX_TIMEOUT_MS: i64 = 7 * 24 * 3600 * 1000;

/// `memos.task.RegisterAgent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterAgent {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub agent_id: String,
    pub capabilities: Vec<String>,
    pub max_concurrent: i32,
    pub metadata_json: String,
}

/// `memos.task.AgentHeartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentHeartbeat {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub agent_id: String,
}

/// `memos.task.DeregisterAgent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeregisterAgent {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub agent_id: String,
}

/// `memos.task.DelegateTask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegateTask {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub task_id: String,
    pub required_capabilities: Vec<String>,
    pub payload_json: String,
    pub priority: i32,
    pub timeout_ms: i64,
    pub max_attempts: i32,
    pub preferred_agent: Option<String>,
    pub workflow_id: Option<String>,
}

/// `memos.task.StartTask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartTask {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub task_id: String,
    pub agent_id: String,
    pub workflow_id: Option<String>,
}

/// `memos.task.CompleteTask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteTask {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub task_id: String,
    pub agent_id: String,
    pub workflow_id: Option<String>,
    pub result_json: String,
}

/// `memos.task.FailTask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailTask {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub task_id: String,
    pub agent_id: String,
    pub workflow_id: Option<String>,
    pub error: String,
    pub retriable: bool,
}

/// `memos.task.CancelTask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelTask {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub task_id: String,
    pub workflow_id: Option<String>,
    pub reason: Option<String>,
}

/// One step of a workflow template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowStep {
    pub step_id: String,
    pub capability: String,
    pub depends_on: Vec<String>,
    pub timeout_ms: i64,
    pub max_attempts: i32,
}

/// `memos.task.DefineWorkflowTemplate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefineWorkflowTemplate {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub name: String,
    pub version: i32,
    pub steps: Vec<WorkflowStep>,
}

/// `memos.task.StartWorkflow`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartWorkflow {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub workflow_id: String,
    pub template: String,
    pub template_version: Option<i32>,
    pub input_json: String,
    pub priority: i32,
}

/// `memos.task.Tick`: the orchestrator's clock, see the schema's doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    pub command_id: String,
    pub actor: String,
    pub issued_at: i64,
    pub traceparent: Option<String>,
    pub partition: i32,
}

/// Any command of the task topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskCommand {
    RegisterAgent(RegisterAgent),
    Heartbeat(AgentHeartbeat),
    DeregisterAgent(DeregisterAgent),
    Delegate(DelegateTask),
    Start(StartTask),
    Complete(CompleteTask),
    Fail(FailTask),
    Cancel(CancelTask),
    DefineTemplate(DefineWorkflowTemplate),
    StartWorkflow(StartWorkflow),
    Tick(Tick),
}

macro_rules! each {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            TaskCommand::RegisterAgent($c) => $body,
            TaskCommand::Heartbeat($c) => $body,
            TaskCommand::DeregisterAgent($c) => $body,
            TaskCommand::Delegate($c) => $body,
            TaskCommand::Start($c) => $body,
            TaskCommand::Complete($c) => $body,
            TaskCommand::Fail($c) => $body,
            TaskCommand::Cancel($c) => $body,
            TaskCommand::DefineTemplate($c) => $body,
            TaskCommand::StartWorkflow($c) => $body,
            TaskCommand::Tick($c) => $body,
        }
    };
}

/// The partition key of a task-scoped command: the workflow when there is one.
fn task_key<'a>(workflow_id: &'a Option<String>, task_id: &'a str) -> &'a str {
    workflow_id.as_deref().unwrap_or(task_id)
}

fn check_json(field: &'static str, json: &str) -> Result<(), ValidationError> {
    parse_json(field, json, MAX_JSON_BYTES, JsonKind::Any).map(|_| ())
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: impl Into<std::borrow::Cow<'static, str>>,
    value: T,
    min: T,
    max: T,
) -> Result<(), ValidationError> {
    if value < min || value > max {
        return Err(ValidationError::new(
            field,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(())
}

fn check_optional_name(field: &'static str, value: &Option<String>) -> Result<(), ValidationError> {
    value.as_deref().map_or(Ok(()), |v| check_name(field, v))
}

impl TaskCommand {
    pub fn kind(&self) -> CommandKind {
        match self {
            TaskCommand::RegisterAgent(_) => CommandKind::RegisterAgent,
            TaskCommand::Heartbeat(_) => CommandKind::AgentHeartbeat,
            TaskCommand::DeregisterAgent(_) => CommandKind::DeregisterAgent,
            TaskCommand::Delegate(_) => CommandKind::DelegateTask,
            TaskCommand::Start(_) => CommandKind::StartTask,
            TaskCommand::Complete(_) => CommandKind::CompleteTask,
            TaskCommand::Fail(_) => CommandKind::FailTask,
            TaskCommand::Cancel(_) => CommandKind::CancelTask,
            TaskCommand::DefineTemplate(_) => CommandKind::DefineWorkflowTemplate,
            TaskCommand::StartWorkflow(_) => CommandKind::StartWorkflow,
            TaskCommand::Tick(_) => CommandKind::Tick,
        }
    }

    /// The Avro record name without its namespace (`DelegateTask`).
    pub fn type_name(&self) -> &'static str {
        let full = self.kind().full_name();
        &full[full.rfind('.').map_or(0, |i| i + 1)..]
    }

    pub fn command_id(&self) -> &str {
        each!(self, c => &c.command_id)
    }

    pub fn actor(&self) -> &str {
        each!(self, c => &c.actor)
    }

    pub fn traceparent(&self) -> Option<&str> {
        each!(self, c => c.traceparent.as_deref())
    }

    /// The Kafka key: the agent for agent commands, `template:<name>` for templates, the
    /// workflow for workflow commands and workflow tasks, the task for a lone task. A tick
    /// has none (it is written to an explicit partition).
    pub fn routing_key(&self) -> Option<String> {
        Some(match self {
            TaskCommand::RegisterAgent(c) => c.agent_id.clone(),
            TaskCommand::Heartbeat(c) => c.agent_id.clone(),
            TaskCommand::DeregisterAgent(c) => c.agent_id.clone(),
            TaskCommand::Delegate(c) => task_key(&c.workflow_id, &c.task_id).to_owned(),
            TaskCommand::Start(c) => task_key(&c.workflow_id, &c.task_id).to_owned(),
            TaskCommand::Complete(c) => task_key(&c.workflow_id, &c.task_id).to_owned(),
            TaskCommand::Fail(c) => task_key(&c.workflow_id, &c.task_id).to_owned(),
            TaskCommand::Cancel(c) => task_key(&c.workflow_id, &c.task_id).to_owned(),
            TaskCommand::DefineTemplate(c) => format!("template:{}", c.name),
            TaskCommand::StartWorkflow(c) => c.workflow_id.clone(),
            TaskCommand::Tick(_) => return None,
        })
    }

    /// Checks every limit of the command; the first broken one is reported.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_uuid("command_id", self.command_id())?;
        check_name("actor", self.actor())?;
        check_time("issued_at", each!(self, c => c.issued_at))?;
        check_optional_text("traceparent", self.traceparent())?;
        match self {
            TaskCommand::RegisterAgent(c) => {
                check_name("agent_id", &c.agent_id)?;
                check_tags("capabilities", &c.capabilities)?;
                check_range("max_concurrent", c.max_concurrent, 1, MAX_CONCURRENT)?;
                parse_json("metadata", &c.metadata_json, MAX_JSON_BYTES, JsonKind::Object).map(|_| ())
            }
            TaskCommand::Heartbeat(c) => check_name("agent_id", &c.agent_id),
            TaskCommand::DeregisterAgent(c) => check_name("agent_id", &c.agent_id),
            TaskCommand::Delegate(c) => {
                check_name("task_id", &c.task_id)?;
                check_tags("required_capabilities", &c.required_capabilities)?;
                check_json("payload", &c.payload_json)?;
                check_range("timeout_ms", c.timeout_ms, 1, MAX_TIMEOUT_MS)?;
                check_range("max_attempts", c.max_attempts, 1, MAX_ATTEMPTS)?;
                check_optional_name("preferred_agent", &c.preferred_agent)?;
                check_optional_name("workflow_id", &c.workflow_id)
            }
            TaskCommand::Start(c) => {
                check_name("task_id", &c.task_id)?;
                check_name("agent_id", &c.agent_id)?;
                check_optional_name("workflow_id", &c.workflow_id)
            }
            TaskCommand::Complete(c) => {
                check_name("task_id", &c.task_id)?;
                check_name("agent_id", &c.agent_id)?;
                check_optional_name("workflow_id", &c.workflow_id)?;
                check_json("result", &c.result_json)
            }
            TaskCommand::Fail(c) => {
                check_name("task_id", &c.task_id)?;
                check_name("agent_id", &c.agent_id)?;
                check_optional_name("workflow_id", &c.workflow_id)?;
                check_bounded_text("error", &c.error, MAX_JSON_BYTES)
            }
            TaskCommand::Cancel(c) => {
                check_name("task_id", &c.task_id)?;
                check_optional_name("workflow_id", &c.workflow_id)?;
                match &c.reason {
                    Some(reason) => check_bounded_text("reason", reason, MAX_JSON_BYTES),
                    None => Ok(()),
                }
            }
            TaskCommand::DefineTemplate(c) => {
                check_name("name", &c.name)?;
                check_range("version", c.version, 1, i32::MAX)?;
                check_range("steps", c.steps.len(), 1, MAX_STEPS)?;
                for step in &c.steps {
                    check_name("steps.step_id", &step.step_id)?;
                    check_name("steps.capability", &step.capability)?;
                    for dependency in &step.depends_on {
                        check_name("steps.depends_on", dependency)?;
                    }
                    check_range("steps.timeout_ms", step.timeout_ms, 1, MAX_TIMEOUT_MS)?;
                    check_range("steps.max_attempts", step.max_attempts, 1, MAX_ATTEMPTS)?;
                }
                WorkflowDag::parse(&c.steps).map(|_| ())
            }
            TaskCommand::StartWorkflow(c) => {
                check_name("workflow_id", &c.workflow_id)?;
                check_name("template", &c.template)?;
                check_json("input", &c.input_json)
            }
            TaskCommand::Tick(c) => check_range("partition", c.partition, 0, i32::MAX),
        }
    }

    /// The strings a rejection of this command would carry (command id, actor, trace context,
    /// and the task, agent and workflow ids) hold no U+0000, so even its rejection can be
    /// stored. The orchestrator dead-letters a record that breaks this; any other broken limit
    /// is a rejection recorded in the views.
    pub fn check_storable(&self) -> Result<(), ValidationError> {
        check_text("command_id", self.command_id())?;
        check_text("actor", self.actor())?;
        check_optional_text("traceparent", self.traceparent())?;
        let (task, agent, workflow) = self.subject();
        check_optional_text("task_id", task)?;
        check_optional_text("agent_id", agent)?;
        check_optional_text("workflow_id", workflow)
    }

    /// Single-object encoding with the current schema of the command's kind.
    pub fn encode(&self) -> Result<Vec<u8>, apache_avro::Error> {
        let kind = self.kind();
        each!(self, c => registry().encode(kind, c))
    }

    /// Decodes a record written with any released schema version and validates it.
    pub fn decode(bytes: &[u8]) -> Result<TaskCommand, DecodeError> {
        let command = Self::decode_unvalidated(bytes)?;
        command.validate()?;
        Ok(command)
    }

    /// Decodes, refusing only what no view could store ([`TaskCommand::check_storable`]): the
    /// orchestrator records any other invalid command as a rejection (with the command's ids)
    /// instead of dead-lettering it.
    pub fn decode_unvalidated(bytes: &[u8]) -> Result<TaskCommand, DecodeError> {
        let command = Self::decode_any(bytes)?;
        command.check_storable()?;
        Ok(command)
    }

    /// Decodes without any check.
    fn decode_any(bytes: &[u8]) -> Result<TaskCommand, DecodeError> {
        let (kind, value) = registry().decode_value(bytes)?;
        let malformed = |e: apache_avro::Error| DecodeError::Malformed {
            schema: kind.full_name(),
            message: e.to_string(),
        };
        let command = match kind {
            CommandKind::RegisterAgent => {
                TaskCommand::RegisterAgent(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::AgentHeartbeat => {
                TaskCommand::Heartbeat(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::DeregisterAgent => {
                TaskCommand::DeregisterAgent(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::DelegateTask => {
                TaskCommand::Delegate(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::StartTask => TaskCommand::Start(apache_avro::from_value(&value).map_err(malformed)?),
            CommandKind::CompleteTask => {
                TaskCommand::Complete(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::FailTask => TaskCommand::Fail(apache_avro::from_value(&value).map_err(malformed)?),
            CommandKind::CancelTask => {
                TaskCommand::Cancel(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::DefineWorkflowTemplate => {
                TaskCommand::DefineTemplate(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::StartWorkflow => {
                TaskCommand::StartWorkflow(apache_avro::from_value(&value).map_err(malformed)?)
            }
            CommandKind::Tick => TaskCommand::Tick(apache_avro::from_value(&value).map_err(malformed)?),
            other => {
                return Err(DecodeError::WrongTopic {
                    schema: other.full_name(),
                });
            }
        };
        Ok(command)
    }

    /// The task, agent and workflow the command is about, when it names them.
    pub fn subject(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        match self {
            TaskCommand::RegisterAgent(c) => (None, Some(&c.agent_id), None),
            TaskCommand::Heartbeat(c) => (None, Some(&c.agent_id), None),
            TaskCommand::DeregisterAgent(c) => (None, Some(&c.agent_id), None),
            TaskCommand::Delegate(c) => (Some(&c.task_id), None, c.workflow_id.as_deref()),
            TaskCommand::Start(c) => (Some(&c.task_id), Some(&c.agent_id), c.workflow_id.as_deref()),
            TaskCommand::Complete(c) => (Some(&c.task_id), Some(&c.agent_id), c.workflow_id.as_deref()),
            TaskCommand::Fail(c) => (Some(&c.task_id), Some(&c.agent_id), c.workflow_id.as_deref()),
            TaskCommand::Cancel(c) => (Some(&c.task_id), None, c.workflow_id.as_deref()),
            TaskCommand::DefineTemplate(_) | TaskCommand::Tick(_) => (None, None, None),
            TaskCommand::StartWorkflow(c) => (None, None, Some(&c.workflow_id)),
        }
    }
}

/// What a [`TaskEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskEventType {
    TaskAccepted,
    TaskAssigned,
    TaskStarted,
    TaskCompleted,
    TaskFailed,
    TaskTimedOut,
    TaskRedelegated,
    TaskDeadLettered,
    TaskCancelled,
    TemplateDefined,
    WorkflowStarted,
    WorkflowStepReady,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowCancelled,
    AgentRegistered,
    AgentHeartbeat,
    AgentLost,
    AgentDeregistered,
    CommandRejected,
}

impl TaskEventType {
    /// The Avro enum symbol, also used as a metric label and in the views.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventType::TaskAccepted => "TASK_ACCEPTED",
            TaskEventType::TaskAssigned => "TASK_ASSIGNED",
            TaskEventType::TaskStarted => "TASK_STARTED",
            TaskEventType::TaskCompleted => "TASK_COMPLETED",
            TaskEventType::TaskFailed => "TASK_FAILED",
            TaskEventType::TaskTimedOut => "TASK_TIMED_OUT",
            TaskEventType::TaskRedelegated => "TASK_REDELEGATED",
            TaskEventType::TaskDeadLettered => "TASK_DEAD_LETTERED",
            TaskEventType::TaskCancelled => "TASK_CANCELLED",
            TaskEventType::TemplateDefined => "TEMPLATE_DEFINED",
            TaskEventType::WorkflowStarted => "WORKFLOW_STARTED",
            TaskEventType::WorkflowStepReady => "WORKFLOW_STEP_READY",
            TaskEventType::WorkflowCompleted => "WORKFLOW_COMPLETED",
            TaskEventType::WorkflowFailed => "WORKFLOW_FAILED",
            TaskEventType::WorkflowCancelled => "WORKFLOW_CANCELLED",
            TaskEventType::AgentRegistered => "AGENT_REGISTERED",
            TaskEventType::AgentHeartbeat => "AGENT_HEARTBEAT",
            TaskEventType::AgentLost => "AGENT_LOST",
            TaskEventType::AgentDeregistered => "AGENT_DEREGISTERED",
            TaskEventType::CommandRejected => "COMMAND_REJECTED",
        }
    }
}

/// `memos.task.TaskEvent`: one decision of the orchestrator. Type-specific details are in
/// `data_json` (see `services/orchestrator/src/state.rs` for each type's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: TaskEventType,
    pub at: i64,
    pub command_id: Option<String>,
    pub command_type: Option<String>,
    pub actor: Option<String>,
    pub task_id: Option<String>,
    pub workflow_id: Option<String>,
    pub step_id: Option<String>,
    pub agent_id: Option<String>,
    pub attempt: Option<i32>,
    pub reason: Option<String>,
    pub data_json: Option<String>,
    pub traceparent: Option<String>,
}

impl TaskEvent {
    /// An event of `event_type` at `at` with every optional field empty.
    pub fn new(event_id: String, event_type: TaskEventType, at: i64) -> Self {
        TaskEvent {
            event_id,
            event_type,
            at,
            command_id: None,
            command_type: None,
            actor: None,
            task_id: None,
            workflow_id: None,
            step_id: None,
            agent_id: None,
            attempt: None,
            reason: None,
            data_json: None,
            traceparent: None,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, apache_avro::Error> {
        registry().encode(CommandKind::TaskEvent, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<TaskEvent, DecodeError> {
        let (kind, value) = registry().decode_value(bytes)?;
        if kind != CommandKind::TaskEvent {
            return Err(DecodeError::WrongTopic {
                schema: kind.full_name(),
            });
        }
        apache_avro::from_value(&value).map_err(|e| DecodeError::Malformed {
            schema: kind.full_name(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> (String, String) {
        (uuid::Uuid::new_v4().to_string(), "tester".to_owned())
    }

    #[test]
    fn every_command_round_trips_and_routes() {
        let (id, actor) = header();
        let delegate = TaskCommand::Delegate(DelegateTask {
            command_id: id.clone(),
            actor: actor.clone(),
            issued_at: 1,
            traceparent: None,
            task_id: "t1".into(),
            required_capabilities: vec!["summarize".into()],
            payload_json: r#"{"text":"hi"}"#.into(),
            priority: 5,
            timeout_ms: 30_000,
            max_attempts: 3,
            preferred_agent: None,
            workflow_id: Some("wf1".into()),
        });
        let template = TaskCommand::DefineTemplate(DefineWorkflowTemplate {
            command_id: id.clone(),
            actor: actor.clone(),
            issued_at: 1,
            traceparent: None,
            name: "etl".into(),
            version: 1,
            steps: vec![WorkflowStep {
                step_id: "a".into(),
                capability: "x".into(),
                depends_on: vec![],
                timeout_ms: 1000,
                max_attempts: 2,
            }],
        });
        let tick = TaskCommand::Tick(Tick {
            command_id: id,
            actor,
            issued_at: 1,
            traceparent: None,
            partition: 2,
        });
        for command in [delegate, template, tick] {
            let bytes = command.encode().unwrap();
            assert_eq!(TaskCommand::decode(&bytes).unwrap(), command);
        }
        let bytes = TaskCommand::decode(
            &TaskCommand::Tick(Tick {
                command_id: uuid::Uuid::new_v4().to_string(),
                actor: "o".into(),
                issued_at: 0,
                traceparent: None,
                partition: 0,
            })
            .encode()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(bytes.routing_key(), None);
    }

    #[test]
    fn limits_are_enforced() {
        let (id, actor) = header();
        let mut agent = RegisterAgent {
            command_id: id,
            actor,
            issued_at: 0,
            traceparent: None,
            agent_id: "a".into(),
            capabilities: vec![],
            max_concurrent: 0,
            metadata_json: "{}".into(),
        };
        let err = TaskCommand::RegisterAgent(agent.clone()).validate().unwrap_err();
        assert_eq!(err.field, "max_concurrent");
        agent.max_concurrent = 2;
        agent.metadata_json = "[]".into();
        assert_eq!(
            TaskCommand::RegisterAgent(agent).validate().unwrap_err().field,
            "metadata"
        );
    }

    /// One command of each kind a client sends, every optional string present.
    fn one_of_each() -> Vec<TaskCommand> {
        let id = || uuid::Uuid::new_v4().to_string();
        let tp = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
        let wf = Some("wf1".to_owned());
        let step = |s: &str, deps: &[&str]| WorkflowStep {
            step_id: s.into(),
            capability: "cap".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            timeout_ms: 1000,
            max_attempts: 1,
        };
        vec![
            TaskCommand::RegisterAgent(RegisterAgent {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                agent_id: "a1".into(),
                capabilities: vec!["cap".into()],
                max_concurrent: 2,
                metadata_json: r#"{"zone":"eu","tags":["x"]}"#.into(),
            }),
            TaskCommand::Heartbeat(AgentHeartbeat {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                agent_id: "a1".into(),
            }),
            TaskCommand::DeregisterAgent(DeregisterAgent {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                agent_id: "a1".into(),
            }),
            TaskCommand::Delegate(DelegateTask {
                command_id: id(),
                actor: "api".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                task_id: "t1".into(),
                required_capabilities: vec!["cap".into()],
                payload_json: r#"{"text":["hi"]}"#.into(),
                priority: 0,
                timeout_ms: 1000,
                max_attempts: 1,
                preferred_agent: Some("a1".into()),
                workflow_id: wf.clone(),
            }),
            TaskCommand::Start(StartTask {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                task_id: "t1".into(),
                agent_id: "a1".into(),
                workflow_id: wf.clone(),
            }),
            TaskCommand::Complete(CompleteTask {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                task_id: "t1".into(),
                agent_id: "a1".into(),
                workflow_id: wf.clone(),
                result_json: r#""done""#.into(),
            }),
            TaskCommand::Fail(FailTask {
                command_id: id(),
                actor: "a1".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                task_id: "t1".into(),
                agent_id: "a1".into(),
                workflow_id: wf.clone(),
                error: "boom".into(),
                retriable: true,
            }),
            TaskCommand::Cancel(CancelTask {
                command_id: id(),
                actor: "api".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                task_id: "t1".into(),
                workflow_id: wf.clone(),
                reason: Some("not needed".into()),
            }),
            TaskCommand::DefineTemplate(DefineWorkflowTemplate {
                command_id: id(),
                actor: "api".into(),
                issued_at: 1,
                traceparent: tp.clone(),
                name: "etl".into(),
                version: 1,
                steps: vec![step("a", &[]), step("b", &["a"])],
            }),
            TaskCommand::StartWorkflow(StartWorkflow {
                command_id: id(),
                actor: "api".into(),
                issued_at: 1,
                traceparent: tp,
                workflow_id: "wf1".into(),
                template: "etl".into(),
                template_version: Some(1),
                input_json: r#"{"rows":[1,2]}"#.into(),
                priority: 0,
            }),
        ]
    }

    fn poisoned(command: &TaskCommand) -> Vec<(String, TaskCommand)> {
        use crate::validate::each_string_poisoned;
        fn wrap<T, F>(c: &T, f: F) -> Vec<(String, TaskCommand)>
        where
            T: Serialize + serde::de::DeserializeOwned,
            F: Fn(T) -> TaskCommand,
        {
            each_string_poisoned(c)
                .into_iter()
                .map(|(p, c)| (p, f(c)))
                .collect()
        }
        match command {
            TaskCommand::RegisterAgent(c) => wrap(c, TaskCommand::RegisterAgent),
            TaskCommand::Heartbeat(c) => wrap(c, TaskCommand::Heartbeat),
            TaskCommand::DeregisterAgent(c) => wrap(c, TaskCommand::DeregisterAgent),
            TaskCommand::Delegate(c) => wrap(c, TaskCommand::Delegate),
            TaskCommand::Start(c) => wrap(c, TaskCommand::Start),
            TaskCommand::Complete(c) => wrap(c, TaskCommand::Complete),
            TaskCommand::Fail(c) => wrap(c, TaskCommand::Fail),
            TaskCommand::Cancel(c) => wrap(c, TaskCommand::Cancel),
            TaskCommand::DefineTemplate(c) => wrap(c, TaskCommand::DefineTemplate),
            TaskCommand::StartWorkflow(c) => wrap(c, TaskCommand::StartWorkflow),
            TaskCommand::Tick(c) => wrap(c, TaskCommand::Tick),
        }
    }

    /// U+0000 in any string of any command is invalid, naming the field; when the string is
    /// one a rejection would carry, the decoder refuses the record outright (dead letter).
    #[test]
    fn nul_in_any_string_of_any_command_is_invalid_and_named() {
        let carried = [
            "command_id",
            "actor",
            "traceparent",
            "task_id",
            "agent_id",
            "workflow_id",
        ];
        let mut checked = 0;
        for command in one_of_each() {
            assert_eq!(command.validate(), Ok(()), "{command:?}");
            for (path, bad) in poisoned(&command) {
                let top = path.trim_start_matches('/').split('/').next().unwrap();
                let field = top.strip_suffix("_json").unwrap_or(top);
                let err = bad.validate().unwrap_err();
                assert!(err.field.starts_with(field), "{path}: {err}");
                let bytes = bad.encode().unwrap();
                let decoded = TaskCommand::decode(&bytes).unwrap_err();
                assert_eq!(decoded.class(), "invalid", "{path}");
                let carried_by_rejection = carried.contains(&field) && bad.subject() != (None, None, None)
                    || ["command_id", "actor", "traceparent"].contains(&field);
                let unvalidated = TaskCommand::decode_unvalidated(&bytes);
                if carried_by_rejection {
                    let err = unvalidated.unwrap_err();
                    assert!(err.to_string().starts_with(field), "{path}: {err}");
                } else {
                    assert!(
                        unvalidated.is_ok(),
                        "{path}: rejected by the orchestrator instead"
                    );
                }
                checked += 1;
            }
        }
        assert!(checked >= 50, "only {checked} strings poisoned");
    }

    #[test]
    fn templates_and_times_are_checked_before_append() {
        let commands = one_of_each();
        let TaskCommand::DefineTemplate(template) = &commands[8] else {
            unreachable!()
        };
        let step = |s: &str, deps: &[&str]| WorkflowStep {
            step_id: s.into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            ..template.steps[0].clone()
        };
        let cases = [
            (vec![step("a", &["b"]), step("b", &["a"])], "steps", "cycle"),
            (vec![step("a", &["a"])], "steps.depends_on", "itself"),
            (vec![step("a", &["nope"])], "steps.depends_on", "unknown"),
            (vec![step("a", &[]), step("a", &[])], "steps.step_id", "twice"),
            (
                (0..=MAX_STEPS).map(|i| step(&format!("s{i}"), &[])).collect(),
                "steps",
                "between 1 and",
            ),
        ];
        for (steps, field, message) in cases {
            let mut bad = template.clone();
            bad.steps = steps;
            let err = TaskCommand::DefineTemplate(bad).validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(message), "{err}");
        }
        let TaskCommand::Delegate(delegate) = &commands[3] else {
            unreachable!()
        };
        let mut bad = delegate.clone();
        bad.issued_at = crate::validate::MAX_TIME_MS + 1;
        assert_eq!(
            TaskCommand::Delegate(bad).validate().unwrap_err().field,
            "issued_at"
        );
        let mut bad = delegate.clone();
        bad.payload_json = format!("{}0{}", "[".repeat(33), "]".repeat(33));
        assert_eq!(
            TaskCommand::Delegate(bad).validate().unwrap_err().field,
            "payload"
        );
        let mut bad = delegate.clone();
        bad.payload_json = r#"{"k":["\u0000"]}"#.into();
        assert_eq!(
            TaskCommand::Delegate(bad).validate().unwrap_err().field,
            "payload.k[0]"
        );
    }

    #[test]
    fn events_round_trip_and_commands_are_not_events() {
        let mut event = TaskEvent::new("0:1:0".into(), TaskEventType::TaskAssigned, 42);
        event.task_id = Some("t".into());
        event.attempt = Some(2);
        let bytes = event.encode().unwrap();
        assert_eq!(TaskEvent::decode(&bytes).unwrap(), event);
        assert!(matches!(
            TaskCommand::decode(&bytes),
            Err(DecodeError::WrongTopic { .. })
        ));
        assert!(matches!(
            crate::MemoryCommand::decode(&bytes),
            Err(DecodeError::WrongTopic { .. })
        ));
    }
}
