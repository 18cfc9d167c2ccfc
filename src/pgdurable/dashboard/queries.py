"""The dashboard's SQL: df's functions and tables, read as the dashboard's role.

Every query runs as the role the dashboard connects as (the DSN's, or the one logged in), so
row-level security scopes it exactly as it scopes psql: a role sees its own instances only,
and another role's instance id finds nothing. System-wide data (df.workers, df.metrics) is
read only where the role may execute those functions; :func:`privileges` tells which.

Large texts (a step's SQL, result or error) are cut in SQL, so a huge result is never
fetched whole; each comes with its full length, for the page to say what it left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

Conn = psycopg.AsyncConnection[Any]
Row = dict[str, Any]

TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATUSES = ("pending", "running", "completed", "failed", "cancelled")
TEXT_LIMIT = 4000
"""The most characters of one step's SQL, result or error the dashboard reads."""
CONFIG_LIMIT = 65_536
"""The most characters of a node's JSON config, or of a df.retry's failed attempts, read for
the diagram (an HTTP step's config holds its body: one cut there shows as raw text)."""

# The time windows of the overview: its length and the width of one bar of the chart.
WINDOWS = {
    "1h": (timedelta(hours=1), timedelta(minutes=5)),
    "24h": (timedelta(hours=24), timedelta(hours=1)),
    "7d": (timedelta(days=7), timedelta(days=1)),
}


@dataclass(frozen=True)
class Privileges:
    """What the role may see beyond its own instances."""

    workers: bool
    metrics: bool
    restart: bool


async def privileges(conn: Conn) -> Privileges:
    """Whether the role may read the workers and the system-wide metrics, and whether this
    installation has df.restart."""
    cur = await conn.execute(
        "SELECT has_function_privilege('df.workers(interval)', 'EXECUTE')"
        "       AND has_function_privilege('df.worker_tasks()', 'EXECUTE'),"
        "       has_function_privilege('df.metrics()', 'EXECUTE'),"
        "       to_regprocedure('df.restart(text)') IS NOT NULL"
    )
    row = await cur.fetchone()
    assert row is not None
    return Privileges(workers=bool(row[0]), metrics=bool(row[1]), restart=bool(row[2]))


# -- overview ----------------------------------------------------------------------------------


async def status_counts(conn: Conn) -> dict[str, int]:
    """How many of the role's instances are in each status."""
    cur = await conn.execute("SELECT status, count(*) FROM df.instances GROUP BY status")
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in await cur.fetchall():
        counts[status] = int(count)
    return counts


async def finished_over_time(conn: Conn, window: str, now: datetime) -> list[Row]:
    """Instances that completed and failed in each bar of ``window`` up to ``now``, oldest
    bar first (``start``, ``completed``, ``failed``)."""
    length, bar = WINDOWS[window]
    bars = int(length / bar)
    first = now - bar * bars
    # Bars are counted from the window's start rather than truncated to the clock (days in
    # UTC would not be the reader's days anyway). df._runs.finished_at has an index.
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT (floor(extract(epoch FROM r.finished_at - %(first)s)"
        "              / extract(epoch FROM %(bar)s)))::int AS n,"
        "       count(*) FILTER (WHERE i.status = 'completed') AS completed,"
        "       count(*) FILTER (WHERE i.status = 'failed') AS failed"
        "  FROM df._runs r JOIN df.instances i ON i.id = r.instance_id"
        " WHERE r.finished_at > %(first)s AND r.finished_at <= %(now)s"
        " GROUP BY 1",
        {"first": first, "bar": bar, "now": now},
    )
    found = {row["n"]: row for row in await cur.fetchall()}
    return [
        {
            "start": first + bar * n,
            "completed": int(found.get(n, {}).get("completed", 0)),
            "failed": int(found.get(n, {}).get("failed", 0)),
        }
        for n in range(bars)
    ]


async def failing_labels(conn: Conn, since: datetime, limit: int = 5) -> list[Row]:
    """The labels with the most failed instances among those that finished since ``since``."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT i.label, count(*) FILTER (WHERE i.status = 'failed') AS failed,"
        "       count(*) AS finished"
        "  FROM df._runs r JOIN df.instances i ON i.id = r.instance_id"
        " WHERE r.finished_at > %s"
        " GROUP BY i.label"
        " HAVING count(*) FILTER (WHERE i.status = 'failed') > 0"
        " ORDER BY failed DESC, i.label NULLS LAST LIMIT %s",
        (since, limit),
    )
    return await cur.fetchall()


async def slowest_labels(conn: Conn, since: datetime, limit: int = 5) -> list[Row]:
    """The labels whose instances that completed since ``since`` ran longest (median and
    95th percentile of start to finish, in seconds)."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT i.label, count(*) AS completed,"
        "       percentile_cont(0.5) WITHIN GROUP"
        "           (ORDER BY extract(epoch FROM r.finished_at - i.created_at)) AS p50,"
        "       percentile_cont(0.95) WITHIN GROUP"
        "           (ORDER BY extract(epoch FROM r.finished_at - i.created_at)) AS p95"
        "  FROM df._runs r JOIN df.instances i ON i.id = r.instance_id"
        " WHERE r.finished_at > %s AND i.status = 'completed'"
        " GROUP BY i.label ORDER BY p50 DESC, i.label NULLS LAST LIMIT %s",
        (since, limit),
    )
    return await cur.fetchall()


