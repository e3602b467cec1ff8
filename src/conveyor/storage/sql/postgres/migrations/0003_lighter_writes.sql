-- Fewer index writes per job on the hot path.
--
-- events.created_at only serves the pruner, which deletes old events in bulk:
-- events are appended in time order, so a BRIN index (a few pages, no per-row
-- entry) finds them as well as the B-tree did, without one more B-tree insert
-- per event (three events per job).
DROP INDEX conveyor.events_created;
CREATE INDEX events_created ON conveyor.events USING brin (created_at);
-- (Execution rows are now written once, when an attempt ends: a query change,
-- no schema change.)
