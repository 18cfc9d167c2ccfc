"""pgdurable ls, show, watch, cancel and signal against a real server and worker, as the
application role (so row-level security scopes what each command sees)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from conftest import App, ThreadWorker

from pgdurable.cli import main

Conn = psycopg.Connection[tuple[object, ...]]


def pgdurable(app: App, *args: str) -> Result:
    runner = CliRunner(env={"PGDURABLE_DSN": app.dsn, "COLUMNS": "200"})
    return runner.invoke(main, list(args), catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ls_pages_through_ones_own_instances(app: App, worker: ThreadWorker) -> None:
    ids = [app.start("'SELECT 1'", label=f"job {i}") for i in range(5)]
    for instance in ids:
        assert app.wait(instance) == "completed"
    first = as_json(pgdurable(app, "ls", "--limit", "2", "--json"))
    assert [i["instance_id"] for i in first["instances"]] == ids[::-1][:2]
    assert first["next_cursor"]
    rest = as_json(pgdurable(app, "ls", "--limit", "10", "--after", first["next_cursor"], "--json"))
    assert [i["instance_id"] for i in rest["instances"]] == ids[::-1][2:]
    assert rest["next_cursor"] is None
    only = as_json(pgdurable(app, "ls", "--label", "job 3", "--json"))
    assert [i["instance_id"] for i in only["instances"]] == [ids[3]]
    assert only["instances"][0]["status"] == "completed"
    assert as_json(pgdurable(app, "ls", "--status", "failed", "--json"))["instances"] == []

    table = pgdurable(app, "ls", "--limit", "2")
    assert table.exit_code == 0
    assert ids[4] in table.stdout and ids[3] in table.stdout and ids[0] not in table.stdout
    assert f"more: pgdurable ls --after {first['next_cursor']}" in table.stderr
    bad = pgdurable(app, "ls", "--after", "zz")
    assert bad.exit_code == 1
    assert "df.list_instances: invalid after_cursor" in bad.stderr


def test_ls_prints_labels_and_outputs_verbatim(app: App) -> None:
    """`pgdurable ls` hands labels and outputs to rich as str, which parses them as console
    markup: '[nightly] job' prints as ' job', and a label such as '[/x]' makes the command
    crash with rich.errors.MarkupError (for the owner, and for a superuser listing all)."""
    app.start("'SELECT 1'", label="[nightly] job")
    listed = pgdurable(app, "ls")
    assert listed.exit_code == 0, listed.output
    assert "[nightly] job" in listed.stdout, listed.stdout

    app.start("'SELECT 1'", label="[/x]")
    crashed = pgdurable(app, "ls")
    assert crashed.exception is None or isinstance(crashed.exception, SystemExit), repr(
        crashed.exception
    )
    assert crashed.exit_code == 0
    assert "[/x]" in crashed.stdout


def test_show_draws_the_graph_with_statuses_results_and_errors(
    app: App, worker: ThreadWorker
) -> None:
    instance = app.start(
        "'SELECT 41 + 1 AS answer' |=> 'a'"
        " ~> ('SELECT 2 AS two' & 'SELECT 1/0')"
        " ~> 'SELECT ''never'''"
    )
    assert app.wait(instance) == "failed"
    shown = pgdurable(app, "show", instance)
    assert shown.exit_code == 0, shown.output
    lines = [line.rstrip() for line in shown.stdout.splitlines()]
    assert lines[0] == f"Instance {instance}  ✗ failed"
    assert lines[1].startswith("started ") and ", took " in lines[1]  # also when it failed
    text = "\n".join(lines)
    assert "✓ SQL: SELECT 41 + 1 AS answer |=> 'a'" in text
    assert '= {"rows": [{"answer": 42}], "row_count": 1}' in text
    assert "branch 2:" in text and "✗ SQL: SELECT 1/0" in text
    assert "division by zero" in text
    assert "⊘ SQL: SELECT 'never'" in text  # the right side of a failed step is skipped

    document = as_json(pgdurable(app, "show", instance, "--json"))
    assert document["instance"]["status"] == "failed"
    by_query = {n["query"]: n for n in document["nodes"] if n["node_type"] == "SQL"}
    assert by_query["SELECT 41 + 1 AS answer"]["result"]["rows"] == [{"answer": 42}]
    assert by_query["SELECT 'never'"]["inferred_status"] == "skipped"
    assert by_query["SELECT 41 + 1 AS answer"]["started_at"] is not None


def test_show_and_cancel_refuse_unknown_and_foreign_instances(
    app: App, worker: ThreadWorker, conn: Any
) -> None:
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    row = conn.execute("SELECT df.start('SELECT 1')").fetchone()
    theirs = str(row[0])
    for instance in (theirs, "00000000"):
        shown = pgdurable(app, "show", instance)
        assert shown.exit_code == 1
        assert f"instance {instance} not found" in shown.stderr
        cancelled = pgdurable(app, "cancel", instance)
        assert cancelled.exit_code == 1
        assert f"Instance not found or access denied: {instance}" in cancelled.stderr


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


def test_watch_follows_an_instance_to_its_end(app: App, worker: ThreadWorker) -> None:
    instance = app.start("df.sleep(1) ~> 'SELECT 1 AS one'")
    watched = pgdurable(app, "watch", instance, "--json", "--interval", "0.1")
    documents = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.exit_code == 0
    assert len(documents) >= 2  # it saw the instance move on, not only its end
    assert documents[0]["instance"]["status"] in ("pending", "running")
    assert documents[-1]["instance"]["status"] == "completed"
    failing = app.start("'SELECT 1/0'")
    assert pgdurable(app, "watch", failing, "--json", "--interval", "0.1").exit_code == 1
    live = pgdurable(app, "watch", app.start("'SELECT 7'"), "--interval", "0.1")
    assert live.exit_code == 0
    assert "✓ completed" in live.stdout


def test_signal_and_cancel_from_the_command_line(app: App, worker: ThreadWorker) -> None:
    waiting = app.start("df.wait_for_signal('go') |=> 's' ~> 'SELECT $s.data AS got'")
    sent = pgdurable(app, "signal", waiting, "go", '{"ok": true}')
    assert sent.exit_code == 0, sent.output
    assert app.wait(waiting) == "completed"
    assert app.result(waiting) == {"rows": [{"got": '{"ok":true}'}], "row_count": 1}

    stuck = app.start("df.wait_for_signal('never') ~> 'SELECT 1'")
    cancelled = pgdurable(app, "cancel", stuck, "--reason", "not needed")
    assert cancelled.exit_code == 0
    assert f"Instance {stuck} cancelled: not needed" in cancelled.stderr
    assert app.wait(stuck) == "cancelled"
    late = pgdurable(app, "signal", stuck, "go")
    assert late.exit_code == 1
    assert f"Instance {stuck} is cancelled" in late.stderr


def test_cancel_and_signal_echo_user_text_without_markup(app: App) -> None:
    """The confirmation lines of `cancel` (df.cancel's answer, which repeats --reason) and of
    `signal` (the signal name) go through console.print with markup on: the command did its
    work, then dies with a traceback (MarkupError) or prints mangled text."""
    first = app.start("df.wait_for_signal('x')")
    result = pgdurable(app, "signal", first, "[/x]")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "[/x]" in result.stderr

    result = pgdurable(app, "cancel", first, "--reason", "[/oops]")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "[/oops]" in result.stderr


@pytest.mark.parametrize("command", ["ls", "show", "watch", "cancel", "signal"])
def test_every_command_needs_a_dsn(command: str) -> None:
    result = CliRunner(env={"PGDURABLE_DSN": ""}).invoke(main, [command, "abcdef01", "x"])
    assert result.exit_code == 2
    assert "--dsn" in result.output


def test_watch_runs_in_a_thread_safe_way(app: App, worker: ThreadWorker) -> None:
    """Two watchers of one instance both see it end (no shared state in the CLI)."""
    instance = app.start("df.sleep(1)")
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                pgdurable(app, "watch", instance, "--json", "--interval", "0.1").exit_code
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [0, 0]
