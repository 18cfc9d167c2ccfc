"""The worker process: claim tasks, run them concurrently, keep leases alive, stop cleanly.

A worker holds no durable state: PostgreSQL holds all of it, so a worker may be killed at any
instruction and another one finishes its work. It claims due tasks in batches with
FOR UPDATE SKIP LOCKED, wakes on NOTIFY and otherwise polls every ``poll_interval``. Leases
are extended while a task runs; a worker that dies stops extending them and another worker
takes the tasks over when they expire. When the database goes away, in-flight tasks are
retried with backoff until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from .. import schema
from ..python_steps import StepDefinition
from . import queries
from .batch import DEFAULT_BATCH_SIZE
from .connections import Connections, is_transient
from .egress import EgressPolicy
from .metrics import MetricsServer, WorkerMetrics
from .queries import AsyncConn, Task
from .results import MAX_RESULT_BYTES_SETTING, parse_size
from .steps import CheckpointBusy, StepRunner, StepSettings
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger("pgdurable.worker")
# What df's triggers send on the cancel channel: "<instance>" or "<instance>:<activation>".
_CANCEL_PAYLOAD = re.compile(r"[0-9a-f]{8}(:[0-9]{1,9})?")

# An internal error (a bug, a poisoned row) on the same task this often fails its instance
# rather than retrying forever.
MAX_TASK_ATTEMPTS = 5
# Idle step connections to the worker's own database are kept this long; to any other
# database only briefly, since an idle session there makes a plain DROP DATABASE fail (it
# waits 5 s for other sessions to leave). Pruned every PRUNE_INTERVAL.
STEP_IDLE_SECONDS = 60.0
OTHER_DATABASE_IDLE_SECONDS = 1.0
PRUNE_INTERVAL = 0.25
POOL_TIMEOUT = 5.0
# A step that loses its connection this often while the server is up fails.
MAX_HEALTHY_RETRIES = 3
# Retention (docs/engine.md#storage-and-retention): the defaults of its settings. pg_durable's
# reconcile_interval default is 3600 s; pgdurable purges every 5 minutes, in smaller bites.
RECONCILE_INTERVAL = 300.0
RETENTION_DAYS = 30
RETENTION_MAX_INSTANCES = 10_000
PURGE_BATCH_SIZE = 500
# Signals (docs/signals.md, "Delivery"): every this often each worker sweeps for waits whose
# signal was committed while nobody listened. An instance locked when its waits were to be
# woken is tried again after SIGNAL_RETRY_DELAY, doubling up to the sweep interval. Beyond
# MAX_SIGNALLED instances notified at once, one sweep does for all of them.
# Every this often each worker gives back the tasks of workers whose session ended
# (df._release_dead_workers): a killed worker's steps run again this soon, not when their
# leases run out.
REAP_INTERVAL = 0.25
SIGNAL_SWEEP_INTERVAL = 3.0
SIGNAL_RETRY_DELAY = 0.1
MAX_SIGNALLED = 10_000


class WorkerError(Exception):
    """A problem the operator must fix before the worker can run (bad DSN, old schema...)."""


@dataclass
class WorkerConfig:
    """How a worker runs. ``poll_interval`` None reads ``pg_durable.poll_interval``,
    ``reconcile_interval`` None ``pg_durable.reconcile_interval`` (seconds; 0: no purges).
    ``role_slots`` caps the slots one role holds at once; the slots are shared fairly between
    roles with work whatever the cap. ``batch_size``: see worker/batch.py."""

    dsn: str
    concurrency: int = 10
    lease_seconds: float = 30.0
    poll_interval: float | None = None
    single_role: bool = False
    shutdown_grace: float = 30.0
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    reconcile_interval: float | None = None
    purge_batch_size: int = PURGE_BATCH_SIZE
    role_slots: int | None = None  # the most slots one role may hold (None: concurrency)
    batch_size: int = DEFAULT_BATCH_SIZE  # the most steps of a role in one transaction
    signal_sweep_interval: float = SIGNAL_SWEEP_INTERVAL
    # The Python steps this worker runs, by name (python_steps.import_steps).
    steps: Mapping[str, StepDefinition] = field(default_factory=dict)
    # Serve Prometheus metrics on this port (None: keep none; worker/metrics.py).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Emit OpenTelemetry traces (worker/tracing.py): to ``tracer_provider`` if given (an SDK
    # TracerProvider), else to one the OTEL_* variables configure.
    trace: bool = False
    tracer_provider: Any = None


def parse_interval(text: str | None, default: float, unit: str = "ms") -> float:
    """A PostgreSQL-style duration ('100ms', '2s', '250' = ``unit``) in seconds."""
    if not text:
        return default
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min)?\s*", text)
    if not match:
        log.warning("ignoring unparsable duration %r, using %ss", text, default)
        return default
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "min": 60.0}[match.group(2) or unit]


@dataclass(frozen=True)
class Retention:
    """Which finished instances a purge removes (docs/engine.md#storage-and-retention)."""

    days: int = RETENTION_DAYS  # finished longer ago than this (0: all of them)
    max_instances: int = RETENTION_MAX_INSTANCES  # and beyond the newest this many (0: no cap)


def _count_setting(text: str | None, name: str, default: int, maximum: int) -> int:
    """A non-negative integer setting; unset or invalid gives ``default`` (invalid: warned)."""
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= maximum:
        log.warning("ignoring %s = %r (want 0 to %d), using %d", name, text, maximum, default)
        return default
    return value


async def read_retention(conn: AsyncConn) -> Retention:
    """``pg_durable.retention_days`` and ``pg_durable.retention_max_instances`` as the worker's
    own session sees them (server configuration, never a user's SET)."""
    days = await queries.setting(conn, "pg_durable.retention_days")
    cap = await queries.setting(conn, "pg_durable.retention_max_instances")
    return Retention(
        days=_count_setting(days, "pg_durable.retention_days", RETENTION_DAYS, 36500),
        max_instances=_count_setting(
            cap, "pg_durable.retention_max_instances", RETENTION_MAX_INSTANCES, 2**31 - 1
        ),
    )


async def read_reconcile_interval(conn: AsyncConn) -> float:
    """``pg_durable.reconcile_interval`` in seconds ('300', '300s', '5min'); 0 disables."""
    text = await queries.setting(conn, "pg_durable.reconcile_interval")
    seconds = parse_interval(text, RECONCILE_INTERVAL, unit="s")
    if seconds > 86400:
        log.warning("ignoring pg_durable.reconcile_interval = %r (want 0 to 86400 s)", text)
        return RECONCILE_INTERVAL
    return seconds


class Worker:
    """One worker process's engine. ``await run()`` until ``request_stop()``."""

    def __init__(self, config: WorkerConfig):
        try:
            conninfo_to_dict(config.dsn)
        except psycopg.ProgrammingError as exc:
            raise WorkerError(f"invalid DSN: {exc}") from None
        self.config = config
        self.id = uuid.uuid4()
        self.conns = Connections(
            config.dsn,
            config.concurrency,
            config.lease_seconds,
            config.single_role,
            idle_seconds=STEP_IDLE_SECONDS,
            other_idle_seconds=OTHER_DATABASE_IDLE_SECONDS,
        )
        self.poll_interval = config.poll_interval or 0.1
        self._runner: StepRunner | None = None
        self._telemetry: Telemetry | None = None
        self._metrics: MetricsServer | None = None
        metrics = tracing = None
        if config.metrics_port is not None:
            metrics = WorkerMetrics(
                self.id, config.concurrency, lambda: len(self._inflight), config.dsn
            )
            self._metrics = MetricsServer(metrics, config.metrics_host, config.metrics_port)
        self._tracer_provider: Any = None  # one this worker made, to flush when it stops
        if config.trace or config.tracer_provider is not None:
            tracing = self._tracing()
        if metrics is not None or tracing is not None:
            self._telemetry = Telemetry(metrics, tracing)
        self._cancels: set[asyncio.Task[int]] = set()  # cancels checking which tasks went
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._roles: dict[int, int] = {}  # task id in flight -> its role's oid
        self._reserved = 0  # slots promised to a claim in flight
        self._backlogged = False  # the last claim found as many due tasks as it asked for
        # Roles with due tasks that nobody holds, as last seen; while other roles wait, a role
        # holding more than its share gives its follow-ups back to the queue.
        self._waiting: set[int] = set()
        self._waiting_checked = 0.0  # when (monotonic) the claim loop last asked
        self._wake = asyncio.Event()
        # Instances whose signals were committed (NOTIFY), for _wake_signal_waits; and when
        # (monotonic) it sweeps next: at once, and whenever the listener (re)connects.
        self._signalled: set[str] = set()
        self._signals_event = asyncio.Event()
        self._sweep_at = 0.0
        # The advisory lock the listening session holds while this worker lives; random, so
        # that no other session holds it by chance (df._worker_epoch.session_lock).
        self._session_lock = secrets.randbits(63)
        self._session_lock_held = False
        self._stopping = asyncio.Event()
        # Set once the background duties must end. They are also cancelled, but a cancel that
        # lands in a pool or connection call may surface as a psycopg error, which their
        # handlers take for a failed round; so each loop checks this as well.
        self._closing = False

    def _tracing(self) -> Tracing:
        """The worker's traces; OpenTelemetry is imported only now."""
        try:
            from . import tracing
        except ImportError as exc:
            raise WorkerError(
                f"tracing needs OpenTelemetry: pip install 'pgdurable[tracing]' ({exc})"
            ) from None
        provider = self.config.tracer_provider
        if provider is None:
            try:
                provider = self._tracer_provider = tracing.provider_from_env()
            except tracing.TracingUnavailable as exc:
                raise WorkerError(f"cannot trace: {exc}") from None
        return tracing.Tracing(provider, self.id)

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; in-flight steps finish (or are released) and run() returns."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Connect, then work until asked to stop."""
        if self._metrics is not None:
            try:
                self._metrics.start()
            except OSError as exc:
                raise WorkerError(f"cannot serve metrics: {exc}") from None
        try:
            await self._run()
        finally:
            if self._metrics is not None:
                self._metrics.stop()
            if self._tracer_provider is not None:  # export what is left
                await asyncio.to_thread(self._tracer_provider.shutdown)

    async def _run(self) -> None:
        await self._connect()
        helpers = [
            asyncio.create_task(self._listen(), name="pgdurable-listen"),
            asyncio.create_task(self._wake_signal_waits(), name="pgdurable-signals"),
            asyncio.create_task(self._heartbeat(), name="pgdurable-heartbeat"),
            asyncio.create_task(self._prune(), name="pgdurable-prune"),
            asyncio.create_task(self._release_dead_workers(), name="pgdurable-reaper"),
            asyncio.create_task(self._retention(), name="pgdurable-retention"),
        ]
        try:
            await self._claim_loop()
        finally:
            await self._drain()
            self._closing = True
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            await self.conns.close()
            log.info("worker %s stopped", self.id)

    async def _connect(self) -> None:
        """Open the worker pool, retrying while the server is unreachable; check the schema."""
        delay = 0.5
        while True:
            try:
                async with await AsyncConnection.connect(
                    self.config.dsn, autocommit=True, connect_timeout=10
                ) as conn:
                    await self._check_schema(conn)
                    settings = await self._read_settings(conn)
                break
            except psycopg.Error as exc:
                if not is_transient(exc):
                    raise WorkerError(f"cannot connect: {_first_line(exc)}") from None
                if self._stopping.is_set():
                    raise WorkerError("stopped before the database became reachable") from None
                log.warning("database unreachable (%s); retrying in %.1fs", _first_line(exc), delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 10.0)
        await self.conns.open()
        self._runner = StepRunner(self.conns, settings, self._busy, self._telemetry)
        async with self.conns.worker.connection() as conn:
            await queries.register_worker(
                conn, self.id, self.config.concurrency, names=sorted(self.config.steps)
            )
        log.info(
            "worker %s ready: concurrency %d, poll every %.0f ms",
            self.id,
            self.config.concurrency,
            self.poll_interval * 1000,
        )

    async def _check_schema(self, conn: AsyncConnection[tuple[object, ...]]) -> None:
        try:
            schema.check(await schema.installed_async(conn), conn.info.dbname)
        except schema.SchemaError as exc:
            raise WorkerError(str(exc)) from None

    async def _read_settings(self, conn: AsyncConnection[tuple[object, ...]]) -> StepSettings:
        # Read from the worker's own session: server configuration, never a user's SET.
        superuser = await queries.setting(conn, "pg_durable.enable_superuser_instances")
        if self.config.poll_interval is None:
            self.poll_interval = parse_interval(
                await queries.setting(conn, "pg_durable.poll_interval"), 0.1
            )
        max_bytes = parse_size(await queries.setting(conn, MAX_RESULT_BYTES_SETTING))
        max_state = parse_size(
            await queries.setting(conn, queries.MAX_STATE_BYTES_SETTING),
            queries.DEFAULT_MAX_STATE_BYTES,
        )
        return StepSettings(
            worker_id=self.id,
            lease_seconds=self.config.lease_seconds,
            allow_superuser=(superuser or "off").lower() in ("on", "true", "yes", "1"),
            single_role=self.config.single_role,
            egress=self.config.egress,
            max_result_bytes=max_bytes,
            max_state_bytes=max_state,
            batch_size=self.config.batch_size,
            steps=self.config.steps,
            continuation_key=await queries.continuation_key(conn),
        )

    # -- claiming ------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        """Slots neither running a task nor promised to a claim in flight."""
        return max(self.config.concurrency - len(self._inflight) - self._reserved, 0)

    def _busy(self) -> bool:
        """Whether there is more work than slots: every slot runs a task, or the last claim
        found as many due tasks as it had slots for. Steps then run in batches
        (worker/batch.py)."""
        return self._backlogged or len(self._inflight) >= self.config.concurrency

    def _held(self) -> dict[int, int]:
        """How many slots each role holds in this worker."""
        return dict(Counter(self._roles.values()))

    def _may_continue(self, role_oid: int) -> bool:
        """Whether a step of ``role_oid`` that just finished may lease its follow-up to its
        own slot: yes, unless other roles wait and this one holds more than its fair share
        (or than its cap). Its follow-up then goes back to the queue, where the claim gives
        the freed slot to the role holding the fewest."""
        held = self._held()
        cap = self.config.role_slots
        if cap is not None and held.get(role_oid, 0) > cap:
            return False
        if not self._waiting - {role_oid}:
            return True
        active = len(set(held) | self._waiting)
        return held.get(role_oid, 0) <= max(1, self.config.concurrency // active)

    async def _check_waiting(self) -> None:
        """While every slot is taken, learn every poll interval which roles wait."""
        if time.monotonic() - self._waiting_checked < self.poll_interval:
            return
        self._waiting_checked = time.monotonic()
        try:
            async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                self._waiting = await queries.waiting_roles(conn, list(self.config.steps))
        except Exception as exc:  # the claim loop's own error handling reports outages
            log.debug("could not read waiting roles: %s", _first_line(exc))

    async def _claim_loop(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            self._wake.clear()
            free = self._free_slots()
            if free:
                self._reserved += free  # checkpoints finishing meanwhile must not take these
                try:
                    # A short pool timeout keeps the loop responsive to stop requests while
                    # the server is down.
                    async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                        tasks = await queries.claim(
                            conn,
                            self.id,
                            free,
                            self.config.lease_seconds,
                            self._held(),
                            self.config.role_slots,
                            list(self.config.steps),
                        )
                    delay = 0.5
                except Exception as exc:
                    if is_transient(exc):
                        log.warning(
                            "database unreachable (%s); retrying in %.1fs",
                            _first_line(exc),
                            delay,
                        )
                    else:  # e.g. a deadlock with an administrator's statement: try again
                        log.error("claiming failed: %r; retrying in %.1fs", exc, delay)
                    await self._sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                finally:
                    self._reserved -= free
                self._backlogged = len(tasks) == free
                if self._telemetry is not None:
                    self._telemetry.claimed(tasks)
                for task in tasks:
                    self._spawn(task)
                if len(tasks) == free:
                    continue  # there may be more: claim again as soon as a slot frees
                self._waiting = set()  # nothing due was left (or what is left is capped)
            else:
                await self._check_waiting()
            await self._sleep(self.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        """Wait for a wake-up (NOTIFY, a freed slot, stop) or ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _spawn(self, task: Task) -> None:
        self._roles[task.id] = task.role_oid
        self._inflight[task.id] = asyncio.create_task(
            self._execute(task), name=f"pgdurable-task-{task.id}"
        )

    async def _execute(self, task: Task) -> None:
        assert self._runner is not None
        followups: list[Task] = []

        def followup_limit() -> int:
            """How many next steps this task's checkpoint may lease to us: one, to take over
            this task's slot, unless we are stopping or other roles should have the slot.
            Never more: a checkpoint may take long (a user's deferred trigger runs at its
            COMMIT), and slots promised to it would be slots nobody can claim meanwhile."""
            if self._stopping.is_set():
                return 0
            return 1 if self._may_continue(task.role_oid) else 0

        # Run the task; after repeated lost connections, record its failure instead.
        attempt: Callable[[], Awaitable[list[Task]]] = partial(
            self._runner.run, task, followup_limit
        )
        delay = 0.1
        healthy_failures = 0
        try:
            while True:
                try:
                    followups = await attempt()
                    break
                except CheckpointBusy as exc:
                    await self._defer(task, exc)
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        await self._internal_error(task, exc)
                        break
                    if self._stopping.is_set():
                        break
                    if await self._server_healthy():
                        # The server is fine, so the step itself loses its connection (it
                        # terminates its own session, or crashes its backend): fail it.
                        healthy_failures += 1
                        if healthy_failures >= MAX_HEALTHY_RETRIES:
                            error = (
                                "SQL execution failed: the step's connection was lost "
                                f"{healthy_failures} times: {_first_line(exc)}"
                            )
                            attempt = partial(self._runner.fail, task, error, followup_limit)
                            continue
                    log.warning(
                        "task %s of %s interrupted (%s); retrying in %.1fs",
                        task.id,
                        task.instance_id,
                        _first_line(exc),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            if self._telemetry is not None:
                self._telemetry.settled(task, followups)
            for followup in followups:
                self._spawn(followup)
            if self._inflight.get(task.id) is asyncio.current_task():
                del self._inflight[task.id]  # not a newer claim of the same task
                del self._roles[task.id]
            if not followups:
                self._wake.set()  # a slot is free; when a next step took it, nothing changed

    async def _defer(self, task: Task, busy: CheckpointBusy) -> None:
        """Give a task whose checkpoint could not get a lock back to the queue, for later."""
        log.info(
            "task %s of %s deferred (%d times before): %s",
            task.id,
            task.instance_id,
            task.deferrals,
            busy,
        )
        try:
            async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                await queries.defer(conn, task)
        except Exception as exc:  # its lease runs out instead
            log.warning("could not defer task %s: %s", task.id, _first_line(exc))

    async def _server_healthy(self) -> bool:
        """Whether the worker's own connection works right now."""
        try:
            async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                await conn.execute("SELECT 1")
        except Exception:
            return False
        return True

    async def _internal_error(self, task: Task, exc: Exception) -> None:
        """A bug or a poisoned row: log it; after repeated attempts fail the instance."""
        log.error(
            "task %s of instance %s failed (attempt %d): %r",
            task.id,
            task.instance_id,
            task.attempts,
            exc,
            exc_info=exc,
        )
        if task.attempts < MAX_TASK_ATTEMPTS or self._runner is None:
            return  # the lease expires and the task is tried again
        try:
            await self._runner.fail(
                task, f"pgdurable internal error: {_first_line(exc)}", lambda: 0
            )
        except Exception:
            log.exception("could not fail instance %s", task.instance_id)

    # -- background duties ---------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake the claim loop, cancel steps or wake signal waits on NOTIFY; reconnect when
        the connection drops."""
        delay = 0.5
        while not self._closing:
            try:
                async with await AsyncConnection.connect(
                    self.config.dsn, autocommit=True, connect_timeout=10
                ) as conn:
                    await conn.execute(f"LISTEN {queries.TASKS_CHANNEL}")
                    await conn.execute(f"LISTEN {queries.CANCEL_CHANNEL}")
                    await conn.execute(f"LISTEN {queries.SIGNALS_CHANNEL}")
                    await self._hold_session_lock(conn)
                    delay = 0.5
                    # Work, and signals, may have arrived while we were not listening.
                    self._wake.set()
                    self._sweep_at = 0.0
                    self._signals_event.set()
                    async for notice in conn.notifies():
                        if notice.channel == queries.CANCEL_CHANNEL:
                            self._cancel(notice.payload)
                        elif notice.channel == queries.SIGNALS_CHANNEL:
                            self._signal_committed(notice.payload)
                        else:
                            self._wake.set()
            except psycopg.Error as exc:
                self._session_lock_held = False
                log.debug("listen connection lost (%s); reconnecting", _first_line(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _hold_session_lock(self, conn: AsyncConn) -> None:
        """Show others, for as long as the listening session lives, that this worker does.

        Registers again first: while the session was away, others may have given this worker
        up for dead and removed its row (and its leases: its steps in flight then find their
        tasks gone, and are run again elsewhere)."""
        await queries.register_worker(
            conn, self.id, self.config.concurrency, names=sorted(self.config.steps)
        )
        self._session_lock_held = await queries.hold_session_lock(conn, self.id, self._session_lock)
        if not self._session_lock_held:
            log.warning(
                "advisory lock %d is taken: should this worker die, its tasks wait for their"
                " leases to run out",
                self._session_lock,
            )

    async def _release_dead_workers(self) -> None:
        """Give back the tasks of workers whose session ended (see REAP_INTERVAL)."""
        while not self._closing:
            await asyncio.sleep(REAP_INTERVAL)
            try:
                async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                    released = await queries.release_dead_workers(conn)
            except Exception as exc:  # an outage: the claim loop reports those
                log.debug("releasing dead workers' tasks failed: %s", _first_line(exc))
                continue
            if released:
                log.info("gave back %d task(s) of workers that died", released)
                if self._telemetry is not None:
                    self._telemetry.released(released)

    def _cancel(self, payload: str) -> None:
        """A NOTIFY on the cancel channel: ``<instance>`` or ``<instance>:<activation>``."""
        if self._runner is None:
            return
        # Any role may NOTIFY on this channel: a payload we did not write is ignored.
        if not _CANCEL_PAYLOAD.fullmatch(payload):
            return
        instance, _, activation = payload.partition(":")
        cancel = asyncio.create_task(
            self._runner.cancel(instance, int(activation) if activation else None)
        )
        self._cancels.add(cancel)
        cancel.add_done_callback(self._cancel_done)

    def _signal_committed(self, payload: str) -> None:
        """A NOTIFY on the signals channel: signals to instance ``payload`` were committed."""
        # Any role may NOTIFY on this channel; waking an instance's waits for nothing is
        # harmless (only those with a signal buffered are woken), but floods are bounded.
        if not 0 < len(payload) <= 8:  # instance ids are varchar(8)
            return
        if len(self._signalled) >= MAX_SIGNALLED:
            self._sweep_at = 0.0
        else:
            self._signalled.add(payload)
        self._signals_event.set()

    async def _wake_signal_waits(self) -> None:
        """Wake the waits of the instances whose signals were committed, a batch per
        transaction; sweep for those nobody was told of (see SIGNAL_SWEEP_INTERVAL). An
        instance that was locked is tried again (signals.sql says why no wake-up is lost)."""
        interval = self.config.signal_sweep_interval
        retry: dict[str, tuple[float, float]] = {}  # instance -> (when to try again, delay)
        while not self._closing:
            now = time.monotonic()
            due = {instance for instance, (at, _) in retry.items() if at <= now}
            sweep = now >= self._sweep_at
            if not (self._signalled or due or sweep):
                next_at = min([self._sweep_at, *(at for at, _ in retry.values())])
                self._signals_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._signals_event.wait(), next_at - now)
                continue
            batch, self._signalled = self._signalled | due, set()
            if sweep:
                self._sweep_at = now + interval
            try:
                async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                    locked: set[str] = set()
                    if batch:
                        locked = set(await queries.wake_signal_waits(conn, sorted(batch)))
                    if sweep:
                        locked |= set(await queries.wake_signal_waits(conn, None))
            except Exception as exc:  # a database outage: the same again, in a moment
                log.warning("waking signal waits failed: %s", _first_line(exc))
                self._signalled |= batch
                if sweep:
                    self._sweep_at = now
                await asyncio.sleep(1.0)
                continue
            for instance in batch - locked:
                retry.pop(instance, None)
            for instance in locked:
                delay = min(retry.get(instance, (0.0, SIGNAL_RETRY_DELAY / 2))[1] * 2, interval)
                retry[instance] = (time.monotonic() + delay, delay)

    def _cancel_done(self, cancel: asyncio.Task[int]) -> None:
        self._cancels.discard(cancel)
        if not cancel.cancelled() and cancel.exception() is not None:
            # The lease, the checkpoint's token check and df.timeout still stop the step.
            log.warning("could not cancel withdrawn steps: %s", cancel.exception())

    async def _heartbeat(self) -> None:
        """Extend leases of in-flight tasks."""
        interval = self.config.lease_seconds / 3
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                    alive = await queries.heartbeat(
                        conn, self.id, list(self._inflight), self.config.lease_seconds
                    )
                    if not alive:  # given up for dead while the listening session was away
                        lock = self._session_lock if self._session_lock_held else None
                        await queries.register_worker(
                            conn, self.id, self.config.concurrency, lock, sorted(self.config.steps)
                        )
            except Exception as exc:
                log.warning("heartbeat failed: %s", _first_line(exc))

    async def _prune(self) -> None:
        """Close step connections nobody used lately (no I/O but closing them)."""
        while not self._closing:
            await asyncio.sleep(PRUNE_INTERVAL)
            try:
                await self.conns.prune()
            except Exception as exc:  # keep pruning: a leftover session blocks DROP DATABASE
                log.warning("closing idle step connections failed: %s", _first_line(exc))

    async def _retention(self) -> None:
        """Every reconcile interval (the first one after start), remove finished instances
        past retention, a batch per transaction. Only one worker purges at a time: the others
        find the purge row locked and skip their pass."""
        interval = self.config.reconcile_interval
        if interval is None:
            try:
                async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                    interval = await read_reconcile_interval(conn)
            except Exception as exc:
                log.warning("could not read pg_durable.reconcile_interval: %s", _first_line(exc))
                interval = RECONCILE_INTERVAL
        if interval <= 0:
            log.info("retention disabled (reconcile interval 0)")
            return
        # No new pass once stopping (see _closing for why not only cancellation).
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)
            if self._stopping.is_set():
                return
            try:
                await self._purge(time.monotonic() + interval)
            except Exception as exc:  # a database outage, a lock timeout: next pass
                log.warning("purging finished instances failed: %s", _first_line(exc))

    async def _purge(self, deadline: float) -> int:
        """One retention pass: batches until there is nothing left to remove, another worker
        is purging, or ``deadline`` (the next pass goes on); returns how many it removed."""
        removed = 0
        async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
            retention = await read_retention(conn)
        while not self._stopping.is_set() and time.monotonic() < deadline:
            # A connection per batch: a long pass does not hold one the claim loop needs.
            async with self.conns.worker.connection(timeout=POOL_TIMEOUT) as conn:
                count = await queries.purge_finished(
                    conn, retention.days, retention.max_instances, self.config.purge_batch_size
                )
            if not count:  # nothing left (0), or another worker is purging (None)
                break
            removed += count
        if removed:
            log.info("removed %d finished instance(s) past retention", removed)
        return removed

    async def _drain(self) -> None:
        """Let in-flight tasks finish within the grace period, then release what is left."""
        if self._inflight:
            log.info("waiting for %d in-flight task(s)", len(self._inflight))
        deadline = time.monotonic() + self.config.shutdown_grace
        # A checkpoint that was already under way may still hand us a next step: wait for
        # those too, until nothing runs or the grace period is over.
        while self._inflight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._inflight.values()), timeout=left)
        pending = list(self._inflight.values())
        for running in pending:
            running.cancel()
        for running in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await running
        try:
            async with self.conns.worker.connection(timeout=5) as conn:
                await queries.release(conn, self.id)
        except Exception as exc:
            log.warning("could not release leases (%s); they expire by themselves", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
