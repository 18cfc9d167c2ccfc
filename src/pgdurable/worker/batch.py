"""Steps of one role run together: one transaction and one commit for several instances.

A step costs the database less for each step it shares a transaction with: the BEGIN, the
clock, the COMMIT and its WAL flush, the round trips. So SQL steps that are ready at once and
run as the same role may run in a batch, on one connection logged in as that role, in two
round trips for all of them:

    [BEGIN, statement 1, session reset, ..., statement n, session reset,
     STEP_FACTS, df._checkpoint_begin of each step whose state is not known]
    [df._checkpoint of each step, COMMIT]

The session reset after each statement gives the next one the session a step running alone
would find (settings, temp tables, SET ROLE, advisory locks: df._reset_session). The instances
are locked after all the statements, in the order of their ids, and all the statements take
effect with their checkpoints, or none does.

Anything unplanned -- a statement that fails, a result that cannot be recorded, a role
dropped, a task taken away or a state that moved on, a lock not granted, a deadlock between
two batches' statements, an error at COMMIT, a cancel -- rolls the whole batch back, and each
of its steps then runs again alone, on the path that knows what to make of it. So a step in a
batch takes effect exactly once, as it does alone.

Batches are for a worker with more work than slots, and for quick statements: a batch's steps
wait for each other's statements. So a step runs alone when the worker has slots to spare, or
when its role ran a slow statement lately or none yet on this worker. A batch holds one step
of an instance at most, and only SQL steps in the worker's own database without a deadline
(df.timeout), and no JOIN branch whose siblings run here: steps.py says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from . import queries
from .connections import RESET_SESSION, Connections
from .queries import AsyncConn, Task
from .results import ResultError
from .statement import BEGIN, COMMIT, Query, run_queries, run_statements

log = logging.getLogger("pgdurable.worker")

DEFAULT_BATCH_SIZE = 5
"""The most steps in a batch, unless the worker is told otherwise (``--batch-size``): enough
to share a commit's cost; few enough that a worker's batches alternate, one in the database
while the worker prepares another's checkpoints, and that a slow statement holds few others
back."""
MAX_BATCH_SIZE = 64  # past this a commit's cost is shared thinly enough; locks held longer
SLOW_STATEMENT_SECONDS = 0.2
SLOW_ROLE_SECONDS = 10.0
"""A role that ran a statement slower than SLOW_STATEMENT_SECONDS (its round trip, or a batch's
divided by its steps) in the last SLOW_ROLE_SECONDS runs its steps alone, as does one that has
not run a statement on the worker yet: a batch saves well under a millisecond a step, and
makes each of its steps wait for the others' statements (five one-second steps: five seconds
each). Not much less: on a loaded machine a quick statement's round trip alone can take tens
of milliseconds (at 20 and 50 ms, bench/run.py's sql1 on 4 workers lost most of its batches)."""

# What turns a checkpoint's rows into the follow-up Tasks it leased.
Followups = Callable[[list[dict[str, Any]]], list[Task]]
# A step's checkpoint, for its statement's result, the clock after the batch's statements and
# the rows of its lock query (none without one): its queries (the last one's rows are the
# follow-ups leased), and their Followups. Raises queries.StateTooLarge for a state too large
# to record, Undone for a step that cannot commit as it is.
Checkpointer = Callable[[str, float, list[dict[str, Any]]], tuple[list[Query], Followups]]


@dataclass
class Running:
    """A step statement about to run or in flight, and the cancel request sent to it."""

    task: Task
    conn: AsyncConn | None = None  # None while the step's connection is being opened
    cancel_early: bool = False  # withdrawn before its statement was sent
    cancelling: asyncio.Future[None] | None = None


class Undone(Exception):
    """A batch cannot commit as it is; its steps run alone."""


@dataclass
class Member:
    """A step of a batch, and what came of it: its follow-ups, or None to run it alone."""

    task: Task
    sql: str
    lock: Query | None  # sent after the statements; its rows go to the checkpoint
    checkpoint: Checkpointer
    outcome: asyncio.Future[list[Task] | None]


class Batches:
    """Gathers the steps of each role that are ready at once, and runs them (see module)."""

    def __init__(
        self,
        conns: Connections,
        statements: dict[int, Running],
        max_bytes: int,
        size: int,
        busy: Callable[[], bool],
    ):
        self.conns = conns
        self.size = size  # the most steps in a batch (1: none runs in one)
        self._busy = busy  # whether the worker has more work than slots
        self._statements = statements  # the runner's: task id -> its statement in flight
        self._max_bytes = max_bytes
        self._forming: dict[tuple[int, str | None], list[Member]] = {}
        # Until when each role runs alone, since a statement of it was slow (monotonic); a
        # role not in it has not run a statement on this worker yet, and runs alone too.
        self._slow_until: dict[tuple[int, str | None], float] = {}

    def record(self, task: Task, seconds: float) -> None:
        """A statement of ``task``'s role took ``seconds`` (its round trip)."""
        key = (task.role_oid, task.database)
        if seconds > SLOW_STATEMENT_SECONDS:
            self._slow_until[key] = time.monotonic() + SLOW_ROLE_SECONDS
        else:
            self._slow_until.setdefault(key, 0.0)

    def _quick(self, key: tuple[int, str | None]) -> bool:
        """Whether the role's statements have been quick here lately."""
        until = self._slow_until.get(key)
        return until is not None and until <= time.monotonic()

    async def run(
        self, task: Task, sql: str, lock: Query | None, checkpoint: Checkpointer
    ) -> list[Task] | None:
        """Run ``task``'s statement ``sql`` in a batch with other steps of its role, then
        its ``lock`` query (if any), then its ``checkpoint``: its follow-ups, or None when it
        is to run alone (no other step came, or the batch did not commit).

        Steps made ready together -- by one claim, or by the commit of the batch before -- ask
        in the same round of the event loop. The first one to ask leads: it waits one more
        round for the others to join, then runs the batch. Only while the worker has more work
        than slots, and for a role whose statements are quick: a batch's steps wait for each
        other, so a worker with slots to spare, or a slow statement, runs alone, sooner.
        """
        member = Member(task, sql, lock, checkpoint, asyncio.get_running_loop().create_future())
        key = (task.role_oid, task.database)
        forming = self._forming.get(key)
        if (
            forming is not None
            and len(forming) < self.size
            and all(m.task.instance_id != task.instance_id for m in forming)
        ):
            forming.append(member)
            return await member.outcome
        if self.size < 2 or not self._busy():
            return None
        if not self._quick(key):
            return None
        batch = self._forming[key] = [member]
        try:
            try:
                await asyncio.sleep(0)
            finally:
                if self._forming.get(key) is batch:
                    del self._forming[key]
            if len(batch) > 1:
                await self._run(batch)
        finally:
            for each in batch:  # what did not commit runs alone
                if not each.outcome.done():
                    each.outcome.set_result(None)
        return member.outcome.result()

    async def _run(self, batch: list[Member]) -> None:
        """Run ``batch`` in one transaction; set the outcome of each step that committed."""
        batch.sort(key=lambda m: m.task.instance_id)  # instance locks taken in one order
        first = batch[0].task
        pool = self.conns.step_pool(first.role, first.role_oid, first.database)
        running = [Running(m.task) for m in batch]
        for each in running:
            self._statements[each.task.id] = each  # so a cancel meanwhile is not missed
        try:
            conn = await pool.acquire()
        except psycopg.Error as exc:
            self._forget(running)
            log.debug("a batch could not log in (%s); its steps run alone", exc)
            return
        reusable, clean = False, False
        try:
            members = []
            for member, each in zip(batch, running, strict=True):
                each.conn = conn
                if each.cancel_early:
                    member.outcome.set_result([])  # withdrawn before anything was sent
                else:
                    members.append(member)
            parts: list[Query | bytes] = [BEGIN]
            for member in members:
                parts += [member.sql.encode(conn.info.encoding), *map(Query, RESET_SESSION)]
            facts_at = len(parts)
            parts.append(Query(queries.STEP_FACTS, (first.role_oid,)))
            parts += [m.lock for m in members if m.lock is not None]
            began = time.monotonic()
            try:
                answers = await run_statements(conn, parts, self._max_bytes)
            finally:
                await self._settle(running)
            self.record(first, (time.monotonic() - began) / max(len(members), 1))
            [facts] = _rows(answers[facts_at])
            if not facts["role_exists"]:
                raise Undone("the role was dropped")
            sent, readers = [], []
            locked = facts_at + 1
            for number, member in enumerate(members):
                result = answers[1 + number * (1 + len(RESET_SESSION))]
                assert isinstance(result, str)
                rows = []
                if member.lock is not None:
                    rows, locked = _rows(answers[locked]), locked + 1
                checkpoint, reader = member.checkpoint(result, facts["now"], rows)
                sent += checkpoint
                readers.append((len(sent) - 1, reader))
            leased = await run_queries(conn, [*sent, COMMIT])
            reusable, clean = True, True
            for member, (index, reader) in zip(members, readers, strict=True):
                if not member.outcome.done():
                    member.outcome.set_result(reader(leased[index]))
        except (
            psycopg.Error,
            ResultError,
            UnicodeEncodeError,
            queries.StateTooLarge,
            Undone,
        ) as exc:
            log.debug("a batch of %d steps rolled back (%s); they run alone", len(batch), exc)
            if not conn.closed:
                with contextlib.suppress(psycopg.Error):
                    await conn.execute("ROLLBACK")
                    reusable = True
        finally:
            await pool.release(conn, reusable, clean)

    def _forget(self, running: list[Running]) -> None:
        for each in running:
            if self._statements.get(each.task.id) is each:
                del self._statements[each.task.id]

    async def _settle(self, running: list[Running]) -> None:
        """The statements are over: no cancel may target them now, and the cancels sent
        meanwhile must have reached the server before the connection is used again."""
        self._forget(running)
        for each in running:
            if each.cancelling is not None:
                await asyncio.wait([each.cancelling])


def _rows(answer: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one of our queries in run_statements' answers."""
    assert isinstance(answer, list)
    return answer
