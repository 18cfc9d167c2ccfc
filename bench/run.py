"""pgdurable benchmark: workflow throughput and latency next to PostgreSQL's own commit rate.

Run ``.venv/bin/python bench/run.py [--quick | --smoke] [--out bench/results/latest.json]``.
It starts its own embedded PostgreSQL 18 (durable settings: fsync and synchronous_commit on),
measures pgbench's commit rate for one INSERT per transaction, then runs workflows of three
shapes (one SQL step, ten in sequence, a JOIN of ten) on 1 and then 4 worker processes, and
prints and saves every figure. ``trigger1`` inserts rows at stepped rates into a table whose
AFTER INSERT trigger starts a one-step workflow per row. ``--delay-ms 1`` runs each shape a
second time with the workers behind a proxy that adds a 1 ms round trip (bench/delayproxy.py).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg import sql as pgsql
from rich.console import Console
from rich.table import Table

from pgdurable import __version__, schema
from pgdurable.embedded import EmbeddedPostgres, bin_path, free_port

REPO = Path(__file__).resolve().parent.parent
DATABASE = "bench"
ROLE = "bench"
STEP_SQL = "INSERT INTO bench_effects(v) VALUES ({n})"
PGBENCH_SQL = "INSERT INTO bench_effects(v) VALUES (0);\n"
SUBMIT_CLIENTS = 4  # client connections that submit workflows
SUBMIT_CHUNK = 25  # df.start calls per transaction in the throughput phase
LATENCY_LOAD = 0.5  # latency is measured at this fraction of the measured throughput
# ... and unloaded, at this fraction of it, clamped to this range of workflows/s.
IDLE_FRACTION = 0.1
IDLE_RATE = (2.0, 5.0)
STALL_SECONDS = 90.0  # no progress for this long while waiting: give up
# trigger1: each inserted row's trigger starts a workflow whose one step writes the row's id.
# The graph is built once; the trigger puts the row's id where this marker stands.
DOC_ID = "__doc_id__"
TRIGGER_STEP_SQL = f"INSERT INTO bench_effects(v) VALUES ({DOC_ID})"
TRIGGER_ROWS_PER_INSERT = 10  # rows per INSERT statement, each its own transaction
TRIGGER_CLIENTS = 8  # inserting connections: enough to keep the schedule when inserts slow down
TRIGGER_RATES = (1000, 2000, 3000)  # rows/s, stepped up one after the other
# A phase keeps up when its backlog grew by at most this share of the rows it inserted plus
# the rows of TRIGGER_IN_FLIGHT seconds: what is left then is work in flight (the last
# INSERTs' workflows), not a queue that grows with time.
TRIGGER_KEEP_UP = 0.05
TRIGGER_IN_FLIGHT = 0.25
# A phase whose clients fall this far behind its schedule stops inserting: the rate is out of
# reach, and the rows it did insert say how far.
TRIGGER_OVERRUN = 1.25
PROXY = Path(__file__).resolve().parent / "delayproxy.py"
# Durable defaults, stated explicitly (the embedded server's own pgdurable.conf adds
# listen_addresses, max_connections = 300 and pg_durable.poll_interval = 100ms).
SERVER_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
REPORTED_SETTINGS = [
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "wal_level",
    "commit_delay",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
    "autovacuum",
    "jit",
    "pg_durable.poll_interval",
]

# Wide enough for the tables when the output is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 150)


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A workflow shape: its name, how many SQL steps it runs, and its DSL expression."""

    name: str
    steps: int
    description: str
    operator: str | None  # None: a single step
    step_sql: str = STEP_SQL  # each step's statement; {n} is the step's number
    expression: bool = False  # step_sql is a DSL expression (a df.call), not a statement


SHAPES = [
    Shape("sql1", 1, "one SQL step", None),
    Shape("seq10", 10, "10 SQL steps in sequence ('s1' ~> ... ~> 's10')", "~>"),
    Shape("join10", 10, "JOIN of 10 SQL steps ('s1' & ... & 's10', nested)", "&"),
]
# Not a batch of workflows like the shapes above: rows inserted at a set rate, each starting
# a workflow from a trigger (Runner.trigger_scenario).
TRIGGER_SHAPE = Shape(
    "trigger1",
    1,
    "AFTER INSERT trigger: df.start of one SQL step per inserted row",
    None,
    TRIGGER_STEP_SQL,
)
# Python steps (docs/python.md), run only when asked for: one that does nothing, and one that
# runs sql1's statement through ctx.conn (bench/bench_steps.py).
CALL_SHAPES = [
    Shape("call1", 1, "one Python step that does nothing", None, "df.call('bench.noop')", True),
    Shape(
        "callsql1",
        1,
        "one Python step that runs sql1's INSERT",
        None,
        """df.call('bench.insert', '{{"v": {n}}}')""",
        True,
    ),
]
ALL_SHAPES = [*SHAPES, TRIGGER_SHAPE, *CALL_SHAPES]


@dataclass(frozen=True)
class Mode:
    """How long each part runs."""

    name: str
    pgbench_clients: tuple[int, ...]
    pgbench_seconds: int
    warmup_seconds: float  # warm-up batch size is sized to take about this long
    throughput_seconds: float  # the measured batch is sized to take about this long
    batch_min: int
    batch_max: int
    latency_seconds: float
    latency_min_samples: int
    latency_max_seconds: float
    idle_samples: int
    trigger_seconds: float  # each trigger1 rate is held this long
    trigger_warmup_rows: int
    # Smoke leaves trigger1 out: its backlog can be 0, and the smoke test wants every figure
    # above 0.
    trigger_by_default: bool = True


MODES = {
    "full": Mode("full", (1, 4, 16), 10, 2.0, 12.0, 200, 50_000, 12.0, 300, 25.0, 20, 8.0, 400),
    "quick": Mode("quick", (1, 4), 3, 0.5, 2.5, 50, 5_000, 2.0, 30, 4.0, 5, 3.0, 100),
    "smoke": Mode("smoke", (1, 4), 1, 0.0, 0.0, 8, 8, 0.5, 4, 1.0, 1, 1.0, 20, False),
}


# -- results ---------------------------------------------------------------------------------


@dataclass
class PgbenchResult:
    clients: int
    threads: int
    seconds: int
    transactions: int
    tps: float
    latency_avg_ms: float
    cpu_ms_postgres_per_tx: float  # PostgreSQL CPU per transaction
    wal_bytes_per_tx: float
    machine_busy_pct: float


@dataclass
class Cost:
    """Resources used per workflow during a throughput phase."""

    write_xacts: float  # transactions that wrote (got an xid), cluster-wide
    wal_bytes: float
    cpu_ms_workers: float
    cpu_ms_postgres: float
    cpu_ms_client: float
    machine_busy_pct: float  # all cores, whole machine, during the phase
    other_busy_pct: float  # share of the machine used by processes not part of the bench
    worker_runqueue_pct: float  # share of the phase workers spent runnable, waiting for a CPU
    other_top: list[str]  # the biggest CPU users outside the benchmark, if any
    statements: float | None = None  # top-level statements (round trips), --statements only
    top_statements: list[dict[str, Any]] | None = None
    cpu_ms_proxy: float | None = None  # the delay proxy's CPU, --delay-ms runs only


@dataclass
class Throughput:
    workflows: int
    seconds: float  # first created_at to last completed_at (server clock)
    submit_seconds: float  # client time to submit the whole batch
    workflows_per_s: float
    steps_per_s: float
    cost: Cost


