-- Channels an operator paused (`outbox-relay pause <channel>`). A row here
-- keeps the channel's deliveries `pending`: the claim and the fast path's
-- claimed insert both read this table in the same statement, so a pause holds
-- from its commit on, survives restarts, and is seen by a standby that takes
-- over (docs/operations.md, "Pausing a channel"). `resume` deletes the row.
CREATE TABLE IF NOT EXISTS __SCHEMA__.paused_channels (
    channel text PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now(),
    -- Who ran `pause`: the OS user when known, else the database role.
    paused_by text NOT NULL
);
