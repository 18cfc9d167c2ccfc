"""Running one claimed task: the effect, then the checkpoint.

SQL steps run on a connection logged in as the submitting role, inside a transaction that
also carries the checkpoint, so the statement takes effect exactly once, even across
crashes (docs/engine.md). Statements PostgreSQL refuses inside a transaction block (VACUUM,
CREATE INDEX CONCURRENTLY, procedures that COMMIT) run on their own first and are
checkpointed after: at-least-once. HTTP steps are at-least-once as well: the request is sent,
then its response is checkpointed. Timers, instance starts, HTTP responses and step failures
are checkpointed on the worker's own connection.

A SQL step of an instance started with ``database => 'other'`` runs in that database, where
the df schema is not: its transaction commits just before the checkpoint, written on the
worker's connection (at least once; see ``_commit_elsewhere``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypedDict

import psycopg
from psycopg.pq import TransactionStatus

from ..core import interpreter, model
from ..core.interpreter import TaskSpec, Transition
from ..core.model import Graph, GraphError
from ..core.state import InstanceState
from ..python_steps import StepContext, StepDefinition
from . import calls, http, queries
from .batch import DEFAULT_BATCH_SIZE, Batches, Checkpointer, Followups, Running, Undone
from .connections import RESET_SESSION, Connections, StepPool, is_transient
from .egress import EgressPolicy
from .queries import AsyncConn, Checkpoint, Task
from .results import DEFAULT_MAX_RESULT_BYTES, MAX_RESULT_BYTES_SETTING, ResultError
from .statement import BEGIN, COMMIT, Query, run_queries, run_statement
from .telemetry import Telemetry

log = logging.getLogger("pgdurable.worker")

# Login refusals that mean "try again later", not "this role cannot log in".
_SERVER_BUSY = (
    "too many clients",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "remaining connection slots are reserved",
)
# SQLSTATEs of statements that cannot run inside a transaction block.
_NEEDS_OWN_TRANSACTION = {"25001", "2D000"}
# df._checkpoint's refusal: the task is no longer ours.
_TAKEN_AWAY = {"PD001"}
# df._checkpoint's answer to a state known from this worker's last checkpoint that was not
# the instance's current one (see Task.known).
_STALE = "PD002"
# The database's clock after a statement, for the interpreter (timers the step's end sets).
_NOW = Query("SELECT extract(epoch FROM clock_timestamp())::float8 AS now")
_GRAPH_CACHE_SIZE = 2048
# A statement under a df.timeout gets a statement_timeout this much past the deadline: the
# timeout's own timer cancels it first; this is the backstop if that cancel is lost.
_DEADLINE_GRACE_SECONDS = 1.0
# A first step run with its start (see _start_with_first_step) that takes longer than this is
# shown as running before it commits.
SHOW_STARTED_AFTER = 0.05
# The function whose EXECUTE privilege an HTTP node's submitter needs (docs/http.md).
_HTTP_FUNCTIONS = {
    "HTTP": ("df.http()", "df.http(text,text,text,jsonb,integer)"),
    "HTTP_MULTIPART": ("df.http_multipart()", "df.http_multipart(text,text,jsonb,jsonb,integer)"),
}


# How a task on the worker's connection turns into a transition (None: not yet).
Decision = Callable[[AsyncConn, Graph, Checkpoint], Awaitable[Transition | None]]


@dataclass(frozen=True)
class _Failed:
    """The first step, run with the start, failed: how (see _start_with_first_step)."""

    activation: int
    error: str
    code: str | None


class _Withdrawn(Exception):
    """The task was withdrawn (cancel, lost RACE) before its statement started."""


class _Stale(Exception):
    """The state a step knew from this worker's last checkpoint was not the instance's
    (df._checkpoint refused it: PD002); the step was rolled back."""


class CheckpointBusy(Exception):
    """The checkpoint gave up waiting for a lock (its lock_timeout): someone -- perhaps the
    instance's owner, in an open transaction -- holds the instance or one of its rows. The
    step was rolled back; the worker gives the task back to the queue for a later try."""


# The engine's functions that take locks with a lock_timeout (schema/engine.sql), as the error
# context names them: schema-qualified, since they run with a search_path without df.
_CHECKPOINT_FUNCTIONS = (
    "PL/pgSQL function df._checkpoint_begin(",
    "PL/pgSQL function df._checkpoint(",
)


def _checkpoint_busy(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is the lock timeout of a checkpoint function, not of the user's SQL.

    The outermost frame of the error's context (its last line) must be the checkpoint
    function itself: the user's own functions may have any name, and appear in the context
    too, but never outermost in the worker's checkpoint statements.
    """
    if exc.sqlstate != "55P03":
        return False
    context = (exc.diag.context if exc.diag else None) or ""
    outermost = context.strip().rsplit("\n", 1)[-1]
    return outermost.startswith(_CHECKPOINT_FUNCTIONS)


async def _cancel_request(conn: AsyncConn) -> None:
    try:
        await conn.cancel_safe()
    except psycopg.Error as exc:  # the statement may be over already; nothing to do
        log.debug("cancel request failed: %s", exc)


class _Limits(TypedDict):
    """The keyword arguments of the interpreter's entry points that come from settings."""

    max_statement_bytes: int


@dataclass(frozen=True)
class StepSettings:
    """What a step runner needs to know about its worker."""

    worker_id: uuid.UUID
    lease_seconds: float
    allow_superuser: bool
    single_role: bool
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    max_state_bytes: int = queries.DEFAULT_MAX_STATE_BYTES  # pg_durable.max_state_bytes
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES  # pg_durable.max_result_bytes
    batch_size: int = DEFAULT_BATCH_SIZE  # the most steps in a batch (batch.py)
    steps: Mapping[str, StepDefinition] = field(default_factory=dict)  # Python steps, by name
    continuation_key: str = ""  # what df.continue_with signs with (df._keys)