@dataclass
class Latency:
    target_rate_per_s: float
    achieved_rate_per_s: float
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


@dataclass
class WorkflowResult:
    shape: str
    description: str
    steps: int
    worker_processes: int
    concurrency: int
    throughput: Throughput
    latency: Latency
    latency_idle: Latency
    delay_ms: float | None = None  # None: the workers connect directly (loopback)
    elapsed_seconds: float = 0.0  # what the scenario added to the run, setup included


@dataclass
class TriggerStep:
    """One rate of trigger1: rows inserted at that rate for a while, with the workers running."""

    target_rows_per_s: float
    seconds: float  # first INSERT sent to last INSERT returned (client clock)
    rows: int
    insert_rows_per_s: float  # rows / seconds: the insert rate sustained
    insert_p50_ms: float  # INSERT statement round trip, as the client sees it
    insert_p99_ms: float
    insert_max_ms: float
    completed: int  # workflows (of any rate) completed during the phase (server clock)
    completed_per_s: float
    backlog_start: int  # workflows started but not completed, at the phase's start
    backlog_end: int  # ... and at its end
    keeps_up: bool
    machine_busy_pct: float
    other_busy_pct: float
    worker_runqueue_pct: float


@dataclass
class TriggerResult:
    shape: str
    description: str
    worker_processes: int
    concurrency: int
    rows_per_insert: int
    clients: int
    warmup_rows: int
    steps: list[TriggerStep]
    delay_ms: float | None = None
    elapsed_seconds: float = 0.0  # what the scenario added to the run, setup included

    @property
    def sustained_rows_per_s(self) -> float:
        """The highest insert rate whose workflows kept up (0: none did)."""
        return max((s.insert_rows_per_s for s in self.steps if s.keeps_up), default=0.0)


def delay_key(delay_ms: float | None) -> str:
    """``""`` for loopback, ``"_delay1ms"`` (``"_delay0p5ms"``) behind the delay proxy."""
    return "" if delay_ms is None else f"_delay{delay_ms:g}ms".replace(".", "p")


def network_name(delay_ms: float | None) -> str:
    return "loopback" if delay_ms is None else f"proxy +{delay_ms:g} ms"


@dataclass
class Report:
    meta: dict[str, Any]
    pgbench: list[PgbenchResult] = field(default_factory=list)
    workflows: list[WorkflowResult] = field(default_factory=list)
    triggers: list[TriggerResult] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        """The headline figures under stable keys (what targets are set against)."""
        out: dict[str, float] = {}
        for p in self.pgbench:
            out[f"pgbench_c{p.clients}_tps"] = round(p.tps, 1)
        loopback = {
            (w.shape, w.worker_processes): w.throughput.workflows_per_s
            for w in self.workflows
            if w.delay_ms is None
        }
        for w in self.workflows:
            key = f"{w.shape}_w{w.worker_processes}{delay_key(w.delay_ms)}"
            out[f"{key}_workflows_per_s"] = round(w.throughput.workflows_per_s, 1)
            out[f"{key}_steps_per_s"] = round(w.throughput.steps_per_s, 1)
            out[f"{key}_p50_ms"] = round(w.latency.p50_ms, 1)
            out[f"{key}_p99_ms"] = round(w.latency.p99_ms, 1)
            out[f"{key}_idle_p50_ms"] = round(w.latency_idle.p50_ms, 1)
            base = loopback.get((w.shape, w.worker_processes))
            if w.delay_ms is not None and base:
                # The share of the loopback throughput kept behind the delay (target >= 0.5).
                out[f"{key}_vs_loopback"] = round(w.throughput.workflows_per_s / base, 3)
        for t in self.triggers:
            key = f"{t.shape}_w{t.worker_processes}{delay_key(t.delay_ms)}"
            out[f"{key}_sustained_rows_per_s"] = round(t.sustained_rows_per_s, 1)
            for s in t.steps:
                rk = f"{key}_r{s.target_rows_per_s:g}"
                out[f"{rk}_insert_rows_per_s"] = round(s.insert_rows_per_s, 1)
                out[f"{rk}_completed_per_s"] = round(s.completed_per_s, 1)
                out[f"{rk}_backlog_end"] = s.backlog_end
                out[f"{rk}_insert_p50_ms"] = round(s.insert_p50_ms, 2)
                out[f"{rk}_insert_p99_ms"] = round(s.insert_p99_ms, 2)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "figures": self.figures(),
            "pgbench": [asdict(p) for p in self.pgbench],
            "workflows": [asdict(w) for w in self.workflows],
            "triggers": [
                {**asdict(t), "sustained_rows_per_s": t.sustained_rows_per_s} for t in self.triggers
            ],
        }


class BenchError(RuntimeError):
    """The benchmark cannot go on (a worker died, workflows failed or stalled)."""


# -- the machine and CPU accounting ----------------------------------------------------------


def busy_elsewhere(seconds: float = 1.0) -> float:
    """How busy the machine is (%, all cores) before the benchmark starts anything."""
    busy0, total0 = _machine_busy()
    time.sleep(seconds)
    busy1, total1 = _machine_busy()
    return 100.0 * (busy1 - busy0) / max(total1 - total0, 1)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


_TICK = os.sysconf("SC_CLK_TCK")


