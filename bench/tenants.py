"""One tenant's workflows next to another's abuse: how long the second tenant's probe takes.

Run ``.venv/bin/python bench/tenants.py [--probes N] [--out FILE]``. It starts its own embedded
PostgreSQL 18, two ordinary roles granted df usage, and one worker process (concurrency 10).
The probe is tenant B's two-step workflow ``'SELECT 1 AS a' ~> 'SELECT 2 AS b'``; its latency
is measured by the server, from the instance's created_at to its finished_at. Scenarios, each
with a fresh worker:

- ``idle``: nothing else runs.
- ``fanout``: tenant A's JOIN of 1,000 branches of ``SELECT pg_sleep(0.5)``.
- ``fanout-cap8``: the same, the worker run with ``--role-slots 8``.
- ``slowcommit``: tenant A's loop whose every COMMIT runs a deferred trigger that sleeps 5 s.
- ``slowcommit10-cap8``: ten such loops, the worker run with ``--role-slots 8`` (without a
  cap they hold every slot, and a newcomer waits for the first COMMIT to end).
- ``lockdos``: twelve of tenant A's ``'SELECT pg_sleep(1)' ~> 'SELECT 1 AS x'`` while another
  session of A holds all of A's df.instances rows FOR UPDATE.

Prints the median and the worst probe latency of each scenario, and the ratio of each
median to the idle one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres, free_port

PROBE = "SELECT df.start('SELECT 1 AS a' ~> 'SELECT 2 AS b', 'probe')"
SERVER_SETTINGS = {"fsync": "on", "synchronous_commit": "on"}
CONCURRENCY = 10


def _setup(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE tenants")
    with psycopg.connect(pg.dsn("tenants"), autocommit=True) as conn:
        schema.install(conn)
        for role in ("tenant_a", "tenant_b"):
            conn.execute(f"CREATE ROLE {role} LOGIN")
            conn.execute("SELECT df.grant_usage(%s)", (role,))
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")


@contextlib.contextmanager
def _worker(dsn: str, log: Path, role_slots: int | None) -> Iterator[None]:
    cap = ["--role-slots", str(role_slots)] if role_slots else []
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgdurable", "worker", "--dsn", dsn,
             "--concurrency", str(CONCURRENCY), *cap],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        time.sleep(1.5)  # connected and listening
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _probe_latencies(
    dsn_b: str, admin: psycopg.Connection[tuple[object, ...]], n: int
) -> list[float]:
    """Run ``n`` probes one after the other; their latencies in seconds (server clock)."""
    latencies: list[float] = []
    with psycopg.connect(dsn_b, autocommit=True) as b:
        for _ in range(n):
            row = b.execute(PROBE).fetchone()
            assert row is not None
            instance = str(row[0])
            deadline = time.monotonic() + 300
            while True:
                got = admin.execute(
                    "SELECT extract(epoch FROM r.finished_at - i.created_at), i.status"
                    " FROM df.instances i JOIN df._runs r ON r.instance_id = i.id"
                    " WHERE i.id = %s AND r.finished_at IS NOT NULL",
                    (instance,),
                ).fetchone()
                if got is not None:
                    assert got[1] == "completed", got
                    latencies.append(float(str(got[0])))
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"probe {instance} did not finish in 300 s")
                time.sleep(0.01)
            time.sleep(0.1)
    return latencies


def balanced_join(items: list[str]) -> str:
    """A JOIN of all ``items`` as a balanced tree (a chain of 1,000 would be too deep)."""
    if len(items) == 1:
        return items[0]
    half = len(items) // 2
    return f"({balanced_join(items[:half])} & {balanced_join(items[half:])})"


def _clean(admin: psycopg.Connection[tuple[object, ...]]) -> None:
    admin.execute(
        "UPDATE df.instances SET status = 'cancelled' WHERE status IN ('pending', 'running')"
    )


def run(probes: int) -> dict[str, dict[str, float]]:
    """Every scenario; per scenario its probe latencies' median and maximum (ms)."""
    base = Path(tempfile.mkdtemp(prefix="pgdurable-tenants-"))
    pg = EmbeddedPostgres(base / "data", free_port(), settings=SERVER_SETTINGS)
    pg.start()
    figures: dict[str, dict[str, float]] = {}
    try:
        _setup(pg)
        dsn = pg.dsn("tenants")
        dsn_a, dsn_b = pg.dsn("tenants", user="tenant_a"), pg.dsn("tenants", user="tenant_b")
        with (
            psycopg.connect(dsn, autocommit=True) as admin,
            psycopg.connect(dsn_a, autocommit=True) as a,
        ):
            a.execute("CREATE TABLE slow (x int)")
            a.execute(
                "CREATE FUNCTION sleepy() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN PERFORM pg_sleep(5); RETURN NULL; END$$"
            )
            a.execute(
                "CREATE CONSTRAINT TRIGGER slowc AFTER INSERT ON slow"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleepy()"
            )

            def scenario(
                name: str, load: list[str], hold_locks: bool = False, cap: int | None = None
            ) -> None:
                for statement in load:
                    a.execute(statement)
                holder = psycopg.connect(dsn_a) if hold_locks else None
                with _worker(dsn, base / f"worker-{name}.log", cap):
                    time.sleep(1.0 if load else 0)  # the load is under way
                    if holder is not None:
                        holder.execute("SELECT id FROM df.instances FOR UPDATE")
                    try:
                        latencies = _probe_latencies(dsn_b, admin, probes)
                    finally:
                        if holder is not None:
                            holder.close()
                _clean(admin)
                figures[name] = {
                    "p50_ms": statistics.median(latencies) * 1000,
                    "max_ms": max(latencies) * 1000,
                }
                print(f"{name:>17}: p50 {figures[name]['p50_ms']:8.1f} ms,"
                      f" max {figures[name]['max_ms']:8.1f} ms", flush=True)  # fmt: skip

            fan_out = balanced_join(["'SELECT pg_sleep(0.5)'"] * 1000)
            scenario("idle", [])
            scenario("fanout", [f"SELECT df.start({fan_out}, 'fanout')"])
            scenario("fanout-cap8", [f"SELECT df.start({fan_out}, 'fanout')"], cap=8)
            slow = "SELECT df.start(@> 'INSERT INTO slow VALUES (1)', 'slow')"
            scenario("slowcommit", [slow])
            scenario("slowcommit10-cap8", [slow] * 10, cap=8)
            scenario(
                "lockdos",
                ["SELECT df.start('SELECT pg_sleep(1)' ~> 'SELECT 1 AS x', 'lockdos')"] * 12,
                hold_locks=True,
            )
    finally:
        pg.stop("fast")
    idle = figures["idle"]["p50_ms"]
    for figure in figures.values():
        figure["p50_vs_idle"] = figure["p50_ms"] / idle
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=20, help="probes per scenario")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    figures = run(args.probes)
    for name, figure in figures.items():
        print(f"{name:>17}: p50 {figure['p50_vs_idle']:.1f}x idle")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
