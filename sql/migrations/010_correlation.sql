-- The correlation value a route's `correlation_column` read from the row
-- (a Django request id, or a W3C traceparent): carried into the delivery's
-- log lines, provider metadata and trace (docs/operations.md, "Correlation").
-- NULL when the route has no such column or the row's value was NULL/empty.
-- Routing (src/telemetry/correlation.rs) cuts it to 128 printable ASCII
-- characters before the insert, so the check never refuses a relay batch; it
-- states the cap for anyone else writing or reading the column. NOT VALID: every existing row is NULL, so the check need not
-- scan a ledger of millions of rows under an exclusive lock; new rows are checked.
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS correlation text;
ALTER TABLE __SCHEMA__.deliveries DROP CONSTRAINT IF EXISTS deliveries_correlation_length;
ALTER TABLE __SCHEMA__.deliveries ADD CONSTRAINT deliveries_correlation_length
    CHECK (char_length(correlation) <= 128) NOT VALID;