def _runqueue_wait(pid: int) -> float:
    """Seconds a process has spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])
    return total - idle, total


@dataclass(frozen=True)
class _Proc:
    ppid: int
    comm: str
    cpu: float  # own user + system seconds
    reaped: float  # user + system seconds of its reaped children


def _processes() -> dict[int, _Proc]:
    """Every process on the machine, from /proc/PID/stat."""
    out: dict[int, _Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        f = rest.split()
        # After the command: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
        out[int(entry.name)] = _Proc(
            ppid=int(f[1]),
            comm=head.split("(", 1)[1],
            cpu=(int(f[11]) + int(f[12])) / _TICK,
            reaped=(int(f[13]) + int(f[14])) / _TICK,
        )
    return out


class CpuMeter:
    """CPU used by the worker processes, the PostgreSQL processes, this client, the delay
    proxy (if any), and the rest of the machine (other users of a shared machine, kernel
    threads)."""

    def __init__(
        self, postmaster_pid: int, worker_pids: list[int], proxy_pids: list[int] | None = None
    ):
        self.postmaster = postmaster_pid
        self.workers = worker_pids
        self.proxies = proxy_pids or []
        self._start = self._sample()

    def _sample(self) -> dict[str, Any]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pgbench, once reaped
        busy, total = _machine_busy()
        procs = _processes()
        pm = procs.get(self.postmaster)
        postgres = (pm.cpu + pm.reaped) if pm else 0.0
        postgres += sum(p.cpu for p in procs.values() if p.ppid == self.postmaster)
        return {
            "procs": procs,
            "workers": sum(procs[pid].cpu for pid in self.workers if pid in procs),
            "proxy": sum(procs[pid].cpu for pid in self.proxies if pid in procs),
            "runqueue": sum(_runqueue_wait(pid) for pid in self.workers),
            "postgres": postgres,
            "client": me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime,
            "busy": busy / _TICK,
            "total": total / _TICK,
            "wall": time.monotonic(),
        }

    def _others(self, start: dict[int, _Proc], end: dict[int, _Proc]) -> list[str]:
        """The biggest CPU users outside the benchmark during the measurement."""
        ours = {os.getpid(), self.postmaster, *self.workers, *self.proxies}
        by_name: dict[str, float] = {}
        for pid, proc in end.items():
            if pid in ours or proc.ppid in ours:
                continue
            before = start.get(pid)
            used = proc.cpu - (before.cpu if before and before.comm == proc.comm else 0.0)
            if used > 0:
                # Kernel workers are named after their current job (kworker/u8:2-writeback).
                name = proc.comm.split("-")[0].split("/")[0] if "/" in proc.comm else proc.comm
                by_name[name] = by_name.get(name, 0.0) + used
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
        return [f"{name} {seconds:.1f}s" for name, seconds in top if seconds >= 0.1]

    def stop(self) -> dict[str, Any]:
        """CPU seconds per consumer since the meter was made, and shares of the machine (%)."""
        end = self._sample()
        d: dict[str, Any] = {
            k: end[k] - self._start[k] for k in end if isinstance(end[k], int | float)
        }
        capacity = d["total"] or 1.0  # CPU seconds all cores had
        ours = d["workers"] + d["postgres"] + d["client"] + d["proxy"]
        d["busy_pct"] = 100.0 * d["busy"] / capacity
        d["other_pct"] = max(0.0, 100.0 * (d["busy"] - ours) / capacity)
        worker_wall = d["wall"] * len(self.workers)
        d["runqueue_pct"] = 100.0 * d["runqueue"] / worker_wall if worker_wall else 0.0
        d["other_top"] = self._others(self._start["procs"], end["procs"])
        return d


# -- the server ------------------------------------------------------------------------------


class Server:
    """The embedded PostgreSQL of this run, with the schema, the role and the effects table.
    (Other scripts of bench/ use it with their own database, role and tables.)"""

    database = DATABASE
    role = ROLE

    def __init__(self, base: Path):
        self.pg = EmbeddedPostgres(base / "data", free_port(), settings=dict(SERVER_SETTINGS))
        self.started = False

    def start(self) -> None:
        self.pg.start()
        self.started = True
        with psycopg.connect(self.pg.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.database}")
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            schema.install(conn)
            conn.execute(f"CREATE ROLE {self.role} LOGIN")
            conn.execute("SELECT df.grant_usage(%s)", (self.role,))
            conn.execute("SELECT df.grant_call(%s, 'bench.*')", (self.role,))
            self.create_tables(conn)

    def create_tables(self, conn: psycopg.Connection[Any]) -> None:
        """The tables the workflows write, granted to the role."""
        conn.execute(
            "CREATE TABLE bench_effects ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " v integer NOT NULL,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(f"GRANT SELECT, INSERT ON bench_effects TO {self.role}")
        # trigger1's table (install_trigger adds the trigger).
        conn.execute(
            "CREATE TABLE bench_docs ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " label text NOT NULL,"
            " body text,"
            " created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        conn.execute(f"GRANT SELECT, INSERT ON bench_docs TO {self.role}")

    def install_trigger(self, graph: str) -> None:
        """The AFTER INSERT trigger on bench_docs that starts ``graph`` for each new row.

        ``graph`` is in the function's body as a literal, with the row's id put where DOC_ID
        stands. That is safe because the id is a bigint: its text is digits, which can neither
        end a SQL string or comment nor a JSON string (a one-step graph is plain SQL text, a
        bigger one JSON). A text value would need quote_literal(), and inside a JSON graph
        JSON escaping too. df.setvar cannot carry it: variables belong to the role, not the
        transaction, so concurrent inserters would see each other's values.

        SECURITY INVOKER (the default): the trigger runs as the inserting role, so df.start
        records ``bench`` as the submitter and the step runs as ``bench``.
        """
        assert graph.count(DOC_ID) == 1, graph
        body = pgsql.SQL(
            "CREATE OR REPLACE FUNCTION bench_docs_start() RETURNS trigger"
            " LANGUAGE plpgsql AS $fn$\n"
            "BEGIN\n"
            "    PERFORM df.start(replace({graph}, {marker}, NEW.id::text), NEW.label);\n"
            "    RETURN NULL;\n"
            "END\n"
            "$fn$"
        ).format(graph=pgsql.Literal(graph), marker=pgsql.Literal(DOC_ID))
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(body)
            conn.execute(
                "CREATE OR REPLACE TRIGGER bench_docs_start AFTER INSERT ON bench_docs"
                " FOR EACH ROW EXECUTE FUNCTION bench_docs_start()"
            )

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.pg.stop("fast")
        except Exception:
            with contextlib.suppress(Exception):
                self.pg.stop("immediate")
        self.started = False

    @property
    def admin_dsn(self) -> str:
        """Superuser: installs the schema and runs the workers (the schema owner)."""
        return self.pg.dsn(self.database)

    @property
    def user_dsn(self) -> str:
        """The non-superuser role that submits workflows."""
        return self.pg.dsn(self.database, self.role)

    def wal_lsn(self) -> int:
        """The current WAL position, in bytes."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
        assert row is not None
        return int(row[0])

    @property
    def postmaster_pid(self) -> int:
        return int((self.pg.data_dir / "postmaster.pid").read_text().split()[0])

    def describe(self) -> dict[str, Any]:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            version = conn.execute("SELECT version()").fetchone()
            settings = {}
            for name in REPORTED_SETTINGS:
                row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
                settings[name] = row[0] if row else None
        return {"version": version[0] if version else "?", "settings": settings}

    def reset(self) -> None:
        """Empty the engine's and the benchmark's tables and checkpoint, between scenarios.

        Only while no worker runs: TRUNCATE's exclusive locks can deadlock with a claim.
        """
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE df.instances, bench_effects, bench_docs CASCADE")
            conn.execute("VACUUM ANALYZE df.instances, df.nodes, df._runs, df._tasks")
            conn.execute("CHECKPOINT")


# -- the simulated network -------------------------------------------------------------------


