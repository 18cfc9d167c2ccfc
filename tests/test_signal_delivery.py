"""Signal delivery with a worker (docs/signals.md, "Delivery"): a sender's open transaction
holds up nothing, the signal arrives right after its commit and never after a rollback, no
wake-up is lost to a race or a restart; transaction_mode => 'new'; and df.await_instance in
the transaction that sent the signal.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from conftest import App, ThreadWorker
from sqlcheck import Conn, Error, outcome

from pgdurable.embedded import EmbeddedPostgres

# The reproducer: a step, then the wait, then a step that uses what the wait received.
REPRODUCER = "'SELECT 1' ~> df.wait_for_signal('go') |=> 's' ~> 'SELECT $s::text'"
NOT_YET = (
    "df.await_instance(): this transaction signalled instance {} and has not committed; the"
    " signal is delivered only when it commits, so commit first, or send it with"
    " df.signal(..., transaction_mode => 'new')"
)


def poll(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def one(conn: Conn, query: str, params: tuple[object, ...] = ()) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


def status(conn: Conn, instance: str) -> str:
    return str(one(conn, "SELECT status FROM df.instances WHERE id = %s", (instance,)))


def node_status(conn: Conn, instance: str, node_type: str) -> str:
    return str(
        one(
            conn,
            "SELECT status FROM df.nodes WHERE instance_id = %s AND node_type = %s",
            (instance, node_type),
        )
    )


def waiting(conn: Conn, instance: str) -> bool:
    """The instance's wait has begun (its task sleeps) and the steps before it completed."""
    return bool(
        one(
            conn,
            "SELECT EXISTS (SELECT 1 FROM df._tasks WHERE instance_id = %s AND kind = 'signal'"
            "               AND lease_owner IS NULL AND visible_at > now())",
            (instance,),
        )
    )


def received(conn: Conn, instance: str) -> bool:
    return node_status(conn, instance, "SIGNAL") == "completed"


def start_waiting(app: App, conn: Conn, graph: str = REPRODUCER) -> str:
    instance = app.start(graph)
    poll(lambda: waiting(conn, instance), "the wait")
    return instance


@pytest.fixture
def other(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[App]:
    """A second role with df usage."""
    role = f"other_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE ROLE {role} LOGIN")
    conn.execute("SELECT df.grant_usage(%s)", (role,))
    o = App(cluster, dbname, role)
    yield o
    o.conn.close()
    conn.execute(f"DROP OWNED BY {role} CASCADE")
    conn.execute(f"DROP ROLE {role}")


# -- (a) the sender holds up nothing -------------------------------------------------------------


def test_an_open_sender_holds_up_nothing_and_its_commit_delivers_at_once(
    app: App, conn: Conn, worker: ThreadWorker
) -> None:
    instance = app.start(REPRODUCER)
    with psycopg.connect(app.dsn) as sender:
        sender.execute("SELECT df.signal(%s, 'go', '{}')", (instance,))
        sender.execute("SELECT pg_sleep(0.1)")
        # The instance starts, runs its first step and reaches the wait, while the sender's
        # transaction is open.
        poll(lambda: waiting(conn, instance), "the first step and the wait", timeout=10)
        assert status(conn, instance) == "running"
        assert (
            one(
                conn,
                "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SQL'"
                " AND status = 'completed'",
                (instance,),
            )
            == 1
        )
        assert not received(conn, instance)
        assert (
            one(conn, "SELECT max(deferrals) FROM df._tasks WHERE instance_id = %s", (instance,))
            == 0
        )
        sender.commit()
        committed = time.monotonic()
    poll(lambda: received(conn, instance), "the signal", timeout=10)
    assert time.monotonic() - committed < 1.0
    assert app.wait(instance) == "completed"
    result = app.result(instance)
    assert isinstance(result, dict) and result["row_count"] == 1
    assert json.loads(result["rows"][0]["text"]) == {
        "signal_name": "go",
        "timed_out": False,
        "data": {},
    }


