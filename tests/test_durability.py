"""Durability: workers killed, PostgreSQL crashed, leases taken over, and still exactly once.

Everything runs against real embedded PostgreSQL 18 with workers as real subprocesses
(``python -m pgdurable worker``), and workflows submitted by a non-superuser LOGIN role.
Each SQL step inserts one row keyed by (instance, step) into a table without a unique
constraint; after the dust settles every instance must be ``completed`` and every step's row
must exist exactly once (see ``durability_harness``).

Random choices (kill points, downtimes) come from a seeded RNG; the seed is printed, and
``PGDURABLE_TEST_SEED=<n>`` replays it.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from durability_harness import (
    STEP_APPLICATION_NAME,
    Conn,
    Workers,
    active_steps,
    assert_exactly_once,
    continue_with_effects,
    create_app_role,
    diagnose,
    drop_app_role,
    effect,
    effect_counts,
    full_workflow,
    join,
    lit,
    loop_with_break,
    map_of_effects,
    orphaned_tasks,
    race,
    seq,
    sleep,
    start,
    statuses,
    wait_completed,
    wait_for,
)
from httpserver import LocalHttpServer

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres, free_port

_counter = itertools.count()


def _rng(test: str) -> random.Random:
    seed = int(os.environ.get("PGDURABLE_TEST_SEED") or random.randrange(2**32))
    print(f"{test}: seed {seed} (replay with PGDURABLE_TEST_SEED={seed})")
    return random.Random(seed)


def _db_now(conn: Conn) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    yield w
    w.close()


@dataclass
class Env:
    """A test database: superuser connection, the app role's connection, the worker DSN."""

    admin: Conn
    app: Conn
    dsn: str
    role: str


@pytest.fixture
def env(
    cluster: EmbeddedPostgres, dbname: str, dsn: str, conn: Conn, workers: Workers
) -> Iterator[Env]:
    role = f"dur_{os.getpid()}_{next(_counter)}"
    create_app_role(conn, role)
    app = psycopg.connect(cluster.dsn(dbname, user=role), autocommit=True)
    try:
        yield Env(conn, app, dsn, role)
    finally:
        app.close()
        workers.close()  # no worker may still log in as the role we drop
        drop_app_role(conn, role)