async def metrics(conn: Conn) -> Row | None:
    """df.metrics(): system-wide counts (only for roles allowed to execute it)."""
    cur = await conn.cursor(row_factory=dict_row).execute("SELECT * FROM df.metrics()")
    return await cur.fetchone()


# -- instances ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The instance list's filters; None for a filter not set."""

    status: str | None = None
    label: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None


def cursor_before(moment: datetime) -> str:
    """A df.list_instances cursor that starts its page at the instances created at or
    before ``moment``: the cursor of a row created at ``moment`` whose id sorts before every
    instance id (ids are hex, '!' sorts before digits)."""
    stamp = moment.isoformat(timespec="microseconds")
    return f"v1|{stamp}|!".encode().hex()


async def list_instances(
    conn: Conn, filters: Filters, limit: int, after: str | None
) -> tuple[list[Row], str | None]:
    """One page of the role's instances, newest first, through df.list_instances' keyset
    cursors, and the cursor of the next page (None on the last). ``created_to`` becomes
    the first cursor; ``created_from`` ends the pages at the first older instance."""
    if after is None and filters.created_to is not None:
        after = cursor_before(filters.created_to)
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT l.instance_id, l.label, l.status, l.execution_count, l.created_at,"
        "       r.finished_at, left(l.output, 200) AS output, l.next_cursor"
        "  FROM df.list_instances(%s, %s, %s, %s) l"
        "  LEFT JOIN df._runs r ON r.instance_id = l.instance_id"
        " ORDER BY l.created_at DESC, l.instance_id",
        (filters.status, limit, filters.label, after),
    )
    rows = await cur.fetchall()
    cursor = rows[0]["next_cursor"] if rows else None
    if filters.created_from is not None:
        kept = [r for r in rows if r["created_at"] >= filters.created_from]
        if len(kept) < len(rows):
            rows, cursor = kept, None
    for row in rows:
        del row["next_cursor"]
    return rows, cursor


# -- one instance ------------------------------------------------------------------------------


