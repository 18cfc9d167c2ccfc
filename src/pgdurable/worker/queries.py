"""The worker's queries: claims, checkpoints, leases, signals, graphs, retention.

The worker's own connection (the schema owner) claims tasks, heartbeats and loads graphs.
Checkpoints go through ``df._checkpoint_begin`` / ``df._checkpoint`` (schema/engine.sql),
which work on any connection that holds a task's token — the worker's, or a step's
connection logged in as the submitting role. What a checkpoint writes is change.py's.
Rows are read by column name.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from .. import __version__
from ..core.interpreter import Transition
from ..core.model import Graph, GraphError, graph_from_rows
from ..core.state import InstanceState, from_json
from .change import change_of
from .statement import Query

TASKS_CHANNEL = "pgdurable_tasks"
CANCEL_CHANNEL = "pgdurable_cancel"
# Signals to the instance in the payload were committed: wake its waits (wake_signal_waits).
SIGNALS_CHANNEL = "pgdurable_signals"

AsyncConn = AsyncConnection[Any]


@dataclass(frozen=True)
class Task:
    """A claimed unit of work and the instance facts needed to run it."""

    id: int
    token: uuid.UUID
    kind: str  # 'start' | 'sql' | 'http' | 'call' | 'timer' | 'signal' | 'restart'
    activation: int
    node_id: str | None
    payload: dict[str, Any] | None
    attempts: int
    instance_id: str
    role: str  # submitted_by, as a role name
    role_oid: int  # and as the role's oid, which a rename or a drop and re-create tells apart
    database: str | None
    label: str | None
    # When the instance was created: with its id, it tells apart an instance from a later one
    # that got the same id after the first was purged (ids are 32 random bits).
    created_at: datetime | None = None
    deferrals: int = 0  # times given back because its checkpoint could not get a lock
    # The instance's state as this worker's own checkpoint left it, when that checkpoint
    # leased this task and it is the instance's only task: its checkpoint needs no
    # df._checkpoint_begin then (see df._checkpoint).
    known: Known | None = None
    # A start task's instance as df._start_facts read it at the claim (the facts and nodes of
    # graph_queries, the variables, the time), or None: read them the usual way.
    start: dict[str, Any] | None = None
    # Of a claimed task (None, False for one a checkpoint leased): the seconds from when it
    # became due to the claim, and whether a lease had run out on it. For the metrics.
    waited: float | None = None
    lease_expired: bool = False


@dataclass(frozen=True)
class Known:
    """An instance's interpreter input as the checkpoint that leased a task wrote it."""

    state: InstanceState
    variables: dict[str, str]
    version: int  # the instance's checkpoint count after that checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """What df._checkpoint_begin returns: the locked instance's status and interpreter input."""

    instance_status: str
    state: InstanceState | None
    variables: dict[str, str]
    now: float
    role_exists: bool


# The fair claim is df._claim (schema/engine.sql): a plpgsql function, so that its plan is made
# once per session rather than at every call (PostgreSQL re-plans this query for each set of
# parameter values otherwise, which cost more than running it).
_CLAIM = """
SELECT id, token, kind, activation, node_id, payload, attempts, instance_id, role, role_oid,
       database, label, created_at, deferrals, start, waited, lease_expired
  FROM df._claim(%(worker)s, %(limit)s, %(lease)s, %(cap)s, %(held_roles)s::oid[],
                 %(held_slots)s::int[], %(names)s::text[])
"""


async def claim(
    conn: AsyncConn,
    worker: uuid.UUID,
    limit: int,
    lease: float,
    held: Mapping[int, int] | None = None,
    cap: int | None = None,
    names: Sequence[str] = (),
) -> list[Task]:
    """Lease up to ``limit`` due tasks to ``worker`` (FOR UPDATE SKIP LOCKED), shared fairly
    between roles: ``held`` maps role oids to the slots each holds in this worker already,
    and no role ends up holding more than ``cap`` (None: no cap). Python steps are leased
    only if ``names`` (the worker's) has theirs."""
    held = held or {}
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        _CLAIM,
        {
            "worker": worker,
            "limit": limit,
            "lease": lease,
            "cap": cap if cap is not None else 2**31 - 1,
            "held_roles": list(held),
            "held_slots": list(held.values()),
            "names": list(names),
        },
    )
    return [Task(**row) for row in await cur.fetchall()]


