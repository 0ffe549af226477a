//! The orchestrator's state and its fold. [`State::apply`] is the only way the state changes:
//! it folds one [`TaskEvent`] (read from `memos.task.events`, or just decided), so the state
//! of an instance is always the fold of the events it has seen, and a restarted instance that
//! reads the events again has the same state. Applying is pure: no clock, no randomness, no
//! I/O.
//!
//! `data_json` of each event type (what the views and other readers rely on):
//! - `TASK_ACCEPTED`: `{required_capabilities, payload, priority, timeout_ms, max_attempts,
//!   preferred_agent}`; `TASK_ASSIGNED`: `{payload, priority, deadline}`;
//!   `TASK_COMPLETED`: `{result, duration_ms}`; `TASK_FAILED`: `{retriable}`.
//! - `TEMPLATE_DEFINED`: `{name, version, steps}`; `WORKFLOW_STARTED`: `{template,
//!   template_version, input, priority, steps}`; `WORKFLOW_COMPLETED`: `{results, duration_ms}`.
//!
//! The state does not depend on the order partitions are read in: the events of one
//! partition are folded in their order, but a rebuild reads the partitions one after the
//! other, so an event may be folded before an event of another partition that it refers to.
//! Such references are resolved whichever comes first: a workflow's start carries the steps
//! it runs (starts written before they did take them from the template, and wait for it if
//! it has not been folded yet; a workflow whose steps are not known is never advanced), and
//! an assignment to an agent not folded yet counts against that agent once it is.
//! - `AGENT_REGISTERED`: `{capabilities, max_concurrent, metadata}`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use memos_schemas::task::{TaskEvent, TaskEventType as E, WorkflowStep};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    Alive,
    Lost,
    Deregistered,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub capabilities: BTreeSet<String>,
    pub max_concurrent: usize,
    pub status: AgentStatus,
    pub last_heartbeat: i64,
    /// The partition of the agent's key: its owner decides when the agent is lost.
    pub home: i32,
    /// Tasks assigned to or running on the agent: its load.
    pub holding: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    Assigned,
    Running,
    /// Between a failure or timeout and the re-delegation or dead letter that follows it.
    Interrupted,
    Completed,
    DeadLettered,
    Cancelled,
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::DeadLettered | TaskStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub partition: i32,
    pub workflow_id: Option<String>,
    pub step_id: Option<String>,
    pub required: BTreeSet<String>,
    pub payload: Value,
    pub priority: i32,
    pub timeout_ms: i64,
    pub max_attempts: i32,
    pub preferred_agent: Option<String>,
    pub status: TaskStatus,
    /// Attempts made so far (the current one while assigned or running).
    pub attempt: i32,
    pub agent: Option<String>,
    pub deadline: i64,
    pub accepted_at: i64,
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowStatus {
    Running,
    Completed,
    Failed,
}

#[derive(Debug, Clone)]
pub struct Workflow {
    pub id: String,
    pub template: String,
    pub template_version: i32,
    pub steps: Vec<WorkflowStep>,
    pub input: Value,
    pub priority: i32,
    pub status: WorkflowStatus,
    pub started_at: i64,
    /// The start named a template version that has not been folded yet (a start written
    /// before starts carried their steps, read before its template's partition): `steps`
    /// is empty until it is, and the workflow is not advanced.
    pub awaiting_template: bool,
    /// Steps that have been made tasks.
    pub released: BTreeSet<String>,
    pub results: BTreeMap<String, Value>,
}

/// The seed's figures, kept as part of the fold so they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub tasks_delegated: u64,
    pub tasks_completed: u64,
    pub completion_ms_sum: u64,
    pub tasks_failed: u64,
    pub tasks_timed_out: u64,
    pub tasks_redelegated: u64,
    pub tasks_dead_lettered: u64,
    pub tasks_cancelled: u64,
    pub workflows_completed: u64,
    pub workflows_failed: u64,
    pub workflows_active: u64,
    pub rejected: u64,
}

