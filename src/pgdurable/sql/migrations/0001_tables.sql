-- pgdurable schema, version 1: the tables.
--
-- Public tables (df.instances, df.nodes, df.vars) follow the df interface spec §2 column for
-- column. Engine state lives in tables whose names start with an underscore; users get no
-- privileges on them (see docs/engine.md for what each holds).
--
-- Runs as the installing role, which becomes the owner of everything here. The owner bypasses
-- row-level security (it is not FORCEd), which is how the worker does its bookkeeping.

CREATE SCHEMA IF NOT EXISTS df;
REVOKE ALL ON SCHEMA df FROM PUBLIC;

CREATE TABLE df._migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------
-- Instances: one row per df.start().
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df.instances (
    id            varchar(8) PRIMARY KEY,
    label         text,
    root_node     varchar(8) NOT NULL,
    status        text DEFAULT 'pending',
    submitted_by  regrole NOT NULL,
    database      text,
    created_at    timestamptz DEFAULT now(),
    updated_at    timestamptz DEFAULT now(),
    completed_at  timestamptz,
    CONSTRAINT instances_identity_key UNIQUE (id, submitted_by)
);

ALTER TABLE df.instances
    ADD CONSTRAINT instances_id_hex8_chk CHECK (id ~ '^[0-9a-f]{8}$') NOT VALID,
    ADD CONSTRAINT instances_root_node_hex8_chk CHECK (root_node ~ '^[0-9a-f]{8}$') NOT VALID,
    ADD CONSTRAINT instances_status_chk
        CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')) NOT VALID;

CREATE INDEX instances_status_created_idx ON df.instances (status, created_at DESC, id);
CREATE INDEX instances_created_idx ON df.instances (created_at DESC, id);
CREATE INDEX instances_label_created_idx ON df.instances (label, created_at DESC, id)
    WHERE label IS NOT NULL;

-- ---------------------------------------------------------------------------------------------
-- Nodes: the stored graph, one row per node, children referenced by id (spec §2.3, §6.3).
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
    error           text,
    submitted_by    regrole,
    database        text,
    created_at      timestamptz DEFAULT now(),
    updated_at      timestamptz DEFAULT now(),
    status_details  jsonb,
    PRIMARY KEY (instance_id, id),
    CONSTRAINT nodes_id_hex8_chk CHECK (id ~ '^[0-9a-f]{8}$'),
    CONSTRAINT nodes_children_hex8_chk CHECK (
        (left_node IS NULL OR left_node ~ '^[0-9a-f]{8}$')
        AND (right_node IS NULL OR right_node ~ '^[0-9a-f]{8}$')),
    CONSTRAINT nodes_type_chk CHECK (node_type IN (
        'SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
        'HTTP', 'HTTP_MULTIPART', 'SIGNAL')),
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
        ELSE left_node IS NULL AND right_node IS NULL AND query IS NOT NULL
    END)
);

CREATE INDEX nodes_instance_idx ON df.nodes (instance_id);

-- Parent rows are inserted before their children and the instance before its root node, all
-- in one transaction, so the graph's foreign keys are checked at commit.
ALTER TABLE df.instances
    ADD CONSTRAINT instances_root_node_fkey FOREIGN KEY (id, root_node)
        REFERENCES df.nodes (instance_id, id) DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE df.nodes
    ADD CONSTRAINT nodes_instance_fkey FOREIGN KEY (instance_id, submitted_by)
        REFERENCES df.instances (id, submitted_by) ON DELETE CASCADE
        DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT nodes_left_fkey FOREIGN KEY (instance_id, left_node)
        REFERENCES df.nodes (instance_id, id) DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT nodes_right_fkey FOREIGN KEY (instance_id, right_node)
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
-- Row-level security: a role sees and changes only its own rows (spec §2.6). The owner (the
-- worker) and superusers bypass it.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df.instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.nodes ENABLE ROW LEVEL SECURITY;
ALTER TABLE df.vars ENABLE ROW LEVEL SECURITY;

CREATE POLICY instances_user_isolation ON df.instances FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
CREATE POLICY nodes_user_isolation ON df.nodes FOR ALL
    USING (submitted_by = quote_ident(current_user)::regrole)
    WITH CHECK (submitted_by = quote_ident(current_user)::regrole);
CREATE POLICY vars_user_isolation ON df.vars FOR ALL
    USING (owner = quote_ident(current_user)::regrole)
    WITH CHECK (owner = quote_ident(current_user)::regrole);

-- ---------------------------------------------------------------------------------------------
-- Engine state. No grants: only the owner (the worker) and SECURITY DEFINER functions touch it.
-- ---------------------------------------------------------------------------------------------

-- The interpreter state of each instance, written by every checkpoint.
CREATE TABLE df._runs (
    instance_id  varchar(8) PRIMARY KEY REFERENCES df.instances (id) ON DELETE CASCADE,
    vars         jsonb NOT NULL DEFAULT '{}',  -- the submitter's df.vars at start
    state        jsonb,                        -- NULL until a worker loaded the graph
    generation   integer NOT NULL DEFAULT 1,   -- root execution number (loop iterations)
    output       text,                         -- root result (completed) or error (failed)
    checkpoints  bigint NOT NULL DEFAULT 0     -- how many checkpoints were committed
);

-- Monitoring functions run as the caller and read generation/output of the caller's own
-- instances: df.grant_usage grants SELECT on those columns only, and this policy limits rows
-- to instances the caller can see in df.instances.
ALTER TABLE df._runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY runs_user_isolation ON df._runs FOR SELECT
    USING (EXISTS (SELECT 1 FROM df.instances i WHERE i.id = instance_id));

-- Work to do. A task is claimable when visible_at has passed: new tasks at once, timers at
-- their deadline, leased tasks when the lease runs out (a worker that dies simply stops
-- extending it). Each claim draws a fresh token; only the holder of the current token can
-- checkpoint the task, which fences out a worker whose lease was taken over.
CREATE TABLE df._tasks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  varchar(8) NOT NULL REFERENCES df.instances (id) ON DELETE CASCADE,
    activation   integer NOT NULL,             -- the interpreter activation it belongs to
    kind         text NOT NULL CHECK (kind IN ('start', 'sql', 'timer')),
    node_id      varchar(8),
    payload      jsonb,                        -- kind 'sql': {"sql": <substituted text>}
    visible_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner  uuid,
    token        uuid,
    attempts     integer NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (instance_id, activation)
);

CREATE INDEX tasks_visible_idx ON df._tasks (visible_at);
CREATE INDEX tasks_lease_owner_idx ON df._tasks (lease_owner) WHERE lease_owner IS NOT NULL;

-- Live workers. Spec §2.5 names this table; pgdurable runs any number of workers, so each
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

-- Compatibility with pg_durable's readiness probe (spec §9.8).
CREATE SCHEMA IF NOT EXISTS _duroxide;
CREATE TABLE _duroxide._worker_ready (
    sentinel        boolean PRIMARY KEY DEFAULT true CHECK (sentinel),
    schema_version  integer NOT NULL,
    initialized_at  timestamptz NOT NULL DEFAULT now()
);
GRANT USAGE ON SCHEMA _duroxide TO PUBLIC;
GRANT SELECT ON _duroxide._worker_ready TO PUBLIC;