class DelayProxy:
    """bench/delayproxy.py in a process of its own: a TCP port in front of PostgreSQL's whose
    round trips take ``delay_ms`` longer."""

    def __init__(self, server: Server, base: Path, delay_ms: float):
        self.server = server
        self.delay_ms = delay_ms
        self.log = base / f"proxy-{delay_ms:g}ms.log"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(PROXY),
                    "--target",
                    f"127.0.0.1:{self.server.pg.port}",
                    "--delay-ms",
                    f"{self.delay_ms:g}",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # Ctrl-C reaches us; we stop it after the workers
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the proxy prints its port once it listens
        match = re.match(r"listening on [\d.]+:(\d+)", line)
        if not match:
            self.stop()
            raise BenchError(f"the delay proxy did not start: {line!r}\n" + _tail(self.log, 15))
        self.port = int(match.group(1))

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"the delay proxy exited with {self.proc.returncode}\n" + _tail(self.log, 15)
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def round_trip_ms(dsn: str, count: int = 200) -> dict[str, float]:
    """p50 and p90 of a ``SELECT 1`` round trip on one connection: what the proxy adds."""
    times: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")
        for _ in range(count):
            began = time.perf_counter()
            conn.execute("SELECT 1", prepare=True)
            times.append(1000 * (time.perf_counter() - began))
    times.sort()
    return {
        "p50_ms": round(times[len(times) // 2], 3),
        "p90_ms": round(times[int(len(times) * 0.9)], 3),
    }


# -- workers ---------------------------------------------------------------------------------


class Workers:
    """``python -m pgdurable worker`` subprocesses, logging to files; connected to PostgreSQL
    directly, or through a delay proxy."""

    def __init__(
        self,
        server: Server,
        base: Path,
        processes: int,
        concurrency: int,
        proxy: DelayProxy | None = None,
    ):
        self.server = server
        self.processes = processes
        self.concurrency = concurrency
        self.proxy = proxy
        self.logs = [base / f"worker-{processes}-{i}.log" for i in range(processes)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def dsn(self) -> str:
        return self.proxy.dsn(DATABASE) if self.proxy else self.server.admin_dsn

    @property
    def delay_ms(self) -> float | None:
        return self.proxy.delay_ms if self.proxy else None

    @property
    def proxy_pids(self) -> list[int]:
        return [self.proxy.pid] if self.proxy else []

    def start(self) -> None:
        # Every worker has the Python steps of the call shapes (bench/bench_steps.py).
        path = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": path}
        for log in self.logs:
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "pgdurable",
                            "worker",
                            "--dsn",
                            self.dsn,
                            "--concurrency",
                            str(self.concurrency),
                            "--import",
                            "bench_steps",
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,  # Ctrl-C reaches us; we stop them in order
                    )
                )
        deadline = time.monotonic() + 60
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            while True:
                self.check()
                row = conn.execute("SELECT count(*) FROM df._worker_epoch").fetchone()
                if row and row[0] >= self.processes:
                    return
                if time.monotonic() > deadline:
                    raise BenchError("workers did not register within 60 s\n" + self.log_tail())
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        if self.proxy:
            self.proxy.check()
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise BenchError(
                    f"worker {proc.pid} exited with {proc.returncode}\n" + _tail(log, 30)
                )

    def log_tail(self) -> str:
        return "\n".join(_tail(log, 15) for log in self.logs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"({path}: no log)"
    return f"--- {path.name} ---\n" + "\n".join(text)


# -- pgbench ---------------------------------------------------------------------------------


def run_pgbench(server: Server, base: Path, clients: int, seconds: int) -> PgbenchResult:
    script = base / "insert.sql"
    script.write_text(PGBENCH_SQL)
    threads = min(2, clients)
    cmd = [
        str(bin_path("pgbench")),
        "-h",
        "127.0.0.1",
        "-p",
        str(server.pg.port),
        "-U",
        ROLE,
        "-n",
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(seconds),
        DATABASE,
    ]
    wal0 = server.wal_lsn()
    meter = CpuMeter(server.postmaster_pid, [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    time.sleep(0.3)  # let the postmaster reap pgbench's backends (their CPU moves to it)
    cpu = meter.stop()
    wal1 = server.wal_lsn()
    if done.returncode != 0:
        raise BenchError(f"pgbench failed ({done.returncode}): {done.stderr or done.stdout}")
    out = done.stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    txs = re.search(r"number of transactions actually processed: (\d+)", out)
    if not (tps and lat and txs):
        raise BenchError(f"cannot read pgbench output:\n{out}")
    transactions = int(txs.group(1))
    return PgbenchResult(
        clients=clients,
        threads=threads,
        seconds=seconds,
        transactions=transactions,
        tps=float(tps.group(1)),
        latency_avg_ms=float(lat.group(1)),
        cpu_ms_postgres_per_tx=1000 * cpu["postgres"] / max(transactions, 1),
        wal_bytes_per_tx=(wal1 - wal0) / max(transactions, 1),
        machine_busy_pct=cpu["busy_pct"],
    )


# -- workflows -------------------------------------------------------------------------------


def build_graph(server: Server, shape: Shape) -> str:
    """The workflow's text, built once with the DSL operators (df.start gets it as a value)."""
    steps: list[pgsql.Composable] = [
        pgsql.SQL(text) if shape.expression else pgsql.Literal(text)
        for text in (shape.step_sql.format(n=i + 1) for i in range(shape.steps))
    ]
    expr: pgsql.Composable = steps[0]
    if shape.operator is not None:
        expr = pgsql.SQL(" " + shape.operator + " ").join(steps)
    with psycopg.connect(server.user_dsn, autocommit=True) as conn:
        row = conn.execute(pgsql.SQL("SELECT ({})::text").format(expr)).fetchone()
    assert row is not None
    return str(row[0])


class Runner:
    """Runs the workflow scenarios against one server with one set of workers."""

    def __init__(self, server: Server, workers: Workers, stop: threading.Event, stats: bool):
        self.server = server
        self.workers = workers
        self.stop = stop
        self.stats = stats
        self._seq = 0

    def label(self, shape: Shape, phase: str) -> str:
        self._seq += 1
        return f"{self.prefix(shape)}-{phase}-{self._seq}"

    def prefix(self, shape: Shape) -> str:
        """What every label of this scenario starts with."""
        return f"{shape.name}-w{self.workers.processes}{delay_key(self.workers.delay_ms)}"

    # -- submitting --------------------------------------------------------------------------

    def submit_batch(self, graph: str, label: str, count: int) -> float:
        """Submit ``count`` workflows from SUBMIT_CLIENTS connections, SUBMIT_CHUNK per
        transaction, as fast as possible; returns the client seconds it took."""
        chunks = [SUBMIT_CHUNK] * (count // SUBMIT_CHUNK)
        if count % SUBMIT_CHUNK:
            chunks.append(count % SUBMIT_CHUNK)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def client() -> None:
            try:
                with psycopg.connect(self.server.user_dsn, autocommit=True) as conn:
                    while not self.stop.is_set():
                        with lock:
                            if not chunks:
                                return
                            n = chunks.pop()
                        conn.execute(
                            "SELECT df.start(%s, %s) FROM generate_series(1, %s)",
                            (graph, label, n),
                        )
            except BaseException as exc:
                errors.append(exc)

        began = time.monotonic()
        _run_threads(client, SUBMIT_CLIENTS)
        if errors:
            raise BenchError(f"submitting failed: {errors[0]!r}")
        return time.monotonic() - began

    def submit_paced(self, graph: str, label: str, rate: float, count: int) -> float:
        """Submit ``count`` workflows at ``rate`` per second, each in its own transaction
        (open loop: submissions are scheduled, not waiting on each other); returns the
        achieved rate."""

        def submit(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT df.start(%s, %s)", (graph, label))

        t0 = self._open_loop(SUBMIT_CLIENTS, count, rate, submit, "submitting")
        elapsed = time.monotonic() - t0
        return count / elapsed if elapsed > 0 else rate

    def _open_loop(
        self,
        clients: int,
        count: int,
        per_s: float,
        send: Callable[[psycopg.Connection[Any]], None],
        what: str,
        give_up_after: float | None = None,
        warm: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> float:
        """Call ``send`` ``count`` times, ``per_s`` a second, from ``clients`` connections of the
        submitting role, on an open-loop schedule: a late call does not delay the next. Calls
        still due ``give_up_after`` seconds in are dropped. Returns when the schedule began
        (monotonic); raises BenchError with the first error.

        Each connection first makes one call of ``warm`` (default: ``send``, which must then
        record nothing outside the database) in a transaction it rolls back, before the
        schedule begins: an application's pooled connections have compiled df.start and planned
        its statements long before, and a session's first call, which does that, would
        otherwise be a sample of the latencies measured (most of them, when they are few)."""
        warm = warm or send
        counter = iter(range(count))
        lock = threading.Lock()
        errors: list[BaseException] = []
        schedule = {"t0": 0.0, "give_up": float("inf")}

        def begin() -> None:
            schedule["t0"] = time.monotonic() + 0.05
            if give_up_after is not None:
                schedule["give_up"] = schedule["t0"] + give_up_after

        ready = threading.Barrier(clients, action=begin)

        def client() -> None:
            try:
                with psycopg.connect(self.server.user_dsn, autocommit=True) as conn:
                    with conn.transaction(force_rollback=True):
                        warm(conn)
                    ready.wait()
                    t0, give_up = schedule["t0"], schedule["give_up"]
                    while not self.stop.is_set():
                        with lock:
                            k = next(counter, None)
                        if k is None:
                            return
                        delay = t0 + k / per_s - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        elif time.monotonic() > give_up:
                            return
                        send(conn)
            except BaseException as exc:
                errors.append(exc)
                ready.abort()  # the others must not wait for this one at the barrier

        _run_threads(client, clients)
        if errors:
            raise BenchError(f"{what} failed: {errors[0]!r}")
        return schedule["t0"]

    # -- waiting and measuring ---------------------------------------------------------------

    def wait_done(self, label: str, count: int) -> None:
        """Poll df.instances until all ``count`` instances of ``label`` are completed."""
        last_done, last_change = -1, time.monotonic()
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'completed'),"
                    "       count(*) FILTER (WHERE status IN ('failed', 'cancelled'))"
                    "  FROM df.instances WHERE label = %s",
                    (label,),
                ).fetchone()
                assert row is not None
                done, failed = int(row[0]), int(row[1])
                if failed:
                    raise BenchError(f"{failed} workflow(s) of {label} failed: {self._why(label)}")
                if done >= count:
                    return
                self.workers.check()
                now = time.monotonic()
                if done != last_done:
                    last_done, last_change = done, now
                elif now - last_change > STALL_SECONDS:
                    raise BenchError(
                        f"{label}: stuck at {done}/{count} completed for {STALL_SECONDS:.0f} s\n"
                        + self.workers.log_tail()
                    )
                time.sleep(0.1)
        raise KeyboardInterrupt

    def _why(self, label: str) -> str:
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT i.id, r.output FROM df.instances i JOIN df._runs r ON r.instance_id = i.id"
                " WHERE i.label = %s AND i.status IN ('failed', 'cancelled') LIMIT 1",
                (label,),
            ).fetchone()
        return f"instance {row[0]}: {row[1]}" if row else "?"

    def span(self, label: str) -> tuple[int, float]:
        """(instances, seconds from the first created_at to the last completed_at)."""
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*), extract(epoch FROM max(completed_at) - min(created_at))::float8"
                "  FROM df.instances WHERE label = %s",
                (label,),
            ).fetchone()
        assert row is not None
        return int(row[0]), float(row[1] or 0.0)

    def _wal_and_xid(self, conn: psycopg.Connection[Any]) -> tuple[int, int]:
        row = conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,"
            "       pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    # -- phases ------------------------------------------------------------------------------

    def warmup(self, shape: Shape, graph: str, mode: Mode) -> float:
        """Run a small batch (connections, caches); returns its rate in workflows/s."""
        count = max(2 * self.workers.processes * self.workers.concurrency // shape.steps, 8)
        label = self.label(shape, "warmup")
        began = time.monotonic()
        self.submit_batch(graph, label, count)
        self.wait_done(label, count)
        rate = count / (time.monotonic() - began)
        if mode.warmup_seconds > 0 and (time.monotonic() - began) < mode.warmup_seconds / 2:
            # Too short to say much: a second, bigger one sized from the first.
            count = int(min(max(rate * mode.warmup_seconds, count), mode.batch_max))
            label = self.label(shape, "warmup")
            began = time.monotonic()
            self.submit_batch(graph, label, count)
            self.wait_done(label, count)
            rate = count / (time.monotonic() - began)
        return rate

    def throughput(self, shape: Shape, graph: str, count: int) -> Throughput:
        label = self.label(shape, "throughput")
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            if self.stats:
                conn.execute("SELECT pg_stat_statements_reset()")
            wal0, xid0 = self._wal_and_xid(conn)
            meter = CpuMeter(self.server.postmaster_pid, self.workers.pids, self.workers.proxy_pids)
            submit_seconds = self.submit_batch(graph, label, count)
            self.wait_done(label, count)
            cpu = meter.stop()
            wal1, xid1 = self._wal_and_xid(conn)
            statements, top = (self._statements(conn, count)) if self.stats else (None, None)
        n, seconds = self.span(label)
        cost = Cost(
            write_xacts=(xid1 - xid0) / n,
            wal_bytes=(wal1 - wal0) / n,
            cpu_ms_workers=1000 * cpu["workers"] / n,
            cpu_ms_postgres=1000 * cpu["postgres"] / n,
            cpu_ms_client=1000 * cpu["client"] / n,
            machine_busy_pct=cpu["busy_pct"],
            other_busy_pct=cpu["other_pct"],
            worker_runqueue_pct=cpu["runqueue_pct"],
            other_top=cpu["other_top"],
            statements=statements,
            top_statements=top,
            cpu_ms_proxy=1000 * cpu["proxy"] / n if self.workers.proxy else None,
        )
        rate = n / seconds
        return Throughput(n, seconds, submit_seconds, rate, rate * shape.steps, cost)

    def _statements(
        self, conn: psycopg.Connection[Any], count: int
    ) -> tuple[float, list[dict[str, Any]]]:
        rows = conn.execute(
            "SELECT s.calls, r.rolname, regexp_replace(s.query, '\\s+', ' ', 'g'),"
            " s.total_exec_time + s.total_plan_time, s.toplevel"
            "  FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid"
            "  JOIN pg_database d ON d.oid = s.dbid"
            " WHERE d.datname = %s AND s.query !~ 'pg_stat_statements|pg_current_wal_lsn'"
            "   AND NOT (s.query ~ 'FROM df.instances WHERE label' AND r.rolname = 'postgres')"
            " ORDER BY s.toplevel DESC, s.calls DESC",
            (DATABASE,),
        ).fetchall()
        total = sum(int(r[0]) for r in rows if r[4]) / count
        top = [
            {
                "per_workflow": round(int(r[0]) / count, 2),
                "ms_per_workflow": round(float(r[3]) / count, 3),
                "toplevel": bool(r[4]),
                "role": r[1],
                "query": str(r[2])[:160],
            }
            for r in sorted(rows, key=lambda r: -float(r[3]))[:30]
        ]
        return total, top

    def latency(self, shape: Shape, graph: str, rate: float, count: int, phase: str) -> Latency:
        """Submit ``count`` workflows at ``rate``/s; percentiles of completed_at - created_at."""
        label = self.label(shape, phase)
        achieved = self.submit_paced(graph, label, rate, count)
        self.wait_done(label, count)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*),"
                "       percentile_cont(0.5) WITHIN GROUP (ORDER BY d),"
                "       percentile_cont(0.99) WITHIN GROUP (ORDER BY d),"
                "       avg(d), max(d)"
                "  FROM (SELECT extract(epoch FROM completed_at - created_at)::float8 * 1000 AS d"
                "          FROM df.instances WHERE label = %s) x",
                (label,),
            ).fetchone()
        assert row is not None
        return Latency(
            target_rate_per_s=rate,
            achieved_rate_per_s=achieved,
            samples=int(row[0]),
            p50_ms=float(row[1]),
            p99_ms=float(row[2]),
            mean_ms=float(row[3]),
            max_ms=float(row[4]),
        )

    def scenario(self, shape: Shape, mode: Mode) -> WorkflowResult:
        graph = build_graph(self.server, shape)
        if mode.throughput_seconds > 0:
            rate_estimate = self.warmup(shape, graph, mode)
            count = int(rate_estimate * mode.throughput_seconds)
            count = min(max(count, mode.batch_min), mode.batch_max)
        else:  # smoke: no warm-up, a fixed tiny batch
            count = mode.batch_min
        tp = self.throughput(shape, graph, count)
        rate = tp.workflows_per_s * LATENCY_LOAD
        seconds = min(
            max(mode.latency_seconds, mode.latency_min_samples / rate), mode.latency_max_seconds
        )
        lat = self.latency(
            shape, graph, rate, max(int(rate * seconds), mode.latency_min_samples), "latency"
        )
        # Unloaded: far apart, so each workflow has the workers (nearly) to itself.
        idle_rate = min(max(IDLE_FRACTION * tp.workflows_per_s, IDLE_RATE[0]), IDLE_RATE[1])
        idle = self.latency(shape, graph, idle_rate, mode.idle_samples, "idle")
        return WorkflowResult(
            shape.name,
            shape.description,
            shape.steps,
            self.workers.processes,
            self.workers.concurrency,
            tp,
            lat,
            idle,
            self.workers.delay_ms,
        )

    # -- trigger1 ----------------------------------------------------------------------------

    def insert_paced(
        self, label: str, rows_per_s: float, seconds: float
    ) -> tuple[int, float, list[float]]:
        """Insert rows into bench_docs at ``rows_per_s`` for ``seconds``, TRIGGER_ROWS_PER_INSERT
        rows per statement (its own transaction), from TRIGGER_CLIENTS connections on an
        open-loop schedule; returns (rows, seconds, each statement's round trip in ms)."""
        per_s = rows_per_s / TRIGGER_ROWS_PER_INSERT
        lock = threading.Lock()
        latencies: list[float] = []
        last_end = [0.0]

        def insert_rows(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO bench_docs(label, body)"
                " SELECT %s, 'document ' || g FROM generate_series(1, %s) g",
                (label, TRIGGER_ROWS_PER_INSERT),
            )

        def insert(conn: psycopg.Connection[Any]) -> None:
            began = time.perf_counter()
            insert_rows(conn)
            took = time.perf_counter() - began
            with lock:
                latencies.append(1000 * took)
                last_end[0] = max(last_end[0], time.monotonic())

        count = max(1, round(per_s * seconds))
        t0 = self._open_loop(
            TRIGGER_CLIENTS,
            count,
            per_s,
            insert,
            "inserting",
            seconds * TRIGGER_OVERRUN,
            warm=insert_rows,  # rolled back: neither a row nor a latency of the schedule
        )
        if self.stop.is_set():
            raise KeyboardInterrupt
        return len(latencies) * TRIGGER_ROWS_PER_INSERT, max(last_end[0], t0) - t0, latencies

    def _backlog(self, conn: psycopg.Connection[Any], prefix: str) -> tuple[int, dt.datetime]:
        """Workflows of this scenario not completed yet, and the server's clock."""
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status <> 'completed'),"
            "       count(*) FILTER (WHERE status IN ('failed', 'cancelled')),"
            "       min(label) FILTER (WHERE status IN ('failed', 'cancelled')),"
            "       clock_timestamp()"
            "  FROM df.instances WHERE starts_with(label, %s)",
            (prefix,),
        ).fetchone()
        assert row is not None
        if row[1]:
            raise BenchError(f"{row[1]} trigger1 workflow(s) failed: {self._why(str(row[2]))}")
        return int(row[0]), row[3]

    def trigger_scenario(self, shape: Shape, mode: Mode, rates: list[float]) -> TriggerResult:
        graph = build_graph(self.server, shape)
        self.server.install_trigger(graph)
        prefix = self.prefix(shape) + "-"
        # Warm-up: connections, caches, and a check that each row's workflow wrote its id.
        label = self.label(shape, "warmup")
        seconds = min(mode.trigger_seconds, 2.0)
        rows, _, _ = self.insert_paced(label, mode.trigger_warmup_rows / seconds, seconds)
        self.wait_done(label, rows)
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM bench_docs d JOIN bench_effects e ON e.v = d.id"
                " WHERE d.label = %s",
                (label,),
            ).fetchone()
        if not row or row[0] != rows:
            raise BenchError(f"trigger1: {rows} rows inserted, {row and row[0]} effects written")
        steps: list[TriggerStep] = []
        with psycopg.connect(self.server.admin_dsn, autocommit=True) as conn:
            for rate in rates:
                label = self.label(shape, f"r{rate:g}")
                backlog0, at0 = self._backlog(conn, prefix)
                meter = CpuMeter(
                    self.server.postmaster_pid, self.workers.pids, self.workers.proxy_pids
                )
                rows, seconds, latencies = self.insert_paced(label, rate, mode.trigger_seconds)
                backlog1, at1 = self._backlog(conn, prefix)
                cpu = meter.stop()
                self.workers.check()
                done = conn.execute(
                    "SELECT count(*) FROM df.instances WHERE starts_with(label, %s)"
                    "   AND completed_at >= %s AND completed_at < %s",
                    (prefix, at0, at1),
                ).fetchone()
                assert done is not None
                window = (at1 - at0).total_seconds()
                inserted_per_s = rows / seconds if seconds > 0 else 0.0
                allowance = TRIGGER_KEEP_UP * rows + TRIGGER_IN_FLIGHT * inserted_per_s
                latencies.sort()
                steps.append(
                    TriggerStep(
                        target_rows_per_s=rate,
                        seconds=round(seconds, 3),
                        rows=rows,
                        insert_rows_per_s=inserted_per_s,
                        insert_p50_ms=_quantile(latencies, 0.5),
                        insert_p99_ms=_quantile(latencies, 0.99),
                        insert_max_ms=latencies[-1] if latencies else 0.0,
                        completed=int(done[0]),
                        completed_per_s=int(done[0]) / window if window > 0 else 0.0,
                        backlog_start=backlog0,
                        backlog_end=backlog1,
                        keeps_up=backlog1 - backlog0 <= allowance,
                        machine_busy_pct=cpu["busy_pct"],
                        other_busy_pct=cpu["other_pct"],
                        worker_runqueue_pct=cpu["runqueue_pct"],
                    )
                )
        # No waiting for the backlog: it can be minutes of work, and the next scenario starts
        # from emptied tables anyway.
        return TriggerResult(
            shape.name,
            shape.description,
            self.workers.processes,
            self.workers.concurrency,
            TRIGGER_ROWS_PER_INSERT,
            TRIGGER_CLIENTS,
            mode.trigger_warmup_rows,
            steps,
            self.workers.delay_ms,
        )


