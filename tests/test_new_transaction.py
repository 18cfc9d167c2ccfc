"""df.start(..., transaction_mode => 'new') (docs/roles.md): the start commits on a loopback
connection of its own, logged in as the caller's session user and SET ROLE to its current
user, under a cross-session launch limit."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import test_attacks as attacks
from conftest import App, ThreadWorker
from sqlcheck import Conn, Error, outcome
from test_attacks import TenantFactory, poll

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres

tenants = attacks.tenants  # the fixture

LOCK_CLASS = 1346982470  # ASCII "PGDF"
LOOPBACK_APP = "pg_durable:backend:new-transaction"
IN_WORKFLOW = (
    "df.start() with transaction_mode => 'new' cannot be called inside a workflow - a "
    "workflow step's df.start already commits with the step; use the default transaction_mode"
)
NEEDS_DBLINK = (
    "df.start(): transaction_mode => 'new' needs the dblink extension; ask an administrator "
    "to run CREATE EXTENSION dblink"
)


def limit_error(max_starts: int, timeout: int) -> str:
    return (
        "pg_durable: transaction_mode => 'new' launch limit reached "
        f"(max_new_transaction_starts={max_starts}). Timed out after {timeout}s waiting for a "
        "launch slot before opening the loopback session."
    )


def no_login(role: str) -> str:
    return (
        f'current_user "{role}" does not have LOGIN privilege. The background worker must '
        "connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as "
        "a role with LOGIN."
    )


def cannot_set_role(role: str, login: str) -> str:
    return (
        f"df.start(): transaction_mode => 'new' cannot submit as role \"{role}\": the loopback "
        f'logs in as your session user "{login}", which may not SET ROLE to it '
        f'(permission denied to set role "{role}")'
    )


def start_new(conn: Conn, fut: str, label: str | None = None) -> object:
    """df.start(fut, label, transaction_mode => 'new'): the id, or Error(message)."""
    return outcome(conn, "df.start(%s, %s, transaction_mode => 'new')", [fut, label])


def instances(su: Conn) -> list[tuple[Any, ...]]:
    """Every instance (id, label, submitted_by, status), as the superuser sees them."""
    return su.execute(
        "SELECT id, label, submitted_by::text, status FROM df.instances ORDER BY created_at"
    ).fetchall()


def slots_held(su: Conn, pid: int) -> int:
    row = su.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
        " AND pid = %s AND granted",
        (LOCK_CLASS, pid),
    ).fetchone()
    assert row is not None
    return int(row[0])


def assert_no_loopback_left(su: Conn) -> None:
    """Every loopback connection was closed (backends exit shortly after the disconnect)."""
    deadline = time.monotonic() + 10
    while True:
        row = su.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (LOOPBACK_APP,)
        ).fetchone()
        if row == (0,):
            return
        assert time.monotonic() < deadline, "a loopback connection was left open"
        time.sleep(0.05)


class Roles:
    """Cluster-wide roles made for one test (odd names welcome), dropped afterwards."""

    def __init__(self, cluster: EmbeddedPostgres, dbname: str, su: Conn) -> None:
        self.cluster, self.dbname, self.su = cluster, dbname, su
        self.made: list[str] = []
        self.conns: list[Conn] = []

    def create(self, prefix: str = "pgd_new_", options: str = "LOGIN", grant: bool = True) -> str:
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        ident = self.quote(name)
        self.su.execute(f"CREATE ROLE {ident} {options}")
        self.made.append(name)
        if grant:
            self.su.execute("SELECT df.grant_usage(%s)", (name,))
        return name

    def quote(self, name: str) -> str:
        row = self.su.execute("SELECT quote_ident(%s)", (name,)).fetchone()
        assert row is not None
        return str(row[0])

    def connect(self, name: str) -> Conn:
        """An autocommit connection logged in as the role (any name: libpq quotes it)."""
        c = psycopg.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            dbname=self.dbname,
            user=name,
            autocommit=True,
        )
        self.conns.append(c)
        return c

    def drop(self) -> None:
        for c in self.conns:
            c.close()
        for name in reversed(self.made):
            ident = self.quote(name)
            self.su.execute(f"DROP OWNED BY {ident} CASCADE")
            self.su.execute(f"DROP ROLE {ident}")


@pytest.fixture
def roles(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[Roles]:
    r = Roles(cluster, dbname, conn)
    yield r
    r.drop()


# -- what it does -------------------------------------------------------------------------------


def test_the_start_commits_on_its_own(app: App, conn: Conn) -> None:
    with app.conn.transaction(force_rollback=True):
        got = start_new(app.conn, "SELECT 1", "mine")
        assert isinstance(got, str), got
        # Committed already: another session sees it while the caller's transaction is open.
        assert instances(conn) == [(got, "mine", app.role, "pending")]
        # Case-insensitive, like 'caller'.
        other = outcome(app.conn, "df.start('SELECT 2', transaction_mode => 'NEW')")
        assert isinstance(other, str), other
    # The caller rolled back; both instances stay.
    assert [row[0] for row in instances(conn)] == [got, other]
    assert slots_held(conn, app.conn.info.backend_pid) == 0
    assert_no_loopback_left(conn)


def test_runs_under_a_worker_without_the_callers_uncommitted_variables(
    app: App, worker: ThreadWorker
) -> None:
    app.conn.execute("SELECT df.setvar('greeting', 'committed')")
    with app.conn.transaction():
        app.conn.execute("SELECT df.setvar('greeting', 'uncommitted')")
        graph = "SELECT '{greeting}' AS g, current_user::text AS u"
        started = start_new(app.conn, graph)
        assert isinstance(started, str), started
        caller = app.start("%s", (graph,))
    # The loopback saw only committed variables; caller mode sees its own transaction's.
    assert app.wait(started) == "completed"
    assert app.result(started) == {"rows": [{"g": "committed", "u": app.role}], "row_count": 1}
    assert app.wait(caller) == "completed"
    assert app.result(caller) == {"rows": [{"g": "uncommitted", "u": app.role}], "row_count": 1}


def test_set_role_submits_as_the_effective_role(app: App, roles: Roles, conn: Conn) -> None:
    other = roles.create()
    conn.execute(f"GRANT {other} TO {app.role}")
    app.conn.execute(f"SET ROLE {other}")
    got = start_new(app.conn, "SELECT 1")
    assert isinstance(got, str), got
    app.conn.execute("RESET ROLE")
    assert instances(conn) == [(got, None, other, "pending")]


def test_a_role_without_login_is_refused(app: App, roles: Roles, conn: Conn) -> None:
    group = roles.create(options="NOLOGIN")
    conn.execute(f"GRANT {group} TO {app.role}")
    app.conn.execute(f"SET ROLE {group}")
    assert start_new(app.conn, "SELECT 1") == Error(no_login(group))
    app.conn.execute("RESET ROLE")
    assert instances(conn) == []


def test_errors_of_the_start_come_back_readable(app: App, conn: Conn) -> None:
    prefix = "df.start() on new transaction failed: "
    cases = [
        (
            '{"node_type":"THEN"}',
            "Invalid durable function graph: root: THEN nodes require left_node and right_node",
        ),
        (
            '{"node_type":"NOPE"}',
            "Invalid durable function: Unknown node_type 'NOPE'. Valid types: SQL, THEN, IF, "
            "JOIN, LOOP, BREAK, RACE, SLEEP, WAIT_SCHEDULE, HTTP, HTTP_MULTIPART, SIGNAL, "
            "RETRY, TIMEOUT, CALL, MAP",
        ),
    ]
    for fut, message in cases:
        assert start_new(app.conn, fut) == Error(prefix + message)
    assert outcome(
        app.conn, "df.start('SELECT 1', NULL, 'no_such_db', transaction_mode => 'new')"
    ) == Error(prefix + 'database "no_such_db" does not exist')
    # The SQLSTATE is the loopback's.
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        app.conn.execute("SELECT df.start('{\"node_type\":\"THEN\"}', transaction_mode => 'new')")
    # Checked before any connection is made.
    assert outcome(app.conn, "df.start(NULL, transaction_mode => 'new')") == Error(
        "df.start(): fut cannot be NULL"
    )
    assert instances(conn) == []
    assert slots_held(conn, app.conn.info.backend_pid) == 0
    assert_no_loopback_left(conn)


def test_superuser_settings_of_the_session_do_not_carry_over(conn: Conn) -> None:
    """The loopback starts from the server's settings, as workers do: a superuser's
    SET pg_durable.enable_superuser_instances in its own session does not count."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    got = start_new(conn, "SELECT 1")
    assert isinstance(got, Error)
    assert got.message.startswith(
        "df.start() on new transaction failed: pg_durable: superuser instances are disabled."
    )
    assert instances(conn) == []


