-- The engine: how a workflow advances, one checkpoint at a time.
--
-- The flow of one workflow through this file (start.sql and signals.sql hold the rest):
--
--   df.start                        INSERT df.instances, df.nodes (caller's transaction)
--     trigger instances_created     df._runs row, df.vars snapshot, the 'start' task, NOTIFY
--   df._claim                       a worker leases due tasks, shared fairly between roles;
--                                   a start task comes with what starting needs
--                                   (df._start_facts: the graph, the submitter, variables)
--   for each task, one transaction:
--     df._checkpoint_begin          is the task still ours? lock the instance, return its
--                                   state and the time (skipped by a step its worker's last
--                                   checkpoint leased it as the instance's only task: the
--                                   worker knows the state; df._checkpoint checks its version)
--     the step itself               SQL on a connection logged in as the submitter, in this
--                                   same transaction; or an HTTP response, a timer that
--                                   fired, a signal (df._consume_signal)
--     df._checkpoint                write the nodes' results, the new state and new tasks;
--                                   retire the task; lease the steps that follow to this
--                                   worker; stamp when nodes started, record an execution a
--                                   root loop ended; on the last, the instance's status,
--                                   output and end
--     df._reset_session             a SQL step's session as it found it
--     COMMIT                        the step's effect and its record, together
--   a start whose first step is a SQL step runs both in one such transaction (for a graph
--     too large for the claim, the token read first without a lock: df._task_facts), the
--     instance locked only before df._checkpoint;
--     a long one is shown running meanwhile (df._show_started)
--   SQL steps of one role ready at once share one such transaction (the worker's batches):
--     each statement and df._reset_session, then the df._checkpoint_begin of each, then
--     each df._checkpoint, one COMMIT
--   df._release_dead_workers        the tasks of a worker whose session ended are due again
--   df.cancel → trigger instances_cancelled: the tasks go, NOTIFY pgdurable_cancel
--   df.restart → trigger instances_restarted: the ended run joins the execution history, a
--                                   'restart' task (the worker resumes the state the
--                                   instance kept: interpreter.resume), NOTIFY
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
--
-- The workers are not woken when a task of the same role has been due for 50 ms already:
-- then they are all busy, and claim again as each slot frees. A NOTIFY costs more than its
-- message: PostgreSQL serializes the commits of the transactions that sent one, WAL flush
-- included, so concurrent starts each waited for the one before (bench/README.md: 30% of
-- their rate at 16 clients). The check is one probe of an index.
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
    IF coalesce((SELECT min(t.visible_at) FROM df._tasks t
                  WHERE t.role_oid = NEW.submitted_by AND t.call_name = '')
                >= now() - interval '50 milliseconds', true) THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
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

-- df.restart() sets a failed or cancelled instance's status back to 'running'
-- (client.sql): the run that ended goes into the execution history as 'Failed' or
-- 'Cancelled', with its output; the instance counts one more execution and one more restart,
-- is no longer finished (retention leaves it alone), and gets a 'restart' task, which a
-- worker claims like any other: it runs on the interpreter state the instance kept when it
-- ended (for a failure, the state just before it; none: from the beginning). (df.restart
-- runs as the user, who may not write df._runs, df._executions or df._tasks.)
CREATE OR REPLACE FUNCTION df._instance_restarted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_generation integer;
BEGIN
    DELETE FROM df._tasks WHERE instance_id = NEW.id;  -- none is left, short of a bug
    INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,
                                first_event, events, output, restarted_at)
    SELECT r.instance_id, r.generation, initcap(OLD.status),
           coalesce(p.restarted_at, p.finished_at, NEW.created_at, clock_timestamp()),
           coalesce(r.finished_at, clock_timestamp()),
           coalesce(p.first_event + p.events, 0),
           r.checkpoints - coalesce(p.first_event + p.events, 0),
           r.output, clock_timestamp()
      FROM df._runs r
      LEFT JOIN df._executions p
             ON p.instance_id = r.instance_id AND p.generation = r.generation - 1
     WHERE r.instance_id = NEW.id
    ON CONFLICT (instance_id, generation) DO NOTHING;
    UPDATE df._runs r
       SET generation = r.generation + 1, restarts = r.restarts + 1, output = NULL,
           finished_at = NULL
     WHERE r.instance_id = NEW.id
    RETURNING r.generation INTO v_generation;
    DELETE FROM df._executions e
     WHERE e.instance_id = NEW.id AND e.generation <= v_generation - 1000;
    INSERT INTO df._tasks (instance_id, role_oid, activation, kind)
    VALUES (NEW.id, NEW.submitted_by, 0, 'restart');
    PERFORM pg_notify('pgdurable_tasks', '');
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION df._instance_restarted() FROM PUBLIC;

CREATE OR REPLACE TRIGGER instances_restarted AFTER UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IN ('failed', 'cancelled'))
    EXECUTE FUNCTION df._instance_restarted();

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

