"""A worker's Prometheus metrics (``--metrics-port``; docs/monitoring.md#prometheus-metrics).

The step path only adds to plain Python numbers, in the worker's event loop thread: no lock,
no SQL. They become metric families when /metrics is scraped, in a thread of
prometheus_client's HTTP server, by a collector registered in a registry of the worker's own,
so that several workers in one process (the tests run them in threads) do not clash. The
gauge of ready tasks is queried then, on a connection of the scrapes' own: it costs the steps
nothing, and nothing at all when nobody scrapes.
"""

from __future__ import annotations

import bisect
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__

log = logging.getLogger("pgdurable.worker")

# The kinds of steps: a node type's kind (df.nodes.node_type). The waits are "timer" and
# "signal"; a RETRY's backoff, a TIMEOUT's deadline and a LOOP's pacing are timers of the
# engine's, not steps.
STEP_KINDS = {
    "SQL": "sql",
    "HTTP": "http",
    "HTTP_MULTIPART": "http",
    "CALL": "call",
    "SLEEP": "timer",
    "WAIT_SCHEDULE": "timer",
    "SIGNAL": "signal",
}
KINDS = ("sql", "http", "call", "timer", "signal")
# The steps whose duration is measured: those a worker runs from start to end. A wait's own
# time is spent in the queue, not on a worker.
TIMED_KINDS = ("sql", "http", "call")
# The kinds of df._tasks rows (a start admits an instance, and often runs its first SQL step).
TASK_KINDS = ("start", "sql", "http", "call", "timer", "signal")
# How a lease was lost: it ran out and a claim took the task over, or the worker's session
# ended and df._release_dead_workers gave the task back.
LEASE_EXPIRIES = ("ran_out", "worker_gone")

STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip
CLAIM_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

# Due tasks nobody holds, by kind, and how long the oldest has waited. A held task is due
# only once its lease ran out, and is then waiting too. One index range scan (visible_at).
_READY = """
SELECT kind, count(*), extract(epoch FROM now() - min(visible_at))::float8
  FROM df._tasks WHERE visible_at <= now() GROUP BY kind
"""
_SCRAPE_TIMEOUT_MS = 5000


class Histogram:
    """Observations in buckets, without a lock: observed in one thread only (the worker's
    event loop); a scrape copies the counts, which may lag an observation being made."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is at least ``value``."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as Prometheus wants them."""
        counts = list(self.counts)
        total, cumulative = 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        return cumulative


