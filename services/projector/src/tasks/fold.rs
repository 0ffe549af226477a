//! The task fold: applies a batch of the orchestrator's events, in log order, to the rows the
//! batch loaded, and says what to write. Pure and deterministic: no I/O, no clock; every time
//! is an event's decision time (`at`). The orchestrator already decided everything (events
//! are facts, never rejected here), so the fold only records them; it is tolerant of an event
//! about a row it has not seen (a log that starts mid-history), creating the row from what
//! the event says.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeZone, Utc};
use memos_postgres::tasks::{AgentRow, EventRow, TaskChanges, TaskRow, TaskState, TemplateRow, WorkflowRow};
use memos_schemas::task::{TaskEvent, TaskEventType};
use serde_json::Value;

/// A decoded event with its place in the log.
#[derive(Debug, Clone)]
pub struct DecidedEvent {
    pub event: TaskEvent,
    pub partition: i32,
    pub offset: i64,
    pub record_time: DateTime<Utc>,
    /// From the record headers, else from the event.
    pub traceparent: Option<String>,
}

/// What a batch decided.
#[derive(Debug, Default)]
pub struct TaskOutcome {
    pub changes: TaskChanges,
    /// Events recorded, by type.
    pub by_type: BTreeMap<&'static str, usize>,
}

fn time_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Agents, tasks and workflows whose rows the batch changes (see
/// [`memos_postgres::tasks::load_state`]).
pub fn touched(batch: &[DecidedEvent]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut agents, mut tasks, mut workflows) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for decided in batch {
        let e = &decided.event;
        match e.event_type {
            TaskEventType::AgentRegistered
            | TaskEventType::AgentHeartbeat
            | TaskEventType::AgentLost
            | TaskEventType::AgentDeregistered => agents.extend(e.agent_id.clone()),
            TaskEventType::TaskAssigned => {
                // The assignee's row, if the view has it: see `provisional_agent`.
                agents.extend(e.agent_id.clone());
                tasks.extend(e.task_id.clone());
            }
            TaskEventType::TaskAccepted
            | TaskEventType::TaskStarted
            | TaskEventType::TaskCompleted
            | TaskEventType::TaskFailed
            | TaskEventType::TaskTimedOut
            | TaskEventType::TaskRedelegated
            | TaskEventType::TaskDeadLettered
            | TaskEventType::TaskCancelled => tasks.extend(e.task_id.clone()),
            TaskEventType::WorkflowStarted
            | TaskEventType::WorkflowCompleted
            | TaskEventType::WorkflowFailed
            | TaskEventType::WorkflowCancelled => workflows.extend(e.workflow_id.clone()),
            TaskEventType::WorkflowStepReady
            | TaskEventType::TemplateDefined
            | TaskEventType::CommandRejected => {}
        }
    }
    (
        agents.into_iter().collect(),
        tasks.into_iter().collect(),
        workflows.into_iter().collect(),
    )
}

