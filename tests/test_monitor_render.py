"""The CLI's renderings (monitor/render.py), without a database: rows in, text out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console

from pgdurable.core.model import Node
from pgdurable.monitor import render

T0 = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def text_of(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def row(node_id: str, node_type: str, status: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node_id": node_id,
        "node_type": node_type,
        "query": None,
        "result_name": None,
        "left_node": None,
        "right_node": None,
        "status": status,
        "inferred_status": status,
        "result": None,
        "error": None,
        "started_at": None,
        "updated_at": T0,
    }
    base.update(kw)
    return base


def test_durations() -> None:
    assert [
        render.format_duration(T0, T0 + timedelta(seconds=s)) for s in (0.0123, 3.14, 125, 3720)
    ] == ["12 ms", "3.1 s", "2m 05s", "1h 02m"]
    assert render.format_duration(T0, T0 - timedelta(seconds=1)) == "0 ms"


def test_every_node_type_in_one_line() -> None:
    def describe(node_type: str, query: str | None = None, **kw: Any) -> str:
        config = json.loads(query) if query and query.startswith("{") else {}
        return render.describe(Node("n", node_type, query=query, config=config, **kw))

    assert describe("SQL", "SELECT  1\n  FROM t") == "SQL: SELECT 1 FROM t"
    assert describe("SQL", "SELECT " + "x" * 100).endswith("x…")
    assert describe("SLEEP", "5") == "sleep 5s"
    assert describe("WAIT_SCHEDULE", '{"cron_expr":"0 * * * *"}') == (
        "wait for schedule '0 * * * *'"
    )
    assert describe("SIGNAL", '{"signal_name":"go"}') == "wait for signal 'go'"
    assert describe("SIGNAL", '{"signal_name":"go","timeout_seconds":60}') == (
        "wait for signal 'go' (60s)"
    )
    assert describe("HTTP", '{"method":"POST","url":"https://example.com/x"}') == (
        "HTTP POST https://example.com/x"
    )
    assert describe("BREAK", '{"break_value":null}') == "break"
    assert describe("BREAK", '{"break_value":"done"}') == "break 'done'"
    assert describe("LOOP") == "loop"
    assert describe("LOOP", condition="c") == "loop (while)"
    assert describe("JOIN", extras=("x",)) == "join (3)"
    assert describe("RACE") == "race"
    assert describe("IF", "{}") == "if"
    assert describe("RETRY", '{"max_attempts":3}') == "retry (max 3 attempts)"
    assert describe("TIMEOUT", '{"timeout_seconds":30}') == "timeout 30s"


def test_tree_with_statuses_durations_results_and_errors() -> None:
    later = T0 + timedelta(milliseconds=250)
    rows = [
        row("t1", "THEN", "failed", left_node="a", right_node="t2"),
        row(
            "a",
            "SQL",
            "completed",
            query="SELECT 1 AS one",
            result_name="x",
            result='{"rows":[{"one":1}],"row_count":1}',
            started_at=T0,
            updated_at=later,
        ),
        row("t2", "THEN", "failed", left_node="j", right_node="z"),
        row("j", "JOIN", "failed", left_node="b", right_node="c"),
        row(
            "b",
            "SQL",
            "failed",
            query="SELECT 1/0",
            result='"division by zero"',
            started_at=T0,
            updated_at=later,
        ),
        row("c", "SIGNAL", "running", query='{"signal_name":"go"}', started_at=T0),
        row("z", "SQL", "pending", inferred_status="skipped", query="SELECT 'never'"),
    ]
    tree = render.node_tree("t1", rows, now=T0 + timedelta(seconds=2))
    # The top-level sequence reads as steps in order; compounds open their blocks.
    assert text_of(tree).splitlines() == [
        "✓ SQL: SELECT 1 AS one |=> 'x'  250 ms",
        '└── = {"rows": [{"one": 1}], "row_count": 1}',
        "✗ join (2)",
        "├── branch 1:",
        "│   └── ✗ SQL: SELECT 1/0  250 ms",
        "│       └── division by zero",
        "└── branch 2:",
        "    └── ⏳ wait for signal 'go'  2.0 s",
        "⊘ SQL: SELECT 'never'",
    ]


def test_retry_history_and_missing_rows() -> None:
    rows = [
        row(
            "r",
            "RETRY",
            "completed",
            query='{"max_attempts":3}',
            left_node="s",
            error="attempt 1: boom\nattempt 2: boom",
        ),
        row("s", "SQL", "completed", query="SELECT 1"),
    ]
    lines = text_of(render.node_tree("r", rows, now=T0)).splitlines()
    assert lines == [
        "✓ retry (max 3 attempts)",
        "├── attempt 1: boom",
        "├── attempt 2: boom",
        "└── attempt:",
        "    └── ✓ SQL: SELECT 1",
    ]
    assert render.node_tree("gone", rows, now=T0) is None


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


def test_json_records() -> None:
    record = render.node_record(row("a", "SQL", "completed", result='{"rows":[],"row_count":0}'))
    assert record["result"] == {"rows": [], "row_count": 0}
    assert render.node_record(row("a", "SQL", "failed", result="not json"))["result"] == (
        "not json"
    )
    assert json.loads(render.to_json({"at": T0})) == {"at": "2026-11-21T12:00:00+00:00"}


def test_a_python_step_that_no_live_worker_has_says_it_waits() -> None:
    query = '{"name":"billing.charge","args":{}}'
    waiting = row("c", "CALL", "running", query=query, started_at=T0, has_worker=False)
    assert render.NO_WORKER in text_of(render.node_tree("c", [waiting], T0))
    running = dict(waiting, has_worker=True)
    text = text_of(render.node_tree("c", [running], T0))
    assert "call billing.charge" in text and render.NO_WORKER not in text
