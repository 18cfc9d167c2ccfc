-- pgdurable schema, version 19: monitoring and retention cost less per instance.
--
-- Migrations 12 and 14 wrote three more rows per instance: an execution history row when it
-- started, updated again when it ended, and df._runs once more (finished_at) after the
-- checkpoint that ended it had already written df._runs. A one-step workflow paid for them
-- in throughput. Now:
--
-- * df._runs.finished_at is set by the checkpoint's own UPDATE of df._runs (a BEFORE trigger,
--   no second row version): df._checkpoint writes the output exactly when the instance ends.
--   The trigger on df.instances remains for what ends without an output (a cancel, a NULL
--   result), and finds nothing to do otherwise.
-- * df._executions keeps the executions that ended by a loop's next iteration only. The
--   current execution is derived, when read, from df._runs and df.instances: a workflow
--   without a root loop writes no history row at all.

-- ---------------------------------------------------------------------------------------------
-- finished_at
-- ---------------------------------------------------------------------------------------------
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

-- ---------------------------------------------------------------------------------------------
-- Execution history: ended executions only
-- ---------------------------------------------------------------------------------------------
DROP TRIGGER runs_execution_started ON df._runs;
DROP TRIGGER instances_execution_ended ON df.instances;
DROP FUNCTION df._execution_started();
DROP FUNCTION df._execution_ended();

-- The rows of current executions are derived from now on.
DELETE FROM df._executions e
 USING df._runs r
 WHERE e.instance_id = r.instance_id AND e.generation = r.generation;

-- A root loop began its next iteration: the execution that ended is recorded. It began when
-- the one before it ended (or with the instance), at that one's last checkpoint count (or 0).
-- The interpreter state (graph/interpreter.py, format 1) still holds the loop's activation,
-- whose "last" is the body result of the iteration that ended; the root loop is the one
-- iterating execution "0". Nothing here may fail a checkpoint, so a state of another shape
-- only loses that output.
CREATE OR REPLACE FUNCTION df._execution_continued() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_output  text;
BEGIN
    IF jsonb_typeof(NEW.state -> 'acts') = 'object' THEN
        SELECT a.value ->> 'last' INTO v_output
          FROM jsonb_each(NEW.state -> 'acts') AS a
         WHERE jsonb_typeof(a.value) = 'object' AND a.value ->> 'loop_exec' = '0'
         LIMIT 1;
    END IF;
    INSERT INTO df._executions (instance_id, generation, status, started_at, finished_at,
                                first_event, events, output)
    SELECT NEW.instance_id, OLD.generation, 'ContinuedAsNew',
           coalesce(p.finished_at, i.created_at, clock_timestamp()), clock_timestamp(),
           coalesce(p.first_event + p.events, 0),
           OLD.checkpoints - coalesce(p.first_event + p.events, 0), v_output
      FROM df.instances i
      LEFT JOIN df._executions p
             ON p.instance_id = NEW.instance_id AND p.generation = OLD.generation - 1
     WHERE i.id = NEW.instance_id
    ON CONFLICT (instance_id, generation) DO NOTHING;
    DELETE FROM df._executions e
     WHERE e.instance_id = NEW.instance_id AND e.generation <= NEW.generation - 1000;
    RETURN NULL;
END;
$$;

-- The current execution from df._runs and df.instances, the ended ones from the history; run
-- as the caller, under row-level security on all three.
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

-- The current execution's duration needs finished_at: users may read it for their own runs.
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
           -- (Entries a grantor gained in different versions stay apart: a grantor not yet
           -- renewed for a later one can still revoke the earlier.)
           ('SELECT (instance_id, generation, output)', 'df._runs'),
           ('SELECT (checkpoints)', 'df._runs'),
           ('SELECT (finished_at)', 'df._runs'),
           ('SELECT', 'df._executions'),
           -- df.signal: signals to the role's own instances.
           ('INSERT (instance_id, name, data)', 'df._signals');
$$;

SELECT df.refresh_grants();
