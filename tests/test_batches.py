"""Steps of one role that are ready at once run in one transaction (worker/batch.py): each
takes effect exactly once, finds the session as it would alone, and a step that fails or is
cancelled in a batch leaves the others to complete."""

from __future__ import annotations

import logging
import time
from collections import Counter

import psycopg
import pytest
from conftest import App, ThreadWorker

from pgdurable.worker import batch
from pgdurable.worker.loop import Worker

Conn = psycopg.Connection[tuple[object, ...]]

# Each step records its transaction, the session's work_mem as it found it, and then sets
# work_mem for the rest of its session: a step after it in a batch would see that, were the
# session not reset between them.
STEP = (
    "'INSERT INTO effects (instance, step, xact, work_mem, changed)"
    " SELECT ''{label}'', {n}, pg_current_xact_id()::text, current_setting(''work_mem''),"
    " set_config(''work_mem'', ''77MB'', false)'"
)


def started_worker(dsn: str, app: App, **options: object) -> ThreadWorker:
    """A worker that has run one quick statement of the app's role: a role runs its steps
    alone until the worker has seen how long its statements take."""
    w = ThreadWorker(dsn, **options)
    assert app.run("'SELECT 1'")[1] == "completed"
    return w


def start_all(app: App, count: int, graph: str) -> list[str]:
    """Start ``count`` instances of ``graph`` (its {label}: w0, w1...), in one transaction:
    they become due together, and a worker's next claim takes as many as it has slots."""
    with app.conn.transaction():
        return [app.start(graph.replace("{label}", f"w{i}")) for i in range(count)]


def run_all(
    dsn: str, app: App, count: int, graph: str, **options: object
) -> tuple[list[str], list[str]]:
    """Start them (start_all) for a worker ready to batch (started_worker); their ids and
    statuses once done."""
    w = started_worker(dsn, app, **options)
    try:
        instances = start_all(app, count, graph)
        return instances, [app.wait(i) for i in instances]
    finally:
        w.stop()


def effects(app: App) -> tuple[list[tuple[object, ...]], Counter[object]]:
    """The effects recorded, and how many of them each transaction holds."""
    rows = app.conn.execute("SELECT instance, step, xact, work_mem FROM effects").fetchall()
    return rows, Counter(r[2] for r in rows)


