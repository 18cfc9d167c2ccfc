-- A sequence's next step takes over its task's row: no index on the activation, which that
-- update changes, so that it can be made in place (HOT).
ALTER TABLE df._tasks DROP CONSTRAINT _tasks_instance_id_activation_key;
CREATE INDEX tasks_instance_idx ON df._tasks (instance_id);
