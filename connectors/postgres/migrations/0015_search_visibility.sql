-- Search at scale (issue 15). Every query's visibility predicate finds the reader's memories
-- by `namespace = ANY(...)` on this index; the as-of listing finds a namespace's memories,
-- forgotten ones included (they may have been live at that instant), on it too, which the
-- former partial index (WHERE forgotten_at IS NULL) could not serve: the as-of listing
-- scanned the whole table. One index instead of two keeps the projector's write cost.
DROP INDEX IF EXISTS memories_by_namespace;
CREATE INDEX memories_by_namespace ON memories (namespace, created_at DESC, memory_id DESC);
