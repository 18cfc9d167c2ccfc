"""Limits a user cannot raise (schema/settings.sql, docs/reference.md#settings).

pg_durable.list_instances_max_limit, the 'new'-mode launch limits and
pg_durable.enable_superuser_instances are read from where only an administrator writes:
df.set_setting's table, ALTER ROLE / ALTER DATABASE settings (which PostgreSQL lets only
superusers store for these placeholders) and the server's configuration files. Nothing a user
does in or to its own session (SET, SET LOCAL, set_config, ALTER ROLE itself, connection
options) changes what df's functions apply; a superuser's session may change the two settings
pg_durable lets superusers SET.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from conftest import RoleFactory, quote
from sqlcheck import Conn, Error, outcome

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres

LIST = "pg_durable.list_instances_max_limit"
STARTS = "pg_durable.max_new_transaction_starts"
TIMEOUT = "pg_durable.new_transaction_start_timeout"
SUPERUSER = "pg_durable.enable_superuser_instances"

DEFAULTS = (1000, 2, 5)
# What a user would like: the most each limit allows.
RAISED = {LIST: "1000000", STARTS: "1000", TIMEOUT: "3600"}

TOO_MANY = re.compile(
    r"df\.list_instances: limit_count \(1000001\) exceeds "
    r"pg_durable\.list_instances_max_limit \((\d+)\); .*"
)
# How df._in_new_transaction reads the launch limits (start.sql): defaults and ranges are
# df._setting_bounds'.
LAUNCH_LIMITS = (
    "df._int_setting('pg_durable.max_new_transaction_starts')",
    "df._int_setting('pg_durable.new_transaction_start_timeout')",
)


def refused(role: str) -> Error:
    return Error(
        f'pg_durable: superuser instances are disabled. current_user "{role}" is a superuser, '
        "but pg_durable.enable_superuser_instances is off. Set "
        "pg_durable.enable_superuser_instances = on to allow this."
    )


def list_limit(conn: Conn) -> int:
    """The largest limit_count both df.list_instances overloads accept, as their error reports
    it (in a savepoint of its own when a transaction is open)."""
    maxima = set()
    for call in ("df.list_instances(NULL, 1000001)", "df.list_instances(NULL, 1000001, NULL)"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as info, conn.transaction():
            conn.execute(f"SELECT count(*) FROM {call}")
        match = TOO_MANY.fullmatch(info.value.diag.message_primary or "")
        assert match, info.value
        maxima.add(int(match[1]))
    assert len(maxima) == 1, maxima
    return maxima.pop()


def limits(conn: Conn) -> tuple[int, int, int]:
    """(list_instances_max_limit, max_new_transaction_starts, new_transaction_start_timeout)
    as df's functions apply them in this session."""
    row = conn.execute(f"SELECT {', '.join(LAUNCH_LIMITS)}").fetchone()
    assert row is not None
    return (list_limit(conn), int(row[0]), int(row[1]))


def set_setting(conn: Conn, name: str, value: str | None) -> None:
    conn.execute("SELECT df.set_setting(%s, %s)", (name, value))


def alter_system(conn: Conn, values: dict[str, str | None]) -> None:
    """ALTER SYSTEM SET each (RESET for None), and reload."""
    for name, value in values.items():
        if value is None:
            conn.execute(f"ALTER SYSTEM RESET {name}")
        else:
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    conn.execute("SELECT pg_reload_conf()")


@pytest.fixture
def server_config(conn: Conn) -> Iterator[Conn]:
    """The superuser connection, for tests that ALTER SYSTEM: the cluster is shared by every
    test, so the settings are reset afterwards."""
    yield conn
    alter_system(conn, dict.fromkeys([LIST, STARTS, TIMEOUT, SUPERUSER]))


