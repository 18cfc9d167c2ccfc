-- What a release removed, or changed in a way CREATE OR REPLACE cannot.
--
-- Every install applies the area files again; CREATE OR REPLACE keeps a function's
-- privileges, but cannot change its return type or parameter names, or remove an overload,
-- a trigger or a policy that the new files no longer define. Such changes drop the old object
-- here, guarded so that the drop happens once (IF EXISTS, or a check of the old definition),
-- and the area files create the new one. Privileges that df.grant_usage gave on a dropped
-- function come back through df.refresh_grants, which every upgrade runs.

-- 0.2: df._checkpoint returns the instance's checkpoint count with each leased task.
DO $$
DECLARE
    v_old regprocedure :=
        to_regprocedure('df._checkpoint(bigint, uuid, jsonb, uuid, integer, double precision)');
BEGIN
    IF v_old IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_proc p
                        WHERE p.oid = v_old AND 'checkpoints' = ANY (p.proargnames)) THEN
        DROP FUNCTION df._checkpoint(bigint, uuid, jsonb, uuid, integer, double precision);
    END IF;
END
$$;

-- 0.2: df._claim returns what a start needs (df._start_facts) with each start task.
DO $$
DECLARE
    v_old regprocedure := to_regprocedure(
        'df._claim(uuid, integer, double precision, integer, oid[], integer[])');
BEGIN
    IF v_old IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_proc p
                        WHERE p.oid = v_old AND 'start' = ANY (p.proargnames)) THEN
        DROP FUNCTION df._claim(uuid, integer, double precision, integer, oid[], integer[]);
    END IF;
END
$$;

-- 0.2: df._insert_nodes validates the graph as it writes it, and says what it found.
DO $$
DECLARE
    v_old regprocedure :=
        to_regprocedure('df._insert_nodes(jsonb, text, text, regrole, text)');
BEGIN
    IF v_old IS NOT NULL
       AND (SELECT p.prorettype = 'boolean'::regtype FROM pg_proc p WHERE p.oid = v_old) THEN
        DROP FUNCTION df._insert_nodes(jsonb, text, text, regrole, text);
    END IF;
END
$$;

-- 0.2: df._claim leases Python steps only to workers that have them (p_names), and finds the
-- queues with due work by df._waiting_queues.
DROP FUNCTION IF EXISTS df._claim(uuid, integer, double precision, integer, oid[], integer[]);
DROP FUNCTION IF EXISTS df._waiting_roles();

-- 0.2: df.workers also returns the names of each worker's Python steps.
DO $$
DECLARE
    v_old regprocedure := to_regprocedure('df.workers(interval)');
BEGIN
    IF v_old IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_proc p
                        WHERE p.oid = v_old AND 'step_names' = ANY (p.proargnames)) THEN
        DROP FUNCTION df.workers(interval);
    END IF;
END
$$;

-- 0.2: df._claim also returns how long each task waited since it became due, and whether a
-- lease had run out on it (the worker's metrics).
DO $$
DECLARE
    v_old regprocedure := to_regprocedure(
        'df._claim(uuid, integer, double precision, integer, oid[], integer[], text[])');
BEGIN
    IF v_old IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_proc p
                        WHERE p.oid = v_old AND 'lease_expired' = ANY (p.proargnames)) THEN
        DROP FUNCTION df._claim(uuid, integer, double precision, integer, oid[], integer[],
                                text[]);
    END IF;
END
$$;