async def waiting_roles(conn: AsyncConn, names: Sequence[str] = ()) -> set[int]:
    """The roles that have due tasks no worker holds, that a worker with the Python steps
    ``names`` could run (df._waiting_queues): a worker whose slots are all taken asks, to know
    whether its steps' follow-ups must make room for them."""
    cur = await conn.execute(
        "SELECT DISTINCT role_oid FROM df._waiting_queues(%s::text[])", (list(names),)
    )
    return {int(row[0]) for row in await cur.fetchall()}


# A task whose checkpoint could not get a lock (a tenant holds its instance row, say) goes
# back to the queue: 0.25 s, doubling with each deferral, at most 10 s, with some jitter so
# that many deferred tasks do not come back together. Never waiting itself: a tenant can hold
# the task row too (a df.cancel left uncommitted deleted it); then the lease runs out.
_DEFER = """
UPDATE df._tasks t
   SET lease_owner = NULL, token = NULL, deferrals = t.deferrals + 1,
       visible_at = now() + make_interval(secs => least(10, 0.25 * 2 ^ least(t.deferrals, 8))
                                                  * (0.75 + random() / 2))
  FROM (SELECT id FROM df._tasks WHERE id = %s AND token = %s FOR UPDATE SKIP LOCKED) mine
 WHERE t.id = mine.id
"""


async def defer(conn: AsyncConn, task: Task) -> None:
    """Give ``task`` back to the queue for a later try (see _DEFER)."""
    await conn.execute(_DEFER, (task.id, task.token))


CHECKPOINT_BEGIN = "SELECT * FROM df._checkpoint_begin(%s, %s)"
# What a step whose state is known still asks, after its statement (df._checkpoint_begin's
# time and role check, without the lock and the state). It runs in the step's session, which
# the statement may have given another search_path: every name is qualified.
STEP_FACTS = """
SELECT pg_catalog.date_part('epoch', pg_catalog.clock_timestamp())::pg_catalog.float8 AS now,
       EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) %s)
           AS role_exists
"""
TASK_FACTS = "SELECT * FROM df._task_facts(%s, %s)"  # its answer, without the locks

# The statement_timeout backstop of a step under a df.timeout: the deadline (epoch seconds,
# the database clock) plus a grace, never looser than the role's own statement_timeout, and
# within the setting's range.
LIMIT_STATEMENT = """
SELECT set_config('statement_timeout', greatest(1, least(
           2147483647,
           ((%s::float8 - extract(epoch FROM clock_timestamp())) * 1000)::bigint,
           (SELECT nullif(setting::bigint, 0) FROM pg_settings WHERE name = 'statement_timeout')
       ))::text, true)
"""
CHECKPOINT = "SELECT * FROM df._checkpoint(%s, %s, %s, %s, %s, %s)"


def checkpoint_begin_params(task: Task) -> tuple[Any, ...]:
    """Parameters of CHECKPOINT_BEGIN for ``task``."""
    return (task.id, task.token)


def checkpoint_from_row(row: Mapping[str, Any] | None) -> Checkpoint | None:
    """CHECKPOINT_BEGIN's answer; None means the task is no longer ours (roll back then)."""
    if row is None:
        return None
    return Checkpoint(
        row["instance_status"],
        from_json(row["state"]),
        row["vars"] or {},
        row["now"],
        row["role_exists"],
    )


def checkpoint_of_known(known: Known, row: Mapping[str, Any]) -> Checkpoint:
    """A Checkpoint of a task's ``known`` state and STEP_FACTS' answer ``row``."""
    return Checkpoint("running", known.state, known.variables, row["now"], row["role_exists"])