def test_df_reads_the_limits_only_through_the_administrators_sources(conn: Conn) -> None:
    """limits() evaluates the launch limits as transaction_mode => 'new' does, and no function
    reads a pg_durable.* setting from the session but df.target_database (which only reports
    pg_durable.database)."""
    sources = {
        str(r[0]): str(r[1])
        for r in conn.execute(
            "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'df'::regnamespace"
        )
    }
    assert any(all(e in source for e in LAUNCH_LIMITS) for source in sources.values())
    assert "df._list_instances_max_limit()" in sources["list_instances"]
    assert "df._superuser_instances_enabled()" in sources["start"]
    session_readers = {
        name
        for name, source in sources.items()
        if re.search(r"current_setting\s*\(\s*'pg_durable\.", source)
    }
    assert session_readers == {"target_database"}


def test_defaults(conn: Conn, make_role: RoleFactory) -> None:
    tenant = make_role()
    assert limits(tenant.conn) == DEFAULTS
    assert limits(conn) == DEFAULTS
    assert conn.execute("SELECT count(*) FROM df._settings").fetchone() == (0,)


def test_a_users_own_settings_do_not_raise_the_limits(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, make_role: RoleFactory
) -> None:
    tenant = make_role()
    c = tenant.conn

    # SET, and set_config.
    for name, value in RAISED.items():
        c.execute(f"SET {name} = {value}")
    assert limits(c) == DEFAULTS
    c.execute("RESET ALL")
    for name, value in RAISED.items():
        c.execute("SELECT set_config(%s, %s, false)", (name, value))
    assert limits(c) == DEFAULTS
    c.execute("RESET ALL")

    # SET LOCAL, in the transaction that uses the limits.
    with c.transaction():
        for name, value in RAISED.items():
            c.execute(f"SET LOCAL {name} = {value}")
        assert limits(c) == DEFAULTS

    # ALTER ROLE on itself: PostgreSQL lets only superusers store a placeholder setting (or a
    # function's SET clause for one); the next login sees nothing new either.
    for name, value in RAISED.items():
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"ALTER ROLE {quote(tenant.name)} SET {name} = {value}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(
                f"CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql SET {name} = {value}"
                " AS 'SELECT 1'"
            )
    with psycopg.connect(cluster.dsn(dbname, user=tenant.name), autocommit=True) as again:
        assert limits(again) == DEFAULTS

    # Nor ALTER DATABASE, by a user that owns the database.
    conn.execute(f"ALTER DATABASE {dbname} OWNER TO {quote(tenant.name)}")
    try:
        for name, value in RAISED.items():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"ALTER DATABASE {dbname} SET {name} = {value}")
    finally:
        conn.execute(f"ALTER DATABASE {dbname} OWNER TO CURRENT_USER")

    # Connection options (options='-c ...', as PGOPTIONS sets them).
    options = " ".join(f"-c {name}={value}" for name, value in RAISED.items())
    with psycopg.connect(
        cluster.dsn(dbname, user=tenant.name), autocommit=True, options=options
    ) as opted:
        row = opted.execute(f"SELECT current_setting('{LIST}')").fetchone()
        assert row == (RAISED[LIST],)  # the session has it; df does not read it
        assert limits(opted) == DEFAULTS

    # Nor the table the administrator's values are kept in, or the function that writes it.
    assert outcome(c, "df.set_setting(%s, '1000000')", [LIST]) == Error(
        "permission denied for function set_setting"
    )
    for statement in (
        "INSERT INTO df._settings VALUES ('pg_durable.list_instances_max_limit', '1000000')",
        "SELECT * FROM df._settings",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(statement)
    # The reader answers for pgdurable's settings only: the configuration files are not
    # the users' to read.
    assert outcome(c, "df._admin_setting('ssl_key_file')") is None
    assert outcome(c, "df._admin_setting('pg_durable.poll_interval')") == "100ms"

    # All the while, an administrator's value does count for the user.
    set_setting(conn, STARTS, "3")
    c.execute(f"SET {STARTS} = 1000")
    assert limits(c) == (1000, 3, 5)


def test_a_delegated_administrator_cannot_set_the_limits(
    conn: Conn, make_role: RoleFactory
) -> None:
    """df.grant_usage(..., with_grant => true) hands out usage, not the server's limits."""
    delegate = make_role(grant=False)
    conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (delegate.name,))
    assert outcome(delegate.conn, "df.set_setting(%s, '5000')", [LIST]) == Error(
        "permission denied for function set_setting"
    )
    assert limits(delegate.conn) == DEFAULTS