/// Agents, templates, tasks and workflows as the events say they are.
#[derive(Debug, Default)]
pub struct State {
    pub agents: BTreeMap<String, Agent>,
    pub templates: BTreeMap<String, BTreeMap<i32, Vec<WorkflowStep>>>,
    pub tasks: HashMap<String, Task>,
    pub workflows: HashMap<String, Workflow>,
    /// Workflows per template version they wait for (see [`Workflow::awaiting_template`]).
    awaiting_template: BTreeMap<(String, i32), BTreeSet<String>>,
    /// Tasks assigned to agents whose registration has not been folded yet.
    unattached: HashMap<String, BTreeSet<String>>,
    /// Waiting tasks per partition, highest priority first, then in order of acceptance.
    pub(crate) pending: BTreeMap<i32, BTreeSet<(Reverse<i32>, u64, String)>>,
    /// Assigned or running tasks per partition by deadline.
    pub(crate) deadlines: BTreeMap<i32, BTreeSet<(i64, String)>>,
    /// Tasks per partition whose agent was lost or left, to re-delegate.
    pub(crate) orphans: BTreeMap<i32, BTreeSet<String>>,
    /// Ids of the commands that have an effect recorded (dedupe of retries).
    pub(crate) seen: HashSet<String>,
    seq: u64,
    /// Events folded per partition: the next event id of the partition.
    event_counts: BTreeMap<i32, u64>,
    pub stats: Stats,
}

fn data(event: &TaskEvent) -> Value {
    event
        .data_json
        .as_deref()
        .and_then(|d| serde_json::from_str(d).ok())
        .unwrap_or(Value::Null)
}

fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

impl State {
    pub fn new() -> Self {
        State::default()
    }

    /// Whether a command with this id already had its effect.
    pub fn seen(&self, command_id: &str) -> bool {
        self.seen.contains(command_id)
    }

    /// The id of the next event of `partition`: `<partition>:<events before it>`, unique
    /// and the same on every replay.
    pub fn next_event_id(&self, partition: i32) -> String {
        format!(
            "{partition}:{}",
            self.event_counts.get(&partition).copied().unwrap_or(0)
        )
    }

    /// Tasks waiting for an agent in `partition`.
    pub fn pending_count(&self, partition: i32) -> usize {
        self.pending.get(&partition).map_or(0, BTreeSet::len)
    }

    /// Removes the task from its agent's load and from the timers.
    fn release(&mut self, task_id: &str) {
        let Some(task) = self.tasks.get_mut(task_id) else {
            return;
        };
        if let Some(agent_id) = task.agent.take() {
            match self.agents.get_mut(&agent_id) {
                Some(agent) => {
                    agent.holding.remove(task_id);
                }
                None => {
                    if let Some(held) = self.unattached.get_mut(&agent_id) {
                        held.remove(task_id);
                        if held.is_empty() {
                            self.unattached.remove(&agent_id);
                        }
                    }
                }
            }
        }
        if let Some(set) = self.deadlines.get_mut(&task.partition) {
            set.remove(&(task.deadline, task_id.to_owned()));
        }
        if let Some(set) = self.orphans.get_mut(&task.partition) {
            set.remove(task_id);
        }
        if let Some(set) = self.pending.get_mut(&task.partition) {
            set.remove(&(Reverse(task.priority), task.seq, task_id.to_owned()));
        }
    }

    fn orphan_tasks_of(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        for task_id in &agent.holding {
            if let Some(task) = self.tasks.get(task_id) {
                self.orphans
                    .entry(task.partition)
                    .or_default()
                    .insert(task_id.clone());
            }
        }
    }

