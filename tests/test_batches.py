"""Steps of one role that are ready at once run in one transaction (worker/batch.py): each
takes effect exactly once, finds the session as it would alone, and a step that fails or is
cancelled in a batch leaves the others to complete."""

from __future__ import annotations

import time
from collections import Counter

import psycopg
import pytest
from conftest import App, ThreadWorker

Conn = psycopg.Connection[tuple[object, ...]]

# Each step records its transaction, the session's work_mem as it found it, and then sets
# work_mem for the rest of its session: a step after it in a batch would see that, were the
# session not reset between them.
STEP = (
    "'INSERT INTO effects (instance, step, xact, work_mem, changed)"
    " SELECT ''{label}'', {n}, pg_current_xact_id()::text, current_setting(''work_mem''),"
    " set_config(''work_mem'', ''77MB'', false)'"
)


def start_all(app: App, count: int, graph: str) -> list[str]:
    """Start ``count`` instances of ``graph`` (its {label}: w0, w1...)."""
    return [app.start(graph.replace("{label}", f"w{i}")) for i in range(count)]


@pytest.mark.parametrize(("beside_a_timer", "batch_size"), [(False, 5), (True, 5), (False, 1)])
def test_steps_ready_together_share_a_transaction_each_once_in_a_clean_session(
    app: App, dsn: str, beside_a_timer: bool, batch_size: int
) -> None:
    """A sequence's steps (their state known to the worker); a first step in a JOIN with a
    timer (its instance locked and read in the batch); or each alone, with --batch-size 1."""
    app.conn.execute(
        "CREATE TABLE effects (instance text, step int, xact text, work_mem text, changed text)"
    )
    default = app.conn.execute("SELECT current_setting('work_mem')").fetchone()
    steps = [STEP.format(n=n, label="{label}") for n in range(4)]
    if beside_a_timer:
        steps[0] = f"({steps[0]} & df.sleep(0))"
    instances = start_all(app, 12, " ~> ".join(steps))
    # Started after them: one claim takes them all.
    w = ThreadWorker(dsn, concurrency=12, batch_size=batch_size)
    try:
        assert {app.wait(i) for i in instances} == {"completed"}
    finally:
        w.stop()
    rows = app.conn.execute("SELECT instance, step, xact, work_mem FROM effects").fetchall()
    # Every step of every instance, exactly once.
    assert Counter((r[0], r[1]) for r in rows) == {
        (f"w{i}", n): 1 for i in range(12) for n in range(4)
    }
    # Steps of several instances committed together (up to the batch size)...
    per_xact = Counter(r[2] for r in rows)
    shared = {r[1] for r in rows if per_xact[r[2]] > 1}
    assert bool(shared) == (batch_size > 1), per_xact
    assert max(per_xact.values()) <= batch_size
    if beside_a_timer:
        assert 0 in shared, per_xact
    # ...never two of one instance, and each found work_mem as a session of its own would.
    for xact in per_xact:
        members = [r[0] for r in rows if r[2] == xact]
        assert len(members) == len(set(members))
    assert {r[3] for r in rows} == {default[0] if default else None}


def test_a_step_failing_in_a_batch_fails_its_instance_alone(app: App, dsn: str) -> None:
    app.conn.execute(
        "CREATE TABLE effects (instance text, step int, xact text, work_mem text, changed text)"
    )
    # The third instance's second step divides by zero: in a batch, its error rolls back the
    # others' statements too, which then run again, alone, and complete.
    failing = (
        STEP.format(n=0, label="{label}")
        + " ~> 'SELECT 1 / (''{label}'' <> ''w2'')::int' ~> "
        + STEP.format(n=2, label="{label}")
    )
    instances = start_all(app, 8, failing)
    w = ThreadWorker(dsn, concurrency=8)
    try:
        statuses = [app.wait(i) for i in instances]
    finally:
        w.stop()
    assert statuses == ["completed"] * 2 + ["failed"] + ["completed"] * 5
    assert "division by zero" in str(app.failure(instances[2]))
    rows = app.conn.execute("SELECT instance, step FROM effects").fetchall()
    expected = Counter({(f"w{i}", 0): 1 for i in range(8)})
    expected.update({(f"w{i}", 2): 1 for i in range(8) if i != 2})
    assert Counter(rows) == expected


def test_a_cancel_in_a_batch_stops_only_its_instance(app: App, dsn: str) -> None:
    app.conn.execute(
        "CREATE TABLE effects (instance text, step int, xact text, work_mem text, changed text)"
    )
    # The second step sleeps, so the cancel finds the batch in flight.
    slow = (
        STEP.format(n=0, label="{label}")
        + " ~> 'SELECT pg_sleep(0.5)' ~> "
        + STEP.format(n=2, label="{label}")
    )
    instances = start_all(app, 6, slow)
    w = ThreadWorker(dsn, concurrency=6)
    try:
        deadline = time.monotonic() + 20
        while app.conn.execute(
            "SELECT (SELECT count(*) FROM effects) < 6 OR NOT EXISTS (SELECT FROM pg_stat_activity"
            " WHERE state = 'active' AND query = 'SELECT pg_sleep(0.5)')"
        ).fetchone() != (False,):
            assert time.monotonic() < deadline, "the slow steps never ran"
            time.sleep(0.01)
        app.conn.execute("SELECT df.cancel(%s)", (instances[3],))
        statuses = [app.wait(i) for i in instances]
    finally:
        w.stop()
    assert statuses == ["completed"] * 3 + ["cancelled"] + ["completed"] * 2
    rows = app.conn.execute("SELECT instance, step FROM effects").fetchall()
    expected = Counter({(f"w{i}", 0): 1 for i in range(6)})
    expected.update({(f"w{i}", 2): 1 for i in range(6) if i != 3})
    assert Counter(rows) == expected
