-- pgdurable schema, version 18: df.explain cuts a long label in its header as it cuts the
-- output (60 bytes, 57 kept): every line is padded to the longest, so one 50 kB label made
-- the text of a 200-branch graph 20 MB (and a large enough graph past PostgreSQL's 1 GB).

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
