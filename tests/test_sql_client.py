"""Client functions: status, result, await, cancel, variables, listing, version and grants
(docs/reference.md).

No worker runs here, so instances stay pending; terminal states are set by hand where a test
needs them.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from datetime import UTC

import psycopg
import test_attacks as attacks
from conftest import RoleFactory, quote
from sqlcheck import Conn, Error, check, outcome
from test_attacks import TenantFactory

import pgdurable

tenants = attacks.tenants  # the fixture

# -- helpers ------------------------------------------------------------------------------------


def start(conn: Conn, expr: str = "'SELECT 1'", *params: object) -> str:
    row = conn.execute(f"SELECT df.start({expr})", params).fetchone()
    assert row is not None
    return str(row[0])


def set_status(conn: Conn, instance: str, status: str) -> None:
    """Pretend a worker moved the instance on (superuser connection)."""
    conn.execute("UPDATE df.instances SET status = %s WHERE id = %s", (status, instance))


def set_root(conn: Conn, instance: str, status: str, result: str | None) -> None:
    """Pretend a worker finished (or started) the instance's root node."""
    conn.execute(
        "UPDATE df.nodes n SET status = %s, result = %s::jsonb FROM df.instances i"
        " WHERE i.id = %s AND n.instance_id = i.id AND n.id = i.root_node",
        (status, result, instance),
    )


def notices_of(conn: Conn) -> list[tuple[str, str]]:
    """Collect (severity, message) of every notice the connection receives from now on."""
    seen: list[tuple[str, str]] = []
    conn.add_notice_handler(
        lambda d: seen.append((d.severity_nonlocalized or "", d.message_primary or ""))
    )
    return seen


# -- status and result ----------------------------------------------------------------------------


def test_status_and_result(su: Conn) -> None:
    pending = start(su, "'SELECT 1', 'my label'")
    done = start(su)
    failed = start(su)
    running = start(su)
    set_root(su, done, "completed", '{"row_count":1,"rows":[{"answer":42}]}')
    set_root(su, failed, "failed", '"SQL execution failed: boom"')
    set_root(su, running, "running", None)
    set_status(su, done, "completed")
    set_status(su, failed, "failed")
    set_status(su, running, "running")
    check(
        su,
        [
            (f"df.status('{pending}')", "pending"),
            (f"df.status('{done}')", "completed"),
            (f"df.status('{failed}')", "failed"),
            (f"df.status('{running}')", "running"),
            ("df.status('00000000')", None),
            ("df.status('my label')", None),
            ("df.status(NULL)", None),
            (f"df.result('{pending}')", None),
            # jsonb text rendering of the root node's result.
            (f"df.result('{done}')", '{"rows": [{"answer": 42}], "row_count": 1}'),
            (f"df.result('{failed}')", None),
            (f"df.result('{running}')", None),
            ("df.result('00000000')", None),
            ("df.result(NULL)", None),
        ],
    )
    # Only the root counts: a completed inner node of a cancelled instance gives nothing.
    cancelled = start(su, "'a' ~> 'b'")
    su.execute(
        "UPDATE df.nodes SET status = 'completed', result = '1' WHERE instance_id = %s"
        " AND id <> (SELECT root_node FROM df.instances WHERE id = %s)",
        (cancelled, cancelled),
    )
    set_status(su, cancelled, "cancelled")
    check(su, [(f"df.result('{cancelled}')", None)])


# -- await ----------------------------------------------------------------------------------------


def test_await_instance(su: Conn) -> None:
    pending = start(su)
    terminal = {status: start(su) for status in ("completed", "failed", "cancelled")}
    for status, instance in terminal.items():
        set_status(su, instance, status)
    check(
        su,
        [
            (f"df.await_instance('{pending}', 0)", Error("Timeout must be positive")),
            (f"df.await_instance('{pending}', -5)", Error("Timeout must be positive")),
            ("df.await_instance('00000000', 1)", Error("Instance not found: 00000000")),
            ("df.await_instance('0000''\"x', 1)", Error("Instance not found: 0000'\"x")),
            ("df.await_instance(NULL)", None),
            *[(f"df.await_instance('{i}')", status) for status, i in terminal.items()],
            *[(f"df.await_instance('{i}', 1)", status) for status, i in terminal.items()],
        ],
    )
    began = time.monotonic()
    assert outcome(su, "df.await_instance(%s, 1)", [pending]) == Error(
        f"Timeout after 1s waiting for instance {pending} (status: pending). "
        "Check if background worker is running."
    )
    assert 0.9 < time.monotonic() - began < 3


def test_await_sees_commits_of_other_sessions(su: Conn, dsn: str) -> None:
    instance = start(su)

    def finish_later() -> None:
        time.sleep(0.4)
        with psycopg.connect(dsn, autocommit=True) as other:
            set_status(other, instance, "completed")

    finisher = threading.Thread(target=finish_later)
    began = time.monotonic()
    finisher.start()
    try:
        assert outcome(su, "df.await_instance(%s, 10)", [instance]) == "completed"
    finally:
        finisher.join()
    assert time.monotonic() - began < 3