async def status(conn: Conn, instance_id: str) -> str | None:
    """The instance's status (None if it does not exist or is another role's)."""
    cur = await conn.execute("SELECT status FROM df.instances WHERE id = %s", (instance_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def instance(conn: Conn, instance_id: str) -> Row | None:
    """The instance's row with its run (None if it does not exist or is another role's)."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT i.id AS instance_id, i.label, i.status, i.root_node, i.created_at,"
        "       i.updated_at, i.completed_at, r.finished_at, r.generation, r.checkpoints,"
        "       left(r.output, %s) AS output, length(r.output) AS output_length"
        "  FROM df.instances i LEFT JOIN df._runs r ON r.instance_id = i.id"
        " WHERE i.id = %s",
        (TEXT_LIMIT, instance_id),
    )
    return await cur.fetchone()


async def nodes(conn: Conn, instance_id: str) -> list[Row]:
    """Every node of the instance with its inferred status (df.instance_nodes), timings, and
    its result and error cut to :data:`TEXT_LIMIT`, with their full lengths. A SQL step's
    statement is cut too; other nodes' JSON configs (which the diagram reads) and a df.retry's
    error (one line per failed attempt, which the diagram counts) are cut at
    :data:`CONFIG_LIMIT`."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT n.node_id, n.node_type,"
        "       left(n.query, CASE WHEN n.node_type = 'SQL' THEN %(limit)s"
        "                          ELSE %(config_limit)s END) AS query,"
        "       length(n.query) AS query_length, n.result_name, n.left_node, n.right_node,"
        "       n.status, n.inferred_status, n.status_details,"
        "       left(n.result, %(limit)s) AS result, length(n.result) AS result_length,"
        "       left(d.error, CASE WHEN n.node_type = 'RETRY' THEN %(config_limit)s"
        "                          ELSE %(limit)s END) AS error,"
        "       length(d.error) AS error_length,"
        "       d.started_at, n.updated_at"
        "  FROM df.instance_nodes(%(id)s) n"
        "  JOIN df.nodes d ON d.instance_id = %(id)s AND d.id = n.node_id"
        " ORDER BY d.started_at NULLS LAST, n.node_id",
        {"id": instance_id, "limit": TEXT_LIMIT, "config_limit": CONFIG_LIMIT},
    )
    return await cur.fetchall()


async def explain(conn: Conn, instance_id: str) -> str:
    """df.explain of the instance: its graph as text, with status markers."""
    cur = await conn.execute("SELECT df.explain(%s)", (instance_id,))
    row = await cur.fetchone()
    return str(row[0]) if row and row[0] is not None else ""


async def executions(conn: Conn, instance_id: str, limit: int = 20) -> list[Row]:
    """df.instance_executions: the instance's executions, newest first."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT execution_id, status, event_count, duration_ms, left(output, 400) AS output"
        "  FROM df.instance_executions(%s, %s)",
        (instance_id, limit),
    )
    return await cur.fetchall()


# -- workers and schedules ---------------------------------------------------------------------


async def workers(conn: Conn) -> list[Row]:
    """df.workers(): every worker that has a row, live or not."""
    cur = await conn.cursor(row_factory=dict_row).execute("SELECT * FROM df.workers()")
    return await cur.fetchall()


async def worker_tasks(conn: Conn) -> list[Row]:
    """df.worker_tasks(): what each worker holds."""
    cur = await conn.cursor(row_factory=dict_row).execute("SELECT * FROM df.worker_tasks()")
    return await cur.fetchall()


async def waiting_calls(conn: Conn) -> list[Row]:
    """df.waiting_calls(): the role's Python steps that no live worker has."""
    cur = await conn.cursor(row_factory=dict_row).execute("SELECT * FROM df.waiting_calls()")
    return await cur.fetchall()


async def schedule_waits(conn: Conn, limit: int = 500) -> list[Row]:
    """The role's instances waiting on a cron schedule: the WAIT_SCHEDULE steps running in
    live instances, with their cron expression (``cron``, None if unreadable)."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        "SELECT n.instance_id, i.label, n.id AS node_id, n.query, n.started_at"
        "  FROM df.nodes n JOIN df.instances i ON i.id = n.instance_id"
        " WHERE n.node_type = 'WAIT_SCHEDULE' AND n.status = 'running'"
        "   AND i.status IN ('pending', 'running')"
        " ORDER BY n.started_at, n.instance_id LIMIT %s",
        (limit,),
    )
    rows = await cur.fetchall()
    for row in rows:
        row["cron"] = _cron_of(row.pop("query"))
    return rows


def _cron_of(query: str | None) -> str | None:
    try:
        cron = json.loads(query or "")["cron_expr"]
    except (ValueError, TypeError, KeyError):
        return None
    return cron if isinstance(cron, str) else None


# -- actions -----------------------------------------------------------------------------------


async def cancel(conn: Conn, instance_id: str) -> str:
    """df.cancel's answer; raises for an unknown instance."""
    cur = await conn.execute("SELECT df.cancel(%s, 'Cancelled from the dashboard')", (instance_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def signal(conn: Conn, instance_id: str, name: str, data: str) -> str:
    """df.signal's answer; raises for an unknown or finished instance."""
    cur = await conn.execute("SELECT df.signal(%s, %s, %s)", (instance_id, name, data))
    row = await cur.fetchone()
    return str(row[0]) if row else ""


async def restart(conn: Conn, instance_id: str) -> str:
    """df.restart's answer; raises for an unknown instance or one that cannot restart."""
    cur = await conn.execute("SELECT df.restart(%s)", (instance_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else ""
