"""Attacks found by a review of the security model (docs/security.md), kept as tests:
each asserts the secure outcome."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import psycopg
import pytest
import test_attacks as attacks
from conftest import ThreadWorker
from test_attacks import (
    TenantFactory,
    node_id,
    output_of,
    poll,
    rows_of,
    run,
    status_of,
    wait_terminal,
)

from pgdurable.embedded import EmbeddedPostgres

Conn = psycopg.Connection[Any]
tenants = attacks.tenants  # the fixture


def test_a_user_cannot_set_its_instance_status_to_null(
    conn: Conn, tenants: TenantFactory, worker: ThreadWorker
) -> None:
    attacker = tenants()
    own = attacker.start("df.wait_for_signal('go')")
    poll(lambda: status_of(conn, own) == "running", "the wait")
    error = attacker.error("UPDATE df.instances SET status = NULL WHERE id = %s", (own,))
    assert isinstance(error, psycopg.errors.InsufficientPrivilege), error
    assert status_of(conn, own) == "running"


# ---------------------------------------------------------------------------------------------
# 0010: BYPASSRLS writes to another role's rows that no trigger covers
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# df.grant_usage / df.revoke_usage / df.refresh_grants
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# worker: a forged NOTIFY on the cancel channel
# ---------------------------------------------------------------------------------------------


def _sleeping(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
        " 'pg_durable:worker:workflow-sql' AND state = 'active' AND query LIKE '%pg_sleep(8)%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_forged_cancel_notify_does_not_disable_cancellation(
    conn: Conn, tenants: TenantFactory, dsn: str
) -> None:
    victim = tenants()
    stranger = tenants(grant=False)  # CONNECT is enough to NOTIFY
    w = ThreadWorker(dsn, concurrency=2)
    stop_error: BaseException | None = None
    try:
        time.sleep(1.0)  # listener up
        stranger.conn.execute("SELECT pg_notify('pgdurable_cancel', 'deadbeef:\u00b2')")
        time.sleep(0.5)
        instance = victim.start("%s", ("SELECT pg_sleep(8)::text AS s",))
        poll(lambda: _sleeping(conn) == 1, "the step")
        victim.value("SELECT df.cancel(%s)", (instance,))
        interrupted = True
        try:
            poll(lambda: _sleeping(conn) == 0, "the cancel to interrupt the step", timeout=4)
        except AssertionError:
            interrupted = False
    finally:
        try:
            w.stop()
        except BaseException as exc:
            stop_error = exc
    assert (interrupted, repr(stop_error)) == (True, "None")


# ---------------------------------------------------------------------------------------------
# substitution
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# step sessions: forced options vs ALTER ROLE / ALTER DATABASE, and state between steps
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# 0011: df._start_in_new_transaction
# ---------------------------------------------------------------------------------------------

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


def _leftovers(conn: Conn) -> tuple[int, int]:
    loopbacks = conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'pg_durable:backend:new-transaction'"
    ).fetchone()
    locks = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1346982470"
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


# ---------------------------------------------------------------------------------------------
# a step in another database cannot checkpoint anything in the df database
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# identity with odd role names: quote_ident(current_user)::regrole is the role itself
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# refresh_grants widens a plain schema USAGE grant into full tenant / admin privileges
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Substitution read differently from PostgreSQL's lexer (end to end, as the attack pass ran
# them; tests/test_substitute_lexer.py covers the class against the lexer itself)
# ---------------------------------------------------------------------------------------------

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