class PrivateCluster:
    """An embedded PostgreSQL of our own, for tests that stop and start the server."""

    ROLE = "durable_app"
    TEMPLATE = "durable_template"

    def __init__(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="pgdurable-durability-"))
        # fsync off is safe for crashes of PostgreSQL processes (the OS keeps the pages);
        # synchronous_commit stays on: a commit the worker saw must survive the crash.
        self.pg = EmbeddedPostgres(base / "data", free_port(), settings={"fsync": "off"})
        self.pg.start()
        with psycopg.connect(self.pg.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {self.TEMPLATE}")
        with psycopg.connect(self.pg.dsn(self.TEMPLATE), autocommit=True) as admin:
            schema.install(admin)
            create_app_role(admin, self.ROLE)

    def new_database(self) -> str:
        """A fresh database with the schema, the effects table and the app role's grants."""
        self.pg.start()
        name = f"d_{next(_counter)}"
        with psycopg.connect(self.pg.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE}")
        return name

    def admin(self, db: str) -> Conn:
        return psycopg.connect(self.pg.dsn(db), autocommit=True)

    def app(self, db: str) -> Conn:
        return psycopg.connect(self.pg.dsn(db, user=self.ROLE), autocommit=True)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        yield cluster
    finally:
        cluster.pg.stop("immediate")


# -- 1. kill -9 at random points -------------------------------------------------------------


def test_kill9_at_random_points_every_step_exactly_once(env: Env, workers: Workers) -> None:
    """20 workflows (sequences, JOINs, a RACE, a loop with df.break, a sleep) survive a worker
    killed with SIGKILL over and over at random points; each SQL step commits exactly once."""
    rng = _rng("kill9")
    expected: dict[str, set[int]] = {}
    for n in range(20):
        # Steps of 50 ms: a kill lands in the middle of one often enough (plain INSERTs take a
        # millisecond, and a worker holds nothing between them).
        graph, steps = full_workflow(sleep_seconds=rng.choice((1, 2)), step_sleep=0.05)
        expected[start(env.app, graph, f"kill9-{n}")] = steps
    ids = list(expected)

    kills = orphaned = 0
    for _ in range(14):
        worker = workers.start(env.dsn, concurrency=4, lease_seconds=2)
        if rng.random() < 0.8:
            worker.wait_ready()
        # else: the kill may land while it connects, registers or makes its first claim
        time.sleep(rng.uniform(0.05, 0.7))  # the kill point
        worker.kill()
        kills += 1
        orphaned += orphaned_tasks(env.admin, worker.worker_id)
        if all(s == "completed" for s in statuses(env.admin, ids).values()):
            break
    print(f"{kills} kills left {orphaned} leased task(s) behind")

    workers.start(env.dsn, concurrency=4, lease_seconds=2)
    wait_completed(env.admin, ids, timeout=90, app=env.app)
    assert_exactly_once(env.admin, expected)
    # Not a vacuous run: kills did land while the worker held steps.
    assert orphaned > 0, "no kill happened while the worker held a task"
    assert kills >= 5, f"the workflows finished after only {kills} kills"


# -- 2. kills in the middle of long statements -----------------------------------------------


def test_kill9_mid_statement_every_step_exactly_once(env: Env, workers: Workers) -> None:
    """Steps that sleep 0.3 s inside their INSERT statement; the worker is killed while its
    backends are executing them. The orphaned statements finish in PostgreSQL, but their
    transactions never commit, and the steps' effects happen exactly once."""
    rng = _rng("mid-statement")
    expected: dict[str, set[int]] = {}
    for n in range(8):
        graph = seq(
            effect(1, 0.3),
            effect(2, 0.3),
            join(effect(3, 0.3), effect(4, 0.3)),
            effect(5, 0.3),
            effect(6, 0.3),
        )
        expected[start(env.app, graph, f"long-{n}")] = set(range(1, 7))
    ids = list(expected)

    mid_statement = 0
    for _ in range(12):
        since = _db_now(env.admin)
        worker = workers.start(env.dsn, concurrency=4, lease_seconds=2)
        worker.wait_ready()

        def busy_or_done(since: float = since) -> str | None:
            if active_steps(env.admin, since):
                return "busy"
            if all(s == "completed" for s in statuses(env.admin, ids).values()):
                return "done"
            return None

        if (
            wait_for(
                "a step statement of the new worker to be executing",
                busy_or_done,
                timeout=30,
                diagnose=lambda: diagnose(env.admin, ids),
            )
            == "done"
        ):
            worker.kill()
            break
        time.sleep(rng.uniform(0.0, 0.25))
        busy = [p for p, state in active_steps(env.admin, since) if state == "active"]
        worker.kill()
        mid_statement += bool(busy)
    print(f"{mid_statement} kill(s) landed while a step statement was executing")

    workers.start(env.dsn, concurrency=4, lease_seconds=2)
    wait_completed(env.admin, ids, timeout=90, app=env.app)
    assert_exactly_once(env.admin, expected)
    assert mid_statement >= 3, "too few kills landed in the middle of a statement"


# -- 3. PostgreSQL crashes under a running worker --------------------------------------------


def test_postgres_crash_and_restart_same_worker_recovers(
    private_pg: PrivateCluster, workers: Workers
) -> None:
    """``pg_ctl stop -m immediate`` several times mid-workflow, restarting on the same port
    after 1-3 s: the same worker process reconnects by itself, every workflow completes, and
    every step takes effect exactly once."""
    rng = _rng("crash")
    pg = private_pg.pg
    db = private_pg.new_database()
    dsn = pg.dsn(db)

    expected: dict[str, set[int]] = {}
    with private_pg.app(db) as app:
        for n in range(10):
            loop, loop_steps = loop_with_break(2)
            # At least 10 x 8 x 0.3 s / 4 = 6 s of step time: more than three crash cycles let
            # the worker do (each crash comes at most 0.6 s after the first new effect).
            tail = [effect(step, 0.3) for step in range(9, 17)]
            mapped, map_steps = map_of_effects(30, 6, 3, 0.2)
            continued, continued_steps = continue_with_effects(40, 0.2)
            graph = seq(
                effect(1, 0.1),
                join(effect(2, 0.1), effect(3, 0.1), seq(effect(4), sleep(1), effect(5))),
                effect(6, 0.1),
                loop,
                race(effect(7), sleep(600)),
                effect(8, 0.1),
                mapped,
                continued,
                *tail,
            )
            steps = set(range(1, 17)) | loop_steps | map_steps | continued_steps
            expected[start(app, graph, f"crash-{n}")] = steps
    ids = list(expected)

    worker = workers.start(dsn, concurrency=4, lease_seconds=2)
    worker.wait_ready()
    crashes_mid_work = 0
    for crash in range(3):
        with private_pg.admin(db) as admin:
            before = sum(effect_counts(admin).values())

            def progressed(admin: Conn = admin, before: int = before) -> bool:
                return sum(effect_counts(admin).values()) > before

            wait_for(
                "the worker to make progress",
                progressed,
                timeout=60,
                diagnose=lambda admin=admin: diagnose(admin, ids),  # type: ignore[misc]
            )
            time.sleep(rng.uniform(0.05, 0.6))
            pending = [i for i, s in statuses(admin, ids).items() if s != "completed"]
        pg.stop("immediate")
        crashes_mid_work += bool(pending)
        downtime = rng.uniform(1.0, 3.0)
        print(f"crash {crash}: {len(pending)} instance(s) unfinished; down for {downtime:.1f}s")
        time.sleep(downtime)  # the outage itself
        pg.start()
        assert worker.alive(), f"the worker died with the database:\n{worker.log()}"

    with private_pg.admin(db) as admin:
        wait_completed(admin, ids, timeout=120)
        assert_exactly_once(admin, expected)
    assert crashes_mid_work == 3, "a crash happened after all the work was done"
    assert worker.alive(), "the worker process did not survive"
    assert len(list(workers)) == 1
    log = worker.log()
    assert "unreachable" in log or "interrupted" in log, "the worker never noticed the crashes"
    assert "Traceback" not in log and "never retrieved" not in log, "errors while recovering"
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0


# -- 4. several workers on one database ------------------------------------------------------


@pytest.mark.parametrize("n_workers", [2, 3])
def test_several_workers_share_work_and_never_run_a_step_twice(
    env: Env, workers: Workers, n_workers: int
) -> None:
    """50 workflows, 2 or 3 workers competing with FOR UPDATE SKIP LOCKED: every workflow
    completes, no step runs twice, and every worker ran steps (told apart by each worker's
    session time zone, recorded by the effects table)."""
    pool = [workers.start(env.dsn, concurrency=3, lease_seconds=5) for _ in range(n_workers)]
    for worker in pool:
        worker.wait_ready()

    expected: dict[str, set[int]] = {}
    for n in range(50):
        graph = seq(
            effect(1, 0.02),
            join(effect(2, 0.02), effect(3, 0.02), effect(4)),
            race(effect(5), sleep(600)),
            effect(6, 0.02),
        )
        steps = set(range(1, 7))
        if n % 10 == 0:
            loop, loop_steps = loop_with_break(2)
            graph = seq(graph, loop)
            steps |= loop_steps
        expected[start(env.app, graph, f"shared-{n}")] = steps
    ids = list(expected)

    wait_completed(env.admin, ids, timeout=120, app=env.app)
    assert_exactly_once(env.admin, expected)
    per_worker = dict(
        env.admin.execute("SELECT worker, count(*) FROM public.effects GROUP BY 1").fetchall()
    )
    print(f"effects per worker: {per_worker}")
    for worker in pool:
        assert per_worker.get(worker.marker, 0) > 0, f"worker {worker.name} ran no step"
    for worker in pool:
        worker.signal(signal.SIGTERM)
    for worker in pool:
        assert worker.wait_exit(60) == 0


def test_workers_killed_while_others_keep_running(env: Env, workers: Workers) -> None:
    """Three workers share 30 workflows while one of them, chosen at random, is SIGKILLed
    every few hundred ms and replaced: the survivors take over the dead workers' leases,
    every workflow completes, and every step takes effect exactly once."""
    rng = _rng("chaos")
    pool = [workers.start(env.dsn, concurrency=3, lease_seconds=2) for _ in range(3)]
    for worker in pool:
        worker.wait_ready()
    expected: dict[str, set[int]] = {}
    for n in range(30):
        graph, steps = full_workflow(sleep_seconds=1, loop_iterations=2, step_sleep=0.05)
        expected[start(env.app, graph, f"chaos-{n}")] = steps
    ids = list(expected)

    kills = orphaned = 0
    while kills < 10 and not all(s == "completed" for s in statuses(env.admin, ids).values()):
        time.sleep(rng.uniform(0.2, 0.8))  # the kill point
        victim = rng.randrange(len(pool))
        pool[victim].kill()
        orphaned += orphaned_tasks(env.admin, pool[victim].worker_id)
        pool[victim] = workers.start(env.dsn, concurrency=3, lease_seconds=2)
        kills += 1
    print(f"{kills} kills left {orphaned} leased task(s) behind")

    wait_completed(env.admin, ids, timeout=90, app=env.app)
    assert_exactly_once(env.admin, expected)
    assert orphaned > 0, "no kill happened while a worker held a task"
    assert kills >= 5, f"the workflows finished after only {kills} kills"
    for worker in pool:
        worker.wait_ready()  # the last replacement may still be starting, without its handler
        worker.signal(signal.SIGTERM)
    for worker in pool:
        assert worker.wait_exit(60) == 0, worker.log()


def test_step_connections_lost_with_the_server_are_not_handed_out_again(
    private_pg: PrivateCluster, workers: Workers
) -> None:
    """Idle step connections die with the server but look open until used. The first one a
    step draws after a restart is found dead; the others must not be handed out after it:
    three in a row used to fail the step ("the step's connection was lost 3 times")."""
    pg = private_pg.pg
    db = private_pg.new_database()
    worker = workers.start(pg.dsn(db), concurrency=8, lease_seconds=5)
    worker.wait_ready()
    with private_pg.app(db) as app:
        # Eight steps at once leave eight idle connections in the role's pool.
        filling = [start(app, "'SELECT pg_sleep(0.3)'", f"fill-{n}") for n in range(8)]
    with private_pg.admin(db) as admin:
        wait_completed(admin, filling, timeout=60)
    pg.stop("immediate")
    time.sleep(1)
    pg.start()
    with private_pg.app(db) as app:
        after = start(app, "'SELECT 1 AS one'", "after-restart")
    with private_pg.admin(db) as admin:
        wait_completed(admin, [after], timeout=60)
    assert worker.alive(), worker.log()


# -- 5. lease takeover and fencing -----------------------------------------------------------


def _step_backend(admin: Conn, since: float, ids: list[str]) -> int:
    """The pid of the one step backend (started after ``since``) executing a pg_sleep step."""
    found = wait_for(
        "the long step to be executing",
        lambda: [p for p, state in active_steps(admin, since) if state == "active"],
        timeout=30,
        diagnose=lambda: diagnose(admin, ids),
    )
    assert len(found) == 1, found
    return found[0]


def _effects_of(admin: Conn, instance: str) -> list[tuple[str, int]]:
    rows = admin.execute(
        "SELECT worker, step FROM public.effects WHERE instance = %s ORDER BY step", (instance,)
    ).fetchall()
    return [(str(w), int(s)) for w, s in rows]


def _committed_by(admin: Conn, instance: str, step: int) -> list[tuple[str, float]]:
    rows = admin.execute(
        "SELECT worker, extract(epoch FROM at)::float8 FROM public.effects"
        " WHERE instance = %s AND step = %s",
        (instance, step),
    ).fetchall()
    return [(str(w), float(at)) for w, at in rows]


def test_a_killed_workers_step_is_taken_over_at_once(env: Env, workers: Workers) -> None:
    """Worker A is SIGKILLed during a 5 s step. Its backend goes on executing the statement
    (PostgreSQL notices the dead client only when it next talks to it) but can never commit.
    A's listening session ended with it, so worker B takes the step over at once, long before
    A's 60 s lease runs out; the effect happens once, B's."""
    instance = start(env.app, seq(effect(1), effect(2, 5), effect(3)), "takeover")
    since = _db_now(env.admin)
    a = workers.start(env.dsn, concurrency=1, lease_seconds=60)
    a_id = a.wait_ready()
    b = workers.start(env.dsn, concurrency=1, lease_seconds=60)
    b.wait_ready()
    orphan_pid = _step_backend(env.admin, since, [instance])
    a.kill()
    killed_at = _db_now(env.admin)
    assert any(p == orphan_pid for p, _ in active_steps(env.admin, since)), (
        "the killed worker's statement should still be running in its backend"
    )

    wait_completed(env.admin, [instance], timeout=60, app=env.app)
    assert_exactly_once(env.admin, {instance: {1, 2, 3}})
    [(who, at)] = _committed_by(env.admin, instance, 2)
    assert who == b.marker, f"step 2 committed by {who}, expected worker B ({b.marker})"
    # B ran the 5 s step again soon after A died: not after A's lease (60 s) ran out.
    assert at - killed_at < 30, at - killed_at
    # A is gone from the workers' list with its leases.
    gone = env.admin.execute("SELECT 1 FROM df._worker_epoch WHERE epoch_id = %s", (a_id,))
    assert gone.fetchone() is None


def _backend_state(admin: Conn, pid: int) -> str | None:
    row = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return str(row[0]) if row else None


def _lock_waiters(admin: Conn, since: float) -> list[int]:
    """Step backends (opened after ``since``) whose statement waits for a lock."""
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        " AND datname = current_database() AND backend_start >= to_timestamp(%s)"
        " AND wait_event_type = 'Lock'",
        (STEP_APPLICATION_NAME, since),
    ).fetchall()
    return [int(pid) for (pid,) in rows]