def test_set_setting(conn: Conn, make_role: RoleFactory) -> None:
    tenant = make_role()
    set_setting(conn, LIST, "5000")
    set_setting(conn, STARTS, " 7 ")
    set_setting(conn, "PG_DURABLE.New_Transaction_Start_Timeout", "9")
    # At once, for every session, whatever the session set.
    tenant.conn.execute(f"SET {STARTS} = 1")
    assert limits(tenant.conn) == (5000, 7, 9)
    assert limits(conn) == (5000, 7, 9)
    assert conn.execute("SELECT name, value FROM df._settings ORDER BY name").fetchall() == [
        (LIST, "5000"),
        (STARTS, "7"),
        (TIMEOUT, "9"),
    ]
    set_setting(conn, STARTS, "1000")
    assert limits(tenant.conn) == (5000, 1000, 9)
    # NULL removes it: the default (or the server configuration) applies again.
    for name in (LIST, STARTS, TIMEOUT):
        set_setting(conn, name, None)
    assert limits(tenant.conn) == DEFAULTS
    assert conn.execute("SELECT count(*) FROM df._settings").fetchone() == (0,)

    # Values outside what the readers accept are refused, not stored.
    for name, value, bounds in (
        (LIST, "0", "1 to 1000000"),
        (LIST, "1000001", "1 to 1000000"),
        (STARTS, "many", "1 to 1000"),
        (STARTS, "-1", "1 to 1000"),
        (TIMEOUT, "3601", "1 to 3600"),
        (TIMEOUT, "", "1 to 3600"),
    ):
        assert outcome(conn, "df.set_setting(%s, %s)", [name, value]) == Error(
            f"df.set_setting: {name} must be an integer from {bounds}, not '{value}'"
        )
    # enable_superuser_instances is the server configuration's: the worker reads it there.
    for name in (SUPERUSER, "pg_durable.poll_interval", "work_mem", None):
        got = outcome(conn, "df.set_setting(%s, 'on')", [name])
        assert isinstance(got, Error) and "is not a setting df.set_setting stores" in got.message
    assert conn.execute("SELECT count(*) FROM df._settings").fetchone() == (0,)


def test_a_bad_value_in_the_table_counts_as_the_default(conn: Conn, make_role: RoleFactory) -> None:
    """The owner may write df._settings directly; what the readers cannot use is the default,
    not whatever the server configuration says (the table wins, as it stands)."""
    tenant = make_role()
    conn.execute(f"ALTER DATABASE {tenant.conn.info.dbname} SET {STARTS} = 4")
    for value in ("many", "0", "-5", "99999999", "", " 1 2"):
        conn.execute(
            "INSERT INTO df._settings (name, value) VALUES (%s, %s), (%s, %s), (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            (LIST, value, STARTS, value, TIMEOUT, value),
        )
        assert limits(tenant.conn) == DEFAULTS, value
    # A row for a setting df.set_setting does not store is not read.
    conn.execute("INSERT INTO df._settings VALUES (%s, 'on')", (SUPERUSER,))
    assert outcome(conn, "df._admin_setting(%s)", [SUPERUSER]) is None


