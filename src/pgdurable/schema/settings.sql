-- Settings that df's functions read.
--
-- pg_durable.* settings are placeholders: no extension registers them, so PostgreSQL accepts
-- any text for them, and these functions parse leniently, falling back to the default.

-- An integer pg_durable.* setting, or its default when unset or outside [lo, hi].
CREATE OR REPLACE FUNCTION df._int_setting(name text, fallback integer, lo integer, hi integer)
RETURNS integer
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s text := btrim(coalesce(current_setting(name, true), ''));
BEGIN
    IF s ~ '^[0-9]{1,7}$' AND s::integer BETWEEN lo AND hi THEN
        RETURN s::integer;
    END IF;
    RETURN fallback;
END;
$$;

-- pg_durable.list_instances_max_limit, or its default 1000 when unset or out of range.
CREATE OR REPLACE FUNCTION df._list_instances_max_limit() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN s ~ '^\s*[0-9]{1,7}\s*$' AND s::integer BETWEEN 1 AND 1000000
                THEN s::integer ELSE 1000 END
      FROM coalesce(current_setting('pg_durable.list_instances_max_limit', true), '') AS s;
$$;
