"""HTTP steps end to end (docs/http.md): a worker, a local HTTP server, the egress policy.

The worker's policy exempts 127.0.0.1 from the address block-list (as an operator would
exempt an internal service), except in the tests of the default policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import App, ThreadWorker
from httpserver import LocalHttpServer

from pgdurable.worker.egress import EgressPolicy

LOCAL = EgressPolicy(allowed_networks=("127.0.0.1/32",))


@pytest.fixture
def server() -> Iterator[LocalHttpServer]:
    with LocalHttpServer() as s:
        yield s


@pytest.fixture
def http_app(app: App, conn: psycopg.Connection[Any]) -> App:
    conn.execute("SELECT df.grant_usage(%s, true)", (app.role,))
    return app


def start_worker(dsn: str, request: pytest.FixtureRequest, **egress: Any) -> ThreadWorker:
    policy = EgressPolicy(**egress) if egress else LOCAL
    w = ThreadWorker(dsn, concurrency=4, egress=policy)
    request.addfinalizer(w.stop)
    return w


@pytest.fixture
def local_worker(dsn: str, request: pytest.FixtureRequest) -> ThreadWorker:
    return start_worker(dsn, request)


def http(url: str, method: str = "GET", *rest: str) -> str:
    args = ", ".join([f"'{url}'", f"'{method}'", *rest])
    return f"df.http({args})"


def test_get_returns_the_response_envelope_as_a_named_result(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.reply("/item", body='{"id": 7}', headers=[("Content-Type", "application/json")])
    instance, status = http_app.run(
        f"{http(server.url('/item'))} |=> 'r'"
        " ~> 'SELECT $r.status AS status, ($r.body)::jsonb ->> ''id'' AS id, $r.ok AS ok'"
    )
    assert status == "completed"
    assert http_app.result(instance) == {
        "rows": [{"status": 200, "id": "7", "ok": True}],
        "row_count": 1,
    }
    envelope = next(n for n in http_app.nodes(instance) if n["node_type"] == "HTTP")["result"]
    assert isinstance(envelope, dict)
    assert set(envelope) == {"status", "body", "encoding", "headers", "ok", "duration_ms"}
    assert envelope["headers"]["content-type"] == "application/json"
    assert [r.method for r in server.hits("/item")] == ["GET"]


def test_substitution_in_url_body_and_headers_and_a_stable_idempotency_key(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.reply("/orders/42", status=201)
    http_app.conn.execute("SELECT df.setvar('token', 's3cret')")
    instance, status = http_app.run(
        "'SELECT 42 AS id, ''ann'' AS who' |=> 'o' ~> "
        + http(
            server.url("/orders/$o.id"),
            "POST",
            """'{"who": "$o.who", "run": "{sys_instance_id}"}'""",
            """'{"Authorization": "Bearer {token}", "X-Order": "$o.id", "X-N": 5}'""",
        )
    )
    assert status == "completed"
    [hit] = server.hits("/orders/42")
    assert json.loads(hit.body) == {"who": "ann", "run": instance}
    assert hit.header("Authorization") == "Bearer s3cret"
    assert hit.header("X-Order") == "42"
    assert hit.header("X-N") is None  # non-string header values are ignored
    node = next(n for n in http_app.nodes(instance) if n["node_type"] == "HTTP")
    assert hit.header("Idempotency-Key") == f"pgdurable:{instance}::1:{node['id']}"


def test_4xx_succeeds_with_ok_false_and_5xx_fails_with_a_preview(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.reply("/missing", status=404, body="nope")
    server.reply("/broken", status=503, body="try later")
    instance, status = http_app.run(http(server.url("/missing")))
    assert status == "completed"
    assert http_app.result(instance)["ok"] is False  # type: ignore[index]
    instance, status = http_app.run(http(server.url("/broken")))
    assert status == "failed"
    assert http_app.failure(instance) == f"HTTP GET {server.url('/broken')} returned 503: try later"


def test_retry_resends_with_the_same_idempotency_key(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.reply("/flaky", status=503, body="busy")
    instance = http_app.start(f"df.retry({http(server.url('/flaky'), 'POST')}, 3, 1, 1)")
    deadline = time.monotonic() + 15
    while not server.hits("/flaky"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.reply("/flaky", status=200, body="done")  # before the backoff (>= 0.5 s) is over
    assert http_app.wait(instance) == "completed"
    first, second = server.hits("/flaky")
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key") is not None
    history = http_app.conn.execute(
        "SELECT error FROM df.nodes WHERE instance_id = %s AND node_type = 'RETRY'", (instance,)
    ).fetchone()
    assert history == (f"attempt 1: HTTP POST {server.url('/flaky')} returned 503: busy",)


def test_a_hanging_server_times_out(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.hang("/hang")
    began = time.monotonic()
    instance, status = http_app.run(http(server.url("/hang"), "GET", "NULL", "NULL", "1"))
    assert status == "failed"
    assert http_app.failure(instance) == f"HTTP timeout after 1s: {server.url('/hang')}"
    assert time.monotonic() - began < 10


def test_df_timeout_and_cancel_abandon_a_request_in_flight(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.hang("/hang")
    began = time.monotonic()
    instance, status = http_app.run(f"df.timeout({http(server.url('/hang'))}, 1)")
    assert (status, http_app.failure(instance)) == ("failed", "Timed out after 1s (df.timeout)")
    assert time.monotonic() - began < 10
    instance = http_app.start(http(server.url("/hang")))
    deadline = time.monotonic() + 15
    while len(server.hits("/hang")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    http_app.conn.execute("SELECT df.cancel(%s)", (instance,))
    assert http_app.wait(instance) == "cancelled"
    # The worker's slots are free again: four quick workflows run at once.
    server.reply("/ok", body="fine")
    ids = [http_app.start(http(server.url("/ok"))) for _ in range(4)]
    assert [http_app.wait(i, 10) for i in ids] == ["completed"] * 4


def test_garbage_and_huge_responses_fail_the_step(
    http_app: App, dsn: str, request: pytest.FixtureRequest, server: LocalHttpServer
) -> None:
    start_worker(dsn, request, allowed_networks=("127.0.0.1/32",), max_response_bytes=1000)
    server.garbage("/garbage")
    server.huge("/huge", 100_000)
    instance, status = http_app.run(http(server.url("/garbage")))
    assert status == "failed"
    assert str(http_app.failure(instance)).startswith(
        f"HTTP request failed: {server.url('/garbage')} - "
    )
    instance, status = http_app.run(http(server.url("/huge")))
    assert (status, http_app.failure(instance)) == (
        "failed",
        f"HTTP response too large: {server.url('/huge')} - more than 1000 bytes",
    )


def test_default_policy_blocks_loopback_and_redirects_to_it(
    http_app: App, dsn: str, request: pytest.FixtureRequest, server: LocalHttpServer
) -> None:
    start_worker(dsn, request, max_redirects=3)
    server.reply("/secret", body="internal")
    instance, status = http_app.run(http(server.url("/secret")))
    assert status == "failed"
    assert http_app.failure(instance) == (
        "Blocked: the resolved IP address for '127.0.0.1' is in a restricted range. df.http() "
        "cannot access private or internal network addresses."
    )
    instance, status = http_app.run(http("http://localhost:1/x"))
    assert str(http_app.failure(instance)).startswith(
        "Blocked: the resolved IP address for 'localhost'"
    )
    assert server.hits("/secret") == []


def test_redirects_are_returned_not_followed_by_default(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.redirect("/go", "http://169.254.169.254/latest/meta-data/")
    instance, status = http_app.run(http(server.url("/go")))
    assert status == "completed"
    result = http_app.result(instance)
    assert isinstance(result, dict) and result["status"] == 302 and result["ok"] is False
    assert result["headers"]["location"] == "http://169.254.169.254/latest/meta-data/"


def test_followed_redirects_are_checked_against_the_policy(
    http_app: App, dsn: str, request: pytest.FixtureRequest, server: LocalHttpServer
) -> None:
    start_worker(dsn, request, allowed_networks=("127.0.0.1/32",), max_redirects=2)
    server.redirect("/go", "http://169.254.169.254/latest/meta-data/")
    server.redirect("/local", "/ok")
    server.reply("/ok", body="here")
    instance, status = http_app.run(http(server.url("/go")))
    assert status == "failed"
    assert str(http_app.failure(instance)).startswith(
        "Blocked: the resolved IP address for '169.254.169.254' is in a restricted range."
    )
    instance, status = http_app.run(http(server.url("/local")))
    assert status == "completed"
    assert http_app.result(instance)["body"] == "here"  # type: ignore[index]


def test_a_worker_with_http_disabled_blocks_every_request(
    http_app: App, dsn: str, request: pytest.FixtureRequest
) -> None:
    start_worker(dsn, request, enabled=False)
    instance, status = http_app.run(http("https://example.com/"))
    assert status == "failed"
    assert http_app.failure(instance) == (
        "Blocked: outbound HTTP requests are disabled by this worker's egress policy "
        "(pgdurable worker --http-disable)."
    )


def test_revoking_execute_stops_running_workflows_at_their_next_request(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer, conn: Any
) -> None:
    server.reply("/ok")
    instance = http_app.start(f"df.sleep(1) ~> {http(server.url('/ok'))}")
    conn.execute(f"SELECT df.revoke_usage('{http_app.role}'), df.grant_usage('{http_app.role}')")
    assert http_app.wait(instance) == "failed"
    assert http_app.failure(instance) == (
        f"Blocked: role '{http_app.role}' does not have EXECUTE privilege on df.http(). Grant "
        f"EXECUTE ON FUNCTION df.http(text,text,text,jsonb,integer) TO {http_app.role} to allow "
        "HTTP requests."
    )
    assert server.hits("/ok") == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        http_app.conn.execute(f"SELECT {http(server.url('/ok'))}")


def test_multipart_parts_reach_the_server(
    http_app: App, local_worker: ThreadWorker, server: LocalHttpServer
) -> None:
    server.reply("/upload", status=201)
    parts = (
        '[{"name": "meta", "data_b64": "eyJhIjoxfQ==", "content_type": "application/json"},'
        ' {"name": "file", "data_b64": "$f.b64", "filename": "hello.txt"}]'
    )
    _, status = http_app.run(
        "'SELECT encode(''hello'', ''base64'') AS b64' |=> 'f' ~> "
        f"df.http_multipart('{server.url('/upload')}', 'POST', '{parts}')"
    )
    assert status == "completed"
    [hit] = server.hits("/upload")
    content_type = hit.header("Content-Type") or ""
    assert content_type.startswith("multipart/form-data; boundary=")
    assert b'name="meta"' in hit.body and b'{"a":1}' in hit.body
    assert b'name="file"; filename="hello.txt"' in hit.body and b"hello" in hit.body