# -- the launch limit ---------------------------------------------------------------------------


def test_launch_limit(app: App, cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> None:
    holders = [psycopg.connect(cluster.dsn(dbname), autocommit=True) for _ in range(2)]
    try:
        for slot, holder in enumerate(holders):
            holder.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, slot))
        # The administrator's limits (df.set_setting; tests/test_settings.py has the other
        # ways, and shows that the user's own SET counts for nothing).
        conn.execute("SELECT df.set_setting('pg_durable.new_transaction_start_timeout', '1')")

        # Both default slots (2) taken.
        began = time.monotonic()
        assert start_new(app.conn, "SELECT 1") == Error(limit_error(2, 1))
        assert 0.9 <= time.monotonic() - began < 5

        conn.execute("SELECT df.set_setting('pg_durable.max_new_transaction_starts', '1')")
        assert start_new(app.conn, "SELECT 1") == Error(limit_error(1, 1))
        assert instances(conn) == []
        assert_no_loopback_left(conn)

        # A third slot is free; unparsable or out-of-range settings fall back to the defaults.
        conn.execute("SELECT df.set_setting('pg_durable.max_new_transaction_starts', '3')")
        assert isinstance(start_new(app.conn, "SELECT 1"), str)

        # A slot freed while waiting is taken. (Were the unparsable maximum not 2, or the
        # out-of-range timeout not 5 s, this would fail. df.set_setting refuses both; the
        # owner can still write them into its table.)
        conn.execute(
            "UPDATE df._settings SET value = CASE name"
            " WHEN 'pg_durable.max_new_transaction_starts' THEN 'many' ELSE '0' END"
        )
        release = threading.Timer(0.5, holders[1].execute, ("SELECT pg_advisory_unlock_all()",))
        release.start()
        got = start_new(app.conn, "SELECT 1")
        release.join()
        assert isinstance(got, str), got
        assert len(instances(conn)) == 2
        assert slots_held(conn, app.conn.info.backend_pid) == 0
    finally:
        for holder in holders:
            holder.close()


