"""Connections of a worker: its own pool, and one pool per (role, database) for SQL steps.

A SQL step runs on a connection *logged in as* the role that submitted the instance
(DESIGN.md principle 3), never behind SET ROLE, which the user's SQL could undo. How the
worker proves it is that role is libpq's business: trust or peer on a local socket (the
embedded server), or a password from a passfile (PGPASSFILE / ~/.pgpass) on managed
PostgreSQL. In single-role mode every step uses the worker's own credentials, and only
instances submitted by that role are run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .results import configure_connection

log = logging.getLogger("pgdurable.worker")

STEP_APPLICATION_NAME = "pg_durable:worker:workflow-sql"
WORKER_APPLICATION_NAME = "pgdurable:worker"

# Errors that say the database (not the step) is in trouble: the step is retried once the
# server is reachable again, never failed. Class 08 is connection exceptions, 57P0x shutdowns
# and "starting up", 53300 too many connections.
_TRANSIENT_STATES = {"57P01", "57P02", "57P03", "53300"}


# What DISCARD ALL does, in statements allowed inside a transaction block, so a step resets
# its session in the transaction that commits it instead of in one more round trip. A step may
# SET things, SET ROLE to a role it is a member of, create temp tables, LISTEN or take advisory
# locks; none of that may reach the next step on this connection. Not DISCARD PLANS: it would
# make PostgreSQL plan the checkpoint functions' statements again for every step, and no plan
# can depend on the session once temp tables and settings are reset.
RESET_SESSION = (
    "SET SESSION AUTHORIZATION DEFAULT",
    "RESET ALL",
    "CLOSE ALL",
    "UNLISTEN *",
    "SELECT pg_advisory_unlock_all()",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "DEALLOCATE ALL",
)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means the server is unreachable or restarting."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.Error):
        return isinstance(exc, OSError)
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state.startswith("08") or state in _TRANSIENT_STATES


class StepPool:
    """Idle connections logged in as one role to one database.

    psycopg_pool connects in the background and reports a failed login only as a timeout;
    a step must fail at once with the server's own message (a dropped role, a missing
    database), so step connections are opened in the caller and only idle ones are kept.
    """

    def __init__(self, conninfo: str, max_idle: int):
        self.conninfo = conninfo
        self.max_idle = max_idle
        self._idle: list[tuple[AsyncConnection[Any], float]] = []

    async def acquire(self) -> AsyncConnection[Any]:
        """An idle connection, or a new one (raises the server's error if login fails)."""
        while self._idle:
            conn, _ = self._idle.pop()
            if not conn.closed:
                return conn
        conn = await AsyncConnection.connect(
            self.conninfo, autocommit=True, prepare_threshold=None, connect_timeout=30
        )
        configure_connection(conn)
        return conn

    async def release(self, conn: AsyncConnection[Any], reusable: bool, clean: bool) -> None:
        """Return a connection after a step: kept if ``reusable``, reset unless ``clean``
        (the step already ran RESET_SESSION in its transaction), closed otherwise."""
        if reusable and not conn.closed and len(self._idle) < self.max_idle:
            try:
                if not clean:
                    await conn.execute("DISCARD ALL")
            except psycopg.Error:
                pass
            else:
                self._idle.append((conn, time.monotonic()))
                return
        await conn.close()

    async def prune(self, idle_seconds: float) -> None:
        """Close connections idle for longer than ``idle_seconds``."""
        cutoff = time.monotonic() - idle_seconds
        keep = []
        for conn, since in self._idle:
            if since < cutoff:
                await conn.close()
            else:
                keep.append((conn, since))
        self._idle = keep

    async def close(self) -> None:
        """Close every idle connection."""
        await self.prune(-1)


class Connections:
    """The worker's pool for its own queries and the step pools, closed together."""

    def __init__(self, dsn: str, concurrency: int, lease_seconds: float, single_role: bool = False):
        self.dsn = dsn
        self.concurrency = concurrency
        self.single_role = single_role
        params = conninfo_to_dict(dsn)
        self.worker_role: str = str(params.get("user") or "")
        self.worker_database: str = str(params.get("dbname") or "")
        self._dsn_options = str(params.get("options") or "")
        # A worker that freezes (SIGSTOP, a stalled VM) between the two halves of a checkpoint
        # would keep its instance locked; the server ends such a session once the lease is
        # over, so another worker can take the task over.
        self._idle_timeout_ms = int(lease_seconds * 1000)
        self.worker = AsyncConnectionPool(
            make_conninfo(dsn, application_name=WORKER_APPLICATION_NAME, options=self._options()),
            min_size=1,
            max_size=concurrency + 2,
            kwargs={"autocommit": True},
            open=False,
            name="pgdurable-worker",
        )
        self._steps: dict[tuple[str, str | None], StepPool] = {}

    def _options(self, extra: str = "") -> str:
        """libpq ``options`` for our connections: the DSN's own, then ours."""
        # READ COMMITTED whatever the role's default: a checkpoint must see (and lock) rows
        # other checkpoints committed while it waited, or a signal could be missed.
        ours = (
            f"-c idle_in_transaction_session_timeout={self._idle_timeout_ms}"
            f" -c default_transaction_isolation=read\\ committed {extra}"
        )
        return f"{self._dsn_options} {ours}".strip()

    async def open(self) -> None:
        """Open the worker pool (waits until the first connection succeeds)."""
        await self.worker.open(wait=True, timeout=30)

    async def close(self) -> None:
        """Close every pool."""
        for pool in self._steps.values():
            await pool.close()
        await self.worker.close()

    def step_pool(self, role: str, database: str | None) -> StepPool:
        """Connections logged in as ``role`` to ``database`` (None: the worker's database)."""
        key = (role, database)
        pool = self._steps.get(key)
        if pool is None:
            user = self.worker_role if self.single_role else role
            conninfo = make_conninfo(
                self.dsn,
                user=user,
                dbname=database or self.worker_database,
                application_name=STEP_APPLICATION_NAME,
                # Part of the session defaults, so DISCARD ALL between steps keeps it.
                options=self._options("-c df.in_workflow=true"),
            )
            pool = StepPool(conninfo, max_idle=self.concurrency)
            self._steps[key] = pool
        return pool

    async def prune(self, idle_seconds: float) -> None:
        """Close step connections idle for longer than ``idle_seconds``."""
        for pool in self._steps.values():
            await pool.prune(idle_seconds)
