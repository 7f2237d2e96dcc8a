-- Who holds a `sending` row's claim. NULL: the relay that works the slot
-- (the holder of its advisory lock, src/instance.rs), which at start and at
-- each source session gives back every such row it does not hold. A
-- dispatch-only process (`run --only dispatch`) writes its own name here, and
-- its claims end only by their outcome or their lease: the slot's relay
-- must not take them back while that process may be sending them.
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS claimed_by text;

-- Every delivery leaves one or two dead row versions (claim, outcome: neither
-- can be a HOT update, the status is in the queue index's predicate). The
-- default autovacuum waits for 20 % of the table to be dead: on a ledger of
-- 10 M rows, 2 M dead versions and the space they hold. Vacuum this table at
-- 5 % (and 50 000 rows, so a small ledger is not vacuumed back to back: each
-- vacuum reads every index whole). Claims do not depend on it (they start
-- at a floor, docs/design.md); the table's size does.
ALTER TABLE __SCHEMA__.deliveries SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_threshold = 50000
);
