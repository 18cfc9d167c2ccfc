"""Starting and watching workflows from Python: :class:`Client` and :class:`AsyncClient`.

::

    from pgdurable import Client, dsl as df

    with Client.connect("postgresql://app@db/app") as client:
        instance = client.start(df.sql("SELECT 1 AS one") >> df.sleep(1), label="demo")
        print(client.wait(instance, timeout=30))      # {'rows': [...], 'row_count': 1}

Both run the ``df`` SQL functions as the connected role, so row-level security scopes them as
it scopes psql: a client sees and controls only its role's instances. ``start`` may take the
application's own connection instead, so the start commits (or rolls back) with the
application's writes. Each method is one statement in autocommit mode on the client's own
connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .dsl import Node

__all__ = [
    "AsyncClient",
    "Client",
    "Instance",
    "InstanceNotFound",
    "Page",
    "WorkflowFailed",
]

TERMINAL = frozenset({"completed", "failed", "cancelled"})
_POLL_SECONDS = 0.1


class InstanceNotFound(LookupError):
    """No instance has this id, or it belongs to another role."""


class WorkflowFailed(Exception):
    """The instance failed or was cancelled; ``error`` is what it failed with."""

    def __init__(self, instance_id: str, status: str, error: str | None):
        super().__init__(f"instance {instance_id} {status}: {error}")
        self.instance_id = instance_id
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Instance:
    """One of the role's instances, as df.list_instances shows it."""

    id: str
    label: str | None
    status: str
    created_at: datetime | None
    completed_at: datetime | None
    output: str | None  # the result (completed) or the error (failed), as text


@dataclass(frozen=True)
class Page:
    """A page of instances, newest first; ``next_cursor`` fetches the next (None: the last)."""

    instances: list[Instance]
    next_cursor: str | None


# -- the statements, shared by both clients ------------------------------------------------------

_START = "SELECT df.start(%s, %s)"
_STATE = (
    "SELECT i.status, r.output FROM df.instances i"
    " LEFT JOIN df._runs r ON r.instance_id = i.id WHERE i.id = %s"
)
_RESULT = "SELECT df.result(%s)"
_CANCEL = "SELECT df.cancel(%s, %s)"
_RESTART = "SELECT df.restart(%s)"
_SIGNAL = "SELECT df.signal(%s, %s, %s)"
_LIST = (
    "SELECT instance_id, label, status, created_at, completed_at, output, next_cursor"
    " FROM df.list_instances(%s, %s, %s, %s)"
)


def _graph_text(graph: Node | str) -> str:
    return graph.to_json() if isinstance(graph, Node) else graph


def _outcome(instance_id: str, state: Any, result: Any) -> Any:
    """The result of a finished instance, parsed; raises WorkflowFailed if it did not
    complete."""
    status, output = state
    if status != "completed":
        raise WorkflowFailed(instance_id, status, output)
    return None if result is None or result[0] is None else json.loads(result[0])


def _page(rows: list[dict[str, Any]]) -> Page:
    cursor = rows[0]["next_cursor"] if rows else None  # the same on every row
    instances = [
        Instance(
            r["instance_id"],
            r["label"],
            r["status"],
            r["created_at"],
            r["completed_at"],
            r["output"],
        )
        for r in rows
    ]
    return Page(instances, cursor)


def _state_of(instance_id: str, row: Any) -> tuple[str, str | None]:
    if row is None:
        raise InstanceNotFound(f"Instance not found: {instance_id}")
    return str(row[0]), row[1]


def _timed_out(instance_id: str, timeout: float, status: str) -> TimeoutError:
    return TimeoutError(f"instance {instance_id} is still {status} after {timeout:g} s")


def _signal_data(data: Any) -> str:
    return json.dumps(data if data is not None else {})