# -- where it is refused ------------------------------------------------------------------------


def test_refused_inside_a_workflow(app: App, conn: Conn) -> None:
    app.conn.execute("SET df.in_workflow = 'true'")
    assert start_new(app.conn, "SELECT 1") == Error(IN_WORKFLOW)
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        app.conn.execute("SELECT df.start('SELECT 1', transaction_mode => 'new')")
    app.conn.execute("RESET df.in_workflow")
    assert instances(conn) == []


def test_refused_inside_a_workflow_step(app: App, worker: ThreadWorker) -> None:
    instance, status = app.run("'SELECT df.start(''SELECT 1'', transaction_mode => ''new'')'")
    assert status == "failed"
    assert IN_WORKFLOW in str(app.failure(instance))
    row = app.conn.execute("SELECT count(*) FROM df.instances").fetchone()
    assert row == (1,)


def test_without_dblink(app: App, conn: Conn) -> None:
    conn.execute("DROP EXTENSION dblink")
    assert start_new(app.conn, "SELECT 1") == Error(NEEDS_DBLINK)
    assert instances(conn) == []


def test_login_failure_of_the_loopback(app: App, conn: Conn) -> None:
    """The loopback is a login like any other: CONNECTION LIMIT (or pg_hba.conf) applies."""
    conn.execute(f"ALTER ROLE {app.role} CONNECTION LIMIT 1")
    try:
        with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection) as info:
            app.conn.execute("SELECT df.start('SELECT 1', transaction_mode => 'new')")
    finally:
        conn.execute(f"ALTER ROLE {app.role} CONNECTION LIMIT -1")
    diag = info.value.diag
    assert (diag.message_primary or "").startswith(
        "df.start(): transaction_mode => 'new' could not open its loopback connection as role "
        f'"{app.role}": connection to server on socket'
    )
    assert f'too many connections for role "{app.role}"' in (diag.message_primary or "")
    assert "pg_hba.conf" in (diag.message_hint or "")
    assert instances(conn) == []
    assert slots_held(conn, app.conn.info.backend_pid) == 0