def test_await_in_the_starting_transaction_times_out(su: Conn) -> None:
    with su.transaction():
        instance = start(su)
        assert outcome(su, "df.await_instance(%s, 1)", [instance]) == Error(
            f"Timeout after 1s waiting for instance {instance} (status: pending). "
            "Check if background worker is running."
        )
        raise psycopg.Rollback()


def test_wait_for_completion_is_a_deprecated_alias(su: Conn) -> None:
    instance = start(su)
    set_status(su, instance, "failed")
    seen = notices_of(su)
    assert outcome(su, "df.wait_for_completion(%s)", [instance]) == "failed"
    assert seen == [
        ("WARNING", "df.wait_for_completion() is deprecated; use df.await_instance() instead")
    ]
    assert outcome(su, "df.wait_for_completion('00000000', 1)") == Error(
        "Instance not found: 00000000"
    )


def test_in_workflow_refusals(su: Conn) -> None:
    instance = start(su)
    su.execute("SELECT df.setvar('kept', 'v')")
    su.execute("SET df.in_workflow = 'true'")
    check(
        su,
        [
            (
                f"df.await_instance('{instance}', 1)",
                Error(
                    "df.await_instance() cannot be called inside a workflow - wait for "
                    "instances from the client that started them"
                ),
            ),
            (
                "df.setvar('k', 'v')",
                Error(
                    "df.setvar() cannot be called inside a workflow - set variables before "
                    "starting the workflow"
                ),
            ),
            (
                "df.unsetvar('k')",
                Error(
                    "df.unsetvar() cannot be called inside a workflow - manage variables before "
                    "starting the workflow"
                ),
            ),
            (
                "df.clearvars()",
                Error(
                    "df.clearvars() cannot be called inside a workflow - manage variables before "
                    "starting the workflow"
                ),
            ),
            # Reading is fine.
            ("df.getvar('kept')", "v"),
            (f"df.status('{instance}')", "pending"),
        ],
    )
    su.execute("SET df.in_workflow = 'false'")
    check(su, [("df.setvar('k', 'v')", "OK")])


# -- cancel and run -------------------------------------------------------------------------------


def test_cancel(su: Conn) -> None:
    instance = start(su)
    su.execute(
        "UPDATE df.instances SET updated_at = now() - interval '1 hour' WHERE id = %s", (instance,)
    )
    done = start(su)
    set_status(su, done, "completed")
    check(
        su,
        [
            (f"df.cancel('{instance}')", f"Instance {instance} cancelled: Cancelled by user"),
            (f"df.status('{instance}')", "cancelled"),
            (
                f"(SELECT updated_at > now() - interval '1 minute' AND completed_at IS NULL"
                f" FROM df.instances WHERE id = '{instance}')",
                True,
            ),
            # Idempotent, and terminal instances keep their status.
            (f"df.cancel('{instance}', 'again')", f"Instance {instance} cancelled: again"),
            (f"df.cancel('{done}', 'too late')", f"Instance {done} cancelled: too late"),
            (f"df.status('{done}')", "completed"),
            (
                "df.cancel('00000000')",
                Error("Instance not found or access denied: 00000000"),
            ),
            ("df.cancel(NULL)", None),
            (f"df.cancel('{instance}', NULL)", None),
        ],
    )


def test_cancel_that_cannot_update_reports_the_failure(su: Conn, make_role: RoleFactory) -> None:
    """A failed cancel request is returned as text, and changes nothing (as pg_durable does)."""
    role = make_role()
    instance = start(role.conn)
    su.execute(f"REVOKE UPDATE (status, updated_at) ON df.instances FROM {quote(role.name)}")
    check(
        role.conn,
        [
            (f"df.cancel('{instance}')", "Failed to cancel: permission denied for table instances"),
            (f"df.status('{instance}')", "pending"),
        ],
    )


def test_run_is_a_stub(su: Conn) -> None:
    check(
        su,
        [
            ("df.run()", "Triggered run for all pending instances"),
            ("df.run(NULL)", "Triggered run for all pending instances"),
            ("df.run('abcdef01')", "Triggered run for instance: abcdef01"),
        ],
    )


# -- variables ------------------------------------------------------------------------------------


def test_variables(su: Conn) -> None:
    odd = 'it\'s "quoted" \\ and 😀\nnewline'
    check(
        su,
        [
            ("df.getvar('k')", None),
            ("df.setvar('k', 'one')", "OK"),
            ("df.getvar('k')", "one"),
            ("df.setvar('k', 'two')", "OK"),
            ("df.getvar('k')", "two"),
            (f"df.setvar('{odd.replace(chr(39), chr(39) * 2)}', 'x')", "OK"),
            (f"df.getvar('{odd.replace(chr(39), chr(39) * 2)}')", "x"),
            ("df.setvar('v', 'ünïcödé 🎉')", "OK"),
            ("df.getvar('v')", "ünïcödé 🎉"),
            ("df.setvar('n', NULL)", None),
            ("df.getvar('n')", None),
            ("df.getvar(NULL)", None),
            ("(SELECT count(*) FROM df.vars)", 3),
            ("df.unsetvar('k')", "OK"),
            ("df.unsetvar('k')", "OK"),
            ("df.getvar('k')", None),
            ("df.unsetvar(NULL)", None),
            ("df.clearvars()", "OK"),
            ("(SELECT count(*) FROM df.vars)", 0),
            ("df.clearvars()", "OK"),
        ],
    )


