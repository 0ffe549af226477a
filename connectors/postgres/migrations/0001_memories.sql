-- The memory views and the projection offsets that make applying them exactly once.
-- Every time stored here comes from a Kafka record timestamp, never from a clock, so the
-- same log prefix always yields the same rows.

CREATE EXTENSION IF NOT EXISTS vector;

-- Current state of every memory ever written; forgotten ones keep their row (with
-- forgotten_at set) so that later commands about them are decided correctly.
CREATE TABLE memories (
    memory_id     uuid PRIMARY KEY,
    namespace     text NOT NULL,
    content       text NOT NULL,
    tier          text NOT NULL,
    tags          text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}',
    importance    double precision NOT NULL,
    expires_at    timestamptz,
    embedding     vector,
    source        text,
    version       bigint NOT NULL,
    actor         text NOT NULL,          -- who made the last change
    created_by    uuid NOT NULL,          -- command id of the WriteMemory
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    forgotten_at  timestamptz,
    log_partition integer NOT NULL,       -- position of the last change
    log_offset    bigint NOT NULL,
    content_tsv   tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED
);

-- Keyset pagination of an agent's memories, newest first; filters; full-text search.
CREATE INDEX memories_by_namespace ON memories (namespace, created_at DESC, memory_id DESC)
    WHERE forgotten_at IS NULL;
CREATE INDEX memories_tags ON memories USING gin (tags);
CREATE INDEX memories_metadata ON memories USING gin (metadata jsonb_path_ops);
CREATE INDEX memories_fulltext ON memories USING gin (content_tsv);

-- One row per decided command about a memory, applied or rejected. Applied rows carry the
-- memory's state after the change and the interval during which that state was current.
CREATE TABLE memory_history (
    memory_id     uuid NOT NULL,
    command_id    uuid NOT NULL,
    version       bigint NOT NULL,
    operation     text NOT NULL,
    actor         text NOT NULL,
    status        text NOT NULL CHECK (status IN ('applied', 'rejected')),
    reason        text,
    change        jsonb NOT NULL,
    state         jsonb,
    log_partition integer NOT NULL,
    log_offset    bigint NOT NULL,
    record_time   timestamptz NOT NULL,
    trace_id      text,
    valid_from    timestamptz,
    valid_to      timestamptz,
    PRIMARY KEY (memory_id, log_partition, log_offset)
);
CREATE INDEX memory_history_open ON memory_history (memory_id) WHERE valid_to IS NULL AND status = 'applied';

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
    trace_id      text GENERATED ALWAYS AS (split_part(traceparent, '-', 2)) STORED,
    log_topic     text NOT NULL,
    log_partition integer NOT NULL,
    log_offset    bigint NOT NULL,
    record_time   timestamptz NOT NULL
);

-- Read access given by a namespace to another agent: to one memory, or to all of them
-- (memory_id NULL).
CREATE TABLE memory_shares (
    namespace     text NOT NULL,
    memory_id     uuid,
    grantee       text NOT NULL,
    granted_by    text NOT NULL,
    command_id    uuid NOT NULL,
    granted_at    timestamptz NOT NULL
);
CREATE UNIQUE INDEX memory_shares_key ON memory_shares (namespace, grantee, coalesce(memory_id, '00000000-0000-0000-0000-000000000000'));
CREATE INDEX memory_shares_grantee ON memory_shares (grantee);

-- The agents' tool registry, per namespace.
CREATE TABLE tools (
    namespace     text NOT NULL,
    name          text NOT NULL,
    description   text NOT NULL,
    usage         text NOT NULL,
    tags          text[] NOT NULL,
    version       bigint NOT NULL,
    registered_by text NOT NULL,
    command_id    uuid NOT NULL,
    updated_at    timestamptz NOT NULL,
    search_tsv    tsvector GENERATED ALWAYS AS (to_tsvector('simple', name || ' ' || description || ' ' || usage)) STORED,
    PRIMARY KEY (namespace, name)
);
CREATE INDEX tools_fulltext ON tools USING gin (search_tsv);

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
