-- The task views, projected from the orchestrator's decisions on `memos.task.events`. Every
-- time stored here is an event's decision time (`at`), never a clock, so the same log prefix
-- always yields the same rows. (Numbered after the issue that needs it.)

-- Registered agents. An agent's load is not stored: it is the number of its tasks that are
-- assigned or running (index tasks_held_by_agent).
CREATE TABLE agents (
    agent_id          text PRIMARY KEY,
    capabilities      text[] NOT NULL DEFAULT '{}',
    max_concurrent    integer NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}',
    status            text NOT NULL CHECK (status IN ('alive', 'lost', 'deregistered')),
    last_heartbeat_at timestamptz,
    registered_at     timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL
);

-- Current state of every task the orchestrator accepted.
CREATE TABLE tasks (
    task_id               text PRIMARY KEY,
    workflow_id           text,
    step_id               text,
    status                text NOT NULL CHECK (status IN ('pending', 'assigned', 'running', 'completed',
                                                          'failed', 'dead_lettered', 'cancelled')),
    agent_id              text,                -- the holder (or the last one, once finished)
    attempt               integer NOT NULL,    -- the current or last attempt, 1-based; 0 before any
    required_capabilities text[] NOT NULL DEFAULT '{}',
    payload               jsonb,
    priority              integer NOT NULL,
    timeout_ms            bigint,
    max_attempts          integer,
    preferred_agent       text,
    actor                 text,                -- who delegated it
    result                jsonb,
    last_error            text,
    deadline              timestamptz,         -- of the current attempt
    duration_ms           bigint,              -- accepted to completed
    accepted_at           timestamptz,
    assigned_at           timestamptz,
    started_at            timestamptz,
    finished_at           timestamptz,         -- completed, dead-lettered or cancelled
    updated_at            timestamptz NOT NULL,
    log_partition         integer NOT NULL,    -- position of the last event about the task
    log_offset            bigint NOT NULL
);
CREATE INDEX tasks_held_by_agent ON tasks (agent_id, status) WHERE status IN ('assigned', 'running');
CREATE INDEX tasks_by_agent ON tasks (agent_id, updated_at DESC);
CREATE INDEX tasks_by_workflow ON tasks (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX tasks_by_status ON tasks (status);

CREATE TABLE workflow_templates (
    name       text NOT NULL,
    version    integer NOT NULL,
    steps      jsonb NOT NULL,
    actor      text,
    defined_at timestamptz NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE workflows (
    workflow_id      text PRIMARY KEY,
    template         text NOT NULL,
    template_version integer,
    status           text NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    input            jsonb,
    priority         integer NOT NULL,
    results          jsonb,
    failed_step      text,
    reason           text,
    actor            text,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    duration_ms      bigint,
    updated_at       timestamptz NOT NULL,
    log_partition    integer NOT NULL,
    log_offset       bigint NOT NULL
);
CREATE INDEX workflows_by_status ON workflows (status);

-- The audit trail: one row per task event, decisions and rejected commands alike, with its
-- place in the log and the trace it belongs to.
CREATE TABLE task_events (
    log_topic     text NOT NULL,
    log_partition integer NOT NULL,
    log_offset    bigint NOT NULL,
    event_id      text NOT NULL,
    type          text NOT NULL,
    at            timestamptz NOT NULL,
    task_id       text,
    workflow_id   text,
    step_id       text,
    agent_id      text,
    attempt       integer,
    reason        text,
    command_id    text,
    command_type  text,
    actor         text,
    data          jsonb,
    traceparent   text,
    trace_id      text GENERATED ALWAYS AS (split_part(traceparent, '-', 2)) STORED,
    record_time   timestamptz NOT NULL,
    PRIMARY KEY (log_topic, log_partition, log_offset)
);
CREATE INDEX task_events_by_task ON task_events (task_id, log_partition, log_offset) WHERE task_id IS NOT NULL;
CREATE INDEX task_events_by_workflow ON task_events (workflow_id, log_partition, log_offset) WHERE workflow_id IS NOT NULL;
CREATE INDEX task_events_by_agent ON task_events (agent_id, at) WHERE agent_id IS NOT NULL;
CREATE INDEX task_events_rejections ON task_events (command_id) WHERE type = 'COMMAND_REJECTED';

-- Redis bookkeeping of the agents' inbox and availability: `revision` moves with every
-- committed batch that touched the agent; `synced_revision` is the newest revision copied to
-- Redis. An agent with revision > synced_revision is rewritten at projector start, so a crash
-- between the PostgreSQL commit and the Redis write leaves nothing stale.
CREATE TABLE agent_view_revisions (
    agent_id        text PRIMARY KEY,
    revision        bigint NOT NULL,
    synced_revision bigint NOT NULL DEFAULT 0
);
CREATE INDEX agent_view_revisions_unsynced ON agent_view_revisions (agent_id) WHERE revision > synced_revision;