def test_roles_see_only_their_own_instances_and_variables(su: Conn, make_role: RoleFactory) -> None:
    alice, bob = make_role(), make_role()
    theirs = {}
    for role in (alice, bob):
        check(
            role.conn, [(f"df.setvar('k', '{role.name}')", "OK"), ("df.setvar('only', 'x')", "OK")]
        )
        theirs[role.name] = start(role.conn, "'SELECT 1', %s", f"label of {role.name}")
    check(su, [("df.setvar('k', 'superuser')", "OK")])
    mine = start(su)

    a, b = theirs[alice.name], theirs[bob.name]
    check(
        alice.conn,
        [
            ("df.getvar('k')", alice.name),
            ("(SELECT count(*) FROM df.vars)", 2),
            (f"df.status('{a}')", "pending"),
            (f"df.status('{b}')", None),
            (f"df.status('{mine}')", None),
            (f"df.result('{b}')", None),
            (f"df.cancel('{b}')", Error(f"Instance not found or access denied: {b}")),
            (f"df.await_instance('{b}', 1)", Error(f"Instance not found: {b}")),
            ("(SELECT count(*) FROM df.instances)", 1),
            ("(SELECT count(*) FROM df.nodes)", 1),
            (f"(SELECT submitted_by::text FROM df.instances WHERE id = '{a}')", alice.name),
            (f"(SELECT bool_and(submitted_by::text = '{alice.name}') FROM df.nodes)", True),
            ("(SELECT array_agg(instance_id) FROM df.list_instances())", [a]),
            ("df.clearvars()", "OK"),
        ],
    )
    # alice's clearvars touched nothing of bob's, and bob's cancel works on his own instance.
    check(
        bob.conn,
        [
            ("df.getvar('k')", bob.name),
            ("df.getvar('only')", "x"),
            (f"df.cancel('{b}')", f"Instance {b} cancelled: Cancelled by user"),
        ],
    )
    check(su, [(f"df.status('{b}')", "cancelled"), (f"df.status('{a}')", "pending")])
    # The superuser bypasses RLS for instances, but the variable helpers stay self-scoped.
    check(
        su,
        [
            ("df.getvar('k')", "superuser"),
            ("df.getvar('only')", None),
            ("df.clearvars()", "OK"),
            ("(SELECT count(*) FROM df.vars WHERE owner = 'postgres'::regrole)", 0),
            ("(SELECT count(*) FROM df.vars)", 2),
            ("(SELECT count(*) FROM df.list_instances())", 3),
            (f"df.status('{a}')", "pending"),
        ],
    )


def test_unusual_role_names(su: Conn, make_role: RoleFactory) -> None:
    for name in ('Mixed"Case Role', "it's ünï 😀"):
        role = make_role(name=name + " " + uuid.uuid4().hex[:6])
        instance = start(role.conn, "'SELECT 1', %s", "label 'with' \"quotes\" 🎯")
        check(
            role.conn,
            [
                (f"df.status('{instance}')", "pending"),
                ("df.setvar('k', 'v')", "OK"),
                ("df.getvar('k')", "v"),
                (
                    f"(SELECT submitted_by = quote_ident(current_user)::regrole"
                    f" FROM df.instances WHERE id = '{instance}')",
                    True,
                ),
                ("(SELECT label FROM df.list_instances())", "label 'with' \"quotes\" 🎯"),
                (f"df.cancel('{instance}')", f"Instance {instance} cancelled: Cancelled by user"),
            ],
        )
        check(
            su,
            [
                (
                    f"(SELECT submitted_by::text FROM df.instances WHERE id = '{instance}')",
                    quote(role.name),
                )
            ],
        )


# -- list_instances -------------------------------------------------------------------------------


