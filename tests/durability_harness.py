"""Helpers for the durability tests: worker subprocesses, workflows with side effects, checks.

Exactly-once is observed through side effects. Every SQL step of a test workflow inserts one
row into ``public.effects`` keyed by (instance, step). The table has no unique constraint, so
a step that commits twice shows up as a duplicate row instead of an error the engine could
mistake for a step failure.

Each worker subprocess gets its own ``PGTZ``. libpq sends it as the session time zone of every
connection the worker opens, step connections included, and ``DISCARD ALL`` keeps it, so the
``worker`` column of ``effects`` (default ``current_setting('TimeZone')``) tells which worker
process committed each effect, without any test hook in the engine.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

Conn = psycopg.Connection[Any]
T = TypeVar("T")

TERMINAL = ("completed", "failed", "cancelled")
STEP_APPLICATION_NAME = "pg_durable:worker:workflow-sql"
_READY = re.compile(r"worker ([0-9a-f-]{36}) ready")

# Distinct, valid time zones used as per-worker markers (see module docstring).
MARKERS = [f"Etc/GMT-{n}" for n in range(1, 15)] + [f"Etc/GMT+{n}" for n in range(1, 13)]

EFFECTS_DDL = """
CREATE TABLE public.effects (
    instance  text NOT NULL,
    step      integer NOT NULL,
    worker    text NOT NULL DEFAULT current_setting('TimeZone'),
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


# -- waiting ---------------------------------------------------------------------------------


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.05,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# -- worker subprocesses ---------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """``python -m pgdurable worker`` in a subprocess, logging to a file."""

    name: str
    marker: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``pattern`` (a regex) matched ``count`` times in the log."""
        regex = re.compile(pattern)

        def probe() -> list[re.Match[str]] | None:
            found = list(regex.finditer(self.log()))
            if len(found) >= count:
                return found
            if not self.alive():
                raise AssertionError(
                    f"worker {self.name} exited (rc={self.proc.returncode}) before its log "
                    f"showed {pattern!r} x{count}:\n{self.log()}"
                )
            return None

        return wait_for(f"{pattern!r} x{count} in the log of worker {self.name}", probe, timeout)

    def wait_ready(self, timeout: float = 30) -> str:
        """Wait until the worker is connected and registered; returns its worker id."""
        return self.wait_log(_READY.pattern, timeout)[0].group(1)

    @property
    def worker_id(self) -> str | None:
        match = _READY.search(self.log())
        return match.group(1) if match else None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all; its leases are given back once others see its session end."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} still running {timeout:.0f}s later:\n{self.log()}"
            ) from None


class Workers:
    """Starts worker subprocesses and makes sure none outlives the test."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.all: list[WorkerProcess] = []

    def start(
        self,
        dsn: str,
        concurrency: int = 4,
        lease_seconds: float = 2.0,
        extra: Iterable[str] = (),
    ) -> WorkerProcess:
        index = len(self.all)
        name = f"w{index}"
        marker = MARKERS[index % len(MARKERS)]
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ)
        env.pop("PGDURABLE_DSN", None)
        env.update(COLUMNS="240", NO_COLOR="1", TERM="dumb", PGTZ=marker)
        args = [
            sys.executable,
            "-m",
            "pgdurable",
            "worker",
            "--dsn",
            dsn,
            "--concurrency",
            str(concurrency),
            "--lease-seconds",
            str(lease_seconds),
            *extra,
        ]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        worker = WorkerProcess(name, marker, log_path, proc)
        self.all.append(worker)
        return worker

    def close(self) -> None:
        """Kill whatever still runs (stopped ones are continued first) and print every log."""
        for worker in self.all:
            if worker.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGCONT)
                worker.kill()
        for worker in self.all:
            # Shown by pytest only when the test failed.
            print(f"===== worker {worker.name} (PGTZ {worker.marker}, pid {worker.pid}) =====")
            print("\n".join(line.rstrip() for line in _tail(worker.log(), 80).splitlines()))

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(self.all)


def _tail(text: str, lines: int) -> str:
    return "".join(text.splitlines(True)[-lines:])


# -- the application side: a role, its table, its workflows ----------------------------------


def create_app_role(admin: Conn, role: str) -> None:
    """A non-superuser LOGIN role that may use pgdurable and write ``public.effects``."""
    admin.execute(f'CREATE ROLE "{role}" LOGIN')
    admin.execute("SELECT df.grant_usage(%s)", (role,))
    admin.execute(EFFECTS_DDL)
    admin.execute(f'GRANT SELECT, INSERT ON public.effects TO "{role}"')


