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

-- Whether a NOTIFY would wake anyone. The relay arms it when it is about to
-- wait for a notification and disarms it while it is busy reading (a busy
-- relay polls again within milliseconds anyway), so writers notify only when
-- that helps: under a steady write load, hardly ever, and the commit-time
-- lock NOTIFY takes (docs/listen-mode.md) is not taken at all. Unlogged: it
-- is not worth WAL; a crash empties it, and an empty doorbell counts as armed.
CREATE UNLOGGED TABLE IF NOT EXISTS __SCHEMA__.listen_doorbell (armed boolean NOT NULL);

-- A column's value as its type's text output, the way pgoutput sends it,
-- whatever the writer's session settings: `concat` calls the output function
-- (a cast to text differs for some types: true::text is 'true', boolout gives
-- 't'); timestamps and dates, whose output follows DateStyle and TimeZone, are
-- spelled out in ISO form, timestamptz in UTC. (1184 timestamptz, 1114
-- timestamp, 1082 date.) Other session-dependent outputs (interval under a
-- non-default IntervalStyle, arrays of timestamps) follow the writer's session.
CREATE OR REPLACE FUNCTION __SCHEMA__.text_output(expr text, type_oid oid) RETURNS text
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE type_oid
        WHEN 1184 THEN format('CASE WHEN NOT isfinite(%1$s) THEN %1$s::text '
                              'ELSE to_char(%1$s AT TIME ZONE ''UTC'', ''YYYY-MM-DD HH24:MI:SS.US'') || ''+00'' END', expr)
        WHEN 1114 THEN format('CASE WHEN NOT isfinite(%1$s) THEN %1$s::text '
                              'ELSE to_char(%1$s, ''YYYY-MM-DD HH24:MI:SS.US'') END', expr)
        WHEN 1082 THEN format('CASE WHEN NOT isfinite(%1$s) THEN %1$s::text ELSE to_char(%1$s, ''YYYY-MM-DD'') END', expr)
        ELSE format('CASE WHEN %1$s IS NULL THEN NULL ELSE concat(%1$s) END', expr)
    END
$$;