def test_list_instances(su: Conn, make_role: RoleFactory) -> None:
    ids = [start(su, "'SELECT 1', %s", f"l{i}") for i in range(4)]
    # created_at: ids[2] newest; ids[0] and ids[1] tie; ids[3] oldest.
    for instance, age in zip(ids, (60, 60, 10, 120), strict=True):
        su.execute(
            "UPDATE df.instances SET created_at = '2026-01-01 12:00:00+00'::timestamptz"
            " - make_interval(secs => %s) WHERE id = %s",
            (age, instance),
        )
    set_status(su, ids[1], "completed")
    su.execute(
        "INSERT INTO df._runs (instance_id, generation, output) VALUES (%s, 3, 'out')"
        " ON CONFLICT (instance_id) DO UPDATE SET generation = 3, output = 'out'",
        (ids[1],),
    )
    tie = sorted(ids[:2])
    newest_first = [ids[2], *tie, ids[3]]
    rows = su.execute("SELECT * FROM df.list_instances()").fetchall()
    assert [r[0] for r in rows] == newest_first
    by_id = {r[0]: r for r in rows}
    assert by_id[ids[1]] == (
        ids[1],
        "l1",
        "pg_durable::orchestration::execute-function-graph",
        "completed",
        3,
        "out",
    )
    assert by_id[ids[0]][1:4] == (
        "l0",
        "pg_durable::orchestration::execute-function-graph",
        "pending",
    )
    assert by_id[ids[0]][5] is None
    columns = [
        (c.name, c.type_code)
        for c in su.execute("SELECT * FROM df.list_instances() LIMIT 0").description or []
    ]
    assert [name for name, _ in columns] == [
        "instance_id",
        "label",
        "function_name",
        "status",
        "execution_count",
        "output",
    ]
    too_many = (
        "df.list_instances: limit_count ({}) exceeds pg_durable.list_instances_max_limit ({}); "
        "request fewer rows, or use the paginated df.list_instances overload "
        "(after_cursor/next_cursor) for large result sets"
    )
    check(
        su,
        [
            ("(SELECT array_agg(instance_id) FROM df.list_instances(NULL, 2))", newest_first[:2]),
            ("(SELECT array_agg(instance_id) FROM df.list_instances('completed'))", [ids[1]]),
            ("(SELECT count(*) FROM df.list_instances('pending'))", 3),
            ("(SELECT count(*) FROM df.list_instances('PENDING'))", 0),
            ("(SELECT count(*) FROM df.list_instances(limit_count => 1000))", 4),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 0))",
                Error("limit_count must be at least 1"),
            ),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, -1))",
                Error("limit_count must be at least 1"),
            ),
            (
                "(SELECT count(*) FROM df.list_instances(NULL, 1001))",
                Error(too_many.format(1001, 1000)),
            ),
        ],
    )
    # An administrator's limit (df.set_setting; tests/test_settings.py has the other ways).
    su.execute("SELECT df.set_setting('pg_durable.list_instances_max_limit', '3')")
    check(
        su,
        [
            ("(SELECT count(*) FROM df.list_instances(NULL, 3))", 3),
            ("(SELECT count(*) FROM df.list_instances(NULL, 4))", Error(too_many.format(4, 3))),
            # The default limit is checked too.
            ("(SELECT count(*) FROM df.list_instances())", Error(too_many.format(100, 3))),
        ],
    )
    # df.set_setting refuses these; written into its table by the owner, they count as unset.
    for unusable in ("abc", "0", "-5", "99999999"):
        su.execute(
            "UPDATE df._settings SET value = %s WHERE name = 'pg_durable.list_instances_max_limit'",
            (unusable,),
        )
        check(su, [("(SELECT count(*) FROM df.list_instances(NULL, 1000))", 4)])
        check(
            su,
            [
                (
                    "(SELECT count(*) FROM df.list_instances(NULL, 1001))",
                    Error(too_many.format(1001, 1000)),
                )
            ],
        )
    su.execute("SELECT df.set_setting('pg_durable.list_instances_max_limit', '1000000')")
    check(su, [("(SELECT count(*) FROM df.list_instances(NULL, 1000000))", 4)])

    # A role lists its own instances, with the engine columns of its own runs.
    role = make_role()
    own = start(role.conn)
    su.execute("UPDATE df._runs SET generation = 7, output = 'mine' WHERE instance_id = %s", (own,))
    assert role.conn.execute("SELECT * FROM df.list_instances()").fetchall() == [
        (own, None, "pg_durable::orchestration::execute-function-graph", "pending", 7, "mine")
    ]


# -- version and misc ------------------------------------------------------------------------------


def test_version(su: Conn, make_role: RoleFactory) -> None:
    version = outcome(su, "df.version()")
    assert isinstance(version, str)
    match = re.fullmatch(r"(\S+) \(built (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\)", version)
    assert match, version
    assert match.group(1) == pgdurable.__version__
    installed = su.execute("SELECT upgraded_at FROM df._schema").fetchone()[0]  # type: ignore[index]
    assert match.group(2) == installed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Users have no access to df._schema, yet may ask for the version.
    role = make_role()
    assert outcome(role.conn, "df.version()") == version
    assert outcome(role.conn, "count(*) FROM df._schema") == Error(
        "permission denied for table _schema"
    )


def test_misc_functions(su: Conn, dbname: str) -> None:
    check(
        su,
        [
            ("df.duroxide_schema()", "_duroxide"),
            (
                "(SELECT provolatile FROM pg_proc"
                " WHERE oid = 'df.duroxide_schema()'::regprocedure)",
                "i",
            ),
            ("df.target_database()", dbname),
        ],
    )
    su.execute("SET pg_durable.database = 'elsewhere'")
    check(su, [("df.target_database()", "elsewhere")])
    su.execute("SET pg_durable.database = ''")
    check(su, [("df.target_database()", dbname)])


# -- privileges -----------------------------------------------------------------------------------

