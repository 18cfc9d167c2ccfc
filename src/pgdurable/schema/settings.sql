-- Settings that df's functions read.
--
-- pg_durable.* settings are placeholders: no extension registers them, so PostgreSQL accepts
-- any text for them, and these functions parse leniently, falling back to the default.
--
-- A placeholder is also a setting every role may SET in its own session, or pass as a
-- connection option (options='-c pg_durable.x=...', PGOPTIONS); current_setting() returns
-- that value, even inside a SECURITY DEFINER function. The settings read here limit what a
-- user may do to the server (the rows df.list_instances returns, the loopback connections
-- transaction_mode => 'new' opens, instances that run as a superuser), so they are read from
-- where only an administrator writes, never from the caller's session:
--
--   1. df._settings, which df.set_setting writes (the schema owner and superusers only), for
--      the limits it accepts (df._setting_bounds). It wins over the server configuration, and
--      it is the way on managed PostgreSQL, where the configuration file is out of reach.
--   2. ALTER ROLE ... SET / ALTER DATABASE ... SET / ALTER ROLE ALL SET for the session's
--      login role and this database (pg_db_role_setting), in PostgreSQL's order of
--      precedence. PostgreSQL lets only superusers, or roles a superuser granted SET on the
--      parameter (GRANT SET ON PARAMETER, PostgreSQL 15+), store a placeholder there: a user
--      cannot ALTER ROLE itself.
--   3. The server's configuration files: postgresql.conf, its includes, and
--      postgresql.auto.conf, which ALTER SYSTEM writes (pg_file_settings). Only where the
--      schema owner may read them: superusers may; another owner needs
--      GRANT SELECT ON pg_file_settings and GRANT EXECUTE ON FUNCTION
--      pg_show_all_file_settings() from a superuser. They are read as they are now, so an
--      edit counts without a reload.
--   4. The default.
--
-- Except that a session logged in as a superuser reads its own value in place of 2 and 3
-- for the two settings pg_durable documents as superuser-settable (PGC_SUSET):
-- pg_durable.list_instances_max_limit and pg_durable.enable_superuser_instances. A superuser
-- may SET those in pg_durable, and its session's value already holds 2 and 3. A non-superuser
-- login's SET still does not count, even when it then reaches df.start as a superuser
-- (SET ROLE to a superuser role it is a member of, or a superuser's SECURITY DEFINER
-- function): pg_durable would have refused that SET. The worker reads its own settings on
-- its own session (worker/loop.py), which only the server configuration reaches.

-- The integer limits, with the default and the range df._int_setting applies to each and
-- df.set_setting accepts. NULLs for any other name.
CREATE OR REPLACE FUNCTION df._setting_bounds(
    setting text, OUT fallback integer, OUT lo integer, OUT hi integer)
LANGUAGE sql IMMUTABLE AS $$
    SELECT b.fallback, b.lo, b.hi
      FROM (VALUES ('pg_durable.list_instances_max_limit', 1000, 1, 1000000),
                   ('pg_durable.max_new_transaction_starts', 2, 1, 1000),
                   ('pg_durable.new_transaction_start_timeout', 5, 1, 3600))
           AS b (name, fallback, lo, hi)
     WHERE b.name = lower(setting);
$$;

