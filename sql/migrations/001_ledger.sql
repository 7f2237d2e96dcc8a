-- outbox-relay's own schema. `__SCHEMA__` is replaced by the configured schema
-- name (default outbox_relay). Safe to run twice: every statement is IF NOT EXISTS.

CREATE SCHEMA IF NOT EXISTS __SCHEMA__;

-- The delivery ledger: one row per (source table, primary key, channel).
-- Django may read it for audit ("delivery attempts"); only the relay writes it.
CREATE TABLE IF NOT EXISTS __SCHEMA__.deliveries (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_table        text        NOT NULL,              -- schema.table
    source_pk           text        NOT NULL,              -- key columns' text, comma-joined
    channel             text        NOT NULL,              -- relay channel (in_app, email, ...)
    -- Derived from (source_table, source_pk, channel): unique, stable across
    -- restarts, and sent to providers that deduplicate (Ably message id).
    idempotency_key     text        NOT NULL,
    event               text        NOT NULL,
    recipient           text,
    payload             jsonb       NOT NULL,              -- allow-listed columns only
    status              text        NOT NULL DEFAULT 'pending',
    attempts            integer     NOT NULL DEFAULT 0,
    provider            text,                              -- who took (or refused) it last
    provider_message_id text,
    last_error          text,
    commit_lsn          pg_lsn      NOT NULL,              -- where the source row was committed
    committed_at        timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    CONSTRAINT deliveries_idempotency_key_key UNIQUE (idempotency_key),
    CONSTRAINT deliveries_status_check CHECK (status IN
        ('pending', 'sending', 'sent', 'failed', 'dead', 'skipped', 'delivered', 'bounced', 'read'))
);

-- Dispatch claims due work in id order; the partial index stays as small as the backlog.
-- For a `sending` row, next_attempt_at is the end of its claim's lease: a worker
-- that lost its connection mid-batch does not strand the row.
CREATE INDEX IF NOT EXISTS deliveries_due
    ON __SCHEMA__.deliveries (next_attempt_at, id) WHERE status IN ('pending', 'sending');
-- Audit: "what happened to notification 42?"
CREATE INDEX IF NOT EXISTS deliveries_source
    ON __SCHEMA__.deliveries (source_table, source_pk);

-- The stored offset per slot. Only ever moves forward (GREATEST in the upsert),
-- and is written in the same transaction as the deliveries it covers.
CREATE TABLE IF NOT EXISTS __SCHEMA__.progress (
    slot          text PRIMARY KEY,
    confirmed_lsn pg_lsn      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS __SCHEMA__.schema_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
