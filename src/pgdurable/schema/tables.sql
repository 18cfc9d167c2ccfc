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

-- The node types, the one list of them in SQL: the check of new df.nodes rows, df.start's
-- validation and the builders read it. Adding a type is a migration that replaces it (and
-- the structure check in df._check_new_nodes, start.sql).
CREATE FUNCTION df._node_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'RETRY', 'TIMEOUT', 'CALL', 'MAP'];
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
    -- The statuses are checked at every write. The graph's shape (ids, types, result names,
    -- children) is checked once, when a statement inserts nodes (df._check_new_nodes,
    -- start.sql), under the same constraint names: those columns never change after, and a
    -- CHECK constraint here would be rebuilt from its stored form and evaluated again at each
    -- of the engine's status writes, several per step.
    CONSTRAINT nodes_status_chk CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    CONSTRAINT nodes_result_terminal_chk
        CHECK (result IS NULL OR status IN ('completed', 'failed'))
);

-- (The primary key, instance first, is the index by instance.)
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
    finished_at  timestamptz,
    -- How often df.restart ran it again. generation counts them too: it is the interpreter's
    -- root generation plus this (each restart is an execution of its own).
    restarts     integer NOT NULL DEFAULT 0
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
    -- The Python step a task of kind 'call' runs (docs/python.md): only a worker that has a
    -- step of this name claims it. '' for every other task, which any worker runs.
    call_name    text NOT NULL DEFAULT '',
    CONSTRAINT _tasks_kind_check
        CHECK (kind IN ('start', 'sql', 'http', 'timer', 'signal', 'call', 'restart'))
);
-- (No index on (instance_id, activation): activations are unique per instance by
-- construction, and a sequence's next step takes over its task's row (df._checkpoint), an
-- update that PostgreSQL makes in place (HOT) only if it changes no indexed column.)

CREATE INDEX tasks_instance_idx ON df._tasks (instance_id);
CREATE INDEX tasks_visible_idx ON df._tasks (visible_at);
CREATE INDEX tasks_lease_owner_idx ON df._tasks (lease_owner) WHERE lease_owner IS NOT NULL;
-- The claim walks the queues that have tasks, a queue being a role's tasks that need one
-- Python step name ('' for the rest), one index probe each; then takes the due tasks of the
-- queues it can run in order.
CREATE INDEX tasks_queue_visible_idx ON df._tasks (role_oid, call_name, visible_at);

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
-- (continue-as-new, in pg_durable's words), or because the instance failed or was cancelled
-- and df.restart ran it again. The current execution is not here: it is derived from df._runs
-- and df.instances when read, so a workflow without a root loop or a restart writes no row
-- here at all. Only the newest 1,000 of an instance are kept.
--
--   status        'ContinuedAsNew', 'Failed' or 'Cancelled'
--   started_at    the start of the instance for the first; for the others, when the one
--                 before was restarted, or else when it ended
--   finished_at   when it ended
--   first_event   df._runs.checkpoints when it began (0 for the first)
--   events        its checkpoints (the one that begins an iteration counts in the new one)
--   output        the iteration's body result; the error or NULL of a failed or cancelled one
--   restarted_at  when df.restart ran a failed or cancelled one again (NULL for the others)
CREATE TABLE df._executions (
    instance_id  varchar(8) NOT NULL REFERENCES df._runs (instance_id) ON DELETE CASCADE,
    generation   integer NOT NULL,
    status       text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    first_event  bigint NOT NULL,
    events       bigint,
    output       text,
    restarted_at timestamptz,
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
    version       text,
    -- The advisory lock the worker's listening session holds while it lives (NULL: none
    -- yet, or a worker of 0.1.0). When it is free, the worker is gone and its leases are given
    -- back at once (df._release_dead_workers) rather than when they run out.
    session_lock  bigint,
    -- The names of the Python steps the worker has (docs/python.md); empty if none.
    step_names    text[] NOT NULL DEFAULT '{}'
);

-- Who may call which Python steps (df.grant_call, security.sql). Python steps run in the
-- operator's worker, so a role calls only what an administrator allowed it. A pattern is a
-- step name, a prefix ending in '.*' ('billing.*'), or '*'. grantee 0 is PUBLIC.
CREATE TABLE df._call_grants (
    grantee     oid NOT NULL,
    pattern     text NOT NULL,
    granted_by  regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grantee, pattern)
);

-- Secrets of the engine's: 'continue_with' signs the graphs df.continue_with returns, so that a
-- step's result that merely looks like one (data read from a table or an API) is never run
-- (calls.sql). The owner's alone; made once, at install.
CREATE TABLE df._keys (
    name    text PRIMARY KEY,
    secret  text NOT NULL
);
INSERT INTO df._keys (name, secret)
VALUES ('continue_with', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));


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
