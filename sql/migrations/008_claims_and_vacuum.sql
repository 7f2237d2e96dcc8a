-- Who holds a `sending` row's claim. NULL: the relay that works the slot
-- (the holder of its advisory lock, src/instance.rs), which at start and at
-- each source session gives back every such row it does not hold. A
-- dispatch-only process (`run --only dispatch`) writes its own name here, and
-- its claims end only by their outcome or their lease: the slot's relay
-- must not take them back while that process may be sending them.
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS claimed_by text;

-- Every delivery leaves one or two dead row versions (claim, outcome: neither
-- can be a HOT update, the status is in the queue index's predicate). The
-- default autovacuum waits for 20 % of the table to be dead and then
-- sleeps between pages: on a large ledger, dead versions pile up for
-- minutes, the table and its indexes grow. Vacuum this table sooner and at
-- full speed; the work per vacuum stays proportional to what changed since
-- the last one (the visibility map skips settled pages).
ALTER TABLE __SCHEMA__.deliveries SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