PRIVILEGES = [
    # (check expression with {r} for the role, granted by grant_usage?)
    ("has_schema_privilege({r}, 'df', 'USAGE')", True),
    ("has_table_privilege({r}, 'df.instances', 'SELECT')", True),
    ("has_column_privilege({r}, 'df.instances', 'status', 'UPDATE')", True),
    ("has_column_privilege({r}, 'df.instances', 'updated_at', 'UPDATE')", True),
    ("has_column_privilege({r}, 'df.instances', 'label', 'UPDATE')", False),
    ("has_column_privilege({r}, 'df.instances', 'submitted_by', 'UPDATE')", False),
    ("has_column_privilege({r}, 'df.instances', 'submitted_by', 'INSERT')", True),
    ("has_column_privilege({r}, 'df.instances', 'status', 'INSERT')", False),
    ("has_table_privilege({r}, 'df.instances', 'DELETE')", False),
    ("has_table_privilege({r}, 'df.nodes', 'SELECT')", True),
    ("has_column_privilege({r}, 'df.nodes', 'query', 'INSERT')", True),
    ("has_column_privilege({r}, 'df.nodes', 'status', 'INSERT')", False),
    ("has_column_privilege({r}, 'df.nodes', 'result', 'UPDATE')", False),
    ("has_table_privilege({r}, 'df.nodes', 'DELETE')", False),
    ("has_table_privilege({r}, 'df.vars', 'SELECT, INSERT, UPDATE, DELETE')", True),
    ("has_column_privilege({r}, 'df._runs', 'generation', 'SELECT')", True),
    ("has_column_privilege({r}, 'df._runs', 'output', 'SELECT')", True),
    ("has_column_privilege({r}, 'df._runs', 'vars', 'SELECT')", False),
    ("has_column_privilege({r}, 'df._runs', 'state', 'SELECT')", False),
    ("has_table_privilege({r}, 'df._tasks', 'SELECT')", False),
    ("has_table_privilege({r}, 'df._worker_epoch', 'SELECT')", False),
    ("has_table_privilege({r}, 'df._schema', 'SELECT')", False),
    ("has_function_privilege({r}, 'df.grant_usage(text,boolean,boolean)', 'EXECUTE')", False),
    ("has_function_privilege({r}, 'df.revoke_usage(text)', 'EXECUTE')", False),
    ("has_function_privilege({r}, 'df.metrics()', 'EXECUTE')", False),
    ("has_function_privilege({r}, 'df.refresh_grants()', 'EXECUTE')", False),
]


def privileges_of(conn: Conn, role: str) -> list[tuple[str, bool]]:
    return [(expr, bool(outcome(conn, expr.format(r="%s"), [role]))) for expr, _ in PRIVILEGES]


def test_nothing_is_granted_to_public(su: Conn, make_role: RoleFactory) -> None:
    stranger = make_role(grant=False)
    assert privileges_of(su, stranger.name) == [(expr, False) for expr, _ in PRIVILEGES]
    check(
        stranger.conn,
        [
            ("df.status('abcdef01')", Error("permission denied for schema df")),
            ("df.start('SELECT 1')", Error("permission denied for schema df")),
            ("df.setvar('k', 'v')", Error("permission denied for schema df")),
            ("'a' ~> 'b' IS NOT NULL", Error("permission denied for schema df")),
            ("count(*) FROM df.instances", Error("permission denied for schema df")),
        ],
    )
    check(
        su,
        [
            (
                "(SELECT count(*) FROM pg_namespace n, aclexplode(n.nspacl) a"
                " WHERE n.nspname = 'df' AND a.grantee = 0)",
                0,
            ),
            (
                "(SELECT count(*) FROM information_schema.role_table_grants"
                " WHERE table_schema = 'df' AND grantee = 'PUBLIC')",
                0,
            ),
            (
                "(SELECT count(*) FROM information_schema.role_column_grants"
                " WHERE table_schema = 'df' AND grantee = 'PUBLIC')",
                0,
            ),
        ],
    )


def test_grant_and_revoke_usage(su: Conn, make_role: RoleFactory) -> None:
    role = make_role(grant=False)
    seen = notices_of(su)
    su.execute("SELECT df.grant_usage(%s)", (role.name,))
    assert privileges_of(su, role.name) == PRIVILEGES
    # Additive and repeatable.
    su.execute("SELECT df.grant_usage(%s, true)", (role.name,))
    assert privileges_of(su, role.name) == PRIVILEGES
    check(role.conn, [("df.status(df.start('SELECT 1')) ", "pending")])
    su.execute("SELECT df.revoke_usage(%s)", (role.name,))
    assert privileges_of(su, role.name) == [(expr, False) for expr, _ in PRIVILEGES]
    check(role.conn, [("df.status('abcdef01')", Error("permission denied for schema df"))])
    assert seen == [
        ("NOTICE", f'pg_durable: granted df usage privileges to "{role.name}"'),
        ("NOTICE", f'pg_durable: granted df usage privileges to "{role.name}"'),
        (
            "NOTICE",
            f'pg_durable: revoked df usage privileges granted by "postgres" from "{role.name}"',
        ),
    ]
    check(
        su,
        [
            ("df.grant_usage('no_such_role_x')", Error('role "no_such_role_x" does not exist')),
            ("df.revoke_usage('no_such_role_x')", Error('role "no_such_role_x" does not exist')),
        ],
    )


