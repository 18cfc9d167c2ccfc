"""The Python API: the graph builder (pgdurable.dsl) makes exactly the JSON the SQL builders
make, and the clients start, wait for, signal, cancel and list workflows as the connected
role (docs/python.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from conftest import App, RoleFactory, ThreadWorker

from pgdurable import AsyncClient, Client, InstanceNotFound, WorkflowFailed
from pgdurable import dsl as df

Conn = psycopg.Connection[tuple[object, ...]]

# Each builder, in Python and in SQL; the two must give the same text.
SAME_GRAPHS: list[tuple[str, df.Node, str]] = [
    ("sql", df.sql("SELECT 1"), "df.sql('SELECT 1')"),
    ("plain text", df.as_node("SELECT 'é\t\"x\"'"), "'SELECT ''é\t\"x\"''' ~> 'SELECT 1'"),
    ("seq", df.sql("SELECT 1") >> "SELECT 2", "'SELECT 1' ~> 'SELECT 2'"),
    ("named", df.sql("SELECT 1").named("one"), "'SELECT 1' |=> 'one'"),
    (
        "then named",
        (df.sql("SELECT 1").named("a") >> "SELECT $a").named("b"),
        "('SELECT 1' |=> 'a') ~> 'SELECT $a' |=> 'b'",
    ),
    ("join", df.sql("SELECT 1") & "SELECT 2", "'SELECT 1' & 'SELECT 2'"),
    (
        "join3",
        df.join("SELECT 1", "SELECT 2", "SELECT 3"),
        "df.join3('SELECT 1', 'SELECT 2', 'SELECT 3')",
    ),
    ("race", df.sql("SELECT 1") | df.sleep(5), "'SELECT 1' | df.sleep(5)"),
    (
        "if",
        df.if_("SELECT true", "SELECT 1", "SELECT 2"),
        "'SELECT true' ?> 'SELECT 1' !> 'SELECT 2'",
    ),
    ("if_rows", df.if_rows("r", "SELECT 1", "SELECT 2"), "df.if_rows('r', 'SELECT 1', 'SELECT 2')"),
    (
        "loop",
        df.loop(df.sql("SELECT 1") >> df.break_("done")),
        "@> ('SELECT 1' ~> df.break('done'))",
    ),
    ("loop while", df.loop("SELECT 1", "SELECT false"), "df.loop('SELECT 1', 'SELECT false')"),
    ("break", df.break_(), "df.break()"),
    ("sleep", df.sleep(60), "df.sleep(60)"),
    ("schedule", df.wait_for_schedule("*/5 * * * *"), "df.wait_for_schedule('*/5 * * * *')"),
    ("signal", df.wait_for_signal("go"), "df.wait_for_signal('go')"),
    ("signal timeout", df.wait_for_signal("go", 30), "df.wait_for_signal('go', 30)"),
    ("http", df.http("https://x.test/a", "get"), "df.http('https://x.test/a', 'get')"),
    (
        "http full",
        df.http("https://x.test/{v}", "put", '{"a":1}', {"X-Long-Name": "1", "B": "é"}, 5),
        "df.http('https://x.test/{v}', 'put', '{\"a\":1}',"
        ' \'{"X-Long-Name": "1", "B": "é"}\', 5)',
    ),
    (
        "multipart",
        df.http_multipart("https://x.test/u", parts=[{"name": "f", "data_b64": "aGk="}]),
        'df.http_multipart(\'https://x.test/u\', parts => \'[{"name": "f", "data_b64": "aGk="}]\')',
    ),
    ("retry", df.retry("SELECT 1", 3), "df.retry('SELECT 1', 3)"),
    (
        "retry full",
        df.retry(df.sql("SELECT 1"), 5, 0.5, 2.25, ["40001", "python"]),
        "df.retry('SELECT 1', 5, 0.5, 2.25, ARRAY['40001', 'python'])",
    ),
    ("timeout", df.timeout("SELECT pg_sleep(9)", 1.5), "df.timeout('SELECT pg_sleep(9)', 1.5)"),
    ("call", df.call("billing.charge"), "df.call('billing.charge')"),
    ("map", df.map_("rows", "SELECT $item.id"), "df.map('rows', 'SELECT $item.id')"),
    (
        "map full",
        df.map_("rows", df.call("x.y", {"id": "$r.id"}), 3, "r", collect_errors=True),
        "df.map('rows', df.call('x.y', '{\"id\": \"$r.id\"}'), 3, 'r', true)",
    ),
    (
        "call args",
        df.call(
            "a.b", {"order": "$o.id", "n": 2, "x": 0.25, "big": 1e20, "ok": True, "l": [None, "é"]}
        ),
        'df.call(\'a.b\', \'{"order": "$o.id", "n": 2, "x": 0.25, "big": 1e20, "ok": true,'
        ' "l": [null, "é"]}\')',
    ),
    (
        "everything at once",
        (
            df.sql("SELECT id FROM t").named("rows")
            >> df.if_rows("rows", df.call("x.y", {"ids": "$rows.*"}) & df.sleep(1), "SELECT 0")
            >> df.timeout(df.retry(df.wait_for_signal("done", 60), 2, 0, 0, ["timeout"]), 120)
        ),
        "('SELECT id FROM t' |=> 'rows')"
        " ~> df.if_rows('rows', df.call('x.y', '{\"ids\": \"$rows.*\"}') & df.sleep(1), 'SELECT 0')"
        " ~> df.timeout(df.retry(df.wait_for_signal('done', 60), 2, 0, 0, ARRAY['timeout']), 120)",
    ),
]


@pytest.mark.parametrize(
    ("python", "sql"), [c[1:] for c in SAME_GRAPHS], ids=[c[0] for c in SAME_GRAPHS]
)
def test_the_builder_makes_what_the_sql_builders_make(su: Conn, python: df.Node, sql: str) -> None:
    row = su.execute(f"SELECT ({sql})::text").fetchone()
    assert row is not None
    if sql.startswith("'SELECT ''é"):  # plain text: the SQL side wraps the first operand
        row = su.execute("SELECT (%s::json -> 'left_node')::text", (row[0],)).fetchone()
        assert row is not None
    assert python.to_json() == row[0]


@pytest.mark.parametrize(
    ("build", "sql"),
    [
        (lambda: df.retry("SELECT 1", 0), "df.retry('SELECT 1', 0)"),
        (lambda: df.retry("SELECT 1", 2, 5, 1), "df.retry('SELECT 1', 2, 5, 1)"),
        (lambda: df.retry("SELECT 1", 2, retry_on=[]), "df.retry('SELECT 1', 2, retry_on => '{}')"),
        (lambda: df.timeout("SELECT 1", 0), "df.timeout('SELECT 1', 0)"),
        (lambda: df.sleep(-1), "df.sleep(-1)"),
        (lambda: df.http("ftp://x", "GET"), "df.http('ftp://x', 'GET')"),
        (lambda: df.http("https://x", "TRACE"), "df.http('https://x', 'TRACE')"),
        (
            lambda: df.http_multipart("https://x", parts=[]),
            "df.http_multipart('https://x', parts => '[]')",
        ),
        (lambda: df.wait_for_signal(""), "df.wait_for_signal('')"),
        (lambda: df.sql("SELECT 1").named("1x"), "'SELECT 1' |=> '1x'"),
        (lambda: df.call("no spaces"), "df.call('no spaces')"),
        (lambda: df.map_("r", "SELECT 1", 0), "df.map('r', 'SELECT 1', 0)"),
    ],
)
def test_the_builder_refuses_what_the_sql_builders_refuse_with_their_message(
    su: Conn, build: Any, sql: str
) -> None:
    with pytest.raises(psycopg.errors.DatabaseError) as in_sql:
        su.execute(f"SELECT {sql}")
    with pytest.raises(ValueError) as in_python:
        build()
    assert str(in_python.value) == in_sql.value.diag.message_primary


# -- the blocking client ----------------------------------------------------------------------


@pytest.fixture
def client(app: App) -> Any:
    with Client.connect(app.dsn) as c:
        yield c


def test_start_wait_and_result(client: Client, worker: ThreadWorker) -> None:
    instance = client.start(df.sql("SELECT 41 + 1 AS answer") >> df.sleep(0), label="api")
    assert client.wait(instance, timeout=30) == {"slept": True, "seconds": 0}
    assert client.status(instance) == "completed"
    page = client.list(label="api")
    assert [(i.id, i.status) for i in page.instances] == [(instance, "completed")]


def test_a_failed_instance_raises_with_its_error(client: Client, worker: ThreadWorker) -> None:
    instance = client.start("SELECT 1 / 0")
    with pytest.raises(WorkflowFailed) as failed:
        client.wait(instance, timeout=30)
    assert failed.value.status == "failed" and "division by zero" in str(failed.value.error)


def test_signal_and_cancel(client: Client, worker: ThreadWorker) -> None:
    waiting = client.start(df.wait_for_signal("go").named("s") >> "SELECT $s.data AS got")
    client.signal(waiting, "go", {"n": 1})
    assert client.wait(waiting, timeout=30) == {"rows": [{"got": '{"n":1}'}], "row_count": 1}
    sleeping = client.start(df.sleep(3600))
    assert client.cancel(sleeping, "no longer needed") == (
        f"Instance {sleeping} cancelled: no longer needed"
    )
    with pytest.raises(WorkflowFailed) as cancelled:
        client.wait(sleeping, timeout=30)
    assert cancelled.value.status == "cancelled"


def test_wait_times_out_and_a_running_instance_has_no_result(client: Client) -> None:
    instance = client.start(df.sleep(3600))  # no worker: it stays pending
    with pytest.raises(TimeoutError, match=f"instance {instance} is still pending"):
        client.wait(instance, timeout=0.3)
    with pytest.raises(LookupError, match="still pending"):
        client.result(instance)


def test_start_in_the_applications_transaction(app: App, client: Client) -> None:
    with psycopg.connect(app.dsn) as own:
        instance = client.start("SELECT 1", conn=own)
        own.rollback()
    with pytest.raises(InstanceNotFound):
        client.status(instance)
    with psycopg.connect(app.dsn) as own:
        own.execute("CREATE TABLE app.orders (id int)")
        instance = client.start("INSERT INTO app.orders VALUES (1)", conn=own)
        own.commit()
    assert client.status(instance) == "pending"


def test_another_roles_instance_is_not_found(
    client: Client, make_role: RoleFactory, cluster: Any, dbname: str
) -> None:
    other = make_role()
    instance = str(other.conn.execute("SELECT df.start('SELECT 1')").fetchone()[0])  # type: ignore[index]
    with pytest.raises(InstanceNotFound):
        client.status(instance)
    assert client.list().instances == []


def test_pages_of_instances(client: Client) -> None:
    ids = [client.start("SELECT 1", label="paged") for _ in range(5)]
    first = client.list(label="paged", limit=2)
    second = client.list(label="paged", limit=2, after=first.next_cursor)
    third = client.list(label="paged", limit=2, after=second.next_cursor)
    seen = [i.id for page in (first, second, third) for i in page.instances]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert third.next_cursor is None


# -- the asyncio client -----------------------------------------------------------------------


def test_the_async_client(app: App, worker: ThreadWorker) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect(app.dsn) as client:
            instance = await client.start(df.sql("SELECT 2 AS two") & "SELECT 3 AS three")
            result = await client.wait(instance, timeout=30)
            assert [r["rows"][0] for r in result] == [{"two": 2}, {"three": 3}]
            failing = await client.start("SELECT 1 / 0")
            with pytest.raises(WorkflowFailed):
                await client.wait(failing, timeout=30)
            waiting = await client.start(df.wait_for_signal("go"))
            await client.signal(waiting, "go")
            assert (await client.wait(waiting, timeout=30))["signal_name"] == "go"
            sleeping = await client.start(df.sleep(3600))
            assert await client.cancel(sleeping) == (
                f"Instance {sleeping} cancelled: Cancelled by user"
            )
            assert await client.status(sleeping) == "cancelled"
            page = await client.list(limit=10)
            assert len(page.instances) == 4

    asyncio.run(scenario())