def test_lock_timeout_in_the_loopback(app: App, conn: Conn) -> None:
    """The caller holds a lock the loopback needs (the variables it snapshots): the loopback
    gives up after its 30 s limits, and the caller gets a mapped error. Slow (30 s)."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with app.conn.transaction(force_rollback=True):
                app.conn.execute("LOCK TABLE df.vars IN ACCESS EXCLUSIVE MODE")
                app.conn.execute("SELECT df.start('SELECT 1', transaction_mode => 'new')")
        except psycopg.Error as e:
            errors.append(e)

    caller_pid = app.conn.info.backend_pid
    thread = threading.Thread(target=call)
    thread.start()
    try:
        # While it waits: the loopback is logged in as the caller, and holds a slot.
        deadline = time.monotonic() + 10
        while True:
            row = conn.execute(
                "SELECT usename::text, query FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                (LOOPBACK_APP,),
            ).fetchone()
            if row:
                break
            assert time.monotonic() < deadline, "the loopback never waited"
            time.sleep(0.1)
        assert row[0] == app.role
        assert str(row[1]).startswith("SELECT df.start('SELECT 1'::text, NULL::text, NULL::text)")
        assert slots_held(conn, caller_pid) == 1
    finally:
        thread.join(60)
    assert len(errors) == 1
    assert isinstance(errors[0], psycopg.Error)
    message = str(errors[0].diag.message_primary)
    # lock_timeout and statement_timeout are both 30 s; whichever fires first is reported.
    assert message.startswith("pg_durable: transaction_mode => 'new' launch hit "), message
    assert "timeout after 30000ms in the loopback session: canceling statement due to" in message
    assert "holds a lock the start needs" in str(errors[0].diag.message_hint)
    assert instances(conn) == []
    assert slots_held(conn, caller_pid) == 0
    assert_no_loopback_left(conn)


def test_a_cancelled_caller_cancels_the_loopback(app: App, conn: Conn) -> None:
    """The caller's own statement_timeout (or a cancel) interrupts the wait for the loopback,
    whose statement is cancelled in turn: nothing is written, nothing is left open."""
    with app.conn.transaction(force_rollback=True):
        app.conn.execute("LOCK TABLE df.vars IN ACCESS EXCLUSIVE MODE")
        app.conn.execute("SET LOCAL statement_timeout = '1s'")
        began = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            app.conn.execute("SELECT df.start('SELECT 1', transaction_mode => 'new')")
        assert time.monotonic() - began < 10
    assert_no_loopback_left(conn)
    assert instances(conn) == []
    assert slots_held(conn, app.conn.info.backend_pid) == 0


def _leftovers(conn: Conn) -> tuple[int, int]:
    loopbacks = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
        (LOOPBACK_APP,),
    ).fetchone()
    locks = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s",
        (LOCK_CLASS,),
    ).fetchone()
    assert loopbacks is not None and locks is not None
    return int(loopbacks[0]), int(locks[0])


def test_new_transaction_leaks_no_loopback_or_slot_on_errors_and_timeouts(
    conn: Conn, tenants: TenantFactory
) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    victim, attacker = tenants(), tenants()
    # 1. refused SET ROLE
    attacker.error(
        "SELECT df._start_in_new_transaction('SELECT 1', NULL, NULL, %s)", (victim.name,)
    )
    # 2. the caller's statement_timeout while the loopback waits for a lock the caller holds
    with pytest.raises(psycopg.Error), attacker.conn.transaction():
        attacker.conn.execute("LOCK TABLE df.vars IN ACCESS EXCLUSIVE MODE")
        attacker.conn.execute("SET LOCAL statement_timeout = '300ms'")
        attacker.conn.execute("SELECT df.start('SELECT 1', transaction_mode => 'new')")
    # 3. a validation error on the loopback
    attacker.error("SELECT df.start('{\"node_type\": \"NOPE\"}', transaction_mode => 'new')")
    poll(lambda: _leftovers(conn) == (0, 0), "no loopback sessions and no slot locks", 5)
    # and the session still works
    assert attacker.value("SELECT df.start('SELECT 1', transaction_mode => 'new')")


# -- identity and injection ---------------------------------------------------------------------


def test_security_definer_needs_a_role_the_login_may_become(
    app: App, roles: Roles, conn: Conn
) -> None:
    """Inside a SECURITY DEFINER function current_user is its owner; the loopback, logged in
    as the caller, may only become the owner if the caller's login role may SET ROLE to it."""
    app.conn.execute(
        "CREATE FUNCTION app.starter(mode text) RETURNS text SECURITY DEFINER LANGUAGE sql"
        " AS $$ SELECT df.start('SELECT 1', NULL, NULL, mode) $$"
    )
    caller = roles.create()
    app.conn.execute(f"GRANT USAGE ON SCHEMA app TO {caller}")
    c = roles.connect(caller)
    by_caller_mode = outcome(c, "app.starter('caller')")
    assert isinstance(by_caller_mode, str)
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        c.execute("SELECT app.starter('new')")
    assert info.value.diag.message_primary == cannot_set_role(app.role, caller)
    assert "SECURITY DEFINER" in (info.value.diag.message_hint or "")
    assert instances(conn) == [(by_caller_mode, None, app.role, "pending")]
    assert_no_loopback_left(conn)
    # A member of the owner may.
    conn.execute(f"GRANT {app.role} TO {caller}")
    got = outcome(c, "app.starter('new')")
    assert isinstance(got, str), got
    assert instances(conn)[-1] == (got, None, app.role, "pending")


