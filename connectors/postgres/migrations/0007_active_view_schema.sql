-- Which schema holds the views every memOS process reads and writes (`memosctl promote`
-- switches it to a rebuilt schema). Lives in its own schema so that it is shared by all
-- view schemas; every pooled connection sets its search_path from it and carries the
-- generation it was set from (see connectors/postgres/src/pool.rs).
CREATE SCHEMA IF NOT EXISTS memos_control;
CREATE TABLE IF NOT EXISTS memos_control.active_view (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_name text NOT NULL,
    generation  bigint NOT NULL
);
INSERT INTO memos_control.active_view (schema_name, generation)
VALUES (current_schema(), 0)
ON CONFLICT DO NOTHING;
