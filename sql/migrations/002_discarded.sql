-- Dead letters an operator chose to drop keep their row (status 'discarded'):
-- deleting it would let a replay of the source transaction deliver it again.
ALTER TABLE __SCHEMA__.deliveries DROP CONSTRAINT IF EXISTS deliveries_status_check;
ALTER TABLE __SCHEMA__.deliveries ADD CONSTRAINT deliveries_status_check CHECK (status IN
    ('pending', 'sending', 'sent', 'failed', 'dead', 'skipped', 'discarded', 'delivered', 'bounced', 'read'));
CREATE INDEX IF NOT EXISTS deliveries_dead
    ON __SCHEMA__.deliveries (updated_at) WHERE status IN ('dead', 'failed');