def test_the_server_configuration_counts(
    cluster: EmbeddedPostgres, dbname: str, server_config: Conn, make_role: RoleFactory
) -> None:
    conn = server_config
    tenant = make_role()
    # postgresql.auto.conf (ALTER SYSTEM), read as the files are: a user's next statement
    # sees it, whatever its session set.
    tenant.conn.execute(f"SET {LIST} = 1000000")
    alter_system(conn, {LIST: "4000", STARTS: "6", TIMEOUT: "8"})
    assert limits(tenant.conn) == (4000, 6, 8)

    # Role and database settings beat the files, as they do at login: (database, role) over
    # (role) over (database) over ALTER ROLE ALL. Only a superuser may store them.
    role = quote(tenant.name)
    conn.execute(f"ALTER ROLE ALL SET {STARTS} = 7")
    assert limits(tenant.conn) == (4000, 7, 8)
    conn.execute(f"ALTER DATABASE {dbname} SET {STARTS} = 9")
    assert limits(tenant.conn) == (4000, 9, 8)
    conn.execute(f"ALTER ROLE {role} SET {STARTS} = 10")
    assert limits(tenant.conn) == (4000, 10, 8)
    conn.execute(f"ALTER ROLE {role} IN DATABASE {dbname} SET {STARTS} = 11")
    assert limits(tenant.conn) == (4000, 11, 8)
    # Another role (the superuser here: it reads its own session for LIST) gets the rest.
    assert limits(conn)[1:] == (9, 8)
    # df.set_setting beats them all.
    set_setting(conn, STARTS, "12")
    assert limits(tenant.conn) == (4000, 12, 8)
    set_setting(conn, STARTS, None)
    conn.execute(f"ALTER ROLE {role} IN DATABASE {dbname} RESET {STARTS}")
    conn.execute(f"ALTER ROLE {role} RESET {STARTS}")
    conn.execute(f"ALTER DATABASE {dbname} RESET {STARTS}")
    conn.execute(f"ALTER ROLE ALL RESET {STARTS}")
    assert limits(tenant.conn) == (4000, 6, 8)

    # A value the readers cannot use counts as the default.
    alter_system(conn, {LIST: "lots", STARTS: "0", TIMEOUT: "3601"})
    assert limits(tenant.conn) == DEFAULTS
    conn.execute(f"ALTER DATABASE {dbname} SET {STARTS} = 'two'")
    assert limits(tenant.conn) == DEFAULTS


def test_a_superusers_session_may_set_the_list_limit(conn: Conn) -> None:
    """pg_durable declares list_instances_max_limit superuser-settable (PGC_SUSET): a
    superuser's own SET counts. The launch limits are server-wide there (PGC_POSTMASTER): not
    even a superuser's session changes them."""
    conn.execute(f"SET {LIST} = 3")
    conn.execute(f"SET {STARTS} = 7")
    conn.execute(f"SET {TIMEOUT} = 9")
    assert limits(conn) == (3, 2, 5)
    # The administrator's table still wins.
    set_setting(conn, LIST, "4")
    assert limits(conn) == (4, 2, 5)


# -- pg_durable.enable_superuser_instances ------------------------------------------------------


@pytest.fixture
def superuser_paths(conn: Conn, make_role: RoleFactory) -> Iterator[tuple[str, str]]:
    """A tenant role, and a superuser LOGIN role it is a member of; the tenant may also call
    public.start_as_admin(), a superuser's SECURITY DEFINER function that calls df.start.
    These are the ways a non-superuser login reaches df.start's superuser check."""
    tenant = make_role()
    boss = f"pgd_boss_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {boss} SUPERUSER LOGIN")
    conn.execute(f"GRANT {boss} TO {quote(tenant.name)}")
    conn.execute(
        "CREATE FUNCTION public.start_as_admin() RETURNS text LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog AS $$ SELECT df.start('SELECT 1') $$"
    )
    conn.execute("REVOKE EXECUTE ON FUNCTION public.start_as_admin() FROM PUBLIC")
    conn.execute(f"GRANT EXECUTE ON FUNCTION public.start_as_admin() TO {quote(tenant.name)}")
    yield tenant.name, boss
    conn.execute("DROP FUNCTION public.start_as_admin()")
    conn.execute(f"DROP ROLE {boss}")


def superuser_starts(c: Conn, boss: str) -> tuple[object, object]:
    """What df.start says to a superuser instance, reached through the definer function and
    through SET ROLE."""
    through_definer = outcome(c, "public.start_as_admin()")
    c.execute(f"SET ROLE {boss}")
    try:
        through_set_role = outcome(c, "df.start('SELECT 1')")
    finally:
        c.execute("RESET ROLE")
    return through_definer, through_set_role


