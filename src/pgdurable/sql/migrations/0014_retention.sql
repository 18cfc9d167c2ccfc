-- pgdurable schema, version 14: retention of finished instances, and storage that does not
-- bloat (spec §9.7; docs/engine.md, "Storage and retention").
--
-- Finished instances (completed, failed, cancelled) are removed once they have been finished
-- longer than pg_durable.retention_days, or once they fall outside the newest
-- pg_durable.retention_max_instances finished ones. The worker calls df._purge_finished
-- every pg_durable.reconcile_interval seconds, with the settings it read on its own session,
-- until a call removes nothing (or the next pass is due). Each call is one short transaction
-- that removes at most one batch of instances, skips rows anyone holds, and never waits for
-- a lock: running work is never blocked by a purge.
--
-- How old is a finished instance? Not updated_at: its owner may write that column (spec
-- §10.1, df.cancel needs it), so a user could date an instance into the future and keep it
-- for ever. completed_at is set only for completed instances (spec §2.2), and created_at of
-- a failed or cancelled one can be much older than its end. So the engine records the moment
-- an instance became terminal in df._runs.finished_at, which users cannot write.

-- ---------------------------------------------------------------------------------------------
-- When each instance finished.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE df._runs ADD COLUMN finished_at timestamptz;  -- NULL while pending or running

-- Instances that finished before this version: the best trustworthy time is the spec's,
-- completed_at or else created_at (a failed or cancelled instance then ages from its start).
UPDATE df._runs r
   SET finished_at = coalesce(i.completed_at, i.created_at, clock_timestamp())
  FROM df.instances i
 WHERE i.id = r.instance_id AND i.status IN ('completed', 'failed', 'cancelled');

-- Oldest finished first, for the purge; newest first, for the count limit. Partial: only
-- finished instances are in it. Checkpoints never change finished_at, so their updates of
-- df._runs can still be HOT.
CREATE INDEX runs_finished_idx ON df._runs (finished_at, instance_id)
    WHERE finished_at IS NOT NULL;

-- df._checkpoint writes the output exactly when the instance ends: the checkpoint's own
-- UPDATE of df._runs stamps finished_at then (a BEFORE trigger, no second row version).
CREATE FUNCTION df._run_finished() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.finished_at := clock_timestamp();
    RETURN NEW;
END;
$$;

REVOKE ALL ON FUNCTION df._run_finished() FROM PUBLIC;

CREATE TRIGGER runs_finished BEFORE UPDATE OF output ON df._runs
    FOR EACH ROW WHEN (NEW.output IS NOT NULL AND NEW.finished_at IS NULL)
    EXECUTE FUNCTION df._run_finished();

-- What ends without an output (a cancel, a NULL result) is stamped when its status becomes
-- terminal; otherwise this finds finished_at set and writes nothing. Terminal statuses never
-- change again (migration 10 holds users to cancelling), so it fires once per instance.
-- SECURITY DEFINER because df.cancel runs as the user, who may not write df._runs.
CREATE FUNCTION df._instance_finished() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE df._runs r SET finished_at = clock_timestamp()
     WHERE r.instance_id = NEW.id AND r.finished_at IS NULL;
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION df._instance_finished() FROM PUBLIC;

CREATE TRIGGER instances_finished AFTER UPDATE OF status ON df.instances
    FOR EACH ROW WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
                       AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION df._instance_finished();

-- ---------------------------------------------------------------------------------------------
-- One purger at a time. Its transaction holds this row; others skip it and do nothing. A
-- row of an engine table rather than an advisory lock: any role can take any advisory lock,
-- and could then stop retention (and let the tables grow) for as long as it liked. The row
-- also shows when the last purge ran and how many instances purges removed in all.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE df._retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_purge_at  timestamptz,              -- end of the last batch, NULL before the first
    purged         bigint NOT NULL DEFAULT 0 -- instances removed since install
);
INSERT INTO df._retention DEFAULT VALUES;

-- ---------------------------------------------------------------------------------------------
-- Deleting a node makes PostgreSQL check, at commit, that no node still names it as its left
-- or right child (the deferred foreign keys nodes_left_fkey and nodes_right_fkey of migration
-- 1). Without an index on those columns each check reads every node of the instance, so
-- removing an instance of n nodes cost n² row visits: a 10,000-node graph took seconds by
-- itself, and a batch of such graphs minutes. With these, each check is one index probe. Only
-- nodes with children are in them (THEN, IF, JOIN, RACE, LOOP: about half of a graph).
-- ---------------------------------------------------------------------------------------------
CREATE INDEX nodes_left_idx ON df.nodes (instance_id, left_node) WHERE left_node IS NOT NULL;
CREATE INDEX nodes_right_idx ON df.nodes (instance_id, right_node) WHERE right_node IS NOT NULL;

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
CREATE FUNCTION df._purge_finished(
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

-- ---------------------------------------------------------------------------------------------
-- Autovacuum of the engine tables (measured in bench/storage.py; docs/engine.md, "Storage and
-- retention").
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
