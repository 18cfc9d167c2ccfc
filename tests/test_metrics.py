"""The worker's Prometheus metrics (--metrics-port, docs/monitoring.md#prometheus-metrics):
a worker with a metrics port runs workflows that move every metric, and each one is scraped
and checked to have moved by exactly what they did."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import python_steps_for_tests  # noqa: F401  (registers util.add)
from click.testing import CliRunner
from conftest import App, ThreadWorker
from httpserver import LocalHttpServer
from prometheus_client.parser import text_string_to_metric_families
from test_cli import Process

from pgdurable import cli
from pgdurable.embedded import EmbeddedPostgres, free_port
from pgdurable.python_steps import registered
from pgdurable.worker.egress import EgressPolicy
from pgdurable.worker.loop import WorkerConfig, WorkerError

Conn = psycopg.Connection[tuple[object, ...]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# 127.0.0.1 may be reached (the test server); 127.0.0.2 may not: a request the policy refuses
# before anything is sent.
LOCAL = EgressPolicy(allowed_networks=("127.0.0.1/32",))
# A step that fails at its first attempt and succeeds at the next (nextval is not rolled back).
FLAKY = "'SELECT 1 / (CASE WHEN nextval(''app.tries'') < 2 THEN 0 ELSE 1 END) AS ok'"


def scrape(port: int) -> Samples:
    """Every sample /metrics serves, by name and labels."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scrape_when(port: int, ready: Callable[[Samples], bool] = bool) -> Samples:
    """The first scrape that is ``ready``: the worker counts a step just after its commit,
    which the test may see first; and it listens only once its thread has started."""

    def attempt() -> Samples | None:
        try:
            samples = scrape(port)
        except httpx.ConnectError:
            return None
        return samples if ready(samples) else None

    result: Samples = wait_until(attempt)
    return result


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_until(probe: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def server() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as s:
        yield s


def lease_to(conn: Conn, instance: str, worker: uuid.UUID, visible: str) -> None:
    """Lease the instance's task to ``worker`` until ``visible`` (an SQL expression)."""
    cur = conn.execute(
        f"UPDATE df._tasks SET lease_owner = %s, token = gen_random_uuid(), visible_at = {visible}"
        " WHERE instance_id = %s",
        (worker, instance),
    )
    assert cur.rowcount == 1


def test_every_metric_moves_by_what_the_workflows_did(
    app: App, conn: Conn, dsn: str, server: LocalHttpServer
) -> None:
    app.conn.execute("CREATE SEQUENCE app.tries")
    conn.execute("SELECT df.grant_usage(%s, true)", (app.role,))  # df.http
    for pattern in ("util.*", "nobody.*"):
        conn.execute("SELECT df.grant_call(%s, %s)", (app.role, pattern))
    server.reply("/ok", body='{"ok": true}', headers=[("Content-Type", "application/json")])

    # Before the worker starts: a task whose lease ran out a second ago (its worker froze),
    # and one leased to a worker whose session ended (nobody holds its advisory lock).
    ran_out = app.start("'SELECT 1 AS a'")
    lease_to(conn, ran_out, uuid.uuid4(), "now() - interval '1 second'")
    gone, lock = uuid.uuid4(), 7_654_321
    conn.execute(
        "INSERT INTO df._worker_epoch (epoch_id, hostname, pid, concurrency, version,"
        " session_lock) VALUES (%s, 'gone', 1, 1, 'test', %s)",
        (gone, lock),
    )
    taken = app.start("'SELECT 2 AS a'")
    lease_to(conn, taken, gone, "now() + interval '1 hour'")

    port = free_port()
    worker = ThreadWorker(dsn, concurrency=4, egress=LOCAL, steps=registered(), metrics_port=port)
    try:
        assert app.wait(ran_out) == "completed"
        assert app.wait(taken) == "completed"
        before = scrape_when(
            port, lambda s: value(s, "pgdurable_steps_completed_total", kind="sql") == 2
        )
        assert value(before, "pgdurable_leases_expired_total", reason="ran_out") == 1
        assert value(before, "pgdurable_leases_expired_total", reason="worker_gone") == 1
        # Each first step ran in its start's transaction: SQL steps all the same.
        assert value(before, "pgdurable_steps_started_total", kind="sql") == 2
        assert value(before, "pgdurable_steps_completed_total", kind="sql") == 2
        # Both starts were claimed; the one whose lease ran out had been due for a second.
        assert value(before, "pgdurable_claim_latency_seconds_count", kind="start") == 2
        assert value(before, "pgdurable_claim_latency_seconds_sum", kind="start") >= 1.0
        assert value(before, "pgdurable_worker_slots") == 4
        assert value(before, "pgdurable_leases_held") == 0

        runs = {
            "two SQL steps": "'SELECT 1 AS a' ~> 'SELECT 2 AS b'",
            "a failed SQL step": "'SELECT 1/0'",
            "a retried step": f"df.retry({FLAKY}, 3, 0.1)",
            "an HTTP step": f"df.http('{server.url('/ok')}')",
            "a refused HTTP step": "df.http('http://127.0.0.2:9/refused')",
            "a Python step": "df.call('util.add', '{\"a\": 1, \"b\": 2}')",
            "a sleep": "df.sleep(1)",
        }
        outcomes = {name: app.run(graph)[1] for name, graph in runs.items()}
        assert outcomes == {
            **dict.fromkeys(runs, "completed"),
            "a failed SQL step": "failed",
            "a refused HTTP step": "failed",
        }
        waiting = app.start("df.wait_for_signal('go')")
        wait_until(lambda: app.conn.execute("SELECT 1 FROM df.nodes WHERE instance_id = %s"
                                            " AND node_type = 'SIGNAL' AND status = 'running'",
                                            (waiting,)).fetchone())  # fmt: skip
        app.conn.execute("SELECT df.signal(%s, 'go', '{}')", (waiting,))
        assert app.wait(waiting) == "completed"
        after = scrape_when(
            port, lambda s: value(s, "pgdurable_steps_completed_total", kind="signal") == 1
        )
    finally:
        worker.stop()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    steps = {
        # kind: (started, completed, failed)
        "sql": (2 + 1 + 2, 2 + 0 + 1, 0 + 1 + 1),
        "http": (2, 1, 1),
        "call": (1, 1, 0),
        "timer": (1, 1, 0),
        "signal": (1, 1, 0),
    }
    for kind, (started, completed, failed) in steps.items():
        assert (
            moved("pgdurable_steps_started_total", kind=kind),
            moved("pgdurable_steps_completed_total", kind=kind),
            moved("pgdurable_steps_failed_total", kind=kind),
        ) == (started, completed, failed), kind
    for kind, count in {"sql": 5, "http": 2, "call": 1}.items():
        assert moved("pgdurable_step_duration_seconds_count", kind=kind) == count, kind
        assert value(after, "pgdurable_step_duration_seconds_bucket", kind=kind, le="+Inf") == (
            value(after, "pgdurable_step_duration_seconds_count", kind=kind)
        )
    # The sleep lasted a second, but the worker spent far less on it: waits are not timed.
    assert ("pgdurable_step_duration_seconds_count", frozenset({("kind", "timer")})) not in after
    assert moved("pgdurable_retries_total") == 1
    assert moved("pgdurable_http_egress_refused_total") == 1
    # Claimed: every start, the retry's backoff timer, the sleep's timer and the signal wait
    # (woken by the signal). The steps after a first one were handed over by checkpoints.
    assert moved("pgdurable_claim_latency_seconds_count", kind="start") == len(runs) + 1
    assert moved("pgdurable_claim_latency_seconds_count", kind="timer") == 2
    assert moved("pgdurable_claim_latency_seconds_count", kind="signal") == 1
    assert moved("pgdurable_claim_latency_seconds_count", kind="sql") == 0
    assert moved("pgdurable_leases_expired_total", reason="ran_out") == 0


def test_gauges_of_leases_held_and_of_ready_tasks(app: App, conn: Conn, dsn: str) -> None:
    conn.execute("SELECT df.grant_call(%s, 'nobody.*')", (app.role,))
    port = free_port()
    worker = ThreadWorker(dsn, concurrency=3, metrics_port=port)
    try:
        idle = scrape_when(port)
        assert value(idle, "pgdurable_leases_held") == 0
        assert value(idle, "pgdurable_ready_tasks", kind="call") == 0
        assert value(idle, "pgdurable_ready_tasks_oldest_seconds") == 0
        [info] = [labels for name, labels in idle if name == "pgdurable_worker_info"]
        assert dict(info)["worker_id"] == str(worker.worker.id)

        # A Python step no worker has waits, due, for a claim that never comes.
        waiting = app.start("df.call('nobody.has', '{}')")
        ready = scrape_when(port, lambda s: value(s, "pgdurable_ready_tasks", kind="call") == 1)
        assert value(ready, "pgdurable_ready_tasks", kind="sql") == 0
        slow = app.start("'SELECT pg_sleep(2)'")
        busy = scrape_when(port, lambda s: value(s, "pgdurable_leases_held") == 1)
        assert value(busy, "pgdurable_ready_tasks_oldest_seconds") > 0
        assert app.wait(slow) == "completed"
        scrape_when(port, lambda s: value(s, "pgdurable_leases_held") == 0)
        app.conn.execute("SELECT df.cancel(%s)", (waiting,))
    finally:
        worker.stop()
    # The endpoint went with the worker.
    with pytest.raises(httpx.ConnectError):
        scrape(port)


def test_two_workers_in_one_process_have_their_own_metrics(dsn: str) -> None:
    ports = [free_port(), free_port()]
    workers = [
        ThreadWorker(dsn, concurrency=c, metrics_port=p) for c, p in zip((2, 5), ports, strict=True)
    ]
    try:
        slots = [scrape_when(p) for p in ports]
        assert [value(s, "pgdurable_worker_slots") for s in slots] == [2, 5]
    finally:
        for w in workers:
            w.stop()


def test_a_port_in_use_stops_the_worker_at_once(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        worker = ThreadWorker(dsn, metrics_port=taken.getsockname()[1])
        worker.thread.join(timeout=30)
        with pytest.raises(WorkerError, match="cannot serve metrics"):
            worker.stop()


def test_a_worker_without_a_metrics_port_serves_nothing(dsn: str, app: App) -> None:
    worker = ThreadWorker(dsn, concurrency=2)
    try:
        assert app.run("'SELECT 1'")[1] == "completed"
        assert worker.worker._telemetry is None
    finally:
        worker.stop()


def test_the_worker_command_serves_metrics(cluster: EmbeddedPostgres, dbname: str) -> None:
    port = free_port()
    proc = Process(
        "worker", "--dsn", cluster.dsn(dbname), "--metrics-port", str(port), "--concurrency", "3"
    )
    try:
        proc.wait_for("ready: concurrency")
        assert value(scrape_when(port), "pgdurable_worker_slots") == 3
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output


def test_the_metrics_options_and_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    configs: list[WorkerConfig] = []
    monkeypatch.setattr(cli, "_run_worker", lambda config, demo=None: configs.append(config))
    runner = CliRunner()
    for args, env in [
        (["--metrics-port", "9108", "--metrics-host", "0.0.0.0"], {}),
        ([], {"PGDURABLE_METRICS_PORT": "9108", "PGDURABLE_METRICS_HOST": "0.0.0.0"}),
        ([], {}),
    ]:
        result = runner.invoke(cli.main, ["worker", "--dsn", "dbname=x", *args], env=env)
        assert result.exit_code == 0, result.output
    assert [(c.metrics_port, c.metrics_host) for c in configs] == [
        (9108, "0.0.0.0"),
        (9108, "0.0.0.0"),
        (None, "127.0.0.1"),
    ]
    result = runner.invoke(cli.main, ["worker", "--dsn", "dbname=x", "--metrics-port", "0"])
    assert result.exit_code == 2 and "--metrics-port" in result.output
