"""pgdurable ls, show, watch, cancel and signal against a real server and worker, as the
application role (so row-level security scopes what each command sees)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import App, ThreadWorker

from pgdurable.cli import main


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
