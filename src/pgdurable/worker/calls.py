"""Running a Python step's function: arguments in, an outcome out.

What the worker records of a run is a :class:`CallOutcome`: the result as JSON text, or an
error with its class for df.retry. An async function runs on the worker's event loop and is
interrupted by cancelling it; a sync one runs in a thread of its own, which cannot be
interrupted: a cancel sets ``ctx.cancelled`` and abandons it (docs/python.md). The
transaction around a transactional step is the step runner's (worker/steps.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import re
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from ..dsl import Node
from ..python_steps import StepContext, StepDefinition

# An escaped NUL character in JSON text (an odd number of backslashes before u0000).
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# How much of a traceback an error keeps: its last frames, and at most this many characters.
_TRACEBACK_FRAMES = 5
_MAX_ERROR_CHARS = 4000


@dataclass(frozen=True)
class CallOutcome:
    """How a run ended: ``value`` is the result's JSON text if it ``succeeded``, else the
    error text, classified by ``code`` (a SQLSTATE for a database error the function let
    through, 'python' for another exception, 'call_invalid' for a result that is not JSON,
    'call_timeout' past the df.timeout deadline). ``exception`` is what the function raised."""

    succeeded: bool
    value: str
    code: str | None = None
    exception: BaseException | None = None
    graph: Mapping[str, Any] | None = None  # the rest of the workflow, if it returned one


def bind_error(name: str, exc: TypeError) -> str:
    """The error of a call whose arguments do not fit the function's parameters."""
    return f"Python step '{name}': the arguments do not fit its parameters: {exc}"


def encode_result(name: str, value: Any, limit: int) -> CallOutcome:
    """The function's return value as the step's result: JSON text of at most ``limit``
    bytes. A graph (pgdurable.dsl.Node) is the rest of the workflow (df.continue_with)."""
    if isinstance(value, Node):  # a graph object, which data read from elsewhere never is
        return CallOutcome(True, "null", graph=json.loads(value.to_json()))
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return CallOutcome(
            False, f"Python step '{name}' returned a value that is not JSON: {exc}", "call_invalid"
        )
    if "\\u0000" in text and _NUL.search(text):
        error = (
            f"Python step '{name}' returned a NUL character (\\u0000), which PostgreSQL's"
            " jsonb cannot hold"
        )
        return CallOutcome(False, error, "call_invalid")
    if len(text.encode()) > limit:
        error = (
            f"Python step '{name}' returned more than {limit} bytes of JSON"
            " (pg_durable.max_result_bytes)"
        )
        return CallOutcome(False, error, "call_invalid")
    return CallOutcome(True, text)


def failure(name: str, exc: BaseException) -> CallOutcome:
    """What the function raised, as the step's error: its type, message and last frames."""
    frames = traceback.format_exception(exc, limit=-_TRACEBACK_FRAMES)
    text = f"Python step '{name}' failed: {type(exc).__name__}: {exc}\n" + "".join(frames[:-1])
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    code = exc.sqlstate if isinstance(exc, psycopg.Error) and exc.sqlstate else "python"
    return CallOutcome(False, text.rstrip("\n"), code, exc)


def transaction_ended(name: str, status: object) -> CallOutcome:
    """A transactional step that returned with its transaction committed, rolled back or
    failed: what it wrote cannot be recorded with its result."""
    if status == psycopg.pq.TransactionStatus.INERROR:
        error = (
            f"Python step '{name}' returned after a statement of its transaction failed"
            " (the transaction is aborted)"
        )
        return CallOutcome(False, error, "python")
    error = (
        f"Python step '{name}' ended its transaction (commit or rollback); a transactional step"
        " must leave it open: the worker commits it with the step's result"
    )
    return CallOutcome(False, error, "call_invalid")


def timed_out(name: str) -> CallOutcome:
    """A run cut short at its df.timeout's deadline."""
    return CallOutcome(
        False, f"Python step '{name}' did not finish before its df.timeout", "call_timeout"
    )


class Invocation:
    """One run of a step function with bound arguments."""

    def __init__(
        self,
        definition: StepDefinition,
        ctx: StepContext,
        bound: inspect.BoundArguments,
        max_result_bytes: int,
    ):
        self.definition = definition
        self.ctx = ctx
        self.bound = bound
        self.max_result_bytes = max_result_bytes
        self._thread: concurrent.futures.Future[Any] | None = None

    async def run(self, limit: float | None) -> CallOutcome:
        """Run the function, for at most ``limit`` seconds (None: no limit). A cancel of the
        awaiting task interrupts an async function, and abandons a sync one
        (``ctx.cancelled`` tells it); CancelledError is raised either way."""
        name = self.definition.name
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                if self.definition.is_async:
                    value = await self.definition.function(*self.bound.args, **self.bound.kwargs)
                else:
                    self._thread = _in_thread(
                        lambda: self.definition.function(*self.bound.args, **self.bound.kwargs),
                        f"pgdurable-step-{name}",
                    )
                    value = await asyncio.wrap_future(self._thread)
        except TimeoutError as exc:
            if not scope.expired():  # the function's own, not the deadline's
                return failure(name, exc)
            self.ctx._cancelled.set()
            return timed_out(name)
        except asyncio.CancelledError:
            self.ctx._cancelled.set()
            raise
        except Exception as exc:
            return failure(name, exc)
        return encode_result(name, value, self.max_result_bytes)

    @property
    def abandoned(self) -> bool:
        """Whether a sync function still runs though the worker stopped waiting for it."""
        return self._thread is not None and not self._thread.done()

    async def settled(self) -> None:
        """Wait until an abandoned sync function has returned (its thread may still use the
        step's connection)."""
        if self._thread is not None and not self._thread.done():
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self._thread)


def _in_thread(call: Callable[[], Any], name: str) -> concurrent.futures.Future[Any]:
    """Run ``call`` in a daemon thread of its own: an abandoned one never holds up the
    worker's exit, nor takes a thread other steps need."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


@contextlib.contextmanager
def blocking_view(conn: psycopg.AsyncConnection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A blocking connection over ``conn``'s session, for a sync step to use from its thread
    while the worker leaves ``conn`` alone: its open transaction, its role. It prepares
    nothing (its statement names would clash with ``conn``'s) and is never closed (the session
    is the pool's); ``conn``'s notice and notify handlers are put back after."""
    pgconn = conn.pgconn
    handlers = pgconn.notice_handler, pgconn.notify_handler
    view: psycopg.Connection[Any] = psycopg.Connection(pgconn)
    view._pool = None  # psycopg then takes it for a pooled connection: no warning when dropped
    view.prepare_threshold = None
    try:
        yield view
    finally:
        pgconn.notice_handler, pgconn.notify_handler = handlers
