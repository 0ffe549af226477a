//! Decisions: a command (or the passing of time) in, events out. Each decided event is
//! applied to the [`State`] at once, so the next decision of the same batch sees it, and the
//! state stays the fold of the decided events. Deciding reads no clock: `now` is the
//! partition clock, the largest record timestamp among the commands of the partition (the
//! owner appends a `Tick` every tick interval so that it advances when nothing else happens).
//! Given the same state, commands and clock, the decisions are the same (see the tests).

use std::cmp::Reverse;
use std::ops::Bound;

use memos_schemas::task::{TaskCommand, TaskEvent, TaskEventType as E, WorkflowStep};
use serde_json::{Value, json};

use crate::state::{AgentStatus, State, TaskStatus, WorkflowStatus};

/// What the orchestrator decides with, besides the log.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// An agent whose last heartbeat is older than this is not eligible and is lost.
    pub heartbeat_window_ms: i64,
    /// The most an event's `data_json` may hold: what the events topic accepts, less room
    /// for the event's other fields ([`Rules::for_max_message_bytes`]). What a decision
    /// gathers from several commands (a workflow's results, a step's inputs) is referred to
    /// instead of copied when it would not fit: an event the topic refuses would stop the
    /// partition for good.
    pub max_event_data_bytes: usize,
}

impl Rules {
    /// Room left in a record for an event's fields besides `data_json` (ids, reason, actor,
    /// traceparent: each bounded far below this by validation).
    pub const EVENT_FIELDS_BYTES: usize = 16 * 1024;

    pub fn for_max_message_bytes(heartbeat_window_ms: i64, max_message_bytes: usize) -> Rules {
        Rules {
            heartbeat_window_ms,
            max_event_data_bytes: max_message_bytes.saturating_sub(Self::EVENT_FIELDS_BYTES),
        }
    }
}

/// Emits events for one partition at one instant, applying each to the state.
struct Decision<'a> {
    state: &'a mut State,
    rules: &'a Rules,
    partition: i32,
    now: i64,
    command_id: Option<String>,
    command_type: Option<&'static str>,
    actor: Option<String>,
    traceparent: Option<String>,
    events: Vec<TaskEvent>,
}

impl<'a> Decision<'a> {
    fn new(state: &'a mut State, rules: &'a Rules, partition: i32, now: i64) -> Self {
        Decision {
            state,
            rules,
            partition,
            now,
            command_id: None,
            command_type: None,
            actor: None,
            traceparent: None,
            events: Vec::new(),
        }
    }

    fn for_command(
        state: &'a mut State,
        rules: &'a Rules,
        partition: i32,
        now: i64,
        command: &TaskCommand,
    ) -> Self {
        let mut decision = Decision::new(state, rules, partition, now);
        decision.command_id = Some(command.command_id().to_owned());
        decision.command_type = Some(command.type_name());
        decision.actor = Some(command.actor().to_owned());
        decision.traceparent = command.traceparent().map(str::to_owned);
        decision
    }

    /// A new event of `event_type` caused by the current command (if any).
    fn event(&self, event_type: E) -> TaskEvent {
        let mut event = TaskEvent::new(String::new(), event_type, self.now);
        event.command_id = self.command_id.clone();
        event.actor = self.actor.clone();
        event.traceparent = self.traceparent.clone();
        event
    }

    fn emit(&mut self, mut event: TaskEvent) {
        event.event_id = self.state.next_event_id(self.partition);
        self.state.apply(self.partition, &event);
        self.events.push(event);
    }

    fn reject(&mut self, command: &TaskCommand, reason: impl Into<String>) {
        let mut event = self.event(E::CommandRejected);
        event.command_type = self.command_type.map(str::to_owned);
        let (task, agent, workflow) = command.subject();
        event.task_id = task.map(str::to_owned);
        event.agent_id = agent.map(str::to_owned);
        event.workflow_id = workflow.map(str::to_owned);
        event.reason = Some(reason.into());
        self.emit(event);
    }