def _quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank); 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def _run_threads(target: Any, n: int) -> None:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- output ----------------------------------------------------------------------------------


def print_report(report: Report) -> None:
    meta = report.meta
    m = meta["machine"]
    console.print()
    console.print(
        f"[bold]pgdurable benchmark[/] ({meta['mode']}) {meta['date']}  "
        f"pgdurable {meta['pgdurable']['version']} @ {meta['pgdurable']['git']}",
        highlight=False,
    )
    console.print(
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gb']} GB, {m['platform']}; "
        f"load average at start {m['load_avg_at_start']}, "
        f"busy before start {m['busy_before_start_pct']}%",
        highlight=False,
    )
    console.print(f"server: {meta['postgres']['version']}", highlight=False)
    settings = ", ".join(f"{k}={v}" for k, v in meta["postgres"]["settings"].items())
    console.print(f"settings: {settings}", highlight=False)
    console.print(f"method: {meta['method']['summary']}", highlight=False)

    best = max((p.tps for p in report.pgbench), default=0.0)
    base = Table(title="PostgreSQL baseline: pgbench, one INSERT per transaction")
    for col in (
        "clients",
        "threads",
        "seconds",
        "commits/s (tps)",
        "latency avg ms",
        "CPU ms postgres / commit",
        "WAL bytes / commit",
        "machine busy",
    ):
        base.add_column(col, justify="right")
    for p in report.pgbench:
        base.add_row(
            str(p.clients),
            str(p.threads),
            str(p.seconds),
            f"{p.tps:,.0f}",
            f"{p.latency_avg_ms:.2f}",
            f"{p.cpu_ms_postgres_per_tx:.3f}",
            f"{p.wal_bytes_per_tx:.0f}",
            f"{p.machine_busy_pct:.0f}%",
        )
    console.print(base)
    if report.workflows:
        _print_workflows(report, best)
    if report.triggers:
        _print_triggers(report)


