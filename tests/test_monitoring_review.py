"""Findings of a review of the monitoring work (issue 5), kept as tests: each asserts the
correct outcome."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from click.testing import CliRunner, Result
from conftest import App, ThreadWorker
from rich.console import Console

from pgdurable.cli import main as cli_main
from pgdurable.monitor import render

Conn = psycopg.Connection[tuple[object, ...]]
T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def pgdurable(dsn: str, *args: str) -> Result:
    runner = CliRunner(env={"PGDURABLE_DSN": dsn, "COLUMNS": "200"})
    return runner.invoke(cli_main, list(args))


def purge(conn: Conn, days: int = 0, keep: int = 0, batch: int = 500) -> int | None:
    row = conn.execute("SELECT df._purge_finished(%s, %s, %s)", (days, keep, batch)).fetchone()
    assert row is not None
    return None if row[0] is None else int(str(row[0]))


def exists(conn: Conn, instance: str) -> bool:
    return conn.execute(
        "SELECT count(*) FROM df.instances WHERE id = %s", (instance,)
    ).fetchone() == (1,)


def cancelled(app: App, n: int) -> list[str]:
    ids = []
    for i in range(n):
        instance = app.start("%s", (f"SELECT {i}",))
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
        ids.append(instance)
        time.sleep(0.002)  # distinct finished_at, oldest first
    return ids


# -- retention ------------------------------------------------------------------------------------


def test_a_tenant_holding_its_oldest_finished_rows_stops_retention_for_everyone(
    app: App, conn: Conn, dsn: str
) -> None:
    """A non-superuser may lock its own instance rows (it holds UPDATE (status, updated_at)),
    e.g. SELECT ... FOR KEY SHARE in a transaction left open. When the whole head of the
    oldest-first batch is held, df._purge_finished removes 0 and the worker's pass stops
    (`if not count: break`), although later instances are past retention too."""
    held = cancelled(app, 2)
    others = cancelled(app, 3)
    with psycopg.connect(app.dsn) as tenant:  # not autocommit: the transaction stays open
        locked = tenant.execute(
            "SELECT id FROM df.instances WHERE id = ANY(%s) FOR KEY SHARE", (held,)
        ).fetchall()
        assert len(locked) == 2
        # batch 2 stands for the worker's 500 (or for 5 instances of 10,000 nodes, the node cap)
        removed = purge(conn, batch=2)
        # Observed: 0 -> the worker ends its pass, every pass, for as long as the tenant wants.
        assert removed == 2, f"purge removed {removed}; the 3 unheld finished instances stay"
        assert not any(exists(conn, i) for i in others[:2])


# -- CLI: rich markup in data ----------------------------------------------------------------------


def test_ls_prints_labels_and_outputs_verbatim(app: App) -> None:
    """`pgdurable ls` hands labels and outputs to rich as str, which parses them as console
    markup: '[nightly] job' prints as ' job', and a label such as '[/x]' makes the command
    crash with rich.errors.MarkupError (for the owner, and for a superuser listing all)."""
    app.start("'SELECT 1'", label="[nightly] job")
    listed = pgdurable(app.dsn, "ls")
    assert listed.exit_code == 0, listed.output
    assert "[nightly] job" in listed.stdout, listed.stdout

    app.start("'SELECT 1'", label="[/x]")
    crashed = pgdurable(app.dsn, "ls")
    assert crashed.exception is None or isinstance(crashed.exception, SystemExit), repr(
        crashed.exception
    )
    assert crashed.exit_code == 0
    assert "[/x]" in crashed.stdout


def test_cancel_and_signal_echo_user_text_without_markup(app: App) -> None:
    """The confirmation lines of `cancel` (df.cancel's answer, which repeats --reason) and of
    `signal` (the signal name) go through console.print with markup on: the command did its
    work, then dies with a traceback (MarkupError) or prints mangled text."""
    first = app.start("df.wait_for_signal('x')")
    result = pgdurable(app.dsn, "signal", first, "[/x]")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "[/x]" in result.stderr

    result = pgdurable(app.dsn, "cancel", first, "--reason", "[/oops]")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "[/oops]" in result.stderr


# -- CLI: hand-written graphs ----------------------------------------------------------------------


def _write_graph(
    conn: Conn, instance: str, rows: list[tuple[str, str, str | None, str | None, str | None]]
) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO df.instances (id, root_node, submitted_by)"
            " VALUES (%s, %s, quote_ident(current_user)::regrole)",
            (instance, rows[0][0]),
        )
        for node, kind, query, left, right in rows:
            conn.execute(
                "INSERT INTO df.nodes (id, instance_id, node_type, query, left_node,"
                " right_node, submitted_by) VALUES (%s, %s, %s, %s, %s, %s,"
                " quote_ident(current_user)::regrole)",
                (node, instance, kind, query, left, right),
            )


def _show_in_subprocess(
    dsn: str, instance: str, timeout: float = 20
) -> subprocess.CompletedProcess[str] | None:
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from pgdurable.cli import main
        sys.exit(main(["show", sys.argv[1], "--dsn", sys.argv[2]]))
        """
    )
    try:
        return subprocess.run(
            [sys.executable, "-c", code, instance, dsn],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None


def test_show_of_a_hand_written_graph_that_loops_back(app: App) -> None:
    """Users hold INSERT on df.instances/df.nodes; df.instance_nodes and df.explain stop on
    a graph that contains itself (tests/test_explain.py), but `pgdurable show` does not:
    render._chain never ends on a THEN cycle (memory grows until killed), and an IF/LOOP
    cycle is a RecursionError. A tenant can so hang or crash an operator's show/watch."""
    _write_graph(
        app.conn,
        "0000000b",
        [
            ("000000b1", "THEN", None, "000000b2", "000000b3"),
            ("000000b2", "SQL", "SELECT 1", None, None),
            ("000000b3", "THEN", None, "000000b2", "000000b1"),
        ],
    )
    done = _show_in_subprocess(app.dsn, "0000000b")
    assert done is not None, "pgdurable show did not return within 20 s"
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 0, done.stderr[-600:]


def test_show_of_a_loop_whose_body_is_itself(app: App) -> None:
    _write_graph(app.conn, "0000000a", [("000000a1", "LOOP", None, "000000a1", None)])
    done = _show_in_subprocess(app.dsn, "0000000a")
    assert done is not None, "pgdurable show did not return within 20 s"
    assert "Traceback" not in done.stderr, done.stderr[-300:]
    assert done.returncode == 0, done.stderr[-300:]


def test_show_of_a_join_whose_extra_nodes_is_not_a_list(app: App) -> None:
    """node_from_row only turns GraphError into a fallback node; a JOIN config with
    "extra_nodes": 5 raises TypeError (tuple(5)), ["x"]-style nested lists and an IF
    condition_node object make `x in nodes` raise TypeError (unhashable)."""
    _write_graph(
        app.conn,
        "0000000c",
        [
            ("000000c1", "JOIN", '{"extra_nodes": 5}', "000000c2", "000000c3"),
            ("000000c2", "SQL", "SELECT 1", None, None),
            ("000000c3", "SQL", "SELECT 2", None, None),
        ],
    )
    done = _show_in_subprocess(app.dsn, "0000000c")
    assert done is not None
    assert "Traceback" not in done.stderr, done.stderr[-300:]
    assert done.returncode == 0


def test_render_tolerates_odd_configs() -> None:
    def row(i: str, t: str, **kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = dict(
            node_id=i,
            node_type=t,
            query=None,
            result_name=None,
            left_node=None,
            right_node=None,
            status="pending",
            inferred_status="pending",
            result=None,
            error=None,
            started_at=None,
            updated_at=T0,
        )
        base.update(kw)
        return base

    leaves = [row("a", "SQL", query="SELECT 1"), row("b", "SQL", query="SELECT 2")]
    for root in (
        row("r", "JOIN", query='{"extra_nodes": [["x"]]}', left_node="a", right_node="b"),
        row("r", "IF", query='{"condition_node": {"k": 1}}', left_node="a", right_node="b"),
    ):
        tree = render.node_tree("r", [root, *leaves], T0)
        assert tree is not None
        assert "SELECT 1" in text_of(tree)


# -- df.list_instances pagination ------------------------------------------------------------------


def _pages(conn: Conn, status: str | None, limit: int, label: str | None) -> list[list[str]]:
    pages, cursor = [], None
    for _ in range(100):
        rows = conn.execute(
            "SELECT instance_id, next_cursor FROM df.list_instances(%s, %s, %s, %s)",
            (status, limit, label, cursor),
        ).fetchall()
        pages.append([str(r[0]) for r in rows])
        cursor = rows[0][1] if rows else None
        if cursor is None:
            return pages
        assert all(r[1] == cursor for r in rows)
    raise AssertionError("pagination does not end")


def test_pagination_ties_last_row_and_combined_filters(app: App) -> None:
    with app.conn.transaction():  # one now(): every created_at ties
        tied = [app.start("'SELECT 1'", label=("a" if i % 2 else "b")) for i in range(7)]
    for _i in range(3):
        app.start("'SELECT 1'", label="a")
    for instance in tied[:3]:
        app.conn.execute("SELECT df.cancel(%s)", (instance,))
    everything = [
        str(r[0])
        for r in app.conn.execute(
            "SELECT id FROM df.instances ORDER BY created_at DESC, id"
        ).fetchall()
    ]
    for status in (None, "pending", "cancelled"):
        for label in (None, "a", "b"):
            expected = [
                i
                for i, s, lab in app.conn.execute(
                    "SELECT id, status, label FROM df.instances ORDER BY created_at DESC, id"
                ).fetchall()
                if (status is None or s == status) and (label is None or lab == label)
            ]
            for limit in (1, 2, 3, len(expected) or 1, len(expected) + 1):
                pages = _pages(app.conn, status, limit, label)
                flat = [i for p in pages for i in p]
                assert flat == expected, (status, label, limit, pages)
                # the last page never carries a cursor, even when it is exactly full
                assert all(len(p) == limit for p in pages[:-1])
                if expected:
                    assert pages[-1], (status, label, limit, pages)
    assert len(everything) == 10


# -- inferred status on real runs ----------------------------------------------------------------

from test_monitoring_sql import node_id, signal, stamp_of, views, wait_until  # noqa: E402


def _waiting(c: Conn, instance: str, node: str, prefix: str) -> bool:
    return (stamp_of(c, instance, node) or "").startswith(prefix) and views(c, instance)[node][
        0
    ] == "running"


def test_nested_loops_superseded_generations(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    c.execute("CREATE TABLE app.c (n int)")
    c.execute("INSERT INTO app.c VALUES (0)")
    instance = app.start(
        "@> (df.loop(df.wait_for_signal('i') ~> 'UPDATE app.c SET n = n + 1 RETURNING n',"
        " 'SELECT n %% 2 <> 0 AS again FROM app.c') ~> df.wait_for_signal('o'))"
    )
    waits = {
        str(r[0]): str(r[1])
        for r in c.execute(
            "SELECT id, query::jsonb ->> 'signal_name' FROM df.nodes"
            " WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        ).fetchall()
    }
    inner_wait = next(k for k, v in waits.items() if v == "i")
    outer_wait = next(k for k, v in waits.items() if v == "o")
    update = node_id(c, instance, query="UPDATE app.c SET n = n + 1 RETURNING n")
    cond = node_id(c, instance, query="SELECT n % 2 <> 0 AS again FROM app.c")
    loops = [
        str(r[0])
        for r in c.execute(
            "SELECT id FROM df.nodes WHERE instance_id = %s AND node_type = 'LOOP'", (instance,)
        ).fetchall()
    ]
    wait_until(lambda: views(c, instance)[inner_wait][0] == "running", "first inner wait")
    signal(app, instance, "i")
    wait_until(
        lambda: (
            _waiting(c, instance, inner_wait, f"{instance}::1::")
            and stamp_of(c, instance, inner_wait).endswith("::2")
        ),
        "second inner wait",
    )
    # inner iteration 2: the update/condition of inner iteration 1 are superseded, not reached
    nodes = views(c, instance)
    assert nodes[inner_wait][1] == "running"
    assert nodes[update][1] == "pending", nodes[update]
    assert nodes[cond][1] == "pending", nodes[cond]
    assert nodes[outer_wait] == ("pending", "pending", None)
    signal(app, instance, "i")
    wait_until(lambda: views(c, instance)[outer_wait][0] == "running", "outer wait")
    nodes = views(c, instance)
    assert nodes[update][1] == "completed" and nodes[cond][1] == "completed"
    signal(app, instance, "o")
    wait_until(lambda: _waiting(c, instance, inner_wait, f"{instance}::2::"), "root generation 2")
    nodes = views(c, instance)
    assert nodes[outer_wait][:2] == ("completed", "pending"), nodes[outer_wait]
    assert nodes[update][:2] == ("completed", "pending"), nodes[update]
    assert nodes[cond][:2] == ("completed", "pending"), nodes[cond]
    assert nodes[inner_wait][1] == "running"
    for loop in loops:
        assert nodes[loop][1] == "running", (loop, nodes[loop])
    text = c.execute("SELECT df.explain(%s)", (instance,)).fetchone()[0]
    assert "SIGNAL 'o' ○" in text, text
    c.execute("SELECT df.cancel(%s)", (instance,))


def test_race_in_a_loop_second_iteration_other_winner(app: App, worker: ThreadWorker) -> None:
    c = app.conn
    instance = app.start(
        "@> (df.race(df.wait_for_signal('a') ~> 'SELECT 1 AS a1',"
        " df.wait_for_signal('b') ~> 'SELECT 2 AS b1') ~> df.wait_for_signal('o'))"
    )
    waits = {
        str(r[1]): str(r[0])
        for r in c.execute(
            "SELECT id, query::jsonb ->> 'signal_name' FROM df.nodes"
            " WHERE instance_id = %s AND node_type = 'SIGNAL'",
            (instance,),
        ).fetchall()
    }
    race = node_id(c, instance, kind="RACE")
    a1 = node_id(c, instance, query="SELECT 1 AS a1")
    b1 = node_id(c, instance, query="SELECT 2 AS b1")
    wait_until(lambda: views(c, instance)[waits["b"]][0] == "running", "race 1")
    signal(app, instance, "a")
    wait_until(lambda: views(c, instance)[waits["o"]][0] == "running", "outer wait 1")
    nodes = views(c, instance)
    assert nodes[a1][1] == "completed"
    assert nodes[waits["b"]][1:] == ("skipped", race)
    assert nodes[b1][1:] == ("skipped", race)
    signal(app, instance, "o")
    wait_until(
        lambda: (
            _waiting(c, instance, waits["a"], f"{instance}::2::")
            and _waiting(c, instance, waits["b"], f"{instance}::2::")
        ),
        "race 2",
    )
    nodes = views(c, instance)
    assert nodes[a1][1] == "pending", nodes[a1]
    assert nodes[waits["o"]][1] == "pending"
    signal(app, instance, "b")
    wait_until(lambda: _waiting(c, instance, waits["o"], f"{instance}::2"), "outer wait 2")
    nodes = views(c, instance)
    assert nodes[b1][1] == "completed"
    assert nodes[a1][1:] == ("skipped", race), nodes[a1]
    assert nodes[waits["a"]][1:] == ("skipped", race), nodes[waits["a"]]
    c.execute("SELECT df.cancel(%s)", (instance,))


# -- outside issue 5, found on the way: the worker on the same hand-written rows ---------------


def test_worker_fails_an_instance_whose_join_config_is_malformed(
    app: App, worker: ThreadWorker
) -> None:
    """store.load_graph -> node_from_row raises TypeError (not GraphError) for a JOIN whose
    "extra_nodes" is a number; steps._start only catches GraphError/LookupError, so the start
    task is never turned into a failed instance."""
    _write_graph(
        app.conn,
        "0000000d",
        [
            ("000000d1", "JOIN", '{"extra_nodes": 5}', "000000d2", "000000d3"),
            ("000000d2", "SQL", "SELECT 1", None, None),
            ("000000d3", "SQL", "SELECT 2", None, None),
        ],
    )
    deadline = time.monotonic() + 15
    status = None
    while time.monotonic() < deadline:
        status = app.conn.execute("SELECT df.status('0000000d')").fetchone()[0]
        if status in ("failed", "completed"):
            break
        time.sleep(0.2)
    assert status == "failed", status


# -- df.explain: one long uncut field widens every line -------------------------------------------


def test_a_step_returning_a_huge_jsonb_number_fails_instead_of_retrying_for_ever(
    app: App, worker: ThreadWorker
) -> None:
    """worker/results.py's _finite_float raises ValueError('JSON number out of range') (its
    comment says only json, not jsonb, can hold one: jsonb can). The ValueError escapes the
    step as a task error: the step is retried (attempt 1, 2, ...) and the instance stays
    'running' instead of the step failing."""
    instance = app.start("$$SELECT jsonb_build_object('big', 1e400 + 0.5) AS j$$")
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline:
        status = app.conn.execute("SELECT df.status(%s)", (instance,)).fetchone()[0]
        if status in ("failed", "completed"):
            break
        time.sleep(0.2)
    try:
        assert status == "failed", status
    finally:
        app.conn.execute("SELECT df.cancel(%s)", (instance,))


# -- df.list_instances: a page's cost grows with its depth -----------------------------------------


def test_a_deep_page_reads_about_its_size_not_everything_before_it(conn: Conn) -> None:
    """Migration 12: 'each filter has an index that yields rows in page order, so a page
    costs about its size'. The cursor condition (created_at < $4 OR (created_at = $4 AND
    id > $5)) is not an index bound: the scan starts at the newest instance and filters
    (EXPLAIN: Index Cond: created_at IS NOT NULL, Rows Removed by Filter: <depth>), so page k
    reads k*limit rows and paging through N instances costs O(N^2). Measured on 40,000
    instances: 1 ms for page 1, 10 ms for the last. Adding the redundant bound
    `AND i.created_at <= $4` makes it an Index Cond."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    with conn.transaction():
        conn.execute("SELECT df.start('SELECT 1') FROM generate_series(1, 3000)")
    conn.execute(
        "UPDATE df.instances SET created_at = created_at - make_interval(secs => random() * 100000)"
    )
    conn.execute("VACUUM ANALYZE df.instances")
    rows = conn.execute(
        "SELECT id, created_at FROM df.instances ORDER BY created_at DESC, id"
    ).fetchall()
    ts, last_id = rows[2500][1], rows[2500][0]
    cursor = conn.execute(
        "SELECT encode(convert_to('v1|' || to_char(%s::timestamptz,"
        " 'YYYY-MM-DD\"T\"HH24:MI:SS.USOF') || '|' || %s, 'UTF8'), 'hex')",
        (ts, last_id),
    ).fetchone()[0]

    def index_reads() -> int:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = 'instances'"
        ).fetchone()
        return int(row[0] or 0)

    before = index_reads()
    page = conn.execute(
        "SELECT instance_id FROM df.list_instances(NULL, 10, NULL, %s)", (cursor,)
    ).fetchall()
    read = index_reads() - before
    assert [r[0] for r in page] == [r[0] for r in rows[2501:2511]]
    assert read < 200, f"a 10-row page at depth 2,500 read {read} index entries"
