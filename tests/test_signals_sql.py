"""Signals, the SQL side: df.wait_for_signal, df.signal, df._signals and the functions the
worker uses (migration 0007; docs/signals.md).

No worker runs here: instances stay pending, waits are task rows written by hand (as a
checkpoint would), and consumption is df._consume_signal called as the worker calls it.
End-to-end behaviour with a worker is in test_waits.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import App
from sqlcheck import Conn, Error, check, outcome

from pgdurable.embedded import EmbeddedPostgres

# -- helpers ------------------------------------------------------------------------------------


def run(conn: Conn, statement: str, params: tuple[object, ...] = ()) -> Error | None:
    """Execute a statement: None if it succeeds, Error(message) if it fails."""
    try:
        conn.execute(statement, params or None)
    except psycopg.Error as e:
        return Error(e.diag.message_primary or str(e))
    return None


# How the worker consumes a signal (instance, name, activation): its data (returned up to this
# many bytes), NULL when none is waiting.
CONSUME = "SELECT (SELECT data FROM df._consume_signal(%s, %s, %s, 1000000))"


def value(conn: Conn, query: str, params: tuple[object, ...] = ()) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def signal(conn: Conn, instance: str, name: str, *data: str) -> object:
    """df.signal(instance, name[, data]) as the connection's role: 'OK' or Error(message)."""
    placeholders = ", ".join(["%s"] * (2 + len(data)))
    return outcome(conn, f"df.signal({placeholders})", [instance, name, *data])