class StepRunner:
    """Executes tasks; returns the follow-up tasks their checkpoints leased to this worker."""

    def __init__(
        self,
        conns: Connections,
        settings: StepSettings,
        busy: Callable[[], bool],
        telemetry: Telemetry | None = None,
    ):
        self.conns = conns
        self.settings = settings
        self.telemetry = telemetry  # metrics and traces, if the worker keeps any
        # What every interpreter call needs to know of the worker's settings.
        self._limits = _Limits(max_statement_bytes=settings.max_result_bytes)
        self._graphs: OrderedDict[tuple[str, datetime | None], Graph] = OrderedDict()
        self._statements: dict[int, Running] = {}  # task id -> its statement in flight
        # HTTP requests and Python steps in flight, by task id: a cancel cancels the future.
        self._requests: dict[int, tuple[Task, asyncio.Future[Any]]] = {}
        self._background: set[asyncio.Future[None]] = set()  # see _in_background
        self._sql_running: Counter[str] = Counter()  # instance id -> its SQL steps running
        self._batches = Batches(
            conns, self._statements, settings.max_result_bytes, settings.batch_size, busy
        )

    async def run(self, task: Task, claim_limit: Callable[[], int]) -> list[Task]:
        """Run ``task`` to its checkpoint."""
        if self.telemetry is not None:
            task = self.telemetry.began(task)
        if task.kind == "sql":
            return await self._run_sql(task, claim_limit)
        if task.kind == "http":
            return await self._run_http(task, claim_limit)
        if task.kind == "call":
            return await self._run_call(task, claim_limit)
        if task.kind == "timer":

            async def fire(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
                return interpreter.timer_fired(
                    graph, _state(cp), cp.variables, task.activation, cp.now, **self._limits
                )

            return await self._advance(task, fire, claim_limit)
        if task.kind == "signal":
            return await self._advance(task, self._signal_wait(task), claim_limit)
        if task.kind == "start":
            return await self._start_with_first_step(task, claim_limit)
        if task.kind == "restart":  # df.restart: admitted as a start is, then resumed
            return await self._advance(task, None, claim_limit)
        raise ValueError(f"unknown task kind {task.kind!r}")

    async def fail(
        self,
        task: Task,
        error: str,
        claim_limit: Callable[[], int],
        code: str | None = None,
    ) -> list[Task]:
        """Record that ``task``'s step failed with ``error`` (``code``: its class, for
        df.retry: a SQLSTATE or an ``http_*`` class)."""

        async def failed(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
            # The instance never started (its start task failed), or its restart failed: it
            # keeps the state it has, to be restarted again.
            if cp.state is None or task.kind == "restart":
                return interpreter.fail_instance(cp.state, error)
            return interpreter.step_failed(
                graph,
                _state(cp),
                cp.variables,
                task.activation,
                error,
                cp.now,
                code,
                **self._limits,
            )

        return await self._advance(task, failed, claim_limit)

    # -- SQL steps -----------------------------------------------------------------------------

    async def _run_sql(self, task: Task, claim_limit: Callable[[], int]) -> list[Task]:
        """Statement and checkpoint in one transaction, in two pipelined round trips:
        [BEGIN, statement, checkpoint_begin] then [checkpoint, session reset, COMMIT]. A task
        whose state is known (Task.known) asks only for the time instead of checkpoint_begin;
        should that state prove old, the step runs again the usual way. Such a step may run
        in a batch with others of its role (batch.py)."""
        self._sql_running[task.instance_id] += 1
        try:
            if self._batchable(task):
                sql = str((task.payload or {}).get("sql", ""))
                graph = await self._graph(task)
                lock = None
                if task.known is None:
                    lock = Query(queries.CHECKPOINT_BEGIN, queries.checkpoint_begin_params(task))
                checkpoint = self._checkpoint_in_batch(task, graph, claim_limit)
                followups = await self._batches.run(task, sql, lock, checkpoint)
                if followups is not None:
                    return followups
            try:
                return await self._run_sql_once(task, claim_limit)
            except _Stale:
                log.warning(
                    "the state of %s known for task %s was not current; the step runs again",
                    task.instance_id,
                    task.id,
                )
                return await self._run_sql_once(dataclasses.replace(task, known=None), claim_limit)
        finally:
            self._sql_running[task.instance_id] -= 1
            if not self._sql_running[task.instance_id]:
                del self._sql_running[task.instance_id]

    def _batchable(self, task: Task) -> bool:
        """Whether ``task`` may run in a batch (batch.py): a step in our database without a
        deadline, whose state is known or whose instance runs no other SQL step here. Steps
        of one instance (a JOIN's branches) would wait for each other's instance lock, held
        by a batch until it commits all of its steps, longer than by a step alone."""
        return (
            "deadline" not in (task.payload or {})
            and self.conns.is_own_database(task.database)
            and (task.known is not None or self._sql_running[task.instance_id] == 1)
        )

    def _checkpoint_in_batch(
        self, task: Task, graph: Graph, claim_limit: Callable[[], int]
    ) -> Checkpointer:
        """The checkpoint of a step once its statement ran in a batch: from the state it
        knows (Task.known), or from what df._checkpoint_begin locked and read."""
        known = task.known

        def checkpoint(
            result: str, now: float, locked: list[dict[str, Any]]
        ) -> tuple[list[Query], Followups]:
            if known is not None:
                state, variables, version = known.state, known.variables, known.version
            else:
                cp = queries.checkpoint_from_row(locked[0] if locked else None)
                if cp is None or not cp.role_exists:
                    raise Undone(f"task {task.id} was taken away, or its role dropped")
                if not interpreter.covers(graph, cp.state):
                    raise Undone(f"the graph of {task.instance_id} grew since it was read")
                state, variables, now, version = _state(cp), cp.variables, cp.now, None
            transition = interpreter.step_succeeded(
                graph, state, variables, task.activation, result, now, **self._limits,
                continue_with=self._continuation(task, result),
            )  # fmt: skip
            params = self._checkpoint_params(task, transition, claim_limit(), version)
            return [Query(queries.CHECKPOINT, params)], partial(
                self._followups, task=task, transition=transition, variables=variables
            )

        return checkpoint

    async def _run_sql_once(self, task: Task, claim_limit: Callable[[], int]) -> list[Task]:
        graph = await self._graph(task)
        sql = str((task.payload or {}).get("sql", ""))
        pool = self.conns.step_pool(task.role, task.role_oid, task.database)
        elsewhere = not self.conns.is_own_database(task.database)
        self._statements[task.id] = Running(task)  # so a cancel meanwhile is not missed
        try:
            conn = await pool.acquire()
        except psycopg.Error as exc:
            self._statements.pop(task.id, None)
            error = await self._login_failure(task, exc)
            if error is None:
                raise
            return await self.fail(task, error, claim_limit)
        except BaseException:
            self._statements.pop(task.id, None)
            raise
        reusable, clean = False, False
        try:
            try:
                result, cp = await self._run_statement(conn, task, sql, not elsewhere)
            except _Withdrawn:
                reusable, clean = True, True  # nothing was sent
                return []
            except psycopg.Error as exc:
                if is_transient(exc):
                    await pool.drop_idle()
                    raise
                await conn.execute("ROLLBACK")
                reusable = True
                if _checkpoint_busy(exc):
                    raise CheckpointBusy(_message(exc)) from None
                if exc.sqlstate in _NEEDS_OWN_TRANSACTION:
                    return await self._run_sql_outside_transaction(
                        conn, graph, task, sql, claim_limit, elsewhere
                    )
                return await self.fail(task, _sql_error(exc), claim_limit, exc.sqlstate)
            except (ResultError, UnicodeEncodeError) as exc:
                # A result past the size limit closed the connection: its transaction is gone.
                if not conn.closed:
                    await conn.execute("ROLLBACK")
                reusable = not conn.closed
                return await self.fail(task, str(exc), claim_limit)
            graph_next = self._continuation(task, result)
            if elsewhere:
                followups, clean = await self._commit_elsewhere(
                    conn, graph, task, result, claim_limit, graph_next
                )
            else:
                version = task.known.version if task.known is not None else None
                followups, clean = await self._commit_step(
                    conn, graph, task, result, cp, claim_limit, version, graph_next
                )
            reusable = True
            return followups
        finally:
            await pool.release(conn, reusable, clean)

    async def _run_statement(
        self, conn: AsyncConn, task: Task, sql: str, checkpoint: bool = True
    ) -> tuple[str, Checkpoint | None]:
        """The first round trip of a step: BEGIN, the statement, df._checkpoint_begin (unless
        not ``checkpoint``: the step runs in a database without the df schema; or the state is
        known: STEP_FACTS).

        While it runs, ``cancel`` may interrupt it. Before the connection is used again, any
        cancel request sent meanwhile must have reached the server, so that it cannot hit
        a later statement on this connection instead (the server ignores a cancel that
        arrives while it waits for the next command).
        """
        deadline = (task.payload or {}).get("deadline")
        after = None
        if checkpoint and task.known is not None:
            after = Query(queries.STEP_FACTS, (task.role_oid,))
        elif checkpoint:
            after = Query(queries.CHECKPOINT_BEGIN, queries.checkpoint_begin_params(task))
        result, rows = await self._statement(conn, task, sql, deadline, [BEGIN], after)
        if not checkpoint:
            return result, None
        if task.known is not None:
            return result, queries.checkpoint_of_known(task.known, rows[0])
        return result, queries.checkpoint_from_row(rows[0] if rows else None)

    async def _statement(
        self,
        conn: AsyncConn,
        task: Task,
        sql: str,
        deadline: Any,
        before: list[Query],
        after: Query | None,
    ) -> tuple[str, list[dict[str, Any]]]:
        """``before``, the statement of ``task`` (under ``deadline``'s statement_timeout
        backstop, if any) and ``after``, in one round trip; the statement's result is read as
        it arrives, up to the size limit. See _run_statement for cancels meanwhile."""
        running = self._statements.setdefault(task.id, Running(task))
        running.conn = conn
        try:
            if running.cancel_early:
                raise _Withdrawn()
            statement = sql.encode(conn.info.encoding)
            if deadline is not None:
                limit = float(deadline) + _DEADLINE_GRACE_SECONDS
                before = [*before, Query(queries.LIMIT_STATEMENT, (limit,))]
            began = time.monotonic()
            answer = await run_statement(
                conn, statement, self.settings.max_result_bytes, before, after
            )
            self._batches.record(task, time.monotonic() - began)
            return answer
        finally:
            if self._statements.get(task.id) is running:
                del self._statements[task.id]
            if running.cancelling is not None:
                await asyncio.wait([running.cancelling])

    async def cancel(self, instance_id: str, activation: int | None = None) -> int:
        """Interrupt the statements and requests in flight of an instance (or of one of its
        activations) whose tasks were withdrawn: a cancelled instance, a RACE loser, an
        expired df.timeout. Their checkpoints then find the task gone. Returns how many were
        interrupted.

        The cancel channel's NOTIFY only says where to look: any role may send one. So only
        tasks that really left df._tasks (or were claimed again, with another token) are
        interrupted.
        """

        def wanted(task: Task) -> bool:
            return task.instance_id == instance_id and (
                activation is None or task.activation == activation
            )

        candidates = [t for t, _ in self._requests.values() if wanted(t)]
        candidates += [r.task for r in self._statements.values() if wanted(r.task)]
        if not candidates:
            return 0
        held = await queries.tasks_still_held(self.conns.worker, candidates)
        count = 0
        for request_task, request in list(self._requests.values()):
            if wanted(request_task) and request_task.id not in held:
                count += request.cancel()
        for running in list(self._statements.values()):
            task = running.task
            if not wanted(task) or task.id in held or running.cancelling is not None:
                continue
            if running.conn is None:  # still logging in: do not start at all
                running.cancel_early = True
            else:
                running.cancelling = asyncio.ensure_future(_cancel_request(running.conn))
            count += 1
        if count:
            log.info("cancelling %d step(s) of instance %s", count, instance_id)
        return count

    async def _login_failure(self, task: Task, exc: psycopg.Error) -> str | None:
        """Why the step's role could not log in, or None if the server itself is unreachable.

        libpq reports a refused login without a SQLSTATE, so the worker asks on its own
        connection: if the server answers, the failure belongs to the step (a dropped role, a
        missing database, a role without LOGIN or password) and fails it.
        """
        text = _message(exc)
        if (exc.sqlstate and is_transient(exc)) or any(m in text for m in _SERVER_BUSY):
            return None
        try:
            async with self.conns.worker.connection() as conn:
                cur = await conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM df.instances i JOIN pg_roles r"
                    " ON r.oid = i.submitted_by WHERE i.id = %s)",
                    (task.instance_id,),
                )
                row = await cur.fetchone()
        except psycopg.Error:
            return None
        if row is not None and not row[0]:
            return f"Instance {task.instance_id}: submitted_by role no longer exists in pg_roles"
        # The server answers now, but it may just have come back: log in again to find out.
        pool = self.conns.step_pool(task.role, task.role_oid, task.database)
        try:
            await pool.release(await pool.acquire(), True, False)
            return None  # it was the server, not the login: retry the step
        except psycopg.Error as again:
            text = _message(again)
        database = task.database or self.conns.worker_database
        detail = text.split("FATAL:", 1)[-1].strip()
        return f"Failed to connect to database '{database}' as '{task.role}'. Error: {detail}"

    async def _run_sql_outside_transaction(
        self,
        conn: AsyncConn,
        graph: Graph,
        task: Task,
        sql: str,
        claim_limit: Callable[[], int],
        elsewhere: bool = False,
    ) -> list[Task]:
        try:
            statement = sql.encode(conn.info.encoding)
            result, _ = await run_statement(conn, statement, self.settings.max_result_bytes)
        except psycopg.Error as exc:
            if is_transient(exc):
                raise
            return await self.fail(task, _sql_error(exc), claim_limit, exc.sqlstate)
        except (ResultError, UnicodeEncodeError) as exc:
            return await self.fail(task, str(exc), claim_limit)
        if elsewhere:  # no df schema on this connection: checkpoint on the worker's

            async def succeeded(own: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
                return interpreter.step_succeeded(
                    graph, _state(cp), cp.variables, task.activation, result, cp.now,
                    **self._limits, continue_with=self._continuation(task, result),
                )  # fmt: skip

            return await self._advance(task, succeeded, claim_limit)
        await conn.execute(BEGIN.sql)
        try:
            cp = await queries.checkpoint_begin(conn, task)
        except psycopg.Error as exc:
            if is_transient(exc):
                raise
            await conn.execute("ROLLBACK")
            if _checkpoint_busy(exc):
                raise CheckpointBusy(_message(exc)) from None
            raise
        graph_next = self._continuation(task, result)
        followups, _ = await self._commit_step(
            conn, graph, task, result, cp, claim_limit, continue_with=graph_next
        )
        return followups

    async def _commit_step(
        self,
        conn: AsyncConn,
        graph: Graph,
        task: Task,
        result: str,
        cp: Checkpoint | None,
        claim_limit: Callable[[], int],
        version: int | None = None,
        continue_with: Mapping[str, Any] | None = None,
    ) -> tuple[list[Task], bool]:
        """Checkpoint a successful statement in the open transaction and commit both
        (``version``: of the state ``cp`` holds, when it was known rather than locked and read;
        ``continue_with``: the graph the step returned, if any: see _continuation).

        Returns the follow-up tasks, and whether the session was reset in the transaction.
        Rolls back instead when the task is no longer ours (taken over, cancelled, a lost
        RACE) or when the submitting role was dropped meanwhile: a pooled connection may still
        be logged in as a dropped role, and its statement must not count. An error at COMMIT
        (a deferred constraint of the user's) fails the step.
        """
        if cp is None or not cp.role_exists:
            await conn.execute("ROLLBACK")
            if cp is None:
                log.info(
                    "task %s of %s was taken away; step rolled back", task.id, task.instance_id
                )
                return [], False
            error = f"Instance {task.instance_id}: submitted_by role no longer exists in pg_roles"
            return await self.fail(task, error, claim_limit), False
        if not interpreter.covers(graph, cp.state):
            graph = await self._graph(task, reload=True)
        transition = interpreter.step_succeeded(
            graph, _state(cp), cp.variables, task.activation, result, cp.now, **self._limits,
            continue_with=continue_with,
        )  # fmt: skip
        try:
            params = self._checkpoint_params(task, transition, claim_limit(), version)
        except queries.StateTooLarge as exc:
            await conn.execute("ROLLBACK")  # the step does not take effect
            return await self._fail_instance(task, str(exc), claim_limit), False
        try:
            commit = [Query(queries.CHECKPOINT, params), *map(Query, RESET_SESSION), COMMIT]
            rows = (await run_queries(conn, commit))[0]
        except psycopg.Error as exc:
            if is_transient(exc):
                raise
            with contextlib.suppress(psycopg.Error):
                await conn.execute("ROLLBACK")
            if _checkpoint_busy(exc):
                raise CheckpointBusy(_message(exc)) from None
            if exc.sqlstate == _STALE:
                raise _Stale() from None
            # Else the user's own error at COMMIT (a deferred constraint or trigger).
            return await self.fail(task, _sql_error(exc), claim_limit, exc.sqlstate), False
        return self._followups(rows, task, transition, cp.variables), True

    async def _commit_elsewhere(
        self,
        conn: AsyncConn,
        graph: Graph,
        task: Task,
        result: str,
        claim_limit: Callable[[], int],
        continue_with: Mapping[str, Any] | None = None,
    ) -> tuple[list[Task], bool]:
        """Checkpoint a successful statement that ran in another database, and commit both
        (``continue_with``: as for _commit_step).

        No transaction spans two databases (two-phase commit needs max_prepared_transactions,
        off by default and on most managed services), so: the checkpoint is written on the
        worker's connection, holding the instance lock and checking the token; then the step
        commits; then the checkpoint. A task taken away or a role dropped meanwhile still rolls
        the step back, and an error at the step's COMMIT fails it with the checkpoint undone.
        Only a crash or a lost connection between the two commits runs the step again: these
        steps take effect at least once. Returns what ``_commit_step`` returns.
        """
        cp: Checkpoint | None = None
        commit_error: psycopg.Error | None = None
        too_large: queries.StateTooLarge | None = None
        followups: list[Task] = []
        transition: Transition | None = None
        async with (
            self.conns.worker.connection() as own,
            _busy_on_lock_timeout(),
            own.transaction(),
        ):
            cp = await queries.checkpoint_begin(own, task)
            if cp is None or not cp.role_exists:
                await conn.execute("ROLLBACK")
                raise psycopg.Rollback()
            if not interpreter.covers(graph, cp.state):
                graph = await self._graph(task, reload=True)
            transition = interpreter.step_succeeded(
                graph, _state(cp), cp.variables, task.activation, result, cp.now, **self._limits,
                continue_with=continue_with,
            )  # fmt: skip
            try:
                followups = await self._write(own, task, transition, cp.variables, claim_limit())
            except queries.StateTooLarge as exc:
                await conn.execute("ROLLBACK")
                too_large = exc
                raise psycopg.Rollback() from None
            try:
                await conn.execute("COMMIT")
            except psycopg.Error as exc:
                if is_transient(exc):
                    raise  # committed or not, we cannot know: the task is retried
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
                commit_error = exc
                raise psycopg.Rollback() from None
        if cp is None:
            log.info("task %s of %s was taken away; step rolled back", task.id, task.instance_id)
            return [], False
        if not cp.role_exists:
            error = f"Instance {task.instance_id}: submitted_by role no longer exists in pg_roles"
            return await self.fail(task, error, claim_limit), False
        if too_large is not None:
            return await self._fail_instance(task, str(too_large), claim_limit), False
        if commit_error is not None:
            failed = await self.fail(
                task, _sql_error(commit_error), claim_limit, commit_error.sqlstate
            )
            return failed, False
        if transition is not None:
            self._committed(task, transition)
        return followups, False  # no df._reset_session in that database: DISCARD ALL

    # -- the start and the first step together ------------------------------------------------

    async def _start_with_first_step(
        self, task: Task, claim_limit: Callable[[], int]
    ) -> list[Task]:
        """Start an instance and run its first SQL step in one transaction, on a connection
        logged in as the submitter, in two round trips: [BEGIN, the statement], then
        [df._checkpoint_begin, df._checkpoint of both, the session reset, COMMIT]; what the
        start needs came with the claim (Task.start), or is read in a round trip before them
        ([BEGIN, df._task_facts, the graph]). Starting on the worker's connection first would
        cost a transaction and two round trips more.

        A failed step is recorded as the usual path records it: the start checkpointed on the
        worker's connection, then the failure, without running the statement again. The
        usual path takes over from the start when this cannot be done: a login refused, a
        statement that cannot run in a transaction block, a state too large."""
        if not self.conns.is_own_database(task.database):
            return await self._advance(task, None, claim_limit)
        # What the claim read of the instance, started once for both paths below.
        claimed = None if task.start is None else self._started_from_claim(task, task.start)
        if claimed is not None:
            followups = await self._start_in_batch(task, claimed, claim_limit)
            if followups is not None:
                return followups
        pool = self.conns.step_pool(task.role, task.role_oid, task.database)
        try:
            conn = await pool.acquire()
        except psycopg.Error as exc:
            if is_transient(exc):
                raise
            return await self._advance(task, None, claim_limit)
        outcome: list[Task] | _Failed | None = None
        reusable = True
        try:
            outcome = await self._start_on(conn, task, claimed, claim_limit)
        except _Withdrawn:
            outcome = []  # cancelled: the start task is gone
        except psycopg.Error as exc:
            if _checkpoint_busy(exc):
                raise CheckpointBusy(_message(exc)) from None
            if exc.sqlstate in _TAKEN_AWAY:
                log.info(
                    "task %s of %s was taken away; step rolled back", task.id, task.instance_id
                )
                outcome = []
            elif is_transient(exc):
                # The connection was lost: the usual path retries, or fails the step (it
                # must not fail the start), once the server answers again.
                await pool.drop_idle()
            reusable = not conn.closed
        finally:
            committed = conn.info.transaction_status == TransactionStatus.IDLE
            if not conn.closed and not committed:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
            # The session was reset in the transaction only if it committed (a rolled back
            # step may still hold a session advisory lock, say): else DISCARD ALL.
            await pool.release(conn, reusable and not conn.closed, committed)
        if isinstance(outcome, list):
            return outcome
        followups = await self._advance(task, None, claim_limit)
        if outcome is None:
            return followups
        # The start queued the step, leased to us: record its failure.
        step = [t for t in followups if t.activation == outcome.activation]
        others = [t for t in followups if t.activation != outcome.activation]
        for failed in step:
            others += await self.fail(failed, outcome.error, claim_limit, outcome.code)
        return others

    def _started_from_claim(
        self, task: Task, start: dict[str, Any]
    ) -> tuple[Checkpoint, Transition]:
        """The start of ``task``'s instance from what the claim read of it (Task.start)."""
        facts = [{**start, "created_at": task.created_at}]
        cp = Checkpoint(
            "pending", None, start["vars"] or {}, float(start["now"]), start["role_exists"]
        )
        return cp, self._start(task, cp, facts, list(start["nodes"]))

    async def _start_in_batch(
        self, task: Task, claimed: tuple[Checkpoint, Transition], claim_limit: Callable[[], int]
    ) -> list[Task] | None:
        """Start ``task``'s instance (``claimed``: _started_from_claim) and run its first
        step in a batch with other steps of its role (batch.py): the follow-ups, or None to
        take the path of a start alone."""
        cp, started = claimed
        graph = self._cached_graph(task)
        first = _first_sql_task(started)
        if first is None or graph is None or "deadline" in (first.payload or {}):
            return None
        sql = str((first.payload or {}).get("sql", ""))
        if self.telemetry is not None:
            sql = self.telemetry.sql_began(task, first.node_id, sql)

        def checkpoint(
            result: str, now: float, locked: list[dict[str, Any]]
        ) -> tuple[list[Query], Followups]:
            if not locked:
                raise Undone(f"task {task.id} was taken away")
            step = interpreter.step_succeeded(
                graph, _state_of(started), cp.variables, first.activation, result, now,
                **self._limits, continue_with=self._continuation(task, result),
            )  # fmt: skip
            chained = interpreter.chain(started, step, first.activation)
            params = self._checkpoint_params(task, chained, claim_limit())
            return [Query(queries.CHECKPOINT, params)], partial(
                self._followups, task=task, transition=chained, variables=cp.variables
            )

        show = asyncio.get_running_loop().call_later(
            SHOW_STARTED_AFTER, self._show_started, task, started
        )
        try:
            lock = Query(queries.CHECKPOINT_BEGIN, queries.checkpoint_begin_params(task))
            return await self._batches.run(task, sql, lock, checkpoint)
        finally:
            show.cancel()

    async def _start_on(
        self,
        conn: AsyncConn,
        task: Task,
        claimed: tuple[Checkpoint, Transition] | None,
        claim_limit: Callable[[], int],
    ) -> list[Task] | _Failed | None:
        """_start_with_first_step on the submitter's connection: the follow-ups; how the step
        failed; or None to take the usual path. The caller rolls back what did not commit.

        What the claim read of the instance (Task.start, started as ``claimed``) spares the
        first round trip; the transaction then begins with the statement, and a task taken
        away meanwhile is found gone by the checkpoint (PD001), which rolls the step back."""
        if claimed is not None:
            cp, started = claimed
            begun = False
        else:
            # No lock yet: df.cancel must not wait for the step's statement (df._task_facts).
            first_trip = [
                BEGIN,
                Query(queries.TASK_FACTS, queries.checkpoint_begin_params(task)),
                *queries.graph_queries(
                    task.instance_id, self.settings.max_state_bytes, vars_size=False
                ),
            ]
            _, facts_rows, facts, nodes = await run_queries(conn, first_trip)
            found = queries.checkpoint_from_row(facts_rows[0] if facts_rows else None)
            if found is None:
                return []  # the task is gone
            cp = found
            if facts:  # the submitter may not read df._runs.vars: measured here instead
                facts[0]["vars_bytes"] = len(json.dumps(cp.variables).encode())
            begun = True
            # A submitter dropped already fails the instance in _start, as the usual path
            # would; unlike it, a role dropped while the statement runs lets it count, as if
            # it had ended just before.
            started = self._start(task, cp, facts, nodes)
        graph = self._cached_graph(task)
        first = _first_sql_task(started)
        if first is None or graph is None:  # nothing to run now, or the start failed
            return await self._commit_on(conn, task, started, cp.variables, claim_limit, begun)
        # Until this transaction commits (its statement, or a user's deferred trigger at its
        # COMMIT, may take long), monitoring would show the instance as pending. A timer, not a
        # task waiting on one: most first steps end long before it, at every start.
        show = asyncio.get_running_loop().call_later(
            SHOW_STARTED_AFTER, self._show_started, task, started
        )
        try:
            return await self._first_step(conn, task, graph, cp, started, first, claim_limit, begun)
        finally:
            show.cancel()

    async def _first_step(
        self,
        conn: AsyncConn,
        task: Task,
        graph: Graph,
        cp: Checkpoint,
        started: Transition,
        first: TaskSpec,
        claim_limit: Callable[[], int],
        begun: bool,
    ) -> list[Task] | _Failed | None:
        """Run the step ``started`` queued, and commit both (see _start_on); ``begun``: the
        transaction is open already."""
        payload = first.payload or {}
        sql, deadline = str(payload.get("sql", "")), payload.get("deadline")
        if self.telemetry is not None:
            sql = self.telemetry.sql_began(task, first.node_id, sql)
        try:
            before = [] if begun else [BEGIN]
            result, rows = await self._statement(conn, task, sql, deadline, before, _NOW)
        except psycopg.Error as exc:
            if is_transient(exc) or exc.sqlstate in _NEEDS_OWN_TRANSACTION:
                raise  # the usual path: retried, or run outside a transaction block
            return _Failed(first.activation, _sql_error(exc), exc.sqlstate)
        except (ResultError, UnicodeEncodeError) as exc:
            return _Failed(first.activation, str(exc), None)
        step = interpreter.step_succeeded(
            graph, _state_of(started), cp.variables, first.activation, result,
            float(rows[0]["now"]), **self._limits, continue_with=self._continuation(task, result),
        )  # fmt: skip
        chained = interpreter.chain(started, step, first.activation)
        try:
            return await self._commit_on(conn, task, chained, cp.variables, claim_limit, True)
        except psycopg.Error as exc:
            if is_transient(exc) or _checkpoint_busy(exc) or exc.sqlstate in _TAKEN_AWAY:
                raise  # the caller's: retried, deferred, or the task is gone
            # The user's own error at COMMIT (a deferred constraint or trigger).
            return _Failed(first.activation, _sql_error(exc), exc.sqlstate)

    def _show_started(self, task: Task, started: Transition) -> None:
        """The first step has run for SHOW_STARTED_AFTER: show its instance and the nodes the
        start began as running (df._show_started), on the worker's connection, in the
        background; they would read pending until the step commits."""
        self._in_background(self._show_started_now(task, started))

    def _in_background(self, work: Awaitable[None]) -> None:
        """Run ``work`` without waiting for it (kept referenced until it ends)."""
        future = asyncio.ensure_future(work)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    async def _show_started_now(self, task: Task, started: Transition) -> None:
        nodes = sorted({w.node_id for w in started.writes if w.status == "running"})
        try:
            async with self.conns.worker.connection() as conn:
                await conn.execute(
                    "SELECT df._show_started(%s, %s, %s)", (task.id, task.token, nodes)
                )
        except Exception as exc:  # only what monitoring shows meanwhile
            log.debug("could not show instance %s as started: %s", task.instance_id, exc)

    async def _commit_on(
        self,
        conn: AsyncConn,
        task: Task,
        transition: Transition,
        variables: dict[str, str],
        claim_limit: Callable[[], int],
        begun: bool,
    ) -> list[Task] | None:
        """Lock the instance (df._checkpoint_begin), checkpoint ``transition`` in the
        transaction of a step connection (``begun``: open already, else begun here), reset the
        session and commit, in one round trip; None if the state is too large (the usual path
        fails the instance)."""
        try:
            params = self._checkpoint_params(task, transition, claim_limit())
        except queries.StateTooLarge:
            return None
        head = [] if begun else [BEGIN]
        commit = [
            *head,
            Query(queries.CHECKPOINT_BEGIN, queries.checkpoint_begin_params(task)),
            Query(queries.CHECKPOINT, params),
            *map(Query, RESET_SESSION),
            COMMIT,
        ]
        rows = (await run_queries(conn, commit))[len(head) + 1]
        return self._followups(rows, task, transition, variables)

    # -- HTTP steps ----------------------------------------------------------------------------

    async def _run_http(self, task: Task, claim_limit: Callable[[], int]) -> list[Task]:
        """Send the request (unless the submitter may not), then checkpoint the response.

        A crash between the two sends it again, with the same Idempotency-Key. A cancel (of
        the instance, or of a lost RACE or an expired df.timeout) abandons the request.
        """
        # Registered before its first await, so that a cancel arriving at any point (even
        # during the privilege check) is not missed.
        request = asyncio.ensure_future(self._send_http(task))
        self._requests[task.id] = (task, request)
        try:
            outcome = await asyncio.shield(request)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                request.cancel()
                raise  # the worker itself is stopping
            log.info("HTTP step of %s withdrawn; request abandoned", task.instance_id)
            return []
        finally:
            self._requests.pop(task.id, None)

        async def record(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
            if outcome.succeeded:
                return interpreter.step_succeeded(
                    graph,
                    _state(cp),
                    cp.variables,
                    task.activation,
                    outcome.value,
                    cp.now,
                    **self._limits,
                )
            return interpreter.step_failed(
                graph,
                _state(cp),
                cp.variables,
                task.activation,
                outcome.value,
                cp.now,
                outcome.code,
                **self._limits,
            )

        return await self._advance(task, record, claim_limit)

    async def _send_http(self, task: Task) -> http.HttpOutcome:
        """Check the submitter's privilege, then perform the request."""
        payload = dict(task.payload or {})
        refusal, db_now = await self._http_refusal(task, str(payload.get("type", "HTTP")))
        if refusal is not None:
            return http.HttpOutcome(False, refusal, "http_blocked")
        deadline, timeout = payload.get("deadline"), payload.get("timeout_seconds")
        if isinstance(deadline, int | float) and isinstance(timeout, int | float):
            # The backstop of an enclosing df.timeout, as for SQL, on the database clock.
            left = float(deadline) + _DEADLINE_GRACE_SECONDS - db_now
            payload["timeout_seconds"] = max(min(float(timeout), left), 0.001)
        outcome = await http.perform(payload, self.settings.egress)
        if outcome.code == "http_blocked" and self.telemetry is not None:
            self.telemetry.egress_refused()
        return outcome

    async def _http_refusal(self, task: Task, node_type: str) -> tuple[str | None, float]:
        """Why the submitter may not send this request, checked on every run:
        revoking EXECUTE on df.http stops running workflows too. Also the database clock."""
        name, signature = _HTTP_FUNCTIONS.get(node_type, _HTTP_FUNCTIONS["HTTP"])
        async with self.conns.worker.connection() as conn:
            cur = await conn.execute(
                "SELECT r.rolsuper OR has_function_privilege(r.oid, %s, 'EXECUTE'),"
                " extract(epoch FROM clock_timestamp())::float8"
                " FROM df.instances i JOIN pg_roles r ON r.oid = i.submitted_by"
                " WHERE i.id = %s",
                (signature, task.instance_id),
            )
            row = await cur.fetchone()
        if row is None:
            gone = f"Instance {task.instance_id}: submitted_by role no longer exists in pg_roles"
            return gone, time.time()
        if row[0]:
            return None, float(row[1])
        return (
            f"Blocked: role '{task.role}' does not have EXECUTE privilege on {name}. Grant "
            f"EXECUTE ON FUNCTION {signature} TO {task.role} to allow HTTP requests."
        ), float(row[1])

    def _continuation(self, task: Task, result: str) -> Mapping[str, Any] | None:
        """The graph a SQL step's result continues the workflow with: only what
        df.continue_with returned for the submitter (signed with the database's key), never
        data that looks like it."""
        return model.signed_continuation(result, task.role, self.settings.continuation_key)

    # -- Python steps --------------------------------------------------------------------------

    async def _run_call(self, task: Task, claim_limit: Callable[[], int]) -> list[Task]:
        """Run a Python step (docs/python.md): check that its submitter may call it, bind its
        arguments, then run it inside the transaction of its checkpoint, or outside any (a
        step registered with ``transaction=False``: at least once, then checkpointed like an
        HTTP response)."""
        payload = task.payload or {}
        name = str(payload.get("name"))
        definition = self.settings.steps.get(name)
        if definition is None:  # claimed by name, so only if the rows were written by hand
            error = f"Python step '{name}' is not registered in this worker"
            return await self.fail(task, error, claim_limit, "call_invalid")
        refusal, db_now = await self._call_refusal(task, name)
        if refusal is not None:
            return await self.fail(task, refusal, claim_limit, "call_forbidden")
        ctx = StepContext(
            name=name,
            instance_id=task.instance_id,
            node_id=str(task.node_id),
            idempotency_key=str(payload.get("idempotency_key")),
            attempt=int(payload.get("attempt") or 1),
            run=task.attempts,
        )
        args = payload.get("args")
        try:
            bound = definition.bind(ctx, args if isinstance(args, dict) else {})
        except TypeError as exc:
            return await self.fail(task, calls.bind_error(name, exc), claim_limit, "call_invalid")
        deadline = payload.get("deadline")
        limit = None
        if isinstance(deadline, int | float):  # the backstop of an enclosing df.timeout
            limit = max(float(deadline) + _DEADLINE_GRACE_SECONDS - db_now, 0.001)
        invocation = calls.Invocation(definition, ctx, bound, self.settings.max_result_bytes)
        if definition.transaction:
            return await self._run_call_in_transaction(task, invocation, limit, claim_limit)
        outcome = await self._invoke(task, invocation, limit)
        if outcome is None:
            return []
        return await self._advance(task, self._recorded(task, outcome), claim_limit)

    async def _invoke(
        self, task: Task, invocation: calls.Invocation, limit: float | None
    ) -> calls.CallOutcome | None:
        """Run ``invocation``; None if the step was withdrawn meanwhile (df.cancel, a lost
        RACE, an expired df.timeout), which interrupts it."""
        run = asyncio.ensure_future(invocation.run(limit))
        self._requests[task.id] = (task, run)
        try:
            return await asyncio.shield(run)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                run.cancel()
                raise  # the worker itself is stopping
            log.info("Python step of %s withdrawn; interrupted", task.instance_id)
            return None
        finally:
            self._requests.pop(task.id, None)

    async def _run_call_in_transaction(
        self,
        task: Task,
        invocation: calls.Invocation,
        limit: float | None,
        claim_limit: Callable[[], int],
    ) -> list[Task]:
        """The step's function and its checkpoint in one transaction, on a connection logged
        in as the submitter: [BEGIN], the function, then [df._checkpoint_begin], then
        [df._checkpoint, the session reset, COMMIT]. Its writes take effect exactly once."""
        graph = await self._graph(task)
        pool = self.conns.step_pool(task.role, task.role_oid, task.database)
        try:
            conn = await pool.acquire()
        except psycopg.Error as exc:
            error = await self._login_failure(task, exc)
            if error is None:
                raise
            return await self.fail(task, error, claim_limit)
        reusable, clean, handed_off = False, False, False
        try:
            await conn.execute(BEGIN.sql)
            with contextlib.ExitStack() as stack:
                if invocation.definition.is_async:
                    invocation.ctx.conn = conn
                else:
                    invocation.ctx.conn = stack.enter_context(calls.blocking_view(conn))
                try:
                    outcome = await self._invoke(task, invocation, limit)
                except asyncio.CancelledError:  # the worker stops
                    if invocation.abandoned:  # its thread may still use the connection
                        await _cancel_request(conn)
                        handed_off = True
                        self._in_background(self._close_after(invocation, pool, conn))
                    raise
                if outcome is None or invocation.abandoned:
                    # Interrupted (cancelled, or past its deadline): whatever it runs now is
                    # cancelled. An abandoned sync function may still use the connection: it
                    # is closed (its transaction with it) once the function returns.
                    await _cancel_request(conn)
                    handed_off = True
                    self._in_background(self._close_after(invocation, pool, conn))
                    if outcome is None:
                        return []
                    return await self.fail(task, outcome.value, claim_limit, outcome.code)
            if conn.closed or conn.broken:
                if outcome.exception is not None and is_transient(outcome.exception):
                    raise outcome.exception
                error = f"Python step '{invocation.definition.name}' closed its connection"
                return await self.fail(task, error, claim_limit, "call_invalid")
            status = conn.info.transaction_status
            if outcome.succeeded and status != TransactionStatus.INTRANS:
                outcome = calls.transaction_ended(invocation.definition.name, status)
            if not outcome.succeeded:
                await conn.execute("ROLLBACK")
                reusable = True
                return await self.fail(task, outcome.value, claim_limit, outcome.code)
            if not self.conns.is_own_database(task.database):
                followups, clean = await self._commit_elsewhere(
                    conn, graph, task, outcome.value, claim_limit, outcome.graph
                )
                reusable = True
                return followups
            try:
                cp = await queries.checkpoint_begin(conn, task)
            except psycopg.Error as exc:
                if is_transient(exc):
                    raise
                await conn.execute("ROLLBACK")
                reusable = True
                if _checkpoint_busy(exc):
                    raise CheckpointBusy(_message(exc)) from None
                raise
            followups, clean = await self._commit_step(
                conn, graph, task, outcome.value, cp, claim_limit, continue_with=outcome.graph
            )
            reusable = True
            return followups
        finally:
            if not handed_off:
                await pool.release(conn, reusable and not conn.closed, clean)

    @staticmethod
    async def _close_after(invocation: calls.Invocation, pool: StepPool, conn: AsyncConn) -> None:
        await invocation.settled()
        await pool.release(conn, False, False)

    def _recorded(self, task: Task, outcome: calls.CallOutcome) -> Decision:
        """The transition that records a Python step's outcome."""

        async def record(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
            if outcome.succeeded:
                return interpreter.step_succeeded(
                    graph, _state(cp), cp.variables, task.activation, outcome.value, cp.now,
                    **self._limits, continue_with=outcome.graph,
                )  # fmt: skip
            return interpreter.step_failed(
                graph, _state(cp), cp.variables, task.activation, outcome.value, cp.now,
                outcome.code, **self._limits,
            )  # fmt: skip

        return record

    async def _call_refusal(self, task: Task, name: str) -> tuple[str | None, float]:
        """Why the submitter may not call the step (df._call_refusal), checked at every run:
        a grant revoked stops running workflows too. Also the database clock."""
        async with self.conns.worker.connection() as conn:
            cur = await conn.execute(
                "SELECT df._call_refusal(i.submitted_by, %s),"
                " extract(epoch FROM clock_timestamp())::float8"
                " FROM df.instances i WHERE i.id = %s",
                (name, task.instance_id),
            )
            row = await cur.fetchone()
        if row is None:
            return f"Instance {task.instance_id} no longer exists", time.time()
        return row[0], float(row[1])

    # -- checkpoints on the worker's connection ------------------------------------------------

    def _signal_wait(self, task: Task) -> Decision:
        """A SIGNAL wait's task came due: a signal arrived, or its deadline passed."""
        payload = task.payload or {}

        async def wait(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition | None:
            if not interpreter.is_waiting(cp.state, task.activation):
                return Transition(next_state=_state(cp))  # a stale wait: just retire its task
            name = str(payload.get("signal_name"))
            limit = self.settings.max_result_bytes
            signal = await queries.consume_signal(conn, task, name, limit)
            if signal is not None and signal.too_large:  # its data never left the server
                error = (
                    f"Signal '{name}' data too large: {signal.size} bytes, more than {limit}"
                    f" bytes ({MAX_RESULT_BYTES_SETTING})"
                )
                return interpreter.step_failed(
                    graph, _state(cp), cp.variables, task.activation, error, cp.now, **self._limits
                )
            if signal is not None:
                return interpreter.signal_received(
                    graph,
                    _state(cp),
                    cp.variables,
                    task.activation,
                    signal.data,
                    cp.now,
                    **self._limits,
                )
            deadline = payload.get("deadline")
            if deadline is not None and cp.now >= float(deadline):
                return interpreter.signal_timed_out(
                    graph, _state(cp), cp.variables, task.activation, cp.now, **self._limits
                )
            return None  # woken early (the signal went to another wait): wait on

        return wait

    async def _advance(
        self,
        task: Task,
        decide: Decision | None,
        claim_limit: Callable[[], int],
    ) -> list[Task]:
        """Lock the instance, compute a transition and checkpoint it, on the worker's connection,
        in two round trips: [BEGIN, df._checkpoint_begin, and the graph if it is not cached],
        then [df._checkpoint, COMMIT].

        ``decide`` None means the task starts (or restarts) the instance; ``decide`` returning
        None means there is nothing to do yet: the task goes back to waiting.
        """
        async with self.conns.worker.connection() as conn, _busy_on_lock_timeout():
            try:
                return await self._advance_on(conn, task, decide, claim_limit)
            finally:
                if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        await conn.execute("ROLLBACK")

    async def _advance_on(
        self,
        conn: AsyncConn,
        task: Task,
        decide: Decision | None,
        claim_limit: Callable[[], int],
    ) -> list[Task]:
        # A start always reads the graph: with it come the facts that admit the instance.
        graph = None if decide is None else self._cached_graph(task)
        first = [BEGIN, Query(queries.CHECKPOINT_BEGIN, queries.checkpoint_begin_params(task))]
        if graph is None:
            first += queries.graph_queries(task.instance_id, self.settings.max_state_bytes)
        results = await run_queries(conn, first)
        cp = queries.checkpoint_from_row(results[1][0] if results[1] else None)
        if cp is None:
            return []
        if decide is None:
            transition = self._start(task, cp, results[2], results[3])
        else:
            if graph is None or not interpreter.covers(graph, cp.state):
                if graph is not None:  # it grew since it was cached: read it again
                    results[2:] = await run_queries(
                        conn,
                        queries.graph_queries(task.instance_id, self.settings.max_state_bytes),
                    )
                graph = self._loaded_graph(task, results[2], results[3])
            decided = await decide(conn, graph, cp)
            if decided is None:
                await queries.rearm(conn, task)
                await conn.execute("COMMIT")
                return []
            transition = decided
        try:
            return await self._write(
                conn, task, transition, cp.variables, claim_limit(), commit=True
            )
        except queries.StateTooLarge as exc:
            # The state last written fitted; if the limit was lowered since, none is kept.
            for state in (cp.state, None):
                failed = interpreter.fail_instance(state, f"Instance {task.instance_id}: {exc}")
                with contextlib.suppress(queries.StateTooLarge):
                    return await self._write(conn, task, failed, cp.variables, 0, commit=True)
            raise

    def _checkpoint_params(
        self, task: Task, transition: Transition, claim: int, version: int | None = None
    ) -> tuple[Any, ...]:
        """queries.checkpoint_params with this worker's id, lease and state limit. A graph
        that grew (df.continue_with) replaces the one cached."""
        if transition.graph is not None:
            self._remember(transition.graph, task.created_at)
        return queries.checkpoint_params(
            task,
            transition,
            self.settings.worker_id,
            claim,
            self.settings.lease_seconds,
            self.settings.max_state_bytes,
            version,
            self.settings.steps,
        )

    async def _write(
        self,
        conn: AsyncConn,
        task: Task,
        transition: Transition,
        variables: dict[str, str],
        claim: int,
        commit: bool = False,
    ) -> list[Task]:
        """Checkpoint ``transition`` on ``conn``, leasing up to ``claim`` follow-ups to us, and
        ``commit`` in the same round trip (raises queries.StateTooLarge before sending)."""
        params = self._checkpoint_params(task, transition, claim)
        sent = [Query(queries.CHECKPOINT, params), *([COMMIT] if commit else [])]
        rows = (await run_queries(conn, sent))[0]
        if not commit:  # the caller commits, and tells the telemetry (_commit_elsewhere)
            return queries.followups(rows, task, transition, variables)
        return self._followups(rows, task, transition, variables)

    def _followups(
        self,
        rows: list[dict[str, Any]],
        task: Task,
        transition: Transition,
        variables: dict[str, str],
    ) -> list[Task]:
        """queries.followups of ``task``'s checkpoint of ``transition``, which committed:
        every path of a step ends here (or at :meth:`_committed`)."""
        self._committed(task, transition)
        return queries.followups(rows, task, transition, variables)

    def _committed(self, task: Task, transition: Transition) -> None:
        """Tell the telemetry, if any, that ``task``'s checkpoint of ``transition`` committed."""
        if self.telemetry is not None:
            graph = self._graphs.get((task.instance_id, task.created_at))
            self.telemetry.committed(task, transition, graph)

    async def _fail_instance(
        self, task: Task, error: str, claim_limit: Callable[[], int]
    ) -> list[Task]:
        """Fail ``task``'s instance as a whole with ``error`` (nothing of it runs on)."""

        async def failed(conn: AsyncConn, graph: Graph, cp: Checkpoint) -> Transition:
            return interpreter.fail_instance(cp.state, f"Instance {task.instance_id}: {error}")

        return await self._advance(task, failed, claim_limit)

    def _start(
        self,
        task: Task,
        cp: Checkpoint,
        facts_rows: list[dict[str, Any]],
        node_rows: list[dict[str, Any]],
    ) -> Transition:
        """Admit the instance's graph, read by queries.graph_queries (its submitter must still
        exist, and may be a superuser only if allowed), then activate its root; or, for a
        restart task (df.restart), run on the state the instance kept when it ended."""
        try:
            graph, facts = queries.graph_from_rows_of(
                task.instance_id, facts_rows, node_rows, self.settings.max_state_bytes
            )
        except (GraphError, LookupError) as exc:
            return interpreter.fail_instance(cp.state, f"Instance {task.instance_id}: {exc}")
        if facts["vars_bytes"] is not None and facts["vars_bytes"] > self.settings.max_state_bytes:
            return interpreter.fail_instance(
                cp.state,
                f"Instance {task.instance_id}: its variables (df.vars) are larger than "
                f"{self.settings.max_state_bytes} bytes ({queries.MAX_STATE_BYTES_SETTING})",
            )
        if not facts["role_exists"]:
            return interpreter.fail_instance(
                cp.state,
                f"Instance {task.instance_id}: submitted_by role no longer exists in pg_roles",
            )
        if facts["superuser"] and not self.settings.allow_superuser:
            return interpreter.fail_instance(
                cp.state,
                f"pg_durable blocked instance {task.instance_id}: submitted_by role "
                f'"{facts["role"]}" is a superuser, but pg_durable.enable_superuser_instances '
                "is off",
            )
        if self.settings.single_role and facts["role"] != self.conns.worker_role:
            return interpreter.fail_instance(
                cp.state,
                f"Instance {task.instance_id}: this pgdurable worker runs in single-role mode "
                f'as "{self.conns.worker_role}" and cannot run instances submitted by '
                f'"{facts["role"]}"',
            )
        self._remember(graph, facts["created_at"])
        if task.kind == "restart":
            return interpreter.resume(graph, cp.state, cp.variables, cp.now, **self._limits)
        return interpreter.start(graph, cp.variables, cp.now, **self._limits)

    # -- graphs --------------------------------------------------------------------------------

    def _cached_graph(self, task: Task) -> Graph | None:
        """The task's instance's graph if this worker read it before (graphs never change).

        Cached by instance id and creation time: once retention purged an instance, a new one
        may get its id, and must never be run with the old one's graph.
        """
        key = (task.instance_id, task.created_at)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    async def _graph(self, task: Task, reload: bool = False) -> Graph:
        """The task's instance's graph, from the cache (unless ``reload``: it grew) or read on
        the worker's connection."""
        graph = None if reload else self._cached_graph(task)
        if graph is not None:
            return graph
        async with self.conns.worker.connection() as conn:
            facts, nodes = await run_queries(
                conn, queries.graph_queries(task.instance_id, self.settings.max_state_bytes)
            )
        return self._loaded_graph(task, facts, nodes)

    def _loaded_graph(
        self, task: Task, facts_rows: list[dict[str, Any]], node_rows: list[dict[str, Any]]
    ) -> Graph:
        """The graph read by queries.graph_queries, remembered (raises GraphError, LookupError)."""
        graph, facts = queries.graph_from_rows_of(
            task.instance_id, facts_rows, node_rows, self.settings.max_state_bytes
        )
        # Under the creation time just read: if the task's instance was purged and its id taken
        # since the claim, this is the newcomer's graph, and the task's checkpoint will find
        # the task gone.
        self._remember(graph, facts["created_at"])
        return graph

    def _remember(self, graph: Graph, created_at: datetime | None) -> None:
        self._graphs[(graph.instance_id, created_at)] = graph
        while len(self._graphs) > _GRAPH_CACHE_SIZE:
            self._graphs.popitem(last=False)


@contextlib.asynccontextmanager
async def _busy_on_lock_timeout() -> AsyncIterator[None]:
    """Around a checkpoint on the worker's own connection, where only engine code runs: a
    lock timeout there (checkpoint functions, df._consume_signal) means the instance is busy."""
    try:
        yield
    except psycopg.errors.LockNotAvailable as exc:
        raise CheckpointBusy(_message(exc)) from None


def _first_sql_task(transition: Transition) -> TaskSpec | None:
    """The SQL step a start queued, if it is all it queued. Not when there is more: run in
    the start's transaction, the step would hold the others back (a RACE with a df.sleep, the
    timer of a df.timeout, the other branches of a JOIN)."""
    if transition.outcome is not None or len(transition.tasks) != 1:
        return None
    [task] = transition.tasks
    return task if task.kind == "sql" and task.run_at is None else None


def _state_of(transition: Transition) -> InstanceState:
    if transition.next_state is None:
        raise RuntimeError("a transition that did not end the instance has no state")
    return transition.next_state


def _state(cp: Checkpoint) -> InstanceState:
    if cp.state is None:
        raise RuntimeError("instance state missing: the start task has not run")
    return cp.state


def _sql_error(exc: psycopg.Error) -> str:
    return f"SQL execution failed: error returned from database: {_message(exc)}"


def _message(exc: psycopg.Error) -> str:
    """The server's primary error message (what pg_durable's driver reports)."""
    primary = exc.diag.message_primary if exc.diag else None
    return primary or str(exc).strip()