def test_stale_worker_is_fenced_off_after_takeover(env: Env, workers: Workers, dsn: str) -> None:
    """Worker A's step is held up (its INSERT waits for a table lock the test holds) and A is
    frozen (SIGSTOP), so its lease expires. Worker B claims the step with a new token and
    runs it too. Once the lock is released both statements execute, but only one transaction
    may commit: A's checkpoint is refused (stale token) and rolled back when A resumes; the
    effect exists once, B's."""
    with psycopg.connect(dsn) as blocker:  # a transaction: holds the lock until commit
        blocker.execute("LOCK TABLE public.effects IN SHARE MODE")
        instance = start(env.app, seq(effect(1), effect(2)), "fencing")
        since = _db_now(env.admin)
        a = workers.start(env.dsn, concurrency=1, lease_seconds=2)
        [a_backend] = wait_for(
            "A's step to wait for the table lock",
            lambda: _lock_waiters(env.admin, since),
            timeout=30,
            diagnose=lambda: diagnose(env.admin, [instance]),
        )
        a.signal(signal.SIGSTOP)
        try:
            b = workers.start(env.dsn, concurrency=1, lease_seconds=2)
            # B can only run the step after claiming it, i.e. after A's lease expired.
            wait_for(
                "B's copy of the step to wait for the lock too",
                lambda: [p for p in _lock_waiters(env.admin, since) if p != a_backend],
                timeout=30,
                diagnose=lambda: diagnose(env.admin, [instance]),
            )
            blocker.commit()
            # A's statement now runs, then its pipelined checkpoint_begin finds a stale token.
            wait_for(
                "A's statement to finish inside its open transaction",
                lambda: _backend_state(env.admin, a_backend) == "idle in transaction",
                timeout=30,
            )
        finally:
            a.signal(signal.SIGCONT)
    a.wait_log(r"was taken away", timeout=30)
    wait_completed(env.admin, [instance], timeout=60, app=env.app)
    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0
    assert_exactly_once(env.admin, {instance: {1, 2}})
    assert [who for who, _ in _committed_by(env.admin, instance, 1)] == [b.marker]