-- The SQL expression that turns `columns` of `tbl`, in a row aliased `alias`,
-- into row_data. jsonb_build_object takes at most 100 arguments: 50 columns
-- per call, joined with ||. Columns the table lacks are left out.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture_expr(tbl regclass, columns text[], alias text) RETURNS text
LANGUAGE sql STABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(string_agg(format('jsonb_build_object(%s)', pairs), ' || ' ORDER BY g), '''{}''::jsonb')
      FROM (SELECT (u.n - 1) / 50 AS g,
                   string_agg(format('%L, %s', u.c, __SCHEMA__.text_output(format('%I.%I', alias, u.c), a.atttypid)),
                              ', ' ORDER BY u.n) AS pairs
              FROM unnest(columns) WITH ORDINALITY AS u(c, n)
              JOIN pg_attribute a ON a.attrelid = tbl AND a.attname = u.c AND a.attnum > 0 AND NOT a.attisdropped
             GROUP BY 1) parts
$$;

-- What `setup` calls per routed table: writes the table's capture function and
-- its statement-level triggers, one per operation in `operations` (a trigger
-- with a transition table serves one event); drops the earlier install's
-- row-level trigger and the triggers of operations no longer listed.
--
-- The capture function is generated for the table, with static SQL: plpgsql
-- plans it once per session, where a generic function building its INSERT per
-- statement (EXECUTE format(...)) cost 10x the insert it rode on. One
-- INSERT ... SELECT per statement, not per row (a 100-row bulk_create fires it
-- once), capturing `columns` and the primary key's. With `notify`, one NOTIFY
-- per statement that wrote rows while the relay's doorbell is armed, with a
-- constant payload: PostgreSQL folds identical notifications of a
-- transaction, so a transaction queues one at most.
--
-- SECURITY DEFINER, search_path pinned: Django's role writes the change log
-- through it without any right on the relay schema. EXECUTE is revoked from
-- PUBLIC: PostgreSQL checks it when a trigger is created, so only its owner
-- can attach it to a table. The trigger arguments (the notify flag, then the
-- captured columns) are not read by the function: they tell preflight what
-- the installed trigger captures.
CREATE OR REPLACE FUNCTION __SCHEMA__.install_capture(tbl regclass, operations text[], columns text[], notify boolean)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    qualified text;
    fname text;
    captured text[];
    expr text;
    args text;
    op text;
BEGIN
    SELECT n.nspname || '.' || c.relname INTO qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    SELECT array_agg(c ORDER BY n) INTO captured FROM (
        SELECT c, min(n) AS n FROM unnest(columns || ARRAY(
            SELECT a.attname::text
              FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
             WHERE i.indrelid = tbl AND i.indisprimary
             ORDER BY array_position(i.indkey::int2[], a.attnum))) WITH ORDINALITY AS u(c, n)
         GROUP BY c) d;
    fname := left('capture_' || regexp_replace(lower(qualified), '[^a-z0-9_]+', '_', 'g'), 54)
             || '_' || left(md5(qualified), 8);
    expr := __SCHEMA__.capture_expr(tbl, coalesce(captured, '{}'), 'r');
    EXECUTE format(
        $f$CREATE OR REPLACE FUNCTION __SCHEMA__.%1$I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %2$L$f$,
        fname,
        format($b$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO __SCHEMA__.changes (source_table, op, row_data) SELECT %1$L, 'delete', %2$s FROM captured_old r;
    ELSE
        INSERT INTO __SCHEMA__.changes (source_table, op, row_data) SELECT %1$L, lower(TG_OP), %2$s FROM captured_new r;
    END IF;
    %3$s
    RETURN NULL;
END
$b$, qualified, expr,
            CASE WHEN notify THEN 'IF FOUND AND coalesce((SELECT bool_or(armed) FROM __SCHEMA__.listen_doorbell), true) THEN
        PERFORM pg_notify(''__SCHEMA__'', '''');
    END IF;'
                 ELSE '-- source.notify = false: the relay polls.' END));
    EXECUTE format('REVOKE EXECUTE ON FUNCTION __SCHEMA__.%I() FROM PUBLIC', fname);
    EXECUTE format('COMMENT ON FUNCTION __SCHEMA__.%I() IS %L', fname,
                   'outbox-relay: captures ' || qualified || ' into the change log (written by setup)');
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', '__SCHEMA___capture', tbl);
    args := quote_literal(CASE WHEN notify THEN 'notify' ELSE 'quiet' END)
            || coalesce(', ' || (SELECT string_agg(quote_literal(c), ', ') FROM unnest(captured) c), '');
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        IF op = ANY (operations) THEN
            EXECUTE format('CREATE OR REPLACE TRIGGER %I AFTER %s ON %s REFERENCING %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION __SCHEMA__.%I(%s)',
                           '__SCHEMA___capture_' || op, upper(op), tbl,
                           CASE op WHEN 'delete' THEN 'OLD TABLE AS captured_old' ELSE 'NEW TABLE AS captured_new' END,
                           fname, args);
        ELSE
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', '__SCHEMA___capture_' || op, tbl);
        END IF;
    END LOOP;
END
$$;

-- The earlier row-level function, for triggers `setup` has not replaced yet
-- (the relay refuses to start until it has; see preflight): it now records the
-- whole row as committed too, and notifies with the constant payload, so rows
-- written between this migration and `setup` replacing the trigger are kept.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    columns text[];
    data jsonb;
BEGIN
    SELECT array_agg(attname::text ORDER BY attnum) INTO columns
      FROM pg_attribute WHERE attrelid = TG_RELID AND attnum > 0 AND NOT attisdropped;
    IF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', __SCHEMA__.capture_expr(TG_RELID, columns, 'r'))
           INTO data USING OLD;
    ELSE
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) r', __SCHEMA__.capture_expr(TG_RELID, columns, 'r'))
           INTO data USING NEW;
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
        EXECUTE format(
            'UPDATE __SCHEMA__.changes c SET row_data = x.data
               FROM (SELECT concat_ws('','', %s) AS k, %s AS data FROM %s x) x
              WHERE c.source_table = %L AND c.row_data IS NULL AND c.source_pk = x.k',
            key_expr, __SCHEMA__.capture_expr(to_regclass(tbl), columns, 'x'), to_regclass(tbl), tbl);
    END LOOP;
END
$$;
