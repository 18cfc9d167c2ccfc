"""The SQL that pgdurable installs into PostgreSQL, and the installer that applies it.

Each file in ``migrations/`` is one schema version, named ``NNNN_what.sql``. A database
records the versions it has in ``df._migrations``; ``install`` applies the missing ones in
order, each in its own transaction, under an advisory lock so two installers never race.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

# pg_advisory_lock key for installs: ASCII "PGDI".
_INSTALL_LOCK = 0x50474449
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """All migrations shipped with this version of pgdurable, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    """The schema version this package expects."""
    return migrations()[-1].version


def installed_version(conn: psycopg.Connection[Any]) -> int | None:
    """The newest migration applied to the connected database, or None if never installed."""
    row = conn.execute("SELECT to_regclass('df._migrations') IS NOT NULL AS present").fetchone()
    if not row or not row[0]:
        return None
    row = conn.execute("SELECT max(version) FROM df._migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _lock_installs(conn: psycopg.Connection[Any], timeout: float = 60) -> None:
    """Take the install lock, or say who holds it. Any role can take an advisory lock, so a
    session that never lets go must not make an install hang forever."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_INSTALL_LOCK,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() >= deadline:
            holders = conn.execute(
                "SELECT string_agg(l.pid::text, ', ') FROM pg_locks l, pg_database d"
                " WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = %s"
                "   AND l.objsubid = 1 AND l.database = d.oid AND d.datname = current_database()",
                (_INSTALL_LOCK,),
            ).fetchone()
            raise psycopg.OperationalError(
                f"another session holds pgdurable's install lock (advisory lock {_INSTALL_LOCK},"
                f" backend pid {holders[0] if holders else '?'}); gave up after {timeout:g} s"
            )
        time.sleep(0.2)


def install(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply every missing migration; returns the names applied (empty if up to date).

    Commits any transaction open on ``conn`` and leaves it in autocommit mode.
    """
    applied: list[str] = []
    if not conn.autocommit:
        conn.commit()
        conn.autocommit = True
    _lock_installs(conn)
    try:
        current = installed_version(conn) or 0
        for migration in migrations():
            if migration.version <= current:
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO df._migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied.append(migration.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_INSTALL_LOCK,))
    return applied
