-- Push channels (webpush, fcm): what each of a delivery's devices did with it.
-- One delivery (one ledger row) goes to N devices; a retry after one device
-- answered 503 must go only to the devices that did not take it yet. Written
-- by dispatch right after each provider call, for settled answers only
-- (a device to retry has no row). Only push deliveries have rows here.
--
-- device_hash: the first 16 bytes of SHA-256 of the FCM token or Web Push
-- endpoint. Tells a recipient's devices apart without holding the token.
-- Pruned with its delivery (retention) and deleted by `erase` (GDPR).
-- No foreign key: its per-row trigger would tax every ledger delete, push or
-- not; retention deletes these rows in the statement that deletes the delivery.
CREATE TABLE IF NOT EXISTS __SCHEMA__.device_sends (
    delivery_id bigint      NOT NULL,
    device_hash bytea       NOT NULL,
    status      text        NOT NULL CHECK (status IN ('sent', 'gone', 'failed')),
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (delivery_id, device_hash)
);
