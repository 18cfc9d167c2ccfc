-- pgdurable schema, version 17: fixes from a review of the monitoring work.
--
-- * Retention skips instances someone holds a lock on while it picks a batch. It skipped them
--   only at the DELETE, so a user holding its own oldest finished instances (their rows are
--   the user's to lock) made every batch empty and stopped retention for everybody.
-- * A deep page of df.list_instances reads about its own size: the cursor's timestamp bounds
--   the index scan instead of filtering every row before the page.

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
    -- an index that yields rows in page order (spec §2.2), so a page costs about its size.
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
    -- the page's last row and is repeated on every row (spec §9.2).
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