def test_frozen_worker_does_not_block_takeover(env: Env, workers: Workers) -> None:
    """Worker A is frozen (SIGSTOP, like a long GC pause, a suspended VM or a network
    partition) while its 3 s statement runs, and stays frozen. Its lease expires; worker B
    must take the step over and finish the workflow without A ever waking up. Afterwards A
    resumes and stops; the step took effect once, B's."""
    instance = start(env.app, seq(effect(1), effect(2, 3), effect(3)), "frozen")
    since = _db_now(env.admin)
    a = workers.start(env.dsn, concurrency=1, lease_seconds=2)
    a.wait_ready()
    _step_backend(env.admin, since, [instance])
    a.signal(signal.SIGSTOP)
    try:
        b = workers.start(env.dsn, concurrency=1, lease_seconds=2)
        wait_completed(env.admin, [instance], timeout=30, app=env.app)
    finally:
        a.signal(signal.SIGCONT)
    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0
    assert_exactly_once(env.admin, {instance: {1, 2, 3}})
    assert [who for who, _ in _committed_by(env.admin, instance, 2)] == [b.marker]


# -- 6. timers keep their deadline across restarts -------------------------------------------


def test_sleep_deadline_survives_worker_restarts(env: Env, workers: Workers) -> None:
    """``df.sleep(4) ~> insert`` with the worker killed at ~1 s and a new one started at ~2 s:
    the insert happens at or after the 4 s deadline, and soon after it. A ``df.sleep(1)``
    whose deadline passes while no worker runs fires as soon as the next worker is up."""
    a = workers.start(env.dsn, concurrency=2, lease_seconds=2)
    a.wait_ready()
    long_id = start(env.app, seq(sleep(4), effect(1)), "sleep4")
    short_id = start(env.app, seq(sleep(1), effect(1)), "sleep1")
    ids = [long_id, short_id]
    created = {
        str(i): float(t)
        for i, t in env.admin.execute(
            "SELECT id, extract(epoch FROM created_at)::float8 FROM df.instances"
            " WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
    }
    wait_for(
        "both timers to be scheduled",
        lambda: env.admin.execute(
            "SELECT count(*) = 2 FROM df._tasks WHERE kind = 'timer' AND instance_id = ANY(%s)",
            (ids,),
        ).fetchone()[0],  # type: ignore[index]
        timeout=20,
    )
    t0 = min(created.values())
    wait_for("~0.8 s after start", lambda: _db_now(env.admin) >= t0 + 0.8, timeout=10)
    a.kill()
    assert effect_counts(env.admin) == {}, "a timer fired early"
    wait_for("~2 s after start", lambda: _db_now(env.admin) >= t0 + 2.0, timeout=10)
    workers.start(env.dsn, concurrency=2, lease_seconds=2).wait_ready()
    restarted = _db_now(env.admin)
    wait_completed(env.admin, ids, timeout=30, app=env.app)
    assert_exactly_once(env.admin, {long_id: {1}, short_id: {1}})

    [(_, long_at)] = _committed_by(env.admin, long_id, 1)
    [(_, short_at)] = _committed_by(env.admin, short_id, 1)
    assert long_at >= created[long_id] + 4, "df.sleep(4) ended early"
    assert long_at <= created[long_id] + 4 + 3, "df.sleep(4) ended far too late"
    assert short_at >= created[short_id] + 1, "df.sleep(1) ended early"
    assert short_at <= restarted + 3, "an overdue timer did not fire when a worker came back"


def test_signal_waits_survive_kill9(env: Env, workers: Workers) -> None:
    """A signal sent while the only worker is dead (killed during the wait) is received by the
    next worker; a wait whose timeout passes meanwhile times out; each step exactly once."""
    a = workers.start(env.dsn, concurrency=2, lease_seconds=2)
    a.wait_ready()
    got_id = start(env.app, seq("df.wait_for_signal('go', 60)", effect(1)), "signal")
    late_id = start(env.app, seq("df.wait_for_signal('never', 2)", effect(1)), "timeout")
    ids = [got_id, late_id]
    wait_for(
        "both waits to be armed",
        lambda: env.admin.execute(
            "SELECT count(*) = 2 FROM df._tasks WHERE kind = 'signal' AND instance_id = ANY(%s)",
            (ids,),
        ).fetchone()[0],  # type: ignore[index]
        timeout=20,
    )
    a.kill()
    env.app.execute("SELECT df.signal(%s, 'go', '\"while dead\"')", (got_id,))
    time.sleep(2.5)  # the second wait's deadline passes with no worker
    workers.start(env.dsn, concurrency=2, lease_seconds=2).wait_ready()
    wait_completed(env.admin, ids, timeout=30, app=env.app)
    assert_exactly_once(env.admin, {got_id: {1}, late_id: {1}})
    results = dict(
        env.admin.execute(
            "SELECT instance_id, result FROM df.nodes WHERE node_type = 'SIGNAL'"
            " AND instance_id = ANY(%s)",
            (ids,),
        ).fetchall()
    )
    assert results[got_id] == {"signal_name": "go", "timed_out": False, "data": "while dead"}
    assert results[late_id] == {"signal_name": "never", "timed_out": True, "data": None}


# -- 6b. retries and timeouts ------------------------------------------------------------------


def _flaky_until(seconds: float, step: int) -> str:
    """A SQL step that fails (division by zero) until ``seconds`` after its instance was
    created, then inserts the effect (instance, step)."""
    return lit(
        "INSERT INTO public.effects (instance, step) SELECT id, "
        f"{step} FROM df.instances WHERE id = '{{sys_instance_id}}' AND 1 / (CASE WHEN "
        f"clock_timestamp() < created_at + make_interval(secs => {seconds}) THEN 0 ELSE 1 END) = 1"
    )


def _hangs_until(seconds: float) -> str:
    """A SQL step that sleeps a minute until ``seconds`` after its instance was created."""
    return lit(
        "SELECT pg_sleep(CASE WHEN clock_timestamp() < created_at + make_interval(secs => "
        f"{seconds}) THEN 60 ELSE 0 END) FROM df.instances WHERE id = '{{sys_instance_id}}'"
    )


def _retry_workflows(app: Conn, n: int) -> dict[str, set[int]]:
    """Instances whose first step is retried until ~3 s in, and instances whose first step
    hangs and is timed out (and retried) until ~3 s in; each then takes one more effect."""
    expected: dict[str, set[int]] = {}
    for k in range(n):
        retried = seq(f"df.retry({_flaky_until(3, 1)}, 30, 0.5, 0.5)", effect(2))
        timed_out = seq(
            f"df.retry(df.timeout({_hangs_until(3)}, 1), 30, 0.2, 0.2, ARRAY['timeout'])",
            effect(1),
        )
        expected[start(app, retried, f"retry-{k}")] = {1, 2}
        expected[start(app, timed_out, f"timeout-{k}")] = {1}
    return expected


def _histories(admin: Conn, ids: list[str]) -> dict[str, list[str]]:
    return {
        i: (e or "").splitlines()
        for i, e in admin.execute(
            "SELECT instance_id, error FROM df.nodes WHERE node_type = 'RETRY'"
            " AND instance_id = ANY(%s)",
            (ids,),
        ).fetchall()
    }


def test_retries_and_timeouts_survive_kill9(env: Env, workers: Workers) -> None:
    """Workers killed during backoffs, timed-out statements and timeout timers: every
    instance still completes, each effect exactly once, and each retry keeps its history."""
    a = workers.start(env.dsn, concurrency=4, lease_seconds=2)
    a.wait_ready()
    expected = _retry_workflows(env.app, 4)
    ids = list(expected)
    time.sleep(1.2)  # mid-backoff and mid-timeout
    a.kill()
    b = workers.start(env.dsn, concurrency=4, lease_seconds=2)
    b.wait_ready()
    time.sleep(0.8)
    b.kill()
    time.sleep(0.5)
    workers.start(env.dsn, concurrency=4, lease_seconds=2).wait_ready()
    wait_completed(env.admin, ids, timeout=60, app=env.app)
    assert_exactly_once(env.admin, expected)
    for instance, history in _histories(env.admin, ids).items():
        assert history, f"{instance}: no failed attempt recorded"
        assert all(line.startswith("attempt ") for line in history), history


def test_retries_and_timeouts_survive_postgres_restarts(
    private_pg: PrivateCluster, workers: Workers
) -> None:
    """PostgreSQL stopped with ``-m immediate`` twice while instances back off and time out:
    the same worker carries on and every effect happens exactly once."""
    pg = private_pg.pg
    db = private_pg.new_database()
    with private_pg.app(db) as app:
        expected = _retry_workflows(app, 4)
    ids = list(expected)
    worker = workers.start(pg.dsn(db), concurrency=4, lease_seconds=2)
    worker.wait_ready()
    for pause in (1.0, 1.0):
        time.sleep(pause)
        pg.stop("immediate")
        time.sleep(1.0)
        pg.start()
    with private_pg.admin(db) as admin:
        wait_completed(admin, ids, timeout=60)
        assert_exactly_once(admin, expected)
        assert all(_histories(admin, ids).values())
    assert worker.alive()
    assert "Traceback" not in worker.log()


def test_http_step_is_resent_with_the_same_key_after_kill9(env: Env, workers: Workers) -> None:
    """A worker killed while its request is in flight: the next worker sends it again, with
    the same Idempotency-Key (at least once), and the step after it runs exactly once."""
    env.admin.execute("SELECT df.grant_usage(%s, true)", (env.role,))
    allow = ["--http-allow-network", "127.0.0.1/32"]
    with LocalHttpServer() as server:
        server.reply("/slow", body="done", delay=2.0)
        a = workers.start(env.dsn, extra=allow)
        a.wait_ready()
        instance = start(env.app, seq(f"df.http('{server.url('/slow')}', 'POST')", effect(1)))
        wait_for("the request to arrive", lambda: len(server.hits("/slow")) == 1, timeout=20)
        a.kill()
        workers.start(env.dsn, extra=allow).wait_ready()
        wait_completed(env.admin, [instance], timeout=30, app=env.app)
        assert_exactly_once(env.admin, {instance: {1}})
        first, again = server.hits("/slow")
        assert first.header("Idempotency-Key") == again.header("Idempotency-Key") is not None


# -- 7. start-up problems and clean shutdown -------------------------------------------------


def test_worker_waits_for_an_unreachable_server(
    private_pg: PrivateCluster, workers: Workers
) -> None:
    """A worker started while nothing listens on the port keeps retrying, says so, and starts
    working as soon as PostgreSQL is up."""
    pg = private_pg.pg
    db = private_pg.new_database()
    pg.stop("fast")
    try:
        worker = workers.start(pg.dsn(db), concurrency=2, lease_seconds=5)
        worker.wait_log(r"database unreachable", timeout=30, count=2)
        assert worker.alive()
    finally:
        pg.start()
    worker.wait_ready(timeout=60)
    with private_pg.app(db) as app:
        instance = start(app, seq(effect(1), effect(2)), "late-server")
    with private_pg.admin(db) as admin:
        wait_completed(admin, [instance], timeout=30)
        assert_exactly_once(admin, {instance: {1, 2}})
    worker.signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0


def test_sigterm_during_a_long_step_exits_cleanly(env: Env, workers: Workers) -> None:
    """SIGTERM while a 2 s step runs: the worker finishes (or releases) it and exits 0; the
    next worker completes the workflow, every step exactly once."""
    instance = start(env.app, seq(effect(1, 2), effect(2), effect(3, 0.2)), "sigterm")
    since = _db_now(env.admin)
    a = workers.start(env.dsn, concurrency=2, lease_seconds=30)
    a.wait_ready()
    _step_backend(env.admin, since, [instance])
    a.signal(signal.SIGTERM)
    assert a.wait_exit(60) == 0, a.log()
    log = a.log()
    assert "in-flight task" in log
    # A clean stop: no step of this workflow ran into a refused checkpoint, nothing was left
    # half-done in the event loop.
    assert " ERROR " not in log and "never retrieved" not in log and "destroyed" not in log, log
    # The step in flight finished within the grace period; stopping means no new step (the
    # next one is neither run by the stopping worker nor started only to be rolled back).
    assert "taken away" not in log, log
    by_a = [s for i, s in _effects_of(env.admin, instance) if i == a.marker]
    assert by_a == [1], f"steps committed by the stopping worker: {by_a}"
    # Nothing is left leased to the stopped worker: finished, or handed back.
    left: Any = env.admin.execute(
        "SELECT count(*) FROM df._tasks WHERE instance_id = %s AND lease_owner IS NOT NULL",
        (instance,),
    ).fetchone()
    assert left[0] == 0, diagnose(env.admin, [instance])
    workers.start(env.dsn, concurrency=2, lease_seconds=30)
    wait_completed(env.admin, [instance], timeout=30, app=env.app)
    assert_exactly_once(env.admin, {instance: {1, 2, 3}})


def test_worker_refuses_a_database_without_the_schema(
    cluster: EmbeddedPostgres, workers: Workers
) -> None:
    """No pgdurable schema: the worker exits non-zero and tells the operator what to run."""
    name = f"noschema_{os.getpid()}_{next(_counter)}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        worker = workers.start(cluster.dsn(name))
        rc = worker.wait_exit(30)
        log = worker.log()
        assert rc != 0, log
        assert "schema is not installed" in log and "pgdurable install" in log, log
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
