"""Connections of a worker: its own pool, and one pool per (role, database) for SQL steps.

A SQL step runs on a connection *logged in as* the role that submitted the instance
(docs/roles.md), never behind SET ROLE, which the user's SQL could undo. How the
worker proves it is that role is libpq's business: trust or peer on a local socket (the
embedded server), or a password from a passfile (PGPASSFILE / ~/.pgpass) on managed
PostgreSQL. In single-role mode every step uses the worker's own credentials, and only
instances submitted by that role are run.

Idle step connections to the worker's own database are kept for a while (a step costs no
login); those to any other database are closed after about a second, because an idle
session in a database makes a plain DROP DATABASE of it fail.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .results import configure_connection
from .statement import forget_prepared

log = logging.getLogger("pgdurable.worker")

STEP_APPLICATION_NAME = "pg_durable:worker:workflow-sql"
WORKER_APPLICATION_NAME = "pgdurable:worker"
# The lock waits of the worker's own connections; the checkpoint functions set their own.
WORKER_LOCK_TIMEOUT = "1s"

# Errors that say the database (not the step) is in trouble: the step is retried once the
# server is reachable again, never failed. Class 08 is connection exceptions, 57P0x shutdowns
# and "starting up", 53300 too many connections.
_TRANSIENT_STATES = {"57P01", "57P02", "57P03", "53300"}


# What a SQL step sends after its checkpoint, in the transaction that commits it: the session
# reset (docs/engine.md; df._reset_session says what it resets and why CLOSE ALL is apart).
RESET_SESSION = ("SELECT df._reset_session()", "CLOSE ALL")


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

    def __init__(self, conninfo: str, max_idle: int, idle_seconds: float):
        self.conninfo = conninfo
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds  # how long an idle connection is kept
        self.in_use = 0  # connections handed out (or being opened) and not released yet
        self._idle: list[tuple[AsyncConnection[Any], float]] = []

    @property
    def unused(self) -> bool:
        """True when the pool holds no connection and has none handed out."""
        return not self._idle and not self.in_use

    async def acquire(self) -> AsyncConnection[Any]:
        """An idle connection, or a new one (raises the server's error if login fails)."""
        while self._idle:
            conn, _ = self._idle.pop()
            if not conn.closed:
                self.in_use += 1
                return conn
        # Counted before the login is awaited, so that the pool is not forgotten meanwhile:
        # a connection released into a forgotten pool would never be closed.
        self.in_use += 1
        try:
            conn = await AsyncConnection.connect(
                self.conninfo, autocommit=True, prepare_threshold=None, connect_timeout=30
            )
            configure_connection(conn)
        except BaseException:
            self.in_use -= 1
            raise
        return conn

    async def release(self, conn: AsyncConnection[Any], reusable: bool, clean: bool) -> None:
        """Return a connection after a step: kept if ``reusable``, reset unless ``clean``
        (the step already ran RESET_SESSION in its transaction), closed otherwise."""
        try:
            if reusable and not conn.closed and len(self._idle) < self.max_idle:
                try:
                    if not clean:
                        await conn.execute("DISCARD ALL")
                        forget_prepared(conn)
                except psycopg.Error:
                    pass
                else:
                    self._idle.append((conn, time.monotonic()))
                    return
            await conn.close()
        finally:
            self.in_use -= 1

    async def drop_idle(self) -> None:
        """Close every idle connection: one was found dead, and the others were most likely
        lost with it (a server restart), while they still look open until used."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            with contextlib.suppress(Exception):
                await conn.close()

    def take_expired(self, now: float) -> list[AsyncConnection[Any]]:
        """Remove and return the connections idle for longer than ``idle_seconds``.

        Synchronous, so a connection released while the expired ones are being closed is
        neither lost nor closed by mistake.
        """
        cutoff = now - self.idle_seconds
        expired = [conn for conn, since in self._idle if since < cutoff]
        if expired:
            self._idle = [(conn, since) for conn, since in self._idle if since >= cutoff]
        return expired

    async def close(self) -> None:
        """Close every idle connection."""
        await self.drop_idle()


class Connections:
    """The worker's pool for its own queries and the step pools, closed together."""

    def __init__(
        self,
        dsn: str,
        concurrency: int,
        lease_seconds: float,
        single_role: bool = False,
        idle_seconds: float = 60.0,
        other_idle_seconds: float = 1.0,
    ):
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
        # The worker's own statements never wait long for a lock: tenants can hold rows of
        # theirs that the engine writes (docs/engine.md, "Failures and restarts").
        self.worker = AsyncConnectionPool(
            make_conninfo(
                dsn,
                application_name=WORKER_APPLICATION_NAME,
                options=self._options(f"-c lock_timeout={WORKER_LOCK_TIMEOUT}"),
            ),
            min_size=1,
            max_size=concurrency + 2,
            # The worker's hot queries are prepared by worker/statement.py. psycopg's own
            # preparing would also send DEALLOCATE ALL after a ROLLBACK, taking those along.
            kwargs={"autocommit": True, "prepare_threshold": None},
            open=False,
            name="pgdurable-worker",
        )
        self._steps: dict[tuple[int, str, str | None], StepPool] = {}
        # How long idle step connections are kept: to the worker's database, and to others.
        self.idle_seconds = idle_seconds
        self.other_idle_seconds = other_idle_seconds

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
        # The DSN may name no database (libpq then picks PGDATABASE or the user's name): ask,
        # so that steps of instances without a database log in to this one, not to a
        # database named after their role.
        async with self.worker.connection() as conn:
            cur = await conn.execute("SELECT current_database()")
            row = await cur.fetchone()
        if row is not None:
            self.worker_database = str(row[0])

    async def close(self) -> None:
        """Close every pool."""
        pools, self._steps = list(self._steps.values()), {}
        for pool in pools:
            await pool.close()
        await self.worker.close()

    def is_own_database(self, database: str | None) -> bool:
        """True when steps of an instance with this ``database`` run in the worker's database,
        the one where the df schema (and so the checkpoint) is."""
        return database is None or database == self.worker_database

    def step_pool(self, role: str, role_oid: int, database: str | None) -> StepPool:
        """Connections logged in as ``role`` to ``database`` (None: the worker's database)."""
        if self.is_own_database(database):
            database = None  # one pool, whether the instance names this database or not
        # Keyed by oid too: after ALTER ROLE alice RENAME TO old_alice and CREATE ROLE alice,
        # the new alice must not get connections still logged in as old_alice.
        key = (role_oid, role, database)
        pool = self._steps.get(key)
        if pool is None:
            user = self.worker_role if self.single_role else role
            conninfo = make_conninfo(
                self.dsn,
                user=user,
                dbname=database or self.worker_database,
                application_name=STEP_APPLICATION_NAME,
                # Part of the session defaults, so DISCARD ALL between steps keeps it.
                # standard_conforming_strings and client_encoding fixed whatever the role's or
                # database's defaults: substituted literals are quoted for exactly these.
                options=self._options(
                    "-c df.in_workflow=true -c standard_conforming_strings=on"
                    " -c client_encoding=UTF8"
                ),
            )
            idle = self.idle_seconds if database is None else self.other_idle_seconds
            pool = StepPool(conninfo, max_idle=self.concurrency, idle_seconds=idle)
            self._steps[key] = pool
        return pool

    async def prune(self) -> None:
        """Close step connections idle for longer than their pool's ``idle_seconds``, and
        forget pools left with nothing: a pool per (role, database) ever seen would otherwise
        pile up, e.g. for databases that were dropped."""
        now = time.monotonic()
        expired: list[AsyncConnection[Any]] = []
        # Collected without awaiting, so steps may take and return connections meanwhile.
        for key, pool in list(self._steps.items()):
            expired += pool.take_expired(now)
            if pool.unused:
                del self._steps[key]
        for conn in expired:
            try:
                await conn.close()
            except Exception as exc:  # the others must still be closed
                log.warning("could not close an idle step connection: %s", exc)