def drop_app_role(admin: Conn, role: str) -> None:
    admin.execute(f'DROP OWNED BY "{role}" CASCADE')
    admin.execute(f'DROP ROLE "{role}"')


def lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def effect(step: int, sleep: float = 0.0) -> str:
    """A SQL step (as a literal) whose one effect is the row (instance, step).

    With ``sleep``, the statement first sleeps inside the same statement, so that a worker
    killed during the step leaves the statement running in its backend.
    """
    if sleep:
        sql = (
            f"WITH pause AS (SELECT pg_sleep({sleep})) "
            "INSERT INTO public.effects (instance, step) "
            f"SELECT '{{sys_instance_id}}', {step} FROM pause"
        )
    else:
        sql = f"INSERT INTO public.effects (instance, step) VALUES ('{{sys_instance_id}}', {step})"
    return lit(sql)


def seq(*parts: str) -> str:
    return "(" + " ~> ".join(parts) + ")"


def join(*parts: str) -> str:
    return "(" + " & ".join(parts) + ")"


def race(a: str, b: str) -> str:
    return f"({a} | {b})"


def sleep(seconds: int) -> str:
    return f"df.sleep({seconds})"


LOOP_BASE = 100


def loop_with_break(iterations: int) -> tuple[str, set[int]]:
    """A loop whose body inserts effect LOOP_BASE+k in iteration k and breaks after ``iterations``.

    The iteration number comes from counting the effects already committed, so a body step
    that committed twice would both show as a duplicate and end the loop early.
    """
    count = lit(
        "SELECT count(*) AS n FROM public.effects"
        f" WHERE instance = '{{sys_instance_id}}' AND step > {LOOP_BASE}"
    )
    done = lit(f"SELECT $c.n >= {iterations}")
    body_effect = lit(
        "INSERT INTO public.effects (instance, step)"
        f" VALUES ('{{sys_instance_id}}', {LOOP_BASE + 1} + $c.n)"
    )
    body = f"(({count} |=> 'c') ~> (({done} ?> df.break('done')) !> {body_effect}))"
    return f"(@> {body})", {LOOP_BASE + k for k in range(1, iterations + 1)}


def map_of_effects(
    first: int, count: int, parallel: int, sleep: float = 0.0
) -> tuple[str, set[int]]:
    """A df.map over the rows first .. first+count-1 whose body inserts effect <row>, at most
    ``parallel`` at once."""
    source = lit(f"SELECT g AS n FROM generate_series({first}, {first + count - 1}) g")
    pause = f"WITH pause AS (SELECT pg_sleep({sleep})) " if sleep else ""
    body = lit(
        f"{pause}INSERT INTO public.effects (instance, step)"
        f" SELECT '{{sys_instance_id}}', $item.n" + (" FROM pause" if sleep else "")
    )
    graph = f"(({source} |=> 'items') ~> df.map('items', {body}, {parallel}))"
    return graph, set(range(first, first + count))


def continue_with_effects(first: int, sleep: float = 0.0) -> tuple[str, set[int]]:
    """A SQL step that returns the rest of the workflow (df.continue_with): effect ``first``,
    then effects first+1 and first+2 in parallel."""
    rest = seq(effect(first, sleep), join(effect(first + 1, sleep), effect(first + 2, sleep)))
    return lit(f"SELECT df.continue_with({rest})"), {first, first + 1, first + 2}


def full_workflow(
    sleep_seconds: int, loop_iterations: int = 3, step_sleep: float = 0.0
) -> tuple[str, set[int]]:
    """Sequence, JOIN of JOINs, a RACE won by SQL, a loop with df.break, a df.map, a step
    that returns the rest of the workflow, a sleep, a sequence.

    ``step_sleep`` makes the plain steps (not the loop's) take that long inside their statement.
    """
    loop, loop_steps = loop_with_break(loop_iterations)
    mapped, map_steps = map_of_effects(20, 6, 2, step_sleep)
    continued, continued_steps = continue_with_effects(30, step_sleep)

    def step(n: int) -> str:
        return effect(n, step_sleep)

    graph = seq(
        step(1),
        step(2),
        step(3),
        step(4),
        join(step(5), seq(step(6), step(7)), step(8)),
        race(step(9), sleep(600)),
        loop,
        mapped,
        continued,
        sleep(sleep_seconds),
        step(10),
        step(11),
        step(12),
    )
    return graph, set(range(1, 13)) | loop_steps | map_steps | continued_steps