-- df._task_facts: what df._checkpoint_begin returns, without locking anything: for a start
-- whose first step runs in the same transaction (worker/steps.py), which must not hold the
-- instance's lock while the step's statement runs (df.cancel would wait for it). That
-- transaction calls df._checkpoint_begin, to lock, just before df._checkpoint.
CREATE OR REPLACE FUNCTION df._task_facts(p_task bigint, p_token uuid)
RETURNS TABLE (instance_status text, state jsonb, vars jsonb, now double precision,
               role_exists boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT i.status, r.state, r.vars, extract(epoch FROM clock_timestamp())::float8,
           EXISTS (SELECT 1 FROM pg_roles WHERE oid = i.submitted_by)
      FROM df._tasks t
      JOIN df.instances i ON i.id = t.instance_id
      JOIN df._runs r ON r.instance_id = t.instance_id
     WHERE t.id = p_task AND t.token = p_token;
$$;

-- df._show_started: what a start wrote, shown before it commits. A start whose first step runs
-- in the same transaction commits when the step does; a worker calls this, on a connection of
-- its own, once the step has run for a while, so that monitoring shows the instance and the
-- nodes the start began (p_nodes, their ids) as running rather than pending meanwhile. Only
-- pending rows change: whatever committed first (the start itself, a cancel) wins.
CREATE OR REPLACE FUNCTION df._show_started(p_task bigint, p_token uuid, p_nodes text[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
DECLARE
    v_instance varchar(8);
BEGIN
    SELECT t.instance_id INTO v_instance FROM df._tasks t WHERE t.id = p_task AND t.token = p_token;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE df.instances i SET status = 'running', updated_at = clock_timestamp()
     WHERE i.id = v_instance AND i.status = 'pending';
    UPDATE df.nodes n
       SET status = 'running', started_at = clock_timestamp(), updated_at = clock_timestamp()
     WHERE n.instance_id = v_instance AND n.id = ANY (p_nodes) AND n.status = 'pending';
END;
$$;
REVOKE ALL ON FUNCTION df._show_started(bigint, uuid, text[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._checkpoint: apply one interpreter transition and retire the task that caused it.
--
-- p_change is the transition as JSON, the contract written down in worker/change.py:
--   state            the new interpreter state (stored as is, never read here)
--   generation       root execution number (the interpreter's; df._runs.generation adds
--                    the instance's restarts to it, and so do the history's rows)
--   writes           [{"id", "status", "result" (JSON text or null), "execution_id",
--                      "error_op" ('set' | 'append' | null), "error", "started" (it became
--                      running)}], one per node
--   tasks            [{"activation", "kind", "node_id", "payload", "run_at" (epoch s or null)}]
--   dropped          activation numbers whose tasks are abandoned (RACE losers)
--   outcome          null, or {"status": "completed"|"failed", "output": text}
--   ended_execution  null, or {"generation", "output"}: a root loop began its next iteration
--   version          null, or the checkpoint count the state was computed after (below)
--   nodes, continued absent, or the nodes a step's result added (df.continue_with, in
--                    calls.sql) and the steps they run in place of
--   callable         absent, or the Python steps among the tasks that p_worker has
-- Up to p_claim of the new SQL and HTTP tasks that can run now (and Python steps the worker
-- has: p_change's "callable") are leased to p_worker for p_lease_seconds and returned, with
-- the instance's checkpoint count after this one, so the worker goes on with them without
-- another claim.
--
-- A version means the worker did not call df._checkpoint_begin: it knew the state from its
-- own checkpoint that leased it this task, the instance's only task then (a sequence; no
-- JOIN, RACE, loop, retry or timeout running). Nothing else can have checkpointed the
-- instance meanwhile, and the token proves the task is still ours; the count is checked all
-- the same (PD002, and the worker runs the step again the usual way). Such a checkpoint
-- locks the instance only when it writes df.instances (the outcome), and first, as
-- df._checkpoint_begin would (lock order); the others write only rows of the engine's.
--
-- Both checkpoint functions stay executable by PUBLIC: a step's connection is logged in as
-- the submitting role, whoever that is. The task's token, which the user's SQL never sees, is
-- the guard.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._checkpoint(
    p_task bigint, p_token uuid, p_change jsonb,
    p_worker uuid, p_claim integer, p_lease_seconds double precision)
RETURNS TABLE (task_id bigint, token uuid, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, kind text, checkpoints integer)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '500ms' AS $$
DECLARE
    v_instance varchar(8);
    v_version  integer := (p_change ->> 'version')::integer;
    v_count    integer;   -- the instance's checkpoints, this one included
    v_role     oid;       -- the submitter, carried from task to task
    v_outcome  jsonb := nullif(p_change -> 'outcome', 'null'::jsonb);
    v_ended    jsonb := nullif(p_change -> 'ended_execution', 'null'::jsonb);
    v_unclaimed integer;
    v_elsewhere integer;  -- Python steps queued for workers that have them
    v_first    boolean;   -- the instance's first checkpoint: it is running from now on
    v_now      timestamptz := clock_timestamp();  -- the nodes' one time (started <= updated)
    v_notified integer;   -- the count that makes each cancel notification run
    v_restarts integer;   -- df.restart's: executions the interpreter does not count
    -- The Python steps the caller has, of those queued here: they may be leased to it.
    v_callable jsonb := coalesce(p_change -> 'callable', '[]');
    -- The one next task, when this checkpoint leases it to the caller (a sequence's next
    -- step): it takes over this task's row rather than a new one.
    v_next     jsonb := CASE WHEN p_claim > 0
                              AND jsonb_array_length(p_change -> 'tasks') = 1
                              AND jsonb_array_length(p_change -> 'dropped') = 0
                              AND (p_change #>> '{tasks,0,kind}' IN ('sql', 'http')
                                   OR (p_change #>> '{tasks,0,kind}' = 'call'
                                       AND v_callable ? (p_change #>> '{tasks,0,payload,name}')))
                              AND jsonb_typeof(p_change #> '{tasks,0,run_at}')
                                  IS DISTINCT FROM 'number'
                         THEN p_change #> '{tasks,0}' END;
    v_reused   df._tasks;
BEGIN
    IF v_version IS NOT NULL AND v_outcome IS NOT NULL THEN
        SELECT t.instance_id INTO v_instance
          FROM df._tasks t WHERE t.id = p_task AND t.token = p_token;
        PERFORM 1 FROM df.instances i WHERE i.id = v_instance FOR NO KEY UPDATE;
    END IF;
    IF v_next IS NOT NULL THEN
        -- One row version, often without new index entries (tables.sql), instead of a deleted
        -- row and a new one (with its index entries, its foreign key check and its id drawn).
        UPDATE df._tasks t
           SET activation = (v_next ->> 'activation')::integer,
               kind = v_next ->> 'kind',
               node_id = v_next ->> 'node_id',
               payload = v_next -> 'payload',
               -- The lease as it is while at least half of it is left (the heartbeat
               -- extends it): an update that changes no indexed column can be HOT.
               visible_at = CASE
                   WHEN t.visible_at >= clock_timestamp() + make_interval(secs => p_lease_seconds / 2)
                   THEN t.visible_at
                   ELSE clock_timestamp() + make_interval(secs => p_lease_seconds)
               END,
               lease_owner = p_worker,
               token = gen_random_uuid(),
               attempts = 1,
               deferrals = 0,
               created_at = clock_timestamp(),
               -- '' for a SQL or HTTP step: unchanged, so still HOT.
               call_name = CASE WHEN v_next ->> 'kind' = 'call'
                                THEN v_next #>> '{payload,name}' ELSE '' END
         WHERE t.id = p_task AND t.token = p_token
        RETURNING t.* INTO v_reused;
        v_instance := v_reused.instance_id;
        v_role := v_reused.role_oid;
    ELSE
        DELETE FROM df._tasks t WHERE t.id = p_task AND t.token = p_token
        RETURNING t.instance_id, t.role_oid INTO v_instance, v_role;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgdurable: task % is no longer held by this worker', p_task
            USING ERRCODE = 'PD001',
                  HINT = 'Its lease expired and another worker took it, or the instance was '
                         'cancelled. The step is rolled back.';
    END IF;

    -- A step returned the rest of the workflow (df.continue_with): its nodes join the graph,
    -- checked by the worker as df.start checks a graph (and by df._check_new_nodes), and the
    -- step points at what runs in its place, for monitoring to draw.
    IF p_change ? 'nodes' THEN
        INSERT INTO df.nodes (id, instance_id, node_type, query, result_name, left_node,
                              right_node, submitted_by, database)
        SELECT x.id, v_instance, x.node_type, x.query, x.result_name, x.left_node, x.right_node,
               i.submitted_by, i.database
          FROM jsonb_to_recordset(p_change -> 'nodes')
               AS x(id varchar(8), node_type text, query text, result_name text,
                    left_node varchar(8), right_node varchar(8))
          JOIN df.instances i ON i.id = v_instance;
        UPDATE df.nodes n SET left_node = c.left_node
          FROM jsonb_to_recordset(p_change -> 'continued') AS c(id varchar(8), left_node varchar(8))
         WHERE n.instance_id = v_instance AND n.id = c.id;
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
           updated_at = v_now,
           -- Whenever it becomes running (again, in each loop iteration or retried attempt),
           -- for the durations monitoring shows; also when it ended in the same change (a
           -- worker of 0.1.0 does not say: its running ones).
           started_at = CASE WHEN coalesce(w.started, w.status = 'running')
                                  AND n.status IS DISTINCT FROM 'running'
                             THEN v_now ELSE n.started_at END
      FROM jsonb_to_recordset(p_change -> 'writes')
           AS w(id varchar(8), status text, result text, execution_id text, error_op text,
                error text, started boolean)
     WHERE n.instance_id = v_instance AND n.id = w.id
       -- The written nodes alone are read, by the primary key: a checkpoint costs the same in
       -- a graph of ten nodes as in one of ten thousand.
       AND n.id = ANY (ARRAY(SELECT jsonb_array_elements(p_change -> 'writes') ->> 'id'));

    -- An execution a root loop ended goes into the history before df._runs counts this
    -- checkpoint, which belongs to the next execution. It began when the one before it ended
    -- or was restarted (or with the instance), at that one's last checkpoint count (or 0).
    -- Its number counts the instance's restarts too. Only the newest 1,000 of an instance
    -- are kept.
    IF v_ended IS NOT NULL THEN
        SELECT r.restarts INTO v_restarts FROM df._runs r WHERE r.instance_id = v_instance;
        INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,
                                    first_event, events, output)
        SELECT v_instance, g.generation, 'ContinuedAsNew',
               coalesce(p.restarted_at, p.finished_at, i.created_at, clock_timestamp()),
               clock_timestamp(),
               coalesce(p.first_event + p.events, 0),
               r.checkpoints - coalesce(p.first_event + p.events, 0), v_ended ->> 'output'
          FROM (SELECT (v_ended ->> 'generation')::integer + v_restarts AS generation) AS g
          JOIN df.instances i ON i.id = v_instance
          JOIN df._runs r ON r.instance_id = v_instance
          LEFT JOIN df._executions p
                 ON p.instance_id = v_instance AND p.generation = g.generation - 1
        ON CONFLICT (instance_id, generation) DO NOTHING;
        DELETE FROM df._executions e
         WHERE e.instance_id = v_instance
           AND e.generation <= (p_change ->> 'generation')::integer + v_restarts - 1000;
    END IF;

    UPDATE df._runs r
       SET state = p_change -> 'state',
           generation = coalesce((p_change ->> 'generation')::integer + r.restarts,
                                 r.generation),
           output = CASE WHEN v_outcome IS NULL THEN r.output ELSE v_outcome ->> 'output' END,
           -- When the instance ended: retention dates it by this.
           finished_at = CASE WHEN v_outcome IS NULL THEN r.finished_at
                              ELSE coalesce(r.finished_at, clock_timestamp()) END,
           checkpoints = r.checkpoints + 1
     WHERE r.instance_id = v_instance
       AND (v_version IS NULL OR r.checkpoints = v_version)
    RETURNING r.checkpoints = 1, r.checkpoints INTO v_first, v_count;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgdurable: instance % moved on since checkpoint %', v_instance, v_version
            USING ERRCODE = 'PD002',
                  HINT = 'The worker computed this step''s change from an older state. The '
                         'step is rolled back and runs again.';
    END IF;

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

    IF v_first THEN  -- the start's checkpoint
        UPDATE df.instances i SET status = 'running', updated_at = clock_timestamp()
         WHERE i.id = v_instance AND i.status = 'pending';
    END IF;

    -- Abandoned work (RACE losers): its tasks go, and a worker running one of their
    -- statements is told to cancel it (delivered only if this transaction commits).
    IF jsonb_array_length(p_change -> 'dropped') > 0 THEN
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
    END IF;

    IF jsonb_array_length(p_change -> 'tasks') = 0 THEN
        RETURN;
    END IF;
    IF v_next IS NOT NULL THEN
        RETURN QUERY SELECT v_reused.id, v_reused.token, v_reused.activation, v_reused.node_id,
                            v_reused.payload, v_reused.attempts, v_reused.kind, v_count;
        RETURN;
    END IF;
    RETURN QUERY
    WITH leasable AS (
        SELECT n.*,
               (n.kind IN ('sql', 'http') OR (n.kind = 'call' AND v_callable ? (n.payload ->> 'name')))
               AND n.run_at IS NULL AS now_here
          FROM jsonb_to_recordset(p_change -> 'tasks')
               AS n(activation integer, kind text, node_id varchar(8), payload jsonb,
                    run_at double precision)
    ), new_task AS (
        SELECT n.activation, n.kind, n.node_id, n.payload, n.run_at,
               n.now_here
               AND row_number() OVER (PARTITION BY n.now_here ORDER BY n.activation) <= p_claim
                   AS claimed
          FROM leasable n
    ), inserted AS (
        INSERT INTO df._tasks AS t
               (instance_id, role_oid, activation, kind, node_id, payload, visible_at,
                lease_owner, token, attempts, call_name)
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
               CASE WHEN n.claimed THEN 1 ELSE 0 END,
               CASE WHEN n.kind = 'call' THEN coalesce(n.payload ->> 'name', '') ELSE '' END
          FROM new_task n
        RETURNING t.id, t.token, t.activation, t.node_id, t.payload, t.attempts, t.lease_owner,
                  t.visible_at, t.kind
    )
    SELECT i.id, i.token, i.activation, i.node_id, i.payload, i.attempts, i.kind, v_count
      FROM inserted i
     WHERE i.lease_owner IS NOT NULL;

    -- Wake idle workers only for work nobody holds yet; timers are found by polling. A Python
    -- step this worker does not have is for another worker.
    IF jsonb_array_length(p_change -> 'tasks') > p_claim
       OR jsonb_path_exists(p_change, '$.tasks[*] ? (@.kind == "call")') THEN
        SELECT count(*) FILTER (WHERE n.run_at IS NULL
                                  AND (n.kind IN ('sql', 'http')
                                       OR (n.kind = 'call' AND v_callable ? n.name))),
               count(*) FILTER (WHERE n.run_at IS NULL AND n.kind = 'call'
                                  AND NOT v_callable ? n.name)
          INTO v_unclaimed, v_elsewhere
          FROM (SELECT x.kind, x.run_at, x.payload ->> 'name' AS name
                  FROM jsonb_to_recordset(p_change -> 'tasks')
                       AS x(kind text, run_at double precision, payload jsonb)) n;
        IF v_unclaimed > p_claim OR v_elsewhere > 0 THEN
            PERFORM pg_notify('pgdurable_tasks', '');
        END IF;
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._release_dead_workers: give back at once the leases of workers whose session ended.
--
-- A lease is how long others leave a claimed task alone; it runs out 30 s after the last
-- heartbeat of a worker that was killed. But a worker's death is visible sooner: its
-- listening session holds an advisory lock (df._worker_epoch.session_lock) until it ends,
-- which PostgreSQL sees at once when the process dies (its socket closes). Every worker calls
-- this a few times a second: a lock it can take is a dead worker's, whose tasks become due now
-- and whose token is voided, and its row goes once it holds nothing. A worker that only froze
-- (SIGSTOP, a stalled VM) keeps its session, so its leases run out as before.
--
-- Giving a task back early never runs a step twice: a step commits only with its task's
-- current token, and the dead worker's open transactions roll back when PostgreSQL notices
-- their client is gone. Any role can take any advisory lock; one that takes a dead worker's
-- makes it look alive, which only leaves its tasks to their leases.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._release_dead_workers() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_worker   uuid;
    v_count    integer;
    v_released integer := 0;
BEGIN
    FOR v_worker IN
        SELECT w.epoch_id FROM df._worker_epoch w
         WHERE w.session_lock IS NOT NULL
           AND pg_try_advisory_xact_lock_shared(w.session_lock)
    LOOP
        -- Rows a checkpoint holds are being retired: skipped, as the heartbeat does.
        UPDATE df._tasks t
           SET visible_at = clock_timestamp(), lease_owner = NULL, token = NULL
          FROM (SELECT d.id FROM df._tasks d WHERE d.lease_owner = v_worker
                 ORDER BY d.id FOR UPDATE SKIP LOCKED) dead
         WHERE t.id = dead.id;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        v_released := v_released + v_count;
        DELETE FROM df._worker_epoch w
         WHERE w.epoch_id = v_worker
           AND NOT EXISTS (SELECT 1 FROM df._tasks t WHERE t.lease_owner = v_worker);
    END LOOP;
    IF v_released > 0 THEN
        PERFORM pg_notify('pgdurable_tasks', '');
    END IF;
    RETURN v_released;
END;
$$;
REVOKE ALL ON FUNCTION df._release_dead_workers() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._reset_session: what DISCARD ALL does, in one call allowed inside a transaction block, so
-- a SQL step resets its session in the transaction that commits it rather than in one more
-- round trip. A step may SET things, SET ROLE to a role it is a member of, create temp tables,
-- LISTEN, PREPARE or take advisory locks; none of that may reach the next step on the same
-- connection. Two things it cannot do: close cursors (a function may not; the worker sends
-- CLOSE ALL beside it) and DISCARD PLANS, which is not wanted anyway: PostgreSQL would plan
-- the checkpoint functions' statements again for every step, and no plan depends on the
-- session once temp tables and settings are reset. Nor does it deallocate every prepared
-- statement, as DISCARD ALL would: the worker's own are kept.
--
-- Run as the step's role: no SECURITY DEFINER, which SET SESSION AUTHORIZATION refuses; and no
-- SET clause, whose value would be restored on return, undoing RESET ALL's. So every name in
-- it is schema-qualified: the caller's search_path is whatever the step left.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._reset_session() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_name text;
BEGIN
    SET SESSION AUTHORIZATION DEFAULT;
    RESET ALL;
    UNLISTEN *;
    PERFORM pg_catalog.pg_advisory_unlock_all();
    DISCARD TEMP;
    DISCARD SEQUENCES;
    -- What the step's SQL prepared (PREPARE), not the worker's own statements, which it
    -- prepares at the protocol level and keeps for the next step.
    FOR v_name IN SELECT p.name FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql LOOP
        EXECUTE pg_catalog.format('DEALLOCATE %I', v_name);
    END LOOP;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- df._waiting_queues: the queues with due tasks nobody holds (a leased task is due only once
-- its lease ran out) that a worker having the Python steps p_names can run. A queue is a
-- role's tasks that need one step name (df._tasks.call_name; '' for tasks any worker runs).
-- The queues that have tasks are found by a loose index scan (one probe of
-- tasks_queue_visible_idx per queue, none at all when nothing is due), and those whose oldest
-- task is due kept. Every test is an index probe (min() of an indexed column reads one entry),
-- so the cost does not grow with the backlog: a semi-join or EXISTS here would let the
-- planner read every due task of every role, milliseconds with a backlog of thousands.
-- ---------------------------------------------------------------------------------------------
-- (No SET clause: PostgreSQL then inlines it into df._claim's query and plans them as one.)
CREATE OR REPLACE FUNCTION df._waiting_queues(p_names text[])
RETURNS TABLE (role_oid oid, call_name text)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE queues (role_oid, call_name) AS (
        (SELECT t.role_oid, t.call_name FROM df._tasks t
          WHERE (SELECT min(d.visible_at) FROM df._tasks d) <= now()
          ORDER BY t.role_oid, t.call_name LIMIT 1)
        UNION ALL
        SELECT n.role_oid, n.call_name
          FROM queues q
         CROSS JOIN LATERAL (
               SELECT t.role_oid, t.call_name FROM df._tasks t
                WHERE (t.role_oid, t.call_name) > (q.role_oid, q.call_name)
                ORDER BY t.role_oid, t.call_name LIMIT 1) n
    )
    SELECT q.role_oid, q.call_name FROM queues q
     WHERE (q.call_name = '' OR q.call_name = ANY (p_names))
       AND (SELECT min(t.visible_at) FROM df._tasks t
             WHERE t.role_oid = q.role_oid AND t.call_name = q.call_name) <= now();
$$;
REVOKE ALL ON FUNCTION df._waiting_queues(text[]) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._claim: lease up to p_limit due tasks to worker p_worker, shared fairly between roles.
-- A task of a Python step is leased only to a worker that has it (p_names: the worker's).
--
-- The free slots go to the roles with due tasks (df._waiting_queues) like water: the level is
-- what each would hold if the free slots and those the roles hold already (p_held_roles,
-- p_held_slots: this worker's) were shared evenly, and each role offers its due tasks, oldest
-- first (of each of its queues, merged), up to that level and under p_cap, locking them as it
-- goes (SKIP LOCKED: workers claiming at once take different tasks). The offers are taken in turns: a role's n-th offer
-- has turn held + n, so the slots go to the roles holding the fewest, and a lone role gets
-- every slot. Offers not taken (the level is rounded up) stay locked until the claim commits,
-- a moment later.
--
-- Two statements: the picking, then the lease of what was picked, by id. As one statement,
-- the planner's guess of how many tasks the picking yields (it cannot know the limits) could
-- turn the lease into a hash join over every task and every instance.
--
-- A function rather than statements of the worker's: PostgreSQL would plan them again at
-- every call, for their parameter values, which costs more than running them; here the plans
-- are made once per session.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._claim(p_worker uuid, p_limit integer, p_lease double precision,
                          p_cap integer, p_held_roles oid[], p_held_slots integer[],
                          p_names text[])
RETURNS TABLE (id bigint, token uuid, kind text, activation integer, node_id varchar(8),
               payload jsonb, attempts integer, instance_id varchar(8), role text,
               role_oid oid, database text, label text, created_at timestamptz,
               deferrals integer, start jsonb, waited double precision, lease_expired boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_picked bigint[];
    -- Of each task picked, as it was before the claim: when it became due (visible_at), and
    -- whether a lease of another claim had run out on it. The worker's metrics report both
    -- (waited: seconds from due to this claim; docs/monitoring.md#prometheus-metrics).
    v_due    timestamptz[];
    v_leased boolean[];
BEGIN
    WITH due AS (
        SELECT w.role_oid, array_agg(w.call_name) AS queues, coalesce(max(h.slots), 0) AS held
          FROM df._waiting_queues(p_names) AS w
          LEFT JOIN unnest(p_held_roles, p_held_slots) AS h (role_oid, slots)
                 ON h.role_oid = w.role_oid
         GROUP BY w.role_oid
    ), level AS (
        SELECT ceil((p_limit + sum(d.held)) / count(*)::numeric)::integer AS slots FROM due d
    ), offered AS (
        SELECT o.id, o.visible_at, o.leased, d.held + o.rank AS turn
          FROM due d CROSS JOIN level l
         CROSS JOIN LATERAL (
               SELECT greatest(least(l.slots - d.held, p_limit, p_cap - d.held), 0) AS share
               ) s
         CROSS JOIN LATERAL (
               SELECT k.id, k.visible_at, k.leased,
                      row_number() OVER (ORDER BY k.visible_at, k.id) AS rank
                 FROM unnest(d.queues) AS q (call_name)
                CROSS JOIN LATERAL (
                      SELECT t.id, t.visible_at, t.lease_owner IS NOT NULL AS leased
                        FROM df._tasks t
                       WHERE t.role_oid = d.role_oid AND t.call_name = q.call_name
                         AND t.visible_at <= now()
                       ORDER BY t.visible_at
                       LIMIT s.share
                         FOR UPDATE SKIP LOCKED) k
               ) o
         WHERE o.rank <= s.share
    )
    SELECT array_agg(p.id), array_agg(p.visible_at), array_agg(p.leased)
      INTO v_picked, v_due, v_leased
      FROM (SELECT o.id, o.visible_at, o.leased FROM offered o
             ORDER BY o.turn, o.visible_at, o.id LIMIT p_limit) p;
    IF v_picked IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE df._tasks t
           SET lease_owner = p_worker,
               token = gen_random_uuid(),
               visible_at = now() + make_interval(secs => p_lease),
               attempts = t.attempts + 1
         WHERE t.id = ANY (v_picked)
        RETURNING t.*
    )
    SELECT c.id, c.token, c.kind, c.activation, c.node_id, c.payload, c.attempts,
           c.instance_id,
           -- The login name, not regrole's text, which quotes names like "Odd Name". A dropped
           -- role leaves its number, which fails the login as it should.
           coalesce(a.rolname, i.submitted_by::text)::text, i.submitted_by::oid, i.database,
           i.label, i.created_at, c.deferrals,
           CASE WHEN c.kind = 'start' THEN df._start_facts(c.instance_id) END,
           extract(epoch FROM now() - p.due_at)::double precision, p.leased
      FROM claimed c JOIN df.instances i ON i.id = c.instance_id
      JOIN unnest(v_picked, v_due, v_leased) AS p (id, due_at, leased) ON p.id = c.id
      LEFT JOIN pg_roles a ON a.oid = i.submitted_by;
END;
$$;
REVOKE ALL ON FUNCTION df._claim(uuid, integer, double precision, integer, oid[], integer[],
                                 text[])
    FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- df._start_facts: what a worker reads to start an instance (worker/queries.py's
-- graph_queries: the submitter, the graph's nodes and the size of their texts, the variables),
-- and the time, as one value that df._claim hands out with each start task. The start and its
-- first step then begin with the step's statement, a round trip sooner. NULL for a graph of
-- more than 100 nodes or 1 MB of texts, which the worker reads the usual way.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION df._start_facts(p_instance varchar(8)) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object(
               'root_node', i.root_node,
               'label', i.label,
               'role', coalesce(r.rolname, i.submitted_by::text),
               'role_exists', r.oid IS NOT NULL,
               'superuser', coalesce(r.rolsuper, false),
               'graph_bytes', g.bytes,
               'vars', u.vars,
               'vars_bytes', octet_length(u.vars::text),
               'now', extract(epoch FROM clock_timestamp()),
               'nodes', g.nodes)
      FROM df.instances i
      JOIN df._runs u ON u.instance_id = i.id
      LEFT JOIN pg_roles r ON r.oid = i.submitted_by
     CROSS JOIN LATERAL (
           SELECT count(*) AS count,
                  coalesce(sum(coalesce(octet_length(n.query), 0)
                               + coalesce(octet_length(n.result_name), 0)), 0) AS bytes,
                  jsonb_agg(jsonb_build_object(
                      'id', n.id, 'node_type', n.node_type, 'query', n.query,
                      'result_name', n.result_name, 'left_node', n.left_node,
                      'right_node', n.right_node)) AS nodes
             FROM (SELECT * FROM df.nodes n WHERE n.instance_id = i.id LIMIT 101) n
         ) g
     WHERE i.id = p_instance AND g.count <= 100 AND g.bytes <= 1048576;
$$;
REVOKE ALL ON FUNCTION df._start_facts(varchar) FROM PUBLIC;
