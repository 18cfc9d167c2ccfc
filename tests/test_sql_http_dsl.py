"""HTTP builders and the retry/timeout wrappers in SQL (migration 0008): df.http,
df.http_multipart (pg_durable's JSON, checks and errors), df.retry and df.timeout (pgdurable's
own), how df.start validates and stores them, and who may build HTTP steps
(docs/reference.md#dfhttp-and-dfhttp_multipart, docs/retries.md).

Regression style: each table row is an SQL expression and the exact text it must produce, or
the exact error it must raise. No worker runs here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from sqlcheck import Conn, Error, check, outcome

from pgdurable.embedded import EmbeddedPostgres

TYPES = (
    "SQL, THEN, IF, JOIN, LOOP, BREAK, RACE, SLEEP, WAIT_SCHEDULE, HTTP, HTTP_MULTIPART, SIGNAL,"
    " RETRY, TIMEOUT, CALL, MAP"
)
RETRY_ON = (
    "df.retry: retry_on must list error codes (SQLSTATE codes or classes, or http, http_5xx,"
    " http_timeout, http_connection, timeout, python)"
)
SCHEME = "Blocked: unsupported URL scheme '{}'. Only http and https are allowed."
METHOD = "Invalid HTTP method: {}. Must be GET, POST, PUT, DELETE, or PATCH"
MULTIPART_METHOD = "Invalid HTTP method for multipart: {}. Must be POST, PUT, or PATCH"
HTTP_SIG = "df.http(text,text,text,jsonb,integer)"
MULTIPART_SIG = "df.http_multipart(text,text,jsonb,jsonb,integer)"


# -- helpers ------------------------------------------------------------------------------------


def j(value: Any) -> str:
    """Compact JSON, keys in the given order, as the DSL prints envelopes and configs."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def sql_node(query: str, name: str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"node_type": "SQL", "query": query}
    if name is not None:
        node["result_name"] = name
    return node


def http_node(
    url: str,
    method: str = "POST",
    body: str | None = None,
    headers: Any = None,
    timeout: int = 30,
) -> dict[str, Any]:
    config = {
        "url": url,
        "method": method,
        "body": body,
        "headers": headers,
        "timeout_seconds": timeout,
    }
    return {"node_type": "HTTP", "query": j(config)}


def multipart_node(
    url: str, parts: Any, method: str = "POST", headers: Any = None, timeout: int = 30
) -> dict[str, Any]:
    config = {
        "url": url,
        "method": method,
        "parts": parts,
        "headers": headers,
        "timeout_seconds": timeout,
    }
    return {"node_type": "HTTP_MULTIPART", "query": j(config)}


def retry_node(
    step: dict[str, Any],
    attempts: int,
    backoff: float = 1,
    cap: float = 60,
    retry_on: list[str] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    config = {
        "max_attempts": attempts,
        "backoff_seconds": backoff,
        "max_backoff_seconds": cap,
        "retry_on": retry_on,
    }
    node = {"node_type": "RETRY", "left_node": step, "query": j(config)}
    if name is not None:
        node["result_name"] = name
    return node


def timeout_node(step: dict[str, Any], seconds: float, name: str | None = None) -> dict[str, Any]:
    node = {"node_type": "TIMEOUT", "left_node": step, "query": j({"timeout_seconds": seconds})}
    if name is not None:
        node["result_name"] = name
    return node


def two(node_type: str, left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {"node_type": node_type, "left_node": left, "right_node": right}


def lit(text: str) -> str:
    """An SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def count_rows(conn: Conn) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM df.instances), (SELECT count(*) FROM df.nodes)"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def check_start_errors(conn: Conn, cases: Sequence[tuple[dict[str, Any] | str, str]]) -> None:
    """df.start(<graph>) must fail with exactly the given message, writing nothing."""
    failures = []
    for graph, message in cases:
        text = graph if isinstance(graph, str) else j(graph)
        got = outcome(conn, "df.start(%s)", [text])
        if got != Error(message):
            failures.append(f"df.start({text})\n    expected: {message}\n    got:      {got!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
    assert count_rows(conn) == (0, 0)


def stored(conn: Conn, instance: str) -> dict[str, Any]:
    """The stored graph as nested dicts, following left_node/right_node from the root: each
    row's node_type, query and result_name, with its children under "left"/"right"."""
    rows = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT id, node_type, query, result_name, left_node, right_node FROM df.nodes"
            " WHERE instance_id = %s",
            (instance,),
        ).fetchall()
    }
    root = conn.execute("SELECT root_node FROM df.instances WHERE id = %s", (instance,)).fetchone()
    assert root is not None

    def build(node_id: str) -> dict[str, Any]:
        node_type, query, result_name, left, right = rows.pop(node_id)
        out: dict[str, Any] = {"type": node_type, "query": query}
        if result_name is not None:
            out["name"] = result_name
        if left is not None:
            out["left"] = build(left)
        if right is not None:
            out["right"] = build(right)
        return out

    graph = build(root[0])
    assert not rows, f"nodes not reachable from the root: {rows}"
    return graph


def leaf(query: str) -> dict[str, Any]:
    return {"type": "SQL", "query": query}


