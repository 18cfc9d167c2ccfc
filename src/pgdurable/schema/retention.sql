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
