-- The graph's shape is checked once per inserting statement (df._check_new_nodes, start.sql)
-- instead of by CHECK constraints evaluated again at every status write.
ALTER TABLE df.nodes
    DROP CONSTRAINT nodes_id_hex8_chk,
    DROP CONSTRAINT nodes_children_hex8_chk,
    DROP CONSTRAINT nodes_type_chk,
    DROP CONSTRAINT nodes_result_name_chk,
    DROP CONSTRAINT nodes_structure_chk;
