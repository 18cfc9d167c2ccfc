"""A tenant cannot stall the others: a slow COMMIT, rows held locked, a large fan-out.

Each test runs a second tenant's probe workflow (two steps) against what a hostile or
careless tenant does, and asserts the order of events -- the probe finishes while the other
tenant's work is still held up -- rather than a duration.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import test_attacks as attacks
from conftest import ThreadWorker
from test_attacks import TenantFactory, poll, status_of, wait_terminal

Conn = psycopg.Connection[Any]
tenants = attacks.tenants  # the fixture

PROBE = "'SELECT 1 AS a' ~> 'SELECT 2 AS b'"


def test_a_slow_commit_holds_one_slot_not_the_worker(conn: Conn, tenants: TenantFactory) -> None:
    slow, other = tenants(), tenants()
    slow.conn.execute("CREATE TABLE slow (x int)")
    slow.conn.execute(
        "CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN PERFORM pg_sleep(4); RETURN NULL; END$$"
    )
    slow.conn.execute(
        "CREATE CONSTRAINT TRIGGER slowc AFTER INSERT ON slow DEFERRABLE INITIALLY DEFERRED"
        " FOR EACH ROW EXECUTE FUNCTION sleepy()"
    )
    worker = ThreadWorker(conn.info.dsn, concurrency=4)
    try:
        # A loop of such steps: each COMMIT sleeps; the loop would hold its slot for ever.
        looping = slow.start("@> 'INSERT INTO slow VALUES (1)'")
        stalled = slow.start("'INSERT INTO slow VALUES (2)'")
        attacks.wait_running_statement(conn, slow.name, "COMMIT")  # both steps sleep in it
        probe = other.start(PROBE)
        assert wait_terminal(conn, probe, timeout=30) == "completed"
        # (Pending or running: a first step commits with its instance's start.)
        assert status_of(conn, stalled) != "completed", "the probe waited for the slow COMMIT"
        assert wait_terminal(conn, stalled, timeout=30) == "completed"
        slow.value("SELECT df.cancel(%s)", (looping,))
    finally:
        worker.stop()


def test_rows_a_tenant_keeps_locked_delay_only_its_own_steps(
    conn: Conn, tenants: TenantFactory
) -> None:
    owner, other = tenants(), tenants()
    owner.conn.execute("CREATE TABLE effects (instance text)")
    step = (
        "'INSERT INTO effects SELECT ''{sys_instance_id}'' FROM pg_sleep(0.5)' ~> 'SELECT 1 AS x'"
    )
    mine = [owner.start(step) for _ in range(6)]
    timer = owner.start("df.sleep(1) ~> 'SELECT 1 AS y'")
    worker = ThreadWorker(conn.info.dsn, concurrency=4)
    holder = psycopg.connect(owner.conn.info.dsn)
    try:
        attacks.wait_running_statement(conn, owner.name, "INSERT INTO effects")
        # Another session of the same role locks every row of its instances, and keeps them:
        # the running steps' checkpoints, the timer and the waiting steps all need them.
        holder.execute("SELECT id FROM df.instances FOR UPDATE")
        probe = other.start(PROBE)
        # Well within the 30 s lease: no lease had to run out for the probe to go on.
        assert wait_terminal(conn, probe, timeout=15) == "completed"
        assert all(status_of(conn, i) != "completed" for i in [*mine, timer])
        poll(
            lambda: conn.execute("SELECT max(deferrals) FROM df._tasks").fetchone()[0] >= 2,
            "steps given back and tried again",
        )
        holder.rollback()
        for instance in [*mine, timer]:
            assert wait_terminal(conn, instance, timeout=30) == "completed"
        # Each try while the rows were held was rolled back: one effect per instance.
        counts = conn.execute(
            f"SELECT instance, count(*) FROM {owner.name}.effects GROUP BY instance"
        ).fetchall()
        assert sorted(counts) == sorted((i, 1) for i in mine)
    finally:
        holder.close()
        worker.stop()


def test_a_signal_sender_in_an_open_transaction_does_not_stall_the_worker(
    conn: Conn, tenants: TenantFactory
) -> None:
    owner, other = tenants(), tenants()
    # A timer fires beside each wait; its checkpoint needs the instance row, which the
    # sender's open transaction must not hold.
    waiting = [owner.start("df.wait_for_signal('go') & df.sleep(1)") for _ in range(2)]
    worker = ThreadWorker(conn.info.dsn, concurrency=2)
    sender = psycopg.connect(owner.conn.info.dsn)
    try:
        for instance in waiting:
            poll(lambda i=instance: status_of(conn, i) == "running", "the wait")
        for instance in waiting:
            sender.execute("SELECT df.signal(%s, 'go', '{}')", (instance,))
        time.sleep(1)  # the timers are due
        probe = other.start(PROBE)
        assert wait_terminal(conn, probe, timeout=15) == "completed"
        sender.commit()
        for instance in waiting:
            assert wait_terminal(conn, instance, timeout=30) == "completed"
    finally:
        sender.close()
        worker.stop()


def _branches(count: int, seconds: float) -> str:
    """A JOIN of ``count`` branches that each sleep ``seconds``, as a df.start argument."""
    return " & ".join([f"'SELECT pg_sleep({seconds})'"] * count)


def test_a_large_fan_out_shares_the_slots_with_another_tenant(
    conn: Conn, tenants: TenantFactory
) -> None:
    flood, other = tenants(), tenants()
    fan_out = flood.start(_branches(40, 0.25))
    worker = ThreadWorker(conn.info.dsn, concurrency=4)
    try:
        attacks.wait_running_statement(conn, flood.name, "pg_sleep")
        probe = other.start(PROBE)
        assert wait_terminal(conn, probe, timeout=30) == "completed"
        done = conn.execute(
            "SELECT count(*) FROM df.nodes WHERE instance_id = %s AND node_type = 'SQL'"
            " AND status = 'completed'",
            (fan_out,),
        ).fetchone()
        # First in, first out, the probe would have waited for the 40 branches queued before it.
        assert done is not None and done[0] < 20, f"{done[0]} of 40 branches ran first"
        assert wait_terminal(conn, fan_out, timeout=60) == "completed"
    finally:
        worker.stop()


def test_role_slots_caps_what_one_role_holds(conn: Conn, tenants: TenantFactory) -> None:
    flood = tenants()
    fan_out = flood.start(_branches(12, 0.3))
    worker = ThreadWorker(conn.info.dsn, concurrency=4, role_slots=2)
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(conn.info.dsn, autocommit=True) as watcher:
            while not stop.is_set():
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE usename = %s AND query LIKE 'SELECT pg_sleep%%' AND state = 'active'",
                    (flood.name,),
                ).fetchone()
                seen.append(int(row[0]) if row else 0)
                time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert wait_terminal(conn, fan_out, timeout=60) == "completed"
    finally:
        stop.set()
        sampler.join()
        worker.stop()
    assert max(seen) == 2, f"statements running at once: {sorted(set(seen))}"


def test_instances_a_tenant_holds_do_not_hold_the_deferring_worker(
    conn: Conn, tenants: TenantFactory
) -> None:
    owner, other = tenants(), tenants()
    waits = [owner.start("df.wait_for_signal('x', 2)") for _ in range(2)]
    worker = ThreadWorker(conn.info.dsn, concurrency=2)
    rows = psycopg.connect(owner.conn.info.dsn)
    try:
        poll(
            lambda: (
                conn.execute("SELECT count(*) FROM df._tasks WHERE kind = 'signal'").fetchone()
                == (2,)
            ),
            "the waits",
        )
        # The waits' timeouts come due while their instances are held: the checkpoints wait,
        # give up and are deferred, and the worker serves another tenant meanwhile.
        rows.execute("SELECT id FROM df.instances WHERE id = ANY(%s) FOR SHARE", (waits,))
        poll(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND application_name = 'pgdurable:worker'"
                ).fetchone()
                == (2,)
            ),
            "checkpoints waiting for the instances",
        )
        probe = other.start(PROBE)
        assert wait_terminal(conn, probe, timeout=15) == "completed"
        rows.rollback()
        for instance in waits:
            assert wait_terminal(conn, instance, timeout=30) == "completed"  # timed out
    finally:
        rows.close()
        worker.stop()


def test_a_statement_outside_a_transaction_block_is_deferred_too(
    conn: Conn, tenants: TenantFactory
) -> None:
    owner = tenants()
    owner.conn.execute("CREATE TABLE effects (at timestamptz)")
    owner.conn.execute(
        "CREATE PROCEDURE committing() LANGUAGE plpgsql AS $$BEGIN PERFORM pg_sleep(0.5);"
        " INSERT INTO effects VALUES (clock_timestamp()); COMMIT; END$$"
    )
    instance = owner.start("'CALL committing()'")
    holder = psycopg.connect(owner.conn.info.dsn)
    worker = ThreadWorker(conn.info.dsn, concurrency=2)
    try:
        attacks.wait_running_statement(conn, owner.name, "CALL committing")
        holder.execute("SELECT id FROM df.instances WHERE id = %s FOR UPDATE", (instance,))
        poll(
            lambda: (
                conn.execute(
                    "SELECT coalesce(max(deferrals), 0) >= 1 FROM df._tasks WHERE instance_id = %s",
                    (instance,),
                ).fetchone()
                == (True,)
            ),
            "the step given back",
        )
        holder.rollback()
        # At least once, as such statements are documented to be; completed, not failed.
        assert wait_terminal(conn, instance, timeout=30) == "completed"
    finally:
        holder.close()
        worker.stop()


def test_a_users_own_lock_timeout_fails_its_step(conn: Conn, tenants: TenantFactory) -> None:
    owner = tenants()
    # Named like the engine's checkpoint function, which must not fool the worker.
    owner.conn.execute(
        'CREATE FUNCTION "df._checkpoint("() RETURNS int LANGUAGE plpgsql AS'
        " $$BEGIN RAISE EXCEPTION 'busy' USING ERRCODE = '55P03'; END$$"
    )
    worker = ThreadWorker(conn.info.dsn, concurrency=2)
    try:
        instance = owner.start("""'SELECT "df._checkpoint("() AS x'""")
        assert wait_terminal(conn, instance, timeout=15) == "failed"
        assert "busy" in attacks.output_of(conn, instance)
    finally:
        worker.stop()