def test_a_user_cannot_enable_superuser_instances(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, superuser_paths: tuple[str, str]
) -> None:
    tenant, boss = superuser_paths
    everything_refused = (refused("postgres"), refused(boss))
    dsn = cluster.dsn(dbname, user=tenant)
    with psycopg.connect(dsn, autocommit=True) as c:
        assert superuser_starts(c, boss) == everything_refused
        c.execute(f"SET {SUPERUSER} = on")
        assert superuser_starts(c, boss) == everything_refused
        c.execute(f"RESET {SUPERUSER}")
        with c.transaction():
            c.execute(f"SET LOCAL {SUPERUSER} = on")
            assert outcome(c, "public.start_as_admin()") == refused("postgres")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"ALTER ROLE {quote(tenant)} SET {SUPERUSER} = on")
    with psycopg.connect(dsn, autocommit=True, options=f"-c {SUPERUSER}=on") as c:
        assert superuser_starts(c, boss) == everything_refused
    # A superuser's session may (PGC_SUSET in pg_durable); the worker checks again with the
    # server configuration (tests/test_identity.py).
    conn.execute(f"SET {SUPERUSER} = on")
    assert isinstance(outcome(conn, "df.start('SELECT 1')"), str)
    assert conn.execute("SELECT count(*) FROM df.instances").fetchone() == (1,)


def test_an_administrator_enables_superuser_instances(
    cluster: EmbeddedPostgres, dbname: str, server_config: Conn, superuser_paths: tuple[str, str]
) -> None:
    conn = server_config
    tenant, boss = superuser_paths
    dsn = cluster.dsn(dbname, user=tenant)
    # In the database's settings (where the worker reads it too) ...
    conn.execute(f"ALTER DATABASE {dbname} SET {SUPERUSER} = on")
    with psycopg.connect(dsn, autocommit=True) as c:
        started = superuser_starts(c, boss)
        assert all(isinstance(s, str) for s in started), started
    conn.execute(f"ALTER DATABASE {dbname} SET {SUPERUSER} = maybe")
    with psycopg.connect(dsn, autocommit=True) as c:
        assert superuser_starts(c, boss) == (refused("postgres"), refused(boss))
    conn.execute(f"ALTER DATABASE {dbname} RESET {SUPERUSER}")
    # ... or in the configuration files.
    alter_system(conn, {SUPERUSER: "on"})
    with psycopg.connect(dsn, autocommit=True) as c:
        started = superuser_starts(c, boss)
        assert all(isinstance(s, str) for s in started), started
    # df.set_setting does not store it (the worker would not see it there).
    assert isinstance(outcome(conn, "df.set_setting(%s, 'off')", [SUPERUSER]), Error)


# -- managed PostgreSQL -------------------------------------------------------------------------


def test_a_schema_owner_that_is_no_superuser(
    cluster: EmbeddedPostgres, server_config: Conn
) -> None:
    """As on managed PostgreSQL: the owner cannot read the configuration files, so only
    df.set_setting and role or database settings count; an administrator may let it read them."""
    suffix = uuid.uuid4().hex[:8]
    owner, tenant, db = f"pgd_owner_{suffix}", f"pgd_tenant_{suffix}", f"pgd_managed_{suffix}"
    admin = server_config
    admin.execute(f"CREATE ROLE {owner} LOGIN")
    admin.execute(f"CREATE ROLE {tenant} LOGIN")
    admin.execute(f"CREATE DATABASE {db} OWNER {owner}")
    try:
        with psycopg.connect(cluster.dsn(db, user=owner), autocommit=True) as o:
            schema.install(o)
            o.execute("SELECT df.grant_usage(%s)", (tenant,))
            with psycopg.connect(cluster.dsn(db, user=tenant), autocommit=True) as t:
                alter_system(admin, {STARTS: "6"})
                assert limits(t) == DEFAULTS  # the files are out of the owner's reach
                set_setting(o, STARTS, "7")
                t.execute(f"SET {STARTS} = 1000")
                assert limits(t) == (1000, 7, 5)
                set_setting(o, STARTS, None)
                assert limits(t) == DEFAULTS
                with psycopg.connect(cluster.dsn(db), autocommit=True) as su:
                    su.execute(f"GRANT SELECT ON pg_file_settings TO {owner}")
                    su.execute(f"GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO {owner}")
                assert limits(t) == (1000, 6, 5)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS {tenant}")
        admin.execute(f"DROP ROLE IF EXISTS {owner}")