def signals_of(conn: Conn, instance: str) -> list[tuple[str, str, str]]:
    """(name, data as jsonb text, sender) of the instance's signals, in send order."""
    rows = conn.execute(
        "SELECT name, data::text, sent_by::text FROM df._signals WHERE instance_id = %s"
        " ORDER BY id",
        (instance,),
    ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def add_task(
    conn: Conn,
    instance: str,
    activation: int,
    name: str,
    due_in: str | None = None,
    kind: str = "signal",
    leased: bool = False,
) -> int:
    """A task row as a checkpoint writes it for a SIGNAL wait (superuser connection): visible
    after the interval due_in, or never ('infinity', a wait without a timeout)."""
    return int(
        value(
            conn,
            "INSERT INTO df._tasks (instance_id, role_oid, activation, kind, node_id, payload,"
            " visible_at, lease_owner, token)"
            " SELECT i.id, i.submitted_by, %s, %s, i.root_node,"
            "        jsonb_build_object('signal_name', %s::text, 'deadline', NULL),"
            "        coalesce(now() + %s::interval, 'infinity'), %s, %s"
            "   FROM df.instances i WHERE i.id = %s RETURNING id",
            (
                activation,
                kind,
                name,
                due_in,
                uuid.uuid4() if leased else None,
                uuid.uuid4() if leased else None,
                instance,
            ),
        )
    )


def due(conn: Conn, task: int) -> bool:
    """Whether a worker may claim the task now."""
    return bool(value(conn, "SELECT visible_at <= now() FROM df._tasks WHERE id = %s", (task,)))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def set_status(conn: Conn, instance: str, status: str) -> None:
    conn.execute("UPDATE df.instances SET status = %s WHERE id = %s", (status, instance))


def q(text: str) -> str:
    """The JSON text of a string, as in a query config (tests' expected envelopes)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def signal_node(name: str, timeout: str = "null", result_name: str | None = None) -> str:
    config = '{"signal_name":"' + q(name) + '","timeout_seconds":' + timeout + "}"
    node = '{"node_type":"SIGNAL","query":"' + q(config) + '"'
    if result_name is not None:
        node += ',"result_name":"' + result_name + '"'
    return node + "}"


@pytest.fixture
def other(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[App]:
    """A second role with df usage, who must not reach app's instances."""
    role = f"other_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute("SELECT df.grant_usage(%s)", (role,))
    o = App(cluster, dbname, role)
    yield o
    o.conn.close()
    conn.execute(f"DROP OWNED BY {role} CASCADE")
    conn.execute(f"DROP ROLE {role}")


# -- df.wait_for_signal -------------------------------------------------------------------------


def test_wait_for_signal_builds_the_envelope_byte_for_byte(conn: Conn) -> None:
    go = signal_node("go")
    check(
        conn,
        [
            # pg_durable's exact JSON
            (
                "df.wait_for_signal('go')",
                r'{"node_type":"SIGNAL","query":"{\"signal_name\":\"go\",\"timeout_seconds\":null}"}',
            ),
            (
                "df.wait_for_signal('approval', 3600)",
                r'{"node_type":"SIGNAL","query":'
                r'"{\"signal_name\":\"approval\",\"timeout_seconds\":3600}"}',
            ),
            ("df.wait_for_signal('go', NULL)", go),
            ("df.wait_for_signal(name => 'go', timeout_seconds => 1)", signal_node("go", "1")),
            ("df.wait_for_signal('go', 2147483647)", signal_node("go", "2147483647")),
            # Names are literal: quotes, backslashes and non-ASCII escaped as serde_json does.
            (
                "df.wait_for_signal('say \"hi\" ✓')",
                r'{"node_type":"SIGNAL","query":'
                r'"{\"signal_name\":\"say \\\"hi\\\" ✓\",\"timeout_seconds\":null}"}',
            ),
            ("df.wait_for_signal(E'a\\\\b')", signal_node("a\\b")),
            ("df.wait_for_signal('$x.y {v}')", signal_node("$x.y {v}")),
            # As a node among others.
            ("df.wait_for_signal('go') |=> 's'", signal_node("go", result_name="s")),
            (
                "'SELECT 1' ~> df.wait_for_signal('go', 5)",
                '{"node_type":"THEN","left_node":{"node_type":"SQL","query":"SELECT 1"},'
                '"right_node":' + signal_node("go", "5") + "}",
            ),
            (
                "df.wait_for_signal('a') | df.sleep(5)",
                '{"node_type":"RACE","left_node":' + signal_node("a") + ","
                '"right_node":{"node_type":"SLEEP","query":"5"}}',
            ),
            # Errors: the name first, then the timeout.
            ("df.wait_for_signal('')", Error("Signal name cannot be empty")),
            ("df.wait_for_signal(NULL)", Error("Signal name cannot be empty")),
            ("df.wait_for_signal(NULL, 5)", Error("Signal name cannot be empty")),
            ("df.wait_for_signal('', 0)", Error("Signal name cannot be empty")),
            ("df.wait_for_signal('go', 0)", Error("Timeout must be positive")),
            ("df.wait_for_signal('go', -1)", Error("Timeout must be positive")),
            # Signatures: the builder is not strict, df.signal is; df.signal runs as the caller.
            (
                "(SELECT proisstrict FROM pg_proc"
                " WHERE oid = 'df.wait_for_signal(text,integer)'::regprocedure)",
                False,
            ),
            (
                "(SELECT proisstrict AND NOT prosecdef FROM pg_proc"
                " WHERE oid = 'df.signal(text,text,text,text)'::regprocedure)",
                True,
            ),
            # One df.signal: the 4-argument one (transaction_mode has a default).
            (
                "(SELECT count(*) FROM pg_proc WHERE proname = 'signal'"
                " AND pronamespace = 'df'::regnamespace)",
                1,
            ),
        ],
    )


def test_a_wait_is_stored_by_start(app: App) -> None:
    instance = app.start("df.wait_for_signal('go', 60) |=> 'answer'")
    node = app.nodes(instance)
    assert [(n["node_type"], n["query"], n["result_name"]) for n in node] == [
        ("SIGNAL", '{"signal_name":"go","timeout_seconds":60}', "answer")
    ]


# -- df.signal: arguments, ownership, status ----------------------------------------------------


def test_signal_errors(app: App, other: App, conn: Conn) -> None:
    mine = app.start("df.wait_for_signal('go')")
    theirs = other.start("df.wait_for_signal('go')")
    check(
        app.conn,
        [
            ("df.signal('', 'go')", Error("Instance ID cannot be empty")),
            ("df.signal('', '')", Error("Instance ID cannot be empty")),
            (f"df.signal('{mine}', '')", Error("Signal name cannot be empty")),
            (f"df.signal('{mine}', '', 'x')", Error("Signal name cannot be empty")),
            ("df.signal('0badc0de', 'go')", Error("Instance not found or access denied: 0badc0de")),
            # Ids match exactly: no prefixes, no padding.
            (
                f"df.signal('{mine[:7]}', 'go')",
                Error(f"Instance not found or access denied: {mine[:7]}"),
            ),
            (
                f"df.signal('{mine} ', 'go')",
                Error(f"Instance not found or access denied: {mine} "),
            ),
            ("df.signal('no such', 'go')", Error("Instance not found or access denied: no such")),
            # Another role's instance looks exactly like a missing one.
            (
                f"df.signal('{theirs}', 'go')",
                Error(f"Instance not found or access denied: {theirs}"),
            ),
            # STRICT: NULL in, NULL out, nothing sent.
            ("df.signal(NULL, 'go')", None),
            (f"df.signal('{mine}', NULL)", None),
            (f"df.signal('{mine}', 'go', NULL)", None),
        ],
    )
    assert signals_of(conn, mine) == []
    assert signals_of(conn, theirs) == []


def test_signals_to_finished_instances_are_refused(app: App, conn: Conn) -> None:
    """Beyond pg_durable (which answers OK and drops them): say the signal went nowhere."""
    instances = {s: app.start("df.wait_for_signal('go')") for s in ("completed", "failed")}
    for status, instance in instances.items():
        set_status(conn, instance, status)
    cancelled = app.start("df.wait_for_signal('go')")
    assert value(app.conn, "SELECT df.cancel(%s)", (cancelled,)).endswith(
        "cancelled: Cancelled by user"
    )
    instances["cancelled"] = cancelled
    running = app.start("df.wait_for_signal('go')")
    set_status(conn, running, "running")
    for status, instance in instances.items():
        assert signal(app.conn, instance, "go", '{"late": true}') == Error(
            f"Instance {instance} is {status}: signal 'go' was not delivered"
        )
        assert signal(conn, instance, "other name") == Error(
            f"Instance {instance} is {status}: signal 'other name' was not delivered"
        )
        assert signals_of(conn, instance) == []
    # Pending (not started yet) and running instances take signals.
    pending = app.start("df.wait_for_signal('go')")
    assert signal(app.conn, pending, "go") == "OK"
    assert signal(app.conn, running, "go") == "OK"
    assert signals_of(conn, pending) == [("go", "{}", app.role)]
    assert signals_of(conn, running) == [("go", "{}", app.role)]


def test_superusers_signal_any_instance(app: App, conn: Conn) -> None:
    instance = app.start("df.wait_for_signal('go')")
    assert signal(conn, instance, "go", "from the admin") == "OK"
    assert signal(app.conn, instance, "go", "from the owner") == "OK"
    assert signals_of(conn, instance) == [
        ("go", '"from the admin"', "postgres"),
        ("go", '"from the owner"', app.role),
    ]


def test_signal_from_a_security_definer_function_acts_as_its_owner(
    app: App, other: App, conn: Conn
) -> None:
    """df.signal checks ownership as current_user, like every df function: a SECURITY
    DEFINER function owned by the instance's submitter may signal it for anyone it lets in."""
    instance = app.start("df.wait_for_signal('approval')")
    app.conn.execute(
        "CREATE FUNCTION app.approve(id text) RETURNS text LANGUAGE sql SECURITY DEFINER"
        " SET search_path = pg_catalog AS $$ SELECT df.signal(id, 'approval', 'yes') $$"
    )
    app.conn.execute(f"GRANT USAGE ON SCHEMA app TO {other.role}")
    assert signal(other.conn, instance, "approval") == Error(
        f"Instance not found or access denied: {instance}"
    )
    assert value(other.conn, "SELECT app.approve(%s)", (instance,)) == "OK"
    assert signals_of(conn, instance) == [("approval", '"yes"', app.role)]


# -- df.signal: the data ------------------------------------------------------------------------

# signal_data as sent -> the stored JSON (jsonb's text). Valid JSON is taken as JSON, anything
# else becomes a JSON string.
ENCODINGS: list[tuple[str, str]] = [
    ("approve", '"approve"'),
    ("42", "42"),
    ("-1.50", "-1.50"),
    ("1e3", "1000"),
    ('{"a":1}', '{"a": 1}'),
    ('{"name": "alice", "ok": true}', '{"ok": true, "name": "alice"}'),  # jsonb's key order
    ("[1,2]", "[1, 2]"),
    ("null", "null"),
    ("true", "true"),
    ('"s"', '"s"'),
    ("", '""'),
    (" 42 ", "42"),
    ("4 2", '"4 2"'),
    ("NaN", '"NaN"'),
    ('{"a":1', '"{\\"a\\":1"'),
    ("{sys_instance_id}", '"{sys_instance_id}"'),
    ("héllo ✓ 日本", '"héllo ✓ 日本"'),
    ('{"ключ": "значение"}', '{"ключ": "значение"}'),
    ('"\\u00e9"', '"é"'),
    # jsonb cannot hold U+0000, so this JSON text is not accepted as JSON: it arrives as the
    # string of its 8 characters.
    ('"\\u0000"', '"\\"\\\\u0000\\""'),
    ("it's", '"it\'s"'),
]


def test_signal_data_encoding(app: App, conn: Conn) -> None:
    instance = app.start("df.wait_for_signal('d')")
    for data, _ in ENCODINGS:
        assert signal(app.conn, instance, "d", data) == "OK", data
    assert signal(app.conn, instance, "default") == "OK"
    got = [
        (data, stored)
        for (data, _), (_, stored, _) in zip(ENCODINGS, signals_of(conn, instance), strict=False)
    ]
    assert got == ENCODINGS
    assert signals_of(conn, instance)[-1] == ("default", "{}", app.role)
    # A JSON null is data, not a missing signal.
    assert (
        value(
            conn,
            "SELECT jsonb_typeof(data) FROM df._signals WHERE instance_id = %s AND data = 'null'",
            (instance,),
        )
        == "null"
    )


# -- buffering and consumption ------------------------------------------------------------------


def test_a_flood_is_buffered_and_consumed_one_by_one_in_order(app: App, conn: Conn) -> None:
    instance = app.start("df.wait_for_signal('f')")
    assert (
        value(
            app.conn,
            "SELECT count(*) FILTER (WHERE df.signal(%s, 'f', i::text) = 'OK')"
            " FROM generate_series(1, 1000) AS i",
            (instance,),
        )
        == 1000
    )
    assert signal(app.conn, instance, "g", "other name") == "OK"
    assert value(conn, "SELECT df._signal_pending(%s, 'f')", (instance,)) is True
    assert value(conn, "SELECT df._signal_pending(%s, 'F')", (instance,)) is False
    taken = []
    with conn.transaction():
        for activation in range(1000):
            taken.append(value(conn, CONSUME, (instance, "f", activation)))
        assert value(conn, CONSUME, (instance, "f", 1000)) is None
    assert taken == list(range(1, 1001))
    assert value(conn, "SELECT df._signal_pending(%s, 'f')", (instance,)) is False
    # Each was taken once, by the wait that consumed it, and is kept as a record.
    assert conn.execute(
        "SELECT count(*), count(DISTINCT consumed_by), min(consumed_by), max(consumed_by),"
        "       bool_and(consumed_by = (data::text)::int - 1), bool_and(consumed_at >= sent_at)"
        "  FROM df._signals WHERE instance_id = %s AND name = 'f'",
        (instance,),
    ).fetchone() == (1000, 1000, 0, 999, True, True)
    # The other name is untouched.
    assert value(conn, "SELECT df._signal_pending(%s, 'g')", (instance,)) is True
    assert value(conn, CONSUME, (instance, "g", 5)) == "other name"


def test_consume_returns_json_null_and_sql_null_apart(app: App, conn: Conn) -> None:
    instance = app.start("df.wait_for_signal('n')")
    signal(app.conn, instance, "n", "null")
    # What the worker runs (queries.consume_signal): a row (data, its size) or none.
    query = "SELECT data, data_bytes FROM df._consume_signal(%s, 'n', 1, 1000)"
    assert conn.execute(query, (instance,)).fetchall() == [(None, 4)]
    assert conn.execute(query, (instance,)).fetchall() == []
    # Per instance: another instance's signals are not taken.
    second = app.start("df.wait_for_signal('n')")
    signal(app.conn, second, "n", "2")
    assert conn.execute(query, (instance,)).fetchall() == []
    assert conn.execute(query, (second,)).fetchall() == [(2, 1)]


def test_cascade_on_instance_delete(app: App, conn: Conn) -> None:
    instance = app.start("df.wait_for_signal('x')")
    signal(app.conn, instance, "x")
    signal(app.conn, instance, "x")
    conn.execute(CONSUME, (instance, "x", 1))
    conn.execute("DELETE FROM df.instances WHERE id = %s", (instance,))
    assert value(conn, "SELECT count(*) FROM df._signals") == 0


# -- waking waits -------------------------------------------------------------------------------


def wake(conn: Conn, instances: list[str] | None) -> list[str]:
    """df._wake_signal_waits as the worker calls it, for instances whose signals committed
    (None: the sweep): the instances it could not lock just then."""
    rows = conn.execute("SELECT * FROM df._wake_signal_waits(%s::text[])", (instances,)).fetchall()
    return [str(r[0]) for r in rows]


def test_a_committed_signal_is_announced_and_the_worker_wakes_the_waits_of_its_name(
    app: App, conn: Conn, dsn: str
) -> None:
    instance = app.start("df.wait_for_signal('go')")
    elsewhere = app.start("df.wait_for_signal('go')")
    waiting = add_task(conn, instance, 1, "go")  # no timeout
    deadline = add_task(conn, instance, 2, "go", due_in="1 hour")
    other_name = add_task(conn, instance, 3, "stop")
    leased = add_task(conn, instance, 4, "go", due_in="30 s", leased=True)
    timer = add_task(conn, instance, 5, "go", due_in="1 hour", kind="timer")
    other_instance = add_task(conn, elsewhere, 1, "go")
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgdurable_signals")
        listener.execute("LISTEN pgdurable_tasks")

        def heard() -> list[tuple[str, str]]:
            return [(n.channel, n.payload) for n in listener.notifies(timeout=1, stop_after=2)]

        assert signal(app.conn, instance, "go", "1") == "OK"
        # The sender wakes nothing itself: it tells the workers which instance, at its commit.
        assert not due(conn, waiting) and not due(conn, deadline)
        assert heard() == [("pgdurable_signals", instance)]
        # A worker then wakes the waits of that name.
        assert wake(conn, [instance]) == []
        assert [due(conn, t) for t in (waiting, deadline)] == [True, True]
        # A leased wait is left to its worker, which is about to look for signals itself.
        assert [due(conn, t) for t in (other_name, leased, timer, other_instance)] == [
            False,
            False,
            False,
            False,
        ]
        assert heard() == [("pgdurable_tasks", "")]
        # A signal nobody waits for is only buffered: no wake-up call for the claim loop.
        assert signal(app.conn, instance, "nobody", "2") == "OK"
        assert heard() == [("pgdurable_signals", instance)]
        assert wake(conn, [instance]) == []
        assert heard() == []
        assert value(conn, "SELECT df._signal_pending(%s, 'nobody')", (instance,)) is True
        # One notification per instance and transaction; none for a rollback.
        with app.conn.transaction():
            for data in ("a", "b", "c"):
                signal(app.conn, instance, "later", data)
            signal(app.conn, elsewhere, "later")
        assert sorted(heard()) == sorted(
            [("pgdurable_signals", instance), ("pgdurable_signals", elsewhere)]
        )
        with pytest.raises(psycopg.errors.QueryCanceled), app.conn.transaction():
            signal(app.conn, instance, "undone")
            app.conn.execute("SET LOCAL statement_timeout = 1; SELECT pg_sleep(1)")
        assert heard() == []
        assert value(conn, "SELECT df._signal_pending(%s, 'undone')", (instance,)) is False
    # The sweep finds what a notification would have named: a wait that sleeps although its
    # signal is buffered (written by hand here; a checkpoint would have made it due at once).
    late = add_task(conn, instance, 6, "nobody")
    assert not due(conn, late)
    assert wake(conn, None) == []
    assert due(conn, late)


def test_a_signal_is_not_lost_when_a_wait_starts_concurrently(
    app: App, conn: Conn, dsn: str
) -> None:
    """The checkpoint that starts (or re-arms) a wait holds the instance row FOR NO KEY UPDATE
    and sees no signal; the signal commits meanwhile (it waits for nothing). The worker's
    wake-up passes the locked instance over and says so; tried again once the checkpoint
    committed, it makes the new task due."""
    instance = app.start("df.wait_for_signal('go')")
    with psycopg.connect(dsn) as checkpoint:
        checkpoint.execute(
            "SELECT 1 FROM df.instances WHERE id = %s FOR NO KEY UPDATE", (instance,)
        )
        assert value(checkpoint, "SELECT df._signal_pending(%s, 'go')", (instance,)) is False
        task = add_task(checkpoint, instance, 1, "go")
        assert signal(app.conn, instance, "go") == "OK"
        assert wake(conn, [instance]) == [instance]  # locked: to be tried again
        checkpoint.commit()
    assert not due(conn, task)
    assert wake(conn, [instance]) == []
    assert due(conn, task)


def test_a_wait_sees_a_signal_whose_wake_up_it_waited_for(app: App, conn: Conn, dsn: str) -> None:
    """The other order: the worker's wake-up holds the instance row FOR SHARE until it commits,
    so a checkpoint's lock waits for it, and then sees the signal (committed before)."""
    instance = app.start("df.wait_for_signal('go')")
    assert signal(app.conn, instance, "go") == "OK"
    with psycopg.connect(dsn) as waker:
        assert wake(waker, [instance]) == []
        assert run(
            conn, "SELECT 1 FROM df.instances WHERE id = %s FOR NO KEY UPDATE NOWAIT", (instance,)
        ) == Error('could not obtain lock on row in relation "instances"')
    assert value(conn, "SELECT df._signal_pending(%s, 'go')", (instance,)) is True


def test_a_sender_holds_no_lock_the_engine_needs(app: App, conn: Conn) -> None:
    """Until it commits, an open transaction that signalled an instance holds up none of its
    checkpoints: they lock the instance and its tasks at once, and do not see the signal."""
    instance = app.start("df.wait_for_signal('go')")
    task = add_task(conn, instance, 1, "go")
    for isolation in ("READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"):
        with app.conn.transaction():
            app.conn.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
            assert signal(app.conn, instance, "go") == "OK"
            assert (
                run(
                    conn,
                    "SELECT 1 FROM df.instances WHERE id = %s FOR NO KEY UPDATE NOWAIT",
                    (instance,),
                )
                is None
            )
            assert (
                run(conn, "SELECT 1 FROM df._tasks WHERE id = %s FOR UPDATE NOWAIT", (task,))
                is None
            )
            assert value(conn, "SELECT df._signal_pending(%s, 'go')", (instance,)) is False
            assert wake(conn, [instance]) == [] and not due(conn, task)
            conn.execute("SELECT df._consume_signal(%s, 'go', 1, 1000)", (instance,))
        assert value(conn, "SELECT df._signal_pending(%s, 'go')", (instance,)) is True
        conn.execute("SELECT df._consume_signal(%s, 'go', 1, 1000)", (instance,))


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_snapshot_isolation_senders_miss_no_wait(app: App, conn: Conn, isolation: str) -> None:
    """A REPEATABLE READ or SERIALIZABLE sender only inserts a row: waits that start or are
    re-armed after its snapshot are woken all the same, by the worker after the commit."""
    instance = app.start("df.wait_for_signal('go')")
    leased = add_task(conn, instance, 1, "go", due_in="30 s", leased=True)
    with psycopg.connect(app.dsn) as c:
        c.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        c.execute("SELECT 1")  # the snapshot
        # A worker re-arms the leased wait (queries.rearm), and a checkpoint starts another.
        conn.execute(
            "UPDATE df._tasks SET lease_owner = NULL, token = NULL, visible_at = 'infinity'"
            " WHERE id = %s",
            (leased,),
        )
        second = add_task(conn, instance, 2, "go")
        assert signal(c, instance, "go") == "OK"
        c.commit()
    assert not due(conn, leased) and not due(conn, second)
    assert wake(conn, [instance]) == []
    assert due(conn, leased) and due(conn, second)


# -- privileges and isolation -------------------------------------------------------------------


def test_signals_are_private(app: App, other: App, conn: Conn) -> None:
    mine = app.start("df.wait_for_signal('go')")
    done = app.start("df.wait_for_signal('go')")
    set_status(conn, done, "completed")
    signal(app.conn, mine, "go", "secret")
    denied = Error("permission denied for table _signals")
    insert = "INSERT INTO df._signals (instance_id, name, data) VALUES (%s, %s, %s)"
    for role in (app, other):
        check(
            role.conn,
            [
                ("count(*) FROM df._signals", denied),
                (
                    f"df._consume_signal('{mine}', 'go', 1, 1000)",
                    Error("permission denied for function _consume_signal"),
                ),
                (
                    f"df._signal_pending('{mine}', 'go')",
                    Error("permission denied for function _signal_pending"),
                ),
                ("df._signal_sent()", Error("permission denied for function _signal_sent")),
                (
                    f"df._wake_signal_waits(ARRAY['{mine}'])",
                    Error("permission denied for function _wake_signal_waits"),
                ),
            ],
        )
        assert run(role.conn, "UPDATE df._signals SET consumed_at = now()") == denied
        assert run(role.conn, "DELETE FROM df._signals") == denied
        # Only instance_id, name and data may be given: sent_by is the inserting role.
        forged = (
            "INSERT INTO df._signals (instance_id, name, data, sent_by) VALUES (%s, %s, %s, %s)"
        )
        assert run(role.conn, forged, (mine, "go", "{}", "postgres")) == denied
    # Another role can neither signal nor insert into someone else's instance.
    assert signal(other.conn, mine, "go") == Error(f"Instance not found or access denied: {mine}")
    assert run(other.conn, insert, (mine, "go", "{}")) == Error(
        f"Instance not found or access denied: {mine}"
    )
    # The owner's own INSERT is df.signal without the argument checks: checked, announced and
    # woken by the worker.
    waiting = add_task(conn, mine, 1, "go")
    assert not due(conn, waiting)
    assert run(app.conn, insert, (mine, "go", '"direct"')) is None
    assert wake(conn, [mine]) == []
    assert due(conn, waiting)
    assert run(app.conn, insert, (done, "go", "{}")) == Error(
        f"Instance {done} is completed: signal 'go' was not delivered"
    )
    assert signals_of(conn, mine) == [("go", '"secret"', app.role), ("go", '"direct"', app.role)]


def test_without_usage_there_is_no_signal(
    cluster: EmbeddedPostgres, dbname: str, conn: Conn, app: App
) -> None:
    instance = app.start("df.wait_for_signal('go')")
    role = f"stranger_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with psycopg.connect(cluster.dsn(dbname, user=role), autocommit=True) as c:
            assert signal(c, instance, "go") == Error("permission denied for schema df")
    finally:
        conn.execute(f"DROP ROLE {role}")


def test_grant_and_revoke_usage_cover_signals(
    cluster: EmbeddedPostgres, dbname: str, app: App, other: App, conn: Conn
) -> None:
    columns = ("instance_id", "name", "data", "sent_by", "sent_at", "consumed_at", "consumed_by")

    def privileges(role: str) -> list[bool]:
        can_insert = [
            bool(
                value(
                    conn,
                    f"SELECT has_column_privilege(%s, 'df._signals', '{column}', 'INSERT')",
                    (role,),
                )
            )
            for column in columns
        ]
        return [
            *can_insert,
            bool(
                value(
                    conn,
                    "SELECT has_table_privilege(%s, 'df._signals', 'SELECT, UPDATE, DELETE')",
                    (role,),
                )
            ),
        ]

    granted = [True, True, True, False, False, False, False, False]
    assert privileges(app.role) == granted
    user = f"later_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {user} LOGIN")
    try:
        assert privileges(user) == [False] * 8
        # An admin with the grant option passes it on and takes it back.
        conn.execute("SELECT df.grant_usage(%s, with_grant => true)", (other.role,))
        other.conn.execute("SELECT df.grant_usage(%s)", (user,))
        assert privileges(user) == granted
        with psycopg.connect(cluster.dsn(dbname, user=user), autocommit=True) as c:
            instance = str(value(c, "SELECT df.start('SELECT 1')"))
            assert signal(c, instance, "go") == "OK"
        other.conn.execute("SELECT df.revoke_usage(%s)", (user,))
        assert privileges(user) == [False] * 8
        # An admin who holds nothing on df._signals (made before migration 7) can still revoke.
        other.conn.execute("SELECT df.grant_usage(%s)", (user,))
        conn.execute(
            f"REVOKE INSERT (instance_id, name, data) ON df._signals FROM {other.role} CASCADE"
        )
        assert privileges(user) == [False] * 8  # cascaded
        assert run(other.conn, "SELECT df.revoke_usage(%s)", (user,)) is None
        conn.execute("SELECT df.revoke_usage(%s)", (other.role,))
        assert privileges(other.role) == [False] * 8
    finally:
        conn.execute(f"DROP OWNED BY {user}")
        conn.execute(f"DROP ROLE {user}")