def _print_workflows(report: Report, best: float) -> None:
    delayed = any(w.delay_ms is not None for w in report.workflows)
    main = Table(
        title="Workflows: throughput (batch) and start-to-finish latency "
        f"(paced at {LATENCY_LOAD:.0%} of throughput, own transaction each; idle: "
        f"{IDLE_RATE[0]:.0f}-{IDLE_RATE[1]:.0f}/s)"
    )
    main.add_column("workflow")
    if delayed:
        main.add_column("workers' network")
    main.add_column("worker procs × conc.", justify="right")
    main.add_column("batch", justify="right")
    main.add_column("workflows/s", justify="right")
    main.add_column("SQL steps/s", justify="right")
    main.add_column("steps/s vs best pgbench", justify="right")
    main.add_column("paced at /s", justify="right")
    main.add_column("p50 ms", justify="right")
    main.add_column("p99 ms", justify="right")
    main.add_column("idle p50 ms", justify="right")
    for w in report.workflows:
        t, lat = w.throughput, w.latency
        main.add_row(
            w.shape,
            *([network_name(w.delay_ms)] if delayed else []),
            f"{w.worker_processes} × {w.concurrency}",
            str(t.workflows),
            f"{t.workflows_per_s:,.1f}",
            f"{t.steps_per_s:,.0f}",
            f"{100 * t.steps_per_s / best:.1f}%" if best else "-",
            f"{lat.achieved_rate_per_s:,.1f}",
            f"{lat.p50_ms:,.1f}",
            f"{lat.p99_ms:,.1f}",
            f"{w.latency_idle.p50_ms:,.1f}",
        )
    console.print(main)

    cost = Table(title="Cost per workflow during the throughput batch")
    for col in (
        "workflow",
        "worker procs",
        "write xacts",
        "WAL kB",
        "CPU ms workers",
        "CPU ms postgres",
        "CPU ms client",
        "machine busy (other)",
        "workers wait for CPU",
        "submit s / total s",
    ):
        cost.add_column(col, justify="right")
    stats = any(w.throughput.cost.statements is not None for w in report.workflows)
    if stats:
        cost.add_column("statements", justify="right")
    if delayed:
        cost.add_column("CPU ms proxy", justify="right")
    for w in report.workflows:
        c = w.throughput.cost
        row = [
            w.shape + ("" if w.delay_ms is None else f" +{w.delay_ms:g}ms"),
            str(w.worker_processes),
            f"{c.write_xacts:.1f}",
            f"{c.wal_bytes / 1024:.1f}",
            f"{c.cpu_ms_workers:.2f}",
            f"{c.cpu_ms_postgres:.2f}",
            f"{c.cpu_ms_client:.2f}",
            f"{c.machine_busy_pct:.0f}% ({c.other_busy_pct:.0f}%)",
            f"{c.worker_runqueue_pct:.0f}%",
            f"{w.throughput.submit_seconds:.1f} / {w.throughput.seconds:.1f}",
        ]
        if stats:
            row.append(f"{c.statements:.1f}" if c.statements is not None else "-")
        if delayed:
            row.append(f"{c.cpu_ms_proxy:.2f}" if c.cpu_ms_proxy is not None else "-")
        cost.add_row(*row)
    console.print(cost)
    console.print(
        "machine busy (other): the share of all cores in use, and in brackets the part not "
        "used by the bench's own processes (kernel I/O threads and interrupts caused by the "
        "fsyncs, or other users of a shared machine):",
        highlight=False,
    )
    for w in report.workflows:
        c = w.throughput.cost
        console.print(
            f"  {w.shape} on {w.worker_processes} ({network_name(w.delay_ms)}): "
            f"{c.other_busy_pct:.0f}% ({', '.join(c.other_top) or 'no single process'})",
            highlight=False,
        )
    if delayed:
        net = report.meta.get("network", {})
        rtt = ", ".join(f"{k.removesuffix('_select1')} {v['p50_ms']:.2f}" for k, v in net.items())
        console.print(
            f"workers' network: SELECT 1 round trip p50 (ms): {rtt}. Throughput kept behind "
            "the proxy (target for sql1 with 1 ms: >= 50%):",
            highlight=False,
        )
        figures = report.figures()
        for w in report.workflows:
            key = f"{w.shape}_w{w.worker_processes}{delay_key(w.delay_ms)}_vs_loopback"
            if key in figures:
                console.print(
                    f"  {w.shape} on {w.worker_processes}, +{w.delay_ms:g} ms: "
                    f"{w.throughput.workflows_per_s:,.1f} workflows/s = {figures[key]:.0%} of "
                    "loopback",
                    highlight=False,
                )