def test_a_sender_that_rolls_back_delivers_nothing(
    app: App, conn: Conn, worker: ThreadWorker
) -> None:
    instance = start_waiting(app, conn)
    with psycopg.connect(app.dsn) as sender:
        sender.execute("SELECT df.signal(%s, 'go', '\"undone\"')", (instance,))
        sender.rollback()
    time.sleep(1.5)
    assert not received(conn, instance) and status(conn, instance) == "running"
    assert one(conn, "SELECT count(*) FROM df._signals WHERE instance_id = %s", (instance,)) == 0
    # The wait still takes the next one.
    app.conn.execute("SELECT df.signal(%s, 'go', '\"real\"')", (instance,))
    assert app.wait(instance) == "completed"
    assert (
        one(
            conn,
            "SELECT result -> 'data' FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        )
        == "real"
    )


def test_no_wake_up_is_lost_to_a_wait_that_starts_as_the_signal_commits(
    app: App, conn: Conn, dsn: str
) -> None:
    """Signals sent while the wait is being created, over and over; the periodic sweep is off,
    so each must be woken by its own notification (or be consumed by the checkpoint)."""
    worker = ThreadWorker(dsn, concurrency=4, signal_sweep_interval=3600.0)
    rng = random.Random(7)
    try:
        instances = []
        for _ in range(40):
            instance = app.start("'SELECT 1' ~> df.wait_for_signal('go')")
            time.sleep(rng.uniform(0, 0.04))
            app.conn.execute("SELECT df.signal(%s, 'go')", (instance,))
            instances.append(instance)
        for instance in instances:
            assert app.wait(instance, 10) == "completed", instance
    finally:
        worker.stop()


def test_a_signal_committed_while_the_checkpoint_creating_the_wait_commits(
    app: App, conn: Conn, dsn: str
) -> None:
    """The narrow case, made wide: the checkpoint that creates the wait has looked for a
    signal (none) and holds the instance while its COMMIT runs a slow deferred trigger; the
    signal commits then. The worker's wake-up finds the instance locked and tries again after
    that commit, when it sees the new wait. (The periodic sweep is off.)"""
    app.conn.execute("CREATE TABLE slow (x int)")
    app.conn.execute(
        "CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END$$"
    )
    app.conn.execute(
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleepy()"
    )
    worker = ThreadWorker(dsn, concurrency=2, signal_sweep_interval=3600.0)
    try:
        for _ in range(3):
            instance = app.start("'INSERT INTO slow VALUES (1)' ~> df.wait_for_signal('go')")
            poll(
                lambda: bool(
                    one(
                        conn,
                        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE usename = %s"
                        " AND state = 'active' AND query LIKE '%%COMMIT%%')",
                        (app.role,),
                    )
                ),
                "the step's COMMIT",
            )
            app.conn.execute("SELECT df.signal(%s, 'go')", (instance,))
            assert app.wait(instance, 10) == "completed"
    finally:
        worker.stop()


def test_a_signal_committed_while_no_worker_listens_is_delivered(
    app: App, conn: Conn, dsn: str
) -> None:
    """Its notification is lost (a worker restart between the commit and the wake-up): the
    sweep finds it, when a worker starts listening and every few seconds."""
    first = ThreadWorker(dsn, concurrency=2)
    try:
        instance = start_waiting(app, conn)
    finally:
        first.stop()
    app.conn.execute("SELECT df.signal(%s, 'go', '\"while down\"')", (instance,))
    second = ThreadWorker(dsn, concurrency=2, signal_sweep_interval=0.5)
    try:
        assert app.wait(instance, 10) == "completed"
        # A running worker misses one too: a signal row written without its trigger (as
        # a lost notification leaves it) is found by the next periodic sweep.
        again = start_waiting(app, conn)
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO df._signals (instance_id, name, data) VALUES (%s, 'go', '1')", (again,)
        )
        conn.execute("RESET session_replication_role")
        assert app.wait(again, 10) == "completed"
    finally:
        second.stop()


# -- (b) transaction_mode => 'new' ----------------------------------------------------------------


