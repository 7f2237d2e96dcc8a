-- Listen mode records the change, not a pointer to the row (issue 11). The
-- earlier trigger stored (table, key) and the relay read the live row later: a
-- row deleted or updated in between was lost or delivered with later values,
-- and deletes could not be routed. Now the trigger stores the columns the
-- routes need, as committed, inside the writer's transaction; the relay routes
-- from the change log and never reads the routed tables.

-- The captured columns: {"column": "<text output>" | null, ...}. Text output
-- (what pgoutput sends in logical mode), not jsonb's own typing, so both modes
-- hand routing the same values. NULL only in rows written by an earlier trigger.
ALTER TABLE __SCHEMA__.changes ADD COLUMN IF NOT EXISTS row_data jsonb;
-- The key now travels inside row_data; the column stays for older rows.
ALTER TABLE __SCHEMA__.changes ALTER COLUMN source_pk DROP NOT NULL;

-- A transaction larger than a page is read over several polls: the watermark
-- stays below it and (cursor_xid, cursor_id) says how far into it the relay got.
-- Written in the same transaction as the page's deliveries.
ALTER TABLE __SCHEMA__.listen_progress ADD COLUMN IF NOT EXISTS cursor_xid xid8;
ALTER TABLE __SCHEMA__.listen_progress ADD COLUMN IF NOT EXISTS cursor_id bigint;

-- The SQL expression that turns `columns` of a row into row_data. Each value
-- through its type's output function (concat), never a cast to text: a cast
-- differs for some types (true::text is 'true', boolout gives 't'; bpchar
-- casts drop trailing blanks). jsonb_build_object takes at most 100
-- arguments, so 50 columns per call, joined with ||.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture_expr(columns text[]) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(string_agg(format('jsonb_build_object(%s)', pairs), ' || ' ORDER BY g), '''{}''::jsonb')
      FROM (SELECT g, string_agg(format('%L, CASE WHEN %I IS NULL THEN NULL ELSE concat(%I) END', c, c, c), ', '
                                 ORDER BY n) AS pairs
              FROM unnest(columns) WITH ORDINALITY AS u(c, n), LATERAL (SELECT (n - 1) / 50 AS g) chunk
             GROUP BY g) parts
$$;

-- The statement-level capture trigger function. `setup` installs one trigger
-- per operation the routes list (a trigger with transition tables serves one
-- event), with arguments: 'notify' or 'quiet' (source.notify), then the columns
-- to capture (the routes' columns and the primary key; none: every column).
--
-- One INSERT ... SELECT per statement, not per row, and at most one NOTIFY per
-- statement with a constant payload: PostgreSQL folds identical notifications
-- of a transaction into one, so a transaction queues one notification however
-- many rows it writes.
--
-- SECURITY DEFINER: Django's role writes the change log through it without any
-- right on the relay schema. search_path pinned, and the output settings fixed
-- so values do not depend on the writer's session (DateStyle, TimeZone...).
-- EXECUTE is revoked from PUBLIC: PostgreSQL checks it when a trigger is
-- created, so only the relay's owner can attach it to a table.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture_rows() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = '1'
AS $$
DECLARE
    columns text[] := '{}';
    n bigint;
BEGIN
    IF TG_NARGS > 1 THEN
        FOR i IN 1 .. TG_NARGS - 1 LOOP
            columns := columns || TG_ARGV[i];
        END LOOP;
    ELSE
        SELECT array_agg(attname::text ORDER BY attnum) INTO columns
          FROM pg_attribute WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped;
    END IF;
    EXECUTE format('INSERT INTO __SCHEMA__.changes (source_table, op, row_data) SELECT $1, $2, %s FROM %I',
                   __SCHEMA__.capture_expr(columns),
                   CASE TG_OP WHEN 'DELETE' THEN 'captured_old' ELSE 'captured_new' END)
        USING TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, lower(TG_OP);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND TG_ARGV[0] IS DISTINCT FROM 'quiet' THEN
        PERFORM pg_notify('__SCHEMA__', '');
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION __SCHEMA__.capture_rows() FROM PUBLIC;

-- The earlier row-level function, for triggers `setup` has not replaced yet
-- (the relay refuses to start until it has; see preflight): it now records the
-- whole row as committed too, and notifies with the constant payload, so rows
-- written between this migration and `setup` replacing the trigger are kept.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET TimeZone = 'UTC' SET extra_float_digits = '1'
AS $$
DECLARE
    columns text[];
    data jsonb;
BEGIN
    SELECT array_agg(attname::text ORDER BY attnum) INTO columns
      FROM pg_attribute WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped;
    IF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', __SCHEMA__.capture_expr(columns)) INTO data USING OLD;
    ELSE
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', __SCHEMA__.capture_expr(columns)) INTO data USING NEW;
    END IF;
    INSERT INTO __SCHEMA__.changes (source_table, op, row_data)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, lower(TG_OP), data);
    PERFORM pg_notify('__SCHEMA__', '');
    RETURN NULL;
END
$$;

-- Rows the earlier trigger recorded and no relay has read yet carry only a key:
-- fill them once from the live table (the earlier behaviour, one last time), so
-- the upgrade loses nothing the old relay would have delivered. One scan per
-- routed table, and only when such rows exist. Rows whose source row is gone
-- stay without data; the relay records them failed, saying why.
DO $$
DECLARE
    tbl text;
    columns text[];
    key_expr text;
BEGIN
    FOR tbl IN
        SELECT DISTINCT c.source_table FROM __SCHEMA__.changes c
         WHERE c.row_data IS NULL AND to_regclass(c.source_table) IS NOT NULL
           AND c.xid >= coalesce((SELECT min(watermark) FROM __SCHEMA__.listen_progress), '0'::xid8)
    LOOP
        SELECT array_agg(attname::text ORDER BY attnum) INTO columns
          FROM pg_attribute WHERE attrelid = to_regclass(tbl) AND attnum > 0 AND NOT attisdropped;
        -- The key as the earlier trigger wrote it: primary-key columns' jsonb text, comma-joined.
        SELECT string_agg(format('to_jsonb(%I) #>> ''{}''', a.attname), ', '
                          ORDER BY array_position(i.indkey::int2[], a.attnum))
          INTO key_expr
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
         WHERE i.indrelid = to_regclass(tbl) AND i.indisprimary;
        key_expr := coalesce(key_expr, 'to_jsonb(id) #>> ''{}''');
        SET LOCAL DateStyle = 'ISO, YMD';
        SET LOCAL TimeZone = 'UTC';
        EXECUTE format(
            'UPDATE __SCHEMA__.changes c SET row_data = x.data
               FROM (SELECT concat_ws('','', %s) AS k, %s AS data FROM %s) x
              WHERE c.source_table = %L AND c.row_data IS NULL AND c.source_pk = x.k',
            key_expr, __SCHEMA__.capture_expr(columns), to_regclass(tbl), tbl);
    END LOOP;
END
$$;
