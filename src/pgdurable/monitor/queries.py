"""The monitoring queries of the CLI: df's SQL functions, run as the connected role."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def list_instances(
    conn: Conn, status: str | None, label: str | None, limit: int, after: str | None
) -> tuple[list[Row], str | None]:
    """One page of the caller's instances, newest first, and the cursor of the next page."""
    cur = conn.cursor(row_factory=dict_row)
    cur.execute(
        "SELECT instance_id, label, status, execution_count, created_at, completed_at, output,"
        "       next_cursor"
        "  FROM df.list_instances(%s, %s, %s, %s)",
        (status, limit, label, after),
    )
    rows = cur.fetchall()
    cursor = rows[0]["next_cursor"] if rows else None
    for row in rows:
        del row["next_cursor"]
    return rows, cursor


def instance(conn: Conn, instance_id: str) -> Row | None:
    """The instance's row (None if it does not exist or belongs to another role)."""
    cur = conn.cursor(row_factory=dict_row)
    cur.execute(
        "SELECT i.id AS instance_id, i.label, i.status, i.root_node, i.created_at,"
        "       i.completed_at, r.finished_at, r.generation AS execution, r.output"
        "  FROM df.instances i LEFT JOIN df._runs r ON r.instance_id = i.id"
        " WHERE i.id = %s",
        (instance_id,),
    )
    return cur.fetchone()


def nodes(conn: Conn, instance_id: str) -> list[Row]:
    """The instance's nodes with their inferred status (docs/monitoring.md) and timings;
    for a running Python step, whether a live worker has it (has_worker)."""
    cur = conn.cursor(row_factory=dict_row)
    cur.execute(
        "SELECT n.node_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,"
        "       n.status, n.inferred_status, n.result, d.error, d.started_at, n.updated_at,"
        "       CASE WHEN n.node_type = 'CALL' AND n.inferred_status = 'running'"
        "            THEN df._step_has_worker(df._call_name(n.query)) END AS has_worker"
        "  FROM df.instance_nodes(%s) n"
        "  JOIN df.nodes d ON d.instance_id = %s AND d.id = n.node_id",
        (instance_id, instance_id),
    )
    return cur.fetchall()


def cancel(conn: Conn, instance_id: str, reason: str) -> str:
    """df.cancel's answer; raises for an unknown instance."""
    row = conn.execute("SELECT df.cancel(%s, %s)", (instance_id, reason)).fetchone()
    return str(row[0]) if row else ""


def restart(conn: Conn, instance_id: str) -> str:
    """df.restart's answer; raises for an unknown instance, or one neither failed nor
    cancelled."""
    row = conn.execute("SELECT df.restart(%s)", (instance_id,)).fetchone()
    return str(row[0]) if row else ""


def signal(conn: Conn, instance_id: str, name: str, data: str) -> str:
    """df.signal's answer ('OK'); raises for an unknown or finished instance."""
    row = conn.execute("SELECT df.signal(%s, %s, %s)", (instance_id, name, data)).fetchone()
    return str(row[0]) if row else ""