class Client:
    """A blocking client on one connection (see the module's docstring)."""

    def __init__(self, conn: psycopg.Connection[Any]):
        """Use ``conn`` (it is switched to autocommit; the client closes it)."""
        conn.autocommit = True
        self.conn = conn

    @classmethod
    def connect(cls, dsn: str, **kwargs: Any) -> Client:
        """Connect to ``dsn`` (psycopg.connect's keyword arguments apply)."""
        return cls(psycopg.connect(dsn, **kwargs))

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        graph: Node | str,
        label: str | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
    ) -> str:
        """Start ``graph`` (a :class:`~pgdurable.dsl.Node`, or the JSON text the SQL builders
        make) and return the instance id. With ``conn``, the start is a statement in that
        connection's transaction: it takes effect only if that transaction commits."""
        row = (conn or self.conn).execute(_START, (_graph_text(graph), label)).fetchone()
        assert row is not None
        return str(row[0])

    def status(self, instance_id: str) -> str:
        """pending, running, completed, failed or cancelled."""
        return self._state(instance_id)[0]

    def result(self, instance_id: str) -> Any:
        """The result of a completed instance (parsed JSON). Raises WorkflowFailed if it
        failed or was cancelled, and LookupError while it runs."""
        state = self._state(instance_id)
        if state[0] not in TERMINAL:
            raise LookupError(f"instance {instance_id} is still {state[0]}")
        return _outcome(instance_id, state, self.conn.execute(_RESULT, (instance_id,)).fetchone())

    def wait(self, instance_id: str, timeout: float | None = None) -> Any:
        """Wait until the instance ends, and return its result as ``result`` does; raises
        TimeoutError after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(instance_id)
            if status in TERMINAL:
                return self.result(instance_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise _timed_out(instance_id, timeout or 0, status)
            time.sleep(_POLL_SECONDS)

    def cancel(self, instance_id: str, reason: str = "Cancelled by user") -> str:
        """Cancel the instance (df.cancel); its answer."""
        row = self.conn.execute(_CANCEL, (instance_id, reason)).fetchone()
        return str(row[0]) if row else ""

    def restart(self, instance_id: str) -> str:
        """Restart a failed or cancelled instance from where it ended (df.restart); its
        answer. Raises psycopg's ObjectNotInPrerequisiteState for an instance in any other
        status, NoDataFound for an unknown one (or another role's)."""
        row = self.conn.execute(_RESTART, (instance_id,)).fetchone()
        return str(row[0]) if row else ""

    def signal(self, instance_id: str, name: str, data: Any = None) -> None:
        """Send signal ``name`` with ``data`` (any JSON value) to the instance (df.signal)."""
        self.conn.execute(_SIGNAL, (instance_id, name, _signal_data(data)))

    def list(
        self,
        status: str | None = None,
        label: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> Page:
        """A page of the role's instances, newest first (df.list_instances' keyset pages)."""
        cur = self.conn.cursor(row_factory=dict_row)
        cur.execute(_LIST, (status, limit, label, after))
        return _page(cur.fetchall())

    def _state(self, instance_id: str) -> tuple[str, str | None]:
        return _state_of(instance_id, self.conn.execute(_STATE, (instance_id,)).fetchone())


class AsyncClient:
    """The same as :class:`Client`, for asyncio."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        """Use ``conn``, which must be in autocommit mode (the client closes it)."""
        self.conn = conn

    @classmethod
    async def connect(cls, dsn: str, **kwargs: Any) -> AsyncClient:
        """Connect to ``dsn`` (psycopg's keyword arguments apply)."""
        return cls(await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs))

    async def close(self) -> None:
        """Close the connection."""
        await self.conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(
        self,
        graph: Node | str,
        label: str | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> str:
        """See :meth:`Client.start`."""
        cur = await (conn or self.conn).execute(_START, (_graph_text(graph), label))
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    async def status(self, instance_id: str) -> str:
        """See :meth:`Client.status`."""
        return (await self._state(instance_id))[0]

    async def result(self, instance_id: str) -> Any:
        """See :meth:`Client.result`."""
        state = await self._state(instance_id)
        if state[0] not in TERMINAL:
            raise LookupError(f"instance {instance_id} is still {state[0]}")
        cur = await self.conn.execute(_RESULT, (instance_id,))
        return _outcome(instance_id, state, await cur.fetchone())

    async def wait(self, instance_id: str, timeout: float | None = None) -> Any:
        """See :meth:`Client.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = await self.status(instance_id)
            if status in TERMINAL:
                return await self.result(instance_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise _timed_out(instance_id, timeout or 0, status)
            await asyncio.sleep(_POLL_SECONDS)

    async def cancel(self, instance_id: str, reason: str = "Cancelled by user") -> str:
        """See :meth:`Client.cancel`."""
        cur = await self.conn.execute(_CANCEL, (instance_id, reason))
        row = await cur.fetchone()
        return str(row[0]) if row else ""

    async def restart(self, instance_id: str) -> str:
        """See :meth:`Client.restart`."""
        cur = await self.conn.execute(_RESTART, (instance_id,))
        row = await cur.fetchone()
        return str(row[0]) if row else ""

    async def signal(self, instance_id: str, name: str, data: Any = None) -> None:
        """See :meth:`Client.signal`."""
        await self.conn.execute(_SIGNAL, (instance_id, name, _signal_data(data)))

    async def list(
        self,
        status: str | None = None,
        label: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> Page:
        """See :meth:`Client.list`."""
        cur = self.conn.cursor(row_factory=dict_row)
        await cur.execute(_LIST, (status, limit, label, after))
        return _page(await cur.fetchall())

    async def _state(self, instance_id: str) -> tuple[str, str | None]:
        cur = await self.conn.execute(_STATE, (instance_id,))
        return _state_of(instance_id, await cur.fetchone())