def test_the_definer_function_cannot_submit_as_another_role(
    app: App, roles: Roles, conn: Conn
) -> None:
    victim = roles.create()
    direct = "df._start_in_new_transaction('SELECT 1', NULL, NULL, %s)"
    assert outcome(app.conn, direct, [victim]) == Error(cannot_set_role(victim, app.role))
    assert outcome(app.conn, direct, ["postgres"]) == Error(cannot_set_role("postgres", app.role))
    assert outcome(app.conn, direct, ["no_such_role"]) == Error(
        'role "no_such_role" does not exist'
    )
    assert instances(conn) == []
    assert_no_loopback_left(conn)
    # Its helper is not for users at all; dblink is out of their reach.
    assert outcome(app.conn, "df._close_loopback('_pgdurable_dblink', 'x', false)") == Error(
        "permission denied for function _close_loopback"
    )
    assert outcome(app.conn, "_pgdurable_dblink.dblink_get_connections()") == Error(
        "permission denied for schema _pgdurable_dblink"
    )
    # With its own name it is df.start.
    got = outcome(app.conn, direct, [app.role])
    assert isinstance(got, str), got
    assert instances(conn) == [(got, None, app.role, "pending")]


def test_new_transaction_ignores_the_callers_temp_objects(
    conn: Conn, tenants: TenantFactory
) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    attacker = tenants()
    attacker.conn.execute(
        "CREATE TEMP TABLE pg_roles (rolname text, rolcanlogin boolean, rolsuper boolean)"
    )
    attacker.conn.execute("INSERT INTO pg_temp.pg_roles VALUES ('postgres', true, false)")
    attacker.conn.execute(
        "CREATE TEMP VIEW pg_extension AS SELECT 'dblink'::name AS extname,"
        " pg_my_temp_schema() AS extnamespace"
    )
    error = attacker.error(
        "SELECT df._start_in_new_transaction('SELECT 1', NULL, NULL, 'postgres')"
    )
    assert "may not SET ROLE" in str(error), error
    assert conn.execute("SELECT count(*) FROM df.instances").fetchone() == (0,)


@pytest.mark.parametrize(
    "label",
    [
        "'); DROP TABLE app.x; --",
        "$$); DROP TABLE app.x; --",
        "\\'); DROP TABLE app.x; --",
        "%L %s %I ' \" \\ \t\n end",
    ],
)
def test_graph_and_label_cannot_inject_sql(app: App, conn: Conn, label: str) -> None:
    app.conn.execute("CREATE TABLE app.x ()")
    fut = f"SELECT '{label}''' AS a -- {label}"
    got = start_new(app.conn, fut, label)
    assert isinstance(got, str), got
    assert instances(conn) == [(got, label, app.role, "pending")]
    row = conn.execute(
        "SELECT n.query FROM df.nodes n JOIN df.instances i ON n.id = i.root_node WHERE i.id = %s",
        (got,),
    ).fetchone()
    assert row == (fut,)
    assert conn.execute("SELECT to_regclass('app.x') IS NOT NULL").fetchone() == (True,)


NASTY = [
    "'",
    "\\'",
    "$$",
    "'); SELECT 1; --",
    "E'\\''",
    "x' user='postgres",
]


@pytest.mark.parametrize("nasty", NASTY)
def test_new_transaction_quotes_fut_label_and_database(
    conn: Conn, tenants: TenantFactory, nasty: str
) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS dblink")
    attacker = tenants()
    attacker.conn.execute("SET standard_conforming_strings = off")
    own = attacker.value(
        "SELECT df.start(%s, %s, transaction_mode => 'new')",
        (f"SELECT {psycopg.sql.Literal(nasty).as_string(attacker.conn)} AS v", nasty),
    )
    row = conn.execute(
        "SELECT label, submitted_by::text FROM df.instances WHERE id = %s", (own,)
    ).fetchone()
    assert row == (nasty, attacker.name)
    error = attacker.error(
        "SELECT df.start('SELECT 1', NULL, %s, transaction_mode => 'new')", (nasty,)
    )
    assert "does not exist" in str(error)
    # the role argument: an identifier, never SQL
    error = attacker.error(
        "SELECT df._start_in_new_transaction('SELECT 1', NULL, NULL, %s)", (nasty,)
    )
    assert "does not exist" in str(error) or "may not SET ROLE" in str(error)
    assert conn.execute(
        "SELECT array_agg(DISTINCT submitted_by::text) FROM df.instances"
    ).fetchone() == ([attacker.name],)


