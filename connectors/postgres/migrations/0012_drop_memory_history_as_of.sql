-- The as-of listing finds a namespace's memories through `memories` (every memory ever
-- written keeps its row there) and their history by primary key. The expression index of
-- 0006 made every history insert and validity update detoast the state: the projector ran
-- at a third of its rate with it (docs/benchmarks.md).
DROP INDEX IF EXISTS memory_history_as_of;