def test_grant_usage_with_grant_option(su: Conn, make_role: RoleFactory) -> None:
    admin, user, other = make_role(grant=False), make_role(grant=False), make_role()
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    assert outcome(
        su,
        "has_function_privilege(%s, 'df.grant_usage(text,boolean,boolean)', 'EXECUTE')",
        [admin.name],
    )
    # The admin passes usage on, and takes it back again.
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    assert privileges_of(su, user.name) == PRIVILEGES
    admin.conn.execute("SELECT df.revoke_usage(%s)", (user.name,))
    assert privileges_of(su, user.name) == [(expr, False) for expr, _ in PRIVILEGES]
    # An ordinary user may not.
    check(
        other.conn,
        [
            (f"df.grant_usage('{user.name}')", Error("permission denied for function grant_usage")),
            (
                f"df.revoke_usage('{user.name}')",
                Error("permission denied for function revoke_usage"),
            ),
        ],
    )
    # Revoking the admin cascades to what it granted.
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    su.execute("SELECT df.revoke_usage(%s)", (admin.name,))
    assert privileges_of(su, admin.name) == [(expr, False) for expr, _ in PRIVILEGES]
    assert privileges_of(su, user.name) == [(expr, False) for expr, _ in PRIVILEGES]


def test_grant_usage_to_public(su: Conn, make_role: RoleFactory) -> None:
    stranger = make_role(grant=False)
    seen = notices_of(su)
    su.execute("SELECT df.grant_usage('public')")
    check(stranger.conn, [("df.status('abcdef01')", None)])
    su.execute("SELECT df.revoke_usage('PUBLIC')")
    check(stranger.conn, [("df.status('abcdef01')", Error("permission denied for schema df"))])
    assert [m for _, m in seen] == [
        'pg_durable: granted df usage privileges to "public"',
        'pg_durable: revoked df usage privileges granted by "postgres" from "PUBLIC"',
    ]


def test_grant_usage_to_a_role_named_Public_does_not_grant_to_everybody(
    conn: Conn, tenants: TenantFactory
) -> None:
    bystander = tenants(grant=False)
    conn.execute('CREATE ROLE "Public" LOGIN')
    try:
        conn.execute("SELECT df.grant_usage('Public')")
        assert conn.execute("SELECT has_schema_privilege('Public', 'df', 'USAGE')").fetchone() == (
            True,
        )
        # Only "Public" was meant; every other role must not have gained df usage.
        assert bystander.value("SELECT has_schema_privilege('df', 'USAGE')") is False
    finally:
        conn.execute("SELECT df.revoke_usage('public')")
        conn.execute('DROP OWNED BY "Public"')
        conn.execute('DROP ROLE "Public"')


HTTP = "df.http(text,text,text,jsonb,integer)"


def test_delegated_admins_cannot_widen_http_access(su: Conn, make_role: RoleFactory) -> None:
    admin, user = make_role(grant=False), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    refused = Error(
        f'pg_durable: "{admin.name}" cannot grant HTTP access: it does not hold EXECUTE on'
        f" {HTTP} WITH GRANT OPTION"
    )
    check(admin.conn, [(f"df.grant_usage('{user.name}', include_http => true)", refused)])
    # Holding df.http without the grant option is not enough either (PostgreSQL would only
    # warn and grant nothing), and nothing at all was granted by the refused calls.
    su.execute("SELECT df.grant_usage(%s, include_http => true)", (admin.name,))
    check(admin.conn, [(f"df.grant_usage('{user.name}', include_http => true)", refused)])
    assert privileges_of(su, user.name) == [(expr, False) for expr, _ in PRIVILEGES]
    assert not outcome(su, f"has_function_privilege(%s, '{HTTP}', 'EXECUTE')", [user.name])
    # An admin made with both may pass HTTP on.
    su.execute("SELECT df.grant_usage(%s, true, true)", (admin.name,))
    admin.conn.execute("SELECT df.grant_usage(%s, include_http => true)", (user.name,))
    assert outcome(su, f"has_function_privilege(%s, '{HTTP}', 'EXECUTE')", [user.name])
    # A plain user cannot grant at all, and the error says why.
    other = make_role()
    check(
        other.conn,
        [(f"df.grant_usage('{user.name}')", Error("permission denied for function grant_usage"))],
    )


