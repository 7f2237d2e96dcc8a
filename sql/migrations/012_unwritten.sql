-- Deliveries handed to dispatch before they are written (src/unwritten.rs):
-- the highest commit position ingestion handed over unwritten. After a crash,
-- changes replayed up to here may have reached a provider already; the relay
-- writes them the ordinary way and counts the new ones as possible re-sends.
-- Only ever moves forward, like confirmed_lsn.
ALTER TABLE __SCHEMA__.progress ADD COLUMN IF NOT EXISTS unwritten_lsn pg_lsn;
