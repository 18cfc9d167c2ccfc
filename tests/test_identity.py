"""Identity (docs/roles.md): steps run as the submitting role, logged in as it, and
cannot reach the worker's privileges or forge progress."""

from __future__ import annotations

import time

import psycopg
import pytest
import test_attacks as attacks
from conftest import App, ThreadWorker
from test_attacks import Conn, TenantFactory

from pgdurable.embedded import EmbeddedPostgres

tenants = attacks.tenants  # the fixture


def only_row(app: App, instance: str) -> dict[str, object]:
    result = app.result(instance)
    assert isinstance(result, dict), app.nodes(instance)
    row = result["rows"][0]
    assert isinstance(row, dict)
    return row


def error_of(app: App, instance: str) -> str:
    return " | ".join(str(n["result"]) for n in app.nodes(instance) if n["status"] == "failed")


def test_steps_run_logged_in_as_the_submitter(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "'SELECT current_user::text AS cu, session_user::text AS su,"
        " current_setting(''df.in_workflow'') AS in_wf,"
        " current_setting(''application_name'') AS app_name'"
    )
    assert status == "completed"
    assert only_row(app, instance) == {
        "cu": app.role,
        "su": app.role,
        "in_wf": "true",
        "app_name": "pg_durable:worker:workflow-sql",
    }
    row = app.conn.execute(
        "SELECT submitted_by::text FROM df.instances WHERE id = %s", (instance,)
    ).fetchone()
    assert row == (app.role,)


@pytest.mark.parametrize(
    "attempt",
    [
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "SELECT set_config(''role'', ''postgres'', false)",
        "SELECT set_config(''session_authorization'', ''postgres'', false)",
    ],
)
def test_escalation_to_the_worker_role_fails(app: App, worker: ThreadWorker, attempt: str) -> None:
    instance, status = app.run(f"'{attempt}' ~> 'SELECT current_user::text AS cu'")
    assert status == "failed"
    assert "permission denied" in error_of(app, instance)


def test_reset_role_stays_the_submitter(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'RESET ROLE' ~> 'SELECT current_user::text AS cu'")
    assert status == "completed"
    assert only_row(app, instance) == {"cu": app.role}


def test_steps_have_exactly_the_roles_privileges(
    app: App, worker: ThreadWorker, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute("CREATE TABLE public.secret (s text)")
    conn.execute("INSERT INTO public.secret VALUES ('x')")
    instance, status = app.run("'SELECT s FROM public.secret'")
    assert status == "failed"
    assert "permission denied for table secret" in error_of(app, instance)
    conn.execute(f"GRANT SELECT ON public.secret TO {app.role}")
    instance, status = app.run("'SELECT s FROM public.secret'")
    assert status == "completed"


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("SELECT * FROM df._tasks", "permission denied for table _tasks"),
        ("SELECT state FROM df._runs", "permission denied for table _runs"),
        (
            "SELECT * FROM df._checkpoint(1, gen_random_uuid(), ''{}'', gen_random_uuid(), 0, 1)",
            "is no longer held by this worker",
        ),
        ("SELECT * FROM df._checkpoint_begin(1, gen_random_uuid())", None),
        ("UPDATE df.nodes SET status = ''completed''", "permission denied for table nodes"),
        ("SELECT df.setvar(''a'', ''b'')", "df.setvar() cannot be called inside a workflow"),
    ],
)
def test_user_sql_cannot_reach_engine_state(
    app: App, worker: ThreadWorker, step: str, message: str | None
) -> None:
    instance, status = app.run(f"'{step}'")
    if message is None:  # a forged begin just sees no task: nothing to lock or read
        assert status == "completed"
        assert app.result(instance) == {"rows": [], "row_count": 0}
    else:
        assert status == "failed"
        assert message in error_of(app, instance)