def test_metrics_only_by_explicit_grant(su: Conn, make_role: RoleFactory) -> None:
    user, admin = make_role(), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    start(user.conn)
    done = start(user.conn)
    set_status(su, done, "completed")
    start(su)
    columns = (
        "total_instances, running_instances, completed_instances, failed_instances,"
        " total_executions, total_events"
    )
    check(
        user.conn,
        [
            (
                f"(SELECT row({columns}) FROM df.metrics())",
                Error("permission denied for function metrics"),
            )
        ],
    )
    # System-wide: the admin counts instances it cannot see.
    row = admin.conn.execute(f"SELECT {columns} FROM df.metrics()").fetchone()
    assert row == (3, 2, 1, 0, 3, 0)
    check(admin.conn, [("(SELECT count(*) FROM df.instances)", 0)])
    # GRANT EXECUTE is the other explicit way.
    su.execute(f"GRANT EXECUTE ON FUNCTION df.metrics() TO {quote(user.name)}")
    assert user.conn.execute("SELECT total_instances FROM df.metrics()").fetchone() == (3,)


def grants_on(conn: Conn, table: str, column: str, role: str) -> list[tuple[str, bool]]:
    """(grantor, grantable) of the column privileges ``role`` holds on ``table.column``."""
    rows = conn.execute(
        "SELECT g.rolname, a.is_grantable"
        "  FROM pg_attribute att, aclexplode(att.attacl) a, pg_roles g"
        " WHERE att.attrelid = %s::regclass AND att.attname = %s"
        "   AND a.grantee = %s::regrole AND g.oid = a.grantor ORDER BY 1",
        (table, column, quote(role)),
    ).fetchall()
    return [(str(g), bool(o)) for g, o in rows]


def test_refresh_grants_renews_every_grant_from_its_grantor(
    su: Conn, make_role: RoleFactory
) -> None:
    """After an upgrade, roles granted usage earlier get what the new version grants."""
    admin, user, web = make_role(grant=False), make_role(grant=False), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, include_http => true, with_grant => true)", (admin.name,))
    su.execute("SELECT df.grant_usage(%s, include_http => true)", (web.name,))
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    # What an older version did not grant (migrations 7 and 10 added these).
    su.execute(f"REVOKE EXECUTE ON FUNCTION df.metrics() FROM {quote(admin.name)} CASCADE")
    su.execute(f"REVOKE INSERT (instance_id) ON df._signals FROM {quote(web.name)}")
    admin.conn.execute(f"REVOKE INSERT (instance_id) ON df._signals FROM {quote(user.name)}")
    assert grants_on(su, "df._signals", "instance_id", user.name) == []

    seen = notices_of(su)
    su.execute("SELECT df.refresh_grants()")
    assert sorted(seen) == sorted(
        ("NOTICE", f'pg_durable: granted df usage privileges to "{r.name}"')
        for r in (admin, web, user)
    )
    assert outcome(
        su, "has_function_privilege(%s, 'df.metrics()', 'EXECUTE WITH GRANT OPTION')", [admin.name]
    )
    # Each grant comes back from its own grantor, so that grantor's revoke still removes it.
    assert grants_on(su, "df._signals", "instance_id", web.name) == [("postgres", False)]
    assert grants_on(su, "df._signals", "instance_id", user.name) == [(admin.name, False)]
    assert outcome(su, f"has_function_privilege(%s, '{HTTP}', 'EXECUTE')", [web.name])
    assert not outcome(su, f"has_function_privilege(%s, '{HTTP}', 'EXECUTE')", [user.name])
    assert not outcome(su, "has_function_privilege(%s, 'df.metrics()', 'EXECUTE')", [web.name])
    admin.conn.execute("SELECT df.revoke_usage(%s)", (user.name,))
    assert privileges_of(su, user.name) == [(expr, False) for expr, _ in PRIVILEGES]


def test_refresh_grants_names_the_grantor_it_cannot_act_for(
    su: Conn, make_role: RoleFactory
) -> None:
    admin, user, operator = make_role(grant=False), make_role(grant=False), make_role(grant=False)
    su.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    su.execute(f"GRANT EXECUTE ON FUNCTION df.refresh_grants() TO {quote(operator.name)}")
    su.execute(f"GRANT USAGE ON SCHEMA df TO {quote(operator.name)}")
    seen = notices_of(operator.conn)
    operator.conn.execute("SELECT df.refresh_grants()")
    assert (
        "NOTICE",
        f'pg_durable: "{user.name}" was granted df usage by "{admin.name}", who must run'
        f" SELECT df.grant_usage('{user.name}', f, f) again to grant what this version adds",
    ) in seen
    # It granted nothing in anybody's name.
    assert grants_on(su, "df._signals", "instance_id", user.name) == [(admin.name, False)]


def test_refresh_grants_leaves_the_callers_role_as_it_was(
    conn: Conn, tenants: TenantFactory
) -> None:
    tenants()  # at least one grant to renew
    caller = f"r_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {caller} NOLOGIN")
    conn.execute(f"GRANT EXECUTE ON FUNCTION df.refresh_grants() TO {caller}")
    conn.execute(f"GRANT USAGE ON SCHEMA df TO {caller}")
    try:
        conn.execute(f"SET ROLE {caller}")
        conn.execute("SELECT df.refresh_grants()")
        who = conn.execute("SELECT current_user::text").fetchone()
        conn.execute("RESET ROLE")
        assert who == (caller,)
    finally:
        conn.execute("RESET ROLE")
        conn.execute(f"DROP OWNED BY {caller}")
        conn.execute(f"DROP ROLE {caller}")