-- s as an integer in [lo, hi], or NULL when it is not one (surrounding blanks allowed).
CREATE OR REPLACE FUNCTION df._int_in_range(s text, lo integer, hi integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN t ~ '^[0-9]{1,7}$' AND t::integer BETWEEN lo AND hi THEN t::integer END
      FROM btrim(s, E' \t\n\r\f\v') AS t;
$$;

-- The value an administrator gave a pg_durable.* setting (1-3 above, or a superuser session's
-- own for the PGC_SUSET pair), or NULL for none. SECURITY DEFINER to read df._settings and
-- pg_file_settings, which users may not; it answers for pg_durable.* names only, as the
-- configuration files may hold other settings' secrets.
CREATE OR REPLACE FUNCTION df._admin_setting(setting text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name  text := lower(setting);
    v_value text;
BEGIN
    IF v_name IS NULL OR v_name !~ '^pg_durable\.[a-z0-9_]+$' THEN
        RETURN NULL;
    END IF;

    -- 1. df.set_setting's value. Only for the limits it accepts: the worker does not read this
    --    table, so e.g. enable_superuser_instances here would pass df.start and be refused there.
    IF (df._setting_bounds(v_name)).fallback IS NOT NULL THEN
        SELECT s.value INTO v_value FROM df._settings s WHERE s.name = v_name;
        IF FOUND THEN
            RETURN v_value;
        END IF;
    END IF;

    -- A superuser's session, for the settings pg_durable lets superusers SET.
    IF v_name IN ('pg_durable.list_instances_max_limit', 'pg_durable.enable_superuser_instances')
       AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = session_user AND r.rolsuper) THEN
        RETURN nullif(current_setting(v_name, true), '');
    END IF;

    -- 2. The login role's and this database's settings: (database, role) over (role) over
    --    (database) over ALTER ROLE ALL, as PostgreSQL applies them at login.
    SELECT substr(c.item, strpos(c.item, '=') + 1) INTO v_value
      FROM pg_db_role_setting s, unnest(s.setconfig) AS c (item)
     WHERE s.setdatabase IN (0, (SELECT d.oid FROM pg_database d
                                  WHERE d.datname = current_database()))
       AND s.setrole IN (0, (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user))
       AND lower(split_part(c.item, '=', 1)) = v_name
     ORDER BY s.setrole <> 0 DESC, s.setdatabase <> 0 DESC
     LIMIT 1;
    IF FOUND THEN
        RETURN v_value;
    END IF;

    -- 3. The configuration files, where this function's owner may read them: the last entry
    --    for the name that PostgreSQL would apply (an earlier duplicate is not).
    IF has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')
       AND has_function_privilege('pg_catalog.pg_show_all_file_settings()', 'EXECUTE') THEN
        SELECT f.setting INTO v_value
          FROM pg_file_settings f
         WHERE lower(f.name) = v_name AND f.applied
         ORDER BY f.seqno DESC
         LIMIT 1;
        IF FOUND THEN
            RETURN v_value;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- An integer limit of df._setting_bounds, or its default when unset or out of its range.
CREATE OR REPLACE FUNCTION df._int_setting(name text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(df._int_in_range(df._admin_setting(name), b.lo, b.hi), b.fallback)
      FROM df._setting_bounds(name) AS b;
$$;

-- pg_durable.list_instances_max_limit, or its default 1000 when unset or out of range.
CREATE OR REPLACE FUNCTION df._list_instances_max_limit() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT df._int_setting('pg_durable.list_instances_max_limit');
$$;

-- Whether pg_durable.enable_superuser_instances is on: df.start's check (the worker checks
-- again with its own session's value). Anything but on/true/1/yes is off.
CREATE OR REPLACE FUNCTION df._superuser_instances_enabled() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT lower(coalesce(df._admin_setting('pg_durable.enable_superuser_instances'), 'off'))
           IN ('on', 'true', '1', 'yes');
$$;

-- ---------------------------------------------------------------------------------------------
-- df.set_setting: an administrator's value for one of the limits above, stored in df._settings
-- where it wins over the server configuration, for every session at once; NULL removes it.
-- Only the schema owner (and its members) and superusers may: EXECUTE is not public, and
-- df._settings is the owner's. df.grant_usage(..., with_grant => true) does not hand it out.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.set_setting(setting text, value text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name   text := lower(btrim(setting));
    v_bounds record;
    v_value  integer;
BEGIN
    SELECT * INTO v_bounds FROM df._setting_bounds(v_name);
    IF v_bounds.fallback IS NULL THEN
        RAISE EXCEPTION 'df.set_setting: % is not a setting df.set_setting stores', quote_literal(setting)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'It stores pg_durable.list_instances_max_limit, pg_durable.max_new_transaction_starts and pg_durable.new_transaction_start_timeout. Set the others in the server configuration (postgresql.conf, ALTER SYSTEM or ALTER DATABASE ... SET), where the worker reads them too.';
    END IF;
    IF value IS NULL THEN
        DELETE FROM df._settings s WHERE s.name = v_name;
        RETURN;
    END IF;
    v_value := df._int_in_range(value, v_bounds.lo, v_bounds.hi);
    IF v_value IS NULL THEN
        RAISE EXCEPTION 'df.set_setting: % must be an integer from % to %, not %',
            v_name, v_bounds.lo, v_bounds.hi, quote_literal(value)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO df._settings AS s (name, value) VALUES (v_name, v_value::text)
    ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, set_at = now();
END;
$$;

REVOKE EXECUTE ON FUNCTION df.set_setting(text, text) FROM PUBLIC;
