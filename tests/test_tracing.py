"""OpenTelemetry traces of instances and steps (--trace, docs/monitoring.md#opentelemetry-traces):
spans collected by the SDK's in-memory exporter from workers in threads, and the trace context
that each SQL step's statement carries in a comment."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from conftest import App, ThreadWorker
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

import pgdurable.worker
from pgdurable import cli
from pgdurable.worker.loop import Worker, WorkerConfig, WorkerError
from pgdurable.worker.tracing import instance_ids

Conn = psycopg.Connection[tuple[object, ...]]
TRACEPARENT = re.compile(r"/\*traceparent='00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})'\*/")


class Spans:
    """A tracer provider whose spans are kept in memory."""

    def __init__(self, **options: Any) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(**options)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def of(self, instance: str) -> list[ReadableSpan]:
        return [
            s
            for s in self.exporter.get_finished_spans()
            if (s.attributes or {}).get("pgdurable.instance.id") == instance
        ]

    def wait_for(self, instance: str, count: int, timeout: float = 10) -> list[ReadableSpan]:
        """The instance's spans once there are ``count`` (the last is emitted just after the
        checkpoint that the test may see first)."""
        deadline = time.monotonic() + timeout
        while len(spans := self.of(instance)) < count:
            assert time.monotonic() < deadline, spans
            time.sleep(0.02)
        return spans


@pytest.fixture
def spans() -> Spans:
    return Spans()


@pytest.fixture
def traced(dsn: str, spans: Spans) -> Iterator[ThreadWorker]:
    w = ThreadWorker(dsn, concurrency=4, tracer_provider=spans.provider)
    yield w
    w.stop()


def created_at(conn: Conn, instance: str) -> datetime:
    row = conn.execute("SELECT created_at FROM df.instances WHERE id = %s", (instance,)).fetchone()
    assert row is not None
    assert isinstance(row[0], datetime)
    return row[0]


def split(found: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The instance's span, and its steps' spans in the order they started."""
    [instance] = [s for s in found if s.name == "pgdurable instance"]
    steps = sorted((s for s in found if s is not instance), key=lambda s: s.start_time or 0)
    return instance, steps


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def comment_ids(query: object) -> tuple[int, int]:
    """The trace and span ids of the traceparent comment in a statement's text."""
    match = TRACEPARENT.search(str(query))
    assert match, query
    assert match.group(3) == "01"
    return int(match.group(1), 16), int(match.group(2), 16)


def test_spans_of_an_instance_and_its_steps(
    app: App, conn: Conn, spans: Spans, traced: ThreadWorker
) -> None:
    instance, status = app.run(
        "'SELECT current_query() AS q' |=> 'first'"
        " ~> 'SELECT query AS q FROM pg_stat_activity WHERE pid = pg_backend_pid() -- mine'"
    )
    assert status == "completed"
    root, steps = split(spans.wait_for(instance, 3))

    # The instance's span: a root, with the ids the instance derives, from its creation.
    trace_id, span_id = instance_ids(instance, created_at(conn, instance))
    assert (root.context.trace_id, root.context.span_id) == (trace_id, span_id)
    assert root.parent is None
    assert root.status.status_code == StatusCode.UNSET
    assert attrs(root) == {
        "pgdurable.instance.id": instance,
        "pgdurable.instance.status": "completed",
        "pgdurable.instance.submitted_by": app.role,
    }
    since_epoch = created_at(conn, instance) - datetime(1970, 1, 1, tzinfo=UTC)
    assert root.start_time == since_epoch // timedelta(microseconds=1) * 1000
    assert root.end_time is not None and root.end_time >= max(s.end_time or 0 for s in steps)

    # Its steps: children of it, each named by its kind, their nodes the graph's SQL nodes.
    nodes = {n["query"]: n["id"] for n in app.nodes(instance) if n["node_type"] == "SQL"}
    assert [s.name for s in steps] == ["pgdurable step sql"] * 2
    for step in steps:
        assert step.context.trace_id == trace_id
        assert step.parent is not None and step.parent.span_id == span_id
        assert attrs(step)["pgdurable.step.kind"] == "sql"
        assert attrs(step)["pgdurable.step.status"] == "completed"
        assert attrs(step)["pgdurable.worker.id"] == str(traced.worker.id)
    assert sorted(attrs(s)["pgdurable.node.id"] for s in steps) == sorted(nodes.values())

    # Each statement, as the server saw it, carried its own step's span in a comment: the
    # first ran with the instance's start, the second after a trailing "--" comment.
    results = {n["id"]: n["result"] for n in app.nodes(instance)}
    for step in steps:
        result = results[attrs(step)["pgdurable.node.id"]]
        assert isinstance(result, dict)
        [row] = result["rows"]
        assert comment_ids(row["q"]) == (trace_id, step.context.span_id)


