"""Regression-style helpers for the SQL tests: evaluate expressions, compare with expected
outputs, and report every difference at once (like PostgreSQL's own .sql/.out tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass(frozen=True)
class Error:
    """The expected outcome of a statement that must fail: its primary message, exactly."""

    message: str


def outcome(conn: Conn, sql: str, params: Sequence[object] = ()) -> object:
    """The single value `SELECT <sql>` returns, or Error(message) if it raises."""
    try:
        row = conn.execute(f"SELECT {sql}", params or None).fetchone()
    except psycopg.Error as e:
        return Error(e.diag.message_primary or str(e))
    assert row is not None
    return row[0]


def check(conn: Conn, cases: Sequence[tuple[str, object]]) -> None:
    """Evaluate every expression and compare it with its expected output."""
    failures = []
    for sql, expected in cases:
        got = outcome(conn, sql)
        if got != expected:
            failures.append(f"SELECT {sql}\n    expected: {expected!r}\n    got:      {got!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
