-- The memory views and the projection offsets that make applying them exactly once.

CREATE TABLE memories (
    memory_id     uuid PRIMARY KEY,
    namespace     text NOT NULL,
    content       text NOT NULL,
    tier          text NOT NULL,
    tags          text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}',
    importance    double precision NOT NULL,
    expires_at    timestamptz,
    embedding     real[],
    version       bigint NOT NULL DEFAULT 1,
    actor         text NOT NULL,
    created_by    uuid NOT NULL,          -- command id of the WriteMemory
    created_at    timestamptz NOT NULL,   -- record timestamp, never the projector's clock
    updated_at    timestamptz NOT NULL,
    log_topic     text NOT NULL,
    log_partition integer NOT NULL,
    log_offset    bigint NOT NULL
);

-- Keyset pagination of an agent's memories, newest first.
CREATE INDEX memories_by_namespace ON memories (namespace, created_at DESC, memory_id DESC);

-- One row per command the projector decided on: the idempotency record and its outcome.
CREATE TABLE memory_commands (
    command_id    uuid PRIMARY KEY,
    kind          text NOT NULL,
    namespace     text NOT NULL,
    memory_id     uuid,
    actor         text NOT NULL,
    status        text NOT NULL CHECK (status IN ('applied', 'rejected')),
    reason        text,
    traceparent   text,
    log_topic     text NOT NULL,
    log_partition integer NOT NULL,
    log_offset    bigint NOT NULL,
    record_time   timestamptz NOT NULL
);

-- The next offset to apply, per projection and partition, written in the same transaction as
-- the view rows. The projector seeks here on assignment; the consumer group commit only
-- reports progress.
CREATE TABLE projection_offsets (
    projection  text NOT NULL,
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);