def rolled_back(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why batches rolled back, as the worker logged it."""
    return [r.getMessage() for r in caplog.records if "rolled back" in r.getMessage()]


@pytest.fixture(autouse=True)
def table(app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pgdurable.worker")
    app.conn.execute(
        "CREATE TABLE effects (instance text, step int, xact text, work_mem text, changed text)"
    )


@pytest.fixture
def always_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches form whether or not the worker has more work than slots: for tests of what
    a batch does, where some instances may complete, and free their slots, before others."""
    monkeypatch.setattr(Worker, "_busy", lambda self: True)


@pytest.fixture
def never_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """No statement counts as slow: a loaded machine's round trips must not keep the batches
    these tests look at from forming."""
    monkeypatch.setattr(batch, "SLOW_STATEMENT_SECONDS", float("inf"))


def step(n: int) -> str:
    return STEP.format(n=n, label="{label}")


SEQUENCE = " ~> ".join(step(n) for n in range(4))


@pytest.mark.parametrize("batch_size", [5, 1])
def test_steps_ready_together_share_a_transaction_each_once_in_a_clean_session(
    app: App, dsn: str, batch_size: int
) -> None:
    """Twelve sequences on a worker of twelve slots, all taken: the starts with their first
    steps, then each step after them (its state known to the worker), in batches; or each
    alone, with --batch-size 1."""
    default = app.conn.execute("SELECT current_setting('work_mem')").fetchone()
    _, statuses = run_all(dsn, app, 12, SEQUENCE, concurrency=12, batch_size=batch_size)
    assert set(statuses) == {"completed"}
    rows, per_xact = effects(app)
    # Every step of every instance, exactly once.
    assert Counter((r[0], r[1]) for r in rows) == {
        (f"w{i}", n): 1 for i in range(12) for n in range(4)
    }
    # Steps of several instances committed together (up to the batch size)...
    assert (max(per_xact.values()) > 1) == (batch_size > 1), per_xact
    assert max(per_xact.values()) <= batch_size
    # ...never two of one instance, and each found work_mem as a session of its own would.
    for xact in per_xact:
        members = [r[0] for r in rows if r[2] == xact]
        assert len(members) == len(set(members))
    assert {r[3] for r in rows} == {default[0] if default else None}


def test_a_worker_with_slots_to_spare_runs_each_step_alone(app: App, dsn: str) -> None:
    """A batch's steps wait for each other: only a worker with more work than slots runs
    them (three sequences on twelve slots never take them all)."""
    assert set(run_all(dsn, app, 3, SEQUENCE, concurrency=12)[1]) == {"completed"}
    rows, per_xact = effects(app)
    assert len(rows) == 12
    assert set(per_xact.values()) == {1}, per_xact


@pytest.mark.usefixtures("always_batch", "never_slow")
def test_steps_whose_instance_is_locked_in_the_batch(app: App, dsn: str) -> None:
    """A first step beside a timer in a JOIN does not know its instance's state: the batch
    locks and reads it (df._checkpoint_begin) after the statements."""
    graph = " ~> ".join([f"({step(0)} & df.sleep(0))", step(1), step(2), step(3)])
    assert set(run_all(dsn, app, 12, graph, concurrency=12)[1]) == {"completed"}
    rows, per_xact = effects(app)
    assert Counter((r[0], r[1]) for r in rows) == {
        (f"w{i}", n): 1 for i in range(12) for n in range(4)
    }
    assert any(per_xact[r[2]] > 1 for r in rows if r[1] == 0), per_xact


@pytest.mark.usefixtures("always_batch", "never_slow")
def test_a_step_failing_in_a_batch_fails_its_instance_alone(
    app: App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The third instance's second step divides by zero: its error rolls back the whole
    batch, whose other steps then run again, alone, and complete; each once."""
    failing = " ~> ".join([step(0), "'SELECT 1 / (''{label}'' <> ''w2'')::int'", step(2)])
    instances, statuses = run_all(dsn, app, 8, failing, concurrency=8)
    assert statuses == ["completed"] * 2 + ["failed"] + ["completed"] * 5
    assert "division by zero" in str(app.failure(instances[2]))
    assert any("division by zero" in why for why in rolled_back(caplog))
    rows, _ = effects(app)
    expected = Counter({(f"w{i}", 0): 1 for i in range(8)})
    expected.update({(f"w{i}", 2): 1 for i in range(8) if i != 2})
    assert Counter((r[0], r[1]) for r in rows) == expected


@pytest.mark.usefixtures("always_batch", "never_slow")
def test_a_cancel_in_a_batch_stops_only_its_instance(
    app: App, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The second step sleeps, so the cancel finds the batch in flight: it rolls back, and
    its other steps run again, alone. (On a loaded machine the cancelled step may have run in
    a batch of its own, which shows nothing of this: then the scenario runs again, up to
    three times, and must have shown it once.)"""
    slow = " ~> ".join([step(0), "'SELECT pg_sleep(0.5)'", step(2)])
    w = started_worker(dsn, app, concurrency=6)
    try:
        for _ in range(3):
            caplog.clear()
            app.conn.execute("DELETE FROM effects")
            instances = start_all(app, 6, slow)
            deadline = time.monotonic() + 20
            while app.conn.execute(
                "SELECT (SELECT count(*) FROM effects) < 6 OR NOT EXISTS (SELECT FROM"
                " pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(0.5)')"
            ).fetchone() != (False,):
                assert time.monotonic() < deadline, "the slow steps never ran"
                time.sleep(0.01)
            app.conn.execute("SELECT df.cancel(%s)", (instances[3],))
            statuses = [app.wait(i) for i in instances]
            assert statuses == ["completed"] * 3 + ["cancelled"] + ["completed"] * 2
            rows, _ = effects(app)
            expected = Counter({(f"w{i}", 0): 1 for i in range(6)})
            expected.update({(f"w{i}", 2): 1 for i in range(6) if i != 3})
            assert Counter((r[0], r[1]) for r in rows) == expected
            if any("canceling statement" in why for why in rolled_back(caplog)):
                break
        else:
            pytest.fail("the cancel never found the cancelled step's batch in flight")
    finally:
        w.stop()


@pytest.mark.usefixtures("always_batch")
def test_a_role_whose_statements_are_slow_runs_them_alone(app: App, dsn: str) -> None:
    """A batch makes each of its steps wait for the others' statements: a role that just
    ran a statement slower than SLOW_STATEMENT_SECONDS runs its steps alone (the first
    batches of 300 ms sleeps tell; nothing of the role batches after them)."""
    slow = " ~> ".join([step(0), "'SELECT pg_sleep(0.3)'", step(2), step(3)])
    assert set(run_all(dsn, app, 8, slow, concurrency=8)[1]) == {"completed"}
    rows, per_xact = effects(app)
    assert len(rows) == 24
    assert max(per_xact.values()) > 1, per_xact  # the starts, in batches
    assert {per_xact[r[2]] for r in rows if r[1] in (2, 3)} == {1}, per_xact
