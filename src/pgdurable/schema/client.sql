-- The client functions: control of instances, variables, listing, and the installation.
--
-- All of them run as the caller (SECURITY INVOKER) unless noted, so row-level security on
-- df.instances, df.nodes and df.vars scopes them to the caller's own rows. df.start is in
-- start.sql, df.signal in signals.sql, the monitoring functions in monitoring.sql.

-- True inside a workflow step: workers set df.in_workflow on the connections that run them.
CREATE OR REPLACE FUNCTION df._in_workflow() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('df.in_workflow', true), '') = 'true';
$$;

-- ---------------------------------------------------------------------------------------------
-- Instance control
-- ---------------------------------------------------------------------------------------------

-- The instance's status, or NULL if it does not exist or belongs to someone else.
CREATE OR REPLACE FUNCTION df.status(instance_id text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT i.status FROM df.instances i WHERE i.id = $1;
$$;

-- The root node's result once the instance completed; NULL in every other case.
CREATE OR REPLACE FUNCTION df.result(instance_id text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT n.result::text
      FROM df.instances i
      JOIN df.nodes n ON n.instance_id = i.id AND n.id = i.root_node
     WHERE i.id = $1 AND n.status = 'completed';
$$;

-- Wait until the instance is terminal and return its status. PL/pgSQL in READ COMMITTED
-- takes a new snapshot per statement, so every poll sees what workers committed meanwhile.
-- (LISTEN cannot help here: notifications only arrive between transactions.)
-- An instance this transaction has signalled (df.undelivered_signals, set by the signal
-- trigger, signals.sql) and that has not finished cannot get that signal before the commit:
-- waiting for it would only wait out the timeout, so that is an error at once.
CREATE OR REPLACE FUNCTION df.await_instance(instance_id text, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_status text;
    -- bigint: timeout_seconds * 10 overflows integer for timeouts of years.
    v_polls  bigint := timeout_seconds::bigint * 10;
    v_signalled boolean := position(',' || instance_id || ','
                                    IN coalesce(current_setting('df.undelivered_signals', true),
                                                '')) > 0;
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.await_instance() cannot be called inside a workflow - wait for instances from the client that started them'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        SELECT i.status INTO v_status FROM df.instances i WHERE i.id = await_instance.instance_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'Instance not found: %', instance_id USING ERRCODE = 'no_data_found';
        END IF;
        IF v_status IN ('completed', 'failed', 'cancelled') THEN
            v_status := lower(v_status);
            PERFORM df._mark_non_future_helper('df.await_instance()', v_status);
            RETURN v_status;
        END IF;
        IF v_signalled THEN
            RAISE EXCEPTION 'df.await_instance(): this transaction signalled instance % and has not committed; the signal is delivered only when it commits, so commit first, or send it with df.signal(..., transaction_mode => ''new'')',
                instance_id USING ERRCODE = 'active_sql_transaction';
        END IF;
        PERFORM pg_sleep(0.1);
        v_polls := v_polls - 1;
        EXIT WHEN v_polls <= 0;
    END LOOP;
    RAISE EXCEPTION 'Timeout after %s waiting for instance % (status: %). Check if background worker is running.',
        timeout_seconds, instance_id, v_status;
END;
$$;

CREATE OR REPLACE FUNCTION df.wait_for_completion(instance_id text, timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    RAISE WARNING 'df.wait_for_completion() is deprecated; use df.await_instance() instead';
    RETURN df.await_instance(instance_id, timeout_seconds);
END;
$$;

-- Cancel an instance. Setting the status is the whole request: the engine's trigger on
-- df.instances drops the instance's queued work and tells the workers (engine.sql). A
-- terminal instance is left as it is, and the call still succeeds (it is idempotent).
CREATE OR REPLACE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user')
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    -- Under RLS, someone else's instance looks exactly like a missing one.
    IF NOT EXISTS (SELECT 1 FROM df.instances i WHERE i.id = cancel.instance_id) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    BEGIN
        UPDATE df.instances i
           SET status = 'cancelled', updated_at = now()
         WHERE i.id = cancel.instance_id
           AND i.status NOT IN ('completed', 'failed', 'cancelled');
    EXCEPTION WHEN OTHERS THEN
        -- As in pg_durable, a failed cancel request is reported in the result, not raised.
        RETURN 'Failed to cancel: ' || SQLERRM;
    END;
    RETURN format('Instance %s cancelled: %s', instance_id, reason);
END;
$$;

-- Restart a failed or cancelled instance from where it ended (pgdurable's own; pg_durable has
-- none): the steps that completed keep their results and effects, the work the failure or the
-- cancel interrupted runs again (docs/reference.md#dfrestart). Setting the status back to
-- 'running' is the whole request, as for df.cancel: the engine's trigger on df.instances
-- does the rest (engine.sql). Only one of two concurrent restarts finds the instance still
-- failed or cancelled: the other waits for its row lock, then finds it running, and says so.
CREATE OR REPLACE FUNCTION df.restart(instance_id text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE df.instances i
       SET status = 'running', updated_at = now()
     WHERE i.id = restart.instance_id AND i.status IN ('failed', 'cancelled');
    IF FOUND THEN
        RETURN format('Instance %s restarted', instance_id);
    END IF;
    -- Under RLS, someone else's instance looks exactly like a missing one.
    SELECT i.status INTO v_status FROM df.instances i WHERE i.id = restart.instance_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RAISE EXCEPTION 'Instance % is %: only a failed or cancelled instance can be restarted',
        instance_id, v_status
        USING ERRCODE = 'object_not_in_prerequisite_state';
END;
$$;

-- A no-op kept for compatibility: workers pick up new instances by themselves.
CREATE OR REPLACE FUNCTION df.run(instance_id text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN $1 IS NULL THEN 'Triggered run for all pending instances'
                ELSE 'Triggered run for instance: ' || $1 END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Variables. Each role has its own; {name} in a step's SQL is replaced by the
-- value the submitter had when the instance started. The explicit owner filter keeps
-- superusers, who bypass RLS, to their own variables too.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.setvar(name text, value text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
-- Unqualified names in the statements are df.vars columns; parameters are written setvar.x.
#variable_conflict use_column
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.setvar() cannot be called inside a workflow - set variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    INSERT INTO df.vars AS v (name, value, owner)
    VALUES (setvar.name, setvar.value, quote_ident(current_user)::regrole)
    ON CONFLICT (owner, name) DO UPDATE SET value = EXCLUDED.value;
    PERFORM df._mark_non_future_helper('df.setvar()', 'OK');
    RETURN 'OK';
END;
$$;

CREATE OR REPLACE FUNCTION df.getvar(name text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT v.value FROM df.vars v
     WHERE v.owner = quote_ident(current_user)::regrole AND v.name = $1;
$$;

CREATE OR REPLACE FUNCTION df.unsetvar(name text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.unsetvar() cannot be called inside a workflow - manage variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    DELETE FROM df.vars v
     WHERE v.owner = quote_ident(current_user)::regrole AND v.name = unsetvar.name;
    PERFORM df._mark_non_future_helper('df.unsetvar()', 'OK');
    RETURN 'OK';
END;
$$;

CREATE OR REPLACE FUNCTION df.clearvars() RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF df._in_workflow() THEN
        RAISE EXCEPTION 'df.clearvars() cannot be called inside a workflow - manage variables before starting the workflow'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    DELETE FROM df.vars v WHERE v.owner = quote_ident(current_user)::regrole;
    PERFORM df._mark_non_future_helper('df.clearvars()', 'OK');
    RETURN 'OK';
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.list_instances, the basic overload


CREATE OR REPLACE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count integer DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_limit integer := coalesce(limit_count, 100);
    v_max   integer := df._list_instances_max_limit();
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_limit > v_max THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (%); request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) for large result sets',
            v_limit, v_max USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- execution_count and output come from the engine's run record, whose generation and
    -- output columns users may read for their own instances.
    RETURN QUERY
        SELECT i.id::text, i.label, 'pg_durable::orchestration::execute-function-graph'::text,
               i.status, r.generation::bigint, r.output
          FROM df.instances i
          LEFT JOIN df._runs r ON r.instance_id = i.id
         WHERE list_instances.status_filter IS NULL OR i.status = list_instances.status_filter
         ORDER BY i.created_at DESC, i.id
         LIMIT v_limit;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.list_instances, the paginated overload. The basic overload above
-- already orders ties on created_at by id, the order this one pages through.
--
-- Keyset pagination: a page is the instances after the last row of the previous page in the
-- order (created_at DESC, id ASC), so pages neither skip nor repeat rows when instances are
-- started or removed between two calls. The cursor names that last row: the lower-case hex of
-- 'v1|<created_at with microseconds and UTC offset>|<id>'. Opaque to callers, but exactly
-- pg_durable's, so cursors can be passed between the two.
-- ---------------------------------------------------------------------------------------------

-- The row a cursor names, or pg_durable's error for anything that is not a cursor this function
-- could have produced: odd length, non-hex, more than 512 hex digits, not UTF-8, another
-- version, an empty part, a timestamp of another shape, or a date that does not exist.
CREATE OR REPLACE FUNCTION df._list_cursor(cursor text, OUT created_at timestamptz, OUT id text)
LANGUAGE plpgsql STABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_text   text;
    v_parts  text[];
BEGIN
    IF length(cursor) <= 512 AND length(cursor) % 2 = 0 AND cursor ~ '^[0-9a-fA-F]*$' THEN
        BEGIN
            -- convert_from refuses invalid UTF-8 and NUL bytes.
            v_text := convert_from(decode(cursor, 'hex'), 'UTF8');
            -- 'v1|<timestamp>|<id>'; the id is the rest, whatever it holds.
            v_parts := regexp_match(v_text, '^v1\|([^|]+)\|(.+)$');
            IF v_parts[1] ~ '^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}[+-]\d{2}(:\d{2})?$' THEN
                created_at := v_parts[1]::timestamptz;  -- refuses e.g. a 13th month
                id := v_parts[2];
                RETURN;
            END IF;
        EXCEPTION WHEN others THEN
            NULL;  -- reported below, like every other malformed cursor
        END;
    END IF;
    RAISE EXCEPTION 'df.list_instances: invalid after_cursor'
        USING ERRCODE = 'invalid_parameter_value';
END;
$$;

CREATE OR REPLACE FUNCTION df.list_instances(status_filter text, limit_count integer, label_filter text,
                                  after_cursor text DEFAULT NULL)
RETURNS TABLE (instance_id text, label text, function_name text, status text,
               execution_count bigint, output text, created_at timestamptz,
               completed_at timestamptz, next_cursor text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit    integer := coalesce(limit_count, 100);
    v_max      integer := df._list_instances_max_limit();
    v_after    timestamptz;
    v_after_id text;
    v_where    text := '';
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_limit > v_max THEN
        RAISE EXCEPTION 'df.list_instances: limit_count (%) exceeds pg_durable.list_instances_max_limit (%); request fewer rows, or use the paginated df.list_instances overload (after_cursor/next_cursor) for large result sets',
            v_limit, v_max USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF after_cursor IS NOT NULL THEN
        SELECT c.created_at, c.id INTO v_after, v_after_id FROM df._list_cursor(after_cursor) c;
    END IF;
    -- Only the filters given are in the statement, planned for these values: each filter has
    -- an index that yields rows in page order, so a page costs about its size.
    IF status_filter IS NOT NULL THEN
        v_where := v_where || ' AND i.status = $2';
    END IF;
    IF label_filter IS NOT NULL THEN
        v_where := v_where || ' AND i.label = $3';
    END IF;
    IF v_after IS NOT NULL THEN
        -- The first condition is implied by the second; spelled out, it bounds the index scan,
        -- so a deep page does not read every row before it.
        v_where := v_where || ' AND i.created_at <= $4'
                           || ' AND (i.created_at < $4 OR (i.created_at = $4 AND i.id > $5))';
    END IF;
    -- One row more than the page tells whether there is a next page; the cursor then names
    -- the page's last row and is repeated on every row, as in pg_durable.
    RETURN QUERY EXECUTE format($q$
        WITH page AS (
            SELECT i.id, i.label, i.status, i.created_at, i.completed_at,
                   row_number() OVER (ORDER BY i.created_at DESC, i.id) AS n
              FROM (SELECT i.*
                      FROM df.instances i
                     WHERE i.created_at IS NOT NULL %s
                     ORDER BY i.created_at DESC, i.id
                     LIMIT $1 + 1) i
        )
        SELECT p.id::text, p.label, 'pg_durable::orchestration::execute-function-graph'::text,
               p.status, r.generation::bigint, r.output, p.created_at, p.completed_at,
               (SELECT encode(convert_to('v1|' || to_char(l.created_at,
                                                          'YYYY-MM-DD"T"HH24:MI:SS.USOF')
                                         || '|' || l.id, 'UTF8'), 'hex')
                  FROM page l WHERE l.n = $1 AND EXISTS (SELECT 1 FROM page m WHERE m.n > $1))
          FROM page p
          LEFT JOIN df._runs r ON r.instance_id = p.id
         WHERE p.n <= $1
         ORDER BY p.n
    $q$, v_where)
    USING v_limit, status_filter, label_filter, v_after, v_after_id;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- About the installation
-- ---------------------------------------------------------------------------------------------

-- '<release> (built <when this release's functions were installed, UTC>)'. SECURITY DEFINER
-- only to read df._schema, which users have no privileges on.
CREATE OR REPLACE FUNCTION df.version() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT s.release || ' (built '
           || to_char(s.upgraded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') || ')'
      FROM df._schema s;
$$;

CREATE OR REPLACE FUNCTION df.duroxide_schema() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '_duroxide'::text;
$$;

-- The database SQL steps run in by default: pg_durable.database if set, else this one.
CREATE OR REPLACE FUNCTION df.target_database() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('pg_durable.database', true), ''),
                    current_database())::text;
$$;