fn str_of(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn i64_of(data: &Value, key: &str) -> Option<i64> {
    data.get(key).and_then(Value::as_i64)
}

fn i32_of(data: &Value, key: &str) -> Option<i32> {
    i64_of(data, key).and_then(|v| i32::try_from(v).ok())
}

fn strings_of(data: &Value, key: &str) -> Vec<String> {
    data.get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The present, non-null value of `key`.
fn value_of(data: &Value, key: &str) -> Option<Value> {
    data.get(key).filter(|v| !v.is_null()).cloned()
}

fn new_task(task_id: &str, e: &TaskEvent, at: DateTime<Utc>) -> TaskRow {
    TaskRow {
        task_id: task_id.to_owned(),
        workflow_id: e.workflow_id.clone(),
        step_id: e.step_id.clone(),
        status: "pending".into(),
        agent_id: None,
        attempt: 0,
        required_capabilities: Vec::new(),
        payload: None,
        priority: 0,
        timeout_ms: None,
        max_attempts: None,
        preferred_agent: None,
        actor: None,
        result: None,
        last_error: None,
        deadline: None,
        duration_ms: None,
        accepted_at: None,
        assigned_at: None,
        started_at: None,
        finished_at: None,
        updated_at: at,
        log_partition: 0,
        log_offset: 0,
    }
}

/// The row of an agent the view meets first as the assignee of a task. The orchestrator
/// assigns only to registered agents, but their registration is on the agent's partition,
/// which may be folded after the task's: without this row the view would hold (and the API
/// serve) an inbox whose agent does not exist. The assignment carries what the orchestrator
/// knew of the agent; its registration, when folded, replaces the whole row, so the final
/// views do not depend on the order partitions are folded in.
fn provisional_agent(agent_id: &str, data: &Value, at: DateTime<Utc>) -> AgentRow {
    let agent = data.get("agent").cloned().unwrap_or(Value::Null);
    AgentRow {
        agent_id: agent_id.to_owned(),
        capabilities: strings_of(&agent, "capabilities"),
        max_concurrent: i32_of(&agent, "max_concurrent").unwrap_or(1),
        metadata: Value::Object(Default::default()),
        status: "alive".into(),
        last_heartbeat_at: None,
        registered_at: at,
        updated_at: at,
    }
}

fn new_workflow(workflow_id: &str, at: DateTime<Utc>) -> WorkflowRow {
    WorkflowRow {
        workflow_id: workflow_id.to_owned(),
        template: String::new(),
        template_version: None,
        status: "running".into(),
        input: None,
        priority: 0,
        results: None,
        failed_step: None,
        reason: None,
        actor: None,
        started_at: at,
        finished_at: None,
        duration_ms: None,
        updated_at: at,
        log_partition: 0,
        log_offset: 0,
    }
}

/// Records every event of the batch (in log order) and computes the final rows.
pub fn fold(mut state: TaskState, batch: &[DecidedEvent], topic: &str) -> TaskOutcome {
    let mut outcome = TaskOutcome::default();
    let (mut agents, mut tasks, mut workflows) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut touched_agents = BTreeSet::new();
    for decided in batch {
        let e = &decided.event;
        let at = time_ms(e.at);
        let data: Value = e
            .data_json
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(Value::Null);
        *outcome.by_type.entry(e.event_type.as_str()).or_default() += 1;
        outcome.changes.events.push(EventRow {
            log_topic: topic.to_owned(),
            log_partition: decided.partition,
            log_offset: decided.offset,
            event_id: e.event_id.clone(),
            event_type: e.event_type.as_str().to_owned(),
            at,
            task_id: e.task_id.clone(),
            workflow_id: e.workflow_id.clone(),
            step_id: e.step_id.clone(),
            agent_id: e.agent_id.clone(),
            attempt: e.attempt,
            reason: e.reason.clone(),
            command_id: e.command_id.clone(),
            command_type: e.command_type.clone(),
            actor: e.actor.clone(),
            data: (!data.is_null()).then(|| data.clone()),
            traceparent: decided.traceparent.clone(),
            record_time: decided.record_time,
        });
        match e.event_type {
            TaskEventType::AgentRegistered
            | TaskEventType::AgentHeartbeat
            | TaskEventType::AgentLost
            | TaskEventType::AgentDeregistered => {
                let Some(agent_id) = e.agent_id.as_deref() else {
                    continue;
                };
                touched_agents.insert(agent_id.to_owned());
                if e.event_type == TaskEventType::AgentRegistered {
                    state.agents.insert(
                        agent_id.to_owned(),
                        AgentRow {
                            agent_id: agent_id.to_owned(),
                            capabilities: strings_of(&data, "capabilities"),
                            max_concurrent: i32_of(&data, "max_concurrent").unwrap_or(1),
                            metadata: value_of(&data, "metadata")
                                .unwrap_or_else(|| Value::Object(Default::default())),
                            status: "alive".into(),
                            last_heartbeat_at: Some(at),
                            registered_at: at,
                            updated_at: at,
                        },
                    );
                    agents.insert(agent_id.to_owned());
                    continue;
                }
                // Heartbeats, losses and deregistrations of an agent never registered in this
                // log have no row to change.
                let Some(agent) = state.agents.get_mut(agent_id) else {
                    continue;
                };
                match e.event_type {
                    TaskEventType::AgentHeartbeat => {
                        agent.last_heartbeat_at = agent.last_heartbeat_at.max(Some(at));
                        // A lost agent that heartbeats again is alive (the orchestrator
                        // assigns to it again); a deregistered one must register anew.
                        if agent.status == "lost" {
                            agent.status = "alive".into();
                        }
                    }
                    TaskEventType::AgentLost => agent.status = "lost".into(),
                    _ => agent.status = "deregistered".into(),
                }
                agent.updated_at = at;
                agents.insert(agent_id.to_owned());
            }
            TaskEventType::TaskAccepted
            | TaskEventType::TaskAssigned
            | TaskEventType::TaskStarted
            | TaskEventType::TaskCompleted
            | TaskEventType::TaskFailed
            | TaskEventType::TaskTimedOut
            | TaskEventType::TaskRedelegated
            | TaskEventType::TaskDeadLettered
            | TaskEventType::TaskCancelled => {
                let Some(task_id) = e.task_id.as_deref() else {
                    continue;
                };
                if e.event_type == TaskEventType::TaskAssigned
                    && let Some(agent_id) = e.agent_id.as_deref()
                    && !state.agents.contains_key(agent_id)
                {
                    state
                        .agents
                        .insert(agent_id.to_owned(), provisional_agent(agent_id, &data, at));
                    agents.insert(agent_id.to_owned());
                }
                let task = state
                    .tasks
                    .entry(task_id.to_owned())
                    .or_insert_with(|| new_task(task_id, e, at));
                touched_agents.extend(task.agent_id.clone());
                apply_task_event(task, e, &data, at);
                task.updated_at = at;
                task.log_partition = decided.partition;
                task.log_offset = decided.offset;
                touched_agents.extend(task.agent_id.clone());
                tasks.insert(task_id.to_owned());
            }
            TaskEventType::WorkflowStarted
            | TaskEventType::WorkflowCompleted
            | TaskEventType::WorkflowFailed
            | TaskEventType::WorkflowCancelled => {
                let Some(workflow_id) = e.workflow_id.as_deref() else {
                    continue;
                };
                let workflow = state
                    .workflows
                    .entry(workflow_id.to_owned())
                    .or_insert_with(|| new_workflow(workflow_id, at));
                apply_workflow_event(workflow, e, &data, at);
                workflow.updated_at = at;
                workflow.log_partition = decided.partition;
                workflow.log_offset = decided.offset;
                workflows.insert(workflow_id.to_owned());
            }
            TaskEventType::TemplateDefined => {
                let (Some(name), Some(version)) = (str_of(&data, "name"), i32_of(&data, "version")) else {
                    continue;
                };
                outcome.changes.templates.push(TemplateRow {
                    name,
                    version,
                    steps: value_of(&data, "steps").unwrap_or(Value::Array(Vec::new())),
                    actor: e.actor.clone(),
                    defined_at: at,
                });
            }
            TaskEventType::WorkflowStepReady | TaskEventType::CommandRejected => {}
        }
    }
    let changes = &mut outcome.changes;
    changes.agents = agents.iter().filter_map(|id| state.agents.remove(id)).collect();
    changes.tasks = tasks.iter().filter_map(|id| state.tasks.remove(id)).collect();
    changes.workflows = workflows
        .iter()
        .filter_map(|id| state.workflows.remove(id))
        .collect();
    changes.touched_agents = touched_agents.into_iter().collect();
    outcome
}

fn apply_task_event(task: &mut TaskRow, e: &TaskEvent, data: &Value, at: DateTime<Utc>) {
    if e.workflow_id.is_some() {
        task.workflow_id = e.workflow_id.clone();
    }
    if e.step_id.is_some() {
        task.step_id = e.step_id.clone();
    }
    match e.event_type {
        TaskEventType::TaskAccepted => {
            task.status = "pending".into();
            task.required_capabilities = strings_of(data, "required_capabilities");
            task.payload = value_of(data, "payload");
            task.priority = i32_of(data, "priority").unwrap_or(0);
            task.timeout_ms = i64_of(data, "timeout_ms");
            task.max_attempts = i32_of(data, "max_attempts");
            task.preferred_agent = str_of(data, "preferred_agent");
            task.actor = e.actor.clone();
            task.accepted_at = Some(at);
        }
        TaskEventType::TaskAssigned => {
            task.status = "assigned".into();
            task.agent_id = e.agent_id.clone();
            task.attempt = e.attempt.unwrap_or(task.attempt + 1);
            task.assigned_at = Some(at);
            task.started_at = None;
            task.deadline = i64_of(data, "deadline").map(time_ms);
            if let Some(payload) = value_of(data, "payload") {
                task.payload = Some(payload);
            }
            if let Some(priority) = i32_of(data, "priority") {
                task.priority = priority;
            }
        }
        TaskEventType::TaskStarted => {
            task.status = "running".into();
            task.started_at = Some(at);
            if e.agent_id.is_some() {
                task.agent_id = e.agent_id.clone();
            }
            task.attempt = e.attempt.unwrap_or(task.attempt);
        }
        TaskEventType::TaskCompleted => {
            task.status = "completed".into();
            task.result = value_of(data, "result");
            task.duration_ms =
                i64_of(data, "duration_ms").or_else(|| task.accepted_at.map(|a| (at - a).num_milliseconds()));
            task.finished_at = Some(at);
            task.deadline = None;
            if e.agent_id.is_some() {
                task.agent_id = e.agent_id.clone();
            }
        }
        TaskEventType::TaskFailed | TaskEventType::TaskTimedOut => {
            // The holder lost the task; a TASK_REDELEGATED or TASK_DEAD_LETTERED follows.
            task.status = "failed".into();
            task.last_error = e
                .reason
                .clone()
                .or_else(|| (e.event_type == TaskEventType::TaskTimedOut).then(|| "timed out".to_owned()));
            task.deadline = None;
        }
        TaskEventType::TaskRedelegated => {
            task.status = "pending".into();
            task.agent_id = None;
            task.deadline = None;
            task.started_at = None;
            if e.reason.is_some() {
                task.last_error = e.reason.clone();
            }
        }
        TaskEventType::TaskDeadLettered => {
            task.status = "dead_lettered".into();
            if e.reason.is_some() {
                task.last_error = e.reason.clone();
            }
            task.finished_at = Some(at);
            task.deadline = None;
        }
        TaskEventType::TaskCancelled => {
            task.status = "cancelled".into();
            if e.reason.is_some() {
                task.last_error = e.reason.clone();
            }
            task.finished_at = Some(at);
            task.deadline = None;
        }
        _ => {}
    }
}

fn apply_workflow_event(workflow: &mut WorkflowRow, e: &TaskEvent, data: &Value, at: DateTime<Utc>) {
    let finish = |workflow: &mut WorkflowRow, status: &str| {
        workflow.status = status.into();
        workflow.finished_at = Some(at);
        workflow.duration_ms =
            i64_of(data, "duration_ms").or_else(|| Some((at - workflow.started_at).num_milliseconds()));
    };
    match e.event_type {
        TaskEventType::WorkflowStarted => {
            workflow.template = str_of(data, "template").unwrap_or_default();
            workflow.template_version = i32_of(data, "template_version");
            workflow.status = "running".into();
            workflow.input = value_of(data, "input");
            workflow.priority = i32_of(data, "priority").unwrap_or(0);
            workflow.actor = e.actor.clone();
            workflow.started_at = at;
        }
        TaskEventType::WorkflowCompleted => {
            workflow.results = value_of(data, "results");
            finish(workflow, "completed");
        }
        TaskEventType::WorkflowFailed => {
            workflow.failed_step = e.step_id.clone();
            workflow.reason = e.reason.clone();
            finish(workflow, "failed");
        }
        TaskEventType::WorkflowCancelled => {
            workflow.reason = e.reason.clone();
            finish(workflow, "cancelled");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: i64, kind: TaskEventType, f: impl FnOnce(&mut TaskEvent)) -> DecidedEvent {
        let mut event = TaskEvent::new(format!("0:{offset}:0"), kind, 1_000 + offset);
        f(&mut event);
        DecidedEvent {
            event,
            partition: 0,
            offset,
            record_time: time_ms(1_000 + offset),
            traceparent: None,
        }
    }

    fn agent(id: &str) -> impl FnOnce(&mut TaskEvent) {
        let id = id.to_owned();
        move |e| {
            e.agent_id = Some(id);
            e.data_json = Some(r#"{"capabilities":["summarize"],"max_concurrent":2,"metadata":{}}"#.into());
        }
    }

    #[test]
    fn a_task_lifecycle_moves_between_agents_and_ends_completed() {
        let batch = vec![
            event(0, TaskEventType::AgentRegistered, agent("a1")),
            event(1, TaskEventType::AgentRegistered, agent("a2")),
            event(2, TaskEventType::TaskAccepted, |e| {
                e.task_id = Some("t".into());
                e.actor = Some("boss".into());
                e.data_json = Some(
                    r#"{"required_capabilities":["summarize"],"payload":{"x":1},"priority":5,"timeout_ms":100,"max_attempts":2,"preferred_agent":null}"#
                        .into(),
                );
            }),
            event(3, TaskEventType::TaskAssigned, |e| {
                e.task_id = Some("t".into());
                e.agent_id = Some("a1".into());
                e.attempt = Some(1);
                e.data_json = Some(r#"{"payload":{"x":1},"priority":5,"deadline":1103}"#.into());
            }),
            event(4, TaskEventType::TaskTimedOut, |e| {
                e.task_id = Some("t".into());
                e.agent_id = Some("a1".into());
                e.reason = Some("deadline passed".into());
            }),
            event(5, TaskEventType::TaskRedelegated, |e| {
                e.task_id = Some("t".into());
                e.agent_id = Some("a1".into());
                e.attempt = Some(2);
            }),
            event(6, TaskEventType::TaskAssigned, |e| {
                e.task_id = Some("t".into());
                e.agent_id = Some("a2".into());
                e.attempt = Some(2);
            }),
            event(7, TaskEventType::TaskCompleted, |e| {
                e.task_id = Some("t".into());
                e.agent_id = Some("a2".into());
                e.data_json = Some(r#"{"result":"done","duration_ms":5}"#.into());
            }),
            event(8, TaskEventType::AgentLost, |e| e.agent_id = Some("a1".into())),
        ];
        let outcome = fold(TaskState::default(), &batch, "events");
        let changes = &outcome.changes;
        assert_eq!(changes.events.len(), batch.len());
        assert_eq!(changes.tasks.len(), 1);
        let task = &changes.tasks[0];
        assert_eq!(task.status, "completed");
        assert_eq!(task.agent_id.as_deref(), Some("a2"));
        assert_eq!(task.attempt, 2);
        assert_eq!(task.result, Some(Value::from("done")));
        assert_eq!(task.duration_ms, Some(5));
        assert_eq!(task.last_error.as_deref(), Some("deadline passed"));
        assert_eq!(task.payload, Some(serde_json::json!({"x": 1})));
        assert_eq!((task.log_partition, task.log_offset), (0, 7));
        let statuses: Vec<(&str, &str)> = changes
            .agents
            .iter()
            .map(|a| (a.agent_id.as_str(), a.status.as_str()))
            .collect();
        assert_eq!(statuses, vec![("a1", "lost"), ("a2", "alive")]);
        assert_eq!(changes.touched_agents, vec!["a1".to_owned(), "a2".to_owned()]);
        assert_eq!(outcome.by_type["TASK_ASSIGNED"], 2);
    }

    #[test]
    fn a_heartbeat_revives_a_lost_agent_but_not_a_deregistered_one() {
        let heartbeat = |offset, id: &str| {
            let id = id.to_owned();
            event(offset, TaskEventType::AgentHeartbeat, move |e| {
                e.agent_id = Some(id)
            })
        };
        let batch = vec![
            event(0, TaskEventType::AgentRegistered, agent("lost")),
            event(1, TaskEventType::AgentRegistered, agent("gone")),
            event(2, TaskEventType::AgentLost, |e| e.agent_id = Some("lost".into())),
            event(3, TaskEventType::AgentDeregistered, |e| {
                e.agent_id = Some("gone".into())
            }),
            heartbeat(4, "lost"),
            heartbeat(5, "gone"),
            // Never registered in this log: no row to change.
            heartbeat(6, "stranger"),
        ];
        let changes = fold(TaskState::default(), &batch, "t").changes;
        let agents: Vec<(&str, &str, Option<i64>)> = changes
            .agents
            .iter()
            .map(|a| {
                (
                    a.agent_id.as_str(),
                    a.status.as_str(),
                    a.last_heartbeat_at.map(|t| t.timestamp_millis()),
                )
            })
            .collect();
        assert_eq!(
            agents,
            vec![
                ("gone", "deregistered", Some(1_005)),
                ("lost", "alive", Some(1_004))
            ]
        );
        assert_eq!(changes.events.len(), batch.len());
    }

    #[test]
    fn folding_in_two_batches_equals_folding_at_once() {
        let batch = vec![
            event(0, TaskEventType::WorkflowStarted, |e| {
                e.workflow_id = Some("w".into());
                e.data_json =
                    Some(r#"{"template":"etl","template_version":1,"input":{},"priority":0}"#.into());
            }),
            event(1, TaskEventType::TaskAccepted, |e| {
                e.task_id = Some("w/a".into());
                e.workflow_id = Some("w".into());
                e.step_id = Some("a".into());
            }),
            event(2, TaskEventType::TaskCancelled, |e| {
                e.task_id = Some("w/a".into());
                e.reason = Some("stop".into());
            }),
            event(3, TaskEventType::WorkflowFailed, |e| {
                e.workflow_id = Some("w".into());
                e.step_id = Some("a".into());
                e.reason = Some("step a cancelled".into());
            }),
        ];
        let all = fold(TaskState::default(), &batch, "t").changes;
        let first = fold(TaskState::default(), &batch[..2], "t").changes;
        let state = TaskState {
            agents: Default::default(),
            tasks: first.tasks.into_iter().map(|t| (t.task_id.clone(), t)).collect(),
            workflows: first
                .workflows
                .into_iter()
                .map(|w| (w.workflow_id.clone(), w))
                .collect(),
        };
        let second = fold(state, &batch[2..], "t").changes;
        assert_eq!(all.tasks, second.tasks);
        assert_eq!(all.workflows, second.workflows);
        assert_eq!(all.workflows[0].status, "failed");
        assert_eq!(all.workflows[0].failed_step.as_deref(), Some("a"));
        assert_eq!(all.tasks[0].status, "cancelled");
        assert_eq!(all.tasks[0].step_id.as_deref(), Some("a"));
    }

    /// The task's partition folded before the agent's: the view knows the assignee at once
    /// (the inbox is never served without its agent), and once the registration is folded the
    /// agent's row is the one folding in log order gives.
    #[test]
    fn an_assignment_folded_before_the_registration_has_its_agent() {
        let assigned = event(3, TaskEventType::TaskAssigned, |e| {
            e.task_id = Some("t".into());
            e.agent_id = Some("a1".into());
            e.attempt = Some(1);
            e.data_json = Some(
                r#"{"payload":null,"priority":0,"deadline":9,"agent":{"capabilities":["summarize"],"max_concurrent":2}}"#
                    .into(),
            );
        });
        let registered = event(0, TaskEventType::AgentRegistered, agent("a1"));

        let first = fold(TaskState::default(), std::slice::from_ref(&assigned), "t").changes;
        assert_eq!(first.agents.len(), 1, "the assignee has a row");
        let provisional = &first.agents[0];
        assert_eq!(
            (provisional.status.as_str(), provisional.max_concurrent),
            ("alive", 2)
        );
        assert_eq!(provisional.capabilities, vec!["summarize".to_owned()]);
        assert_eq!(first.touched_agents, vec!["a1".to_owned()]);

        let state = TaskState {
            agents: first
                .agents
                .into_iter()
                .map(|a| (a.agent_id.clone(), a))
                .collect(),
            ..TaskState::default()
        };
        let late = fold(state, std::slice::from_ref(&registered), "t").changes;
        let in_order = fold(TaskState::default(), &[registered, assigned.clone()], "t").changes;
        assert_eq!(late.agents, in_order.agents);

        // A known agent is never replaced by the assignment's copy.
        let known = TaskState {
            agents: in_order
                .agents
                .iter()
                .map(|a| (a.agent_id.clone(), a.clone()))
                .collect(),
            ..TaskState::default()
        };
        let again = fold(known, std::slice::from_ref(&assigned), "t").changes;
        assert!(again.agents.is_empty(), "{:?}", again.agents);
        assert_eq!(again.touched_agents, vec!["a1".to_owned()]);
    }
}