@pytest.mark.parametrize("prefix", ['Odd "Name" ', "it's \\ odd ", "x' password='y "])
def test_role_names_that_need_quoting(roles: Roles, conn: Conn, prefix: str) -> None:
    """The name reaches the loopback's conninfo (as its login) and its SET ROLE (as the
    effective role), quoted in each."""
    login = roles.create(prefix)
    member = roles.create(prefix)
    conn.execute(f"GRANT {roles.quote(member)} TO {roles.quote(login)}")
    c = roles.connect(login)
    # The quoting holds whatever the caller's setting (SQL bodies are parsed under it).
    c.execute("SET standard_conforming_strings = off")
    as_login = start_new(c, "SELECT 1")
    assert isinstance(as_login, str), as_login
    c.execute(f"SET ROLE {roles.quote(member)}")
    as_member = start_new(c, "SELECT 1")
    assert isinstance(as_member, str), as_member
    assert instances(conn) == [
        (as_login, None, roles.quote(login), "pending"),
        (as_member, None, roles.quote(member), "pending"),
    ]


# -- install ------------------------------------------------------------------------------------


@pytest.fixture
def fresh_db(cluster: EmbeddedPostgres) -> Iterator[Callable[[str | None], str]]:
    """A factory of empty databases (with an owner role, if named); all dropped afterwards."""
    made: list[tuple[str, str | None]] = []
    admin = psycopg.connect(cluster.dsn(), autocommit=True)

    def make(owner: str | None) -> str:
        name = f"newtx_{uuid.uuid4().hex[:8]}"
        if owner:
            admin.execute(f"CREATE ROLE {owner} LOGIN")
        admin.execute(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        made.append((name, owner))
        return name

    yield make
    for name, owner in made:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if owner:
            admin.execute(f"DROP ROLE IF EXISTS {owner}")
    admin.close()


def test_install_without_superuser_leaves_new_unavailable(
    cluster: EmbeddedPostgres, fresh_db: Callable[[str | None], str]
) -> None:
    owner = f"newtx_owner_{uuid.uuid4().hex[:8]}"
    db = fresh_db(owner)
    with psycopg.connect(cluster.dsn(db, user=owner)) as c:
        assert "tables.sql" in schema.install(c)
    with psycopg.connect(cluster.dsn(db, user=owner), autocommit=True) as c:
        c.execute("SET search_path = df, public")
        assert outcome(c, "dblink_connect_u('x')") == Error(
            "function dblink_connect_u(unknown) does not exist"
        )
        assert start_new(c, "SELECT 1") == Error(NEEDS_DBLINK)


def test_install_uses_an_existing_dblink(
    cluster: EmbeddedPostgres, fresh_db: Callable[[str | None], str]
) -> None:
    db = fresh_db(None)
    with psycopg.connect(cluster.dsn(db), autocommit=True) as c:
        c.execute("CREATE SCHEMA tools")
        c.execute("CREATE EXTENSION dblink SCHEMA tools")
        schema.install(c)
        assert c.execute("SELECT to_regnamespace('_pgdurable_dblink')").fetchone() == (None,)
        c.execute("CREATE ROLE newtx_user LOGIN")
        try:
            c.execute("SELECT df.grant_usage('newtx_user')")
            with psycopg.connect(cluster.dsn(db, user="newtx_user"), autocommit=True) as u:
                got = start_new(u, "SELECT 1")
                assert isinstance(got, str), got
            assert instances(c) == [(got, None, "newtx_user", "pending")]
        finally:
            c.execute("DROP OWNED BY newtx_user CASCADE")
            c.execute("DROP ROLE newtx_user")


def test_the_fresh_install_puts_dblink_out_of_reach(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT n.nspname::text, n.nspacl IS NULL OR NOT EXISTS ("
        "         SELECT 1 FROM aclexplode(n.nspacl) a WHERE a.grantee = 0)"
        "  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'dblink'"
    ).fetchall()
    assert rows == [("_pgdurable_dblink", True)]
