-- The schema pgdurable 0.1.0 installs: frozen when it was released, never edited.
-- pgdurable's tables, as a fresh install creates them.
--
-- This file is the current design of every table, column, constraint and index. A fresh
-- install runs it once; a database installed by an earlier release gets the same result from
-- the numbered files in migrations/ instead (tests/test_upgrade.py checks that both agree).
-- So a change to a table is made twice: here, and in a new migration. New columns go at the
-- end of their table, where ALTER TABLE ... ADD COLUMN puts them. Functions, triggers,
-- policies and grants are not here: they live in the area files, which every install applies
-- again (see __init__.py).
--
-- The public tables (df.instances, df.nodes, df.vars) have pg_durable's columns, column for
-- column. Engine state lives in tables whose names start with an underscore; users get no
-- privileges on them beyond the few columns df.grant_usage hands out (security.sql).
--
-- Runs as the installing role, which becomes the owner of everything here. The owner bypasses
-- row-level security (it is not FORCEd), which is how the worker does its bookkeeping.

CREATE SCHEMA IF NOT EXISTS df;
REVOKE ALL ON SCHEMA df FROM PUBLIC;

-- Which release installed the functions, and which table migrations have run. One row.
CREATE TABLE df._schema (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    release       text NOT NULL,                  -- pgdurable's version, e.g. '0.1.0'
    migration     integer NOT NULL,               -- the last file of migrations/ applied
    code_digest   text NOT NULL,                  -- of the area files last applied
    installed_at  timestamptz NOT NULL DEFAULT now(),
    upgraded_at   timestamptz NOT NULL DEFAULT now()  -- when the area files were last applied
);

-- The node types, the one list of them in SQL: the CHECK on df.nodes, df.start's validation
-- and the builders read it. A function rather than a table so that a CHECK may use it; adding
-- a type is a migration that replaces it (and the CHECK on the structure, below).
CREATE FUNCTION df._node_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'RETRY', 'TIMEOUT'];
$$;

-- ---------------------------------------------------------------------------------------------
-- Instances: one row per df.start().
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df.instances (
    id            varchar(8) PRIMARY KEY,
    label         text,
    root_node     varchar(8) NOT NULL,
    status        text NOT NULL DEFAULT 'pending',
    submitted_by  regrole NOT NULL,
    database      text,
    created_at    timestamptz DEFAULT now(),
    updated_at    timestamptz DEFAULT now(),
    completed_at  timestamptz,
    CONSTRAINT instances_identity_key UNIQUE (id, submitted_by),
    CONSTRAINT instances_id_hex8_chk CHECK (id ~ '^[0-9a-f]{8}$'),
    CONSTRAINT instances_root_node_hex8_chk CHECK (root_node ~ '^[0-9a-f]{8}$'),
    CONSTRAINT instances_status_chk
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled'))
);

CREATE INDEX instances_status_created_idx ON df.instances (status, created_at DESC, id);
CREATE INDEX instances_created_idx ON df.instances (created_at DESC, id);
CREATE INDEX instances_label_created_idx ON df.instances (label, created_at DESC, id)
    WHERE label IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- Nodes: the stored graph, one row per node, children referenced by id. An IF's or LOOP's
-- condition and a JOIN's extra branches are referenced from the node's JSON config in query.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df.nodes (
    id              varchar(8) NOT NULL,
    instance_id     varchar(8) NOT NULL,
    node_type       text NOT NULL,
    query           text,
    result_name     text,
    left_node       varchar(8),
    right_node      varchar(8),
    status          text DEFAULT 'pending',
    result          jsonb,
    error           text,          -- a df.retry's failed attempts, one line each
    submitted_by    regrole,
    database        text,
    created_at      timestamptz DEFAULT now(),
    updated_at      timestamptz DEFAULT now(),
    status_details  jsonb,         -- {"execution_id": "<scope>::<generation>"}
    started_at      timestamptz,   -- when it last became running, for durations
    PRIMARY KEY (instance_id, id),
    CONSTRAINT nodes_id_hex8_chk CHECK (id ~ '^[0-9a-f]{8}$'),
    CONSTRAINT nodes_children_hex8_chk CHECK (
        (left_node IS NULL OR left_node ~ '^[0-9a-f]{8}$')
        AND (right_node IS NULL OR right_node ~ '^[0-9a-f]{8}$')),
    CONSTRAINT nodes_type_chk CHECK (node_type = ANY (df._node_types())),
    CONSTRAINT nodes_result_name_chk CHECK (result_name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    CONSTRAINT nodes_status_chk CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    CONSTRAINT nodes_result_terminal_chk
        CHECK (result IS NULL OR status IN ('completed', 'failed')),
    CONSTRAINT nodes_structure_chk CHECK (CASE node_type
        WHEN 'THEN' THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NULL
        WHEN 'IF'   THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NOT NULL
        WHEN 'LOOP' THEN left_node IS NOT NULL AND right_node IS NULL
        WHEN 'JOIN' THEN left_node IS NOT NULL AND right_node IS NOT NULL
        WHEN 'RACE' THEN left_node IS NOT NULL AND right_node IS NOT NULL AND query IS NULL
        WHEN 'RETRY' THEN left_node IS NOT NULL AND right_node IS NULL AND query IS NOT NULL
        WHEN 'TIMEOUT' THEN left_node IS NOT NULL AND right_node IS NULL AND query IS NOT NULL
        ELSE left_node IS NULL AND right_node IS NULL AND query IS NOT NULL
    END)
);

CREATE INDEX nodes_instance_idx ON df.nodes (instance_id);
-- Deleting a node makes PostgreSQL check, at commit, that no node still names it as its left
-- or right child. Without an index on those columns each check reads every node of the
-- instance, so removing an instance of n nodes cost n² row visits (a 10,000-node graph took
-- seconds). Only nodes with children are in them (about half of a graph).
CREATE INDEX nodes_left_idx ON df.nodes (instance_id, left_node) WHERE left_node IS NOT NULL;
CREATE INDEX nodes_right_idx ON df.nodes (instance_id, right_node) WHERE right_node IS NOT NULL;

-- Parent rows are inserted before their children and the instance before its root node, all
-- in one transaction, so the graph's foreign keys are checked at commit. The names are
-- pg_durable's: catalog checks written for it look for them.
ALTER TABLE df.instances
    ADD CONSTRAINT instances_root_node_same_instance_fkey FOREIGN KEY (id, root_node)
        REFERENCES df.nodes (instance_id, id) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE df.nodes
    ADD CONSTRAINT nodes_instance_fkey FOREIGN KEY (instance_id, submitted_by)
        REFERENCES df.instances (id, submitted_by) ON DELETE CASCADE
        DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT nodes_left_node_same_instance_fkey FOREIGN KEY (instance_id, left_node)
        REFERENCES df.nodes (instance_id, id) DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT nodes_right_node_same_instance_fkey FOREIGN KEY (instance_id, right_node)
        REFERENCES df.nodes (instance_id, id) DEFERRABLE INITIALLY DEFERRED;

-- ---------------------------------------------------------------------------------------------
-- Variables: per-role key/value pairs, snapshotted into each instance at start.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df.vars (
    name   text NOT NULL,
    value  text,
    owner  regrole NOT NULL DEFAULT quote_ident(current_user)::regrole,
    PRIMARY KEY (owner, name)
);

-- ---------------------------------------------------------------------------------------------
-- Engine state. Only the owner (the worker) and SECURITY DEFINER functions write it.
-- ---------------------------------------------------------------------------------------------

-- The interpreter state of each instance, written by every checkpoint. Users may read a few
-- columns of their own runs (for the monitoring functions, which run as the caller).
CREATE TABLE df._runs (
    instance_id  varchar(8) PRIMARY KEY REFERENCES df.instances (id) ON DELETE CASCADE,
    vars         jsonb NOT NULL DEFAULT '{}',  -- the submitter's df.vars at start
    state        jsonb,                        -- NULL until a worker loaded the graph
    generation   integer NOT NULL DEFAULT 1,   -- root execution number (loop iterations)
    output       text,                         -- root result (completed) or error (failed)
    checkpoints  bigint NOT NULL DEFAULT 0,    -- how many checkpoints were committed
    -- When the instance became terminal; NULL while pending or running. Retention dates
    -- instances by it, never by updated_at, which their owners may write.
    finished_at  timestamptz
);

-- Oldest finished first, for the purge; newest first, for the count limit. Partial: only
-- finished instances are in it, and checkpoints before the last never change finished_at, so
-- their updates of df._runs can be HOT.
CREATE INDEX runs_finished_idx ON df._runs (finished_at, instance_id)
    WHERE finished_at IS NOT NULL;

-- Work to do. A task is claimable when visible_at has passed: new tasks at once, timers at
-- their deadline, leased tasks when the lease runs out (a worker that dies simply stops
-- extending it). Each claim draws a fresh token; only the holder of the current token can
-- checkpoint the task, which fences out a worker whose lease was taken over.
CREATE TABLE df._tasks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  varchar(8) NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    activation   integer NOT NULL,             -- the interpreter activation it belongs to
    kind         text NOT NULL,
    node_id      varchar(8),
    payload      jsonb,                        -- kind 'sql': {"sql": <substituted text>}
    visible_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner  uuid,
    token        uuid,
    attempts     integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    role_oid     oid NOT NULL,                 -- the submitter, for fair shares between roles
    -- How often the task was given back because its checkpoint could not get a lock: the
    -- next try waits longer each time.
    deferrals    integer NOT NULL DEFAULT 0,
    UNIQUE (instance_id, activation),
    CONSTRAINT _tasks_kind_check CHECK (kind IN ('start', 'sql', 'http', 'timer', 'signal'))
);

CREATE INDEX tasks_visible_idx ON df._tasks (visible_at);
CREATE INDEX tasks_lease_owner_idx ON df._tasks (lease_owner) WHERE lease_owner IS NOT NULL;
-- The claim walks the roles that have tasks (one index probe each), then takes each role's
-- due tasks in order.
CREATE INDEX tasks_role_visible_idx ON df._tasks (role_oid, visible_at);

-- Signals sent to instances. Kept until a wait consumes them; consumed ones stay as a record
-- until their instance is deleted. Signals of a finished instance are never delivered (it
-- has no waits left, and df.signal refuses new ones), so they need no cleaning up of their own.
CREATE TABLE df._signals (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- send order
    instance_id  varchar(8) NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    name         text NOT NULL,
    data         jsonb NOT NULL,              -- JSON null is 'null'::jsonb, never SQL NULL
    sent_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_by      regrole NOT NULL DEFAULT quote_ident(current_user)::regrole,
    consumed_at  timestamptz,                 -- NULL while buffered
    consumed_by  integer                      -- the activation of the wait that took it
);

-- "The oldest unconsumed signal <name> of <instance>", for waits and df._checkpoint.
CREATE INDEX signals_pending_idx ON df._signals (instance_id, name, id)
    WHERE consumed_at IS NULL;
-- For ON DELETE CASCADE, which must also find consumed signals.
CREATE INDEX signals_instance_idx ON df._signals (instance_id);

-- Executions of an instance that ended because its root loop began its next iteration
-- (continue-as-new, in pg_durable's words). The current execution is not here: it is derived
-- from df._runs and df.instances when read, so a workflow without a root loop writes no row
-- here at all. Only the newest 1,000 of an instance are kept.
--
--   status       'ContinuedAsNew'
--   started_at   the start of the instance for the first; the end of the one before for the
--                others
--   first_event  df._runs.checkpoints when it began (0 for the first)
--   events       its checkpoints (the one that begins an iteration counts in the new one)
--   output       the iteration's body result
CREATE TABLE df._executions (
    instance_id  varchar(8) NOT NULL REFERENCES df._runs (instance_id) ON DELETE CASCADE,
    generation   integer NOT NULL,
    status       text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    first_event  bigint NOT NULL,
    events       bigint,
    output       text,
    PRIMARY KEY (instance_id, generation)
);

-- Live workers. pg_durable names this table; pgdurable runs any number of workers, so each
-- keeps its own row (epoch_id is the worker id) and heartbeats it.
CREATE TABLE df._worker_epoch (
    epoch_id      uuid PRIMARY KEY,
    started_at    timestamptz DEFAULT now(),
    last_seen_at  timestamptz DEFAULT now(),
    hostname      text,
    pid           integer,
    concurrency   integer,
    version       text
);

-- One purger at a time. Its transaction holds this row; others skip it and do nothing. A row
-- of an engine table rather than an advisory lock: any role can take any advisory lock, and
-- could then stop retention (and let the tables grow) for as long as it liked. The row also
-- shows when the last purge ran and how many instances purges removed in all.
CREATE TABLE df._retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_purge_at  timestamptz,              -- end of the last batch, NULL before the first
    purged         bigint NOT NULL DEFAULT 0 -- instances removed since install
);
INSERT INTO df._retention DEFAULT VALUES;

-- Limits an administrator set with df.set_setting (settings.sql): they win over the server
-- configuration. The owner's alone: users get no privileges on it, and read it only through
-- df._admin_setting, so no session of theirs can raise a limit.
CREATE TABLE df._settings (
    name    text PRIMARY KEY,         -- e.g. 'pg_durable.list_instances_max_limit'
    value   text NOT NULL,
    set_at  timestamptz NOT NULL DEFAULT now()
);

