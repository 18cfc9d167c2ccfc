"""The embedding pipeline, end to end: documents in, a similarity search out.

    .venv/bin/python examples/embeddings/run.py "how do I bake sourdough bread?"

It starts an embedded PostgreSQL 18 (data in a temporary directory, or --data-dir), installs
pgdurable's schema and the pgvector extension, creates an application role with the tables
and trigger of schema.sql, and starts a pgdurable worker that imports embedding_steps.py.
Then it inserts a few documents (each insert starts a workflow), waits until every chunk has
its vector, and prints the documents closest to the question. Everything it started is stopped
when it ends.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from pgdurable import schema
from pgdurable.embedded import EmbeddedPostgres, free_port

HERE = Path(__file__).resolve().parent
ROLE = "pipeline"

DOCUMENTS = [
    (
        "Sourdough at home",
        "Sourdough bread needs a starter of flour and water. Knead the dough, let it rise "
        "overnight, and bake the loaf in a very hot oven. A long fermentation gives the crumb "
        "its flavour.",
    ),
    (
        "Indexes in PostgreSQL",
        "A B-tree index speeds up queries that filter or sort on a column. EXPLAIN shows the "
        "query plan. VACUUM removes dead rows so that scans stay fast.",
    ),
    (
        "Last night's match",
        "The striker scored a goal in the last minute of the game. The goalkeeper could not "
        "stop the penalty kick, and the fans cheered.",
    ),
    (
        "Tomatoes in the garden",
        "Plant tomatoes in spring in a sunny spot. Water them regularly and tie the stems to a "
        "stake as the plants grow.",
    ),
]

SEARCH = """
SELECT d.title, round((1 - min(c.embedding <=> %s::vector))::numeric, 3) AS similarity
  FROM chunks c JOIN documents d ON d.id = c.document_id
 GROUP BY d.title
 ORDER BY similarity DESC
 LIMIT %s
"""


def set_up(pg: EmbeddedPostgres) -> str:
    """Install pgdurable and pgvector, and the pipeline's role and tables; the role's DSN."""
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        schema.install(admin)
        admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
        admin.execute(f"CREATE ROLE {ROLE} LOGIN")
        admin.execute(f"CREATE SCHEMA {ROLE} AUTHORIZATION {ROLE}")
        admin.execute(f"ALTER ROLE {ROLE} SET search_path = {ROLE}, public")
        admin.execute("SELECT df.grant_usage(%s)", (ROLE,))
        admin.execute("SELECT df.grant_call(%s, 'embeddings.*')", (ROLE,))
    app_dsn = pg.dsn(user=ROLE)
    with psycopg.connect(app_dsn, autocommit=True) as app:
        app.execute((HERE / "schema.sql").read_text())  # type: ignore[call-overload]
    return app_dsn


def start_worker(pg: EmbeddedPostgres, log: Path) -> subprocess.Popen[bytes]:
    """A pgdurable worker that runs the pipeline's Python step."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pgdurable", "worker", "--dsn", pg.dsn(),
             "--import", "embedding_steps"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def add_documents(app_dsn: str, documents: list[tuple[str, str]]) -> None:
    """Insert the documents: each insert starts its workflow, in the same transaction."""
    with psycopg.connect(app_dsn) as app:
        for title, body in documents:
            app.execute("INSERT INTO documents (title, body) VALUES (%s, %s)", (title, body))


def wait_embedded(app_dsn: str, count: int, timeout: float = 120) -> None:
    """Wait until the workflows of ``count`` documents have completed."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(app_dsn, autocommit=True) as app:
        while True:
            row = app.execute(
                "SELECT count(*) FILTER (WHERE status = 'completed'),"
                " count(*) FILTER (WHERE status IN ('failed', 'cancelled'))"
                " FROM df.instances WHERE label LIKE 'embed document %'"
            ).fetchone()
            assert row is not None
            if row[1]:
                raise RuntimeError(f"{row[1]} embedding workflow(s) failed")
            if row[0] >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{row[0]} of {count} documents embedded after {timeout} s")
            time.sleep(0.1)


def search(app_dsn: str, question: str, limit: int = 3) -> list[tuple[str, float]]:
    """The documents closest to ``question``, best first, with their cosine similarity."""
    from embedding_steps import as_vector, embed

    with psycopg.connect(app_dsn, autocommit=True) as app:
        rows = app.execute(SEARCH, (as_vector(embed(question)), limit)).fetchall()
    return [(str(title), float(similarity)) for title, similarity in rows]


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="how do I bake sourdough bread?")
    parser.add_argument("--data-dir", type=Path, help="keep PostgreSQL's data here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    base = args.data_dir or Path(tempfile.mkdtemp(prefix="pgdurable-embeddings-"))
    pg = EmbeddedPostgres(base / "data", free_port())
    pg.start()
    worker = None
    try:
        app_dsn = set_up(pg)
        worker = start_worker(pg, base / "worker.log")
        add_documents(app_dsn, DOCUMENTS)
        wait_embedded(app_dsn, len(DOCUMENTS))
        found = search(app_dsn, args.question)
        with psycopg.connect(app_dsn, autocommit=True) as app:
            chunks = app.execute("SELECT count(*) FROM chunks WHERE embedding IS NOT NULL")
            print(f"{len(DOCUMENTS)} documents, {chunks.fetchone()[0]} chunks embedded")  # type: ignore[index]
        print(f"closest to {args.question!r}:")
        for title, similarity in found:
            print(f"  {similarity:.3f}  {title}")
        return found
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        pg.stop()


if __name__ == "__main__":
    main()