def _print_triggers(report: Report) -> None:
    t0 = report.triggers[0]
    table = Table(
        title=f"trigger1: rows inserted at a set rate, {t0.rows_per_insert} per INSERT "
        f"(own transaction), from {t0.clients} connections; an AFTER INSERT trigger starts a "
        "one-step workflow per row"
    )
    for col in (
        "procs × conc.",
        "network",
        "target rows/s",
        "inserted rows/s",
        "INSERT p50 ms",
        "INSERT p99 ms",
        "completed/s",
        "backlog start → end",
        "keeps up",
        "machine busy (other)",
        "workers wait for CPU",
    ):
        table.add_column(col, justify="right")
    for t in report.triggers:
        for s in t.steps:
            table.add_row(
                f"{t.worker_processes} × {t.concurrency}",
                network_name(t.delay_ms),
                f"{s.target_rows_per_s:,.0f}",
                f"{s.insert_rows_per_s:,.0f}",
                f"{s.insert_p50_ms:,.1f}",
                f"{s.insert_p99_ms:,.1f}",
                f"{s.completed_per_s:,.0f}",
                f"{s.backlog_start:,} → {s.backlog_end:,}",
                "yes" if s.keeps_up else "no",
                f"{s.machine_busy_pct:.0f}% ({s.other_busy_pct:.0f}%)",
                f"{s.worker_runqueue_pct:.0f}%",
            )
    console.print(table)
    for t in report.triggers:
        console.print(
            f"  trigger1 on {t.worker_processes} ({network_name(t.delay_ms)}): highest insert "
            f"rate whose workflows kept up: {t.sustained_rows_per_s:,.0f} rows/s "
            "(target: >= 2,000)",
            highlight=False,
        )