def start(app: Conn, graph: str, label: str | None = None) -> str:
    row = app.execute(f"SELECT df.start({graph}, %s)", (label,)).fetchone()
    assert row is not None
    return str(row[0])


# -- checks ----------------------------------------------------------------------------------


def statuses(admin: Conn, ids: list[str]) -> dict[str, str]:
    rows = admin.execute(
        "SELECT id, status FROM df.instances WHERE id = ANY(%s)", (ids,)
    ).fetchall()
    return {str(i): str(s) for i, s in rows}


def diagnose(admin: Conn, ids: list[str]) -> str:
    """Where the unfinished instances are stuck: their tasks and running nodes."""
    lines = []
    for iid, status, output in admin.execute(
        "SELECT i.id, i.status, r.output FROM df.instances i"
        " LEFT JOIN df._runs r ON r.instance_id = i.id"
        " WHERE i.id = ANY(%s) AND i.status <> 'completed' ORDER BY i.id",
        (ids,),
    ).fetchall():
        lines.append(f"instance {iid}: {status} {output or ''}")
        for task in admin.execute(
            "SELECT id, kind, activation, node_id, visible_at - now() AS due_in, lease_owner,"
            " attempts FROM df._tasks WHERE instance_id = %s ORDER BY id",
            (iid,),
        ).fetchall():
            lines.append(f"    task {task}")
        for node in admin.execute(
            "SELECT id, node_type, status, left(coalesce(query, ''), 60) FROM df.nodes"
            " WHERE instance_id = %s AND status NOT IN ('completed', 'pending')",
            (iid,),
        ).fetchall():
            lines.append(f"    node {node}")
    return "\n".join(lines[:200])


def wait_completed(admin: Conn, ids: list[str], timeout: float, app: Conn | None = None) -> None:
    """Wait until every instance is terminal, then require each to be ``completed``; with
    ``app`` (the submitter's connection), also as ``df.status`` reports it to the submitter."""

    def probe() -> dict[str, str] | None:
        current = statuses(admin, ids)
        return current if all(current.get(i) in TERMINAL for i in ids) else None

    final = wait_for(
        f"{len(ids)} instances to finish",
        probe,
        timeout,
        interval=0.1,
        diagnose=lambda: diagnose(admin, ids),
    )
    not_completed = {i: s for i, s in final.items() if s != "completed"}
    assert not not_completed, f"instances did not complete: {not_completed}\n" + diagnose(
        admin, ids
    )
    if app is not None:
        seen = {i: app.execute("SELECT df.status(%s)", (i,)).fetchone() for i in ids}
        assert all(row == ("completed",) for row in seen.values()), seen


def effect_counts(admin: Conn) -> dict[tuple[str, int], int]:
    rows = admin.execute(
        "SELECT instance, step, count(*) FROM public.effects GROUP BY 1, 2"
    ).fetchall()
    return {(str(i), int(s)): int(c) for i, s, c in rows}


def assert_exactly_once(admin: Conn, expected: dict[str, set[int]]) -> None:
    """Every expected (instance, step) effect exactly once, and nothing else."""
    counts = effect_counts(admin)
    duplicated = {k: c for k, c in counts.items() if c != 1}
    wanted = {(i, s) for i, steps in expected.items() for s in steps}
    missing = sorted(wanted - counts.keys())
    unexpected = sorted(counts.keys() - wanted)
    assert not duplicated, f"steps that took effect more than once: {duplicated}"
    assert not missing, f"steps that never took effect: {missing}"
    assert not unexpected, f"effects nobody asked for: {unexpected}"


def orphaned_tasks(admin: Conn, worker_id: str | None) -> int:
    """Tasks still leased to a (dead) worker."""
    if worker_id is None:
        return 0
    row = admin.execute(
        "SELECT count(*) FROM df._tasks WHERE lease_owner = %s", (worker_id,)
    ).fetchone()
    return int(row[0]) if row else 0


def active_steps(admin: Conn, since: float, pattern: str = "%pg_sleep%") -> list[tuple[int, str]]:
    """(pid, state) of step connections opened after ``since`` (epoch seconds) whose current
    or last statement matches ``pattern``."""
    rows = admin.execute(
        "SELECT pid, state FROM pg_stat_activity"
        " WHERE application_name = %s AND query LIKE %s AND datname = current_database()"
        " AND backend_start >= to_timestamp(%s)",
        (STEP_APPLICATION_NAME, pattern, since),
    ).fetchall()
    return [(int(pid), str(state)) for pid, state in rows]