-- pg_durable's readiness probe: the worker writes its row once it runs.
CREATE SCHEMA IF NOT EXISTS _duroxide;
CREATE TABLE _duroxide._worker_ready (
    sentinel        boolean PRIMARY KEY DEFAULT true CHECK (sentinel),
    schema_version  integer NOT NULL,
    initialized_at  timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------
-- Autovacuum (measured by bench/storage.py; docs/engine.md, "Storage and retention").
--
-- df._tasks is a queue: every step inserts a row, claims and heartbeats update it, its
-- checkpoint deletes it. Its dead rows slow down every claim (an index scan over visible_at)
-- until vacuum removes them. By default autovacuum waits for 20% of the table to be dead: with
-- many sleeping timers or signal waits queued (100,000 → 20,000 dead rows) that is a lot of
-- scanning, while the live rows it would have to visit are all-visible and cost vacuum
-- nothing. A fixed threshold, and no cost delay, keep the queue compact whatever its size.
--
-- df.instances, df.nodes, df._runs and df._signals hold the finished instances retention
-- keeps (30 days, or the newest 10,000, by default), and every purge deletes their oldest rows.
-- Vacuuming them at 5% dead rows rather than 20% bounds the dead space between vacuums to
-- that, at the cost of more frequent (visibility-map guided, so cheap) passes.
--
-- No fillfactor: checkpoints update df.nodes and df._runs rows in place without touching an
-- indexed column, so most updates are HOT already (page pruning makes room); a fillfactor of
-- 80 (nodes) or 50 (runs) raised the share of HOT updates by a few points at most, and made
-- every retained finished instance take up 25-100% more room.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df._tasks SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE df.instances SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE df.nodes SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE df._runs SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE df._signals SET (autovacuum_vacuum_scale_factor = 0.05);

INSERT INTO df._schema (release, migration, code_digest) VALUES ('0.1.0', 0, 'a06f9546eb4f79801325fc275e5f7e8c7501342ee3261923e1f994f6326e8eaa');
-- What a release removed, or changed in a way CREATE OR REPLACE cannot.
--
-- Every install applies the area files again; CREATE OR REPLACE keeps a function's
-- privileges, but cannot change its return type or parameter names, or remove an overload,
-- a trigger or a policy that the new files no longer define. Such changes drop the old object
-- here, guarded so that the drop happens once (IF EXISTS, or a check of the old definition),
-- and the area files create the new one. Privileges that df.grant_usage gave on a dropped
-- function come back through df.refresh_grants, which every upgrade runs.
--
-- Nothing yet: 0.1.0 is the first release.

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

-- The graph DSL: builders, wrappers and operators.
--
-- Every builder returns the JSON text of a graph node (an "envelope", pg_durable's Durofut);
-- nothing is written until df.start(). The text is compact, keys always in the order
-- node_type, left_node, right_node, condition_node, extra_nodes, query, result_name, and
-- strings escaped like serde_json (to_json(text) escapes exactly the same characters).
-- Children are embedded verbatim: the `json` type (unlike jsonb) keeps each value's original
-- text, so only the top level of an operand is ever re-serialised.
--
-- Builders are VOLATILE, as in pg_durable, except the operator helpers, which are IMMUTABLE.
-- Node-typed arguments go through df._ensure(); literal arguments (df.sql's query, names,
-- break values, sleep seconds) never do. df.http (http.sql), df.wait_for_schedule
-- (schedule.sql) and df.wait_for_signal (signals.sql) are builders too.

-- ---------------------------------------------------------------------------------------------
-- Non-future helpers.
--
-- df.setvar/unsetvar/clearvars/await_instance act immediately and return a plain word ('OK',
-- a status). Used as a workflow step, e.g. `df.setvar('k', 'v') ~> 'SELECT ...'`, that word
-- would silently become a SQL step. So each of them records in the session setting
-- df.non_future_helper which helper ran, in which statement (statement_timestamp()), and what
-- it returned; a builder that then receives exactly that text as a plain-text step in the
-- same statement refuses it.
--
-- The returned text is part of the marker so that legitimate code is not refused: a client
-- sending `SELECT df.setvar(...); SELECT df.start('SELECT ...')` as one query string, or a
-- PL/pgSQL block calling df.setvar() and then df.start(), runs every statement with the same
-- statement_timestamp(). Format: <helper> '|' <epoch of statement start> '|' <returned text>.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._mark_non_future_helper(helper text, returned text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT NULL::void FROM pg_catalog.set_config('df.non_future_helper',
        helper || '|' || extract(epoch FROM statement_timestamp())::text || '|' || returned,
        false);
$$;

-- The helper whose result `step` is, if it was returned earlier in the current statement.
-- Deliberately STABLE, not IMMUTABLE: the answer depends on the session setting.
CREATE OR REPLACE FUNCTION df._non_future_helper(step text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    marker text := current_setting('df.non_future_helper', true);
    parts  text[];
BEGIN
    IF marker IS NULL OR marker = '' THEN
        RETURN NULL;
    END IF;
    -- The returned text may itself contain '|'; helper and timestamp never do.
    parts := regexp_match(marker, '^([^|]*)\|([^|]*)\|(.*)$', 's');
    IF parts IS NULL
       OR parts[2] <> extract(epoch FROM statement_timestamp())::text
       OR parts[3] <> step THEN
        RETURN NULL;
    END IF;
    RETURN parts[1];
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Envelope serialisation.
-- ---------------------------------------------------------------------------------------------

-- The compact envelope text from its parts. Children are envelope texts copied as is (the
-- caller took them from a `json` value, whose text is the input's); NULL means "absent" and
-- the key is omitted, as is an empty extra_nodes. STABLE like to_json(), which lets
-- PostgreSQL inline it into its callers (builders are called a lot while graphs are built).
CREATE OR REPLACE FUNCTION df._envelope(
    node_type text, left_node text, right_node text, condition_node text, extra_nodes text[],
    query text, result_name text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"node_type":' || to_json(node_type)::text
        || coalesce(',"left_node":' || left_node, '')
        || coalesce(',"right_node":' || right_node, '')
        || coalesce(',"condition_node":' || condition_node, '')
        || CASE WHEN cardinality(extra_nodes) > 0
                THEN ',"extra_nodes":[' || array_to_string(extra_nodes, ',') || ']'
                ELSE '' END
        || coalesce(',"query":' || to_json(query)::text, '')
        || coalesce(',"result_name":' || to_json(result_name)::text, '')
        || '}';
$$;

-- Why a node cannot be read as an envelope, given its members (NULL when absent), or NULL
-- if it can. Shallow: children must be objects, but their own insides are checked by
-- df.start(), which reports a path.
CREATE OR REPLACE FUNCTION df._shape_error(
    left_node json, right_node json, condition_node json, extra_nodes json, query json,
    result_name json)
RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF json_typeof(left_node) NOT IN ('null', 'object')
       OR json_typeof(right_node) NOT IN ('null', 'object') THEN
        RETURN 'Durofut children must be JSON objects';
    END IF;
    IF json_typeof(condition_node) NOT IN ('null', 'object') THEN
        RETURN 'condition_node must be a Durofut JSON object';
    END IF;
    IF json_typeof(extra_nodes) NOT IN ('null', 'array') THEN
        RETURN 'extra_nodes must be an array of Durofut JSON objects';
    END IF;
    -- Nested, so that nodes without extra branches never run the subquery.
    IF json_typeof(extra_nodes) = 'array' THEN
        IF EXISTS (SELECT 1 FROM json_array_elements(extra_nodes) AS e
                    WHERE json_typeof(e.value) <> 'object') THEN
            RETURN 'extra_nodes entries must be Durofut JSON objects';
        END IF;
    END IF;
    IF json_typeof(query) NOT IN ('null', 'string') THEN
        RETURN 'invalid type: query must be a string';
    END IF;
    IF json_typeof(result_name) NOT IN ('null', 'string') THEN
        RETURN 'invalid type: result_name must be a string';
    END IF;
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._ensure: normalise a node-typed argument. Returns the envelope text with its
-- top level in canonical form; new_name, if given, replaces the result name (df.as).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._ensure(step text, new_name text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    helper     text;
    err        text;
    member     text;
    val        json;
    m_type     json;     -- the members of the envelope
    m_left     json;
    m_right    json;
    m_cond     json;
    m_extra    json;
    m_query    json;
    m_name     json;
    extras     text[];
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    -- Rules 1 and 4: plain text is a SQL step, unless it is what a non-future helper just
    -- returned.
    IF ltrim(step, E' \t\n\r') NOT LIKE '{%' THEN
        helper := df._non_future_helper(step);
        IF helper IS NOT NULL THEN
            RAISE EXCEPTION '% cannot be used as a workflow step. Call % before df.start().',
                helper, helper USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- One pass over the text picks up the top-level members (the last of duplicates wins,
    -- as with ->). Each `json` value keeps its exact text; json_typeof() only looks at its
    -- first token. Reading members one by one with -> would rescan the whole text each time,
    -- which adds up when graphs are built step by step.
    BEGIN
        FOR member, val IN SELECT e.key, e.value FROM json_each(step::json) AS e LOOP
            CASE member
                WHEN 'node_type' THEN m_type := val;
                WHEN 'left_node' THEN m_left := val;
                WHEN 'right_node' THEN m_right := val;
                WHEN 'condition_node' THEN m_cond := val;
                WHEN 'extra_nodes' THEN m_extra := val;
                WHEN 'query' THEN m_query := val;
                WHEN 'result_name' THEN m_name := val;
                ELSE NULL;  -- unknown members are ignored
            END CASE;
        END LOOP;
    EXCEPTION WHEN data_exception THEN
        -- Starts with '{' but is not JSON (e.g. a PL/pgSQL block body): a SQL step.
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END;

    -- Rule 4: JSON without a string node_type is SQL text too.
    IF json_typeof(m_type) IS DISTINCT FROM 'string' THEN
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- Rule 3: it claims to be an envelope but cannot be read as one.
    err := df._shape_error(m_left, m_right, m_cond, m_extra, m_query, m_name);
    IF err IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid Durofut JSON: failed to deserialize workflow step: %', err
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Rule 4: an unknown node type is taken as SQL text (df.start() would reject it).
    IF NOT (m_type #>> '{}') = ANY (df._node_types()) THEN
        RETURN df._envelope('SQL', NULL, NULL, NULL, NULL, step, new_name);
    END IF;

    -- Rule 2. JSON null members count as absent, like serde's Option.
    IF json_typeof(m_extra) = 'array' THEN
        SELECT array_agg(e.value::text ORDER BY e.ordinality) INTO extras
          FROM json_array_elements(m_extra) WITH ORDINALITY AS e;
    END IF;
    RETURN df._envelope(
        m_type #>> '{}',
        CASE WHEN json_typeof(m_left) = 'object' THEN m_left::text END,
        CASE WHEN json_typeof(m_right) = 'object' THEN m_right::text END,
        CASE WHEN json_typeof(m_cond) = 'object' THEN m_cond::text END,
        extras,
        m_query #>> '{}',
        coalesce(new_name, m_name #>> '{}'));
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Helpers for config strings.
-- ---------------------------------------------------------------------------------------------

-- A jsonb value as compact JSON text (no spaces), like serde_json prints it; jsonb's own text
-- form puts a space after every ':' and ','. Object members come in jsonb's order (shorter
-- keys first), the only order a jsonb argument still has.
CREATE OR REPLACE FUNCTION df._jsonb_compact(value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    CASE jsonb_typeof(value)
    WHEN 'object' THEN
        RETURN '{' || coalesce((SELECT string_agg(to_json(e.key)::text || ':'
                                                  || df._jsonb_compact(e.value), ','
                                                  ORDER BY e.ordinality)
                                  FROM jsonb_each(value) WITH ORDINALITY AS e), '') || '}';
    WHEN 'array' THEN
        RETURN '[' || coalesce((SELECT string_agg(df._jsonb_compact(e.value), ','
                                                  ORDER BY e.ordinality)
                                  FROM jsonb_array_elements(value) WITH ORDINALITY AS e), '')
            || ']';
    ELSE
        -- Scalars print without spaces; strings are escaped as to_json() escapes them.
        RETURN value::text;
    END CASE;
END;
$$;

-- A number of seconds as a JSON number: integral values without a fraction (1, 60), others
-- as short decimals (0.5). Through numeric, whose text never uses an exponent and, unlike
-- float8's, does not depend on the session's extra_float_digits. Callers refuse NaN and
-- infinities, which JSON cannot represent.
CREATE OR REPLACE FUNCTION df._json_seconds(seconds double precision) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT seconds::numeric::text;
$$;


-- ---------------------------------------------------------------------------------------------
-- Builders. STRICT ones give NULL for a NULL argument, as in pg_durable.
-- ---------------------------------------------------------------------------------------------

-- A SQL step. The query is taken literally, even if it looks like an envelope.
CREATE OR REPLACE FUNCTION df.sql(query text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('SQL', NULL, NULL, NULL, NULL, query, NULL);
$$;

-- a, then b.
CREATE OR REPLACE FUNCTION df.seq(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('THEN', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Name fut's result so later steps can use $name.
CREATE OR REPLACE FUNCTION df.as(fut text, name text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF name = '' THEN
        RAISE EXCEPTION 'df.as: result name cannot be empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Explicit ASCII classes: [[:alpha:]] and \w would accept non-ASCII letters.
    IF name !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
        RAISE EXCEPTION 'df.as: result name ''%'' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*',
            name USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._ensure(fut, name);
END;
$$;

-- Both branches in parallel; the result is the array of both results.
CREATE OR REPLACE FUNCTION df.join(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('JOIN', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Three branches in parallel; the third is the JOIN's extra node.
CREATE OR REPLACE FUNCTION df.join3(a text, b text, c text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('JOIN', df._ensure(a), df._ensure(b), NULL,
                        ARRAY[df._ensure(c)], NULL, NULL);
$$;

-- Both branches in parallel; the first to finish decides.
CREATE OR REPLACE FUNCTION df.race(a text, b text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('RACE', df._ensure(a), df._ensure(b), NULL, NULL, NULL, NULL);
$$;

-- Run condition; then then_branch if its result is truthy, else else_branch.
CREATE OR REPLACE FUNCTION df.if(condition text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('IF', df._ensure(then_branch), df._ensure(else_branch),
                        df._ensure(condition), NULL, NULL, NULL);
$$;

-- Branch on whether the named result has rows. The name is checked when the IF runs.
CREATE OR REPLACE FUNCTION df.if_rows(result_name text, then_branch text, else_branch text) RETURNS text
LANGUAGE sql VOLATILE STRICT AS $$
    SELECT df._envelope('IF', df._ensure(then_branch), df._ensure(else_branch),
                        NULL, NULL,
                        '{"condition_type":"result_has_rows","result_name":'
                            || to_json(result_name)::text || '}',
                        NULL);
$$;

-- Repeat body forever (until df.break), or while condition holds after each pass.
CREATE OR REPLACE FUNCTION df.loop(body text, condition text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF body IS NULL THEN
        RAISE EXCEPTION 'df.loop: body cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN df._envelope('LOOP', df._ensure(body), NULL,
                        df._ensure(condition), NULL, NULL, NULL);
END;
$$;

-- Leave the nearest enclosing loop, which completes with value (a literal, never SQL).
CREATE OR REPLACE FUNCTION df.break(value text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT df._envelope('BREAK', NULL, NULL, NULL, NULL,
                        '{"break_value":' || coalesce(to_json(value)::text, 'null') || '}',
                        NULL);
$$;

-- A durable timer.
CREATE OR REPLACE FUNCTION df.sleep(seconds bigint) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF seconds < 0 THEN
        RAISE EXCEPTION 'Sleep duration must be non-negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('SLEEP', NULL, NULL, NULL, NULL, seconds::text, NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.retry, df.timeout: pgdurable's wrapper nodes.
--
--   df.retry(step, 3)  -> {"node_type":"RETRY","left_node":<step>,"query":"{\"max_attempts\":3,
--                          \"backoff_seconds\":1,\"max_backoff_seconds\":60,\"retry_on\":null}"}
--   df.timeout(step, 10) -> {"node_type":"TIMEOUT","left_node":<step>,
--                            "query":"{\"timeout_seconds\":10}"}
--
-- The step is a node-typed argument, auto-wrapped like every operator operand. Config keys
-- come in a fixed order, numbers print without a needless fraction (1, not 1.0).
--
-- The values are checked here, when a mistake is cheapest to see, and again by df.start for
-- hand-written envelopes (df._wrapper_config_error). retry_on's entries are not checked
-- against a list: what they match (SQLSTATE codes and classes, the http* and timeout
-- categories) is decided when a step fails, by the worker.
-- ---------------------------------------------------------------------------------------------

-- Not STRICT, because retry_on is optional. A NULL step gives NULL like the strict builders
-- (so `df.retry(NULL, 3) ~> b` is NULL like `NULL ~> b`); a NULL number is refused with the
-- same message as an out-of-range one rather than silently dropping the policy.
CREATE OR REPLACE FUNCTION df.retry(
    step text, max_attempts integer, backoff_seconds double precision DEFAULT 1,
    max_backoff_seconds double precision DEFAULT 60, retry_on text[] DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF step IS NULL THEN
        RETURN NULL;
    END IF;
    IF max_attempts IS NULL OR max_attempts < 1 THEN
        RAISE EXCEPTION 'df.retry: max_attempts must be at least 1'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF backoff_seconds IS NULL OR backoff_seconds < 0 THEN
        RAISE EXCEPTION 'df.retry: backoff_seconds must be non-negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NaN compares greater than everything in PostgreSQL, so it passed the checks above.
    IF backoff_seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.retry: backoff_seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_backoff_seconds IS NULL OR max_backoff_seconds < backoff_seconds THEN
        RAISE EXCEPTION 'df.retry: max_backoff_seconds must be at least backoff_seconds'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_backoff_seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.retry: max_backoff_seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A list, not a matrix; an empty list would retry nothing, which is no policy at all.
    IF retry_on IS NOT NULL
       AND (cardinality(retry_on) = 0 OR array_ndims(retry_on) <> 1
            OR EXISTS (SELECT 1 FROM unnest(retry_on) AS c (code)
                        WHERE c.code IS NULL OR c.code = '')) THEN
        RAISE EXCEPTION 'df.retry: retry_on must list error codes (SQLSTATE codes or classes, or http, http_5xx, http_timeout, http_connection, timeout)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('RETRY', df._ensure(step), NULL, NULL, NULL,
                        '{"max_attempts":' || max_attempts::text
                            || ',"backoff_seconds":' || df._json_seconds(backoff_seconds)
                            || ',"max_backoff_seconds":' || df._json_seconds(max_backoff_seconds)
                            || ',"retry_on":' || coalesce(array_to_json(retry_on)::text, 'null')
                            || '}',
                        NULL);
END;
$$;

-- A time limit on step, whatever it is; its message is df.wait_for_signal's for the same
-- mistake.
CREATE OR REPLACE FUNCTION df.timeout(step text, seconds double precision) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    IF seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF seconds IN ('NaN', 'Infinity') THEN
        RAISE EXCEPTION 'df.timeout: seconds must be finite'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('TIMEOUT', df._ensure(step), NULL, NULL, NULL,
                        '{"timeout_seconds":' || df._json_seconds(seconds) || '}', NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start's checks for hand-written RETRY/TIMEOUT envelopes.
-- ---------------------------------------------------------------------------------------------

-- Why a RETRY/TIMEOUT node's config (its query, present) is unacceptable, or NULL. Accepts what
-- the builders produce and what the worker's loader (pgdurable.core.model) can run: absent
-- backoff keys and a null retry_on are allowed, as the loader has defaults for them. Values
-- are read from the `json` text, as the worker reads them: 3.0 is not an integer there.
CREATE OR REPLACE FUNCTION df._wrapper_config_error(node_type text, query text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    config  json;
    v       json;
    backoff numeric := 0;
BEGIN
    BEGIN
        config := query::json;
    EXCEPTION WHEN data_exception THEN
        RETURN format('query in %s must be valid JSON config: %s', node_type, SQLERRM);
    END;
    IF json_typeof(config) <> 'object' THEN
        RETURN format('query in %s must be a JSON config object', node_type);
    END IF;

    IF node_type = 'TIMEOUT' THEN
        v := config -> 'timeout_seconds';
        IF json_typeof(v) IS DISTINCT FROM 'number' OR v::text::numeric <= 0 THEN
            RETURN 'query in TIMEOUT: timeout_seconds must be a positive number';
        END IF;
        RETURN NULL;
    END IF;

    v := config -> 'max_attempts';
    IF json_typeof(v) IS DISTINCT FROM 'number' OR v::text !~ '^[0-9]+$'
       OR v::text::numeric < 1 THEN
        RETURN 'query in RETRY: max_attempts must be an integer of at least 1';
    END IF;
    v := config -> 'backoff_seconds';
    IF v IS NOT NULL THEN
        IF json_typeof(v) <> 'number' OR v::text::numeric < 0 THEN
            RETURN 'query in RETRY: backoff_seconds must be a non-negative number';
        END IF;
        backoff := v::text::numeric;
    END IF;
    v := config -> 'max_backoff_seconds';
    IF v IS NOT NULL AND (json_typeof(v) <> 'number' OR v::text::numeric < backoff) THEN
        RETURN 'query in RETRY: max_backoff_seconds must be a number of at least backoff_seconds';
    END IF;
    v := config -> 'retry_on';
    IF json_typeof(v) = 'array' THEN
        IF json_array_length(v) = 0
           OR EXISTS (SELECT 1 FROM json_array_elements(v) AS e
                       WHERE json_typeof(e.value) <> 'string' OR e.value #>> '{}' = '') THEN
            v := 'false';  -- reported below
        END IF;
    END IF;
    IF coalesce(json_typeof(v), 'null') NOT IN ('null', 'array') THEN
        RETURN 'query in RETRY: retry_on must be null or a non-empty array of non-empty strings';
    END IF;
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Operator helpers, IMMUTABLE as in pg_durable.
--
-- With constant operands PostgreSQL evaluates an IMMUTABLE call once while planning. That is
-- harmless for the non-future-helper check: an operand that is a helper's result is a call
-- to a VOLATILE function, so the expression is not constant and the check runs at execution,
-- after the helper has recorded its marker.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.as_op(fut text, name text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df.as(fut, name);
$$;

CREATE OR REPLACE FUNCTION df.loop_prefix_op(body text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT df.loop(body);
$$;

-- `condition ?> then_branch` is half an IF; `!>` completes it. The operands are kept as
-- given; df.if normalises them when the else branch arrives.
CREATE OR REPLACE FUNCTION df.if_then_op(condition text, then_branch text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN jsonb_build_object('_partial_if', true, 'condition', condition,
                              'then_branch', then_branch)::text;
END;
$$;

CREATE OR REPLACE FUNCTION df.if_else_op(partial_if text, else_branch text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    partial jsonb;
BEGIN
    BEGIN
        partial := partial_if::jsonb;
    EXCEPTION WHEN data_exception THEN
        partial := NULL;
    END;
    IF jsonb_typeof(partial) IS DISTINCT FROM 'object' OR partial ->> '_partial_if' IS NULL THEN
        RAISE EXCEPTION 'Invalid if-then-else: left side of !> must be a ?> expression'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df.if(partial ->> 'condition', partial ->> 'then_branch', else_branch);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Operators. They live in pg_catalog so that `'a' ~> 'b'` works with any search_path, as in
-- pg_durable. Creating objects in pg_catalog needs a superuser; on managed PostgreSQL the
-- installer may not be one, and then the operators go into schema df, where users reach them
-- with df on their search_path or as OPERATOR(df.~>).
--
-- All of them share PostgreSQL's single precedence level for user-defined operators, left
-- associative; there is nothing to configure. CREATE OPERATOR has no OR REPLACE: an operator
-- that exists (in either schema) is left as it is, since it calls its function by reference.
-- ---------------------------------------------------------------------------------------------
DO $$
DECLARE
    op      record;
    v_where text := 'pg_catalog';
BEGIN
    FOR op IN
        SELECT o.name, o.leftarg, o.func
          FROM (VALUES ('~>', 'text', 'df.seq'), ('|=>', 'text', 'df.as_op'),
                       ('&', 'text', 'df.join'), ('|', 'text', 'df.race'),
                       ('?>', 'text', 'df.if_then_op'), ('!>', 'text', 'df.if_else_op'),
                       ('@>', NULL, 'df.loop_prefix_op')) AS o (name, leftarg, func)
         WHERE NOT EXISTS (
                   SELECT 1 FROM pg_catalog.pg_operator p
                    WHERE p.oprname = o.name
                      AND p.oprleft = coalesce(o.leftarg::regtype, 0)
                      AND p.oprright = 'text'::regtype
                      AND p.oprnamespace IN ('pg_catalog'::regnamespace, 'df'::regnamespace))
    LOOP
        LOOP
            BEGIN
                EXECUTE format('CREATE OPERATOR %s.%s (%s RIGHTARG = text, FUNCTION = %s)',
                               v_where, op.name,
                               CASE WHEN op.leftarg IS NOT NULL
                                    THEN 'LEFTARG = ' || op.leftarg || ',' ELSE '' END,
                               op.func);
                EXIT;
            EXCEPTION WHEN insufficient_privilege THEN
                IF v_where = 'df' THEN
                    RAISE;
                END IF;
                v_where := 'df';
                RAISE NOTICE 'pgdurable: no permission to create the DSL operators in pg_catalog '
                    '(not a superuser?); they are created in schema df. Put df on the '
                    'search_path (SET search_path = "$user", public, df) or write OPERATOR(df.~>).';
            END;
        END LOOP;
    END LOOP;
END;
$$;

-- HTTP steps, the SQL side: df.http and df.http_multipart.
--
-- They build HTTP / HTTP_MULTIPART nodes exactly as pg_durable does, but never refuse because
-- of the egress policy. In pg_durable that policy is compiled into the extension, so its
-- builders can refuse at build time ("df.http() is disabled. Rebuild with ..."). In pgdurable
-- the operator sets the policy on the worker, which may differ from one deployment to the
-- next and is not visible from SQL; it is enforced when the step runs (docs/http.md). The
-- builders therefore only do the checks that hold everywhere (scheme, method, timeout,
-- multipart parts). Who may use HTTP at all is decided by EXECUTE on these two functions,
-- revoked from PUBLIC, granted by df.grant_usage(role, include_http => true).
--
-- The worker performs the request and checkpoints the response on its own connection: an
-- HTTP step is at-least-once, and carries an Idempotency-Key that is the same for every
-- attempt.

-- ---------------------------------------------------------------------------------------------
-- df.http, df.http_multipart. Not STRICT, because body and headers may be NULL
-- (JSON null in the config), and so may parts, to be refused with pg_durable's message.
--
-- NULL handling. pg_durable leaves open what a NULL does in a parameter that may not be NULL;
-- pgdurable raises, as df.loop does for a NULL body ('df.loop: body cannot be NULL'): an HTTP
-- step without a URL, a method or a time limit is a mistake, and returning NULL would only
-- move the surprise to df.start ('fut cannot be NULL') or, inside an operator, make the whole
-- graph NULL. These checks come first, as argument checks do in pg_durable; a NULL parts is
-- checked with the other parts checks.
-- ---------------------------------------------------------------------------------------------

-- Why url is refused by the scheme check, or NULL. A URL with a '{' is
-- left alone: a {var} may supply its scheme at run time (a $var does not count; its URL fails
-- here, as in pg_durable). The worker checks the final URL again before every request.
CREATE OR REPLACE FUNCTION df._http_scheme_error(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT format('Blocked: unsupported URL scheme ''%s''. Only http and https are allowed.',
                  s.scheme)
      FROM (SELECT lower(split_part(url, '://', 1)) AS scheme) AS s
     WHERE strpos(url, '{') = 0 AND s.scheme NOT IN ('http', 'https');
$$;

-- The checks both builders make first, in pg_durable's order, with their messages.
CREATE OR REPLACE FUNCTION df._http_check(
    builder text, url text, method text, timeout_seconds integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_err text;
BEGIN
    IF url IS NULL THEN
        RAISE EXCEPTION '%: url cannot be NULL', builder USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF method IS NULL THEN
        RAISE EXCEPTION '%: method cannot be NULL', builder
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF timeout_seconds IS NULL THEN
        RAISE EXCEPTION '%: timeout_seconds cannot be NULL', builder
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    v_err := df._http_scheme_error(url);
    IF v_err IS NOT NULL THEN
        RAISE EXCEPTION '%', v_err USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION df.http(
    url text, method text DEFAULT 'POST', body text DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
BEGIN
    PERFORM df._http_check('df.http', url, method, timeout_seconds);
    IF v_method NOT IN ('GET', 'POST', 'PUT', 'DELETE', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method: %. Must be GET, POST, PUT, DELETE, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"body":' || coalesce(to_json(body)::text, 'null')
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Parts are objects {name, data_b64[, filename][, content_type]}; like pg_durable, only the
-- list itself is checked here, each part when the request is built.
CREATE OR REPLACE FUNCTION df.http_multipart(
    url text, method text DEFAULT 'POST', parts jsonb DEFAULT NULL, headers jsonb DEFAULT NULL,
    timeout_seconds integer DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_method text := upper(method);
BEGIN
    PERFORM df._http_check('df.http_multipart', url, method, timeout_seconds);
    IF v_method NOT IN ('POST', 'PUT', 'PATCH') THEN
        RAISE EXCEPTION 'Invalid HTTP method for multipart: %. Must be POST, PUT, or PATCH',
            v_method USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF parts IS NULL THEN
        RAISE EXCEPTION 'parts is required and cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(parts) <> 'array' THEN
        RAISE EXCEPTION 'parts must be a JSON array of part objects'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_array_length(parts) = 0 THEN
        RAISE EXCEPTION 'parts must contain at least one part'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('HTTP_MULTIPART', NULL, NULL, NULL, NULL,
                        '{"url":' || to_json(url)::text
                            || ',"method":' || to_json(v_method)::text
                            || ',"parts":' || df._jsonb_compact(parts)
                            || ',"headers":' || coalesce(df._jsonb_compact(headers), 'null')
                            || ',"timeout_seconds":' || timeout_seconds::text
                            || '}',
                        NULL);
END;
$$;

-- Outbound requests are a privilege: df.grant_usage(role, include_http => true) grants
-- EXECUTE on these two (security.sql).
REVOKE EXECUTE ON FUNCTION df.http(text, text, text, jsonb, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.http_multipart(text, text, jsonb, jsonb, integer) FROM PUBLIC;

-- Cron schedules: df.wait_for_schedule and the check of its expression.
--
-- df.wait_for_schedule(cron) builds a WAIT_SCHEDULE node; the expression is checked here, at
-- build time, so a bad schedule never reaches df.start(). The worker computes fire times with
-- pgdurable.core.cron, whose cron_error() accepts exactly what df._cron_error() accepts,
-- with the same messages (tests/test_schedule.py runs one table of cases through both).
--
-- The dialect is standard five-field crontab: `minute hour day-of-month month day-of-week`,
-- minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or JAN-DEC, day-of-week 0-7 or
-- SUN-SAT (names case-insensitive); each field a comma list of `*`, `N` or `N-M`, each with an
-- optional `/step` (step >= 1; `N/step` means `N-max/step`). Fields are separated by runs of
-- ASCII whitespace. Macros (@hourly, ...) are refused, as in pg_durable.
--
-- DIFFERENT FROM pg_durable ON PURPOSE: day-of-week. pg_durable hands the expression to the
-- Rust `cron` crate, which numbers days 1-7 with 1 = Sunday and refuses 0, so there
-- `0 9 * * 1-5` runs Sunday to Thursday. Here day-of-week is the crontab one: 0-7 with both
-- 0 and 7 Sunday, 1 Monday ... 6 Saturday, so `0 9 * * 1-5` means weekdays, as every cron user
-- expects. Expressions that use names (MON-FRI) mean the same in both.
--
-- When both day-of-month and day-of-week are restricted (anything but a lone `*`), a day
-- matches if either matches (crontab(5), POSIX); otherwise both must. An expression that can
-- never fire because its day-of-month does not occur in its months (`0 0 30 2 *`) is refused.

CREATE OR REPLACE FUNCTION df._cron_value(token text, field integer, OUT value integer, OUT error text)
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
-- One value of a field (1 minute ... 5 day-of-week): value set, or error set, or neither when
-- the token is not a value at all (the caller then reports the whole item).
DECLARE
    names     text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lows      integer[] := ARRAY[0, 0, 1, 1, 0];
    highs     integer[] := ARRAY[59, 23, 31, 12, 7];
    upper_tok text;
    pos       integer;
BEGIN
    IF token ~ '^[0-9]+$' THEN
        -- numeric: a long run of digits must not overflow before it is reported.
        IF token::numeric < lows[field] OR token::numeric > highs[field] THEN
            error := format('%s value %s out of range %s-%s',
                            names[field], token, lows[field], highs[field]);
        ELSE
            value := token::integer;
        END IF;
    ELSIF token ~ '^[A-Za-z]+$' THEN
        -- translate(), not upper(): ASCII only, whatever the locale (upper('i') is 'İ' in tr_TR).
        upper_tok := translate(token, 'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ');
        IF field = 4 THEN
            pos := array_position(ARRAY['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG',
                                        'SEP', 'OCT', 'NOV', 'DEC'], upper_tok);
        ELSIF field = 5 THEN
            pos := array_position(ARRAY['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'],
                                  upper_tok) - 1;
        END IF;
        IF pos IS NULL THEN
            error := format('unknown name ''%s'' in %s field', token, names[field]);
        ELSE
            value := pos;
        END IF;
    END IF;
END;
$$;

-- Why expr is not a valid cron expression (the reason only), or NULL if it is valid.
-- Keep in step with pgdurable/core/cron.py: same checks, same order, same texts.
CREATE OR REPLACE FUNCTION df._cron_error(expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    names    text[] := ARRAY['minute', 'hour', 'day-of-month', 'month', 'day-of-week'];
    lows     integer[] := ARRAY[0, 0, 1, 1, 0];
    highs    integer[] := ARRAY[59, 23, 31, 12, 7];
    -- ASCII whitespace, spelled out (the regex engine reads the escapes): \s would depend on
    -- the database's locale, and cron.py must draw the same line.
    ws       text := '[ \t\n\r\v\f]';
    trimmed  text;
    fields   text[];
    field    integer;
    item     text;
    invalid  text;
    parts    text[];
    bounds   text[];
    low      integer;
    high     integer;
    step     integer;
    err      text;
    dom      integer[] := '{}';
    months   integer[] := '{}';
BEGIN
    trimmed := regexp_replace(expr, '^' || ws || '+|' || ws || '+$', '', 'g');
    fields := CASE WHEN trimmed = '' THEN '{}'::text[]
                   ELSE regexp_split_to_array(trimmed, ws || '+') END;
    IF fields[1] LIKE '@%' THEN
        RETURN format('macro ''%s'' is not supported; write the five fields instead', fields[1]);
    END IF;
    IF cardinality(fields) <> 5 THEN
        RETURN format('expected 5 fields (minute hour day-of-month month day-of-week), got %s',
                      cardinality(fields));
    END IF;

    FOR field IN 1..5 LOOP
        FOREACH item IN ARRAY string_to_array(fields[field], ',') LOOP
            invalid := format('invalid item ''%s'' in %s field', item, names[field]);
            IF item = '' THEN
                RETURN format('empty list item in %s field', names[field]);
            END IF;
            parts := string_to_array(item, '/');
            IF cardinality(parts) > 2 THEN
                RETURN invalid;
            END IF;
            IF parts[1] = '*' THEN
                low := lows[field];
                high := highs[field];
            ELSIF strpos(parts[1], '-') > 0 THEN
                bounds := string_to_array(parts[1], '-');
                IF cardinality(bounds) <> 2 THEN
                    RETURN invalid;
                END IF;
                SELECT v.value, v.error INTO low, err FROM df._cron_value(bounds[1], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF low IS NULL THEN
                    RETURN invalid;
                END IF;
                SELECT v.value, v.error INTO high, err FROM df._cron_value(bounds[2], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF high IS NULL THEN
                    RETURN invalid;
                END IF;
                IF high < low THEN
                    RETURN format('reversed range ''%s'' in %s field', parts[1], names[field]);
                END IF;
            ELSE
                SELECT v.value, v.error INTO low, err FROM df._cron_value(parts[1], field) AS v;
                IF err IS NOT NULL THEN
                    RETURN err;
                ELSIF low IS NULL THEN
                    RETURN invalid;
                END IF;
                high := CASE WHEN cardinality(parts) = 2 THEN highs[field] ELSE low END;
            END IF;
            step := 1;
            IF cardinality(parts) = 2 THEN
                IF parts[2] = '' THEN
                    RETURN format('missing step in ''%s''', item);
                ELSIF parts[2] !~ '^[0-9]+$' THEN
                    RETURN format('invalid step ''%s'' in ''%s''', parts[2], item);
                ELSIF parts[2]::numeric = 0 THEN
                    RETURN format('invalid step %s in ''%s''', parts[2], item);
                END IF;
                -- Any step past the field's span picks only `low`; clamp before the cast.
                step := least(parts[2]::numeric, 100)::integer;
            END IF;
            IF field = 3 THEN
                dom := dom || ARRAY(SELECT generate_series(low, high, step));
            ELSIF field = 4 THEN
                months := months || ARRAY(SELECT generate_series(low, high, step));
            END IF;
        END LOOP;
    END LOOP;

    -- Day-of-week a lone '*': only the day-of-month decides, and it must name a day that one
    -- of the months has (February: 29).
    IF fields[3] <> '*' AND fields[5] = '*' AND NOT EXISTS (
        SELECT 1 FROM unnest(dom) AS d, unnest(months) AS m
         WHERE d <= (ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])[m]) THEN
        RETURN format('day-of-month ''%s'' never occurs in month ''%s''', fields[3], fields[4]);
    END IF;
    RETURN NULL;
END;
$$;

-- Wait until the next time the cron expression fires (UTC), e.g. in a loop:
--   @> (df.wait_for_schedule('*/5 * * * *') ~> 'CALL refresh()')
-- The expression is stored as given. IMMUTABLE like the operator helpers: the node depends
-- on the argument only.
CREATE OR REPLACE FUNCTION df.wait_for_schedule(cron_expr text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    reason text := df._cron_error(cron_expr);
BEGIN
    IF reason IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid cron expression ''%'': %', cron_expr, reason
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('WAIT_SCHEDULE', NULL, NULL, NULL, NULL,
                        '{"cron_expr":' || to_json(cron_expr)::text || '}', NULL);
END;
$$;

-- Signals: df.wait_for_signal, df.signal, and how a wait receives what was sent (docs/signals.md).
--
-- df.signal(id, name, data) stores a row in df._signals; it stays there until a SIGNAL wait of
-- that instance and name consumes it (oldest first), however long before the wait starts it
-- was sent. pg_durable drops signals that arrive while no wait is active; pgdurable keeps them.
--
-- The engine side:
--   * A SIGNAL node that starts waiting gets a df._tasks row of kind 'signal' with payload
--     {"signal_name": <name>, "deadline": <epoch seconds or null>}, visible at its deadline
--     ('infinity' without a timeout), or at once if a matching signal is already buffered
--     (df._checkpoint, engine.sql).
--   * A worker that claims it calls df._checkpoint_begin (which locks the instance row FOR NO
--     KEY UPDATE) and then, in the same transaction, df._consume_signal: a signal → the wait
--     completes; none and the deadline passed → it times out; else the task is re-armed (put
--     back to sleep with its lease cleared).
--   * Sending takes no lock the engine needs, so a sender that keeps its transaction open
--     holds up nothing: the row is inserted, and its trigger (df._signal_sent) checks the
--     instance's status and NOTIFYs pgdurable_signals with the instance id, which PostgreSQL
--     delivers when the sender commits (and never if it rolls back). A worker that hears it
--     wakes the instance's sleeping waits that have a signal buffered, in a short transaction
--     of its own (df._wake_signal_waits); and every few seconds it sweeps for any it missed.
--
-- Who may signal. df.signal runs as the caller (SECURITY INVOKER), like df.cancel, and its
-- authority is the caller's own: it INSERTs into df._signals, which users may do only through
-- a column grant (instance_id, name, data) and a row-level security policy that admits an
-- instance the caller can see in df.instances, with sent_by = the caller. The status check and
-- the notification happen in a SECURITY DEFINER trigger, which PostgreSQL runs only for rows
-- that passed the policy and which cannot be called directly; waking tasks is the worker's
-- alone (only the schema owner may call df._wake_signal_waits). A SECURITY DEFINER function
-- callable by users would be the alternative, but inside it current_user is the owner and
-- PostgreSQL offers no trustworthy way to learn who called it: a user could call it directly
-- and signal anybody's instance.
--
-- A user may therefore also INSERT INTO df._signals (instance_id, name, data) directly, with
-- exactly df.signal's effect (minus its argument checks and the text-to-JSON conversion).
-- Users cannot read, change or delete signals. The policy and the grant are in security.sql.
--
-- transaction_mode => 'new' sends the signal in a transaction of its own, on the loopback
-- connection df.start's 'new' mode uses (df._in_new_transaction, start.sql): it is delivered
-- at once and stays sent whatever the caller's transaction does.

-- ---------------------------------------------------------------------------------------------
-- df._signal_sent: after a signal row is inserted, refuse a finished instance, note the signal
-- for df.await_instance, and have the workers wake the instance's waits after the commit.
--
-- The status is read without a lock, in the sender's snapshot. A signal to an instance that
-- finishes meanwhile (or, in REPEATABLE READ and SERIALIZABLE, after the sender's snapshot)
-- is accepted and never consumed, as if it had come a moment later; one to an instance
-- already finished is refused. The foreign key check holds the instance row FOR KEY SHARE,
-- which conflicts with no lock the engine takes but a DELETE (the retention purge, of
-- finished instances only).
--
-- df.undelivered_signals, a transaction-local setting, lists (",id,id,") the instances this
-- transaction has signalled: df.await_instance refuses to wait for one of them, which cannot
-- get the signal before the commit. A savepoint rolled back takes its entries along. (A user
-- who sets it only fails its own awaits.)
--
-- NOTIFY sends one notification per channel and payload and transaction, however many
-- signals the transaction inserted for the instance.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._signal_sent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_status text;
    v_sent   text := coalesce(nullif(current_setting('df.undelivered_signals', true), ''), ',');
BEGIN
    SELECT i.status INTO v_status FROM df.instances i WHERE i.id = NEW.instance_id;
    IF NOT FOUND THEN
        -- Not visible in this snapshot (it can only have been deleted, not hidden).
        RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- Beyond pg_durable, which accepts such a signal and drops it: say it was not delivered.
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'Instance % is %: signal ''%'' was not delivered',
            NEW.instance_id, v_status, NEW.name
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF position(',' || NEW.instance_id || ',' IN v_sent) = 0 THEN
        PERFORM set_config('df.undelivered_signals', v_sent || NEW.instance_id || ',', true);
    END IF;
    PERFORM pg_notify('pgdurable_signals', NEW.instance_id);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER signals_sent AFTER INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._signal_sent();

-- ---------------------------------------------------------------------------------------------
-- For the worker (the schema owner), in its checkpoint transaction, after df._checkpoint_begin
-- locked the instance. Under that lock nothing else consumes this instance's signals.
-- ---------------------------------------------------------------------------------------------

-- Take the oldest unconsumed signal p_name of p_instance for the wait of activation
-- p_activation: mark it consumed and return its data (a JSON null is 'null'::jsonb) and its
-- size, or no row if there is none. A payload above p_max_bytes (pg_durable.max_result_bytes
-- as the worker's own session reads it: users may SET any pg_durable.* placeholder in their
-- sessions, so only the worker's value counts) is consumed all the same but never handed
-- over: data is NULL, and the worker fails the wait. Lock waits are bounded like the
-- checkpoint's (engine.sql).
CREATE OR REPLACE FUNCTION df._consume_signal(p_instance varchar, p_name text, p_activation integer,
                                   p_max_bytes bigint)
RETURNS TABLE (data jsonb, data_bytes bigint)
LANGUAGE sql VOLATILE SET lock_timeout = '500ms' AS $$
    WITH taken AS (
        UPDATE df._signals s
           SET consumed_at = clock_timestamp(), consumed_by = p_activation
         WHERE s.id = (SELECT o.id FROM df._signals o
                        WHERE o.instance_id = p_instance AND o.name = p_name
                          AND o.consumed_at IS NULL
                        ORDER BY o.id
                        LIMIT 1
                          FOR UPDATE)
        RETURNING s.data, octet_length(s.data::text)::bigint AS data_bytes
    )
    SELECT CASE WHEN t.data_bytes <= p_max_bytes THEN t.data END, t.data_bytes FROM taken t;
$$;

-- Whether a signal p_name of p_instance is waiting to be consumed.
CREATE OR REPLACE FUNCTION df._signal_pending(p_instance varchar, p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM df._signals s
                    WHERE s.instance_id = p_instance AND s.name = p_name
                      AND s.consumed_at IS NULL);
$$;

-- ---------------------------------------------------------------------------------------------
-- df._wake_signal_waits: for the worker (the schema owner). Makes the sleeping waits of
-- p_instances (or, for NULL, a sweep: of every instance) that have a signal buffered due now,
-- and returns the instances among them whose row it could not lock at that moment (a
-- checkpoint, or its tenant, holds it): the worker calls again for those shortly. The worker
-- calls it, in a transaction of its own, when NOTIFY pgdurable_signals tells it that signals
-- to those instances were committed; and, with NULL, when it starts listening and every few
-- seconds, for a notification nobody heard (no worker listening at the commit, a worker
-- stopped before it woke the waits, an instance it could not lock and gave up on).
--
-- Why a signal S and a checkpoint C that starts or re-arms a wait concurrently cannot miss
-- each other. Every transaction that creates or re-arms a 'signal' task is a checkpoint
-- transaction; it holds the instance row FOR NO KEY UPDATE (df._checkpoint_begin) from
-- before it looks for a buffered signal (df._consume_signal, or df._signal_pending in
-- df._checkpoint) until its commit. This function runs only after S committed, and locks the instance row
-- FOR SHARE, which conflicts with that, before it looks for tasks to wake:
--   * this function got the lock first: C's lock waits for our commit, so C's statements
--     after it (READ COMMITTED: a new snapshot each) see S, and consume it or make the new
--     task due at once;
--   * C holds the lock: SKIP LOCKED passes the instance over and returns it, and the worker
--     calls again until it gets the lock, when C has committed; the UPDATE below (a new
--     snapshot, taken after the lock) then sees the task C wrote or re-armed.
--   * C committed before this function took the lock: as in the second case, the UPDATE
--     sees C's task.
-- What the sender's transaction saw or locked plays no part (it only inserted a row): its
-- isolation level does not matter. The worker's connections are READ COMMITTED whatever the
-- role's default (worker/connections.py).
-- A task leased to a worker is left alone: the worker is about to checkpoint it, which is one
-- of the cases above; making it visible would only let another worker steal the lease.
--
-- Lock order, as everywhere: the instance rows (in id order), then df._tasks rows (in id
-- order; SKIP LOCKED, since only another worker waking the same task can hold a sleeping
-- wait's row: claims, heartbeats and deferrals lock only due or leased tasks, checkpoints
-- and cancels only under the instance lock).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._wake_signal_waits(p_instances text[]) RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_wanted text[] := p_instances;
    v_locked text[];
    v_woken  integer;
BEGIN
    IF v_wanted IS NULL THEN
        SELECT array_agg(DISTINCT t.instance_id) INTO v_wanted
          FROM df._tasks t
         WHERE t.kind = 'signal' AND t.lease_owner IS NULL AND t.visible_at > now()
           AND df._signal_pending(t.instance_id, t.payload ->> 'signal_name');
    END IF;
    SELECT array_agg(l.id) INTO v_locked
      FROM (SELECT i.id FROM df.instances i
             WHERE i.id = ANY (v_wanted)
             ORDER BY i.id
               FOR SHARE SKIP LOCKED) l;
    WITH due AS (
        SELECT t.id FROM df._tasks t
         WHERE t.instance_id = ANY (v_locked)
           AND t.kind = 'signal' AND t.lease_owner IS NULL AND t.visible_at > now()
           AND df._signal_pending(t.instance_id, t.payload ->> 'signal_name')
         ORDER BY t.id
           FOR UPDATE SKIP LOCKED
    )
    UPDATE df._tasks t SET visible_at = now() FROM due WHERE t.id = due.id;
    GET DIAGNOSTICS v_woken = ROW_COUNT;
    IF v_woken > 0 THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
    -- Passed over: to be tried again (a finished or deleted instance waits for nothing).
    RETURN QUERY
        SELECT i.id::text FROM df.instances i
         WHERE i.id = ANY (v_wanted) AND NOT i.id = ANY (coalesce(v_locked, '{}'))
           AND i.status NOT IN ('completed', 'failed', 'cancelled');
END;
$$;

REVOKE ALL ON FUNCTION df._signal_sent() FROM PUBLIC;
REVOKE ALL ON FUNCTION df._wake_signal_waits(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION df._consume_signal(varchar, text, integer, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION df._signal_pending(varchar, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.wait_for_signal: a SIGNAL node. Not STRICT (the timeout may be NULL);
-- a NULL name is refused like an empty one rather than silently giving NULL.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.wait_for_signal(name text, timeout_seconds integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout_seconds <= 0 THEN
        RAISE EXCEPTION 'Timeout must be positive' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN df._envelope('SIGNAL', NULL, NULL, NULL, NULL,
                        '{"signal_name":' || to_json(name)::text
                            || ',"timeout_seconds":' || coalesce(timeout_seconds::text, 'null')
                            || '}',
                        NULL);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.signal: send a signal to one of the caller's instances. Returns 'OK'.
-- signal_data is JSON if it parses as JSON, else it is delivered as a JSON string.
-- transaction_mode 'caller' (the default): part of the caller's transaction, delivered when it
-- commits; 'new': sent and committed at once by a transaction of its own (on the loopback, as
-- df.start's 'new' mode), whatever becomes of the caller's. STRICT: any NULL argument gives
-- NULL and sends nothing.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.signal(instance_id text, signal_name text,
                                     signal_data text DEFAULT '{}',
                                     transaction_mode text DEFAULT 'caller')
RETURNS text
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    v_mode   text := lower(transaction_mode);
    v_data   jsonb;
BEGIN
    IF v_mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.signal(): expected ''caller'' or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF instance_id = '' THEN
        RAISE EXCEPTION 'Instance ID cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF signal_name = '' THEN
        RAISE EXCEPTION 'Signal name cannot be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Under RLS, someone else's instance looks exactly like a missing one.
    IF NOT EXISTS (SELECT 1 FROM df.instances i WHERE i.id = signal.instance_id) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    -- A finished instance is refused by the trigger (in 'new' mode, on the loopback).
    IF v_mode = 'new' THEN
        -- current_user, not session_user: the effective role signals, as in caller mode.
        RETURN df._in_new_transaction('signal', ARRAY[instance_id, signal_name, signal_data],
                                      current_user::text);
    END IF;
    BEGIN
        v_data := signal_data::jsonb;
    EXCEPTION WHEN data_exception THEN
        v_data := to_jsonb(signal_data);
    END;
    -- The trigger checks the instance again and has it woken after the commit.
    INSERT INTO df._signals (instance_id, name, data)
    VALUES (signal.instance_id, signal.signal_name, v_data);
    RETURN 'OK';
END;
$$;

-- ---------------------------------------------------------------------------------------------

-- df.start: validate a graph and store it as an instance.
--
-- df.start validates a graph envelope, flattens it into df.nodes rows (one per node, random
-- 8-hex ids, children referenced by id) and inserts the df.instances row, all in the caller's
-- transaction: a ROLLBACK leaves nothing behind, and workers only ever see committed
-- instances. The engine's rows (df._runs, df._tasks, the df.vars snapshot) are created by the
-- AFTER INSERT trigger on df.instances (engine.sql), not here.
--
-- The graph is parsed once (as jsonb) and walked by recursive queries, once to validate it
-- and once to insert it, so a 10,000-node graph costs a handful of statements rather than
-- one PL/pgSQL iteration per node (about 0.3 s plus the commit's foreign-key checks).
--
-- transaction_mode => 'new' starts the instance in a transaction of its own, which commits
-- whatever the caller's transaction does afterwards. PL/pgSQL cannot commit part of its
-- caller's transaction, so the start runs on a second connection to this database (the
-- "loopback"), opened with the dblink contrib extension, and that connection runs an ordinary
-- df.start in caller mode and commits. df.signal(..., transaction_mode => 'new') goes the same
-- way (df._in_new_transaction serves both).
--
-- Security (SQL runs as the role that submitted it, no escalation):
--
--   * The loopback logs in as the caller's session_user: the identity the caller logged in
--     with, which SET ROLE does not change and only a superuser can change. It then does
--     SET ROLE to the caller's current_user, so `SET ROLE app; SELECT df.start(...)` submits
--     as app exactly as in caller mode. PostgreSQL checks that SET ROLE against the login
--     role's memberships, so the loopback can only act as a role the caller's own session
--     could become: nothing the caller passes in can widen that.
--   * Only superusers may open dblink connections without a password, so the connection is
--     opened by dblink_connect_u inside a SECURITY DEFINER function owned by the schema
--     owner. Its connection string is built from server settings (socket directory, port),
--     the current database and session_user; the caller chooses none of them.
--   * The graph, label and database (a signal's instance, name and data) travel to the
--     loopback as quoted literals (format %L), the role name as a quoted identifier (%I): no
--     text the caller passes is ever parsed as SQL.
--
-- dblink is installed, when it is not there yet and the installer may (a superuser), into a
-- schema of its own that PUBLIC has no USAGE on: users cannot reach dblink through schema df
-- or public. An existing dblink is used wherever it is (the schema is looked up at each call,
-- and called through EXECUTE so that this file does not depend on dblink being installed).
-- Without dblink, the install still succeeds and 'new' explains what is missing.

-- A random instance id: the last 8 hex digits of a version 4 UUID, as in pg_durable.
CREATE OR REPLACE FUNCTION df._random_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT right(gen_random_uuid()::text, 8);
$$;

-- A random node id. Node ids only need to be unique within their instance, which df.start
-- checks; random() is ten times cheaper than gen_random_uuid(), which matters at 10,000 nodes.
CREATE OR REPLACE FUNCTION df._random_node_id() RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT lpad(to_hex(floor(random() * 4294967296)::bigint), 8, '0');
$$;

-- Why an IF/LOOP/JOIN node's query config is unacceptable, or NULL. merge_needed says the
-- node has a condition child (IF/LOOP) or extra branches (JOIN) whose ids go into the config.
CREATE OR REPLACE FUNCTION df._config_error(node_type text, query text, merge_needed boolean) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    field  text := CASE node_type WHEN 'JOIN' THEN 'extra_nodes' ELSE 'condition_node' END;
    config jsonb;
BEGIN
    BEGIN
        config := query::jsonb;
    EXCEPTION WHEN data_exception THEN
        IF merge_needed THEN
            RETURN format('query in %s must be valid JSON config: %s', node_type, SQLERRM);
        END IF;
        RETURN NULL;
    END;
    -- The pre-0.2.6 form kept child references inside query; the executor reads them from
    -- first-class fields only.
    IF jsonb_typeof(config) = 'object' AND config ? field THEN
        RETURN format('%s in %s must be a first-class Durofut field, not embedded in query',
                      field, node_type);
    END IF;
    IF merge_needed AND jsonb_typeof(config) <> 'object' THEN
        RETURN format('query in %s must be a JSON config object', node_type);
    END IF;
    RETURN NULL;
END;
$$;

-- config (a JSON object text, or NULL for none) with "key":value appended, compact. The
-- existing members keep their order and their values' text.
CREATE OR REPLACE FUNCTION df._merge_config(config text, key text, value text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT '{' || coalesce((
               SELECT string_agg(to_json(e.key)::text || ':' || e.value::text, ','
                                 ORDER BY e.ordinality) || ','
                 FROM json_each(config::json) WITH ORDINALITY AS e), '')
           || to_json(key)::text || ':' || value || '}';
$$;

-- ---------------------------------------------------------------------------------------------
-- df._walk: the nodes of a graph in visiting order, each with a fresh id, its parent's id,
-- its slot in the parent and its path (root, root.left, root.extra_nodes[0], ...).
--
-- Rows carry the node's location (keys, for #>) rather than the node itself: copying every
-- subtree into the query's intermediate results costs far more than looking nodes up again.
-- Children that are not JSON objects are not visited (their parent is reported). The walk
-- stops early: nodes one level past the depth limit are visited but not expanded, and at most
-- 10,001 nodes are returned, enough to report either limit.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._walk(root jsonb, root_id text)
RETURNS TABLE (id text, parent_id text, slot text, pos integer, path text, depth integer,
               ord integer[], keys text[])
LANGUAGE sql VOLATILE
-- A custom plan would copy the whole graph into the plan as a constant.
SET plan_cache_mode = force_generic_plan
AS $$
WITH RECURSIVE walk (id, parent_id, slot, pos, path, depth, ord, keys) AS (
    SELECT coalesce(root_id, df._random_node_id()), NULL::text, 'root'::text, 0, 'root'::text,
           0, ARRAY[]::integer[], ARRAY[]::text[]
    UNION ALL
    SELECT df._random_node_id(), w.id, c.slot, c.pos, w.path || c.seg, w.depth + 1,
           w.ord || c.pos, w.keys || c.keys
      FROM walk w
     -- OFFSET 0: look the node up once per row, not once per use below.
     CROSS JOIN LATERAL (SELECT root #> w.keys AS node OFFSET 0) AS p
     CROSS JOIN LATERAL (
               SELECT 'left', 1, '.left', ARRAY['left_node'], p.node -> 'left_node'
               UNION ALL
               SELECT 'right', 2, '.right', ARRAY['right_node'], p.node -> 'right_node'
               UNION ALL
               SELECT 'condition', 3, '.condition_node', ARRAY['condition_node'],
                      p.node -> 'condition_node'
               UNION ALL
               SELECT 'extra', 3 + e.i::integer, '.extra_nodes[' || (e.i - 1) || ']',
                      ARRAY['extra_nodes', (e.i - 1)::text], e.v
                 FROM jsonb_array_elements(
                          CASE WHEN jsonb_typeof(p.node -> 'extra_nodes') = 'array'
                               THEN p.node -> 'extra_nodes' END)
                      WITH ORDINALITY AS e (v, i)
           ) AS c (slot, pos, seg, keys, child)
     WHERE w.depth <= 256 AND jsonb_typeof(c.child) = 'object'
)
SELECT * FROM walk LIMIT 10001;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._graph_error: validate a graph. Returns how many nodes were visited (10,001 means "too
-- many") and the first invalid node in pre-order with the reason, if any.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._graph_error(
    root jsonb, OUT node_count bigint, OUT path text, OUT err text)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- Each lateral level is fenced with OFFSET 0 so that a node is looked up, and its facts
    -- derived, once per row rather than once per use; only the error leaves the row.
    SELECT count(*),
           (array_agg(w.path ORDER BY w.ord) FILTER (WHERE c.err IS NOT NULL))[1],
           (array_agg(c.err ORDER BY w.ord) FILTER (WHERE c.err IS NOT NULL))[1]
      INTO node_count, path, err
      FROM df._walk(root, NULL) AS w
     CROSS JOIN LATERAL (
        SELECT CASE
            WHEN w.depth > 256 THEN
                'Graph exceeds maximum nesting depth of 256. Simplify the workflow or break '
                'it into multiple instances.'
            WHEN coalesce(jsonb_typeof(t.node -> 'node_type'), 'null') = 'null' THEN
                'missing field node_type'
            WHEN t.node_type IS NULL THEN
                'invalid type: node_type must be a string'
            WHEN NOT t.node_type = ANY (df._node_types()) THEN
                'Unknown node_type ''' || t.node_type || '''. Valid types: '
                    || array_to_string(df._node_types(), ', ')
            -- The shape checks of df._shape_error, for nodes below the root.
            WHEN jsonb_typeof(t.node -> 'left_node') NOT IN ('null', 'object')
              OR jsonb_typeof(t.node -> 'right_node') NOT IN ('null', 'object') THEN
                'Durofut children must be JSON objects'
            WHEN jsonb_typeof(t.node -> 'condition_node') NOT IN ('null', 'object') THEN
                'condition_node must be a Durofut JSON object'
            WHEN jsonb_typeof(t.node -> 'extra_nodes') NOT IN ('null', 'array') THEN
                'extra_nodes must be an array of Durofut JSON objects'
            WHEN t.has_extras AND jsonb_path_exists(
                    t.node, 'strict $.extra_nodes[*] ? (@.type() != "object")', '{}', true) THEN
                'extra_nodes entries must be Durofut JSON objects'
            WHEN jsonb_typeof(t.node -> 'query') NOT IN ('null', 'string') THEN
                'invalid type: query must be a string'
            WHEN jsonb_typeof(t.node -> 'result_name') NOT IN ('null', 'string') THEN
                'invalid type: result_name must be a string'
            WHEN t.has_condition AND t.node_type NOT IN ('IF', 'LOOP') THEN
                'condition_node is not valid for ' || t.node_type || ' nodes'
            WHEN t.has_extras AND t.node_type <> 'JOIN' THEN
                'extra_nodes is not valid for ' || t.node_type || ' nodes'
            -- The table constraints would reject what follows, with less helpful messages.
            WHEN t.result_name !~ '^[a-zA-Z_][a-zA-Z0-9_]*$' THEN
                'result_name ''' || t.result_name || ''' is not a valid identifier — must '
                    || 'match [a-zA-Z_][a-zA-Z0-9_]*'
            WHEN t.node_type IN ('THEN', 'IF', 'JOIN', 'RACE')
             AND NOT (t.has_left AND t.has_right) THEN
                t.node_type || ' nodes require left_node and right_node'
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT') AND NOT t.has_left THEN
                t.node_type || ' nodes require left_node'
            WHEN t.node_type IN ('LOOP', 'RETRY', 'TIMEOUT') AND t.has_right THEN
                'right_node is not valid for ' || t.node_type || ' nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP', 'RETRY', 'TIMEOUT')
             AND (t.has_left OR t.has_right) THEN
                CASE WHEN t.has_left THEN 'left_node' ELSE 'right_node' END
                    || ' is not valid for ' || t.node_type || ' nodes'
            WHEN t.node_type NOT IN ('THEN', 'IF', 'JOIN', 'RACE', 'LOOP')
             AND t.query IS NULL THEN
                'query is required for ' || t.node_type || ' nodes'
            WHEN t.node_type = 'IF' AND NOT t.has_condition AND t.query IS NULL THEN
                'IF nodes require a condition_node (df.if) or a condition query (df.if_rows)'
            WHEN t.node_type IN ('IF', 'LOOP', 'JOIN') AND t.query IS NOT NULL THEN
                df._config_error(t.node_type, t.query,
                                 CASE t.node_type WHEN 'JOIN' THEN t.has_extras
                                                  ELSE t.has_condition END)
            WHEN t.node_type IN ('RETRY', 'TIMEOUT') THEN
                df._wrapper_config_error(t.node_type, t.query)
            END AS err
          FROM (
            SELECT n.node,
                   CASE WHEN jsonb_typeof(n.node -> 'node_type') = 'string'
                        THEN n.node ->> 'node_type' END AS node_type,
                   CASE WHEN jsonb_typeof(n.node -> 'query') = 'string'
                        THEN n.node ->> 'query' END AS query,
                   CASE WHEN jsonb_typeof(n.node -> 'result_name') = 'string'
                        THEN n.node ->> 'result_name' END AS result_name,
                   coalesce(jsonb_typeof(n.node -> 'left_node'), 'null') <> 'null' AS has_left,
                   coalesce(jsonb_typeof(n.node -> 'right_node'), 'null') <> 'null' AS has_right,
                   coalesce(jsonb_typeof(n.node -> 'condition_node'), 'null') <> 'null'
                       AS has_condition,
                   jsonb_typeof(n.node -> 'extra_nodes') = 'array'
                       AND jsonb_array_length(n.node -> 'extra_nodes') > 0 AS has_extras
              FROM (SELECT root #> w.keys AS node OFFSET 0) AS n
            OFFSET 0
          ) AS t
        OFFSET 0
     ) AS c;
END;
$$;

-- df._insert_nodes: write a validated graph into df.nodes in pre-order (parents before
-- children; the graph's foreign keys are checked at commit). A THEN's or RACE's query is
-- dropped; an IF's or LOOP's condition and a JOIN's extra branches are referenced by id from
-- its JSON config in query. The root gets root_id. Returns false, writing nothing, if two nodes drew the same id.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._insert_nodes(
    root jsonb, instance_id text, root_id text, submitted_by regrole, database text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    inserted bigint;
BEGIN
    WITH visited AS MATERIALIZED (
        SELECT * FROM df._walk(root, root_id)
    ),
    children AS (
        SELECT v.parent_id,
               max(v.id) FILTER (WHERE v.slot = 'left') AS left_id,
               max(v.id) FILTER (WHERE v.slot = 'right') AS right_id,
               max(v.id) FILTER (WHERE v.slot = 'condition') AS condition_id,
               array_agg(v.id ORDER BY v.pos) FILTER (WHERE v.slot = 'extra') AS extra_ids
          FROM visited v
         WHERE v.parent_id IS NOT NULL
         GROUP BY v.parent_id
    ),
    rows AS (
        INSERT INTO df.nodes AS n (id, instance_id, node_type, query, result_name, left_node,
                                   right_node, submitted_by, database)
        SELECT v.id, _insert_nodes.instance_id, f.node_type,
               CASE
                   WHEN f.node_type IN ('THEN', 'RACE') THEN NULL
                   WHEN f.node_type IN ('IF', 'LOOP') AND k.condition_id IS NOT NULL THEN
                       df._merge_config(f.query, 'condition_node', to_json(k.condition_id)::text)
                   WHEN f.node_type = 'JOIN' AND k.extra_ids IS NOT NULL THEN
                       df._merge_config(f.query, 'extra_nodes', array_to_json(k.extra_ids)::text)
                   ELSE f.query
               END,
               f.result_name, k.left_id, k.right_id, _insert_nodes.submitted_by,
               _insert_nodes.database
          FROM visited v
          LEFT JOIN children k ON k.parent_id = v.id
         CROSS JOIN LATERAL (
                   SELECT x.node ->> 'node_type' AS node_type, x.node ->> 'query' AS query,
                          x.node ->> 'result_name' AS result_name
                     FROM (SELECT root #> v.keys AS node OFFSET 0) AS x
               ) AS f
         WHERE (SELECT count(DISTINCT d.id) = count(*) FROM visited d)
         ORDER BY v.ord
        RETURNING 1
    )
    SELECT count(*) INTO inserted FROM rows;
    RETURN inserted > 0;
END;
$$;


-- ---------------------------------------------------------------------------------------------
-- dblink, if it can be had.
-- ---------------------------------------------------------------------------------------------
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension e WHERE e.extname = 'dblink') THEN
        RETURN;  -- already installed by an administrator: used where it is
    END IF;
    -- dblink is not a trusted extension: only a superuser can create it.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                    WHERE r.rolname = current_user AND r.rolsuper)
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_available_extensions a
                       WHERE a.name = 'dblink') THEN
        RAISE NOTICE 'pgdurable: dblink is not installed, so df.start(..., transaction_mode => ''new'') is unavailable until an administrator runs CREATE EXTENSION dblink';
        RETURN;
    END IF;
    -- A broken package (control file without the library) must not fail the whole install.
    BEGIN
        CREATE SCHEMA IF NOT EXISTS _pgdurable_dblink;
        REVOKE ALL ON SCHEMA _pgdurable_dblink FROM PUBLIC;
        COMMENT ON SCHEMA _pgdurable_dblink IS
            'dblink for pgdurable''s df.start(..., transaction_mode => ''new''); not for users';
        CREATE EXTENSION dblink SCHEMA _pgdurable_dblink;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'pgdurable: could not install dblink (%), so df.start(..., transaction_mode => ''new'') is unavailable', SQLERRM;
    END;
END;
$$;

-- ---------------------------------------------------------------------------------------------

-- A value for a libpq connection string: single-quoted, with \ and ' escaped. E'' strings,
-- which mean the same whatever the caller's standard_conforming_strings.
CREATE OR REPLACE FUNCTION df._conninfo_value(value text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT E'\'' || replace(replace(value, E'\\', E'\\\\'), E'\'', E'\\\'') || E'\'';
$$;

-- Close the loopback connection if it is open, cancelling a statement it may still run (the
-- caller was interrupted while waiting for it). Never fails: it runs on error paths, which
-- must report the original error.
CREATE OR REPLACE FUNCTION df._close_loopback(dblink_schema text, conn text, cancel boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    open text[];
BEGIN
    EXECUTE format('SELECT %I.dblink_get_connections()', dblink_schema) INTO open;
    IF conn = ANY (coalesce(open, '{}')) THEN
        IF cancel THEN
            EXECUTE format('SELECT %I.dblink_cancel_query($1)', dblink_schema) USING conn;
        END IF;
        EXECUTE format('SELECT %I.dblink_disconnect($1)', dblink_schema) USING conn;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgdurable: could not close the transaction_mode => ''new'' loopback connection: %',
        SQLERRM;
END;
$$;

-- Only df._in_new_transaction (running as the schema owner) needs it.
REVOKE ALL ON FUNCTION df._close_loopback(text, text, boolean) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._in_new_transaction: transaction_mode => 'new', for df.start and df.signal. Runs
-- df.<action>(args[1], args[2], args[3]) in caller mode on a loopback connection that logs in
-- as session_user, does SET ROLE role, and commits on its own; returns what it returned.
-- action is 'start' (args: fut, label, database; df._start_in_new_transaction below) or
-- 'signal' (args: instance_id, signal_name, signal_data; df.signal in signals.sql); both call
-- it with role = their current_user. Starts and signals share the launch slots.
--
-- Anyone with USAGE on schema df may call it directly, with any role name: the loopback's
-- SET ROLE then fails unless the caller's login role may become that role, and nothing is
-- written. SECURITY DEFINER only so that dblink_connect_u (superuser-only: it needs no
-- password) may be used; nothing in here runs the caller's text: the function called is one
-- of two fixed names, its arguments are quoted literals.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._in_new_transaction(action text, args text[], role text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- How errors name the function called ('df.start()'), and what it does.
    v_what       text := format('df.%s()', action);
    v_verb       text := CASE action WHEN 'start' THEN 'submit' ELSE 'signal' END;
    -- Advisory lock class of the launch slots: ASCII "PGDF", as in pg_durable.
    c_lock_class constant integer := 1346982470;
    -- dblink connections are per backend; this name is reserved for this function.
    c_conn       constant text := 'pg_durable:new-transaction';
    -- The loopback's own limits, pg_durable's.
    c_timeout_ms constant integer := 30000;
    v_login      text := session_user;
    v_can_login  boolean;
    v_max        integer := df._int_setting('pg_durable.max_new_transaction_starts');
    v_wait_s     integer := df._int_setting('pg_durable.new_transaction_start_timeout');
    v_deadline   timestamptz;
    v_schema     text;
    v_sockets    text[];
    v_host       text;
    v_conninfo   text;
    v_slot       integer;
    v_phase      text := 'slot';  -- slot, connect, role, run: what an error interrupted
    v_result     text;
    v_state      text;
    v_message    text;
    v_detail     text;
    v_hint       text;
    v_context    text;
    v_remote     boolean;
    v_busy       integer;
    v_nap        double precision := 0.0005;  -- seconds, doubling up to 50 ms
BEGIN
    IF action IS DISTINCT FROM 'start' AND action IS DISTINCT FROM 'signal' THEN
        RAISE EXCEPTION 'df._in_new_transaction(): unknown action "%"', action
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- 1. A workflow step's own df.start (df.signal) already commits with the step; one that
    --    survives the step's rollback would be repeated each time the step is retried.
    IF df._in_workflow() THEN
        RAISE EXCEPTION '% with transaction_mode => ''new'' cannot be called inside a workflow - a workflow step''s df.% already commits with the step; use the default transaction_mode',
            v_what, action USING ERRCODE = 'feature_not_supported';
    END IF;

    -- 2. A submitting role must be able to log in (workers log in as it), as in caller mode.
    SELECT r.rolcanlogin INTO v_can_login FROM pg_catalog.pg_roles r WHERE r.rolname = role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'role "%" does not exist', role USING ERRCODE = 'undefined_object';
    END IF;
    IF action = 'start' AND NOT v_can_login THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege. The background worker must connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a role with LOGIN.',
            role USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF action = 'start' AND args[1] IS NULL THEN
        RAISE EXCEPTION 'df.start(): fut cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- dblink, and the right to use its password-less connect as this function's owner.
    SELECT n.nspname INTO v_schema
      FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'dblink';
    IF v_schema IS NULL THEN
        RAISE EXCEPTION '%: transaction_mode => ''new'' needs the dblink extension; ask an administrator to run CREATE EXTENSION dblink',
            v_what USING ERRCODE = 'feature_not_supported',
                  HINT = 'pgdurable opens a second connection to this database with dblink to '
                         'commit the ' || action || ' on its own. Install dblink into a schema that '
                         'PUBLIC has no USAGE on, e.g. CREATE SCHEMA _pgdurable_dblink; '
                         'CREATE EXTENSION dblink SCHEMA _pgdurable_dblink.';
    END IF;
    IF NOT has_schema_privilege(v_schema, 'USAGE')
       OR NOT has_function_privilege(
               format('%I.dblink_connect_u(text, text)', v_schema), 'EXECUTE') THEN
        RAISE EXCEPTION '%: transaction_mode => ''new'' needs USAGE on schema % and EXECUTE on %.dblink_connect_u(text, text) for the pgdurable schema owner "%"; ask an administrator to grant them',
            v_what, quote_ident(v_schema), quote_ident(v_schema), current_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Where the loopback connects: this server's first Unix socket directory (entries may be
    -- double-quoted), else TCP on localhost; always this port and database.
    v_sockets := regexp_match(coalesce(current_setting('unix_socket_directories', true), ''),
                              '^[[:space:]]*(?:"((?:[^"]|"")*)"|([^,]*))');
    v_host := coalesce(replace(v_sockets[1], '""', '"'), btrim(v_sockets[2]));
    v_host := coalesce(nullif(v_host, ''), 'localhost');
    v_conninfo := format(
        'host=%s port=%s dbname=%s user=%s application_name=%s connect_timeout=10',
        df._conninfo_value(v_host), df._conninfo_value(current_setting('port')),
        df._conninfo_value(current_database()), df._conninfo_value(v_login),
        df._conninfo_value('pg_durable:backend:new-transaction'));

    BEGIN
        -- 3. Admission control across sessions: a session-level advisory lock per launch slot.
        --    Session-level so that it is held only while this call runs, not until the
        --    caller's transaction ends; released below on every path.
        v_deadline := clock_timestamp() + make_interval(secs => v_wait_s);
        LOOP
            FOR s IN 0 .. v_max - 1 LOOP
                IF pg_try_advisory_lock(c_lock_class, s) THEN
                    v_slot := s;
                    EXIT;
                END IF;
            END LOOP;
            EXIT WHEN v_slot IS NOT NULL;
            IF clock_timestamp() >= v_deadline THEN
                RAISE EXCEPTION 'pg_durable: transaction_mode => ''new'' launch limit reached (max_new_transaction_starts=%). Timed out after %s waiting for a launch slot before opening the loopback session.',
                    v_max, v_wait_s USING ERRCODE = 'too_many_connections';
            END IF;
            PERFORM pg_sleep(0.1);
        END LOOP;

        -- 4. The loopback. A connection left over by an interrupted call is closed first.
        v_phase := 'connect';
        PERFORM df._close_loopback(v_schema, c_conn, false);
        EXECUTE format('SELECT %I.dblink_connect_u($1, $2)', v_schema) USING c_conn, v_conninfo;

        v_phase := 'role';
        IF role IS DISTINCT FROM v_login THEN
            EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_schema)
                USING c_conn, format('SET ROLE %I', role);
        END IF;

        v_phase := 'run';
        EXECUTE format('SELECT %I.dblink_exec($1, $2)', v_schema)
            USING c_conn, format('SET df.in_workflow = ''false''; SET lock_timeout = %s; '
                                 'SET statement_timeout = %s', c_timeout_ms, c_timeout_ms);
        -- Caller mode on the loopback; it commits when the statement ends (autocommit). Sent
        -- asynchronously and waited for in pg_sleep, which a cancel or the caller's
        -- statement_timeout interrupts (a synchronous dblink() call is not interruptible
        -- before PostgreSQL 17); the loopback's statement is then cancelled below.
        EXECUTE format('SELECT %I.dblink_send_query($1, $2)', v_schema)
            USING c_conn, format('SELECT df.%s(%L::text, %L::text, %L::text)',
                                 action, args[1], args[2], args[3]);
        LOOP
            EXECUTE format('SELECT %I.dblink_is_busy($1)', v_schema) INTO v_busy USING c_conn;
            EXIT WHEN v_busy = 0;
            PERFORM pg_sleep(v_nap);
            v_nap := least(v_nap * 2, 0.05);
        END LOOP;
        EXECUTE format('SELECT t.r FROM %I.dblink_get_result($1) AS t (r text)', v_schema)
            INTO v_result USING c_conn;

        PERFORM df._close_loopback(v_schema, c_conn, false);
        PERFORM pg_advisory_unlock(c_lock_class, v_slot);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                                v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT,
                                v_context = PG_EXCEPTION_CONTEXT;
        -- An error the loopback reported: dblink re-raises it here with the remote SQLSTATE
        -- and this context. Anything else (say, a cancel of the caller's own statement) was
        -- raised here and goes on unchanged.
        v_remote := coalesce(
            v_context LIKE '%on dblink connection named "' || c_conn || '"%', false);
        IF v_phase <> 'slot' THEN
            -- A statement the caller stopped waiting for is cancelled on the loopback too.
            PERFORM df._close_loopback(v_schema, c_conn, v_phase = 'run' AND NOT v_remote);
        END IF;
        IF v_slot IS NOT NULL THEN
            PERFORM pg_advisory_unlock(c_lock_class, v_slot);
        END IF;

        IF v_phase = 'connect' AND v_state LIKE '08%' THEN
            -- libpq's reason is in the detail ("connection to server ... failed: FATAL: ...").
            v_message := format(
                '%s: transaction_mode => ''new'' could not open its loopback connection '
                'as role "%s": %s',
                v_what, v_login, coalesce(nullif(btrim(v_detail, E' \n'), ''), v_message));
            v_detail := '';
            v_hint := format(
                'The loopback logs in to this server (host %s, port %s) as your session user, '
                'without a password. Allow that login in pg_hba.conf (trust, or peer with a '
                'user map, on the local socket), or give the server''s operating-system user '
                'a password file (~/.pgpass or PGPASSFILE) with this role''s password.',
                v_host, current_setting('port'));
        ELSIF v_phase = 'role' AND v_remote THEN
            v_message := format(
                '%s: transaction_mode => ''new'' cannot %s as role "%s": the '
                'loopback logs in as your session user "%s", which may not SET ROLE to it (%s)',
                v_what, v_verb, role, v_login, v_message);
            v_hint := format(
                'Inside a SECURITY DEFINER function %s %ss as the '
                'function''s owner; with transaction_mode => ''new'' the role you '
                'logged in as must be allowed to SET ROLE to that owner. Use the default '
                'transaction_mode there.', v_what, v_verb);
        ELSIF v_phase = 'run' AND v_remote AND v_state IN ('55P03', '57014') THEN
            v_message := format(
                'pg_durable: transaction_mode => ''new'' launch hit %s after %sms in the '
                'loopback session: %s',
                CASE v_state WHEN '55P03' THEN 'lock_timeout' ELSE 'statement_timeout' END,
                c_timeout_ms, v_message);
            -- Both limits are 30 s, and the statement's starts first: a lock wait usually
            -- ends as a statement_timeout.
            v_hint := 'The loopback is a session of its own: if the calling transaction holds '
                      'a lock the ' || action || ' needs (e.g. on a df table), the loopback '
                      'waits for it while the calling transaction waits for the loopback.';
        ELSIF v_phase = 'run' AND v_remote THEN
            -- Validation errors and the like, readable as they came (a signal's as in caller
            -- mode, since df.signal checked the same before it came here).
            IF action = 'start' THEN
                v_message := 'df.start() on new transaction failed: ' || v_message;
            END IF;
        ELSE
            RAISE;
        END IF;
        -- RAISE prints DETAIL and HINT lines even when they are empty.
        IF v_detail <> '' AND v_hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, DETAIL = v_detail,
                                  HINT = v_hint;
        ELSIF v_detail <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, DETAIL = v_detail;
        ELSIF v_hint <> '' THEN
            RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message, HINT = v_hint;
        END IF;
        RAISE EXCEPTION USING ERRCODE = v_state, MESSAGE = v_message;
    END;
    RETURN v_result;
END;
$$;

-- df.start(fut, label, database) in a transaction of its own, as role (df.start passes its
-- current_user): df._in_new_transaction's 'start'. Runs as the caller.
CREATE OR REPLACE FUNCTION df._start_in_new_transaction(
    fut text, label text, database text, role text)
RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT df._in_new_transaction('start', ARRAY[fut, label, database], role);
$$;

-- ---------------------------------------------------------------------------------------------
-- df.start: validate a graph and store it as a new instance, in the caller's transaction
-- ('caller'), or in one of its own that commits at once ('new', the function above).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.start(
    fut text, label text DEFAULT NULL, database text DEFAULT NULL,
    transaction_mode text DEFAULT 'caller')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    -- Parameters copied so that statements below never confuse them with column names.
    v_label    text := label;
    v_database text := database;
    v_mode     text := lower(coalesce(transaction_mode, 'caller'));
    v_parsed   json;
    v_root     jsonb;
    v_type     text;
    v_err      text;
    v_helper   text;
    v_role     regrole;
    v_login    boolean;
    v_super    boolean;
    v_check    record;
    v_root_id  text := df._random_node_id();
    v_id       text;
    v_got      text;
BEGIN
    IF v_mode = 'new' THEN
        -- current_user, not session_user: the effective role submits, as in caller mode.
        RETURN df._start_in_new_transaction(fut, v_label, v_database, current_user::text);
    ELSIF v_mode <> 'caller' THEN
        RAISE EXCEPTION 'invalid transaction_mode "%" for df.start(): expected ''caller'' or ''new''',
            transaction_mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF fut IS NULL THEN
        RAISE EXCEPTION 'df.start(): fut cannot be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;

    -- Plain text, or JSON without a string node_type, is one SQL step; an envelope must have
    -- a known type and a readable top level.
    IF ltrim(fut, E' \t\n\r') LIKE '{%' THEN
        BEGIN
            v_parsed := fut::json;
        EXCEPTION WHEN data_exception THEN
            v_parsed := NULL;
        END;
    END IF;
    IF json_typeof(v_parsed -> 'node_type') = 'string' THEN
        v_type := v_parsed ->> 'node_type';
        IF NOT v_type = ANY (df._node_types()) THEN
            RAISE EXCEPTION 'Invalid durable function: Unknown node_type ''%''. Valid types: %',
                v_type, array_to_string(df._node_types(), ', ')
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_err := df._shape_error(v_parsed -> 'left_node', v_parsed -> 'right_node',
                                 v_parsed -> 'condition_node', v_parsed -> 'extra_nodes',
                                 v_parsed -> 'query', v_parsed -> 'result_name');
        IF v_err IS NOT NULL THEN
            RAISE EXCEPTION 'Invalid durable function: Malformed Durofut JSON with node_type ''%'': %',
                v_type, v_err USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_root := fut::jsonb;
    ELSE
        IF v_parsed IS NULL THEN
            v_helper := df._non_future_helper(fut);
            IF v_helper IS NOT NULL THEN
                RAISE EXCEPTION 'Invalid durable function: % cannot be used as a workflow step. Call % before df.start().',
                    v_helper, v_helper USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END IF;
        v_root := jsonb_build_object('node_type', 'SQL', 'query', fut);
    END IF;

    IF v_database IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_database d WHERE d.datname = v_database) THEN
        RAISE EXCEPTION 'database "%" does not exist', v_database
            USING ERRCODE = 'invalid_catalog_name';
    END IF;

    -- Workers log in as this role to run the instance's SQL.
    v_role := quote_ident(current_user)::regrole;
    SELECT r.rolcanlogin, r.rolsuper INTO v_login, v_super
      FROM pg_catalog.pg_roles r WHERE r.oid = v_role;
    IF NOT v_login THEN
        RAISE EXCEPTION 'current_user "%" does not have LOGIN privilege. The background worker must connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a role with LOGIN.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Superusers only where allowed (settings.sql says whose value counts); workers check
    -- again when they load the instance.
    IF v_super AND NOT df._superuser_instances_enabled() THEN
        RAISE EXCEPTION 'pg_durable: superuser instances are disabled. current_user "%" is a superuser, but pg_durable.enable_superuser_instances is off. Set pg_durable.enable_superuser_instances = on to allow this.',
            current_user USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- The whole graph is validated before anything is written.
    v_check := df._graph_error(v_root);
    IF v_check.node_count > 10000 THEN
        RAISE EXCEPTION 'Invalid durable function graph: root: Workflow exceeds maximum node count of 10000. Simplify the workflow or break it into multiple instances.'
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF v_check.err IS NOT NULL THEN
        RAISE EXCEPTION 'Invalid durable function graph: %: %', v_check.path, v_check.err
            USING ERRCODE = CASE WHEN v_check.err LIKE 'Graph exceeds%'
                                 THEN 'program_limit_exceeded' ELSE 'invalid_parameter_value' END;
    END IF;

    -- ON CONFLICT sees every row, also those RLS hides.
    FOR attempt IN 1..10 LOOP
        v_id := df._random_id();
        INSERT INTO df.instances AS i (id, label, root_node, submitted_by, database)
        VALUES (v_id, v_label, v_root_id, v_role, v_database)
        ON CONFLICT (id) DO NOTHING
        RETURNING i.id INTO v_got;
        EXIT WHEN v_got IS NOT NULL;
    END LOOP;
    IF v_got IS NULL THEN
        RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate a collision-free ID';
    END IF;

    -- Node ids are drawn per node; in the rare case two collide (about 1 in 90 for a
    -- 10,000-node graph) nothing was written and the ids are drawn again.
    FOR attempt IN 1..10 LOOP
        EXIT WHEN df._insert_nodes(v_root, v_id, v_root_id, v_role, v_database);
        IF attempt = 10 THEN
            RAISE EXCEPTION 'Failed to create instance: exhausted 10 attempts to generate collision-free node IDs';
        END IF;
    END LOOP;

    RETURN v_id;
END;
$$;

-- The engine: how a workflow advances, one checkpoint at a time.
--
-- The flow of one workflow through this file (start.sql and signals.sql hold the rest):
--
--   df.start                        INSERT df.instances, df.nodes (caller's transaction)
--     trigger instances_created     df._runs row, df.vars snapshot, the 'start' task, NOTIFY
--   df._claim                       a worker leases due tasks, shared fairly between roles
--   for each task, one transaction:
--     df._checkpoint_begin          is the task still ours? lock the instance, return its
--                                   state and the time
--     the step itself               SQL on a connection logged in as the submitter, in this
--                                   same transaction; or an HTTP response, a timer that
--                                   fired, a signal (df._consume_signal)
--     df._checkpoint                write the nodes' results, the new state and new tasks;
--                                   retire the task; lease the steps that follow to this
--                                   worker; stamp when nodes started, record an execution a
--                                   root loop ended; on the last, the instance's status,
--                                   output and end
--     COMMIT                        the step's effect and its record, together
--   df.cancel → trigger instances_cancelled: the tasks go, NOTIFY pgdurable_cancel
--   df.signal → trigger signals_sent: NOTIFY pgdurable_signals; after the commit a worker
--                                   makes the waits due (df._wake_signal_waits, signals.sql)
--
-- How a step commits. A worker claims a task and gets a secret token. For a SQL step it opens
-- a transaction on a connection logged in as the submitting role, runs the user's statement,
-- then calls df._checkpoint_begin and df._checkpoint in that same transaction and commits.
-- The statement, its recorded result and the graph's advance are therefore one transaction: a
-- crash before COMMIT undoes all three, and another worker reruns the step. These functions
-- are SECURITY DEFINER so a user connection can write engine state, and they refuse to do
-- anything without the current token of the task, which the user's SQL never sees (it is
-- sent as a bind parameter after the statement ran).
--
-- Lock order, everywhere: the df.instances row, then df._tasks rows. Checkpoints never wait
-- long on a lock a tenant can hold: a tenant may lock its own df.instances rows (SELECT ...
-- FOR UPDATE, an UPDATE or a df.cancel left open; df.signal takes no such lock). The
-- functions that write progress give up after lock_timeout (500 ms: far above what
-- checkpoints of one instance make each other wait, a few milliseconds each); the worker then
-- rolls the step back, gives its task back with a growing delay (df._tasks.deferrals) and
-- goes on with other work.
--
-- Triggers are left only where users write: df.start and df.cancel run as the user, who may
-- not write engine tables, so the engine's part of them is done by the triggers on
-- df.instances below; security.sql's triggers guard identities and statuses. A checkpoint
-- does its own bookkeeping.
--
-- Times written here use clock_timestamp(): a step's transaction began before its statement
-- ran, perhaps long ago, and now() would date its results (and leases) that far back.

-- ---------------------------------------------------------------------------------------------
-- df.start() inserts the instance row; this trigger creates its engine state, snapshots the
-- submitter's variables, queues the start task and wakes the workers. All of it is part of
-- the caller's transaction, so a rollback leaves nothing and NOTIFY is only delivered on
-- commit.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._instance_created() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO df._runs (instance_id, vars)
    SELECT NEW.id, coalesce(jsonb_object_agg(v.name, v.value), '{}')
      FROM df.vars v
     WHERE v.owner = NEW.submitted_by AND v.value IS NOT NULL;
    -- The start task carries the submitter; every later task inherits it (df._checkpoint).
    INSERT INTO df._tasks (instance_id, role_oid, activation, kind)
    VALUES (NEW.id, NEW.submitted_by, 0, 'start');
    PERFORM pg_notify('pgdurable_tasks', '');
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION df._instance_created() FROM PUBLIC;

CREATE OR REPLACE TRIGGER instances_created AFTER INSERT ON df.instances
    FOR EACH ROW EXECUTE FUNCTION df._instance_created();

-- df.cancel() sets status 'cancelled': drop the instance's queued work at once, tell workers
-- (the payload is the instance id) to cancel its statements in flight, and date its end.
-- (df.cancel runs as the user, who may not write df._runs.)
CREATE OR REPLACE FUNCTION df._instance_cancelled() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM df._tasks WHERE instance_id = NEW.id;
    UPDATE df._runs r SET finished_at = clock_timestamp()
     WHERE r.instance_id = NEW.id AND r.finished_at IS NULL;
    PERFORM pg_notify('pgdurable_cancel', NEW.id);
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION df._instance_cancelled() FROM PUBLIC;

CREATE OR REPLACE TRIGGER instances_cancelled AFTER UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status IS DISTINCT FROM 'cancelled')
    EXECUTE FUNCTION df._instance_cancelled();

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint_begin: lock the instance and return what the interpreter needs, provided the
-- caller still holds the task. No row back means the task is gone (its instance was cancelled,
-- or a RACE it belonged to was decided) or its lease was taken over: the caller must roll back.
-- ---------------------------------------------------------------------------------------------
-- role_exists is false when the submitter was dropped: a pooled connection may still be logged
-- in as it, so the step is rolled back and the instance failed instead.
CREATE OR REPLACE FUNCTION df._checkpoint_begin(p_task bigint, p_token uuid)
RETURNS TABLE (instance_status text, state jsonb, vars jsonb, now double precision,
               role_exists boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
DECLARE
    v_instance varchar(8);
BEGIN
    -- A stale token must not even lock the instance: the worker holding it may be frozen
    -- with this transaction open.
    SELECT t.instance_id INTO v_instance FROM df._tasks t WHERE t.id = p_task AND t.token = p_token;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM df.instances i WHERE i.id = v_instance FOR NO KEY UPDATE;
    PERFORM 1 FROM df._tasks t WHERE t.id = p_task AND t.token = p_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT i.status, r.state, r.vars, extract(epoch FROM clock_timestamp())::float8,
               EXISTS (SELECT 1 FROM pg_roles WHERE oid = i.submitted_by)
          FROM df.instances i JOIN df._runs r ON r.instance_id = i.id
         WHERE i.id = v_instance;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint: apply one interpreter transition and retire the task that caused it.
--
-- p_change is the transition as JSON, the contract written down in worker/change.py:
--   state            the new interpreter state (stored as is, never read here)
--   generation       root execution number
--   writes           [{"id", "status", "result" (JSON text or null), "execution_id",
--                      "error_op" ('set' | 'append' | null), "error"}], one per node
--   tasks            [{"activation", "kind", "node_id", "payload", "run_at" (epoch s or null)}]
--   dropped          activation numbers whose tasks are abandoned (RACE losers)
--   outcome          null, or {"status": "completed"|"failed", "output": text}
--   ended_execution  null, or {"generation", "output"}: a root loop began its next iteration
-- Up to p_claim of the new SQL and HTTP tasks that can run now are leased to p_worker for
-- p_lease_seconds and returned, so the worker goes on with them without another claim.
--
-- Both checkpoint functions stay executable by PUBLIC: a step's connection is logged in as
-- the submitting role, whoever that is. The task's token, which the user's SQL never sees, is
-- the guard.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._checkpoint(
    p_task bigint, p_token uuid, p_change jsonb,
    p_worker uuid, p_claim integer, p_lease_seconds double precision)
RETURNS TABLE (task_id bigint, token uuid, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, kind text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
DECLARE
    v_instance varchar(8);
    v_role     oid;       -- the submitter, carried from task to task
    v_outcome  jsonb := nullif(p_change -> 'outcome', 'null'::jsonb);
    v_ended    jsonb := nullif(p_change -> 'ended_execution', 'null'::jsonb);
    v_unclaimed integer;
    v_notified integer;   -- the count that makes each cancel notification run
BEGIN
    DELETE FROM df._tasks t WHERE t.id = p_task AND t.token = p_token
    RETURNING t.instance_id, t.role_oid INTO v_instance, v_role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgdurable: task % is no longer held by this worker', p_task
            USING ERRCODE = 'PD001',
                  HINT = 'Its lease expired and another worker took it, or the instance was '
                         'cancelled. The step is rolled back.';
    END IF;

    UPDATE df.nodes n
       SET status = w.status,
           result = w.result::jsonb,
           status_details = jsonb_build_object('execution_id', w.execution_id),
           -- A df.retry's history of failed attempts, one line each.
           error = CASE w.error_op
                       WHEN 'set' THEN nullif(w.error, '')
                       WHEN 'append' THEN concat_ws(E'\n', n.error, w.error)
                       ELSE n.error END,
           updated_at = clock_timestamp(),
           -- Whenever it becomes running (again, in each loop iteration or retried attempt),
           -- for the durations monitoring shows.
           started_at = CASE WHEN w.status = 'running' AND n.status IS DISTINCT FROM 'running'
                             THEN clock_timestamp() ELSE n.started_at END
      FROM jsonb_to_recordset(p_change -> 'writes')
           AS w(id varchar(8), status text, result text, execution_id text, error_op text,
                error text)
     WHERE n.instance_id = v_instance AND n.id = w.id;

    -- An execution a root loop ended goes into the history before df._runs counts this
    -- checkpoint, which belongs to the next execution. It began when the one before it ended
    -- (or with the instance), at that one's last checkpoint count (or 0). Only the newest
    -- 1,000 of an instance are kept.
    IF v_ended IS NOT NULL THEN
        INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,
                                    first_event, events, output)
        SELECT v_instance, g.generation, 'ContinuedAsNew',
               coalesce(p.finished_at, i.created_at, clock_timestamp()), clock_timestamp(),
               coalesce(p.first_event + p.events, 0),
               r.checkpoints - coalesce(p.first_event + p.events, 0), v_ended ->> 'output'
          FROM (SELECT (v_ended ->> 'generation')::integer AS generation) AS g
          JOIN df.instances i ON i.id = v_instance
          JOIN df._runs r ON r.instance_id = v_instance
          LEFT JOIN df._executions p
                 ON p.instance_id = v_instance AND p.generation = g.generation - 1
        ON CONFLICT (instance_id, generation) DO NOTHING;
        DELETE FROM df._executions e
         WHERE e.instance_id = v_instance
           AND e.generation <= (p_change ->> 'generation')::integer - 1000;
    END IF;

    UPDATE df._runs r
       SET state = p_change -> 'state',
           generation = coalesce((p_change ->> 'generation')::integer, r.generation),
           output = CASE WHEN v_outcome IS NULL THEN r.output ELSE v_outcome ->> 'output' END,
           -- When the instance ended: retention dates it by this.
           finished_at = CASE WHEN v_outcome IS NULL THEN r.finished_at
                              ELSE coalesce(r.finished_at, clock_timestamp()) END,
           checkpoints = r.checkpoints + 1
     WHERE r.instance_id = v_instance;

    IF v_outcome IS NOT NULL THEN
        UPDATE df.instances i
           SET status = v_outcome ->> 'status',
               updated_at = clock_timestamp(),
               completed_at = CASE WHEN v_outcome ->> 'status' = 'completed'
                                   THEN clock_timestamp() END
         WHERE i.id = v_instance AND i.status NOT IN ('completed', 'failed', 'cancelled');
        -- Whatever still runs (the loser of a deciding RACE) is cancelled.
        WITH gone AS (
            DELETE FROM df._tasks t WHERE t.instance_id = v_instance RETURNING t.activation
        )
        SELECT count(pg_notify('pgdurable_cancel', v_instance || ':' || g.activation))
          INTO v_notified
          FROM gone g;
        RETURN;
    END IF;

    UPDATE df.instances i SET status = 'running', updated_at = clock_timestamp()
     WHERE i.id = v_instance AND i.status = 'pending';

    -- Abandoned work (RACE losers): its tasks go, and a worker running one of their
    -- statements is told to cancel it (delivered only if this transaction commits).
    WITH dropped AS (
        DELETE FROM df._tasks t
         WHERE t.instance_id = v_instance
           AND t.activation = ANY (
               ARRAY(SELECT jsonb_array_elements_text(p_change -> 'dropped'))::int[])
        RETURNING t.activation
    )
    SELECT count(pg_notify('pgdurable_cancel', v_instance || ':' || d.activation))
      INTO v_notified
      FROM dropped d;

    RETURN QUERY
    WITH new_task AS (
        SELECT n.activation, n.kind, n.node_id, n.payload, n.run_at,
               n.kind IN ('sql', 'http') AND n.run_at IS NULL
               AND row_number() OVER (PARTITION BY n.kind IN ('sql', 'http') AND n.run_at IS NULL
                                      ORDER BY n.activation) <= p_claim AS claimed
          FROM jsonb_to_recordset(p_change -> 'tasks')
               AS n(activation integer, kind text, node_id varchar(8), payload jsonb,
                    run_at double precision)
    ), inserted AS (
        INSERT INTO df._tasks AS t
               (instance_id, role_oid, activation, kind, node_id, payload, visible_at,
                lease_owner, token, attempts)
        SELECT v_instance, v_role, n.activation, n.kind, n.node_id, n.payload,
               CASE WHEN n.claimed
                    THEN clock_timestamp() + make_interval(secs => p_lease_seconds)
                    -- A signal wait is due at once if its signal is already buffered, else at
                    -- its deadline (or never); a worker wakes it when a signal to it commits
                    -- (df._wake_signal_waits, signals.sql).
                    WHEN n.kind = 'signal'
                    THEN CASE WHEN df._signal_pending(v_instance, n.payload ->> 'signal_name')
                              THEN clock_timestamp()
                              ELSE coalesce(to_timestamp(n.run_at), 'infinity') END
                    WHEN n.run_at IS NULL THEN clock_timestamp()
                    ELSE to_timestamp(n.run_at) END,
               CASE WHEN n.claimed THEN p_worker END,
               CASE WHEN n.claimed THEN gen_random_uuid() END,
               CASE WHEN n.claimed THEN 1 ELSE 0 END
          FROM new_task n
        RETURNING t.id, t.token, t.activation, t.node_id, t.payload, t.attempts, t.lease_owner,
                  t.visible_at, t.kind
    )
    SELECT i.id, i.token, i.activation, i.node_id, i.payload, i.attempts, i.kind
      FROM inserted i
     WHERE i.lease_owner IS NOT NULL;

    -- Wake idle workers only for work nobody holds yet; timers are found by polling.
    SELECT count(*) INTO v_unclaimed
      FROM jsonb_to_recordset(p_change -> 'tasks') AS n(kind text, run_at double precision)
     WHERE n.kind IN ('sql', 'http') AND n.run_at IS NULL;
    IF v_unclaimed > p_claim THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._waiting_roles: the roles that have due tasks nobody holds (a leased task is due only
-- once its lease ran out). The roles that have tasks are found by a loose index scan (one
-- probe of tasks_role_visible_idx per role, none at all when nothing is due), and those with
-- due tasks kept.
-- ---------------------------------------------------------------------------------------------
-- (No SET clause: PostgreSQL then inlines it into df._claim's query and plans them as one.)
CREATE OR REPLACE FUNCTION df._waiting_roles() RETURNS SETOF oid
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE roles (role_oid) AS (
        (SELECT t.role_oid FROM df._tasks t
          WHERE EXISTS (SELECT 1 FROM df._tasks d WHERE d.visible_at <= now())
          ORDER BY t.role_oid LIMIT 1)
        UNION ALL
        SELECT (SELECT t.role_oid FROM df._tasks t WHERE t.role_oid > r.role_oid
                 ORDER BY t.role_oid LIMIT 1)
          FROM roles r
         WHERE r.role_oid IS NOT NULL
    )
    SELECT r.role_oid FROM roles r
     WHERE r.role_oid IS NOT NULL
       AND EXISTS (SELECT 1 FROM df._tasks t
                    WHERE t.role_oid = r.role_oid AND t.visible_at <= now());
$$;
REVOKE ALL ON FUNCTION df._waiting_roles() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._claim: lease up to p_limit due tasks to worker p_worker, shared fairly between roles.
--
-- The free slots go to the roles with due tasks (df._waiting_roles) like water: the level is
-- what each would hold if the free slots and those the roles hold already (p_held_roles,
-- p_held_slots: this worker's) were shared evenly, and each role offers its due tasks, oldest
-- first, up to that level and under p_cap, locking them as it goes (SKIP LOCKED: workers claiming at once take different
-- tasks). The offers are taken in turns: a role's n-th offer has turn held + n, so the slots
-- go to the roles holding the fewest, and a lone role gets every slot. Offers not taken (the
-- level is rounded up) stay locked until the claim commits, a moment later.
--
-- A function rather than a statement of the worker's: PostgreSQL would plan that statement
-- again at every call, for its parameter values, which costs more than running it; here the
-- plan is made once per session.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._claim(p_worker uuid, p_limit integer, p_lease double precision,
                          p_cap integer, p_held_roles oid[], p_held_slots integer[])
RETURNS TABLE (id bigint, token uuid, kind text, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, instance_id varchar(8), role text,
               role_oid oid, database text, label text, created_at timestamptz,
               deferrals integer)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT w.role_oid, coalesce(h.slots, 0) AS held
          FROM df._waiting_roles() AS w (role_oid)
          LEFT JOIN unnest(p_held_roles, p_held_slots) AS h (role_oid, slots)
                 ON h.role_oid = w.role_oid
    ), level AS (
        SELECT ceil((p_limit + sum(d.held)) / count(*)::numeric)::integer AS slots FROM due d
    ), offered AS (
        SELECT o.id, o.visible_at, d.held + o.rank AS turn
          FROM due d CROSS JOIN level l
         CROSS JOIN LATERAL (
               SELECT k.id, k.visible_at, row_number() OVER (ORDER BY k.visible_at, k.id) AS rank
                 FROM (SELECT t.id, t.visible_at FROM df._tasks t
                        WHERE t.role_oid = d.role_oid AND t.visible_at <= now()
                        ORDER BY t.visible_at
                        LIMIT greatest(least(l.slots - d.held, p_limit, p_cap - d.held), 0)
                          FOR UPDATE SKIP LOCKED) k
               ) o
    ), picked AS (
        SELECT o.id FROM offered o ORDER BY o.turn, o.visible_at, o.id LIMIT p_limit
    ), claimed AS (
        UPDATE df._tasks t
           SET lease_owner = p_worker,
               token = gen_random_uuid(),
               visible_at = now() + make_interval(secs => p_lease),
               attempts = t.attempts + 1
          FROM picked
         WHERE t.id = picked.id
        RETURNING t.*
    )
    SELECT c.id, c.token, c.kind, c.activation, c.node_id, c.payload, c.attempts,
           c.instance_id,
           -- The login name, not regrole's text, which quotes names like "Odd Name". A dropped
           -- role leaves its number, which fails the login as it should.
           coalesce(a.rolname, i.submitted_by::text)::text, i.submitted_by::oid, i.database,
           i.label, i.created_at, c.deferrals
      FROM claimed c JOIN df.instances i ON i.id = c.instance_id
      LEFT JOIN pg_roles a ON a.oid = i.submitted_by;
END;
$$;
REVOKE ALL ON FUNCTION df._claim(uuid, integer, double precision, integer, oid[], integer[])
    FROM PUBLIC;

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

-- Monitoring from SQL (docs/monitoring.md).
--
-- Every function here except df.workers, df.worker_tasks and df.metrics runs as the caller
-- (SECURITY INVOKER) and reads only tables that row-level security limits to the caller's
-- own instances: another role's instance id looks exactly like an unknown one, and
-- superusers see everything. df.list_instances is in client.sql, df.explain in explain.sql.

-- ---------------------------------------------------------------------------------------------
-- df.instance_nodes: every node of an instance with its physical status and the
-- status a reader should see.
--
-- The physical status of a node is what the engine last wrote. It says "pending" for the arm
-- of an IF that was not taken, for the rest of a sequence after a failure and for the nodes
-- of a RACE loser that never got to run, and "completed" for nodes of an earlier loop
-- iteration that the current one has not reached yet. inferred_status says what these mean:
--
-- 1. Each stamped node has a scope and a generation: status_details is
--    {"execution_id": "<scope>::<generation>"} (written by the interpreter,
--    src/pgdurable/core/interpreter.py). scope_max[scope] is the highest generation stamped
--    in a scope.
-- 2. A node is superseded if its generation is below scope_max of its scope, or if its scope
--    (a JOIN/RACE branch or nested loop, "<parent scope>::<parent generation>::<child root>")
--    was spawned in a generation that is superseded in the parent scope, recursively.
-- 3. Walking down from the root, each node knows its nearest non-superseded terminal ancestor
--    (NTA) and its highest-generation stamped ancestor (MGA; the nearest one among ties):
--      terminal, not superseded   -> its physical status
--      terminal, superseded       -> 'skipped' (from NTA) if there is an NTA,
--                                    else 'pending' (from MGA)
--      not terminal, with an NTA  -> 'skipped' (from NTA)
--      not terminal, superseded   -> 'pending' (from MGA)
--      otherwise                  -> 'running' if physically running, else 'pending'
-- 4. Nodes the walk does not reach keep their physical status.
--
-- One deliberate addition to pg_durable's rules: a superseded node that is not terminal and has
-- no NTA reads 'pending', not 'running'. pgdurable leaves a RACE loser's unfinished nodes
-- 'running' (the loser is abandoned, not stamped); in a loop, the next iteration must not
-- show them as running while it has not reached them.
--
-- Children are the ones the interpreter runs: left and right, an IF's or a while-LOOP's
-- condition_node and a join3's extra_nodes (both ids in the node's JSON query), and
-- the one child (left) of pgdurable's RETRY and TIMEOUT wrappers.
--
-- df.nodes rows may be written by hand (users hold INSERT on them), so the graph need not be a
-- tree: each non-root node is given one parent (the smallest id among the nodes naming it),
-- which makes the walk visit a node at most once, whatever cycles or shared children the rows
-- describe.
--
-- Other SQL (df.explain) reuses this function for its status markers; its columns are
-- pg_durable's, in pg_durable's order.
-- ---------------------------------------------------------------------------------------------

-- The JSON value of a text, or NULL if it is not JSON: a hand-written node's query may be
-- anything, and one bad row must not break monitoring of the whole instance.
CREATE OR REPLACE FUNCTION df._jsonb_or_null(value text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN value::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result text, status_details text,
               inferred_status text, inferred_status_from_ancestor_id text,
               updated_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH RECURSIVE
node AS (
    SELECT n.id::text AS id, n.node_type, n.query, n.result_name, n.left_node::text AS left_node,
           n.right_node::text AS right_node, n.status, n.result, n.status_details, n.updated_at,
           n.status IN ('completed', 'failed') AS terminal,
           -- {scope, generation}; NULL for a node never stamped (or stamped unreadably).
           regexp_match(n.status_details ->> 'execution_id', '^(.+)::([0-9]{1,9})$') AS stamp,
           CASE WHEN n.node_type IN ('IF', 'LOOP', 'JOIN')
                THEN df._jsonb_or_null(n.query) END AS config
      FROM df.nodes n
     WHERE n.instance_id = instance_id_param
),
edge AS (
    SELECT p.id AS parent, c.child
      FROM node p,
           LATERAL (SELECT p.left_node
                    UNION ALL SELECT p.right_node
                    UNION ALL SELECT p.config ->> 'condition_node'
                     WHERE p.node_type IN ('IF', 'LOOP') AND jsonb_typeof(p.config) = 'object'
                    UNION ALL SELECT e.value
                      FROM jsonb_array_elements_text(
                               CASE WHEN p.node_type = 'JOIN'
                                         AND jsonb_typeof(p.config -> 'extra_nodes') = 'array'
                                    THEN p.config -> 'extra_nodes' END) AS e) AS c (child)
     WHERE c.child IS NOT NULL
),
root AS (
    SELECT i.root_node::text AS id FROM df.instances i WHERE i.id = instance_id_param
),
parent_of AS (
    SELECT DISTINCT ON (e.child) e.child, e.parent
      FROM edge e
     WHERE e.child NOT IN (SELECT r.id FROM root r)
     ORDER BY e.child, e.parent
),
scope_max AS (
    SELECT n.stamp[1] AS scope, max(n.stamp[2]::integer) AS generation
      FROM node n
     WHERE n.stamp IS NOT NULL
     GROUP BY n.stamp[1]
),
-- Each scope's lineage up to the instance's root scope; dead once a spawning generation is
-- behind its parent scope.
lineage (scope, cur, dead) AS (
    SELECT s.scope, s.scope, false FROM scope_max s
    UNION ALL
    SELECT l.scope, up.m[1], l.dead OR up.m[2]::integer < coalesce(pm.generation, 0)
      FROM lineage l
     CROSS JOIN LATERAL regexp_match(l.cur, '^(.+)::([0-9]{1,9})::[0-9a-f]{8}$') AS up (m)
      LEFT JOIN scope_max pm ON pm.scope = up.m[1]
     WHERE up.m IS NOT NULL
),
dead_scope AS (
    SELECT l.scope FROM lineage l GROUP BY l.scope HAVING bool_or(l.dead)
),
judged AS (
    SELECT n.*, n.stamp[2]::integer AS generation,
           n.stamp IS NOT NULL
           AND (n.stamp[2]::integer < s.generation
                OR EXISTS (SELECT 1 FROM dead_scope d WHERE d.scope = n.stamp[1]))
           AS superseded
      FROM node n
      LEFT JOIN scope_max s ON s.scope = n.stamp[1]
),
walk (id, nta, mga, mga_generation) AS (
    SELECT r.id, NULL::text, NULL::text, NULL::integer FROM root r
    UNION ALL
    SELECT c.child,
           CASE WHEN p.terminal AND NOT p.superseded THEN p.id ELSE w.nta END,
           CASE WHEN p.generation >= coalesce(w.mga_generation, 0) THEN p.id ELSE w.mga END,
           CASE WHEN p.generation >= coalesce(w.mga_generation, 0)
                THEN p.generation ELSE w.mga_generation END
      FROM walk w
      JOIN judged p ON p.id = w.id
      JOIN parent_of c ON c.parent = w.id
)
SELECT j.id, j.node_type, j.query, j.result_name, j.left_node, j.right_node, j.status,
       j.result::text, j.status_details::text,
       CASE WHEN w.id IS NULL OR (j.terminal AND NOT j.superseded) THEN j.status
            WHEN w.nta IS NOT NULL THEN 'skipped'
            WHEN j.terminal OR j.superseded THEN 'pending'
            WHEN j.status = 'running' THEN 'running'
            ELSE 'pending' END,
       CASE WHEN w.id IS NULL OR (j.terminal AND NOT j.superseded) THEN NULL
            WHEN w.nta IS NOT NULL THEN w.nta
            WHEN j.terminal OR j.superseded THEN w.mga END,
       j.updated_at
  FROM judged j
  LEFT JOIN walk w ON w.id = j.id;
$$;

-- pg_durable's older form: the nodes as stored, one execution, no inference. The
-- second argument is accepted and ignored, as there.
CREATE OR REPLACE FUNCTION df.instance_nodes(instance_id_param text, _last_n_executions integer)
RETURNS TABLE (execution_id bigint, node_id text, node_type text, query text,
               result_name text, left_node text, right_node text, status text, result text,
               updated_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 1::bigint, n.id::text, n.node_type, n.query, n.result_name, n.left_node::text,
           n.right_node::text, n.status, n.result::text, n.updated_at
      FROM df.nodes n
     WHERE n.instance_id = instance_id_param;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.instance_info and df.instance_executions. Run as the caller: another role's
-- instance gives no row, like an unknown one.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.id::text, i.label, 'pg_durable::orchestration::execute-function-graph'::text,
           '1.0.0'::text, r.generation::bigint, i.status, r.output
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id
     WHERE i.id = $1;
$$;

-- Newest first; limit_count is capped at 10,000, NULL means the default 5. The
-- current execution comes from df._runs (its finished_at) and df.instances, the
-- ended ones from the history; run as the caller, under row-level security on all three.
CREATE OR REPLACE FUNCTION df.instance_executions(instance_id text, limit_count integer DEFAULT 5)
RETURNS TABLE (execution_id bigint, status text, event_count bigint, duration_ms bigint,
               output text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_limit integer := least(coalesce($2, 5), 10000);
BEGIN
    IF v_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        WITH current AS (
            SELECT r.generation,
                   CASE i.status WHEN 'completed' THEN 'Completed'
                                 WHEN 'failed' THEN 'Failed'
                                 WHEN 'cancelled' THEN 'Cancelled'
                                 ELSE 'Running' END AS status,
                   coalesce(p.finished_at, i.created_at) AS started_at,
                   CASE WHEN i.status IN ('completed', 'failed', 'cancelled')
                        THEN r.finished_at END AS finished_at,
                   r.checkpoints - coalesce(p.first_event + p.events, 0) AS events,
                   CASE WHEN i.status IN ('completed', 'failed', 'cancelled')
                        THEN r.output END AS output
              FROM df._runs r
              JOIN df.instances i ON i.id = r.instance_id
              LEFT JOIN df._executions p
                     ON p.instance_id = r.instance_id AND p.generation = r.generation - 1
             WHERE r.instance_id = $1
        ), every AS (
            SELECT c.generation, c.status, c.events, c.started_at, c.finished_at, c.output
              FROM current c
            UNION ALL
            SELECT e.generation, e.status, e.events, e.started_at, e.finished_at, e.output
              FROM df._executions e
             WHERE e.instance_id = $1
               AND e.generation < (SELECT c.generation FROM current c)
        )
        SELECT x.generation::bigint, x.status, x.events::bigint,
               CASE WHEN x.finished_at IS NULL THEN 0::bigint
                    ELSE greatest(0, round(extract(epoch FROM x.finished_at - x.started_at)
                                           * 1000))::bigint END,
               x.output
          FROM every x
         ORDER BY x.generation DESC
         LIMIT v_limit;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Workers (pgdurable's own; pg_durable has one executor per cluster). Each live worker keeps a
-- row in df._worker_epoch and heartbeats it every third of its lease (10 s with the default
-- 30 s lease, worker/loop.py); a worker killed without a clean stop leaves its row behind until
-- another worker starts and sweeps rows silent for ten minutes. So a worker is alive when its
-- last heartbeat is younger than three heartbeat intervals: stale_after, 30 s by default (pass
-- three times lease/3 for workers run with another --lease-seconds).
--
-- What a worker holds are the tasks leased to it (df._tasks.lease_owner): steps it runs now,
-- and steps its checkpoints handed to it. A lease that ran out stays with its worker until
-- another worker claims the task, so the tasks of a dead worker show here with an expired
-- lease.
--
-- System-wide data (hosts, pids, every tenant's instance ids), not limited by row-level
-- security: SECURITY DEFINER, and EXECUTE only by explicit grant, like df.metrics
-- (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.workers(stale_after interval DEFAULT interval '30 seconds')
RETURNS TABLE (worker_id uuid, hostname text, pid integer, started_at timestamptz,
               last_seen_at timestamptz, alive boolean, concurrency integer, version text,
               tasks_held bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.epoch_id, w.hostname, w.pid, w.started_at, w.last_seen_at,
           coalesce(w.last_seen_at > now() - $1, false), w.concurrency, w.version,
           (SELECT count(*) FROM df._tasks t WHERE t.lease_owner = w.epoch_id)
      FROM df._worker_epoch w
     ORDER BY w.started_at, w.epoch_id;
$$;

-- The tasks each worker holds: which step of which instance, since when (its lease runs to
-- lease_expires_at and is extended by the heartbeat), and how often it was claimed.
CREATE OR REPLACE FUNCTION df.worker_tasks()
RETURNS TABLE (worker_id uuid, task_id bigint, instance_id text, submitted_by text,
               node_id text, node_type text, kind text, attempts integer,
               lease_expires_at timestamptz, lease_expired boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.lease_owner, t.id, t.instance_id::text, i.submitted_by::text, t.node_id::text,
           n.node_type, t.kind, t.attempts, t.visible_at, t.visible_at <= now()
      FROM df._tasks t
      JOIN df.instances i ON i.id = t.instance_id
      LEFT JOIN df.nodes n ON n.instance_id = t.instance_id AND n.id = t.node_id
     WHERE t.lease_owner IS NOT NULL
     ORDER BY t.lease_owner, t.id;
$$;

REVOKE EXECUTE ON FUNCTION df.workers(interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.worker_tasks() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df.metrics: system-wide counts, so not filtered by row-level security; EXECUTE
-- only by explicit grant (df.grant_usage(role, with_grant => true), or GRANT EXECUTE).
-- running_instances counts pending ones too: the engine holds them as started. Cancelled
-- instances count in total_instances only. total_executions is the sum of the instances'
-- generations (root loop iterations); total_events the committed checkpoints, pgdurable's
-- counterpart of history events.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(*),
           count(*) FILTER (WHERE i.status IN ('pending', 'running')),
           count(*) FILTER (WHERE i.status = 'completed'),
           count(*) FILTER (WHERE i.status = 'failed'),
           coalesce(sum(r.generation), 0)::bigint,
           coalesce(sum(r.checkpoints), 0)::bigint
      FROM df.instances i
      LEFT JOIN df._runs r ON r.instance_id = i.id;
$$;

REVOKE EXECUTE ON FUNCTION df.metrics() FROM PUBLIC;

-- df.explain: a workflow drawn as text.
--
-- df.explain(input) draws a workflow as a tree of text lines, either a live instance with
-- the status of each node (input: an instance id) or a graph that has not been started (a
-- dry run; input: an envelope, a DSL expression, or one SQL statement):
--
--   SQL: SELECT 1 |=> 'a' ✓
--   → JOIN (2) ⏳
--       ║ branch 1:
--         ├─SQL: SELECT 2 ✓
--       ║ branch 2:
--         └─SLEEP 5s ⏳
--   → SQL: SELECT 'done' ○
--
-- Both modes turn their nodes into the same form, a jsonb map from node id to an "entry"
-- (df._explain_entry: the node's finished line and its children in drawing order), and one
-- renderer (df._explain_tree) walks that map. The walk is a recursive query, not recursive
-- PL/pgSQL: a graph may be 256 levels deep and 10,000 nodes wide, and one query pass per
-- level costs far less than a function call per node. Node lookups go through the jsonb map
-- (a binary search) rather than a join, so the cost never depends on the plan PostgreSQL
-- picks for a recursive join.
--
-- Everything runs as the caller (SECURITY INVOKER): in live mode row-level security shows
-- the caller's own instances only, and another role's instance is "not found".

-- ---------------------------------------------------------------------------------------------
-- Text helpers
-- ---------------------------------------------------------------------------------------------

-- Free text shown on one line (SQL, URLs, labels, outputs...): a line break, with the
-- indentation around it, becomes one space, so a multi-line statement cannot break the
-- drawing. Text without line breaks is left exactly as it is.
CREATE OR REPLACE FUNCTION df._explain_flat(s text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN s ~ '[\r\n]'
                THEN btrim(regexp_replace(s, '\s*[\r\n]\s*', ' ', 'g'), E' \t')
                ELSE s END;
$$;

-- s cut to its first keep_bytes bytes followed by '...' when it is longer than max_bytes
-- bytes (pg_durable counts SQL and outputs in bytes). The cut never splits a multi-byte
-- character: it keeps the longest run of whole characters that fits in keep_bytes.
CREATE OR REPLACE FUNCTION df._explain_cut(s text, max_bytes integer, keep_bytes integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE
        WHEN octet_length(s) <= max_bytes THEN s
        ELSE (SELECT left(s, c.n)
                FROM generate_series(keep_bytes, 0, -1) AS c (n)
               WHERE octet_length(left(s, c.n)) <= keep_bytes
               LIMIT 1) || '...'
    END;
$$;

-- The config object stored in a node's query, or NULL if the query is not a
-- JSON object. As `json`, so numbers keep the text they were written with (0.5, not 0.50).
-- A hand-written graph may hold anything there; explaining it must not fail.
CREATE OR REPLACE FUNCTION df._explain_config(query text) RETURNS json
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    config json;
BEGIN
    config := query::json;
    IF json_typeof(config) = 'object' THEN
        RETURN config;
    END IF;
    RETURN NULL;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._explain_entry: one node, ready to draw.
--
--   {"t": node type,
--    "l": its line without indentation: label, ` |=> 'name'`, status marker (NULL for THEN,
--         which has no line of its own),
--    "c": its children in drawing order, each {"id": child id, "h": block header, "c":
--         connector}; a THEN's two sides have no header, and its left side keeps the
--         connector the THEN itself was drawn with (absent "c")}
--
-- Children come from left_node/right_node and from condition_node/extra_nodes, which a
-- dry run passes directly and which stored nodes keep in their config (IF/LOOP
-- {"condition_node":"<id>"}, JOIN {"extra_nodes":[...]}). status is the inferred status in
-- live mode and NULL in a dry run (no marker).
--
-- Line formats (pg_durable's, plus pgdurable's RETRY and TIMEOUT):
--   SQL: <query>              cut to 47 bytes + '...' when over 50 bytes
--   SLEEP <n>s
--   WAIT '<cron>'
--   HTTP <METHOD> <url>       url cut to 37 characters + '...' when over 40 (also multipart)
--   SIGNAL '<name>'           or SIGNAL '<name>' (<timeout>s)
--   LOOP (infinite)           or LOOP (while)
--   BREAK                     or BREAK '<value>', value cut to 17 bytes + '...' when over 20
--   IF, JOIN (<branches>), RACE
--   RETRY (max <n> attempts)  or RETRY (max <n> attempts, on <retry_on, ...>)
--   TIMEOUT <seconds>s
-- A node whose config cannot be read shows its type and its raw query, cut like SQL.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_entry(
    node_type text, query text, result_name text, left_node text, right_node text,
    condition_node text, extra_nodes text[], status text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    config   json;
    url      text;
    branches text[];
    label    text;
    children jsonb;
BEGIN
    -- Only these types keep settings in query; a SQL query is never parsed.
    IF node_type NOT IN ('SQL', 'SLEEP', 'THEN', 'RACE') AND query IS NOT NULL THEN
        config := df._explain_config(query);
    END IF;
    IF node_type IN ('IF', 'LOOP') THEN
        condition_node := coalesce(condition_node, config ->> 'condition_node');
    END IF;
    IF node_type = 'JOIN' AND extra_nodes IS NULL
       AND json_typeof(config -> 'extra_nodes') = 'array' THEN
        extra_nodes := ARRAY(SELECT json_array_elements_text(config -> 'extra_nodes'));
    END IF;
    IF node_type IN ('JOIN', 'RACE') THEN
        branches := ARRAY[left_node, right_node]
            || CASE WHEN node_type = 'JOIN' THEN coalesce(extra_nodes, '{}') ELSE '{}' END;
    END IF;

    -- The label.
    IF node_type IN ('WAIT_SCHEDULE', 'SIGNAL', 'HTTP', 'HTTP_MULTIPART', 'BREAK', 'RETRY',
                     'TIMEOUT') AND config IS NULL THEN
        label := node_type || ' '
            || df._explain_cut(df._explain_flat(coalesce(query, '')), 50, 47);
    ELSIF node_type IN ('HTTP', 'HTTP_MULTIPART') THEN
        url := df._explain_flat(coalesce(config ->> 'url', ''));
        label := 'HTTP ' || coalesce(config ->> 'method', '?') || ' '
            || CASE WHEN char_length(url) > 40 THEN left(url, 37) || '...' ELSE url END;
    ELSE
        label := CASE node_type
            WHEN 'THEN' THEN NULL
            WHEN 'SQL' THEN
                'SQL: ' || df._explain_cut(df._explain_flat(coalesce(query, '')), 50, 47)
            WHEN 'SLEEP' THEN
                'SLEEP ' || df._explain_flat(coalesce(query, '')) || 's'
            WHEN 'WAIT_SCHEDULE' THEN
                'WAIT ''' || df._explain_flat(coalesce(config ->> 'cron_expr', '')) || ''''
            WHEN 'SIGNAL' THEN
                'SIGNAL ''' || df._explain_flat(coalesce(config ->> 'signal_name', '')) || ''''
                    || CASE WHEN json_typeof(config -> 'timeout_seconds') = 'number'
                            THEN ' (' || (config -> 'timeout_seconds')::text || 's)'
                            ELSE '' END
            WHEN 'LOOP' THEN
                CASE WHEN condition_node IS NULL THEN 'LOOP (infinite)' ELSE 'LOOP (while)' END
            WHEN 'BREAK' THEN
                -- A string shows as its text, any other JSON value as JSON (only a
                -- hand-written graph has those); null is no value.
                CASE coalesce(json_typeof(config -> 'break_value'), 'null')
                    WHEN 'null' THEN 'BREAK'
                    WHEN 'string' THEN
                        'BREAK ''' || df._explain_cut(
                            df._explain_flat(config ->> 'break_value'), 20, 17) || ''''
                    ELSE
                        'BREAK ''' || df._explain_cut(
                            df._explain_flat((config -> 'break_value')::text), 20, 17) || ''''
                END
            WHEN 'IF' THEN 'IF'
            WHEN 'JOIN' THEN 'JOIN (' || cardinality(branches) || ')'
            WHEN 'RACE' THEN 'RACE'
            WHEN 'RETRY' THEN
                'RETRY (max ' || coalesce(config ->> 'max_attempts', '?') || ' attempt'
                    || CASE WHEN config ->> 'max_attempts' = '1' THEN '' ELSE 's' END
                    || CASE WHEN json_typeof(config -> 'retry_on') = 'array'
                            THEN ', on ' || (SELECT string_agg(e.code, ', ' ORDER BY e.ord)
                                               FROM json_array_elements_text(config -> 'retry_on')
                                                    WITH ORDINALITY AS e (code, ord))
                            ELSE '' END
                    || ')'
            WHEN 'TIMEOUT' THEN
                'TIMEOUT ' || coalesce((config -> 'timeout_seconds')::text, '?') || 's'
            ELSE node_type
        END;
    END IF;

    -- The children, in drawing order.
    CASE node_type
    WHEN 'THEN' THEN
        children := jsonb_build_array(jsonb_build_object('id', left_node),
                                      jsonb_build_object('id', right_node, 'c', '→ '));
    WHEN 'LOOP' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '↻ body:', 'c', '└─'));
        IF condition_node IS NOT NULL THEN
            children := children || jsonb_build_array(
                jsonb_build_object('id', condition_node, 'h', '? while:', 'c', '└─'));
        END IF;
    WHEN 'IF' THEN
        -- df.if_rows has no condition node, hence no condition block.
        children := CASE WHEN condition_node IS NOT NULL THEN jsonb_build_array(
                            jsonb_build_object('id', condition_node, 'h', '? condition:',
                                               'c', '└─'))
                         ELSE '[]' END
            || jsonb_build_array(jsonb_build_object('id', left_node, 'h', '✓ then:', 'c', '└─'),
                                 jsonb_build_object('id', right_node, 'h', '✗ else:', 'c', '└─'));
    WHEN 'JOIN', 'RACE' THEN
        -- Branches are siblings: all but the last hang from a '├─'.
        SELECT jsonb_agg(jsonb_build_object(
                   'id', b.id, 'h', '║ branch ' || b.ord || ':',
                   'c', CASE WHEN b.ord < cardinality(branches) THEN '├─' ELSE '└─' END)
                   ORDER BY b.ord)
          INTO children
          FROM unnest(branches) WITH ORDINALITY AS b (id, ord);
    WHEN 'RETRY' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '↻ attempt:', 'c', '└─'));
    WHEN 'TIMEOUT' THEN
        children := jsonb_build_array(
            jsonb_build_object('id', left_node, 'h', '⏱ within:', 'c', '└─'));
    ELSE
        children := '[]';
    END CASE;

    RETURN jsonb_build_object(
        't', node_type,
        'l', label || coalesce(' |=> ''' || result_name || '''', '')
                   || CASE status
                          WHEN 'completed' THEN ' ✓'
                          WHEN 'failed' THEN ' ✗'
                          WHEN 'running' THEN ' ⏳'
                          WHEN 'pending' THEN ' ○'
                          WHEN 'skipped' THEN ' ⊘'
                          ELSE ''
                      END,
        'c', children);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._explain_tree: the lines of the tree under root_id, given the entries of its nodes.
--
-- The drawing rules:
--   * A THEN chain is flattened: its non-THEN leaves are drawn one below the other, the
--     first with the connector of the chain's place, the others with '→ ', all at the same
--     indentation. (A THEN's left side takes over the THEN's own place and connector, its
--     right side gets '→ ', which flattens nested THENs on either side.)
--   * A compound node's children are drawn in blocks, each a header line ('↻ body:',
--     '? condition:', '║ branch 2:', ...) and the child's subtree, indented 2 more, with
--     '└─' or, for a JOIN/RACE branch that is not the last, '├─'.
--   * The blocks of a node inside a chain are indented 4 more than the chain; those of a
--     node standing alone are too, except below a '├─' branch, where '│   ' continues the
--     branch line down to the next sibling.
--
-- Each row of the recursive query is one line to draw, either a node (its line is its
-- entry's, after prefix and connector) or a block header; key orders them (pre-order).
-- A valid graph (depth <= 256, <= 10,000 nodes) has fewer than 20,000 rows. Stored graphs
-- are written by users too, and one that loops back on itself would never end: the walk
-- stops one level past the depth limit and after 20,000 rows, and err says which limit.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_tree(root_id text, nodes jsonb, OUT lines text[], OUT err text)
LANGUAGE plpgsql STABLE
-- A custom plan would copy the whole node map into the plan as a constant.
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    WITH RECURSIVE tree (id, header, prefix, conn, in_chain, key, depth) AS (
        SELECT root_id, NULL::text, ''::text, ''::text, false, ARRAY[]::integer[], 0
        UNION ALL
        SELECT c.id, c.header, c.prefix, c.conn, c.in_chain, t.key || c.pos, t.depth + 1
          FROM tree t
         -- OFFSET 0: look the entry up once per row, not once per use below.
         CROSS JOIN LATERAL (SELECT nodes -> t.id AS entry OFFSET 0) AS e
         CROSS JOIN LATERAL (
                   SELECT t.prefix || CASE WHEN t.in_chain OR t.conn <> '├─' THEN '    '
                                           ELSE '│   ' END AS indent
               ) AS p
         CROSS JOIN LATERAL jsonb_array_elements(e.entry -> 'c') WITH ORDINALITY AS b (child, ord)
         CROSS JOIN LATERAL (
                   -- A THEN's sides continue its chain.
                   SELECT b.child ->> 'id', NULL::text, t.prefix,
                          coalesce(b.child ->> 'c', t.conn), true, b.ord::integer
                    WHERE e.entry ->> 't' = 'THEN'
                   UNION ALL
                   -- A block: its header, then the child below it.
                   SELECT NULL, p.indent || (b.child ->> 'h'), NULL, NULL, NULL,
                          2 * b.ord::integer - 1
                    WHERE e.entry ->> 't' <> 'THEN'
                   UNION ALL
                   SELECT b.child ->> 'id', NULL, p.indent || '  ', b.child ->> 'c', false,
                          2 * b.ord::integer
                    WHERE e.entry ->> 't' <> 'THEN'
               ) AS c (id, header, prefix, conn, in_chain, pos)
         WHERE t.id IS NOT NULL AND t.depth <= 256
    ),
    -- The recursive query runs only as far as rows are read: LIMIT stops a runaway walk.
    capped AS MATERIALIZED (
        SELECT * FROM tree LIMIT 20001
    )
    SELECT CASE
               WHEN count(*) > 20000 THEN
                   'Workflow exceeds maximum node count of 10000. Simplify the workflow or '
                   'break it into multiple instances.'
               WHEN max(t.depth) > 256 THEN
                   'Graph exceeds maximum nesting depth of 256. Simplify the workflow or '
                   'break it into multiple instances.'
           END,
           -- THEN nodes and dangling child references draw nothing.
           array_agg(l.line ORDER BY t.key) FILTER (WHERE l.line IS NOT NULL)
      INTO err, lines
      FROM capped t
     CROSS JOIN LATERAL (
               SELECT coalesce(t.header, t.prefix || t.conn || (nodes -> t.id ->> 'l')) AS line
           ) AS l;
END;
$$;

-- The final text: every line right-padded with spaces to the longest line's length (in
-- characters) plus 4, joined with newlines, no trailing newline.
CREATE OR REPLACE FUNCTION df._explain_text(lines text[]) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT string_agg(rpad(l.line, w.width), E'\n' ORDER BY l.ord)
      FROM unnest(lines) WITH ORDINALITY AS l (line, ord),
           (SELECT max(char_length(x.line)) + 4 AS width FROM unnest(lines) AS x (line)) AS w;
$$;

-- ---------------------------------------------------------------------------------------------
-- Dry run: a graph envelope, validated like df.start validates it, and drawn.
-- ---------------------------------------------------------------------------------------------

-- input as an envelope (a JSON object with a string node_type), or NULL if it is not one.
CREATE OR REPLACE FUNCTION df._explain_envelope(input text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    root jsonb;
BEGIN
    IF ltrim(input, E' \t\n\r') NOT LIKE '{%' THEN
        RETURN NULL;
    END IF;
    root := input::jsonb;
    IF jsonb_typeof(root -> 'node_type') = 'string' THEN
        RETURN root;
    END IF;
    RETURN NULL;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION df._explain_graph(root jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_check record;
    v_nodes jsonb;
    v_tree  record;
BEGIN
    -- The graph errors of df.start, returned as text rather than raised.
    v_check := df._graph_error(root);
    IF v_check.node_count > 10000 THEN
        RETURN 'Invalid durable function graph: root: Workflow exceeds maximum node count of '
            '10000. Simplify the workflow or break it into multiple instances.';
    END IF;
    IF v_check.err IS NOT NULL THEN
        RETURN format('Invalid durable function graph: %s: %s', v_check.path, v_check.err);
    END IF;

    -- The nodes as df.start would store them, each named by its position in the graph (its
    -- path of child positions: df._walk's random ids may collide, positions cannot).
    WITH visited AS MATERIALIZED (
        SELECT w.ord, w.slot, w.pos, w.keys FROM df._walk(root, NULL) AS w
    ),
    children AS (
        SELECT v.ord[1:cardinality(v.ord) - 1]::text AS parent,
               max(v.ord::text) FILTER (WHERE v.slot = 'left') AS left_id,
               max(v.ord::text) FILTER (WHERE v.slot = 'right') AS right_id,
               max(v.ord::text) FILTER (WHERE v.slot = 'condition') AS condition_id,
               array_agg(v.ord::text ORDER BY v.pos) FILTER (WHERE v.slot = 'extra') AS extra_ids
          FROM visited v
         WHERE cardinality(v.ord) > 0
         GROUP BY 1
    )
    SELECT jsonb_object_agg(v.ord::text, df._explain_entry(
               f.node_type, f.query, f.result_name, k.left_id, k.right_id, k.condition_id,
               k.extra_ids, NULL))
      INTO v_nodes
      FROM visited v
      LEFT JOIN children k ON k.parent = v.ord::text
     CROSS JOIN LATERAL (
               SELECT x.node ->> 'node_type', x.node ->> 'query', x.node ->> 'result_name'
                 FROM (SELECT root #> v.keys AS node OFFSET 0) AS x
           ) AS f (node_type, query, result_name);

    v_tree := df._explain_tree('{}', v_nodes);
    IF v_tree.err IS NOT NULL THEN
        RETURN 'Invalid durable function graph: root: ' || v_tree.err;
    END IF;
    RETURN df._explain_text(v_tree.lines);
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- Live mode: an instance of the caller's, with a header and the inferred status of every
-- node (df.instance_nodes: an untaken IF arm shows ⊘ skipped, not ○ pending).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._explain_instance(instance_id text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_instance record;
    v_output   text;
    v_nodes    jsonb;
    v_tree     record;
    v_lines    text[];
BEGIN
    -- Under row-level security: another role's instance is not found, like an unknown one.
    -- Ids are lower case; an id typed in upper case is found all the same.
    SELECT i.id, i.label, i.status, i.root_node INTO v_instance
      FROM df.instances i
     WHERE i.id = lower(instance_id);
    IF NOT FOUND THEN
        RETURN format('Instance ''%s'' not found', instance_id);
    END IF;
    -- The run's output (the root's result, or the error it failed with), which users may
    -- read for their own instances; a role granted less simply sees no Output line.
    IF has_column_privilege('df._runs', 'output', 'SELECT') THEN
        SELECT r.output INTO v_output FROM df._runs r WHERE r.instance_id = v_instance.id;
    END IF;

    SELECT jsonb_object_agg(n.node_id, df._explain_entry(
               n.node_type, n.query, n.result_name, n.left_node, n.right_node, NULL, NULL,
               n.inferred_status))
      INTO v_nodes
      FROM df.instance_nodes(v_instance.id) AS n;
    IF v_nodes IS NULL THEN
        RETURN format('No nodes found for instance ''%s''', v_instance.id);
    END IF;
    v_tree := df._explain_tree(v_instance.root_node, v_nodes);
    IF v_tree.err IS NOT NULL THEN
        RETURN 'Invalid durable function graph: root: ' || v_tree.err;
    END IF;

    -- The header. The status is df.instances', capitalised as pg_durable's engine names
    -- statuses (Running, Completed...).
    v_lines := ARRAY[
        'Instance: ' || v_instance.id
            -- Cut like the output: every line is padded to the longest, so one long label
            -- would widen them all.
            || coalesce(' (' || df._explain_cut(df._explain_flat(v_instance.label), 60, 57)
                        || ')', ''),
        'Status:   ' || CASE v_instance.status
                            WHEN 'completed' THEN '✓'
                            WHEN 'failed' THEN '✗'
                            WHEN 'cancelled' THEN '✗'
                            WHEN 'running' THEN '⏳'
                            ELSE '○'
                        END
            || ' ' || initcap(v_instance.status)];
    IF v_output IS NOT NULL THEN
        v_lines := v_lines || ('Output:   ' || df._explain_cut(df._explain_flat(v_output), 60, 57));
    END IF;
    RETURN df._explain_text(v_lines || ''::text || coalesce(v_tree.lines, '{}'));
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.explain
--
-- What the input is, after trimming white space, in this order:
--   1. exactly 8 hex digits: a live instance;
--   2. an envelope (JSON with a string node_type): a dry run of that graph;
--   3. a statement starting with a SQL keyword: a dry run of that one SQL step;
--   4. text containing ~>, |=>, ?>, !>, @> or df.: a DSL expression, evaluated as
--      `SELECT <input>` by the caller and its result explained like df.start would take it
--      (an envelope, else one SQL step);
--   5. anything else: a message saying what explain accepts.
--
-- pgdurable checks 3 before 4 (pg_durable the other way round), so that a statement that
-- happens to mention the df schema, e.g. 'SELECT count(*) FROM df.instances', is explained
-- as the SQL step it is, rather than evaluated as `SELECT SELECT ...`, which can only fail.
--
-- The expression runs in a subtransaction that is read-only and always rolled back:
-- explaining must change nothing, so `df.explain('df.start(...)')` does not start an
-- instance (it fails, as a write would), and whatever else the text contains is undone.
-- Its errors are returned as text, 'Failed to evaluate expression: <message>', like every
-- other error of df.explain (pg_durable leaves raising or returning open). Cancels and
-- statement timeouts are not caught.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.explain(input text) RETURNS text
LANGUAGE plpgsql VOLATILE STRICT SECURITY INVOKER AS $$
DECLARE
    v_input     text := btrim(input, E' \t\n\r\f');
    v_root      jsonb;
    v_value     text;
    v_evaluated boolean := false;
    v_error     text;
BEGIN
    IF v_input ~ '^[0-9a-fA-F]{8}$' THEN
        RETURN df._explain_instance(v_input);
    END IF;

    v_root := df._explain_envelope(v_input);
    IF v_root IS NOT NULL THEN
        RETURN df._explain_graph(v_root);
    END IF;

    IF v_input ~* '^(select|insert|update|delete|with)[ \t\r\n]'
       OR v_input ~* '^(create|alter|drop|call|do|truncate|grant|revoke|explain) ' THEN
        RETURN df._explain_graph(jsonb_build_object('node_type', 'SQL', 'query', v_input));
    END IF;

    IF v_input ~ '~>|\|=>|\?>|!>|@>|df\.' THEN
        BEGIN
            PERFORM pg_catalog.set_config('transaction_read_only', 'on', true);
            EXECUTE 'SELECT ' || v_input INTO v_value;
            v_evaluated := true;
            -- Roll the subtransaction back (and transaction_read_only with it); v_value stays.
            RAISE EXCEPTION 'df.explain: undo the evaluation';
        EXCEPTION WHEN OTHERS THEN
            IF NOT v_evaluated THEN
                v_error := SQLERRM;
            END IF;
        END;
        IF v_error IS NOT NULL THEN
            RETURN 'Failed to evaluate expression: ' || v_error;
        END IF;
        IF v_value IS NULL THEN
            RETURN 'Expression returned NULL';
        END IF;
        -- What df.start would make of the value: a graph, or else one SQL step.
        v_root := coalesce(df._explain_envelope(v_value),
                           jsonb_build_object('node_type', 'SQL', 'query', v_value));
        RETURN df._explain_graph(v_root);
    END IF;

    RETURN 'Cannot explain input: not a valid Durofut JSON, instance ID, SQL statement, or DSL '
        'expression.' || E'\n'
        || 'Hint: DSL expressions use df.*() functions and operators like ~>, |=>, &, |.';
END;
$$;

-- Retention: finished instances are removed after a while.
--
-- Finished instances (completed, failed, cancelled) are removed once they have been finished
-- longer than pg_durable.retention_days, or once they fall outside the newest
-- pg_durable.retention_max_instances finished ones. The worker calls df._purge_finished
-- every pg_durable.reconcile_interval seconds, with the settings it read on its own session,
-- until a call removes nothing (or the next pass is due). Each call is one short transaction
-- that removes at most one batch of instances, skips rows anyone holds, and never waits for
-- a lock: running work is never blocked by a purge.
--
-- How old is a finished instance? Not updated_at: its owner may write that column (df.cancel
-- needs it), so a user could date an instance into the future and keep it for ever.
-- completed_at is set only for completed instances (as in pg_durable), and created_at of a
-- failed or cancelled one can be much older than its end. So the engine records the moment
-- an instance became terminal in df._runs.finished_at, which users cannot write.

-- ---------------------------------------------------------------------------------------------
-- df._purge_finished: remove one batch of finished instances that are past retention.
--
--   p_retention_days  finished longer ago than this many days (0: any finished instance)
--   p_keep            besides, keep no more than the newest p_keep finished instances
--                     (ranked by finished_at, then id, newest first); 0 or NULL: no limit
--   p_batch           remove at most this many instances
--   p_max_nodes       and stop adding instances to the batch once their nodes would exceed
--                     this many (a batch has at least one instance): the work of a batch is
--                     bounded by graph size, not only by instance count
--
-- Returns how many instances it removed (0: nothing left to remove, as far as it could see),
-- or NULL if another session is purging right now. Oldest first. Deleting an instance
-- deletes its nodes, df._runs, df._tasks and df._signals rows with it (ON DELETE CASCADE on
-- every engine table, also df._executions through df._runs; a table that names an instance
-- must do the same). An instance someone holds (a late checkpoint, a df.signal being refused)
-- is skipped and removed by a later batch.
--
-- Only the worker calls it: it runs as the caller, who must own the tables (EXECUTE is not
-- granted to users).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._purge_finished(
    p_retention_days integer, p_keep integer, p_batch integer, p_max_nodes integer DEFAULT 50000)
RETURNS integer
LANGUAGE plpgsql VOLATILE
-- A cascade should never meet a lock (nobody works on finished instances), but if one does,
-- give up this batch rather than wait behind someone's long transaction.
SET search_path = pg_catalog, pg_temp SET lock_timeout = '5s' AS $$
DECLARE
    -- Everything before (v_until, v_until_id) in (finished_at, instance_id) order goes. '' is
    -- below every id, so (v_until, '') means "finished before v_until".
    v_until     timestamptz := clock_timestamp()
                               - make_interval(days => greatest(coalesce(p_retention_days, 0), 0));
    v_until_id  varchar(8) := '';
    v_kept      timestamptz;
    v_kept_id   varchar(8);
    v_batch     varchar(8)[] := '{}';
    v_nodes     bigint := 0;
    v_candidate record;
    v_removed   integer;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'df._purge_finished: batch size must be at least 1';
    END IF;
    PERFORM 1 FROM df._retention FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;  -- another session is purging
    END IF;

    IF p_keep > 0 THEN
        -- The p_keep-th newest finished instance: everything older than it goes too. A
        -- backward scan of runs_finished_idx over p_keep entries.
        SELECT r.finished_at, r.instance_id INTO v_kept, v_kept_id
          FROM df._runs r
         WHERE r.finished_at IS NOT NULL
         ORDER BY r.finished_at DESC, r.instance_id DESC
        OFFSET p_keep - 1 LIMIT 1;
        IF FOUND AND (v_kept, v_kept_id) > (v_until, v_until_id) THEN
            v_until := v_kept;
            v_until_id := v_kept_id;
        END IF;
    END IF;

    -- The oldest candidates, while their nodes fit (counted one instance at a time, an index
    -- range each: the loop reads only as far as it goes). Rows someone holds are skipped
    -- here, not only at the DELETE: a user may keep a lock on their own oldest finished
    -- instances, and a batch made of those alone would end every pass at once.
    FOR v_candidate IN
        SELECT r.instance_id,
               (SELECT count(*) FROM df.nodes n WHERE n.instance_id = r.instance_id) AS nodes
          FROM df._runs r
          JOIN df.instances i ON i.id = r.instance_id
         WHERE r.finished_at IS NOT NULL
           AND (r.finished_at, r.instance_id) < (v_until, v_until_id)
           -- Always true for rows with finished_at; checked so that nothing running can go.
           AND i.status IN ('completed', 'failed', 'cancelled')
         ORDER BY r.finished_at, r.instance_id
         LIMIT p_batch
           FOR UPDATE OF i SKIP LOCKED
    LOOP
        EXIT WHEN cardinality(v_batch) > 0 AND v_nodes + v_candidate.nodes > p_max_nodes;
        v_batch := v_batch || v_candidate.instance_id;
        v_nodes := v_nodes + v_candidate.nodes;
    END LOOP;

    WITH victim AS (
        SELECT i.id
          FROM df.instances i
         WHERE i.id = ANY (v_batch)
           AND i.status IN ('completed', 'failed', 'cancelled')
           FOR UPDATE SKIP LOCKED
    ), removed AS (
        DELETE FROM df.instances i USING victim v WHERE i.id = v.id RETURNING 1
    )
    SELECT count(*) INTO v_removed FROM removed;

    UPDATE df._retention
       SET last_purge_at = clock_timestamp(), purged = purged + v_removed;
    RETURN v_removed;
END;
$$;

REVOKE EXECUTE ON FUNCTION df._purge_finished(integer, integer, integer, integer) FROM PUBLIC;

-- Security: who may see and do what (docs/security.md has the threat model).
--
-- Row-level security keeps ordinary roles to their own rows. It does nothing against a role
-- with BYPASSRLS, and its column grants let a role set its own instance's status to
-- anything. The triggers below close both holes for every role that is neither a superuser
-- nor the owner of the df schema (the worker): such a role can write rows only under its own
-- name, and can change an instance's status only by cancelling it. df.grant_usage hands a
-- role what it needs to use pg_durable's interface, and no more.

-- ---------------------------------------------------------------------------------------------
-- Row-level security: a role sees and changes only its own rows. The owner (the worker) and
-- superusers bypass it (it is not FORCEd).
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df.instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.nodes ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.vars ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._signals ENABLE ROW LEVEL SECURITY;
ALTER TABLE df._executions ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS instances_user_isolation ON df.instances;
CREATE POLICY instances_user_isolation ON df.instances FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
DROP POLICY IF EXISTS nodes_user_isolation ON df.nodes;
CREATE POLICY nodes_user_isolation ON df.nodes FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
DROP POLICY IF EXISTS vars_user_isolation ON df.vars;
CREATE POLICY vars_user_isolation ON df.vars FOR ALL
    USING (owner = quote_ident(current_user)::regrole)
    WITH CHECK (owner = quote_ident(current_user)::regrole);

-- The monitoring functions run as the caller and read a few columns of the caller's own runs
-- and their execution history (df.grant_usage grants SELECT on those): these policies limit
-- rows to instances the caller can see in df.instances.
DROP POLICY IF EXISTS runs_user_isolation ON df._runs;
CREATE POLICY runs_user_isolation ON df._runs FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));
DROP POLICY IF EXISTS executions_user_isolation ON df._executions;
CREATE POLICY executions_user_isolation ON df._executions FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- Users only insert signals (no SELECT, UPDATE or DELETE privilege, so no policies for them;
-- signals.sql says why). The subquery runs as the inserting role, under df.instances' own
-- policy: it sees the role's own instances (superusers and BYPASSRLS roles skip this policy
-- altogether).
DROP POLICY IF EXISTS signals_sender_insert ON df._signals;
CREATE POLICY signals_sender_insert ON df._signals FOR INSERT
    WITH CHECK (sent_by = quote_ident(current_user)::regrole
                AND EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- pg_durable's readiness probe is for everybody.
GRANT USAGE ON SCHEMA _duroxide TO PUBLIC;
GRANT SELECT ON _duroxide._worker_ready TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Who is the engine: superusers and members of the df schema's owner (the worker's role, and
-- SECURITY DEFINER functions, inside which current_user is the owner). pg_has_role treats a
-- superuser as a member of every role.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._is_engine() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(current_user, n.nspowner, 'MEMBER')
      FROM pg_namespace n WHERE n.nspname = 'df';
$$;

-- ---------------------------------------------------------------------------------------------
-- Rows are written under the writer's own name. RLS's WITH CHECK already says so for ordinary
-- roles; this also holds a BYPASSRLS role to it, which could otherwise insert an instance (or
-- a signal) under another role's name and have the worker run SQL as that role, or change
-- another role's variables, which that role's next instances would substitute into its SQL.
-- TG_ARGV[0] names the identity column. The WHEN clauses keep the common case (a role writing
-- its own rows) free of a function call per row.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._refuse_forged_identity() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT df._is_engine() THEN
        RAISE EXCEPTION 'permission denied: % of a row in df.% must be the current role "%"',
            TG_ARGV[0], TG_TABLE_NAME, current_user
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER instances_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.instances
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE OR REPLACE TRIGGER nodes_identity BEFORE INSERT OR UPDATE OF submitted_by ON df.nodes
    FOR EACH ROW WHEN (NEW.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');
CREATE OR REPLACE TRIGGER signals_identity BEFORE INSERT OR UPDATE OF sent_by ON df._signals
    FOR EACH ROW WHEN (NEW.sent_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('sent_by');
-- Users may update and delete their variables, so the old owner counts as well.
CREATE OR REPLACE TRIGGER vars_identity_insert BEFORE INSERT ON df.vars
    FOR EACH ROW WHEN (NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE OR REPLACE TRIGGER vars_identity_update BEFORE UPDATE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole
                       OR NEW.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');
CREATE OR REPLACE TRIGGER vars_identity_delete BEFORE DELETE ON df.vars
    FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('owner');

-- A signal goes only to the sender's own instances. The policy on df._signals says so for
-- ordinary roles; a BYPASSRLS role skips it, and sees every instance, so the owner is compared
-- explicitly. The error is df.signal's, so another role's instance still looks missing.
CREATE OR REPLACE FUNCTION df._refuse_foreign_signal() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT df._is_engine() AND NOT EXISTS (
           SELECT 1 FROM df.instances i
            WHERE i.id = NEW.instance_id
              AND i.submitted_by = quote_ident(current_user)::regrole) THEN
        RAISE EXCEPTION 'Instance not found or access denied: %', NEW.instance_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER signals_owner BEFORE INSERT ON df._signals
    FOR EACH ROW EXECUTE FUNCTION df._refuse_foreign_signal();

-- ---------------------------------------------------------------------------------------------
-- Statuses are the engine's. Users hold UPDATE (status, updated_at) on their own instances
-- because that is how df.cancel, which runs as the caller, cancels; with it they
-- could also mark a running instance 'completed', or revive a finished one. The only change
-- left to them is the cancel of their own pending or running instance (a BYPASSRLS role sees
-- the others' too).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._refuse_status_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF df._is_engine() THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'permission denied to change the status of instance % from % to %',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A user can only cancel a pending or running instance (df.cancel); '
                     'every other status is set by the engine.';
END;
$$;

-- coalesce: for a NULL new status the condition is NULL, and the trigger would not fire.
CREATE OR REPLACE TRIGGER instances_status BEFORE UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                       AND NOT coalesce(NEW.status = 'cancelled'
                                        AND OLD.status IN ('pending', 'running')
                                        AND OLD.submitted_by
                                            = quote_ident(current_user)::regrole, false))
    EXECUTE FUNCTION df._refuse_status_change();

-- Any UPDATE of another role's instance (the engine's excepted). Ordinary roles cannot even
-- see such rows; this holds BYPASSRLS roles to the same (they could write its updated_at).
CREATE OR REPLACE TRIGGER instances_owner BEFORE UPDATE ON df.instances
    FOR EACH ROW WHEN (OLD.submitted_by IS DISTINCT FROM quote_ident(current_user)::regrole)
    EXECUTE FUNCTION df._refuse_forged_identity('submitted_by');

-- ---------------------------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------------------------

-- The grantee clause for p_role: PUBLIC for 'public' (any case, as PostgreSQL reads the
-- keyword) unless a role has exactly that name.
CREATE OR REPLACE FUNCTION df._grantee(p_role text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN lower(p_role) = 'public'
                     AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = p_role)
                THEN 'PUBLIC' ELSE format('%I', p_role) END;
$$;

-- What a role needs to build, start and watch its own workflows, in grant order. Row-level
-- security and the triggers above narrow each to the role's own rows.
CREATE OR REPLACE FUNCTION df._usage_privileges(OUT privilege text, OUT object text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE AS $$
    VALUES ('USAGE', 'SCHEMA df'),
           ('SELECT', 'df.instances'),
           -- df.cancel sets the status; the triggers allow nothing else.
           ('UPDATE (status, updated_at)', 'df.instances'),
           ('SELECT', 'df.nodes'),
           -- df.start writes the instance and its nodes as the caller.
           ('INSERT (id, label, root_node, submitted_by, database)', 'df.instances'),
           ('INSERT (id, instance_id, node_type, query, result_name, left_node, right_node, '
            'submitted_by, database)', 'df.nodes'),
           ('SELECT, INSERT, UPDATE, DELETE', 'df.vars'),
           -- The monitoring functions: the role's own runs and their execution history.
           -- (Each release that adds a privilege adds an entry of its own: a grantor that
           -- df.refresh_grants has not renewed yet can still revoke the entries it holds.)
           ('SELECT (instance_id, generation, output)', 'df._runs'),
           ('SELECT (checkpoints)', 'df._runs'),
           ('SELECT (finished_at)', 'df._runs'),
           ('SELECT', 'df._executions'),
           -- df.signal: signals to the role's own instances.
           ('INSERT (instance_id, name, data)', 'df._signals');
$$;

-- The functions whose EXECUTE is not public, by kind, with their exact signatures: HTTP
-- steps, and what administrators get (df.grant_usage(role, with_grant => true)). Functions
-- that do not exist are skipped.
CREATE OR REPLACE FUNCTION df._private_functions(kind text) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(f.sig ORDER BY f.ord), '{}')
      FROM unnest(CASE kind
                  WHEN 'http' THEN ARRAY['df.http(text,text,text,jsonb,integer)',
                                         'df.http_multipart(text,text,jsonb,jsonb,integer)']
                  WHEN 'admin' THEN ARRAY['df.grant_usage(text,boolean,boolean)',
                                          'df.revoke_usage(text)',
                                          'df.metrics()',
                                          'df.workers(interval)',
                                          'df.worker_tasks()']
                  END) WITH ORDINALITY AS f (sig, ord)
     WHERE to_regprocedure(f.sig) IS NOT NULL;
$$;

CREATE OR REPLACE FUNCTION df.grant_usage(
    p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := df._grantee(p_role);
    opt     text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
    fn      text;
    p       record;
BEGIN
    -- Refused up front what the caller cannot pass on (PostgreSQL only warns, granting
    -- nothing, for a privilege held without GRANT OPTION).
    IF NOT has_schema_privilege('df', 'USAGE WITH GRANT OPTION') THEN
        RAISE EXCEPTION 'pg_durable: "%" cannot grant df usage: it does not hold USAGE on schema df WITH GRANT OPTION',
            current_user USING ERRCODE = 'insufficient_privilege',
            HINT = 'Ask a superuser or the owner of schema df, or a role granted df.grant_usage(..., with_grant => true).';
    END IF;
    IF include_http THEN
        FOREACH fn IN ARRAY df._private_functions('http') LOOP
            IF NOT has_function_privilege(fn, 'EXECUTE WITH GRANT OPTION') THEN
                RAISE EXCEPTION 'pg_durable: "%" cannot grant HTTP access: it does not hold EXECUTE on % WITH GRANT OPTION',
                    current_user, fn USING ERRCODE = 'insufficient_privilege',
                    HINT = 'Only a superuser, the owner of schema df, or a role granted df.grant_usage(..., include_http => true, with_grant => true) can grant include_http.';
            END IF;
        END LOOP;
    END IF;

    FOR p IN SELECT * FROM df._usage_privileges() LOOP
        EXECUTE format('GRANT %s ON %s TO %s%s', p.privilege, p.object, grantee, opt);
    END LOOP;
    IF include_http THEN
        FOREACH fn IN ARRAY df._private_functions('http') LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn, grantee, opt);
        END LOOP;
    END IF;
    IF with_grant THEN
        FOREACH fn IN ARRAY df._private_functions('admin') LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s%s', fn, grantee, opt);
        END LOOP;
    END IF;
    RAISE NOTICE 'pg_durable: granted df usage privileges to "%"', p_role;
END;
$$;

-- Undo df.grant_usage. PostgreSQL's grantor rules apply: only grants made by the caller are
-- revoked, CASCADE takes along whatever the grantee passed on. A privilege the caller holds
-- nothing of (e.g. one a later version added, not yet renewed for it) it granted nothing of.
CREATE OR REPLACE FUNCTION df.revoke_usage(p_role text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grantee text := df._grantee(p_role);
    stmt    text;
BEGIN
    FOR stmt IN
        SELECT format('REVOKE EXECUTE ON FUNCTION %s FROM %s CASCADE', f.fn, grantee)
          FROM unnest(df._private_functions('http') || df._private_functions('admin')) AS f (fn)
        UNION ALL
        (SELECT format('REVOKE %s ON %s FROM %s CASCADE', p.privilege, p.object, grantee)
           FROM df._usage_privileges() WITH ORDINALITY AS p (privilege, object, ord)
          ORDER BY p.ord DESC)  -- schema usage last
    LOOP
        BEGIN
            EXECUTE stmt;
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
    END LOOP;
    RAISE NOTICE 'pg_durable: revoked df usage privileges granted by "%" from "%"',
        current_user, p_role;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df.refresh_grants: after an upgrade, give every role that was granted usage what this
-- version's df.grant_usage grants, with the same include_http and with_grant, from the same
-- grantor (so that grantor's df.revoke_usage still takes all of it away). `pgdurable install`
-- runs it after every upgrade; an administrator may run it at any time.
--
-- A grant df.grant_usage made is found through INSERT (id) on df.instances, which nothing else
-- hands out (a bare GRANT USAGE ON SCHEMA df is not widened); include_http through EXECUTE on
-- df.http from the same grantor, with_grant through the grant option. Each grant is renewed
-- as its grantor, if the caller is a member of it (a superuser is a member of every role; a
-- grant by a superuser is recorded as the schema owner's), and the caller's role is put back
-- afterwards; for any other grant the caller is told in a NOTICE which role has to run
-- df.grant_usage again.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df.refresh_grants() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g        record;
    v_caller text := current_user;
    v_role   text := current_setting('role');  -- 'none' unless the caller did SET ROLE
    v_http   oid := to_regprocedure('df.http(text,text,text,jsonb,integer)');
    v_owner  oid := (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'df');
BEGIN
    FOR g IN
        SELECT a.grantor, a.is_grantable,
               (SELECT r.rolname FROM pg_roles r WHERE r.oid = a.grantor) AS grantor_name,
               CASE WHEN a.grantee = 0 THEN 'public'
                    ELSE (SELECT r.rolname FROM pg_roles r WHERE r.oid = a.grantee) END AS role,
               EXISTS (SELECT 1 FROM pg_proc p, aclexplode(p.proacl) h
                        WHERE p.oid = v_http AND h.privilege_type = 'EXECUTE'
                          AND h.grantor = a.grantor AND h.grantee = a.grantee) AS http
          FROM pg_attribute att, aclexplode(att.attacl) a
         WHERE att.attrelid = 'df.instances'::regclass AND att.attname = 'id'
           AND a.privilege_type = 'INSERT' AND a.grantee <> v_owner
         -- The owner's grants first: delegated administrators may need theirs renewed before
         -- they can pass the new privileges on.
         ORDER BY a.grantor <> v_owner, a.grantor, a.grantee
    LOOP
        BEGIN
            IF NOT pg_has_role(v_caller, g.grantor, 'MEMBER') THEN
                RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege';
            END IF;
            PERFORM set_config('role', g.grantor_name, true);
            PERFORM df.grant_usage(g.role, g.http, g.is_grantable);
            PERFORM set_config('role', v_role, true);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pg_durable: "%" was granted df usage by "%", who must run SELECT df.grant_usage(%, %, %) again to grant what this version adds',
                g.role, g.grantor_name, quote_literal(g.role), g.http, g.is_grantable;
        END;
    END LOOP;
END;
$$;

REVOKE EXECUTE ON FUNCTION df.refresh_grants() FROM PUBLIC;

-- Administration is not for everybody: df.grant_usage(role, with_grant => true) hands it on.
REVOKE EXECUTE ON FUNCTION df.grant_usage(text, boolean, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION df.revoke_usage(text) FROM PUBLIC;