def test_a_failed_step_and_instance_and_other_kinds_of_steps(
    app: App, conn: Conn, spans: Spans, traced: ThreadWorker
) -> None:
    instance, status = app.run("'SELECT 1 AS a' ~> df.sleep(0) ~> 'SELECT 1/0'")
    assert status == "failed"
    root, steps = split(spans.wait_for(instance, 3))
    assert root.status.status_code == StatusCode.ERROR
    assert "division by zero" in str(root.status.description)
    assert attrs(root)["pgdurable.instance.status"] == "failed"
    # A sleep is a wait, not a span: the gap between the two steps.
    assert [attrs(s)["pgdurable.step.status"] for s in steps] == ["completed", "failed"]
    assert steps[1].status.status_code == StatusCode.ERROR
    assert str(steps[1].status.description) == (
        "SQL execution failed: error returned from database: division by zero"
    )

    # A statement that cannot run in a transaction block runs alone, comment and all.
    conn.execute("CREATE TABLE public.t (a int)")
    conn.execute(f"ALTER TABLE public.t OWNER TO {app.role}")
    instance, status = app.run("'VACUUM public.t'")
    assert status == "completed"
    _, [vacuum] = split(spans.wait_for(instance, 2))
    assert attrs(vacuum)["pgdurable.step.status"] == "completed"


def test_batched_steps_each_carry_their_own_span(app: App, dsn: str, spans: Spans) -> None:
    """With more work than slots, the steps of one role run in batches (worker/batch.py):
    each statement of a batch names its own step's span."""
    instances = [app.start("'SELECT current_query() AS q'") for _ in range(12)]
    worker = ThreadWorker(dsn, concurrency=2, batch_size=5, tracer_provider=spans.provider)
    try:
        assert {app.wait(i) for i in instances} == {"completed"}
        for instance in instances:
            root, [step] = split(spans.wait_for(instance, 2))
            assert comment_ids(app.result(instance)["rows"][0]["q"]) == (  # type: ignore[index]
                root.context.trace_id,
                step.context.span_id,
            )
            assert step.parent is not None and step.parent.span_id == root.context.span_id
    finally:
        worker.stop()


def test_an_instance_is_one_trace_across_workers(app: App, dsn: str) -> None:
    """Steps run by two workers, each with its own exporter, share the instance's trace and
    parent; the worker that ends the instance emits its span."""
    first, second = Spans(), Spans()
    instance = app.start("'SELECT 1 AS a' ~> df.wait_for_signal('go') ~> 'SELECT 2 AS b'")
    worker = ThreadWorker(dsn, concurrency=2, tracer_provider=first.provider)
    try:
        [one] = first.wait_for(instance, 1)
        deadline = time.monotonic() + 10
        while not app.conn.execute(
            "SELECT 1 FROM df.nodes WHERE instance_id = %s AND node_type = 'SIGNAL'"
            " AND status = 'running'",
            (instance,),
        ).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        worker.stop()
    app.conn.execute("SELECT df.signal(%s, 'go')", (instance,))
    worker = ThreadWorker(dsn, concurrency=2, tracer_provider=second.provider)
    try:
        assert app.wait(instance) == "completed"
        root, [two] = split(second.wait_for(instance, 2))
    finally:
        worker.stop()
    assert one.context.trace_id == two.context.trace_id == root.context.trace_id
    assert one.parent is not None and two.parent is not None
    assert one.parent.span_id == two.parent.span_id == root.context.span_id
    assert first.of(instance) == [one]


def test_unsampled_traces_still_run_and_mark_their_statements(app: App, dsn: str) -> None:
    spans = Spans(sampler=ALWAYS_OFF)
    worker = ThreadWorker(dsn, concurrency=2, tracer_provider=spans.provider)
    try:
        instance, status = app.run("'SELECT current_query() AS q'")
        assert status == "completed"
    finally:
        worker.stop()
    assert spans.exporter.get_finished_spans() == ()
    match = TRACEPARENT.search(str(app.result(instance)))
    assert match and match.group(3) == "00"


def test_no_tracing_leaves_statements_alone_and_opentelemetry_unimported(
    app: App, worker: ThreadWorker
) -> None:
    instance, status = app.run("'SELECT current_query() AS q'")
    assert status == "completed"
    assert app.result(instance) == {"rows": [{"q": "SELECT current_query() AS q"}], "row_count": 1}
    code = (
        "import sys, pgdurable.cli, pgdurable.worker.loop;"
        " sys.exit(any(m.startswith('opentelemetry') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_tracing_without_opentelemetry_or_an_exporter_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "nonesuch")
    with pytest.raises(WorkerError, match="OTEL_TRACES_EXPORTER names 'nonesuch'"):
        Worker(WorkerConfig(dsn="dbname=x", trace=True))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    Worker(WorkerConfig(dsn="dbname=x", trace=True))  # no exporter: spans are dropped
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "pgdurable.worker.tracing")
    monkeypatch.delattr(pgdurable.worker, "tracing")
    with pytest.raises(WorkerError, match=r"pip install 'pgdurable\[tracing\]'"):
        Worker(WorkerConfig(dsn="dbname=x", trace=True))


def test_the_trace_option_and_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[WorkerConfig] = []
    monkeypatch.setattr(cli, "_run_worker", lambda config, demo=None: configs.append(config))
    runner = CliRunner()
    for args, env in [(["--trace"], {}), ([], {"PGDURABLE_TRACE": "1"}), ([], {})]:
        result = runner.invoke(cli.main, ["worker", "--dsn", "dbname=x", *args], env=env)
        assert result.exit_code == 0, result.output
    assert [c.trace for c in configs] == [True, True, False]
