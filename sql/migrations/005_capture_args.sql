-- capture() reads the key columns from its trigger arguments, which `setup`
-- fills in from the table's primary key when it installs the trigger. Looking
-- the key up in the catalog on every row (as 003 did, and as this still does
-- for a trigger installed without arguments) cost more than the rest of the
-- trigger together: 20 000-row INSERT, 0.90 s with the lookup, 0.39 s without,
-- 0.14 s with no trigger. Re-run `setup` after changing a routed table's key.
CREATE OR REPLACE FUNCTION __SCHEMA__.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    rec jsonb := to_jsonb(NEW);
    key text;
BEGIN
    IF TG_NARGS = 1 THEN
        key := rec ->> TG_ARGV[0];
    ELSIF TG_NARGS > 1 THEN
        SELECT string_agg(rec ->> c, ',' ORDER BY n) INTO key FROM unnest(TG_ARGV) WITH ORDINALITY AS k(c, n);
    ELSE
        SELECT string_agg(rec ->> a.attname, ',' ORDER BY array_position(i.indkey::int2[], a.attnum))
          INTO key
          FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[])
         WHERE i.indrelid = TG_RELID AND i.indisprimary;
    END IF;
    key := coalesce(key, rec ->> 'id', '');
    INSERT INTO __SCHEMA__.changes (source_table, source_pk, op) VALUES (tbl, key, lower(TG_OP));
    -- Only table and key: far below NOTIFY's 8000-byte payload limit. A wake-up, not the data.
    PERFORM pg_notify('__SCHEMA__', left(tbl || ':' || key, 1000));
    RETURN NULL;
END
$$;
