-- LISTEN/NOTIFY mode (source.mode = "listen"), for databases that offer no
-- logical replication. A trigger on each routed table records (table, key) in
-- a change log and sends a NOTIFY; the relay reads the log behind a
-- transaction-visibility watermark (docs/listen-mode.md says why not max(id)).

CREATE TABLE IF NOT EXISTS __SCHEMA__.changes (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction, taken at insert time: the watermark compares it
    -- with the oldest transaction still running.
    xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    source_table text        NOT NULL,
    source_pk    text        NOT NULL,
    op           text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS changes_xid ON __SCHEMA__.changes (xid, id);

-- Every transaction below the watermark has been read. Only moves forward.
CREATE TABLE IF NOT EXISTS __SCHEMA__.listen_progress (
    name       text PRIMARY KEY,
    watermark  xid8        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The trigger function. SECURITY DEFINER: Django's role inserts into the change
-- log through it without any right on the relay schema. search_path pinned so
-- the function cannot be hijacked by objects in the caller's schemas.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    key text;
BEGIN
    SELECT string_agg(to_jsonb(NEW) ->> a.attname, ',' ORDER BY array_position(i.indkey::int2[], a.attnum))
      INTO key
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    key := coalesce(key, to_jsonb(NEW) ->> 'id', '');
    INSERT INTO __SCHEMA__.changes (source_table, source_pk, op) VALUES (tbl, key, lower(TG_OP));
    -- Only table and key: far below NOTIFY's 8000-byte payload limit. A wake-up, not the data.
    PERFORM pg_notify('__SCHEMA__', left(tbl || ':' || key, 1000));
    RETURN NULL;
END
$$;