    /// Folds one event read from (or about to be written to) `partition` of the events topic.
    pub fn apply(&mut self, partition: i32, event: &TaskEvent) {
        *self.event_counts.entry(partition).or_default() += 1;
        if let Some(command_id) = &event.command_id {
            self.seen.insert(command_id.clone());
        }
        let d = data(event);
        let task_id = event.task_id.clone().unwrap_or_default();
        let agent_id = event.agent_id.clone().unwrap_or_default();
        match event.event_type {
            E::AgentRegistered => {
                let unattached = &mut self.unattached;
                let agent = self.agents.entry(agent_id.clone()).or_insert_with(|| Agent {
                    holding: unattached.remove(&agent_id).unwrap_or_default(),
                    id: agent_id,
                    capabilities: BTreeSet::new(),
                    max_concurrent: 1,
                    status: AgentStatus::Alive,
                    last_heartbeat: event.at,
                    home: partition,
                });
                agent.capabilities = string_set(&d["capabilities"]);
                agent.max_concurrent = d["max_concurrent"].as_u64().unwrap_or(1) as usize;
                agent.status = AgentStatus::Alive;
                agent.last_heartbeat = agent.last_heartbeat.max(event.at);
                agent.home = partition;
            }
            E::AgentHeartbeat => {
                if let Some(agent) = self.agents.get_mut(&agent_id) {
                    agent.last_heartbeat = agent.last_heartbeat.max(event.at);
                    agent.status = AgentStatus::Alive;
                }
            }
            E::AgentLost | E::AgentDeregistered => {
                if let Some(agent) = self.agents.get_mut(&agent_id) {
                    agent.status = if event.event_type == E::AgentLost {
                        AgentStatus::Lost
                    } else {
                        AgentStatus::Deregistered
                    };
                }
                self.orphan_tasks_of(&agent_id);
            }
            E::TaskAccepted => {
                self.seq += 1;
                let task = Task {
                    id: task_id.clone(),
                    partition,
                    workflow_id: event.workflow_id.clone(),
                    step_id: event.step_id.clone(),
                    required: string_set(&d["required_capabilities"]),
                    payload: d["payload"].clone(),
                    priority: d["priority"].as_i64().unwrap_or(0) as i32,
                    timeout_ms: d["timeout_ms"].as_i64().unwrap_or(60_000),
                    max_attempts: d["max_attempts"].as_i64().unwrap_or(1) as i32,
                    preferred_agent: d["preferred_agent"].as_str().map(str::to_owned),
                    status: TaskStatus::Pending,
                    attempt: 0,
                    agent: None,
                    deadline: 0,
                    accepted_at: event.at,
                    seq: self.seq,
                };
                self.pending.entry(partition).or_default().insert((
                    Reverse(task.priority),
                    task.seq,
                    task_id.clone(),
                ));
                self.tasks.insert(task_id, task);
                self.stats.tasks_delegated += 1;
            }
            E::TaskAssigned => {
                self.release(&task_id);
                let Some(task) = self.tasks.get_mut(&task_id) else {
                    return;
                };
                task.status = TaskStatus::Assigned;
                task.attempt = event.attempt.unwrap_or(task.attempt + 1);
                task.deadline = event.at.saturating_add(task.timeout_ms);
                task.agent = Some(agent_id.clone());
                self.deadlines
                    .entry(task.partition)
                    .or_default()
                    .insert((task.deadline, task_id.clone()));
                match self.agents.get_mut(&agent_id) {
                    Some(agent) => {
                        // Assigned (in the deciding instance's view) before the agent was
                        // lost or left: the loss was folded first, so orphan it here.
                        if agent.status != AgentStatus::Alive {
                            self.orphans
                                .entry(task.partition)
                                .or_default()
                                .insert(task_id.clone());
                        }
                        agent.holding.insert(task_id);
                    }
                    None => {
                        self.unattached.entry(agent_id).or_default().insert(task_id);
                    }
                }
            }
            E::TaskStarted => {
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    task.status = TaskStatus::Running;
                }
            }
            E::TaskCompleted => {
                self.release(&task_id);
                let Some(task) = self.tasks.get_mut(&task_id) else {
                    return;
                };
                task.status = TaskStatus::Completed;
                self.stats.tasks_completed += 1;
                self.stats.completion_ms_sum += (event.at - task.accepted_at).max(0) as u64;
                if let (Some(workflow), Some(step)) = (&task.workflow_id, &task.step_id)
                    && let Some(workflow) = self.workflows.get_mut(workflow)
                {
                    workflow.results.insert(step.clone(), d["result"].clone());
                }
            }
            E::TaskFailed | E::TaskTimedOut => {
                self.release(&task_id);
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    task.status = TaskStatus::Interrupted;
                }
                if event.event_type == E::TaskFailed {
                    self.stats.tasks_failed += 1;
                } else {
                    self.stats.tasks_timed_out += 1;
                }
            }
            E::TaskRedelegated => {
                self.release(&task_id);
                let Some(task) = self.tasks.get_mut(&task_id) else {
                    return;
                };
                task.status = TaskStatus::Pending;
                self.pending.entry(task.partition).or_default().insert((
                    Reverse(task.priority),
                    task.seq,
                    task_id.clone(),
                ));
                self.stats.tasks_redelegated += 1;
            }
            E::TaskDeadLettered | E::TaskCancelled => {
                self.release(&task_id);
                if let Some(task) = self.tasks.get_mut(&task_id) {
                    task.status = if event.event_type == E::TaskCancelled {
                        TaskStatus::Cancelled
                    } else {
                        TaskStatus::DeadLettered
                    };
                }
                if event.event_type == E::TaskCancelled {
                    self.stats.tasks_cancelled += 1;
                } else {
                    self.stats.tasks_dead_lettered += 1;
                }
            }
            E::TemplateDefined => {
                let steps: Vec<WorkflowStep> = serde_json::from_value(d["steps"].clone()).unwrap_or_default();
                let name = d["name"].as_str().unwrap_or_default().to_owned();
                let version = d["version"].as_i64().unwrap_or(1) as i32;
                for workflow_id in self
                    .awaiting_template
                    .remove(&(name.clone(), version))
                    .unwrap_or_default()
                {
                    if let Some(workflow) = self.workflows.get_mut(&workflow_id) {
                        workflow.steps = steps.clone();
                        workflow.awaiting_template = false;
                    }
                }
                self.templates.entry(name).or_default().insert(version, steps);
            }
            E::WorkflowStarted => {
                let id = event.workflow_id.clone().unwrap_or_default();
                let template = d["template"].as_str().unwrap_or_default().to_owned();
                let version = d["template_version"].as_i64().unwrap_or(1) as i32;
                let steps = match serde_json::from_value::<Vec<WorkflowStep>>(d["steps"].clone()) {
                    Ok(steps) => Some(steps),
                    Err(_) => self
                        .templates
                        .get(&template)
                        .and_then(|t| t.get(&version))
                        .cloned(),
                };
                let awaiting_template = steps.is_none();
                if awaiting_template {
                    self.awaiting_template
                        .entry((template.clone(), version))
                        .or_default()
                        .insert(id.clone());
                }
                self.workflows.insert(
                    id.clone(),
                    Workflow {
                        id,
                        template,
                        template_version: version,
                        steps: steps.unwrap_or_default(),
                        awaiting_template,
                        input: d["input"].clone(),
                        priority: d["priority"].as_i64().unwrap_or(0) as i32,
                        status: WorkflowStatus::Running,
                        started_at: event.at,
                        released: BTreeSet::new(),
                        results: BTreeMap::new(),
                    },
                );
                self.stats.workflows_active += 1;
            }
            E::WorkflowStepReady => {
                if let (Some(workflow), Some(step)) = (&event.workflow_id, &event.step_id)
                    && let Some(workflow) = self.workflows.get_mut(workflow)
                {
                    workflow.released.insert(step.clone());
                }
            }
            E::WorkflowCompleted | E::WorkflowFailed | E::WorkflowCancelled => {
                if let Some(workflow) = event.workflow_id.as_ref().and_then(|w| self.workflows.get_mut(w))
                    && workflow.status == WorkflowStatus::Running
                {
                    workflow.status = if event.event_type == E::WorkflowCompleted {
                        self.stats.workflows_completed += 1;
                        WorkflowStatus::Completed
                    } else {
                        self.stats.workflows_failed += 1;
                        WorkflowStatus::Failed
                    };
                    self.stats.workflows_active = self.stats.workflows_active.saturating_sub(1);
                }
            }
            E::CommandRejected => self.stats.rejected += 1,
        }
    }
}