def git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# -- main ------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workers(
    server: Server, base: Path, processes: int, concurrency: int, proxy: DelayProxy | None
) -> Iterator[Workers]:
    workers = Workers(server, base, processes, concurrency, proxy)
    try:
        workers.start()
        yield workers
    finally:
        workers.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny workload (~15 s) that checks the bench runs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="where to write the JSON results (default: bench/results/latest.json)",
    )
    parser.add_argument(
        "--workers",
        default="1,4",
        help="worker process counts to run, comma-separated (default: 1,4)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="--concurrency of each worker (default: 16)"
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="workflow shapes to run, comma-separated, of "
        + ", ".join(s.name for s in ALL_SHAPES)
        + " (default: sql1, seq10, join10, trigger1; --smoke: all but trigger1; the call"
        " shapes, Python steps, only when named)",
    )
    parser.add_argument(
        "--trigger-rates",
        default=",".join(f"{r:g}" for r in TRIGGER_RATES),
        help="trigger1: rows/s to insert, stepped up in this order (default: "
        + ",".join(f"{r:g}" for r in TRIGGER_RATES)
        + ")",
    )
    parser.add_argument(
        "--delay-ms",
        default="",
        help="also run each shape with the workers behind a TCP proxy that adds this round "
        "trip (ms; half each way), comma-separated for several, e.g. 1 or 0,1 (0: the proxy's "
        "own cost); next to the loopback run, in the same run",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="load pg_stat_statements and report statements (round trips) per workflow; "
        "costs some throughput, so not for headline figures",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    args = parser.parse_args(argv)

    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    processes = [int(x) for x in args.workers.split(",") if x.strip()]
    defaults = [s.name for s in ([*SHAPES, TRIGGER_SHAPE] if mode.trigger_by_default else SHAPES)]
    names = [n.strip() for n in (args.shapes or ",".join(defaults)).split(",")]
    unknown = [n for n in names if n and n not in {s.name for s in ALL_SHAPES}]
    if unknown:
        parser.error(f"unknown shape(s): {', '.join(unknown)}")
    shapes = [s for name in names for s in ALL_SHAPES if s.name == name]
    try:
        rates = [float(x) for x in args.trigger_rates.split(",") if x.strip()]
        delays = [float(x) for x in args.delay_ms.split(",") if x.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if not shapes or not processes or (TRIGGER_SHAPE in shapes and not rates):
        parser.error("nothing to run")
    if any(r <= 0 for r in rates) or any(d < 0 for d in delays):
        parser.error("rates must be > 0 and delays >= 0")

    # Ctrl-C and SIGTERM both end the run cleanly (even when started in the background, where
    # the shell ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stop = threading.Event()
    base = Path(tempfile.mkdtemp(prefix="pgdurable-bench-"))
    server = Server(base)
    if args.statements:
        server.pg.settings["shared_preload_libraries"] = "'pg_stat_statements'"
        server.pg.settings["pg_stat_statements.track_utility"] = "on"
        server.pg.settings["pg_stat_statements.track"] = "all"
        server.pg.settings["pg_stat_statements.track_planning"] = "on"
    proxies: dict[float, DelayProxy] = {}
    failed = True
    began = time.monotonic()
    try:
        idle_busy = busy_elsewhere(0.3 if args.smoke else 1.0)
        if idle_busy > 10:
            console.print(
                f"[yellow]warning:[/] the machine is already {idle_busy:.0f}% busy; "
                "figures will be lower and noisier than on an idle machine",
                highlight=False,
            )
        console.print(f"starting PostgreSQL in {base} ...", highlight=False)
        server.start()
        if args.statements:
            with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        network: dict[str, Any] = {"loopback_select1": round_trip_ms(server.admin_dsn)}
        for ms in delays:
            proxies[ms] = DelayProxy(server, base, ms)
            proxies[ms].start()
            network[f"proxy_{ms:g}ms_select1"] = round_trip_ms(proxies[ms].dsn(DATABASE))
        report = Report(
            meta={
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "mode": mode.name,
                "machine": {**machine_info(), "busy_before_start_pct": round(idle_busy, 1)},
                "postgres": server.describe(),
                "pgdurable": {"version": __version__, "git": git_describe()},
                "workers": {"processes": processes, "concurrency": args.concurrency},
                "statements": args.statements,
                "shapes": [s.name for s in shapes],
                "delay_ms": delays,
                # SELECT 1 round trips (ms) on a connection straight to PostgreSQL and through
                # each proxy: what the workers' connections actually see.
                "network": network,
                "method": {
                    "summary": (
                        f"throughput: a batch submitted by {SUBMIT_CLIENTS} connections, "
                        f"{SUBMIT_CHUNK} df.start per transaction, timed from the first "
                        "created_at to the last completed_at; latency: completed_at - "
                        f"created_at, one df.start per transaction at {LATENCY_LOAD:.0%} of "
                        "the measured throughput"
                    ),
                    "step_sql": STEP_SQL.format(n="<step number>"),
                    "pgbench_script": PGBENCH_SQL.strip(),
                    "submit_clients": SUBMIT_CLIENTS,
                    "submit_chunk": SUBMIT_CHUNK,
                    "latency_load": LATENCY_LOAD,
                    "mode": asdict(mode),
                    "trigger1": {
                        "summary": (
                            f"rows inserted into bench_docs by {TRIGGER_CLIENTS} connections, "
                            f"{TRIGGER_ROWS_PER_INSERT} rows per INSERT (its own transaction), "
                            "open loop at each rate for "
                            f"{mode.trigger_seconds:g} s; an AFTER INSERT FOR EACH ROW trigger "
                            "calls df.start per row; completed/s over the same window (server "
                            "clock); backlog: workflows not completed at the window's ends"
                        ),
                        "step_sql": TRIGGER_STEP_SQL,
                        "rates": rates,
                        "keeps_up": (
                            f"backlog growth <= {TRIGGER_KEEP_UP:g} x rows inserted + "
                            f"{TRIGGER_IN_FLIGHT:g} s of inserts"
                        ),
                    },
                    "delay_proxy": (
                        "bench/delayproxy.py: a TCP proxy in its own process between the "
                        "workers and PostgreSQL, holding each chunk back half the delay in "
                        "each direction; its CPU competes with the measurement (cpu_ms_proxy)"
                    ),
                },
            }
        )
        for clients in mode.pgbench_clients:
            console.print(f"pgbench: {clients} client(s), {mode.pgbench_seconds} s ...")
            report.pgbench.append(run_pgbench(server, base, clients, mode.pgbench_seconds))
        for n in processes:
            for shape in shapes:
                # The delayed runs right after the loopback one: comparable machine load.
                for delay in [None, *delays]:
                    console.print(
                        f"{shape.name}: {n} worker process(es), concurrency "
                        f"{args.concurrency}, {network_name(delay)} ...",
                        highlight=False,
                    )
                    started = time.monotonic()
                    server.reset()  # fresh tables for each scenario, and fresh workers
                    proxy = proxies[delay] if delay is not None else None
                    result: WorkflowResult | TriggerResult
                    with _workers(server, base, n, args.concurrency, proxy) as workers:
                        runner = Runner(server, workers, stop, args.statements)
                        if shape is TRIGGER_SHAPE:
                            result = runner.trigger_scenario(shape, mode, rates)
                            report.triggers.append(result)
                        else:
                            result = runner.scenario(shape, mode)
                            report.workflows.append(result)
                    result.elapsed_seconds = round(time.monotonic() - started, 1)
        report.meta["elapsed_seconds"] = round(time.monotonic() - began, 1)
        print_report(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        console.print(f"wrote {args.out} ({report.meta['elapsed_seconds']} s)", highlight=False)
        failed = False
        return 0
    except KeyboardInterrupt:
        console.print("interrupted; stopping")
        failed = False  # nothing to look into: clean up
        return 130
    except BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}", highlight=False)
        return 1
    finally:
        stop.set()
        for proxy in proxies.values():
            proxy.stop()
        server.stop()
        if args.keep or failed:
            console.print(f"data directory and logs kept in {base}", highlight=False)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
