-- pgdurable schema, version 15: when each node last started, for durations in monitoring.
--
-- df.nodes.updated_at says when a node last changed; a finished node's start is lost by then.
-- started_at is stamped whenever a node becomes running (again, in each loop iteration or
-- retried attempt), so `pgdurable show` can print how long each step took. A trigger keeps
-- df._checkpoint as it is; the WHEN clause limits it to that one transition.

ALTER TABLE df.nodes ADD COLUMN started_at timestamptz;

CREATE FUNCTION df._node_started() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- clock_timestamp: a checkpoint's transaction may have begun long before (now()).
    NEW.started_at := clock_timestamp();
    RETURN NEW;
END;
$$;

REVOKE ALL ON FUNCTION df._node_started() FROM PUBLIC;

CREATE TRIGGER nodes_started BEFORE UPDATE OF status ON df.nodes
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running')
    EXECUTE FUNCTION df._node_started();
