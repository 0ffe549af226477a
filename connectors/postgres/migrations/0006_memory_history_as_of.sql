-- As-of listing of an agent's memories: the applied states of a namespace by validity start.
-- (Numbered after the issue that needs it, so that other streams of work can take the
-- numbers in between; sqlx applies every migration it has not applied yet.)
CREATE INDEX memory_history_as_of ON memory_history ((state->>'namespace'), valid_from)
    WHERE status = 'applied';