def test_refresh_grants_by_a_non_member_grants_nothing_in_others_names(
    conn: Conn, tenants: TenantFactory
) -> None:
    admin, user, caller = tenants(grant=False), tenants(grant=False), tenants(grant=False)
    conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (admin.name,))
    admin.conn.execute("SELECT df.grant_usage(%s)", (user.name,))
    # pretend an upgrade added something: take a privilege away from user, keep USAGE
    conn.execute(f"REVOKE SELECT ON df.nodes FROM {user.name} CASCADE")
    admin.conn.execute(f"REVOKE SELECT ON df.nodes FROM {user.name}")
    conn.execute(f"GRANT EXECUTE ON FUNCTION df.refresh_grants() TO {caller.name}")
    conn.execute(f"GRANT USAGE ON SCHEMA df TO {caller.name}")
    acl = "SELECT relacl::text FROM pg_class WHERE oid = 'df.nodes'::regclass"
    before = conn.execute(acl).fetchone()
    caller.conn.execute("SELECT df.refresh_grants()")
    assert conn.execute(acl).fetchone() == before


def test_refresh_grants_does_not_widen_a_plain_usage_grant(
    conn: Conn, tenants: TenantFactory
) -> None:
    monitor = tenants(grant=False)
    conn.execute(f"GRANT USAGE ON SCHEMA df TO {monitor.name} WITH GRANT OPTION")
    conn.execute("SELECT df.refresh_grants()")
    got = conn.execute(
        "SELECT has_any_column_privilege(%s, 'df.instances', 'INSERT'),"
        " has_function_privilege(%s, 'df.metrics()', 'EXECUTE')",
        (monitor.name, monitor.name),
    ).fetchone()
    assert got == (False, False)


# -- tenancy beyond row-level security ------------------------------------------------------------


def test_users_may_only_cancel_their_instances(su: Conn, make_role: RoleFactory) -> None:
    user = make_role()
    running, done = start(user.conn), start(user.conn)
    set_status(su, running, "running")
    set_status(su, done, "completed")

    def update(instance: str, status: str) -> object:
        try:
            user.conn.execute(
                "UPDATE df.instances SET status = %s WHERE id = %s", (status, instance)
            )
        except psycopg.Error as e:
            return Error(e.diag.message_primary or "")
        return None

    for status in ("completed", "failed", "pending"):
        assert update(running, status) == Error(
            f"permission denied to change the status of instance {running} from running to {status}"
        )
    for status in ("running", "cancelled"):
        assert update(done, status) == Error(
            f"permission denied to change the status of instance {done} from completed to {status}"
        )
    assert update(running, "running") is None
    check(su, [(f"df.status('{running}')", "running"), (f"df.status('{done}')", "completed")])
    assert update(running, "cancelled") is None
    check(su, [(f"df.status('{running}')", "cancelled")])


def test_bypassrls_roles_cannot_act_for_others(su: Conn, make_role: RoleFactory) -> None:
    """BYPASSRLS lets a role read every row; it must not let it write in another's name."""
    victim, intruder = make_role(), make_role()
    su.execute(f"ALTER ROLE {quote(intruder.name)} BYPASSRLS")
    check(victim.conn, [("df.setvar('table', 'accounts')", "OK")])
    theirs = start(victim.conn)
    forged = Error(
        f"permission denied: submitted_by of a row in df.instances must be the current role"
        f' "{intruder.name}"'
    )

    def run(sql: str, params: tuple[object, ...] = ()) -> object:
        try:
            intruder.conn.execute(sql, params)
        except psycopg.Error as e:
            return Error(e.diag.message_primary or "")
        return None

    for who in (victim.name, "postgres"):
        assert (
            run(
                "INSERT INTO df.instances (id, root_node, submitted_by) VALUES"
                " ('0000abcd', '0000abce', %s::regrole)",
                (quote(who),),
            )
            == forged
        )
    owner_error = Error(
        f'permission denied: owner of a row in df.vars must be the current role "{intruder.name}"'
    )
    assert (
        run(
            "INSERT INTO df.vars (name, value, owner) VALUES ('x', 'y', %s::regrole)",
            (quote(victim.name),),
        )
        == owner_error
    )
    assert run("UPDATE df.vars SET value = 'accounts; DROP TABLE t'") == owner_error
    assert run("DELETE FROM df.vars") == owner_error
    check(
        intruder.conn,
        [
            (
                f"df.signal('{theirs}', 'go')",
                Error(f"Instance not found or access denied: {theirs}"),
            ),
            (
                f"df.cancel('{theirs}') = 'Failed to cancel: permission denied: submitted_by of"
                f' a row in df.instances must be the current role "{intruder.name}"\'',
                True,
            ),
            # Reading is what BYPASSRLS is for.
            (f"df.status('{theirs}')", "pending"),
        ],
    )
    check(victim.conn, [("df.getvar('table')", "accounts"), (f"df.status('{theirs}')", "pending")])