def test_guessing_a_live_task_token_is_refused(
    app: App, worker: ThreadWorker, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    # A real task id of a running instance, with a token the user cannot know.
    sleeper = app.start("df.sleep(30)")
    deadline = time.monotonic() + 10
    while (
        row := conn.execute(
            "SELECT id FROM df._tasks WHERE instance_id = %s AND kind = 'timer'", (sleeper,)
        ).fetchone()
    ) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    task_id = row[0]
    with pytest.raises(psycopg.Error, match="no longer held"):
        app.conn.execute(
            "SELECT * FROM df._checkpoint(%s, gen_random_uuid(),"
            ' \'{"outcome": {"status": "completed", "output": "forged"}}\','
            " gen_random_uuid(), 0, 1)",
            (task_id,),
        )
    assert app.conn.execute("SELECT df.status(%s)", (sleeper,)).fetchone() == ("running",)
    app.conn.execute("SELECT df.cancel(%s)", (sleeper,))


def test_session_state_does_not_leak_between_steps(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run(
        "'SELECT set_config(''search_path'', ''pg_catalog'', false) AS p'"
        " ~> 'CREATE TEMP TABLE leak (x int)'"
        " ~> 'SELECT current_setting(''search_path'') AS p,"
        " to_regclass(''pg_temp.leak'') IS NULL AS no_temp'"
    )
    assert status == "completed", error_of(app, instance)
    assert only_row(app, instance) == {"p": "app, public", "no_temp": True}


def test_no_kind_of_session_state_reaches_the_next_step(app: App, worker: ThreadWorker) -> None:
    # One step after another on the same pooled connection (sequential steps go back to the
    # pool and out again): each leaves something behind, the last looks for all of it.
    instance, status = app.run(
        "'SELECT set_config(''work_mem'', ''7MB'', false)'"
        " ~> 'LISTEN leak_channel'"
        " ~> 'PREPARE leak_statement AS SELECT 1'"
        " ~> 'DECLARE leak_cursor CURSOR WITH HOLD FOR SELECT 1'"
        " ~> 'SELECT current_setting(''work_mem'') AS work_mem,"
        " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
        " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared,"
        " (SELECT count(*) FROM pg_cursors WHERE left(name, 4) = ''leak'') AS cursors,"
        " pg_backend_pid() AS pid'"
    )
    assert status == "completed", error_of(app, instance)
    row = only_row(app, instance)
    assert row.pop("pid")
    assert row == {"work_mem": "4MB", "listening": 0, "prepared": 0, "cursors": 0}


def test_set_role_before_start_is_respected(
    app: App, worker: ThreadWorker, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    conn.execute(f"SET ROLE {app.role}")
    row = conn.execute("SELECT df.start('SELECT current_user::text AS cu')").fetchone()
    conn.execute("RESET ROLE")
    assert row is not None
    assert app.wait(str(row[0])) == "completed"
    assert only_row(app, str(row[0])) == {"cu": app.role}


def test_superuser_instances_are_refused_by_default(
    conn: psycopg.Connection[tuple[object, ...]], worker: ThreadWorker
) -> None:
    with pytest.raises(psycopg.Error, match="superuser instances are disabled"):
        conn.execute("SELECT df.start('SELECT 1')")


def forge_superuser_instance(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    """Rows written by hand, as a BYPASSRLS role could, skipping df.start's checks."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO df.instances (id, root_node, submitted_by)"
            " VALUES ('0000beef', '0000cafe', 'postgres')"
        )
        conn.execute(
            "INSERT INTO df.nodes (id, instance_id, node_type, query, submitted_by)"
            " VALUES ('0000cafe', '0000beef', 'SQL', 'SELECT current_user::text AS cu',"
            " 'postgres')"
        )
    return "0000beef"


def wait_status(conn: psycopg.Connection[tuple[object, ...]], instance: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        row = conn.execute("SELECT status FROM df.instances WHERE id = %s", (instance,)).fetchone()
        assert row is not None
        if row[0] in ("completed", "failed", "cancelled"):
            return str(row[0])
        assert time.monotonic() < deadline, row
        time.sleep(0.05)


def test_worker_refuses_forged_superuser_instances(
    conn: psycopg.Connection[tuple[object, ...]], worker: ThreadWorker
) -> None:
    instance = forge_superuser_instance(conn)
    assert wait_status(conn, instance) == "failed"
    row = conn.execute("SELECT output FROM df._runs WHERE instance_id = %s", (instance,)).fetchone()
    assert row == (
        f'pg_durable blocked instance {instance}: submitted_by role "postgres" is a superuser,'
        " but pg_durable.enable_superuser_instances is off",
    )


def test_a_users_session_set_does_not_enable_superuser_instances(
    conn: psycopg.Connection[tuple[object, ...]], worker: ThreadWorker
) -> None:
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    try:
        row = conn.execute("SELECT df.start('SELECT 1')").fetchone()
    except psycopg.Error:
        return  # refused at start: fine too
    assert row is not None
    assert wait_status(conn, str(row[0])) == "failed"


def test_server_setting_enables_superuser_instances(
    cluster, dbname: str, conn: psycopg.Connection[tuple[object, ...]]
) -> None:  # type: ignore[no-untyped-def]
    conn.execute(f"ALTER DATABASE {dbname} SET pg_durable.enable_superuser_instances = on")
    w = ThreadWorker(cluster.dsn(dbname), concurrency=2)
    try:
        instance = forge_superuser_instance(conn)
        assert wait_status(conn, instance) == "completed"
    finally:
        w.stop()


def test_role_dropped_mid_run_fails_the_instance(
    cluster, dbname: str, conn: psycopg.Connection[tuple[object, ...]], worker: ThreadWorker
) -> None:  # type: ignore[no-untyped-def]
    conn.execute("CREATE ROLE doomed LOGIN")
    conn.execute("SELECT df.grant_usage('doomed')")
    try:
        with psycopg.connect(cluster.dsn(dbname, user="doomed"), autocommit=True) as c:
            # The first step leaves a pooled connection logged in as the role.
            row = c.execute("SELECT df.start('SELECT 1' ~> df.sleep(2) ~> 'SELECT 2')").fetchone()
        assert row is not None
        instance = str(row[0])
        deadline = time.monotonic() + 10
        while conn.execute(
            "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SLEEP'"
            " AND status = 'running'",
            (instance,),
        ).fetchone() != (1,):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        conn.execute("SELECT df.revoke_usage('doomed')")
        conn.execute("DROP OWNED BY doomed")
        conn.execute("DROP ROLE doomed")
    assert wait_status(conn, instance) == "failed"
    errors = conn.execute(
        "SELECT result #>> '{}' FROM df.nodes WHERE instance_id = %s AND status = 'failed'",
        (instance,),
    ).fetchall()
    assert errors
    assert all("no longer exists" in e[0] or "does not exist" in e[0] for e in errors), errors


def test_security_definer_functions_behave_as_postgresql_defines(
    cluster,
    dbname: str,
    app: App,
    worker: ThreadWorker,
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:  # type: ignore[no-untyped-def]
    """Inside a SECURITY DEFINER function current_user is its owner: a step gets the owner's
    privileges only within the function, and df.start there submits as the owner."""
    conn.execute("CREATE ROLE definer_owner LOGIN")
    try:
        conn.execute("SELECT df.grant_usage('definer_owner')")
        conn.execute("CREATE TABLE public.secret (v text)")
        conn.execute("INSERT INTO public.secret VALUES ('owner only')")
        conn.execute("GRANT SELECT ON public.secret TO definer_owner")
        conn.execute(
            "CREATE FUNCTION public.peek() RETURNS text LANGUAGE sql SECURITY DEFINER"
            " SET search_path = pg_catalog AS $$ SELECT v FROM public.secret $$"
        )
        conn.execute(
            "CREATE FUNCTION public.launch() RETURNS text LANGUAGE sql SECURITY DEFINER"
            " SET search_path = pg_catalog"
            " AS $$ SELECT df.start('SELECT current_user::text AS cu') $$"
        )
        conn.execute("ALTER FUNCTION public.peek() OWNER TO definer_owner")
        conn.execute("ALTER FUNCTION public.launch() OWNER TO definer_owner")
        conn.execute(f"GRANT EXECUTE ON FUNCTION public.peek(), public.launch() TO {app.role}")

        instance, status = app.run(
            "'SELECT public.peek() AS v, current_user::text AS cu'"
            " ~> 'SELECT count(*) FROM public.secret'"
        )
        assert status == "failed"
        assert "permission denied for table secret" in error_of(app, instance)
        first = next(n for n in app.nodes(instance) if n["status"] == "completed")
        assert first["result"]["rows"] == [{"v": "owner only", "cu": app.role}]  # type: ignore[index]

        row = app.conn.execute("SELECT public.launch()").fetchone()
        assert row is not None
        launched = str(row[0])
        assert wait_status(conn, launched) == "completed"
        assert conn.execute(
            "SELECT i.submitted_by::text, n.result -> 'rows' FROM df.instances i"
            " JOIN df.nodes n ON n.id = i.root_node AND n.instance_id = i.id WHERE i.id = %s",
            (launched,),
        ).fetchone() == ("definer_owner", [{"cu": "definer_owner"}])
        # The caller cannot see it: it is the owner's instance.
        assert app.conn.execute("SELECT df.status(%s)", (launched,)).fetchone() == (None,)
    finally:
        conn.execute("DROP OWNED BY definer_owner CASCADE")
        conn.execute("DROP ROLE definer_owner")


def test_role_names_that_need_quoting_run_end_to_end(
    cluster, dbname: str, conn: psycopg.Connection[tuple[object, ...]], worker: ThreadWorker
) -> None:  # type: ignore[no-untyped-def]
    name = 'Odd "Name" ünï'
    quoted = '"Odd ""Name"" ünï"'
    conn.execute(f"CREATE ROLE {quoted} LOGIN")
    try:
        conn.execute("SELECT df.grant_usage(%s)", (name,))
        with psycopg.connect(cluster.dsn(dbname), user=name, autocommit=True) as c:
            c.execute("SELECT df.setvar('who', 'me')")
            row = c.execute(
                "SELECT df.start('SELECT current_user::text AS cu, ''{who}'' AS v')"
            ).fetchone()
            assert row is not None
            instance = str(row[0])
            assert wait_status(conn, instance) == "completed", conn.execute(
                "SELECT output FROM df._runs WHERE instance_id = %s", (instance,)
            ).fetchone()
            result = c.execute("SELECT df.result(%s)::jsonb", (instance,)).fetchone()
        assert result is not None
        assert result[0]["rows"] == [{"cu": name, "v": "me"}]
    finally:
        conn.execute(f"DROP OWNED BY {quoted} CASCADE")
        conn.execute(f"DROP ROLE {quoted}")


ODD_NAMES = ["Upper", "a.b", '"q"', "sp ace ", "current_user", "select", "ünï", 'x""y', "o'k"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_role_names_write_only_under_their_own_name(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, tenants: TenantFactory, name: str
) -> None:
    victim = tenants()
    quoted = '"' + name.replace('"', '""') + '"'
    conn.execute(f"CREATE ROLE {quoted} LOGIN")
    conn.execute("SELECT df.grant_usage(%s)", (name,))
    try:
        dsn = psycopg.conninfo.make_conninfo(cluster.dsn(dbname), user=name)
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("SELECT df.setvar('k', 'v')")
            c.execute("INSERT INTO df.vars (name, value) VALUES ('k2', 'v')")
            own = c.execute("SELECT df.start('SELECT 1')").fetchone()
            assert own is not None
            with pytest.raises(psycopg.Error), c.transaction():
                c.execute(
                    "INSERT INTO df.vars (name, value, owner) VALUES ('k3', 'v', %s::regrole)",
                    (victim.name,),
                )
        rows = conn.execute(
            "SELECT DISTINCT owner::oid FROM df.vars UNION ALL"
            " SELECT DISTINCT submitted_by::oid FROM df.instances"
        ).fetchall()
        oid = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        assert set(rows) == {oid}
    finally:
        conn.execute(f"DROP OWNED BY {quoted} CASCADE")
        conn.execute(f"DROP ROLE {quoted}")


def test_group_roles_without_login_cannot_submit(
    app: App, conn: psycopg.Connection[tuple[object, ...]]
) -> None:
    """A role may confer privileges through membership but cannot submit: no worker can log
    in as it. SET ROLE to it is refused at start with a clear error."""
    conn.execute("CREATE ROLE app_group NOLOGIN")
    try:
        conn.execute("SELECT df.grant_usage('app_group')")
        conn.execute(f"GRANT app_group TO {app.role}")
        app.conn.execute("SET ROLE app_group")
        with pytest.raises(psycopg.Error) as err:
            app.conn.execute("SELECT df.start('SELECT 1')")
        assert err.value.diag.message_primary == (
            'current_user "app_group" does not have LOGIN privilege. The background worker must'
            " connect as this role to execute SQL. Grant LOGIN to this role or call df.start()"
            " as a role with LOGIN."
        )
        app.conn.execute("RESET ROLE")
    finally:
        conn.execute("DROP OWNED BY app_group CASCADE")
        conn.execute("DROP ROLE app_group")
