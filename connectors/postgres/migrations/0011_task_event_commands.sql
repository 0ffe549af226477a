-- Command status of task commands: every event a command caused carries its command id, so
-- `GET /v1/commands/{id}` finds them (supersedes the index of rejections only).
CREATE INDEX task_events_by_command ON task_events (command_id, log_partition, log_offset)
    WHERE command_id IS NOT NULL;
DROP INDEX task_events_rejections;