async def checkpoint_begin(conn: AsyncConn, task: Task) -> Checkpoint | None:
    """Lock the task's instance; None if the task is no longer ours (roll back then)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(CHECKPOINT_BEGIN, checkpoint_begin_params(task), prepare=False)
    return checkpoint_from_row(await cur.fetchone())


async def tasks_still_held(pool: AsyncConnectionPool[Any], tasks: list[Task]) -> set[int]:
    """The ids of ``tasks`` still in df._tasks under the token they were claimed with."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT t.id FROM df._tasks t"
            "  JOIN unnest(%s::bigint[], %s::uuid[]) AS c (id, token)"
            "    ON t.id = c.id AND t.token = c.token",
            ([t.id for t in tasks], [t.token for t in tasks]),
        )
        return {row[0] for row in await cur.fetchall()}


MAX_STATE_BYTES_SETTING = "pg_durable.max_state_bytes"
DEFAULT_MAX_STATE_BYTES = 64 * 1024 * 1024


class StateTooLarge(Exception):
    """A checkpoint would write more than ``pg_durable.max_state_bytes``: the interpreter
    state holds every named result, and the results of JOIN branches until their JOIN ends,
    and each checkpoint rewrites it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        super().__init__(
            f"the instance's state would be larger than {max_bytes} bytes"
            f" ({MAX_STATE_BYTES_SETTING}): it holds too many or too large results"
        )


def checkpoint_params(
    task: Task,
    transition: Transition,
    worker: uuid.UUID,
    claim_limit: int,
    lease: float,
    max_bytes: int = DEFAULT_MAX_STATE_BYTES,
    version: int | None = None,
    steps: Collection[str] = (),
) -> tuple[Any, ...]:
    """Parameters of CHECKPOINT: write ``transition``, retire ``task``, lease follow-ups
    (Python steps only if ``steps``, the worker's, has them); ``version``: the instance's
    checkpoint count the transition was computed after, when it was computed from
    ``task.known`` rather than under df._checkpoint_begin's lock. Raises
    :class:`StateTooLarge` if the change is larger than ``max_bytes``."""
    text = change_of(transition, version, steps).to_json()  # once, here, to check its size
    if len(text) > max_bytes or (not text.isascii() and len(text.encode()) > max_bytes):
        raise StateTooLarge(max_bytes)
    change = Jsonb(None, dumps=lambda _: text)
    return (task.id, task.token, change, worker, claim_limit, lease)


def followups(
    rows: Sequence[Mapping[str, Any]],
    previous: Task,
    transition: Transition,
    variables: dict[str, str],
) -> list[Task]:
    """CHECKPOINT's answer: the new tasks leased to us, as Task objects of the same instance.
    A SQL step that is now the instance's only task knows the state ``transition`` left."""
    known = None
    state = transition.next_state
    if (
        len(rows) == 1
        and rows[0]["kind"] == "sql"
        and transition.outcome is None
        and state is not None
        and state.single_path()
    ):
        known = Known(state, variables, rows[0]["checkpoints"])
    return [
        Task(
            id=r["task_id"],
            token=r["token"],
            kind=r["kind"],
            activation=r["activation"],
            node_id=r["node_id"],
            payload=r["payload"],
            attempts=r["attempts"],
            instance_id=previous.instance_id,
            role=previous.role,
            role_oid=previous.role_oid,
            database=previous.database,
            label=previous.label,
            created_at=previous.created_at,
            known=known,
        )
        for r in rows
    ]


@dataclass(frozen=True)
class Signal:
    """A signal a wait consumed: its data, unless it was bigger than the wait could take."""

    data: Any
    size: int  # bytes of its JSON text
    too_large: bool


async def consume_signal(conn: AsyncConn, task: Task, name: str, max_bytes: int) -> Signal | None:
    """Take the oldest unconsumed signal ``name`` of the task's instance, or None if there is
    none. Data bigger than ``max_bytes`` never leaves the server (the signal is consumed).

    Called in the checkpoint transaction, under the instance lock that the worker waking
    signalled waits also takes, so a signal is either seen here or wakes the re-armed wait
    afterwards (signals.sql).
    """
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT data, data_bytes FROM df._consume_signal(%s, %s, %s, %s)",
        (task.instance_id, name, task.activation, max_bytes),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    size = int(row["data_bytes"])
    return Signal(row["data"], size, size > max_bytes)


async def wake_signal_waits(conn: AsyncConn, instances: list[str] | None) -> list[str]:
    """Make the sleeping waits of ``instances`` that have a signal buffered due now (None:
    sweep every instance). Returns those whose row was locked just then: try them again
    shortly (df._wake_signal_waits, signals.sql, says why that loses no wake-up)."""
    cur = await conn.execute(
        "SELECT * FROM df._wake_signal_waits(%s::text[])", (instances,), prepare=False
    )
    return [str(row[0]) for row in await cur.fetchall()]


async def rearm(conn: AsyncConn, task: Task) -> None:
    """Put a signal wait back to sleep until its deadline (or for ever) and free its lease."""
    deadline = (task.payload or {}).get("deadline")
    await conn.execute(
        "UPDATE df._tasks SET lease_owner = NULL, token = NULL,"
        " visible_at = coalesce(to_timestamp(%s), 'infinity')"
        " WHERE id = %s AND token = %s",
        (deadline, task.id, task.token),
    )


def graph_queries(
    instance_id: str, max_bytes: int = DEFAULT_MAX_STATE_BYTES, vars_size: bool = True
) -> list[Query]:
    """The two queries that read an instance's graph, to send in one pipeline: its facts, and
    its nodes (none when their texts are larger than ``max_bytes``, so that a huge graph is
    refused before it is read). :func:`graph_from_rows_of` makes the graph of their rows.

    Without ``vars_size`` they leave out the size of the instance's variables (NULL), which
    only the engine may read: they then run as the submitter too."""
    vars_bytes = (
        "(SELECT octet_length(u.vars::text) FROM df._runs u WHERE u.instance_id = i.id)"
        if vars_size
        else "NULL::integer"
    )
    return [
        Query(
            """
            SELECT i.root_node, i.label, i.created_at,
                   coalesce(r.rolname, i.submitted_by::text) AS role,
                   r.oid IS NOT NULL AS role_exists, coalesce(r.rolsuper, false) AS superuser,
                   (SELECT coalesce(sum(coalesce(octet_length(n.query), 0)
                                       + coalesce(octet_length(n.result_name), 0)), 0)
                      FROM df.nodes n WHERE n.instance_id = i.id) AS graph_bytes,
                   """
            + vars_bytes
            + """ AS vars_bytes
              FROM df.instances i LEFT JOIN pg_roles r ON r.oid = i.submitted_by
             WHERE i.id = %s
            """,
            (instance_id,),
        ),
        Query(
            """
            SELECT id, node_type, query, result_name, left_node, right_node
              FROM df.nodes
             WHERE instance_id = %s
               AND (SELECT coalesce(sum(coalesce(octet_length(n.query), 0)
                                       + coalesce(octet_length(n.result_name), 0)), 0)
                      FROM df.nodes n WHERE n.instance_id = %s) <= %s
            """,
            (instance_id, instance_id, max_bytes),
        ),
    ]


def graph_from_rows_of(
    instance_id: str,
    facts: Sequence[Mapping[str, Any]],
    nodes: Sequence[Mapping[str, Any]],
    max_bytes: int = DEFAULT_MAX_STATE_BYTES,
) -> tuple[Graph, dict[str, Any]]:
    """An instance's graph and facts from the rows of :func:`graph_queries`: role
    existence, superuser-ness, label, created_at, and the size of its variables' snapshot
    (``vars_bytes``). Raises LookupError (no such instance) or GraphError."""
    if not facts:
        raise LookupError(f"Instance {instance_id} not found")
    first = dict(facts[0])
    if first["graph_bytes"] > max_bytes:
        raise GraphError(
            f"its graph's texts are larger than {max_bytes} bytes ({MAX_STATE_BYTES_SETTING})"
        )
    graph = graph_from_rows(instance_id, first["root_node"], nodes, first["label"])
    return graph, first


async def setting(conn: AsyncConn, name: str) -> str | None:
    """A pg_durable.* setting as this connection sees it (server configuration), or None."""
    cur = await conn.execute("SELECT current_setting(%s, true)", (name,))
    row = await cur.fetchone()
    return row[0] if row and row[0] not in (None, "") else None


async def purge_finished(conn: AsyncConn, retention_days: int, keep: int, batch: int) -> int | None:
    """Remove one batch of finished instances past retention (df._purge_finished), in a transaction
    of its own; how many it removed, or None if another session is purging right now."""
    cur = await conn.execute(
        "SELECT df._purge_finished(%s, %s, %s)", (retention_days, keep, batch), prepare=False
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def continuation_key(conn: AsyncConn) -> str:
    """The key df.continue_with signs graphs with (df._keys; the owner's alone)."""
    cur = await conn.execute("SELECT secret FROM df._keys WHERE name = 'continue_with'")
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def register_worker(
    conn: AsyncConn,
    worker: uuid.UUID,
    concurrency: int,
    session_lock: int | None = None,
    names: Sequence[str] = (),
) -> None:
    """Record this worker, with the names of its Python steps, in df._worker_epoch and mark
    the engine ready in _duroxide._worker_ready, the table scripts written for pg_durable
    wait for.

    Rows of workers silent for ten minutes (killed, not stopped) are swept on the way.
    """
    await conn.execute(
        "DELETE FROM df._worker_epoch WHERE last_seen_at < now() - interval '10 minutes'"
    )
    await conn.execute(
        """
        INSERT INTO df._worker_epoch
               (epoch_id, hostname, pid, concurrency, version, session_lock, step_names)
        VALUES (%s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (epoch_id) DO NOTHING
        """,
        (
            worker,
            socket.gethostname(),
            os.getpid(),
            concurrency,
            __version__,
            session_lock,
            list(names),
        ),
    )
    await conn.execute(
        """
        INSERT INTO _duroxide._worker_ready (schema_version) VALUES (1)
        ON CONFLICT (sentinel) DO NOTHING
        """
    )


async def hold_session_lock(conn: AsyncConn, worker: uuid.UUID, key: int) -> bool:
    """Take advisory lock ``key`` for as long as ``conn``'s session lives and record it as
    ``worker``'s: while it is held, others know the worker lives (df._release_dead_workers).
    False if someone else holds that key, or the worker's row is gone (given up for dead
    while this session was away: register again)."""
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cur.fetchone()
    if not (row and row[0]):
        return False
    cur = await conn.execute(
        "UPDATE df._worker_epoch SET session_lock = %s WHERE epoch_id = %s", (key, worker)
    )
    return cur.rowcount == 1


async def release_dead_workers(conn: AsyncConn) -> int:
    """Give back the tasks of workers whose session ended; returns how many."""
    cur = await conn.execute("SELECT df._release_dead_workers()")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def heartbeat(conn: AsyncConn, worker: uuid.UUID, task_ids: list[int], lease: float) -> bool:
    """Extend the leases of tasks in flight and show this worker is alive. False if its row
    is gone (it was given up for dead: register again)."""
    if task_ids:
        # Rows in id order, skipping those a checkpoint or df.cancel holds (they are being
        # retired): no lock-order deadlock with either.
        await conn.execute(
            "UPDATE df._tasks t SET visible_at = now() + make_interval(secs => %s)"
            " FROM (SELECT id FROM df._tasks WHERE lease_owner = %s AND id = ANY(%s)"
            "       ORDER BY id FOR UPDATE SKIP LOCKED) held"
            " WHERE t.id = held.id",
            (lease, worker, task_ids),
        )
    cur = await conn.execute(
        "UPDATE df._worker_epoch SET last_seen_at = now() WHERE epoch_id = %s", (worker,)
    )
    return cur.rowcount == 1


async def release(conn: AsyncConn, worker: uuid.UUID) -> None:
    """Give back every task this worker holds, so others pick them up at once (those someone
    holds locked keep their leases, which run out)."""
    await conn.execute(
        "UPDATE df._tasks t SET visible_at = now(), lease_owner = NULL, token = NULL"
        " FROM (SELECT id FROM df._tasks WHERE lease_owner = %s"
        "       ORDER BY id FOR UPDATE SKIP LOCKED) mine"
        " WHERE t.id = mine.id",
        (worker,),
    )
    await conn.execute("DELETE FROM df._worker_epoch WHERE epoch_id = %s", (worker,))
    await conn.execute("SELECT pg_notify(%s, '')", (TASKS_CHANNEL,))