class WorkerMetrics(Collector):
    """What a worker counts, and the collector that exports it.

    ``leases_held`` says how many tasks the worker holds now (read at scrape time); ``dsn``
    is where the ready tasks are counted at scrape time (None: not counted).
    """

    def __init__(
        self,
        worker_id: uuid.UUID,
        slots: int,
        leases_held: Callable[[], int],
        dsn: str | None,
    ):
        self.worker_id = worker_id
        self.slots = slots
        self.leases_held = leases_held
        self.dsn = dsn
        self.started: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.durations = {kind: Histogram(STEP_BUCKETS) for kind in TIMED_KINDS}
        self.claim_latency = {kind: Histogram(CLAIM_BUCKETS) for kind in TASK_KINDS}
        self.leases_expired: Counter[str] = Counter()
        self.retries = 0
        self.egress_refused = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._conn_lock = threading.Lock()  # scrapes may come at once; the steps never take it

    # -- what the worker calls -------------------------------------------------------------------

    def claimed(self, kind: str, waited: float | None, lease_expired: bool) -> None:
        """A claim leased a task of ``kind`` that was due for ``waited`` seconds."""
        if waited is not None and kind in self.claim_latency:
            self.claim_latency[kind].observe(max(waited, 0.0))
        if lease_expired:
            self.leases_expired["ran_out"] += 1

    def finished(self, kind: str, status: str, seconds: float | None) -> None:
        """A step of ``kind`` ended ``completed`` or ``failed`` (its checkpoint committed),
        ``seconds`` after the worker took it up (None: not measured)."""
        (self.completed if status == "completed" else self.failed)[kind] += 1
        if seconds is not None and kind in self.durations:
            self.durations[kind].observe(seconds)

    # -- the collector ---------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Nothing: the registry then does not call collect() when it is registered (which
        would query the database before the worker runs)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The metric families, as they are now (prometheus_client calls this per scrape)."""
        info = GaugeMetricFamily(
            "pgdurable_worker_info",
            "This worker: its id (df.workers) and version; always 1.",
            labels=["worker_id", "version"],
        )
        info.add_metric([str(self.worker_id), __version__], 1)
        yield info
        yield GaugeMetricFamily(
            "pgdurable_worker_slots",
            "Steps this worker runs at once at most (--concurrency).",
            value=self.slots,
        )
        yield GaugeMetricFamily(
            "pgdurable_leases_held",
            "Tasks leased to this worker now: the steps it runs, and those its checkpoints "
            "handed to it.",
            value=self.leases_held(),
        )
        yield self._counter(
            "pgdurable_steps_started",
            "Steps this worker took up, by kind. A wait (timer, signal) starts when the "
            "checkpoint that queued it commits.",
            self.started,
            KINDS,
        )
        yield self._counter(
            "pgdurable_steps_completed",
            "Steps whose success this worker checkpointed, by kind.",
            self.completed,
            KINDS,
        )
        yield self._counter(
            "pgdurable_steps_failed",
            "Steps whose failure this worker checkpointed, by kind (a failed attempt that "
            "df.retry retries counts too).",
            self.failed,
            KINDS,
        )
        yield self._histogram(
            "pgdurable_step_duration_seconds",
            "Time from this worker taking a step up to its checkpoint's commit, by kind.",
            self.durations,
        )
        yield self._histogram(
            "pgdurable_claim_latency_seconds",
            "Time from a task becoming due (df._tasks.visible_at) to this worker's claim of "
            "it, by task kind. Tasks a checkpoint hands straight to the worker are not "
            "claimed and not counted.",
            self.claim_latency,
        )
        yield self._counter(
            "pgdurable_leases_expired",
            "Tasks whose lease was lost, by reason: ran_out, a lease that ran out (its worker "
            "froze or died unseen), which this worker's claim took over; worker_gone, tasks "
            "of a worker whose session ended, which this worker gave back.",
            self.leases_expired,
            LEASE_EXPIRIES,
            label="reason",
        )
        yield CounterMetricFamily(
            "pgdurable_retries",
            "Attempts of df.retry scheduled after a failed one, by this worker's checkpoints.",
            value=self.retries,
        )
        yield CounterMetricFamily(
            "pgdurable_http_egress_refused",
            "HTTP requests this worker refused by its egress policy (--http-* options).",
            value=self.egress_refused,
        )
        yield from self._ready()

    @staticmethod
    def _counter(
        name: str, text: str, counts: Counter[str], keys: Sequence[str], label: str = "kind"
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, text, labels=[label])
        for key in keys:
            family.add_metric([key], counts[key])
        return family

    @staticmethod
    def _histogram(name: str, text: str, by_kind: dict[str, Histogram]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, text, labels=["kind"])
        for kind, histogram in by_kind.items():
            family.add_metric([kind], histogram.buckets(), histogram.sum)
        return family

    def _ready(self) -> Iterable[Metric]:
        """The gauges of due tasks nobody holds (none if the database does not answer)."""
        if self.dsn is None:
            return
        try:
            rows = self._query_ready()
        except psycopg.Error as exc:
            log.warning("metrics: could not count the ready tasks: %s", exc)
            return
        ready = GaugeMetricFamily(
            "pgdurable_ready_tasks",
            "Tasks due and not held by any worker, waiting for a claim, by kind (for the "
            "whole database: the same on every worker).",
            labels=["kind"],
        )
        counts = {kind: (count, oldest) for kind, count, oldest in rows}
        for kind in TASK_KINDS:
            ready.add_metric([kind], counts.get(kind, (0, 0.0))[0])
        yield ready
        yield GaugeMetricFamily(
            "pgdurable_ready_tasks_oldest_seconds",
            "How long the longest waiting of the ready tasks has been due (0: none waits).",
            value=max((oldest for _, oldest in counts.values()), default=0.0),
        )

    def _query_ready(self) -> list[tuple[str, int, float]]:
        assert self.dsn is not None
        with self._conn_lock:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="pgdurable metrics",
                    options=f"-c statement_timeout={_SCRAPE_TIMEOUT_MS}",
                )
            try:
                return [
                    (str(kind), int(count), float(oldest))
                    for kind, count, oldest in self._conn.execute(_READY).fetchall()
                ]
            except psycopg.Error:
                self._conn.close()  # opened again at the next scrape
                raise

    def close(self) -> None:
        """Close the scrapes' connection."""
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class MetricsServer:
    """The /metrics endpoint of one worker: its registry, served over HTTP in a thread."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int):
        self.metrics = metrics
        self.registry = CollectorRegistry()
        self.registry.register(metrics)
        # The process's CPU, memory and file descriptors: Prometheus' usual process_* metrics.
        ProcessCollector(registry=self.registry)
        self._host, self._port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen (raises OSError when the port is taken)."""
        self._server, self._thread = start_http_server(
            self._port, addr=self._host, registry=self.registry
        )
        log.info("metrics on http://%s:%d/metrics", self._host, self._port)

    def stop(self) -> None:
        """Stop listening and close the scrapes' connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.metrics.close()