def test_new_mode_delivers_at_once_even_if_the_caller_rolls_back(
    app: App, conn: Conn, worker: ThreadWorker
) -> None:
    instance = start_waiting(app, conn)
    with app.conn.transaction(force_rollback=True):
        assert (
            one(
                app.conn,
                "SELECT df.signal(%s, 'go', '{\"by\": \"alice\"}', transaction_mode => 'new')",
                (instance,),
            )
            == "OK"
        )
        # Committed already, and woken: await in the same transaction works.
        assert one(app.conn, "SELECT df.await_instance(%s, 10)", (instance,)) == "completed"
    assert (
        one(
            conn,
            "SELECT result -> 'data' ->> 'by' FROM df.nodes"
            " WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        )
        == "alice"
    )
    assert one(
        conn, "SELECT sent_by::text FROM df._signals WHERE instance_id = %s", (instance,)
    ) == (app.role)
    # No loopback session and no launch slot is left.
    poll(
        lambda: (
            one(
                conn,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'pg_durable:backend:new-transaction'",
            )
            == 0
        ),
        "the loopback to close",
    )
    assert (
        one(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1346982470",
        )
        == 0
    )


def test_new_mode_checks_like_caller_mode(app: App, other: App, conn: Conn) -> None:
    mine = app.start("df.wait_for_signal('go')")
    theirs = other.start("df.wait_for_signal('go')")
    done = app.start("df.wait_for_signal('go')")
    conn.execute("UPDATE df.instances SET status = 'completed' WHERE id = %s", (done,))

    def new(conn: Conn, instance: str, mode: str | None = "new") -> object:
        return outcome(conn, "df.signal(%s, 'go', 'x', transaction_mode => %s)", [instance, mode])

    assert new(app.conn, theirs) == Error(f"Instance not found or access denied: {theirs}")
    assert new(app.conn, "0badc0de") == Error("Instance not found or access denied: 0badc0de")
    assert new(app.conn, done) == Error(
        f"Instance {done} is completed: signal 'go' was not delivered"
    )
    assert new(app.conn, mine, "later") == Error(
        "invalid transaction_mode \"later\" for df.signal(): expected 'caller' or 'new'"
    )
    assert new(app.conn, mine, "") == Error(
        "invalid transaction_mode \"\" for df.signal(): expected 'caller' or 'new'"
    )
    # STRICT, like every argument: NULL sends nothing.
    assert new(app.conn, mine, None) is None
    assert one(conn, "SELECT count(*) FROM df._signals") == 0
    # Any case, like df.start's; 'caller' is the default.
    assert new(app.conn, mine, "NEW") == "OK"
    assert new(app.conn, mine, "Caller") == "OK"
    assert one(conn, "SELECT count(*) FROM df._signals WHERE instance_id = %s", (mine,)) == 2
    # A BYPASSRLS role sees the other instance but may not signal it, in either mode.
    conn.execute(f"ALTER ROLE {app.role} BYPASSRLS")
    with psycopg.connect(app.dsn, autocommit=True) as bypass:
        assert new(bypass, theirs) == Error(f"Instance not found or access denied: {theirs}")
    assert one(conn, "SELECT count(*) FROM df._signals WHERE instance_id = %s", (theirs,)) == 0
    # Inside a workflow step it would be repeated with each retry of the step.
    app.conn.execute("SET df.in_workflow = 'true'")
    assert new(app.conn, mine) == Error(
        "df.signal() with transaction_mode => 'new' cannot be called inside a workflow - a "
        "workflow step's df.signal already commits with the step; use the default "
        "transaction_mode"
    )


def test_new_mode_as_another_role_through_set_role(app: App, other: App, conn: Conn) -> None:
    """The loopback logs in as the session user and SET ROLEs to the current user, as for
    df.start: a role may signal as one it may become, and nothing else."""
    theirs = other.start("df.wait_for_signal('go')")
    conn.execute(f"GRANT {other.role} TO {app.role}")
    app.conn.execute(f"SET ROLE {other.role}")
    assert (
        one(app.conn, "SELECT df.signal(%s, 'go', '1', transaction_mode => 'new')", (theirs,))
        == "OK"
    )
    app.conn.execute("RESET ROLE")
    assert one(conn, "SELECT sent_by::text FROM df._signals WHERE instance_id = %s", (theirs,)) == (
        other.role
    )
    # Called directly, the definer function cannot act as a role the login may not become.
    conn.execute(f"REVOKE {other.role} FROM {app.role}")
    got = outcome(
        app.conn,
        "df._in_new_transaction('signal', ARRAY[%s, 'go', '2'], %s)",
        [theirs, other.role],
    )
    assert isinstance(got, Error) and "may not SET ROLE to it" in got.message, got
    assert got.message.startswith(
        f"df.signal(): transaction_mode => 'new' cannot signal as role \"{other.role}\""
    )
    assert one(conn, "SELECT count(*) FROM df._signals WHERE instance_id = %s", (theirs,)) == 1


# -- await in the transaction that signalled -----------------------------------------------------


def test_await_in_the_signalling_transaction_fails_at_once(
    app: App, conn: Conn, worker: ThreadWorker
) -> None:
    instance = start_waiting(app, conn)
    for send in (
        "SELECT df.signal(%s, 'go', '{}')",
        "INSERT INTO df._signals (instance_id, name, data) VALUES (%s, 'go', '{}')",
    ):
        with app.conn.transaction(force_rollback=True):
            app.conn.execute(send, (instance,))
            began = time.monotonic()
            assert outcome(app.conn, "df.await_instance(%s, 30)", [instance]) == Error(
                NOT_YET.format(instance)
            )
        assert time.monotonic() - began < 1.0
    # A signal in a savepoint that was rolled back is not waited for: the await waits.
    with app.conn.transaction(force_rollback=True):
        with pytest.raises(psycopg.errors.QueryCanceled), app.conn.transaction():
            app.conn.execute("SELECT df.signal(%s, 'go', '{}')", (instance,))
            app.conn.execute("SET LOCAL statement_timeout = 1; SELECT pg_sleep(1)")
        assert outcome(app.conn, "df.await_instance(%s, 1)", [instance]) == Error(
            f"Timeout after 1s waiting for instance {instance} (status: running). Check if"
            " background worker is running."
        )
    # Committed, the same awaits its end.
    app.conn.execute("SELECT df.signal(%s, 'go', '{}')", (instance,))
    assert app.wait(instance, 10) == "completed"
    # An instance that finished meanwhile is simply awaited: it has nothing left to wait for.
    brief = app.start("'SELECT pg_sleep(0.3)'")
    with app.conn.transaction(force_rollback=True):
        app.conn.execute("SELECT df.signal(%s, 'unused')", (brief,))
        poll(lambda: status(conn, brief) == "completed", "the instance to end")
        assert one(app.conn, "SELECT df.await_instance(%s, 5)", (brief,)) == "completed"