@pytest.fixture
def su(conn: Conn) -> Conn:
    """The superuser connection, allowed to start instances."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    return conn


@pytest.fixture
def make_role(cluster: EmbeddedPostgres, dbname: str, conn: Conn) -> Iterator[Any]:
    """LOGIN roles with unique names and a connection as each (no df usage unless granted);
    dropped with their privileges afterwards."""
    made: list[tuple[str, Conn]] = []

    def create() -> tuple[str, Conn]:
        name = f"pgd_http_{uuid.uuid4().hex[:10]}"
        conn.execute(f'CREATE ROLE "{name}" LOGIN')
        role = (name, psycopg.connect(cluster.dsn(dbname), user=name, autocommit=True))
        made.append(role)
        return role

    yield create
    for name, role_conn in made:
        role_conn.close()
        conn.execute(f'DROP OWNED BY "{name}"')
        conn.execute(f'DROP ROLE "{name}"')


# -- df.http ------------------------------------------------------------------------------------


def test_http_builds_the_envelope_byte_for_byte(conn: Conn) -> None:
    url = "https://api.example.com/v1/items?id=1"
    check(
        conn,
        [
            (f"df.http({lit(url)})", j(http_node(url))),
            (f"df.http({lit(url)}, 'get')", j(http_node(url, "GET"))),
            (f"df.http({lit(url)}, 'Delete')", j(http_node(url, "DELETE"))),
            (f"df.http({lit(url)}, 'PUT')", j(http_node(url, "PUT"))),
            (f"df.http({lit(url)}, 'patch')", j(http_node(url, "PATCH"))),
            (
                "df.http('http://h/x', 'POST', '{\"a\": 1}', '{\"X-Key\": \"k\"}', 5)",
                j(http_node("http://h/x", "POST", '{"a": 1}', {"X-Key": "k"}, 5)),
            ),
            # The body is text, taken literally; quotes and newlines are escaped once more
            # inside the config string.
            (
                "df.http('https://h', 'POST', E'line \"1\"\\nline 2 \\\\ é')",
                j(http_node("https://h", "POST", 'line "1"\nline 2 \\ é')),
            ),
            # Headers as given (no check), compact, in jsonb's key order (shorter keys first),
            # numbers as jsonb keeps them (2.50), strings escaped as in any JSON text.
            (
                'df.http(\'https://h\', headers => \'{"Content-Type": "application/json",'
                ' "Authorization": "Bearer t", "X": [1, {"a b": 2.50}], "Q": "\\"é\\n"}\')',
                j(
                    {
                        "node_type": "HTTP",
                        "query": '{"url":"https://h","method":"POST","body":null,"headers":'
                        '{"Q":"\\"é\\n","X":[1,{"a b":2.50}],"Content-Type":"application/json",'
                        '"Authorization":"Bearer t"},"timeout_seconds":30}',
                    }
                ),
            ),
            (
                "df.http('https://h', headers => '{}')",
                j(http_node("https://h", headers={})),
            ),
            (
                "df.http('https://h', headers => '[\"not\", \"checked\", true, null]')",
                j(http_node("https://h", headers=["not", "checked", True, None])),
            ),
            ("df.http('https://h', headers => 'null')", j(http_node("https://h", headers=None))),
            ("df.http('https://h', timeout_seconds => 1)", j(http_node("https://h", timeout=1))),
            # Named arguments, body and headers NULL on purpose.
            (
                "df.http(url => 'https://h', method => 'get', body => NULL, headers => NULL)",
                j(http_node("https://h", "GET")),
            ),
        ],
    )


def test_http_url_checks(conn: Conn) -> None:
    check(
        conn,
        [
            # The scheme is case-insensitive and reported lower-cased.
            ("df.http('HTTPS://H/x') IS NOT NULL", True),
            ("df.http('Http://h') IS NOT NULL", True),
            ("df.http('ftp://h/x')", Error(SCHEME.format("ftp"))),
            ("df.http('FTP://h/x')", Error(SCHEME.format("ftp"))),
            ("df.http('file:///etc/passwd')", Error(SCHEME.format("file"))),
            ("df.http('https:/h')", Error(SCHEME.format("https:/h"))),
            # No '://': the whole URL is taken as the scheme.
            ("df.http('example.com/x')", Error(SCHEME.format("example.com/x"))),
            ("df.http('')", Error(SCHEME.format(""))),
            # A $var URL fails here (as in pg_durable); a {var} may supply the scheme later.
            ("df.http('$url')", Error(SCHEME.format("$url"))),
            (
                "df.http('{base_url}/items')",
                j(http_node("{base_url}/items")),
            ),
            ("df.http('ftp://{host}/x') IS NOT NULL", True),
            (
                "df.http('https://h/$item.id?q={sys_instance_id}')",
                j(http_node("https://h/$item.id?q={sys_instance_id}")),
            ),
        ],
    )


def test_http_errors(conn: Conn) -> None:
    check(
        conn,
        [
            ("df.http('https://h', 'HEAD')", Error(METHOD.format("HEAD"))),
            ("df.http('https://h', 'options')", Error(METHOD.format("OPTIONS"))),
            ("df.http('https://h', '')", Error(METHOD.format(""))),
            ("df.http('https://h', ' GET')", Error(METHOD.format(" GET"))),
            ("df.http('https://h', timeout_seconds => 0)", Error("Timeout must be positive")),
            ("df.http('https://h', timeout_seconds => -5)", Error("Timeout must be positive")),
            # Checks in order: scheme, method, timeout.
            ("df.http('ftp://h', 'HEAD', NULL, NULL, 0)", Error(SCHEME.format("ftp"))),
            ("df.http('https://h', 'HEAD', NULL, NULL, 0)", Error(METHOD.format("HEAD"))),
            # NULL where a value is needed is refused (first), not turned into NULL.
            ("df.http(NULL)", Error("df.http: url cannot be NULL")),
            ("df.http(NULL, 'HEAD')", Error("df.http: url cannot be NULL")),
            ("df.http('ftp://h', NULL)", Error("df.http: method cannot be NULL")),
            (
                "df.http('ftp://h', 'GET', timeout_seconds => NULL)",
                Error("df.http: timeout_seconds cannot be NULL"),
            ),
        ],
    )


# -- df.http_multipart ----------------------------------------------------------------------------


def test_http_multipart_builds_the_envelope_byte_for_byte(conn: Conn) -> None:
    part = {
        "name": "file",
        "data_b64": "aGVsbG8=",
        "filename": "a.txt",
        "content_type": "text/plain",
    }
    parts_sql = lit(json.dumps([part]))
    check(
        conn,
        [
            (
                f"df.http_multipart('https://h/upload', 'POST', {parts_sql})",
                j(multipart_node("https://h/upload", [part])),
            ),
            (
                f"df.http_multipart('https://h/upload', 'put', {parts_sql},"
                ' \'{"Authorization": "t"}\', 120)',
                j(multipart_node("https://h/upload", [part], "PUT", {"Authorization": "t"}, 120)),
            ),
            (
                'df.http_multipart(\'https://h\', \'patch\', \'[{"name": "a", "data_b64": ""},'
                ' {"name": "b", "data_b64": "eA=="}]\')',
                j(
                    multipart_node(
                        "https://h",
                        [{"name": "a", "data_b64": ""}, {"name": "b", "data_b64": "eA=="}],
                        "PATCH",
                    )
                ),
            ),
            # Parts are not checked one by one before they are sent.
            (
                "df.http_multipart('https://h', parts => '[1, \"x\", {}]')",
                j(multipart_node("https://h", [1, "x", {}])),
            ),
            (
                "df.http_multipart('{base}/upload', parts => '[{}]')",
                j(multipart_node("{base}/upload", [{}])),
            ),
        ],
    )


def test_http_multipart_errors(conn: Conn) -> None:
    parts = '\'[{"name": "f", "data_b64": "eA=="}]\''
    check(
        conn,
        [
            (f"df.http_multipart('ftp://h', 'POST', {parts})", Error(SCHEME.format("ftp"))),
            (f"df.http_multipart('$u', 'POST', {parts})", Error(SCHEME.format("$u"))),
            (
                f"df.http_multipart('https://h', 'GET', {parts})",
                Error(MULTIPART_METHOD.format("GET")),
            ),
            (
                f"df.http_multipart('https://h', 'delete', {parts})",
                Error(MULTIPART_METHOD.format("DELETE")),
            ),
            ("df.http_multipart('https://h')", Error("parts is required and cannot be NULL")),
            (
                "df.http_multipart('https://h', 'POST', NULL)",
                Error("parts is required and cannot be NULL"),
            ),
            (
                "df.http_multipart('https://h', 'POST', 'null')",
                Error("parts must be a JSON array of part objects"),
            ),
            (
                "df.http_multipart('https://h', 'POST', '{\"name\": \"f\"}')",
                Error("parts must be a JSON array of part objects"),
            ),
            (
                "df.http_multipart('https://h', 'POST', '\"x\"')",
                Error("parts must be a JSON array of part objects"),
            ),
            (
                "df.http_multipart('https://h', 'POST', '[]')",
                Error("parts must contain at least one part"),
            ),
            (
                f"df.http_multipart('https://h', 'POST', {parts}, NULL, 0)",
                Error("Timeout must be positive"),
            ),
            # Checks in order: scheme, method, parts, timeout.
            ("df.http_multipart('ftp://h', 'GET', '[]', NULL, 0)", Error(SCHEME.format("ftp"))),
            (
                "df.http_multipart('https://h', 'GET', '[]', NULL, 0)",
                Error(MULTIPART_METHOD.format("GET")),
            ),
            (
                "df.http_multipart('https://h', 'POST', '[]', NULL, 0)",
                Error("parts must contain at least one part"),
            ),
            ("df.http_multipart(NULL)", Error("df.http_multipart: url cannot be NULL")),
            (
                "df.http_multipart('https://h', NULL, '[]')",
                Error("df.http_multipart: method cannot be NULL"),
            ),
            (
                f"df.http_multipart('https://h', 'POST', {parts}, NULL, NULL)",
                Error("df.http_multipart: timeout_seconds cannot be NULL"),
            ),
        ],
    )


# -- df.retry, df.timeout --------------------------------------------------------------------------


S1 = sql_node("SELECT 1")
S2 = sql_node("SELECT 2")
A, B = sql_node("a"), sql_node("b")


def test_retry_builds_the_envelope_byte_for_byte(conn: Conn) -> None:
    check(
        conn,
        [
            (
                "df.retry('SELECT 1', 3)",
                '{"node_type":"RETRY","left_node":{"node_type":"SQL","query":"SELECT 1"},'
                '"query":"{\\"max_attempts\\":3,\\"backoff_seconds\\":1,'
                '\\"max_backoff_seconds\\":60,\\"retry_on\\":null}"}',
            ),
            ("df.retry('SELECT 1', 1)", j(retry_node(S1, 1))),
            ("df.retry('SELECT 1', 5, 0.5)", j(retry_node(S1, 5, 0.5))),
            ("df.retry('SELECT 1', 5, 0)", j(retry_node(S1, 5, 0))),
            ("df.retry('SELECT 1', 5, 0, 0)", j(retry_node(S1, 5, 0, 0))),
            ("df.retry('SELECT 1', 5, 2, 2)", j(retry_node(S1, 5, 2, 2))),
            ("df.retry('SELECT 1', 5, 2.0, 30.0)", j(retry_node(S1, 5, 2, 30))),
            ("df.retry('SELECT 1', 5, 0.25, 1.5)", j(retry_node(S1, 5, 0.25, 1.5))),
            ("df.retry('SELECT 1', 5, 1e-3, 1e4)", j(retry_node(S1, 5, 0.001, 10000))),
            (
                "df.retry('SELECT 1', 2147483647, 0.1, 86400)",
                j(retry_node(S1, 2147483647, 0.1, 86400)),
            ),
            (
                "df.retry('SELECT 1', 3, retry_on => ARRAY['40001', '40P01', '08', 'http_5xx'])",
                j(retry_node(S1, 3, retry_on=["40001", "40P01", "08", "http_5xx"])),
            ),
            (
                "df.retry('SELECT 1', 3, retry_on => ARRAY['http', 'timeout', 'http_timeout',"
                " 'http_connection'])",
                j(
                    retry_node(
                        S1, 3, retry_on=["http", "timeout", "http_timeout", "http_connection"]
                    )
                ),
            ),
            # retry_on entries are not checked against a list: the worker decides what matches.
            (
                "df.retry('SELECT 1', 3, retry_on => ARRAY['a\"b'])",
                j(retry_node(S1, 3, retry_on=['a"b'])),
            ),
            (
                "df.retry('SELECT 1', 3, 1, 60, NULL)",
                j(retry_node(S1, 3)),
            ),
            (
                "df.retry(step => 'SELECT 1', max_attempts => 4, max_backoff_seconds => 10)",
                j(retry_node(S1, 4, 1, 10)),
            ),
            # The step is auto-wrapped like every node-typed argument: an envelope is embedded,
            # plain text becomes a SQL step, an unknown node_type is SQL text too.
            ("df.retry(df.sleep(5), 2)", j(retry_node({"node_type": "SLEEP", "query": "5"}, 2))),
            (
                "df.retry(df.http('https://h', 'GET'), 4, 0.5, 8, ARRAY['http'])",
                j(retry_node(http_node("https://h", "GET"), 4, 0.5, 8, ["http"])),
            ),
            (
                'df.retry(\'{"node_type":"FOO","query":"x"}\', 2)',
                j(retry_node(sql_node('{"node_type":"FOO","query":"x"}'), 2)),
            ),
            ("df.retry('', 2)", j(retry_node(sql_node(""), 2))),
        ],
    )


def test_retry_errors(conn: Conn) -> None:
    check(
        conn,
        [
            ("df.retry('a', 0)", Error("df.retry: max_attempts must be at least 1")),
            ("df.retry('a', -1)", Error("df.retry: max_attempts must be at least 1")),
            ("df.retry('a', NULL)", Error("df.retry: max_attempts must be at least 1")),
            ("df.retry('a', 3, -0.5)", Error("df.retry: backoff_seconds must be non-negative")),
            ("df.retry('a', 3, NULL)", Error("df.retry: backoff_seconds must be non-negative")),
            (
                "df.retry('a', 3, '-Infinity')",
                Error("df.retry: backoff_seconds must be non-negative"),
            ),
            ("df.retry('a', 3, 'NaN')", Error("df.retry: backoff_seconds must be finite")),
            ("df.retry('a', 3, 'Infinity')", Error("df.retry: backoff_seconds must be finite")),
            (
                "df.retry('a', 3, 10, 5)",
                Error("df.retry: max_backoff_seconds must be at least backoff_seconds"),
            ),
            (
                "df.retry('a', 3, 61)",
                Error("df.retry: max_backoff_seconds must be at least backoff_seconds"),
            ),
            (
                "df.retry('a', 3, 1, NULL)",
                Error("df.retry: max_backoff_seconds must be at least backoff_seconds"),
            ),
            (
                "df.retry('a', 3, 0, -1)",
                Error("df.retry: max_backoff_seconds must be at least backoff_seconds"),
            ),
            ("df.retry('a', 3, 1, 'NaN')", Error("df.retry: max_backoff_seconds must be finite")),
            (
                "df.retry('a', 3, 1, 'Infinity')",
                Error("df.retry: max_backoff_seconds must be finite"),
            ),
            ("df.retry('a', 3, retry_on => ARRAY[]::text[])", Error(RETRY_ON)),
            ("df.retry('a', 3, retry_on => '{}')", Error(RETRY_ON)),
            ("df.retry('a', 3, retry_on => ARRAY['40001', NULL])", Error(RETRY_ON)),
            ("df.retry('a', 3, retry_on => ARRAY[NULL]::text[])", Error(RETRY_ON)),
            ("df.retry('a', 3, retry_on => ARRAY[''])", Error(RETRY_ON)),
            ("df.retry('a', 3, retry_on => '{{40001},{http}}')", Error(RETRY_ON)),
            # Checks in order: max_attempts, backoff, max_backoff, retry_on.
            (
                "df.retry('a', 0, -1, -2, ARRAY[''])",
                Error("df.retry: max_attempts must be at least 1"),
            ),
            (
                "df.retry('a', 1, -1, -2, ARRAY[''])",
                Error("df.retry: backoff_seconds must be non-negative"),
            ),
            (
                "df.retry('a', 1, 1, -2, ARRAY[''])",
                Error("df.retry: max_backoff_seconds must be at least backoff_seconds"),
            ),
            # A NULL step gives NULL, like the strict builders, before any check.
            ("df.retry(NULL, 3)", None),
            ("df.retry(NULL, 0, -1)", None),
            ("df.retry(NULL, 3) ~> 'b'", None),
            # The step goes through the non-future-helper check of auto-wrapping.
            (
                "df.retry(df.setvar('k', 'v'), 3)",
                Error(
                    "df.setvar() cannot be used as a workflow step. Call df.setvar() before "
                    "df.start()."
                ),
            ),
            (
                'df.retry(\'{"node_type":"THEN","left_node":5}\', 3)',
                Error(
                    "Invalid Durofut JSON: failed to deserialize workflow step: "
                    "Durofut children must be JSON objects"
                ),
            ),
        ],
    )


def test_timeout_builds_the_envelope_byte_for_byte(conn: Conn) -> None:
    check(
        conn,
        [
            (
                "df.timeout('SELECT 1', 10)",
                '{"node_type":"TIMEOUT","left_node":{"node_type":"SQL","query":"SELECT 1"},'
                '"query":"{\\"timeout_seconds\\":10}"}',
            ),
            ("df.timeout('SELECT 1', 10.0)", j(timeout_node(S1, 10))),
            ("df.timeout('SELECT 1', 0.5)", j(timeout_node(S1, 0.5))),
            ("df.timeout('SELECT 1', 1e-3)", j(timeout_node(S1, 0.001))),
            ("df.timeout('SELECT 1', 86400)", j(timeout_node(S1, 86400))),
            ("df.timeout('SELECT 1', 2.75)", j(timeout_node(S1, 2.75))),
            (
                "df.timeout(df.wait_for_signal('go'), 30)",
                j(
                    timeout_node(
                        {
                            "node_type": "SIGNAL",
                            "query": j({"signal_name": "go", "timeout_seconds": None}),
                        },
                        30,
                    )
                ),
            ),
            ("df.timeout('SELECT 1', 0)", Error("Timeout must be positive")),
            ("df.timeout('SELECT 1', -1)", Error("Timeout must be positive")),
            ("df.timeout('SELECT 1', '-Infinity')", Error("Timeout must be positive")),
            ("df.timeout('SELECT 1', 'NaN')", Error("df.timeout: seconds must be finite")),
            ("df.timeout('SELECT 1', 'Infinity')", Error("df.timeout: seconds must be finite")),
            # STRICT: NULL in, NULL out.
            ("df.timeout(NULL, 10)", None),
            ("df.timeout('SELECT 1', NULL)", None),
            ("df.timeout(NULL, -1)", None),
            (
                "df.timeout(df.unsetvar('k'), 3)",
                Error(
                    "df.unsetvar() cannot be used as a workflow step. Call df.unsetvar() before "
                    "df.start()."
                ),
            ),
        ],
    )


def test_wrappers_compose_with_every_operator(conn: Conn) -> None:
    r1 = retry_node(S1, 3)
    join_ab = two("JOIN", A, B)
    check(
        conn,
        [
            ("df.retry('SELECT 1', 3) ~> 'SELECT 2'", j(two("THEN", r1, S2))),
            ("'SELECT 2' ~> df.retry('SELECT 1', 3)", j(two("THEN", S2, r1))),
            ("df.timeout('a' & 'b', 5) |=> 'r'", j(timeout_node(join_ab, 5, "r"))),
            ("df.as(df.timeout('a' & 'b', 5), 'r')", j(timeout_node(join_ab, 5, "r"))),
            ("df.retry('SELECT 1', 3) |=> 'x'", j(retry_node(S1, 3, name="x"))),
            # |=> replaces a name and keeps result_name last; the child keeps its own name.
            (
                "df.retry('a' |=> 'inner', 2) |=> 'x' |=> 'y'",
                j(retry_node(sql_node("a", "inner"), 2, name="y")),
            ),
            # Nesting, both ways: a time limit per attempt, or around all attempts.
            (
                "df.retry(df.timeout('a', 5), 3)",
                j(retry_node(timeout_node(A, 5), 3)),
            ),
            (
                "df.timeout(df.retry('a', 3, 0.5, 2), 60)",
                j(timeout_node(retry_node(A, 3, 0.5, 2), 60)),
            ),
            (
                "df.timeout(df.retry(df.timeout('a', 1), 3) |=> 'n', 10)",
                j(timeout_node(retry_node(timeout_node(A, 1), 3, name="n"), 10)),
            ),
            (
                "df.retry('a', 2) & df.timeout('b', 1)",
                j(two("JOIN", retry_node(A, 2), timeout_node(B, 1))),
            ),
            (
                "df.retry('a', 2) | df.sleep(5)",
                j(two("RACE", retry_node(A, 2), {"node_type": "SLEEP", "query": "5"})),
            ),
            (
                "df.retry('c', 2) ?> df.timeout('t', 1) !> 'e'",
                j(
                    {
                        "node_type": "IF",
                        "left_node": timeout_node(sql_node("t"), 1),
                        "right_node": sql_node("e"),
                        "condition_node": retry_node(sql_node("c"), 2),
                    }
                ),
            ),
            (
                "@> df.retry('a', 2)",
                j({"node_type": "LOOP", "left_node": retry_node(A, 2)}),
            ),
            (
                "df.retry(@> ('a' ~> df.break()), 2)",
                j(
                    retry_node(
                        {
                            "node_type": "LOOP",
                            "left_node": two(
                                "THEN", A, {"node_type": "BREAK", "query": '{"break_value":null}'}
                            ),
                        },
                        2,
                    )
                ),
            ),
            (
                "df.join3(df.retry('a', 2), 'b', df.timeout('c', 3))",
                j(
                    {
                        "node_type": "JOIN",
                        "left_node": retry_node(A, 2),
                        "right_node": B,
                        "extra_nodes": [timeout_node(sql_node("c"), 3)],
                    }
                ),
            ),
            # A hand-written RETRY envelope is recognised as a node, its top level
            # re-serialised, its child kept verbatim.
            (
                'df.seq(\'{"query": "{}", "node_type": "RETRY",'
                ' "left_node": {"query" : "a", "node_type": "SQL"}}\', \'b\')',
                '{"node_type":"THEN","left_node":{"node_type":"RETRY","left_node":'
                '{"query" : "a", "node_type": "SQL"},"query":"{}"},"right_node":' + j(B) + "}",
            ),
        ],
    )


def test_builder_attributes(conn: Conn) -> None:
    rows = conn.execute(
        """
        SELECT p.oid::regprocedure::text, p.provolatile, p.proisstrict, l.lanname,
               p.prosecdef, pg_get_function_arguments(p.oid)
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'df'::regnamespace
           AND p.proname IN ('http', 'http_multipart', 'retry', 'timeout')
         ORDER BY 1
        """
    ).fetchall()
    assert rows == [
        (
            "df.http(text,text,text,jsonb,integer)",
            "v",
            False,
            "plpgsql",
            False,
            "url text, method text DEFAULT 'POST'::text, body text DEFAULT NULL::text,"
            " headers jsonb DEFAULT NULL::jsonb, timeout_seconds integer DEFAULT 30",
        ),
        (
            "df.http_multipart(text,text,jsonb,jsonb,integer)",
            "v",
            False,
            "plpgsql",
            False,
            "url text, method text DEFAULT 'POST'::text, parts jsonb DEFAULT NULL::jsonb,"
            " headers jsonb DEFAULT NULL::jsonb, timeout_seconds integer DEFAULT 30",
        ),
        (
            "df.retry(text,integer,double precision,double precision,text[])",
            "v",
            False,
            "plpgsql",
            False,
            "step text, max_attempts integer, backoff_seconds double precision DEFAULT 1,"
            " max_backoff_seconds double precision DEFAULT 60,"
            " retry_on text[] DEFAULT NULL::text[]",
        ),
        (
            "df.timeout(text,double precision)",
            "v",
            True,
            "plpgsql",
            False,
            "step text, seconds double precision",
        ),
    ]


def test_numbers_do_not_depend_on_float_settings(conn: Conn) -> None:
    conn.execute("SET extra_float_digits = -15")
    check(
        conn,
        [
            ("df.timeout('a', 0.1)", j(timeout_node(A, 0.1))),
            ("df.retry('a', 2, 1.25, 90)", j(retry_node(A, 2, 1.25, 90))),
        ],
    )
    conn.execute("SET extra_float_digits = 3")
    check(conn, [("df.timeout('a', 0.1)", j(timeout_node(A, 0.1)))])


# -- df.start --------------------------------------------------------------------------------------


def test_start_stores_wrappers_and_http_nodes(su: Conn) -> None:
    part = {"name": "f", "data_b64": "eA=="}
    instance = str(
        outcome(
            su,
            "df.start(df.timeout(df.retry('SELECT 1' |=> 'one', 3, 0.5, 10, ARRAY['40001']),"
            " 30) |=> 'limited' ~> (df.http('https://h/x', 'get') & df.http_multipart("
            "'https://h/up', 'put', %s)), 'wrapped')",
            [json.dumps([part])],
        )
    )
    retry_config = j(
        {
            "max_attempts": 3,
            "backoff_seconds": 0.5,
            "max_backoff_seconds": 10,
            "retry_on": ["40001"],
        }
    )
    assert stored(su, instance) == {
        "type": "THEN",
        "query": None,
        "left": {
            "type": "TIMEOUT",
            "query": '{"timeout_seconds":30}',
            "name": "limited",
            "left": {
                "type": "RETRY",
                "query": retry_config,
                "left": {"type": "SQL", "query": "SELECT 1", "name": "one"},
            },
        },
        "right": {
            "type": "JOIN",
            "query": None,
            "left": {"type": "HTTP", "query": http_node("https://h/x", "GET")["query"]},
            "right": {
                "type": "HTTP_MULTIPART",
                "query": multipart_node("https://h/up", [part], "PUT")["query"],
            },
        },
    }
    check(
        su,
        [
            (f"(SELECT label FROM df.instances WHERE id = '{instance}')", "wrapped"),
            (
                "(SELECT array_agg(DISTINCT status) FROM df.nodes"
                f" WHERE instance_id = '{instance}')",
                ["pending"],
            ),
        ],
    )


def test_start_stores_wrappers_as_the_root_and_hand_written(su: Conn) -> None:
    # The root itself, and configs written by hand: stored as given, minimal ones included.
    cases = [
        ("df.retry('SELECT 1', 2)", retry_node(S1, 2)["query"]),
        ("df.timeout('SELECT 1', 0.5)", '{"timeout_seconds":0.5}'),
        (
            lit(j({"node_type": "RETRY", "left_node": S1, "query": '{"max_attempts": 1}'})),
            '{"max_attempts": 1}',
        ),
        (
            lit(
                j(
                    {
                        "node_type": "RETRY",
                        "left_node": S1,
                        "query": '{"max_attempts":2,"backoff_seconds":0,'
                        '"max_backoff_seconds":0,"retry_on":["http"],"extra":true}',
                    }
                )
            ),
            '{"max_attempts":2,"backoff_seconds":0,"max_backoff_seconds":0,"retry_on":["http"],'
            '"extra":true}',
        ),
        (
            lit(
                j(
                    {
                        "node_type": "RETRY",
                        "left_node": S1,
                        "query": '{"max_attempts":2,"backoff_seconds":5,"retry_on":null}',
                    }
                )
            ),
            '{"max_attempts":2,"backoff_seconds":5,"retry_on":null}',
        ),
        (
            lit(j({"node_type": "TIMEOUT", "left_node": S1, "query": '{"timeout_seconds":1e-1}'})),
            '{"timeout_seconds":1e-1}',
        ),
    ]
    for expr, query in cases:
        instance = str(outcome(su, f"df.start({expr})"))
        graph = stored(su, instance)
        assert graph["query"] == query, expr
        assert graph["left"] == leaf("SELECT 1"), expr
        assert "right" not in graph, expr


def test_start_rejects_malformed_wrappers(su: Conn) -> None:
    ok_retry = '{"max_attempts":3}'
    prefix = "Invalid durable function graph: "
    cases: list[tuple[dict[str, Any] | str, str]] = []
    for t, config in (("RETRY", ok_retry), ("TIMEOUT", '{"timeout_seconds":5}')):
        cases += [
            ({"node_type": t, "query": config}, f"{prefix}root: {t} nodes require left_node"),
            (
                {"node_type": t, "left_node": None, "right_node": S2, "query": config},
                f"{prefix}root: {t} nodes require left_node",
            ),
            (
                {"node_type": t, "left_node": S1, "right_node": S2, "query": config},
                f"{prefix}root: right_node is not valid for {t} nodes",
            ),
            (
                {"node_type": t, "left_node": S1},
                f"{prefix}root: query is required for {t} nodes",
            ),
            (
                {"node_type": t, "left_node": S1, "query": None},
                f"{prefix}root: query is required for {t} nodes",
            ),
            (
                {"node_type": t, "left_node": S1, "query": "{oops"},
                f"{prefix}root: query in {t} must be valid JSON config: invalid input syntax for"
                " type json",
            ),
            (
                {"node_type": t, "left_node": S1, "query": "[1]"},
                f"{prefix}root: query in {t} must be a JSON config object",
            ),
            (
                {"node_type": t, "left_node": S1, "query": "5"},
                f"{prefix}root: query in {t} must be a JSON config object",
            ),
            (
                {"node_type": t, "left_node": S1, "condition_node": S2, "query": config},
                f"{prefix}root: condition_node is not valid for {t} nodes",
            ),
            (
                {"node_type": t, "left_node": S1, "extra_nodes": [S2], "query": config},
                f"{prefix}root: extra_nodes is not valid for {t} nodes",
            ),
            (
                {"node_type": t, "left_node": 5, "query": config},
                f"Invalid durable function: Malformed Durofut JSON with node_type '{t}': "
                "Durofut children must be JSON objects",
            ),
            # Below the root, with the path; a child's own errors are found too.
            (
                two("THEN", S1, {"node_type": t, "query": config}),
                f"{prefix}root.right: {t} nodes require left_node",
            ),
            (
                {"node_type": t, "left_node": {"node_type": "LOOP"}, "query": config},
                f"{prefix}root.left: LOOP nodes require left_node",
            ),
        ]

    def retry(config: str) -> dict[str, Any]:
        return {"node_type": "RETRY", "left_node": S1, "query": config}

    attempts = f"{prefix}root: query in RETRY: max_attempts must be an integer of at least 1"
    backoff = f"{prefix}root: query in RETRY: backoff_seconds must be a non-negative number"
    cap = (
        f"{prefix}root: query in RETRY: max_backoff_seconds must be a number of at least"
        " backoff_seconds"
    )
    retry_on = (
        f"{prefix}root: query in RETRY: retry_on must be null or a non-empty array of non-empty"
        " strings"
    )
    timeout = f"{prefix}root: query in TIMEOUT: timeout_seconds must be a positive number"
    cases += [
        (retry("{}"), attempts),
        (retry('{"max_attempts":null}'), attempts),
        (retry('{"max_attempts":0}'), attempts),
        (retry('{"max_attempts":-1}'), attempts),
        (retry('{"max_attempts":3.0}'), attempts),
        (retry('{"max_attempts":1e1}'), attempts),
        (retry('{"max_attempts":"3"}'), attempts),
        (retry('{"max_attempts":true}'), attempts),
        (retry('{"max_attempts":3,"max_attempts":0}'), attempts),  # the last one counts
        (retry('{"max_attempts":3,"backoff_seconds":-1}'), backoff),
        (retry('{"max_attempts":3,"backoff_seconds":null}'), backoff),
        (retry('{"max_attempts":3,"backoff_seconds":"1"}'), backoff),
        (retry('{"max_attempts":3,"backoff_seconds":5,"max_backoff_seconds":4}'), cap),
        (retry('{"max_attempts":3,"max_backoff_seconds":-1}'), cap),
        (retry('{"max_attempts":3,"max_backoff_seconds":null}'), cap),
        (retry('{"max_attempts":3,"retry_on":[]}'), retry_on),
        (retry('{"max_attempts":3,"retry_on":[""]}'), retry_on),
        (retry('{"max_attempts":3,"retry_on":["40001",1]}'), retry_on),
        (retry('{"max_attempts":3,"retry_on":[null]}'), retry_on),
        (retry('{"max_attempts":3,"retry_on":"40001"}'), retry_on),
        (retry('{"max_attempts":3,"retry_on":{}}'), retry_on),
        ({"node_type": "TIMEOUT", "left_node": S1, "query": "{}"}, timeout),
        ({"node_type": "TIMEOUT", "left_node": S1, "query": '{"timeout_seconds":0}'}, timeout),
        ({"node_type": "TIMEOUT", "left_node": S1, "query": '{"timeout_seconds":-2}'}, timeout),
        ({"node_type": "TIMEOUT", "left_node": S1, "query": '{"timeout_seconds":"5"}'}, timeout),
        ({"node_type": "TIMEOUT", "left_node": S1, "query": '{"timeout_seconds":null}'}, timeout),
        (
            two("JOIN", S1, {"node_type": "TIMEOUT", "left_node": S2, "query": '{"x":1}'}),
            timeout.replace("root:", "root.right:"),
        ),
        # The node type is case-sensitive: 'retry' is not a node type at all.
        (
            {"node_type": "retry", "left_node": S1, "query": ok_retry},
            f"Invalid durable function: Unknown node_type 'retry'. Valid types: {TYPES}",
        ),
        (
            two("THEN", S1, {"node_type": "Timeout", "left_node": S2, "query": "{}"}),
            f"{prefix}root.right: Unknown node_type 'Timeout'. Valid types: {TYPES}",
        ),
    ]
    check_start_errors(su, cases)


def test_unknown_node_type_lists_the_new_types_last(su: Conn) -> None:
    check(
        su,
        [
            (
                'df.start(\'{"node_type":"FOO","query":"x"}\')',
                Error(f"Invalid durable function: Unknown node_type 'FOO'. Valid types: {TYPES}"),
            ),
            (
                "df.start(" + lit(j(two("THEN", S1, {"node_type": "NOPE"}))) + ")",
                Error(
                    "Invalid durable function graph: root.right: Unknown node_type 'NOPE'. "
                    f"Valid types: {TYPES}"
                ),
            ),
            ("array_to_string(df._node_types(), ', ')", TYPES),
        ],
    )
    assert count_rows(su) == (0, 0)


def test_table_constraints_admit_wrappers_with_one_child_and_a_config(su: Conn) -> None:
    """Rows written by hand (the worker and df.start aside) keep the structure too."""
    instance = str(outcome(su, "df.start(df.retry('SELECT 1', 2))"))
    child = su.execute(
        "SELECT left_node FROM df.nodes n JOIN df.instances i ON n.id = i.root_node"
        " WHERE i.id = %s",
        (instance,),
    ).fetchone()
    assert child is not None

    violations = []
    for node_type, left, right, query, ok in [
        ("RETRY", child[0], None, '{"max_attempts":1}', True),
        ("TIMEOUT", child[0], None, '{"timeout_seconds":1}', True),
        ("RETRY", None, None, '{"max_attempts":1}', False),
        ("RETRY", child[0], child[0], '{"max_attempts":1}', False),
        ("TIMEOUT", child[0], None, None, False),
        ("TIMEOUT", None, None, '{"timeout_seconds":1}', False),
        ("FOO", None, None, "x", False),
    ]:
        node_id = uuid.uuid4().hex[:8]
        try:
            with su.transaction():
                su.execute(
                    "INSERT INTO df.nodes (id, instance_id, node_type, query, left_node,"
                    " right_node, submitted_by) VALUES (%s, %s, %s, %s, %s, %s, 'postgres')",
                    (node_id, instance, node_type, query, left, right),
                )
            accepted = True
        except psycopg.errors.CheckViolation as e:
            accepted = False
            assert e.diag.constraint_name in ("nodes_structure_chk", "nodes_type_chk")
        if accepted != ok:
            violations.append((node_type, left, right, query, accepted))
    assert not violations


# -- privileges ----------------------------------------------------------------------------------


def can_execute(conn: Conn, role: str) -> list[bool]:
    return [
        bool(outcome(conn, "has_function_privilege(%s, %s, 'EXECUTE')", [role, sig]))
        for sig in (HTTP_SIG, MULTIPART_SIG)
    ]


HTTP_CALLS = [
    "df.http('https://h', 'GET')",
    'df.http_multipart(\'https://h\', \'POST\', \'[{"name":"f","data_b64":"eA=="}]\')',
]


def test_public_cannot_execute_http_builders(su: Conn) -> None:
    check(
        su,
        [
            # proacl NULL would mean the default: EXECUTE for PUBLIC.
            (
                "(SELECT count(*) FROM pg_proc p WHERE p.oid IN"
                f" ('{HTTP_SIG}'::regprocedure, '{MULTIPART_SIG}'::regprocedure)"
                " AND p.proacl IS NOT NULL AND NOT EXISTS (SELECT 1 FROM aclexplode(p.proacl) a"
                " WHERE a.grantee = 0))",
                2,
            ),
            # The other builders stay public (USAGE on schema df is their gate).
            (
                "(SELECT count(*) FROM pg_proc p WHERE p.oid IN ('df.retry(text,integer,double"
                " precision,double precision,text[])'::regprocedure,"
                " 'df.timeout(text,double precision)'::regprocedure) AND p.proacl IS NULL)",
                2,
            ),
            ("df._private_functions('http')", [HTTP_SIG, MULTIPART_SIG]),
        ],
    )


def test_http_builders_need_include_http(su: Conn, make_role: Any) -> None:
    role, role_conn = make_role()
    denied = [
        Error("permission denied for function http"),
        Error("permission denied for function http_multipart"),
    ]

    su.execute("SELECT df.grant_usage(%s)", (role,))
    assert can_execute(su, role) == [False, False]
    assert [outcome(role_conn, call) for call in HTTP_CALLS] == denied
    # Everything else is usable, df.retry and df.timeout included.
    assert outcome(role_conn, "df.status(df.start(df.timeout(df.retry('SELECT 1', 2), 5)))") == (
        "pending"
    )

    su.execute("SELECT df.grant_usage(%s, true)", (role,))
    assert can_execute(su, role) == [True, True]
    assert [outcome(role_conn, call) for call in HTTP_CALLS] == [
        j(http_node("https://h", "GET")),
        j(multipart_node("https://h", [{"name": "f", "data_b64": "eA=="}])),
    ]
    instance = str(outcome(role_conn, f"df.start(df.retry({HTTP_CALLS[0]}, 3) ~> {HTTP_CALLS[1]})"))
    assert stored(role_conn, instance)["left"]["left"]["type"] == "HTTP"

    su.execute("SELECT df.revoke_usage(%s)", (role,))
    assert can_execute(su, role) == [False, False]
    # Usage without HTTP again: HTTP stays out of reach.
    su.execute("SELECT df.grant_usage(%s, false)", (role,))
    assert can_execute(su, role) == [False, False]
    assert [outcome(role_conn, call) for call in HTTP_CALLS] == denied


def test_http_privilege_passes_on_with_grant_option(su: Conn, make_role: Any) -> None:
    (admin, admin_conn), (user, _) = make_role(), make_role()
    su.execute("SELECT df.grant_usage(%s, true, true)", (admin,))
    admin_conn.execute("SELECT df.grant_usage(%s, true)", (user,))
    assert can_execute(su, user) == [True, True]
    admin_conn.execute("SELECT df.revoke_usage(%s)", (user,))
    assert can_execute(su, user) == [False, False]
    # Revoking the admin's usage takes what it passed on along (CASCADE).
    admin_conn.execute("SELECT df.grant_usage(%s, true)", (user,))
    su.execute("SELECT df.revoke_usage(%s)", (admin,))
    assert can_execute(su, admin) == [False, False]
    assert can_execute(su, user) == [False, False]


def test_node_shape_is_checked_for_every_inserted_row_and_every_change_of_it(su: Conn) -> None:
    """The shape checks run once per statement, over all the rows it inserted, and again when
    an UPDATE names a shape column; the engine's status writes do not."""
    instance = str(outcome(su, "df.start('SELECT 1')"))
    good, bad = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    with pytest.raises(psycopg.errors.CheckViolation) as caught, su.transaction():
        su.execute(
            "INSERT INTO df.nodes (id, instance_id, node_type, query, result_name, submitted_by)"
            " VALUES (%s, %s, 'SQL', 'SELECT 1', NULL, 'postgres'),"
            "        (%s, %s, 'SQL', 'SELECT 1', '1st', 'postgres')",
            (good, instance, bad, instance),
        )
    assert caught.value.diag.constraint_name == "nodes_result_name_chk"
    assert caught.value.diag.table_name == "nodes"
    assert f"Failing node: {bad}." == caught.value.diag.message_detail
    root = su.execute("SELECT root_node FROM df.instances WHERE id = %s", (instance,)).fetchone()
    assert root is not None
    for column, value, constraint in [
        ("node_type", "THEN", "nodes_structure_chk"),
        ("left_node", "XYZ", "nodes_children_hex8_chk"),
        ("query", None, "nodes_structure_chk"),
    ]:
        with pytest.raises(psycopg.errors.CheckViolation) as caught, su.transaction():
            su.execute(
                f"UPDATE df.nodes SET {column} = %s WHERE instance_id = %s AND id = %s",
                (value, instance, root[0]),
            )
        assert caught.value.diag.constraint_name == constraint
    su.execute(
        "UPDATE df.nodes SET status = 'running' WHERE instance_id = %s AND id = %s",
        (instance, root[0]),
    )
