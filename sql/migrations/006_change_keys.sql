-- The ledger's key names the committed *change*, not the row: a row updated
-- twice, deleted, or a primary key reused after TRUNCATE ... RESTART IDENTITY
-- are separate changes and each is delivered (docs/design.md, "The key").
-- `idempotency_key` is now derived from (change, channel); these columns say
-- which change and what kind it was, for people reading the ledger.
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS change_ref text;   -- wal:<commit LSN>#<n> or log:<id>
ALTER TABLE __SCHEMA__.deliveries ADD COLUMN IF NOT EXISTS operation text;    -- insert | update | delete
