-- Python steps (docs/python.md): the CALL node type, call tasks queued by step name, the
-- step names each worker has, and who may call what; and the MAP node type (df.map).
CREATE OR REPLACE FUNCTION df._node_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                 'HTTP', 'HTTP_MULTIPART', 'SIGNAL', 'RETRY', 'TIMEOUT', 'CALL', 'MAP'];
$$;

ALTER TABLE df._tasks
    ADD COLUMN call_name text NOT NULL DEFAULT '',
    DROP CONSTRAINT _tasks_kind_check,
    ADD CONSTRAINT _tasks_kind_check
        CHECK (kind IN ('start', 'sql', 'http', 'timer', 'signal', 'call'));
DROP INDEX df.tasks_role_visible_idx;
CREATE INDEX tasks_queue_visible_idx ON df._tasks (role_oid, call_name, visible_at);

ALTER TABLE df._worker_epoch ADD COLUMN step_names text[] NOT NULL DEFAULT '{}';

CREATE TABLE df._call_grants (
    grantee     oid NOT NULL,
    pattern     text NOT NULL,
    granted_by  regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grantee, pattern)
);

-- Secrets of the engine's: 'continue_with' signs the graphs df.continue_with returns, so that a
-- step's result that merely looks like one (data read from a table or an API) is never run
-- (calls.sql). The owner's alone; made once, at install.
CREATE TABLE df._keys (
    name    text PRIMARY KEY,
    secret  text NOT NULL
);
INSERT INTO df._keys (name, secret)
VALUES ('continue_with', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));

