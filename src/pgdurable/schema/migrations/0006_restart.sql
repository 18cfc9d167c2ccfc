-- df.restart (docs/reference.md#dfrestart): the restart task, the restarts an instance had
-- (counted in its executions), and the failed or cancelled executions it ended, in the history.
ALTER TABLE df._tasks
    DROP CONSTRAINT _tasks_kind_check,
    ADD CONSTRAINT _tasks_kind_check
        CHECK (kind IN ('start', 'sql', 'http', 'timer', 'signal', 'call', 'restart'));

ALTER TABLE df._runs ADD COLUMN restarts integer NOT NULL DEFAULT 0;

ALTER TABLE df._executions ADD COLUMN restarted_at timestamptz;