    fn task_event(&self, event_type: E, task_id: &str) -> TaskEvent {
        let mut event = self.event(event_type);
        event.task_id = Some(task_id.to_owned());
        if let Some(task) = self.state.tasks.get(task_id) {
            event.workflow_id = task.workflow_id.clone();
            event.step_id = task.step_id.clone();
            event.agent_id = task.agent.clone();
            event.attempt = Some(task.attempt);
        }
        event
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_task(
        &mut self,
        task_id: &str,
        workflow_id: Option<&str>,
        step_id: Option<&str>,
        required: &[String],
        payload: Value,
        priority: i32,
        timeout_ms: i64,
        max_attempts: i32,
        preferred_agent: Option<&str>,
    ) {
        let mut event = self.event(E::TaskAccepted);
        event.task_id = Some(task_id.to_owned());
        event.workflow_id = workflow_id.map(str::to_owned);
        event.step_id = step_id.map(str::to_owned);
        event.data_json = Some(
            json!({
                "required_capabilities": required,
                "payload": payload,
                "priority": priority,
                "timeout_ms": timeout_ms,
                "max_attempts": max_attempts,
                "preferred_agent": preferred_agent,
            })
            .to_string(),
        );
        self.emit(event);
    }

    /// After an attempt ended without success: another attempt, or the dead letter.
    fn retry_or_dead_letter(
        &mut self,
        task_id: &str,
        previous_agent: Option<String>,
        reason: &str,
        retriable: bool,
    ) {
        let Some(task) = self.state.tasks.get(task_id) else {
            return;
        };
        let (attempt, max) = (task.attempt, task.max_attempts);
        if retriable && attempt < max {
            let mut event = self.task_event(E::TaskRedelegated, task_id);
            event.agent_id = previous_agent;
            event.attempt = Some(attempt + 1);
            event.reason = Some(reason.to_owned());
            self.emit(event);
        } else {
            let mut event = self.task_event(E::TaskDeadLettered, task_id);
            event.agent_id = previous_agent;
            event.reason = Some(if retriable {
                format!("max attempts ({max}) reached; last: {reason}")
            } else {
                format!("not retriable: {reason}")
            });
            let why = event.reason.clone().unwrap_or_default();
            self.emit(event);
            self.fail_workflow_of(task_id, &why);
        }
    }

    fn fail_workflow_of(&mut self, task_id: &str, reason: &str) {
        let Some(task) = self.state.tasks.get(task_id) else {
            return;
        };
        let (Some(workflow_id), Some(step_id)) = (task.workflow_id.clone(), task.step_id.clone()) else {
            return;
        };
        if self.state.workflows.get(&workflow_id).map(|w| w.status) != Some(WorkflowStatus::Running) {
            return;
        }
        let mut event = self.event(E::WorkflowFailed);
        event.workflow_id = Some(workflow_id);
        event.step_id = Some(step_id);
        event.reason = Some(format!("step failed: {reason}"));
        self.emit(event);
    }

    /// Makes tasks of the workflow's steps whose dependencies have all completed, and
    /// completes the workflow when every step has.
    fn advance_workflow(&mut self, workflow_id: &str) {
        let Some(workflow) = self.state.workflows.get(workflow_id) else {
            return;
        };
        if workflow.status != WorkflowStatus::Running || workflow.awaiting_template {
            return;
        }
        if workflow.results.len() == workflow.steps.len() {
            let results: serde_json::Map<String, Value> = workflow
                .results
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let duration = self.now - workflow.started_at;
            let mut data = json!({"results": results, "duration_ms": duration}).to_string();
            if data.len() > self.rules.max_event_data_bytes {
                // Each result is in its step's TASK_COMPLETED: name the tasks instead.
                let tasks: serde_json::Map<String, Value> = workflow
                    .results
                    .keys()
                    .map(|step| (step.clone(), json!(format!("{workflow_id}/{step}"))))
                    .collect();
                data = json!({
                    "results": null,
                    "results_omitted": format!(
                        "the steps' results ({} bytes) exceed what one event holds ({} bytes): read each step's task",
                        data.len(),
                        self.rules.max_event_data_bytes
                    ),
                    "result_tasks": tasks,
                    "duration_ms": duration,
                })
                .to_string();
            }
            let mut event = self.event(E::WorkflowCompleted);
            event.workflow_id = Some(workflow_id.to_owned());
            event.data_json = Some(data);
            self.emit(event);
            return;
        }
        let ready: Vec<(WorkflowStep, Value)> = workflow
            .steps
            .iter()
            .filter(|s| !workflow.released.contains(&s.step_id))
            .filter(|s| s.depends_on.iter().all(|d| workflow.results.contains_key(d)))
            .map(|s| {
                let inputs: serde_json::Map<String, Value> = s
                    .depends_on
                    .iter()
                    .map(|d| (d.clone(), workflow.results[d].clone()))
                    .collect();
                let payload = json!({"input": workflow.input, "steps": inputs});
                (s.clone(), self.fit_step_payload(workflow_id, s, payload))
            })
            .collect();
        let priority = workflow.priority;
        for (step, payload) in ready {
            let task_id = format!("{workflow_id}/{}", step.step_id);
            let mut event = self.event(E::WorkflowStepReady);
            event.workflow_id = Some(workflow_id.to_owned());
            event.step_id = Some(step.step_id.clone());
            event.task_id = Some(task_id.clone());
            self.emit(event);
            self.accept_task(
                &task_id,
                Some(workflow_id),
                Some(&step.step_id),
                std::slice::from_ref(&step.capability),
                payload,
                priority,
                step.timeout_ms,
                step.max_attempts,
                None,
            );
        }
    }

    /// A step's payload (the workflow's input and its dependencies' results), or, when that
    /// would not fit in its events (`TASK_ACCEPTED` and `TASK_ASSIGNED` both carry it), the
    /// input alone with the dependencies' task ids to read their results from, and failing
    /// that the workflow's id to read the input from.
    fn fit_step_payload(&self, workflow_id: &str, step: &WorkflowStep, payload: Value) -> Value {
        let budget = self.rules.max_event_data_bytes;
        // Room for the other data fields of the events that carry it: TASK_ASSIGNED's
        // agent capabilities (at most 32 of 128 bytes), limits, priority.
        let fits = |v: &Value| v.to_string().len() + 12 * 1024 <= budget;
        if fits(&payload) {
            return payload;
        }
        let tasks: serde_json::Map<String, Value> = step
            .depends_on
            .iter()
            .map(|d| (d.clone(), json!(format!("{workflow_id}/{d}"))))
            .collect();
        let why = format!("the step's inputs exceed what one event holds ({budget} bytes)");
        let referred = json!({"input": payload["input"], "steps": null, "step_tasks": tasks, "omitted": why});
        if fits(&referred) {
            return referred;
        }
        json!({"input": null, "workflow": workflow_id, "steps": null, "step_tasks": tasks, "omitted": why})
    }

    /// The task, if `agent` holds it in a state where it may report on it.
    fn held_by(&self, task_id: &str, agent: &str, allowed: &[TaskStatus]) -> Result<(), String> {
        let Some(task) = self.state.tasks.get(task_id) else {
            return Err(format!("unknown task {task_id}"));
        };
        if task.agent.as_deref() != Some(agent) {
            return Err(format!("task {task_id} is not held by agent {agent}"));
        }
        if !allowed.contains(&task.status) {
            return Err(format!("task {task_id} is {:?}", task.status).to_lowercase());
        }
        Ok(())
    }
}

/// Decides one command of `partition` at partition time `now`.
pub fn decide(
    state: &mut State,
    rules: &Rules,
    partition: i32,
    now: i64,
    command: &TaskCommand,
) -> Vec<TaskEvent> {
    if matches!(command, TaskCommand::Tick(_)) || state.seen(command.command_id()) {
        return Vec::new();
    }
    let mut d = Decision::for_command(state, rules, partition, now, command);
    if let Err(e) = command.validate() {
        d.reject(command, format!("invalid: {e}"));
        return d.events;
    }
    match command {
        TaskCommand::RegisterAgent(c) => {
            let metadata: Value = serde_json::from_str(&c.metadata_json).unwrap_or(Value::Null);
            let mut event = d.event(E::AgentRegistered);
            event.agent_id = Some(c.agent_id.clone());
            event.data_json = Some(
                json!({
                    "capabilities": c.capabilities,
                    "max_concurrent": c.max_concurrent,
                    "metadata": metadata,
                })
                .to_string(),
            );
            d.emit(event);
        }
        TaskCommand::Heartbeat(c) => match d.state.agents.get(&c.agent_id).map(|a| a.status) {
            None => d.reject(command, format!("unknown agent {}", c.agent_id)),
            Some(AgentStatus::Deregistered) => {
                d.reject(command, format!("agent {} is deregistered", c.agent_id))
            }
            Some(_) => {
                let mut event = d.event(E::AgentHeartbeat);
                event.agent_id = Some(c.agent_id.clone());
                d.emit(event);
            }
        },
        TaskCommand::DeregisterAgent(c) => match d.state.agents.get(&c.agent_id).map(|a| a.status) {
            None => d.reject(command, format!("unknown agent {}", c.agent_id)),
            Some(AgentStatus::Deregistered) => {
                d.reject(command, format!("agent {} is deregistered", c.agent_id))
            }
            Some(_) => {
                let mut event = d.event(E::AgentDeregistered);
                event.agent_id = Some(c.agent_id.clone());
                d.emit(event);
            }
        },
        TaskCommand::Delegate(c) => {
            if d.state.tasks.contains_key(&c.task_id) {
                d.reject(command, format!("task {} exists", c.task_id));
            } else {
                let payload = serde_json::from_str(&c.payload_json).unwrap_or(Value::Null);
                d.accept_task(
                    &c.task_id,
                    c.workflow_id.as_deref(),
                    None,
                    &c.required_capabilities,
                    payload,
                    c.priority,
                    c.timeout_ms,
                    c.max_attempts,
                    c.preferred_agent.as_deref(),
                );
            }
        }
        TaskCommand::Start(c) => match d.held_by(&c.task_id, &c.agent_id, &[TaskStatus::Assigned]) {
            Err(reason) => d.reject(command, reason),
            Ok(()) => {
                let event = d.task_event(E::TaskStarted, &c.task_id);
                d.emit(event);
            }
        },
        TaskCommand::Complete(c) => {
            match d.held_by(
                &c.task_id,
                &c.agent_id,
                &[TaskStatus::Assigned, TaskStatus::Running],
            ) {
                Err(reason) => d.reject(command, reason),
                Ok(()) => {
                    let result: Value = serde_json::from_str(&c.result_json).unwrap_or(Value::Null);
                    let duration = d.state.tasks.get(&c.task_id).map_or(0, |t| now - t.accepted_at);
                    let mut event = d.task_event(E::TaskCompleted, &c.task_id);
                    event.data_json = Some(json!({"result": result, "duration_ms": duration}).to_string());
                    d.emit(event);
                    if let Some(workflow) = d.state.tasks.get(&c.task_id).and_then(|t| t.workflow_id.clone())
                    {
                        d.advance_workflow(&workflow);
                    }
                }
            }
        }
        TaskCommand::Fail(c) => {
            match d.held_by(
                &c.task_id,
                &c.agent_id,
                &[TaskStatus::Assigned, TaskStatus::Running],
            ) {
                Err(reason) => d.reject(command, reason),
                Ok(()) => {
                    let mut event = d.task_event(E::TaskFailed, &c.task_id);
                    event.reason = Some(c.error.clone());
                    event.data_json = Some(json!({"retriable": c.retriable}).to_string());
                    d.emit(event);
                    d.retry_or_dead_letter(&c.task_id, Some(c.agent_id.clone()), &c.error, c.retriable);
                }
            }
        }
        TaskCommand::Cancel(c) => match d.state.tasks.get(&c.task_id).map(|t| t.status) {
            None => d.reject(command, format!("unknown task {}", c.task_id)),
            Some(status) if status.is_terminal() => d.reject(
                command,
                format!("task {} is already {status:?}", c.task_id).to_lowercase(),
            ),
            Some(_) => {
                let reason = c.reason.clone().unwrap_or_else(|| "cancelled".into());
                let mut event = d.task_event(E::TaskCancelled, &c.task_id);
                event.reason = Some(reason.clone());
                d.emit(event);
                d.fail_workflow_of(&c.task_id, &format!("cancelled: {reason}"));
            }
        },
        TaskCommand::DefineTemplate(c) => {
            let existing = d.state.templates.get(&c.name).and_then(|t| t.get(&c.version));
            if let Some(existing) = existing {
                if *existing != c.steps {
                    d.reject(
                        command,
                        format!(
                            "template {} version {} exists with other steps",
                            c.name, c.version
                        ),
                    );
                } else {
                    d.reject(
                        command,
                        format!("template {} version {} exists", c.name, c.version),
                    );
                }
            } else {
                // The steps form a DAG: `validate` checked them (`validate::WorkflowDag`).
                let mut event = d.event(E::TemplateDefined);
                event.data_json =
                    Some(json!({"name": c.name, "version": c.version, "steps": c.steps}).to_string());
                d.emit(event);
            }
        }
        TaskCommand::StartWorkflow(c) => {
            let version = d
                .state
                .templates
                .get(&c.template)
                .and_then(|versions| match c.template_version {
                    Some(v) => versions.contains_key(&v).then_some(v),
                    None => versions.keys().next_back().copied(),
                });
            if d.state.workflows.contains_key(&c.workflow_id) {
                d.reject(command, format!("workflow {} exists", c.workflow_id));
            } else if let Some(version) = version {
                let input: Value = serde_json::from_str(&c.input_json).unwrap_or(Value::Null);
                // The start carries its steps, so folding it needs no other partition.
                let steps = &d.state.templates[&c.template][&version];
                let data = json!({
                    "template": c.template,
                    "template_version": version,
                    "input": input,
                    "priority": c.priority,
                    "steps": steps,
                })
                .to_string();
                if data.len() > d.rules.max_event_data_bytes {
                    let reason = format!(
                        "the input ({} bytes) with the steps of template {} version {version} exceed what one event holds ({} bytes)",
                        c.input_json.len(),
                        c.template,
                        d.rules.max_event_data_bytes
                    );
                    d.reject(command, reason);
                } else {
                    let mut event = d.event(E::WorkflowStarted);
                    event.workflow_id = Some(c.workflow_id.clone());
                    event.data_json = Some(data);
                    d.emit(event);
                    d.advance_workflow(&c.workflow_id);
                }
            } else {
                d.reject(
                    command,
                    format!(
                        "unknown template {} (version {:?})",
                        c.template, c.template_version
                    ),
                );
            }
        }
        TaskCommand::Tick(_) => {}
    }
    d.events
}

/// Decides what time and other partitions' events call for in `partition`: agents of this
/// partition that missed their heartbeat are lost; tasks whose agent is lost or left, or
/// whose attempt timed out, are re-delegated or dead-lettered; waiting tasks are assigned,
/// highest priority first, each to the least loaded eligible agent (its preferred agent when
/// that one is eligible; ties broken by agent id).
pub fn reconcile(state: &mut State, rules: &Rules, partition: i32, now: i64) -> Vec<TaskEvent> {
    let mut d = Decision::new(state, rules, partition, now);

    let lost: Vec<(String, i64)> = d
        .state
        .agents
        .values()
        .filter(|a| a.home == partition && a.status == AgentStatus::Alive)
        .filter(|a| now - a.last_heartbeat > rules.heartbeat_window_ms)
        .map(|a| (a.id.clone(), a.last_heartbeat))
        .collect();
    for (agent, last) in lost {
        let mut event = d.event(E::AgentLost);
        event.agent_id = Some(agent);
        event.reason = Some(format!(
            "no heartbeat for {} ms (window {} ms)",
            now - last,
            rules.heartbeat_window_ms
        ));
        d.emit(event);
    }

    let orphans: Vec<String> = d
        .state
        .orphans
        .get(&partition)
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    for task_id in orphans {
        let agent = d.state.tasks.get(&task_id).and_then(|t| t.agent.clone());
        let status = agent
            .as_ref()
            .and_then(|a| d.state.agents.get(a))
            .map(|a| a.status);
        let reason = match status {
            Some(AgentStatus::Deregistered) => "agent deregistered",
            _ => "agent lost",
        };
        d.retry_or_dead_letter(&task_id, agent, reason, true);
    }

    let expired: Vec<String> = d
        .state
        .deadlines
        .get(&partition)
        .into_iter()
        .flatten()
        .take_while(|(deadline, _)| *deadline <= now)
        .map(|(_, id)| id.clone())
        .collect();
    for task_id in expired {
        let agent = d.state.tasks.get(&task_id).and_then(|t| t.agent.clone());
        let timeout = d.state.tasks.get(&task_id).map_or(0, |t| t.timeout_ms);
        let reason = format!("attempt timed out after {timeout} ms");
        let mut event = d.task_event(E::TaskTimedOut, &task_id);
        event.reason = Some(reason.clone());
        d.emit(event);
        d.retry_or_dead_letter(&task_id, agent, &reason, true);
    }

    assign_waiting(&mut d, rules);
    d.events
}

fn assign_waiting(d: &mut Decision<'_>, rules: &Rules) {
    let now = d.now;
    let alive = |a: &crate::state::Agent| {
        a.status == AgentStatus::Alive && now - a.last_heartbeat <= rules.heartbeat_window_ms
    };
    // A cursor over the waiting set (it changes as tasks are assigned): tasks without an
    // eligible agent stay behind it, and the walk stops as soon as no agent has a free slot,
    // so a long queue with no capacity costs nothing.
    let mut after: Option<(Reverse<i32>, u64, String)> = None;
    loop {
        if !d
            .state
            .agents
            .values()
            .any(|a| alive(a) && a.holding.len() < a.max_concurrent)
        {
            return;
        }
        let Some(waiting) = d.state.pending.get(&d.partition) else {
            return;
        };
        let next = match &after {
            None => waiting.iter().next(),
            Some(key) => waiting
                .range((Bound::Excluded(key.clone()), Bound::Unbounded))
                .next(),
        };
        let Some(key) = next.cloned() else { return };
        let task_id = key.2.clone();
        after = Some(key);
        let Some(task) = d.state.tasks.get(&task_id) else {
            continue;
        };
        let eligible = |a: &&crate::state::Agent| {
            alive(a) && a.holding.len() < a.max_concurrent && task.required.is_subset(&a.capabilities)
        };
        let preferred = task
            .preferred_agent
            .as_ref()
            .and_then(|p| d.state.agents.get(p))
            .filter(|a| eligible(a));
        let chosen = preferred
            .or_else(|| {
                d.state
                    .agents
                    .values()
                    .filter(eligible)
                    .min_by_key(|a| (a.holding.len(), &a.id))
            })
            .map(|a| a.id.clone());
        let Some(agent) = chosen else { continue };
        let (payload, priority, attempt, deadline) = (
            task.payload.clone(),
            task.priority,
            task.attempt + 1,
            now.saturating_add(task.timeout_ms),
        );
        // The agent's registration lives on its own partition, which a view may fold after
        // this one: the assignment says what it was assigned to, so the view never holds a
        // task for an agent it does not know.
        let assignee = &d.state.agents[&agent];
        let assignee = json!({
            "capabilities": assignee.capabilities,
            "max_concurrent": assignee.max_concurrent,
        });
        let mut event = d.task_event(E::TaskAssigned, &task_id);
        event.agent_id = Some(agent);
        event.attempt = Some(attempt);
        event.data_json = Some(
            json!({"payload": payload, "priority": priority, "deadline": deadline, "agent": assignee})
                .to_string(),
        );
        d.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use memos_schemas::task::{
        CompleteTask, DefineWorkflowTemplate, DelegateTask, RegisterAgent, StartWorkflow,
    };

    use super::*;

    const RULES: Rules = Rules {
        heartbeat_window_ms: 10_000,
        max_event_data_bytes: 1 << 20,
    };

    fn id(n: u64) -> String {
        uuid::Uuid::from_u128(u128::from(n) + 1).to_string()
    }

    fn agent(n: u64, name: &str, max: i32) -> TaskCommand {
        TaskCommand::RegisterAgent(RegisterAgent {
            command_id: id(n),
            actor: name.into(),
            issued_at: 0,
            traceparent: None,
            agent_id: name.into(),
            capabilities: vec!["x".into()],
            max_concurrent: max,
            metadata_json: "{}".into(),
        })
    }

    fn task(n: u64, name: &str, priority: i32, timeout_ms: i64, max_attempts: i32) -> TaskCommand {
        TaskCommand::Delegate(DelegateTask {
            command_id: id(n),
            actor: "t".into(),
            issued_at: 0,
            traceparent: None,
            task_id: name.into(),
            required_capabilities: vec!["x".into()],
            payload_json: "{}".into(),
            priority,
            timeout_ms,
            max_attempts,
            preferred_agent: None,
            workflow_id: None,
        })
    }

    /// Decides `commands` in partition 0 at time 1000, reconciling after each.
    fn run(state: &mut State, commands: &[TaskCommand]) -> Vec<TaskEvent> {
        let mut events = Vec::new();
        for command in commands {
            events.extend(decide(state, &RULES, 0, 1000, command));
            events.extend(reconcile(state, &RULES, 0, 1000));
        }
        events
    }

    fn assignments(events: &[TaskEvent]) -> Vec<(String, String, i32)> {
        events
            .iter()
            .filter(|e| e.event_type == E::TaskAssigned)
            .map(|e| {
                (
                    e.task_id.clone().unwrap(),
                    e.agent_id.clone().unwrap(),
                    e.attempt.unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn same_log_gives_same_decisions_and_the_fold_of_them_gives_the_same_state() {
        let commands = vec![
            task(1, "t1", 0, 60_000, 3),
            agent(2, "a", 2),
            task(3, "t2", 1, 60_000, 3),
            agent(4, "b", 2),
            task(5, "t3", 0, 60_000, 3),
        ];
        let (mut one, mut two) = (State::new(), State::new());
        let first = run(&mut one, &commands);
        assert_eq!(first, run(&mut two, &commands));
        let mut rebuilt = State::new();
        for event in &first {
            rebuilt.apply(0, event);
        }
        for (name, task) in &one.tasks {
            let again = &rebuilt.tasks[name];
            assert_eq!(
                (task.status, &task.agent, task.attempt),
                (again.status, &again.agent, again.attempt)
            );
        }
        assert_eq!(one.stats, rebuilt.stats);
        assert_eq!(rebuilt.next_event_id(0), one.next_event_id(0));
    }

    #[test]
    fn waiting_tasks_go_by_priority_to_the_least_loaded_agent_ties_by_id() {
        let mut state = State::new();
        let mut events = Vec::new();
        for (n, (name, priority)) in [("low", 0), ("high", 5), ("high2", 5), ("mid", 2)]
            .iter()
            .enumerate()
        {
            events.extend(decide(
                &mut state,
                &RULES,
                0,
                1000,
                &task(n as u64, name, *priority, 60_000, 3),
            ));
        }
        assert!(
            assignments(&reconcile(&mut state, &RULES, 0, 1000)).is_empty(),
            "no agent yet"
        );
        decide(&mut state, &RULES, 0, 1000, &agent(10, "b", 2));
        decide(&mut state, &RULES, 0, 1000, &agent(11, "a", 2));
        let assigned = assignments(&reconcile(&mut state, &RULES, 0, 1000));
        let expected = [("high", "a"), ("high2", "b"), ("mid", "a"), ("low", "b")];
        let expected: Vec<_> = expected
            .iter()
            .map(|(t, a)| (t.to_string(), a.to_string(), 1))
            .collect();
        assert_eq!(assigned, expected);
    }

    #[test]
    fn timeouts_redelegate_then_dead_letter_after_max_attempts() {
        let mut state = State::new();
        run(&mut state, &[agent(1, "a", 1), task(2, "t", 0, 100, 2)]);
        let events = reconcile(&mut state, &RULES, 0, 1101);
        let kinds: Vec<E> = events.iter().map(|e| e.event_type).collect();
        assert_eq!(kinds, [E::TaskTimedOut, E::TaskRedelegated, E::TaskAssigned]);
        assert_eq!(assignments(&events), [("t".to_owned(), "a".to_owned(), 2)]);
        let events = reconcile(&mut state, &RULES, 0, 1202);
        let kinds: Vec<E> = events.iter().map(|e| e.event_type).collect();
        assert_eq!(kinds, [E::TaskTimedOut, E::TaskDeadLettered]);
        assert!(events[1].reason.as_deref().unwrap().contains("max attempts (2)"));
        assert_eq!(
            state.agents["a"].holding.len(),
            0,
            "the dead letter frees the agent"
        );
    }

    #[test]
    fn a_retried_command_is_a_no_op_and_a_silent_agent_is_lost() {
        let mut state = State::new();
        let delegate = task(1, "t", 0, 60_000, 3);
        run(&mut state, &[agent(2, "a", 1), delegate.clone()]);
        assert!(decide(&mut state, &RULES, 0, 1000, &delegate).is_empty());
        let events = reconcile(&mut state, &RULES, 0, 1000 + RULES.heartbeat_window_ms + 1);
        let kinds: Vec<E> = events.iter().map(|e| e.event_type).collect();
        assert_eq!(
            kinds,
            [E::AgentLost, E::TaskRedelegated],
            "no agent left to take it"
        );
        assert_eq!(state.pending_count(0), 1);
    }

    #[test]
    fn cycles_and_unknown_dependencies_are_rejected() {
        let step = |id: &str, deps: &[&str]| WorkflowStep {
            step_id: id.into(),
            capability: "x".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            timeout_ms: 1,
            max_attempts: 1,
        };
        let define = |steps: Vec<WorkflowStep>| {
            TaskCommand::DefineTemplate(DefineWorkflowTemplate {
                command_id: uuid::Uuid::new_v4().to_string(),
                actor: "boss".into(),
                issued_at: 0,
                traceparent: None,
                name: "t".into(),
                version: 1,
                steps,
            })
        };
        let reason = |steps| {
            let mut state = State::new();
            let events = decide(&mut state, &RULES, 0, 0, &define(steps));
            assert_eq!(events.len(), 1, "{events:?}");
            events[0].reason.clone().unwrap_or_default()
        };
        let mut state = State::new();
        let events = decide(
            &mut state,
            &RULES,
            0,
            0,
            &define(vec![step("a", &[]), step("b", &["a"]), step("c", &["a", "b"])]),
        );
        assert_eq!(events[0].event_type, E::TemplateDefined, "{events:?}");
        assert!(reason(vec![step("a", &["c"]), step("b", &["a"]), step("c", &["b"])]).contains("cycle"));
        assert!(reason(vec![step("a", &["z"])]).contains("unknown"));
        assert!(reason(vec![step("a", &[]), step("a", &[])]).contains("twice"));
    }

    /// What decisions depend on, in a form that compares across instances.
    fn summary(state: &State) -> String {
        let mut out = String::new();
        let mut workflows: Vec<_> = state.workflows.values().collect();
        workflows.sort_by(|a, b| a.id.cmp(&b.id));
        for w in workflows {
            let steps: Vec<&str> = w.steps.iter().map(|s| s.step_id.as_str()).collect();
            out += &format!(
                "workflow {} {:?} steps {steps:?} released {:?} results {:?} awaiting {}\n",
                w.id, w.status, w.released, w.results, w.awaiting_template
            );
        }
        let mut tasks: Vec<_> = state.tasks.values().collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        for t in tasks {
            out += &format!(
                "task {} {:?} {:?} attempt {}\n",
                t.id, t.status, t.agent, t.attempt
            );
        }
        for a in state.agents.values() {
            out += &format!("agent {} {:?} holding {:?}\n", a.id, a.status, a.holding);
        }
        let waiting: BTreeMap<i32, Vec<&String>> = state
            .pending
            .iter()
            .map(|(p, set)| (*p, set.iter().map(|(_, _, id)| id).collect()))
            .collect();
        out += &format!("pending {waiting:?}\norphans {:?}\n", state.orphans);
        out += &format!("deadlines {:?}\nstats {:?}\n", state.deadlines, state.stats);
        out
    }

    fn permutations(items: &[i32]) -> Vec<Vec<i32>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for (i, first) in items.iter().enumerate() {
            let mut rest = items.to_vec();
            rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, *first);
                all.push(tail);
            }
        }
        all
    }

    /// A rebuild reads the events partitions one after the other: whichever order it reads
    /// them in, it folds to the state the deciding instance had, and decides the same next.
    /// (On the old fold, a workflow read before its template's partition had no steps and
    /// never finished: issue "Faults" 1.)
    #[test]
    fn the_state_rebuilt_from_the_log_does_not_depend_on_the_order_partitions_are_read_in() {
        let step = |id: &str, deps: &[&str]| WorkflowStep {
            step_id: id.into(),
            capability: "x".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            timeout_ms: 60_000,
            max_attempts: 2,
        };
        let template = TaskCommand::DefineTemplate(DefineWorkflowTemplate {
            command_id: id(100),
            actor: "boss".into(),
            issued_at: 0,
            traceparent: None,
            name: "etl".into(),
            version: 1,
            steps: vec![step("extract", &[]), step("load", &["extract"])],
        });
        let start = |n: u64, workflow: &str| {
            TaskCommand::StartWorkflow(StartWorkflow {
                command_id: id(n),
                actor: "boss".into(),
                issued_at: 0,
                traceparent: None,
                workflow_id: workflow.into(),
                template: "etl".into(),
                template_version: None,
                input_json: "{}".into(),
                priority: 0,
            })
        };
        let complete = |n: u64, task: &str, agent: &str| {
            TaskCommand::Complete(CompleteTask {
                command_id: id(n),
                actor: agent.into(),
                issued_at: 0,
                traceparent: None,
                task_id: task.into(),
                agent_id: agent.into(),
                workflow_id: None,
                result_json: r#"{"ok":true}"#.into(),
            })
        };
        // Template on partition 2, agents on 0 and 2, workflows and a task on 0 and 1.
        let script: Vec<(i32, TaskCommand)> = vec![
            (2, template),
            (2, agent(1, "a", 2)),
            (0, agent(2, "b", 2)),
            (0, start(3, "w0")),
            (1, start(4, "w1")),
            (1, task(5, "t1", 0, 60_000, 2)),
        ];
        let mut live = State::new();
        let mut log: BTreeMap<i32, Vec<TaskEvent>> = BTreeMap::new();
        let mut run_on = |live: &mut State, partition: i32, command: &TaskCommand| {
            let events = decide(live, &RULES, partition, 1000, command);
            log.entry(partition).or_default().extend(events);
            for p in 0..3 {
                let reconciled = reconcile(live, &RULES, p, 1000);
                log.entry(p).or_default().extend(reconciled);
            }
        };
        for (partition, command) in &script {
            run_on(&mut live, *partition, command);
        }
        let agent_of = |state: &State, task: &str| state.tasks[task].agent.clone().unwrap();
        let holder = agent_of(&live, "w0/extract");
        run_on(&mut live, 0, &complete(6, "w0/extract", &holder));
        let log = log;
        assert!(live.tasks.contains_key("w0/load"), "{}", summary(&live));

        // Starts written before starts carried their steps: the same log without them.
        let mut legacy = log.clone();
        for event in legacy.values_mut().flatten() {
            if event.event_type == E::WorkflowStarted {
                let mut data: Value = serde_json::from_str(event.data_json.as_deref().unwrap()).unwrap();
                assert!(data["steps"].is_array(), "a start carries its steps");
                data.as_object_mut().unwrap().remove("steps");
                event.data_json = Some(data.to_string());
            }
        }

        let expected = summary(&live);
        for (name, log) in [("current", &log), ("legacy", &legacy)] {
            for order in permutations(&[0, 1, 2]) {
                let mut rebuilt = State::new();
                for p in &order {
                    for event in &log[p] {
                        rebuilt.apply(*p, event);
                    }
                }
                assert_eq!(summary(&rebuilt), expected, "{name} log read in order {order:?}");
                // And it decides the rest of the workflows as the live instance would.
                let holder = agent_of(&rebuilt, "w0/load");
                let events = decide(&mut rebuilt, &RULES, 0, 2000, &complete(7, "w0/load", &holder));
                let kinds: Vec<E> = events.iter().map(|e| e.event_type).collect();
                assert_eq!(
                    kinds,
                    [E::TaskCompleted, E::WorkflowCompleted],
                    "{name} {order:?}"
                );
                let holder = agent_of(&rebuilt, "w1/extract");
                let events = decide(&mut rebuilt, &RULES, 1, 2000, &complete(8, "w1/extract", &holder));
                let kinds: Vec<E> = events.iter().map(|e| e.event_type).collect();
                assert_eq!(
                    kinds,
                    [E::TaskCompleted, E::WorkflowStepReady, E::TaskAccepted],
                    "{name} {order:?}"
                );
            }
        }
    }

    /// What a workflow gathers from several commands is referred to, not copied, when it would
    /// not fit in an event: the events topic would refuse the event, and the partition would
    /// stop for good. A start that cannot fit is rejected with the reason.
    #[test]
    fn gathered_results_that_would_not_fit_in_an_event_are_referred_to() {
        let rules = Rules::for_max_message_bytes(10_000, 16 * 1024 + 20 * 1024);
        let step = |id: &str, deps: &[&str]| WorkflowStep {
            step_id: id.into(),
            capability: "x".into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            timeout_ms: 60_000,
            max_attempts: 1,
        };
        let mut state = State::new();
        let define = TaskCommand::DefineTemplate(DefineWorkflowTemplate {
            command_id: id(1),
            actor: "boss".into(),
            issued_at: 0,
            traceparent: None,
            name: "fan-in".into(),
            version: 1,
            steps: vec![step("a", &[]), step("b", &[]), step("join", &["a", "b"])],
        });
        let start = |n: u64, workflow: &str, input: String| {
            TaskCommand::StartWorkflow(StartWorkflow {
                command_id: id(n),
                actor: "boss".into(),
                issued_at: 0,
                traceparent: None,
                workflow_id: workflow.into(),
                template: "fan-in".into(),
                template_version: None,
                input_json: input,
                priority: 0,
            })
        };
        let complete = |n: u64, task: &str, result: &str| {
            TaskCommand::Complete(CompleteTask {
                command_id: id(n),
                actor: "a".into(),
                issued_at: 0,
                traceparent: None,
                task_id: task.into(),
                agent_id: "a".into(),
                workflow_id: None,
                result_json: serde_json::to_string(result).unwrap(),
            })
        };
        let mut all = Vec::new();
        for command in [define, agent(2, "a", 10), start(3, "w", "{}".into())] {
            all.extend(decide(&mut state, &rules, 0, 1000, &command));
            all.extend(reconcile(&mut state, &rules, 0, 1000));
        }
        // Two results of 5 KB each: 10 KB together, more than the 8 KB a step payload may
        // hold here (20 KB less 12 KB for the other fields).
        let big = "r".repeat(5_000);
        for (n, task) in [(4, "w/a"), (5, "w/b")] {
            all.extend(decide(&mut state, &rules, 0, 1000, &complete(n, task, &big)));
            all.extend(reconcile(&mut state, &rules, 0, 1000));
        }
        let accepted = all
            .iter()
            .find(|e| e.event_type == E::TaskAccepted && e.task_id.as_deref() == Some("w/join"))
            .expect("the join step is released");
        let data: Value = serde_json::from_str(accepted.data_json.as_deref().unwrap()).unwrap();
        assert_eq!(
            data["payload"]["step_tasks"],
            json!({"a": "w/a", "b": "w/b"}),
            "{data}"
        );
        assert!(data["payload"]["steps"].is_null());
        // Every event fits.
        for event in &all {
            let len = event.data_json.as_deref().map_or(0, str::len);
            assert!(
                len <= rules.max_event_data_bytes,
                "{:?}: {len} bytes",
                event.event_type
            );
        }
        // Three results of 5 KB: 15 KB, within the 20 KB of an event's data: copied.
        let events = decide(&mut state, &rules, 0, 1000, &complete(6, "w/join", &big));
        let done = events
            .iter()
            .find(|e| e.event_type == E::WorkflowCompleted)
            .expect("completed");
        let data: Value = serde_json::from_str(done.data_json.as_deref().unwrap()).unwrap();
        assert_eq!(data["results"]["join"], json!(big));

        // A second run with 8 KB results: 24 KB together, more than an event holds.
        let bigger = "r".repeat(8_000);
        let mut events = decide(&mut state, &rules, 0, 1000, &start(7, "v", "{}".into()));
        events.extend(reconcile(&mut state, &rules, 0, 1000));
        for (n, task) in [(8, "v/a"), (9, "v/b")] {
            events.extend(decide(&mut state, &rules, 0, 1000, &complete(n, task, &bigger)));
            events.extend(reconcile(&mut state, &rules, 0, 1000));
        }
        events.extend(decide(
            &mut state,
            &rules,
            0,
            1000,
            &complete(10, "v/join", &bigger),
        ));
        let done = events
            .iter()
            .find(|e| e.event_type == E::WorkflowCompleted)
            .expect("completed");
        let len = done.data_json.as_deref().unwrap().len();
        assert!(len <= rules.max_event_data_bytes, "{len}");
        let data: Value = serde_json::from_str(done.data_json.as_deref().unwrap()).unwrap();
        assert!(data["results"].is_null(), "{data}");
        assert_eq!(
            data["result_tasks"],
            json!({"a": "v/a", "b": "v/b", "join": "v/join"})
        );

        // A start whose input cannot fit with its steps is rejected, not stuck.
        let events = decide(
            &mut state,
            &rules,
            0,
            1000,
            &start(11, "huge", serde_json::to_string(&"i".repeat(25_000)).unwrap()),
        );
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].event_type, E::CommandRejected);
        assert!(
            events[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("exceed what one event holds")
        );
    }
}
