-- The primary key (instance_id, id) serves every lookup by instance; a second index on
-- instance_id alone only cost every node insert and every non-HOT update one more entry.
DROP INDEX df.nodes_instance_idx;
