"""Chaos at scale: thousands of mixed workflows while workers are SIGKILLed and PostgreSQL
crashes, then a check that every workflow completed and every SQL step took effect exactly once.

Run ``.venv/bin/python bench/chaos.py [--workflows 10000] [--kills N] [--restarts 2]
[--out FILE] [--seed S]``. It starts its own embedded PostgreSQL 18 (fsync and
synchronous_commit on), installs the schema, an ordinary role granted ``df.grant_usage`` that
submits everything, and an ``effects`` table, then:

- submits the workflows from a background thread, keeping at most ``--in-flight`` unfinished;
  each is a random sequence of blocks: plain sequences, JOINs (``&``, with blocks nested in their
  branches), RACEs (``|``) won by a step or by a signal against a long sleep, loops ended by
  ``df.break``, ``df.retry`` of a step that fails its first one or two attempts, waits for a
  signal that the driver sends once the wait is running (``df.signal``), and ``df.sleep`` of
  one or two seconds;
- runs ``--workers`` worker processes (``python -m pgdurable worker``); every
  ``--kill-interval`` seconds (± 50 %) one of them, picked at random, is killed with SIGKILL and
  a replacement started, ``--kills`` times (default: until the workflows are done);
- stops PostgreSQL in immediate mode (a crash) and starts it again ``--restarts`` times, spread
  over the run by progress; the workers must reconnect by themselves (one that exits on its own
  is a violation).

Exactly-once is observed through side effects, as in tests/durability_harness.py: every SQL
step that should take effect inserts one row (instance, step number) into ``effects``, a table
without a unique constraint, so a step that commits twice shows up as a duplicate row rather
than as an error the engine could mistake for a failed step. The driver records each instance's
expected set of step numbers; at the end every instance must be ``completed`` and its rows must
be exactly that set, each once. The loop and retry steps also decide from committed rows (the
effects so far, the retry's recorded failures), so a step that commits twice or a failure that
is lost would change the path the workflow takes as well.

Prints a summary and writes JSON (``--out``, default bench/results/chaos.json). Exit code 0 only
if there are no violations; 1 with violations, 2 when the driver itself failed, 130 on Ctrl-C.
Everything it starts is stopped when it ends, and its temporary directory is deleted (unless
``--keep``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psycopg

import pgdurable
from pgdurable import __version__

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SERVER_SETTINGS, git_describe
from run import Server as BenchServer

REPO = Path(__file__).resolve().parent.parent
DATABASE = "chaos"
ROLE = "chaos_app"
LABEL_PREFIX = "chaos-"
TERMINAL = ("completed", "failed", "cancelled")
SUBMIT_CHUNK = 50  # df.start calls per transaction
POLL_SECONDS = 0.25  # how often the driver looks at progress and waiting signals
RESTART_GAP_SECONDS = 3.0  # at least this long between a restart and the next
LOOP_SPAN = 1000  # a loop's effects are numbered base+1 .. base+LOOP_SPAN-1
DIAGNOSE_LIMIT = 10  # instances whose engine rows go into the report

# Each worker process gets its own PGTZ: libpq sends it as the session time zone of every
# connection the worker opens, so the ``worker`` column of ``effects`` tells which process
# committed a row (a duplicate shows whether one worker or two committed it).
MARKERS = [f"Etc/GMT-{n}" for n in range(1, 15)] + [f"Etc/GMT+{n}" for n in range(1, 13)]

EFFECTS_DDL = """
CREATE TABLE public.effects (
    instance  text NOT NULL,
    step      integer NOT NULL,
    worker    text NOT NULL DEFAULT current_setting('TimeZone'),
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
# Not unique on purpose (see the module docstring); loops count their rows through it.
EFFECTS_INDEX = "CREATE INDEX effects_instance_step_idx ON public.effects (instance, step)"

T = TypeVar("T")
Conn = psycopg.Connection[Any]


class ChaosError(RuntimeError):
    """The driver cannot go on (the server does not come back, a thread failed)."""


# -- workflows -------------------------------------------------------------------------------


def lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def seq(*parts: str) -> str:
    return parts[0] if len(parts) == 1 else "(" + " ~> ".join(parts) + ")"


def join(*parts: str) -> str:
    return "(" + " & ".join(parts) + ")"


def race(a: str, b: str) -> str:
    return f"({a} | {b})"


def effect(step: int, sleep: float = 0.0) -> str:
    """A SQL step (as a literal) whose one effect is the row (instance, step).

    With ``sleep`` the statement first sleeps, so that kills land inside statements too.
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


def failing_effect(step: int, fails: int) -> str:
    """A SQL step that fails its first ``fails`` attempts, then inserts (instance, step).

    A failed attempt rolls back whatever it wrote, so it cannot count itself. What does
    survive is the failure the RETRY node records when the attempt is checkpointed as failed
    (one ``attempt <n>: <error>`` line in ``df.nodes.error``), and the error carries a tag
    naming this step: the statement fails until it finds ``fails`` such lines. The CASE keeps
    the failing cast from being folded into the plan: it depends on the count.
    """
    tag = f"chaos-fail-{step}-attempt-"
    sql = (
        "INSERT INTO public.effects (instance, step) "
        f"SELECT '{{sys_instance_id}}', {step} FROM ("
        f"SELECT coalesce(sum(regexp_count(n.error, '{tag}[0-9]')), 0) AS failed "
        "FROM df.nodes n WHERE n.instance_id = '{sys_instance_id}' AND n.node_type = 'RETRY'"
        f") a WHERE CASE WHEN a.failed >= {fails} THEN true "
        f"ELSE ('{tag}' || (a.failed + 1))::int > 0 END"
    )
    return lit(sql)


def loop_with_break(base: int, iterations: int) -> tuple[str, set[int]]:
    """A loop whose body inserts effect base+k in iteration k and breaks after ``iterations``.

    The iteration number comes from counting the loop's effects already committed, so a body
    step that committed twice would both show as a duplicate and end the loop early.
    """
    count = lit(
        "SELECT count(*) AS n FROM public.effects WHERE instance = '{sys_instance_id}'"
        f" AND step > {base} AND step < {base + LOOP_SPAN}"
    )
    done = lit(f"SELECT $c.n >= {iterations}")
    body_effect = lit(
        "INSERT INTO public.effects (instance, step)"
        f" VALUES ('{{sys_instance_id}}', {base + 1} + $c.n)"
    )
    body = f"(({count} |=> 'c') ~> (({done} ?> df.break('done')) !> {body_effect}))"
    return f"(@> {body})", {base + k for k in range(1, iterations + 1)}


@dataclass(frozen=True)
class Workflow:
    """One workflow to submit: its label (the key the checks use), the DSL expression, the step
    numbers whose effects must each appear exactly once, and what it is made of."""

    label: str
    expr: str
    steps: frozenset[int]
    blocks: tuple[str, ...]
    signals: int  # signal waits: how many df.signal calls it needs
    held: bool  # its signals are sent only after the last planned kill and restart


BLOCK_WEIGHTS = {
    "sequence": 3,
    "join": 2,
    "race": 1,
    "loop": 1,
    "retry": 1,
    "signal": 1,
    "sleep": 1,
}


class WorkflowBuilder:
    """Random workflows of the shapes above, from a seeded RNG."""

    def __init__(self, rng: random.Random, step_sleep_fraction: float = 0.1):
        self.rng = rng
        self.step_sleep_fraction = step_sleep_fraction
        self._next = 1
        self._steps: set[int] = set()
        self._loops = 0
        self._signals = 0
        self._blocks: list[str] = []

    def build(self, label: str, force_signal: bool = False, held: bool = False) -> Workflow:
        self._next, self._steps, self._loops, self._signals = 1, set(), 0, 0
        self._blocks = []
        kinds = self._kinds(self.rng.randint(2, 4))
        if force_signal and "signal" not in kinds:
            kinds.append("signal")
        expr = seq(*(self._block(kind, nested=False) for kind in kinds))
        return Workflow(
            label, expr, frozenset(self._steps), tuple(self._blocks), self._signals, held
        )

    def _kinds(self, n: int, exclude: tuple[str, ...] = ()) -> list[str]:
        names = [k for k in BLOCK_WEIGHTS if k not in exclude]
        return self.rng.choices(names, [BLOCK_WEIGHTS[k] for k in names], k=n)

    def _effect(self) -> str:
        step = self._next
        self._next += 1
        self._steps.add(step)
        sleep = 0.02 if self.rng.random() < self.step_sleep_fraction else 0.0
        return effect(step, sleep)

    def _signal(self) -> str:
        self._signals += 1
        return f"df.wait_for_signal('s{self._signals}')"

    def _block(self, kind: str, nested: bool) -> str:
        self._blocks.append(kind)
        rng = self.rng
        if kind == "sequence":
            return seq(*(self._effect() for _ in range(rng.randint(2, 4))))
        if kind == "join":
            if nested:
                return join(self._effect(), self._effect())
            # Branches are blocks themselves: loops, retries, signal waits and sleeps in JOIN
            # branches, one level deep.
            branches = self._kinds(rng.randint(2, 3), exclude=("join",))
            return join(*(self._block(k, nested=True) for k in branches))
        if kind == "race":
            variant = rng.randrange(3)
            if variant == 0:
                winner = self._effect()
            elif variant == 1:
                winner = seq(self._effect(), self._effect())
            else:
                winner = self._signal()
            return race(winner, "df.sleep(600)")
        if kind == "loop":
            self._loops += 1
            loop, steps = loop_with_break(LOOP_SPAN * self._loops, rng.randint(1, 3))
            self._steps |= steps
            return loop
        if kind == "retry":
            fails = rng.randint(1, 2)
            step = self._next
            self._next += 1
            self._steps.add(step)
            # Exactly fails + 1 attempts: a failure the engine counted twice, or a lost
            # connection it took for a failure, runs out of attempts and fails the workflow.
            return f"df.retry({failing_effect(step, fails)}, {fails + 1}, 0.5, 1)"
        if kind == "signal":
            return seq(self._effect(), self._signal(), self._effect())
        if kind == "sleep":
            return seq(self._effect(), f"df.sleep({rng.randint(1, 2)})", self._effect())
        raise ValueError(kind)


def build_workflows(rng: random.Random, count: int) -> list[Workflow]:
    """``count`` workflows; the first few (1 %, at least 3) are held back by their signals, so
    that every planned kill and restart happens while workflows are still unfinished."""
    builder = WorkflowBuilder(rng)
    held = min(count, max(3, count // 100))
    width = len(str(count))
    return [
        builder.build(f"{LABEL_PREFIX}{n:0{width}d}", force_signal=n < held, held=n < held)
        for n in range(count)
    ]


# -- the checks ------------------------------------------------------------------------------


@dataclass
class Violations:
    """Everything that contradicts "every workflow completed, every step exactly once"."""

    not_completed: dict[str, str] = field(default_factory=dict)  # label -> status
    missing_instances: list[str] = field(default_factory=list)  # labels never started
    extra_instances: dict[str, int] = field(default_factory=dict)  # label -> instances
    duplicates: dict[str, dict[int, int]] = field(default_factory=dict)  # label -> step -> n
    missing: dict[str, list[int]] = field(default_factory=dict)  # label -> steps
    unexpected: dict[str, list[int]] = field(default_factory=dict)  # label or id -> steps
    worker_crashes: list[str] = field(default_factory=list)  # workers that exited by themselves

    @property
    def count(self) -> int:
        return (
            len(self.not_completed)
            + len(self.missing_instances)
            + len(self.extra_instances)
            + sum(len(v) for v in self.duplicates.values())
            + sum(len(v) for v in self.missing.values())
            + sum(len(v) for v in self.unexpected.values())
            + len(self.worker_crashes)
        )

    def labels(self) -> list[str]:
        """The instances (labels) concerned, for diagnosis."""
        found = [*self.not_completed, *self.duplicates, *self.missing, *self.unexpected]
        return list(dict.fromkeys(found))

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "not_completed": self.not_completed,
            "missing_instances": self.missing_instances,
            "extra_instances": self.extra_instances,
            "duplicates": {
                k: {str(s): n for s, n in v.items()} for k, v in self.duplicates.items()
            },
            "missing": self.missing,
            "unexpected": self.unexpected,
            "worker_crashes": self.worker_crashes,
        }


def find_violations(
    expected: Mapping[str, frozenset[int]],
    instances: Iterable[tuple[str, str, str]],
    effects: Mapping[tuple[str, int], int],
    worker_crashes: Iterable[str] = (),
) -> Violations:
    """Compare what happened with what was asked for.

    ``expected``: label -> the step numbers whose effect must appear exactly once;
    ``instances``: (label, instance id, status) of every instance in the database;
    ``effects``: (instance id, step) -> how many rows ``effects`` holds for it.
    """
    v = Violations(worker_crashes=list(worker_crashes))
    ids: dict[str, list[str]] = {}
    label_of: dict[str, str] = {}
    for label, iid, status in instances:
        ids.setdefault(label, []).append(iid)
        label_of[iid] = label
        if status != "completed" and label in expected:
            v.not_completed[label] = status
    for label, found in ids.items():
        if len(found) > 1 or label not in expected:
            v.extra_instances[label] = len(found)
    v.missing_instances = sorted(label for label in expected if label not in ids)

    by_instance: dict[str, dict[int, int]] = {}
    for (iid, step), n in effects.items():
        by_instance.setdefault(iid, {})[step] = n
    for iid, counts in by_instance.items():
        owner = label_of.get(iid)
        if owner is None or owner not in expected:
            v.unexpected[owner or iid] = sorted(counts)
            continue
        label = owner
        twice = {step: n for step, n in counts.items() if n > 1}
        if twice:
            v.duplicates[label] = twice
        extra = sorted(set(counts) - expected[label])
        if extra:
            v.unexpected[label] = extra
    for label, steps in expected.items():
        if label not in ids or len(ids[label]) != 1:
            continue  # reported above
        have = by_instance.get(ids[label][0], {})
        lost = sorted(steps - have.keys())
        if lost:
            v.missing[label] = lost
    return v


# -- the server ------------------------------------------------------------------------------


class Server(BenchServer):
    """bench/run.py's server with this run's database, role and effects table."""

    database = DATABASE
    role = ROLE

    def create_tables(self, conn: Conn) -> None:
        conn.execute(EFFECTS_DDL)
        conn.execute(EFFECTS_INDEX)
        conn.execute(f"GRANT SELECT, INSERT ON public.effects TO {ROLE}")

    def crash_and_restart(self, downtime: float) -> None:
        """``pg_ctl stop -m immediate`` (every backend killed, no shutdown checkpoint), a pause,
        and a start on the same port, which runs crash recovery."""
        self.pg.stop("immediate")
        time.sleep(downtime)
        self.pg.start()

    def version(self) -> str:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT version()").fetchone()
        return str(row[0]) if row else "?"


_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class Db:
    """One connection that reconnects across server restarts (for idempotent reads and sends;
    a caller whose statement is not idempotent passes ``retry=False`` and sorts it out)."""

    def __init__(self, dsn: str, stop: threading.Event, patience: float = 180.0):
        self.dsn = dsn
        self.stop = stop
        self.patience = patience
        self.conn: Conn | None = None
        self.reconnects = 0

    def run(self, fn: Callable[[Conn], T], retry: bool = True) -> T:
        deadline = time.monotonic() + self.patience
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                return fn(self.conn)
            except _CONNECTION_ERRORS:
                self.close()
                self.reconnects += 1
                if not retry or self.stop.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.run(lambda c: c.execute(query, params).fetchall())

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None


# -- workers ---------------------------------------------------------------------------------

_READY = re.compile(r"worker ([0-9a-f-]{36}) ready")


@dataclass
class WorkerProc:
    """One ``python -m pgdurable worker`` process, logging to a file."""

    name: str
    marker: str
    log: Path
    proc: subprocess.Popen[bytes]
    killed: bool = False  # by us, with SIGKILL
    crash_reported: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def worker_id(self) -> str | None:
        with contextlib.suppress(OSError):
            match = _READY.search(self.log.read_text(errors="replace"))
            if match:
                return match.group(1)
        return None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"({self.log}: no log)"
        return "\n".join(text)


class WorkerPool:
    """``size`` live workers; killed or crashed ones are replaced by new processes."""

    def __init__(
        self, dsn: str, base: Path, size: int, concurrency: int, lease_seconds: float
    ) -> None:
        self.dsn = dsn
        self.base = base
        self.size = size
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.slots: list[WorkerProc] = []
        self.all: list[WorkerProc] = []

    def start(self) -> None:
        self.slots = [self.spawn() for _ in range(self.size)]

    def spawn(self) -> WorkerProc:
        index = len(self.all)
        marker = MARKERS[index % len(MARKERS)]
        log = self.base / f"worker-{index}.log"
        env = {k: v for k, v in os.environ.items() if k != "PGDURABLE_DSN"}
        env.update(PYTHONUNBUFFERED="1", COLUMNS="240", NO_COLOR="1", TERM="dumb", PGTZ=marker)
        command = [
            sys.executable,
            "-m",
            "pgdurable",
            "worker",
            "--dsn",
            self.dsn,
            "--concurrency",
            str(self.concurrency),
            "--lease-seconds",
            str(self.lease_seconds),
            # No retention passes: a purge could remove finished instances before the checks
            # (the default keeps only the newest 10,000).
            "--reconcile-interval",
            "0",
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            )
        worker = WorkerProc(f"w{index}", marker, log, proc)
        self.all.append(worker)
        return worker

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.worker_id() for w in self.slots):
            for w in self.slots:
                if not w.alive():
                    raise ChaosError(f"worker {w.name} exited at start:\n{w.tail()}")
            if time.monotonic() > deadline:
                raise ChaosError("workers did not become ready within 60 s")
            time.sleep(0.05)

    def kill(self, slot: int) -> tuple[WorkerProc, WorkerProc]:
        """SIGKILL the worker in ``slot`` and start its replacement; (victim, replacement)."""
        victim = self.slots[slot]
        victim.killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait(timeout=30)
        self.slots[slot] = self.spawn()
        return victim, self.slots[slot]

    def reap_crashed(self) -> list[WorkerProc]:
        """Workers that exited without being killed by us; each is replaced."""
        crashed = []
        for i, w in enumerate(self.slots):
            if not w.alive() and not w.killed:
                w.crash_reported = True
                crashed.append(w)
                self.slots[i] = self.spawn()
        return crashed

    def stop(self, timeout: float = 40) -> dict[str, int | None]:
        """SIGTERM the live workers, then wait (SIGKILL after ``timeout``); their exit codes."""
        for w in self.slots:
            if w.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for w in self.slots:
            try:
                codes[w.name] = w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                codes[w.name] = None
        return codes

    def kill_all(self) -> None:
        for w in self.all:
            if w.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=10)

    def log_problems(self, limit: int = 30) -> tuple[int, dict[str, int], list[str]]:
        """What the worker logs complain about: (tracebacks, ERROR/CRITICAL/WARNING lines
        grouped by their text with numbers and ids masked, the first ``limit`` ERROR lines)."""
        tracebacks = 0
        kinds: Counter[str] = Counter()
        lines: list[str] = []
        for w in self.all:
            with contextlib.suppress(OSError):
                for line in w.log.read_text(errors="replace").splitlines():
                    tracebacks += "Traceback" in line
                    level = re.search(r" (ERROR|CRITICAL|WARNING) (.*)", line)
                    if level is None:
                        continue
                    kinds[f"{level.group(1)} {_mask(level.group(2))[:160]}"] += 1
                    if level.group(1) != "WARNING" and len(lines) < limit:
                        lines.append(f"{w.name}: {line.strip()[:300]}")
        return tracebacks, dict(kinds.most_common(20)), lines


def _mask(text: str) -> str:
    """A log line or error with its ids and numbers replaced, so that alike ones group."""
    text = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<uuid>", text)
    text = re.sub(r"\b[0-9a-f]{8}\b", "<id>", text)
    text = re.sub(r"pgdurable_[0-9a-f]{16}", "pgdurable_<hash>", text)
    return re.sub(r"\d+(\.\d+)?", "<n>", text)


# -- the driver's threads --------------------------------------------------------------------


class Progress:
    """Counts shared between the threads (the monitor writes them, the submitter reads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = 0
        self.terminal = 0


class Submitter(threading.Thread):
    """Submits the workflows in chunks, keeping at most ``in_flight`` unfinished.

    A chunk is one transaction; when the server goes away under it, whether it committed is
    unknown, so after reconnecting the submitter looks up which labels exist and submits only
    the missing ones (labels are unique, so nothing is started twice).
    """

    def __init__(
        self,
        dsn: str,
        workflows: list[Workflow],
        progress: Progress,
        in_flight: int,
        stop: threading.Event,
    ):
        super().__init__(name="submitter", daemon=True)
        self.db = Db(dsn, stop)
        self.workflows = workflows
        self.progress = progress
        self.in_flight = in_flight
        self.stop = stop
        self.ambiguous = 0  # chunks whose commit the server's crash made uncertain
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for i in range(0, len(self.workflows), SUBMIT_CHUNK):
                chunk = self.workflows[i : i + SUBMIT_CHUNK]
                while not self.stop.is_set():
                    with self.progress.lock:
                        room = self.in_flight - (self.progress.submitted - self.progress.terminal)
                    if room >= len(chunk):
                        break
                    time.sleep(0.05)
                if self.stop.is_set():
                    return
                self._submit(chunk)
                with self.progress.lock:
                    self.progress.submitted += len(chunk)
            self.done.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.db.close()

    def _submit(self, chunk: list[Workflow]) -> None:
        todo = chunk
        while todo:
            query = "SELECT df.start(g, l) FROM (VALUES {}) AS v(g, l)".format(
                ", ".join(f"({w.expr}, {lit(w.label)})" for w in todo)
            )

            def start(c: Conn, q: str = query) -> None:
                c.execute(q)

            try:
                self.db.run(start, retry=False)
                return
            except _CONNECTION_ERRORS:
                self.ambiguous += 1
                if self.stop.is_set():
                    return
                labels = [w.label for w in todo]
                have = {
                    str(r[0])
                    for r in self.db.rows(
                        "SELECT label FROM df.instances WHERE label = ANY(%s)", (labels,)
                    )
                }
                todo = [w for w in todo if w.label not in have]


class Signaller(threading.Thread):
    """Sends each running signal wait its signal, as the submitting role.

    The waits come from the engine's tasks (kind ``signal``); a wait already holding an
    unconsumed signal of its name is skipped, so a send whose commit the crash made uncertain
    is sent again only if it did not arrive. Held instances get theirs only after ``release``.
    """

    WAITING = """
        SELECT t.instance_id, n.query::jsonb ->> 'signal_name', i.label
          FROM df._tasks t
          JOIN df.nodes n ON n.instance_id = t.instance_id AND n.id = t.node_id
          JOIN df.instances i ON i.id = t.instance_id
         WHERE t.kind = 'signal' AND i.status IN ('pending', 'running')
           AND NOT EXISTS (
               SELECT 1 FROM df._signals s
                WHERE s.instance_id = t.instance_id
                  AND s.name = n.query::jsonb ->> 'signal_name' AND s.consumed_at IS NULL)
    """

    def __init__(
        self, admin_dsn: str, user_dsn: str, held: set[str], stop: threading.Event
    ) -> None:
        super().__init__(name="signaller", daemon=True)
        self.admin = Db(admin_dsn, stop)
        self.user = Db(user_dsn, stop)
        self.held = held
        self.released = threading.Event()
        self.stop = stop
        self.sent = 0
        self.refused: list[str] = []  # df.signal errors other than lost connections
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(POLL_SECONDS):
                self._round()
        except _CONNECTION_ERRORS:
            if not self.stop.is_set():
                self.error = ChaosError("the signaller lost the server for good")
        except BaseException as exc:
            self.error = exc
        finally:
            self.admin.close()
            self.user.close()

    def _round(self) -> None:
        released = self.released.is_set()
        for iid, name, label in self.admin.rows(self.WAITING):
            if self.stop.is_set():
                return
            if not released and label in self.held:
                continue

            def send(c: Conn, i: str = iid, n: str = name) -> None:
                c.execute("SELECT df.signal(%s, %s, %s)", (i, n, '{"from": "chaos"}'))

            try:
                self.user.run(send)
                self.sent += 1
            except psycopg.Error as exc:
                if isinstance(exc, _CONNECTION_ERRORS):
                    raise
                if len(self.refused) < 20:
                    self.refused.append(f"{iid} {name}: {str(exc).strip()}")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Options:
    workflows: int
    kills: int | None
    restarts: int
    kill_interval: float
    workers: int
    concurrency: int
    lease_seconds: float
    in_flight: int
    stall_seconds: float
    timeout: float
    seed: int


@dataclass
class Outcome:
    """What the run did, for the summary and the JSON."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    crashed: list[WorkerProc] = field(default_factory=list)
    finished: bool = False  # every workflow reached a terminal status
    stalled_after: float | None = None
    elapsed: float = 0.0
    run_seconds: float = 0.0  # first submission to the last workflow's end


PROGRESS_SQL = """
    SELECT count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')),
           count(*) FILTER (WHERE status = 'completed'),
           count(*),
           (SELECT coalesce(sum(checkpoints), 0) FROM df._runs)
      FROM df.instances
"""


class Chaos:
    """The main loop: watches progress, kills workers, crashes the server, releases the held
    signals once the last planned event has happened, and notices stalls."""

    def __init__(
        self,
        opts: Options,
        server: Server,
        pool: WorkerPool,
        progress: Progress,
        signaller: Signaller,
        submitter: Submitter,
        stop: threading.Event,
    ):
        self.opts = opts
        self.server = server
        self.pool = pool
        self.progress = progress
        self.signaller = signaller
        self.submitter = submitter
        self.stop = stop
        self.rng = random.Random(opts.seed ^ 0x5EED)  # its own stream: same events per seed
        self.db = Db(server.admin_dsn, stop)
        self.outcome = Outcome()

    def _unfinished(self) -> int:
        with self.progress.lock:
            return self.progress.submitted - self.progress.terminal

    def _planned_done(self, kills: int) -> bool:
        kills_done = self.opts.kills is None or kills >= self.opts.kills
        return kills_done and len(self.outcome.restarts) >= self.opts.restarts

    def _interval(self) -> float:
        return self.opts.kill_interval * self.rng.uniform(0.5, 1.5)

    def kill_one(self, began: float) -> None:
        slot = self.rng.randrange(len(self.pool.slots))
        victim = self.pool.slots[slot]
        wid = victim.worker_id()
        held = 0
        if wid is not None:
            row = self.db.rows("SELECT count(*) FROM df._tasks WHERE lease_owner = %s", (wid,))
            held = int(row[0][0])
        unfinished = self._unfinished()
        self.pool.kill(slot)
        self.outcome.kills.append(
            {
                "at_s": round(time.monotonic() - began, 2),
                "worker": victim.name,
                "pid": victim.pid,
                "was_ready": wid is not None,
                "tasks_held": held,
                "unfinished_workflows": unfinished,
            }
        )

    def restart(self, began: float) -> None:
        downtime = self.rng.uniform(0.5, 2.0)
        unfinished = self._unfinished()
        at = time.monotonic() - began
        self.db.close()
        self.server.crash_and_restart(downtime)
        self.outcome.restarts.append(
            {
                "at_s": round(at, 2),
                "downtime_s": round(downtime, 2),
                "back_after_s": round(time.monotonic() - began - at, 2),
                "unfinished_workflows": unfinished,
            }
        )
        console(f"  PostgreSQL crashed and restarted ({downtime:.1f} s down)")

    def run(self) -> Outcome:
        opts = self.opts
        began = time.monotonic()
        next_kill = began + self._interval()
        next_report = began + 10
        last_restart = began
        last_change, last_seen = began, (-1, -1)
        while not self.stop.is_set():
            now = time.monotonic()
            for thread in (self.submitter, self.signaller):
                if thread.error is not None:
                    raise ChaosError(f"{thread.name} failed: {thread.error!r}") from thread.error
            for w in self.pool.reap_crashed():
                self.outcome.crashed.append(w)
                console(f"  worker {w.name} exited by itself ({w.proc.returncode})")
            if len(self.outcome.crashed) > max(5, 3 * opts.workers):
                # Replacements that cannot start (a schema changed under the run, say) would
                # only be replaced again and again.
                last = self.outcome.crashed[-1]
                raise ChaosError(f"workers keep exiting by themselves; {last.name}:\n{last.tail()}")
            terminal, completed, _, checkpoints = self.db.rows(PROGRESS_SQL)[0]
            with self.progress.lock:
                self.progress.terminal = int(terminal)
            if self.submitter.done.is_set() and terminal >= opts.workflows:
                self.outcome.finished = True
                break
            if (terminal, checkpoints) != last_seen:
                last_seen, last_change = (terminal, checkpoints), now
            elif now - last_change > opts.stall_seconds:
                self.outcome.stalled_after = round(now - last_change, 1)
                console(f"  no progress for {opts.stall_seconds:.0f} s: giving up")
                break
            if now - began > opts.timeout:
                console(f"  still unfinished after {opts.timeout:.0f} s: giving up")
                break

            kills = len(self.outcome.kills)
            if now >= next_kill and (opts.kills is None or kills < opts.kills):
                self.kill_one(began)
                next_kill = time.monotonic() + self._interval()
                last_change = time.monotonic()
            done = len(self.outcome.restarts)
            due = (done + 1) / (opts.restarts + 1) * opts.workflows
            if (
                done < opts.restarts
                and terminal >= due
                and now - last_restart >= RESTART_GAP_SECONDS
            ):
                self.restart(began)
                last_restart = last_change = time.monotonic()
            if not self.signaller.released.is_set() and self._planned_done(len(self.outcome.kills)):
                self.signaller.released.set()
            if now >= next_report:
                next_report = now + 10
                console(
                    f"  {now - began:5.0f} s: {completed}/{opts.workflows} completed, "
                    f"{terminal - completed} failed/cancelled, {self.progress.submitted} "
                    f"submitted, {len(self.outcome.kills)} kills, "
                    f"{len(self.outcome.restarts)} restarts, {self.signaller.sent} signals"
                )
            time.sleep(POLL_SECONDS)
        self.outcome.run_seconds = round(time.monotonic() - began, 1)
        self.db.close()
        return self.outcome


def read_results(
    db: Db,
) -> tuple[list[tuple[str, str, str]], dict[tuple[str, int], int]]:
    instances = [
        (str(label), str(iid), str(status))
        for label, iid, status in db.rows("SELECT label, id, status FROM df.instances")
    ]
    effects = {
        (str(i), int(s)): int(n)
        for i, s, n in db.rows("SELECT instance, step, count(*) FROM public.effects GROUP BY 1, 2")
    }
    return instances, effects


def failure_reasons(db: Db) -> dict[str, int]:
    """Why instances failed (``df._runs.output``, first line, instance ids masked): count each."""
    reasons: Counter[str] = Counter()
    for (output,) in db.rows(
        "SELECT r.output FROM df.instances i JOIN df._runs r ON r.instance_id = i.id"
        " WHERE i.status <> 'completed'"
    ):
        line = (str(output) if output is not None else "(no output)").splitlines()[0][:200]
        reasons[_mask(line)] += 1
    return dict(reasons.most_common())


def diagnose(db: Db, labels: list[str]) -> dict[str, Any]:
    """The engine's rows of the instances concerned, to reproduce and explain a violation."""

    def fetch(query: str, *params: Any) -> list[dict[str, Any]]:
        def go(c: Conn) -> list[dict[str, Any]]:
            cur = c.execute(query, params)
            names = [d.name for d in cur.description or ()]
            return [
                {
                    k: (v if isinstance(v, int | float | bool | None) else str(v))
                    for k, v in zip(names, r, strict=True)
                }
                for r in cur.fetchall()
            ]

        return db.run(go)

    out: dict[str, Any] = {}
    for label in labels[:DIAGNOSE_LIMIT]:
        found = fetch(
            "SELECT id, label, status, created_at, updated_at, completed_at"
            " FROM df.instances WHERE label = %s",
            label,
        )
        entry: dict[str, Any] = {"instances": found}
        for inst in found:
            iid = inst["id"]
            entry[iid] = {
                "runs": fetch(
                    "SELECT output, generation, checkpoints, finished_at, left(state::text, 4000)"
                    " AS state FROM df._runs WHERE instance_id = %s",
                    iid,
                ),
                "nodes": fetch(
                    "SELECT id, node_type, status, result_name, left_node, right_node,"
                    " left(query, 300) AS query, left(result::text, 300) AS result,"
                    " left(error, 600) AS error, status_details, started_at, updated_at"
                    " FROM df.nodes WHERE instance_id = %s ORDER BY created_at, id",
                    iid,
                ),
                "tasks": fetch(
                    "SELECT id, activation, kind, node_id, left(payload::text, 300) AS payload,"
                    " visible_at, lease_owner, attempts, deferrals, created_at"
                    " FROM df._tasks WHERE instance_id = %s ORDER BY id",
                    iid,
                ),
                "signals": fetch(
                    "SELECT id, name, sent_at, consumed_at, consumed_by FROM df._signals"
                    " WHERE instance_id = %s ORDER BY id",
                    iid,
                ),
                "effects": fetch(
                    "SELECT step, worker, at FROM public.effects WHERE instance = %s ORDER BY at",
                    iid,
                ),
            }
        out[label] = entry
    return out


# -- output ----------------------------------------------------------------------------------


def console(text: str) -> None:
    print(text, flush=True)


def print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    v = report["violations"]
    console("")
    console(
        f"chaos: {s['workflows']} workflows, {s['kills']} kills "
        f"({s['kills_while_holding_tasks']} while the victim held tasks), "
        f"{s['restarts']} PostgreSQL crashes, {s['elapsed_s']} s "
        f"(workflows ran {s['run_s']} s), seed {report['meta']['seed']}"
    )
    console(
        f"  completed {s['completed']}/{s['workflows']} ({s['completion_rate']:.2%}); "
        f"effects {s['effect_rows']} rows for {s['expected_effects']} expected steps; "
        f"signals sent {s['signals_sent']}; submit chunks retried {s['submit_retries']}"
    )
    console(f"  blocks: {', '.join(f'{k} {n}' for k, n in s['blocks'].items())}")
    if s["worker_log_tracebacks"]:
        console(f"  worker logs hold {s['worker_log_tracebacks']} traceback(s)")
    for kind, n in list(report["worker_log_kinds"].items())[:8]:
        if not kind.startswith("WARNING"):
            console(f"    {n} x {kind}")
    console(
        f"  violations: {v['count']} (not completed {len(v['not_completed'])}, "
        f"missing instances {len(v['missing_instances'])}, "
        f"extra instances {len(v['extra_instances'])}, "
        f"duplicated steps {sum(len(x) for x in v['duplicates'].values())}, "
        f"missing steps {sum(len(x) for x in v['missing'].values())}, "
        f"unexpected steps {sum(len(x) for x in v['unexpected'].values())}, "
        f"worker crashes {len(v['worker_crashes'])})"
    )
    for reason, n in list(report["failure_reasons"].items())[:5]:
        console(f"    {n} instance(s) ended with: {reason}")
    for kind in ("not_completed", "duplicates", "missing", "unexpected"):
        items = list(v[kind].items())[:5]
        for label, what in items:
            console(f"    {kind}: {label}: {what}")
    for crash in v["worker_crashes"][:5]:
        console(f"    worker crash: {crash.splitlines()[0]}")


# -- main ------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> tuple[Options, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workflows", type=int, default=10_000, help="default: 10000")
    parser.add_argument(
        "--kills",
        type=int,
        default=None,
        help="SIGKILLs of a worker (default: one every --kill-interval until the end)",
    )
    parser.add_argument(
        "--restarts", type=int, default=2, help="PostgreSQL crashes and restarts (default: 2)"
    )
    parser.add_argument(
        "--kill-interval", type=float, default=3.0, help="mean seconds between kills (default: 3)"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="per worker (default: 8)")
    parser.add_argument("--lease-seconds", type=float, default=5.0, help="(default: 5)")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=1000,
        help="most workflows submitted and unfinished at once (default: 1000)",
    )
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=120.0,
        help="give up when nothing progresses for this long (default: 120)",
    )
    parser.add_argument(
        "--timeout", type=float, default=7200.0, help="give up after this long (default: 7200)"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "chaos.json",
        help="where to write the JSON report (default: bench/results/chaos.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    args = parser.parse_args(argv)
    if args.workflows < 1 or args.workers < 1 or args.restarts < 0:
        parser.error("--workflows and --workers must be at least 1, --restarts at least 0")
    if args.kills is not None and args.kills < 0:
        parser.error("--kills must be at least 0")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    opts = Options(
        workflows=args.workflows,
        kills=args.kills,
        restarts=args.restarts,
        kill_interval=args.kill_interval,
        workers=args.workers,
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        in_flight=max(args.in_flight, SUBMIT_CHUNK),
        stall_seconds=args.stall_seconds,
        timeout=args.timeout,
        seed=seed,
    )
    return opts, args.out, args.keep


def main(argv: list[str] | None = None) -> int:
    opts, out, keep = parse_args(argv)
    # Ctrl-C and SIGTERM both end the run cleanly (even in the background, where the shell
    # ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    began = time.monotonic()
    stop = threading.Event()
    base = Path(tempfile.mkdtemp(prefix="pgdurable-chaos-"))
    server = Server(base)
    pool: WorkerPool | None = None
    threads: list[threading.Thread] = []
    console(f"chaos: seed {opts.seed} (replay with --seed {opts.seed}); working in {base}")
    try:
        workflows = build_workflows(random.Random(opts.seed), opts.workflows)
        expected = {w.label: w.steps for w in workflows}
        server.start()
        pool = WorkerPool(
            server.admin_dsn, base, opts.workers, opts.concurrency, opts.lease_seconds
        )
        pool.start()
        pool.wait_ready()
        progress = Progress()
        submitter = Submitter(server.user_dsn, workflows, progress, opts.in_flight, stop)
        signaller = Signaller(
            server.admin_dsn, server.user_dsn, {w.label for w in workflows if w.held}, stop
        )
        threads = [submitter, signaller]
        for t in threads:
            t.start()
        console(
            f"running {opts.workflows} workflows on {opts.workers} workers "
            f"(concurrency {opts.concurrency}, lease {opts.lease_seconds:g} s); kills "
            f"{'until done' if opts.kills is None else opts.kills}, every "
            f"~{opts.kill_interval:g} s; {opts.restarts} PostgreSQL crash(es)"
        )
        chaos = Chaos(opts, server, pool, progress, signaller, submitter, stop)
        outcome = chaos.run()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stopping = time.monotonic()
        exit_codes = pool.stop()
        stop_seconds = round(time.monotonic() - stopping, 1)
        tracebacks, log_kinds, log_lines = pool.log_problems()

        db = Db(server.admin_dsn, threading.Event())
        instances, effects = read_results(db)
        crashes = [
            f"{w.name} (pid {w.pid}) exited with {w.proc.returncode}:\n{w.tail(15)}"
            for w in outcome.crashed
        ]
        violations = find_violations(expected, instances, effects, crashes)
        reasons = failure_reasons(db)
        diagnostics = diagnose(db, violations.labels())
        db.close()
        outcome.elapsed = round(time.monotonic() - began, 1)

        statuses = Counter(status for _, _, status in instances)
        blocks = Counter(b for w in workflows for b in w.blocks)
        report: dict[str, Any] = {
            "meta": {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "seed": opts.seed,
                "options": {k: v for k, v in vars(opts).items() if k != "seed"},
                "pgdurable": {
                    "version": __version__,
                    "git": git_describe(),
                    # PYTHONPATH may point the run (workers included) at another copy.
                    "imported_from": str(Path(pgdurable.__file__).resolve().parent),
                },
                "postgres": server.version(),
                "server_settings": SERVER_SETTINGS,
                "cores": os.cpu_count(),
                "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "summary": {
                "workflows": opts.workflows,
                "submitted": progress.submitted,
                "statuses": dict(statuses),
                "completed": statuses.get("completed", 0),
                "completion_rate": statuses.get("completed", 0) / opts.workflows,
                "all_completed": statuses.get("completed", 0) == opts.workflows,
                "finished": outcome.finished,
                "stalled_after_s": outcome.stalled_after,
                "kills": len(outcome.kills),
                "kills_while_holding_tasks": sum(1 for k in outcome.kills if k["tasks_held"]),
                "restarts": len(outcome.restarts),
                "elapsed_s": outcome.elapsed,
                "run_s": outcome.run_seconds,
                "expected_effects": sum(len(s) for s in expected.values()),
                "effect_rows": sum(effects.values()),
                "signals_sent": signaller.sent,
                "signals_refused": signaller.refused,
                "submit_retries": submitter.ambiguous,
                "blocks": dict(sorted(blocks.items())),
                "worker_processes_started": len(pool.all),
                "worker_exit_codes_at_stop": exit_codes,
                "worker_stop_s": stop_seconds,
                "worker_log_tracebacks": tracebacks,
            },
            "violations": violations.to_json(),
            "failure_reasons": reasons,
            "kills": outcome.kills,
            "restarts": outcome.restarts,
            "worker_log_kinds": log_kinds,
            "worker_log_errors": log_lines,
            "diagnostics": diagnostics,
        }
        print_summary(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        console(f"wrote {out} ({outcome.elapsed} s)")
        return 0 if violations.count == 0 else 1
    except KeyboardInterrupt:
        console("interrupted; stopping")
        return 130
    except Exception as exc:  # the driver's own failure, not a finding: exit code 2
        console(f"chaos run failed: {exc!r}")
        if not isinstance(exc, ChaosError):
            traceback.print_exc()
        if pool is not None:
            for w in pool.slots:
                console(f"--- {w.name} ---\n{w.tail(15)}")
        return 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if pool is not None:
            pool.kill_all()
        server.stop()
        if keep:
            console(f"data directory and logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
