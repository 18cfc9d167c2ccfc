"""df.start(): validation, flattening into df.nodes, limits and atomicity
(docs/reference.md#dfstart).

No worker runs here: instances stay pending, which is all these tests need.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlcheck import Conn, Error, outcome

from pgdurable.embedded import EmbeddedPostgres

TYPES = (
    "SQL, THEN, IF, JOIN, LOOP, BREAK, RACE, SLEEP, WAIT_SCHEDULE, HTTP, HTTP_MULTIPART, SIGNAL, "
    "RETRY, TIMEOUT, CALL, MAP"
)
HEX8 = re.compile(r"^[0-9a-f]{8}$")


# -- helpers ------------------------------------------------------------------------------------


def check_start_errors(conn: Conn, cases: Sequence[tuple[str, str]]) -> None:
    """df.start(<graph JSON>) must fail with exactly the given message, writing nothing."""
    failures = []
    for graph, message in cases:
        got = outcome(conn, "df.start(%s)", [graph])
        if got != Error(message):
            failures.append(f"df.start({graph})\n    expected: {message}\n    got:      {got!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases differ:\n" + "\n".join(failures)
    assert count_rows(conn) == (0, 0)


def j(node: dict[str, Any]) -> str:
    """Compact JSON, as the DSL prints it."""
    return json.dumps(node, ensure_ascii=False, separators=(",", ":"))


def sql(query: Any, **extra: Any) -> dict[str, Any]:
    return {"node_type": "SQL", "query": query, **extra}


def node(node_type: str, **fields: Any) -> dict[str, Any]:
    return {"node_type": node_type, **fields}


def start(conn: Conn, expr: str, *params: object) -> str:
    """SELECT df.start(<expr>) and return the id."""
    row = conn.execute(f"SELECT df.start({expr})", params).fetchone()
    assert row is not None
    return str(row[0])


def count_rows(conn: Conn) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM df.instances), (SELECT count(*) FROM df.nodes)"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@dataclass
class Stored:
    """One df.nodes row, found by its path from the root."""

    id: str
    node_type: str
    query: str | None
    result_name: str | None
    left_node: str | None
    right_node: str | None


def stored_graph(conn: Conn, instance: str) -> dict[str, Stored]:
    """The stored nodes of an instance keyed by path (root, root.left, root.condition_node,
    root.extra_nodes[0], ...), following the child links each node type stores (left_node,
    right_node, and the ids in an IF's, LOOP's or JOIN's query config)."""
    rows = conn.execute(
        "SELECT id, node_type, query, result_name, left_node, right_node FROM df.nodes"
        " WHERE instance_id = %s",
        (instance,),
    ).fetchall()
    by_id = {r[0]: Stored(*r) for r in rows}
    root_row = conn.execute(
        "SELECT root_node FROM df.instances WHERE id = %s", (instance,)
    ).fetchone()
    assert root_row is not None
    paths: dict[str, Stored] = {}
    todo = [("root", root_row[0])]
    while todo:
        path, node_id = todo.pop()
        n = by_id.pop(node_id)
        paths[path] = n
        config = json.loads(n.query) if n.node_type in ("IF", "LOOP", "JOIN") and n.query else {}
        if n.left_node:
            todo.append((path + ".left", n.left_node))
        if n.right_node:
            todo.append((path + ".right", n.right_node))
        if "condition_node" in config:
            todo.append((path + ".condition_node", config["condition_node"]))
        for i, extra in enumerate(config.get("extra_nodes", [])):
            todo.append((f"{path}.extra_nodes[{i}]", extra))
    assert not by_id, f"nodes not reachable from the root: {by_id}"
    return paths


def rebuilt_envelope(conn: Conn, instance: str) -> dict[str, Any]:
    """The envelope the stored rows describe (inverse of the flattening)."""
    graph = stored_graph(conn, instance)

    def build(path: str) -> dict[str, Any]:
        n = graph[path]
        out: dict[str, Any] = {"node_type": n.node_type}
        if n.left_node:
            out["left_node"] = build(path + ".left")
        if n.right_node:
            out["right_node"] = build(path + ".right")
        query = n.query
        if n.node_type in ("IF", "LOOP", "JOIN") and query:
            config = json.loads(query)
            if config.pop("condition_node", None):
                out["condition_node"] = build(path + ".condition_node")
            extras = config.pop("extra_nodes", [])
            if extras:
                out["extra_nodes"] = [build(f"{path}.extra_nodes[{i}]") for i in range(len(extras))]
            query = j(config) if config else None
        if query is not None:
            out["query"] = query
        if n.result_name is not None:
            out["result_name"] = n.result_name
        return out

    return build("root")


def balanced(n: int) -> dict[str, Any]:
    """A THEN tree with exactly n nodes (n odd)."""
    if n == 1:
        return sql("SELECT 1")
    left = (n - 1) // 2
    if left % 2 == 0:
        left -= 1
    return node("THEN", left_node=balanced(left), right_node=balanced(n - 1 - left))


def nested_loops(depth: int) -> dict[str, Any]:
    """LOOP(LOOP(... SQL)): the SQL node sits at the given depth."""
    tree = sql("SELECT 1")
    for _ in range(depth):
        tree = node("LOOP", left_node=tree)
    return tree


@pytest.fixture
def su(conn: Conn) -> Conn:
    """The superuser connection, allowed to start instances."""
    conn.execute("SET pg_durable.enable_superuser_instances = on")
    return conn


@pytest.fixture
def make_role(cluster: EmbeddedPostgres, conn: Conn) -> Iterator[Any]:
    """Create cluster-wide roles with unique names; drop them (and their grants) afterwards."""
    made: list[str] = []

    def create(options: str = "LOGIN", grant: bool = True) -> str:
        name = f"pgd_start_{uuid.uuid4().hex[:10]}"
        conn.execute(f'CREATE ROLE "{name}" {options}')
        made.append(name)
        if grant:
            conn.execute("SELECT df.grant_usage(%s)", (name,))
        return name

    yield create
    conn.execute("RESET ROLE")
    for name in made:
        conn.execute(f'DROP OWNED BY "{name}"')
        conn.execute(f'DROP ROLE "{name}"')


# -- what df.start writes -------------------------------------------------------------------------


def test_start_writes_instance_and_nodes(su: Conn) -> None:
    instance = start(su, "%s, %s", "SELECT 1", "nightly")
    assert HEX8.match(instance)
    row = su.execute(
        "SELECT label, status, submitted_by::text, database, root_node, completed_at,"
        " created_at IS NOT NULL, updated_at IS NOT NULL FROM df.instances WHERE id = %s",
        (instance,),
    ).fetchone()
    assert row is not None
    assert row[:4] == ("nightly", "pending", "postgres", None)
    assert row[5:] == (None, True, True)
    nodes = su.execute(
        "SELECT id, node_type, query, result_name, left_node, right_node, status, result,"
        " submitted_by::text, database FROM df.nodes WHERE instance_id = %s",
        (instance,),
    ).fetchall()
    assert nodes == [
        (row[4], "SQL", "SELECT 1", None, None, None, "pending", None, "postgres", None)
    ]


def test_storage_of_every_node_type(su: Conn) -> None:
    """How each node type keeps its config and children in df.nodes, as pg_durable stores them
    (docs/reference.md#node-types)."""
    instance = start(
        su,
        """
        df.if('SELECT c', 'SELECT 1' |=> 'a', df.join3('x', 'y', df.sleep(5)))
        ~> df.loop('b', 'SELECT false') ~> @> df.break('done') ~> df.if_rows('r', 't', 'e')
        ~> (('p' | 'q') |=> 'won') ~> ('j' & 'k') ~> df.break()
        """,
    )
    g = stored_graph(su, instance)

    def child_id(path: str) -> str:
        return g[path].id

    # The chain is left associative: root.right is the last step, root.left.right the one
    # before it, and so on down to the first step at root.left.left.left.left.left.left.
    step = ["root" + ".left" * k + ".right" for k in range(6)][::-1]
    first = "root" + ".left" * 6
    expected: dict[str, tuple[str, str | None, str | None]] = {
        "root" + ".left" * k: ("THEN", None, None) for k in range(6)
    }
    expected |= {
        first: ("IF", j({"condition_node": child_id(f"{first}.condition_node")}), None),
        f"{first}.condition_node": ("SQL", "SELECT c", None),
        f"{first}.left": ("SQL", "SELECT 1", "a"),
        f"{first}.right": (
            "JOIN",
            j({"extra_nodes": [child_id(f"{first}.right.extra_nodes[0]")]}),
            None,
        ),
        f"{first}.right.left": ("SQL", "x", None),
        f"{first}.right.right": ("SQL", "y", None),
        f"{first}.right.extra_nodes[0]": ("SLEEP", "5", None),
        step[0]: ("LOOP", j({"condition_node": child_id(f"{step[0]}.condition_node")}), None),
        f"{step[0]}.left": ("SQL", "b", None),
        f"{step[0]}.condition_node": ("SQL", "SELECT false", None),
        step[1]: ("LOOP", None, None),
        f"{step[1]}.left": ("BREAK", '{"break_value":"done"}', None),
        step[2]: ("IF", '{"condition_type":"result_has_rows","result_name":"r"}', None),
        f"{step[2]}.left": ("SQL", "t", None),
        f"{step[2]}.right": ("SQL", "e", None),
        step[3]: ("RACE", None, "won"),
        f"{step[3]}.left": ("SQL", "p", None),
        f"{step[3]}.right": ("SQL", "q", None),
        step[4]: ("JOIN", None, None),
        f"{step[4]}.left": ("SQL", "j", None),
        f"{step[4]}.right": ("SQL", "k", None),
        step[5]: ("BREAK", '{"break_value":null}', None),
    }
    got = {path: (n.node_type, n.query, n.result_name) for path, n in g.items()}
    assert got == expected
    all_ids = [n.id for n in g.values()]
    assert all(HEX8.match(i) for i in all_ids)
    assert len(set(all_ids)) == len(all_ids)


def test_nodes_are_inserted_in_pre_order(su: Conn) -> None:
    instance = start(su, "df.if('c', 't' ~> 'u', 'e') ~> df.join3('a', 'b', 'x')")
    g = stored_graph(su, instance)
    path_of = {n.id: p for p, n in g.items()}
    # Heap order of a fresh table is insertion order.
    order = [
        path_of[r[0]]
        for r in su.execute(
            "SELECT id FROM df.nodes WHERE instance_id = %s ORDER BY ctid", (instance,)
        ).fetchall()
    ]
    assert order == [
        "root",
        "root.left",
        "root.left.left",
        "root.left.left.left",
        "root.left.left.right",
        "root.left.right",
        "root.left.condition_node",
        "root.right",
        "root.right.left",
        "root.right.right",
        "root.right.extra_nodes[0]",
    ]


GRAPHS = [
    "'SELECT 1'",
    "'SELECT 1' |=> 'one'",
    "df.sleep(0) ~> df.break() ~> df.break('x')",
    "df.join3('a' |=> 'a', 'b' ~> 'c', @> ('d' ~> df.break('{\"k\": 1}')))",
    "df.if('c', 't', 'e') | df.if_rows('r', 't', 'e' |=> 'e')",
    "df.loop('b', 'c') & @> 'x'",
    "('c' ?> 't' !> 'e') |=> 'chosen'",
]


@pytest.mark.parametrize("expr", GRAPHS)
def test_stored_graph_round_trips_to_the_envelope(su: Conn, expr: str) -> None:
    envelope = su.execute(f"SELECT ({expr})::text").fetchone()[0]  # type: ignore[index]
    instance = start(su, expr)
    expected = json.loads(envelope) if envelope.startswith("{") else sql(envelope)
    assert rebuilt_envelope(su, instance) == expected


def test_lenient_forms_accepted(su: Conn) -> None:
    """Plain text and JSON without node_type are one SQL step; unknown keys, JSON nulls,
    empty extra_nodes and surrounding whitespace are ignored; a JOIN may have several
    extra branches."""
    cases = [
        ("SELECT 1", sql("SELECT 1")),
        ('{"a": 1}', sql('{"a": 1}')),
        ("{not json", sql("{not json")),
        ("[1]", sql("[1]")),
        ("", sql("")),
        ('{"node_type": 7}', sql('{"node_type": 7}')),
        (
            '\n {"node_type":"SQL","query":"x","left_node":null,"extra_nodes":[],"x":{"y":1}} ',
            sql("x"),
        ),
        (
            j(
                node(
                    "JOIN",
                    left_node=sql("a"),
                    right_node=sql("b"),
                    extra_nodes=[sql("c"), sql("d")],
                )
            ),
            node("JOIN", left_node=sql("a"), right_node=sql("b"), extra_nodes=[sql("c"), sql("d")]),
        ),
        (
            j(
                node(
                    "IF",
                    left_node=sql("t"),
                    right_node=sql("e"),
                    condition_node=sql("c"),
                    query='{"note": "kept"}',
                )
            ),
            node(
                "IF",
                left_node=sql("t"),
                right_node=sql("e"),
                condition_node=sql("c"),
                query='{"note":"kept"}',
            ),
        ),
        # THEN and RACE store no query.
        (
            j(node("THEN", left_node=sql("a"), right_node=sql("b"), query="ignored")),
            node("THEN", left_node=sql("a"), right_node=sql("b")),
        ),
    ]
    for text, expected in cases:
        instance = start(su, "%s", text)
        assert rebuilt_envelope(su, instance) == expected, text


def test_multiple_extra_branches_are_stored_in_order(su: Conn) -> None:
    graph = node(
        "JOIN", left_node=sql("a"), right_node=sql("b"), extra_nodes=[sql("c"), sql("d"), sql("e")]
    )
    instance = start(su, "%s", j(graph))
    g = stored_graph(su, instance)
    extras = [g[f"root.extra_nodes[{i}]"] for i in range(3)]
    assert [n.query for n in extras] == ["c", "d", "e"]
    assert g["root"].query == j({"extra_nodes": [n.id for n in extras]})


# -- validation -----------------------------------------------------------------------------------


def test_strict_parse_errors(su: Conn) -> None:
    check_start_errors(
        su,
        [
            (
                j(node("FOO")),
                f"Invalid durable function: Unknown node_type 'FOO'. Valid types: {TYPES}",
            ),
            (
                j(node("sql", query="x")),
                f"Invalid durable function: Unknown node_type 'sql'. Valid types: {TYPES}",
            ),
            (
                '{"node_type":"THEN","left_node":5,"right_node":{}}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'THEN': "
                "Durofut children must be JSON objects",
            ),
            (
                '{"node_type":"IF","condition_node":[]}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'IF': "
                "condition_node must be a Durofut JSON object",
            ),
            (
                '{"node_type":"JOIN","extra_nodes":"x"}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'JOIN': "
                "extra_nodes must be an array of Durofut JSON objects",
            ),
            (
                '{"node_type":"JOIN","extra_nodes":[true]}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'JOIN': "
                "extra_nodes entries must be Durofut JSON objects",
            ),
            (
                '{"node_type":"SQL","query":1}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'SQL': "
                "invalid type: query must be a string",
            ),
            (
                '{"node_type":"SQL","query":"x","result_name":false}',
                "Invalid durable function: Malformed Durofut JSON with node_type 'SQL': "
                "invalid type: result_name must be a string",
            ),
        ],
    )


def graph_error(path: str, message: str) -> str:
    return f"Invalid durable function graph: {path}: {message}"


def test_graph_errors_with_paths(su: Conn) -> None:
    a, b = sql("a"), sql("b")
    cases = [
        (
            node("THEN", left_node=a, right_node=node("FOO")),
            "root.right",
            f"Unknown node_type 'FOO'. Valid types: {TYPES}",
        ),
        (
            node("THEN", left_node={"query": "x"}, right_node=b),
            "root.left",
            "missing field node_type",
        ),
        (
            node("THEN", left_node={"node_type": None}, right_node=b),
            "root.left",
            "missing field node_type",
        ),
        (
            node("THEN", left_node={"node_type": 1}, right_node=b),
            "root.left",
            "invalid type: node_type must be a string",
        ),
        (
            node("THEN", left_node=node("THEN", left_node=5, right_node=b), right_node=b),
            "root.left",
            "Durofut children must be JSON objects",
        ),
        (
            node(
                "THEN",
                left_node=a,
                right_node=node("IF", left_node=a, right_node=b, condition_node="SELECT 1"),
            ),
            "root.right",
            "condition_node must be a Durofut JSON object",
        ),
        (
            node(
                "RACE",
                left_node=a,
                right_node=node("JOIN", left_node=a, right_node=b, extra_nodes=[a, 1]),
            ),
            "root.right",
            "extra_nodes entries must be Durofut JSON objects",
        ),
        (
            node(
                "RACE",
                left_node=node("JOIN", left_node=a, right_node=b, extra_nodes={}),
                right_node=b,
            ),
            "root.left",
            "extra_nodes must be an array of Durofut JSON objects",
        ),
        (
            node("THEN", left_node=sql(["x"]), right_node=b),
            "root.left",
            "invalid type: query must be a string",
        ),
        (
            node("THEN", left_node=sql("x", result_name=1), right_node=b),
            "root.left",
            "invalid type: result_name must be a string",
        ),
        (
            node(
                "THEN",
                left_node=a,
                right_node=node(
                    "IF",
                    left_node=a,
                    right_node=b,
                    condition_node=node(
                        "JOIN", left_node=a, right_node=b, extra_nodes=[a, node("NOPE")]
                    ),
                ),
            ),
            "root.right.condition_node.extra_nodes[1]",
            f"Unknown node_type 'NOPE'. Valid types: {TYPES}",
        ),
        # condition_node only on IF/LOOP, extra_nodes only on JOIN.
        (sql("x", condition_node=a), "root", "condition_node is not valid for SQL nodes"),
        (
            node("THEN", left_node=a, right_node=b, condition_node=a),
            "root",
            "condition_node is not valid for THEN nodes",
        ),
        (
            node("JOIN", left_node=a, right_node=b, condition_node=a),
            "root",
            "condition_node is not valid for JOIN nodes",
        ),
        (
            node("RACE", left_node=a, right_node=b, extra_nodes=[a]),
            "root",
            "extra_nodes is not valid for RACE nodes",
        ),
        (
            node("LOOP", left_node=a, extra_nodes=[a]),
            "root",
            "extra_nodes is not valid for LOOP nodes",
        ),
        (
            node(
                "THEN",
                left_node=a,
                right_node=node("IF", left_node=a, right_node=b, condition_node=a, extra_nodes=[a]),
            ),
            "root.right",
            "extra_nodes is not valid for IF nodes",
        ),
        # The pre-0.2.6 forms with child references inside query.
        (
            node("IF", left_node=a, right_node=b, query='{"condition_node":"abcdef01"}'),
            "root",
            "condition_node in IF must be a first-class Durofut field, not embedded in query",
        ),
        (
            node("LOOP", left_node=a, condition_node=b, query='{"condition_node":null}'),
            "root",
            "condition_node in LOOP must be a first-class Durofut field, not embedded in query",
        ),
        (
            node("JOIN", left_node=a, right_node=b, query='{"extra_nodes":["abcdef01"]}'),
            "root",
            "extra_nodes in JOIN must be a first-class Durofut field, not embedded in query",
        ),
        # Merging child ids into an existing config needs a JSON object.
        (
            node("JOIN", left_node=a, right_node=b, extra_nodes=[a], query="x"),
            "root",
            "query in JOIN must be valid JSON config: invalid input syntax for type json",
        ),
        (
            node("IF", left_node=a, right_node=b, condition_node=a, query="{oops"),
            "root",
            "query in IF must be valid JSON config: invalid input syntax for type json",
        ),
        (
            node("LOOP", left_node=a, condition_node=b, query="[1]"),
            "root",
            "query in LOOP must be a JSON config object",
        ),
        # Shapes the df.nodes constraints require, reported before they would be violated.
        (
            node("THEN", left_node=a, right_node=node("SQL")),
            "root.right",
            "query is required for SQL nodes",
        ),
        (node("SLEEP", query="5", left_node=a), "root", "left_node is not valid for SLEEP nodes"),
        (
            node("BREAK", query="{}", right_node=a),
            "root",
            "right_node is not valid for BREAK nodes",
        ),
        (node("THEN", left_node=a), "root", "THEN nodes require left_node and right_node"),
        (node("RACE", right_node=a), "root", "RACE nodes require left_node and right_node"),
        (
            node("JOIN", left_node=a, extra_nodes=[b]),
            "root",
            "JOIN nodes require left_node and right_node",
        ),
        (node("LOOP", condition_node=a), "root", "LOOP nodes require left_node"),
        (node("LOOP", left_node=a, right_node=b), "root", "right_node is not valid for LOOP nodes"),
        (
            node("IF", left_node=a, right_node=b),
            "root",
            "IF nodes require a condition_node (df.if) or a condition query (df.if_rows)",
        ),
        (
            node("THEN", left_node=a, right_node=sql("b", result_name="1x")),
            "root.right",
            "result_name '1x' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*",
        ),
        (
            sql("b", result_name=""),
            "root",
            "result_name '' is not a valid identifier — must match [a-zA-Z_][a-zA-Z0-9_]*",
        ),
    ]
    check_start_errors(su, [(j(g), graph_error(path, msg)) for g, path, msg in cases])


def test_first_error_in_pre_order_wins(su: Conn) -> None:
    both = node(
        "THEN",
        left_node=node("THEN", left_node=sql("a"), right_node=node("BAD1")),
        right_node=node("BAD2"),
    )
    check_start_errors(
        su,
        [
            (
                j(both),
                graph_error("root.left.right", f"Unknown node_type 'BAD1'. Valid types: {TYPES}"),
            )
        ],
    )


def test_depth_limit(su: Conn) -> None:
    instance = start(su, "%s", j(nested_loops(256)))
    assert len(stored_graph(su, instance)) == 257
    assert outcome(su, "df.start(%s)", [j(nested_loops(257))]) == Error(
        graph_error(
            "root" + ".left" * 257,
            "Graph exceeds maximum nesting depth of 256. Simplify the workflow or break it "
            "into multiple instances.",
        )
    )
    assert count_rows(su) == (1, 257)


def test_node_count_limit_and_speed(su: Conn) -> None:
    exactly = j(node("LOOP", left_node=balanced(9999)))
    began = time.monotonic()
    with su.transaction():
        instance = start(su, "%s", exactly)
    elapsed = time.monotonic() - began
    assert count_rows(su) == (1, 10000)
    ids = su.execute(
        "SELECT count(DISTINCT id), bool_and(id ~ '^[0-9a-f]{8}$') FROM df.nodes"
        " WHERE instance_id = %s",
        (instance,),
    ).fetchone()
    assert ids == (10000, True)
    # Start and commit (with its deferred foreign-key checks) of the largest graph: about
    # 0.4 s on an idle laptop. The bound is loose for busy CI machines; anything quadratic
    # in the node count would still blow it by far.
    assert elapsed < 5.0, f"10,000-node df.start took {elapsed:.2f}s"
    too_many = Error(
        "Invalid durable function graph: root: Workflow exceeds maximum node count of 10000. "
        "Simplify the workflow or break it into multiple instances."
    )
    assert outcome(su, "df.start(%s)", [j(balanced(10001))]) == too_many
    # A huge graph is rejected without walking all of it.
    began = time.monotonic()
    assert outcome(su, "df.start(%s)", [j(balanced(60001))]) == too_many
    assert time.monotonic() - began < 5.0
    assert count_rows(su) == (1, 10000)


def test_transaction_mode(su: Conn) -> None:
    # 'new' (tests/test_new_transaction.py) starts on a loopback session, which does not see
    # this session's SET pg_durable.enable_superuser_instances: superusers are refused there.
    new_refused = (
        "df.start() on new transaction failed: pg_durable: superuser instances are disabled. "
        'current_user "postgres" is a superuser, but pg_durable.enable_superuser_instances is '
        "off. Set pg_durable.enable_superuser_instances = on to allow this."
    )
    cases: list[tuple[str, object]] = [
        ("df.start('SELECT 1', transaction_mode => 'new')", Error(new_refused)),
        ("df.start('SELECT 1', transaction_mode => 'NEW')", Error(new_refused)),
        (
            "df.start('SELECT 1', transaction_mode => 'bogus')",
            Error("invalid transaction_mode \"bogus\" for df.start(): expected 'caller' or 'new'"),
        ),
        (
            "df.start('SELECT 1', transaction_mode => ' caller')",
            Error(
                "invalid transaction_mode \" caller\" for df.start(): expected 'caller' or 'new'"
            ),
        ),
        # The mode is checked before the graph.
        (
            "df.start('{\"node_type\":\"X\"}', transaction_mode => 'x')",
            Error("invalid transaction_mode \"x\" for df.start(): expected 'caller' or 'new'"),
        ),
        ("df.start(NULL)", Error("df.start(): fut cannot be NULL")),
    ]
    for sql_text, expected in cases:
        assert outcome(su, sql_text) == expected, sql_text
    for mode in ("caller", "CALLER", "Caller"):
        assert HEX8.match(str(outcome(su, "df.start('SELECT 1', transaction_mode => %s)", [mode])))
    assert HEX8.match(str(outcome(su, "df.start('SELECT 1', NULL, NULL, NULL)")))


def test_database_check(su: Conn, dbname: str) -> None:
    assert outcome(su, "df.start('SELECT 1', database => 'no_such_db')") == Error(
        'database "no_such_db" does not exist'
    )
    assert outcome(su, "df.start('SELECT 1', database => 'No \"Such\" db')") == Error(
        'database "No "Such" db" does not exist'
    )
    # The strict parse comes first, the graph walk after the database check.
    assert outcome(su, "df.start('{\"node_type\":\"X\"}', database => 'nope')") == Error(
        f"Invalid durable function: Unknown node_type 'X'. Valid types: {TYPES}"
    )
    nested_bad = j(node("THEN", left_node=sql("a"), right_node=node("X")))
    assert outcome(su, "df.start(%s, database => 'nope')", [nested_bad]) == Error(
        'database "nope" does not exist'
    )
    assert count_rows(su) == (0, 0)
    instance = start(su, "'SELECT 1', database => %s", dbname)
    assert su.execute(
        "SELECT i.database, n.database FROM df.instances i JOIN df.nodes n ON n.instance_id = i.id"
        " WHERE i.id = %s",
        (instance,),
    ).fetchall() == [(dbname, dbname)]


def test_odd_database_names(cluster: EmbeddedPostgres, su: Conn) -> None:
    odd = "odd 'db\" ñ 😀"
    quoted = '"' + odd.replace('"', '""') + '"'
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {quoted}")
    try:
        instance = start(su, "'SELECT 1', database => %s", odd)
        assert su.execute(
            "SELECT database FROM df.instances WHERE id = %s", (instance,)
        ).fetchone() == (odd,)
    finally:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {quoted} WITH (FORCE)")


SUPERUSER_REFUSED = (
    'pg_durable: superuser instances are disabled. current_user "postgres" is a superuser, '
    "but pg_durable.enable_superuser_instances is off. Set "
    "pg_durable.enable_superuser_instances = on to allow this."
)


def test_superuser_guard(conn: Conn) -> None:
    assert outcome(conn, "df.start('SELECT 1')") == Error(SUPERUSER_REFUSED)
    for value in ("off", "false", "0", "no", "", "maybe"):
        conn.execute(
            "SELECT set_config('pg_durable.enable_superuser_instances', %s, false)", (value,)
        )
        assert outcome(conn, "df.start('SELECT 1')") == Error(SUPERUSER_REFUSED), value
    for value in ("on", "ON", "true", "1", "yes"):
        conn.execute(
            "SELECT set_config('pg_durable.enable_superuser_instances', %s, false)", (value,)
        )
        assert HEX8.match(str(outcome(conn, "df.start('SELECT 1')"))), value
    # The strict parse precedes the guard; the graph walk follows it.
    conn.execute("RESET pg_durable.enable_superuser_instances")
    assert outcome(conn, 'df.start(\'{"node_type":"X"}\')') == Error(
        f"Invalid durable function: Unknown node_type 'X'. Valid types: {TYPES}"
    )
    nested_bad = j(node("THEN", left_node=sql("a"), right_node=node("X")))
    assert outcome(conn, "df.start(%s)", [nested_bad]) == Error(SUPERUSER_REFUSED)


def test_login_required(su: Conn, make_role: Any) -> None:
    group = make_role("NOLOGIN")
    su.execute(f'SET ROLE "{group}"')
    assert outcome(su, "df.start('SELECT 1')") == Error(
        f'current_user "{group}" does not have LOGIN privilege. The background worker must '
        "connect as this role to execute SQL. Grant LOGIN to this role or call df.start() as a "
        "role with LOGIN."
    )
    su.execute("RESET ROLE")
    assert count_rows(su) == (0, 0)


# -- atomicity ------------------------------------------------------------------------------------


def test_rollback_leaves_no_trace(su: Conn) -> None:
    engine_tables = ["df.instances", "df.nodes", "df._runs", "df._tasks"]

    def counts() -> list[int]:
        return [su.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in engine_tables]  # type: ignore[index]

    su.execute("BEGIN")
    start(su, "'a' ~> 'b' & 'c'")
    assert counts()[:2] == [1, 5]
    su.execute("ROLLBACK")
    assert counts() == [0, 0, 0, 0]
    # A failed start inside a transaction aborts it; nothing survives either.
    su.execute("BEGIN")
    start(su, "'SELECT 1'")
    with pytest.raises(psycopg.Error):
        start(su, "%s", j(node("THEN", left_node=sql("a"), right_node=node("X"))))
    su.execute("ROLLBACK")
    assert counts() == [0, 0, 0, 0]
    with su.transaction():
        start(su, "'a' ~> 'b'")
    assert counts()[:2] == [1, 3]


def test_instance_id_collisions_are_retried_then_reported(su: Conn) -> None:
    su.execute(
        "CREATE OR REPLACE FUNCTION df._random_id() RETURNS text LANGUAGE sql"
        " AS $$ SELECT 'abcdef01' $$"
    )
    assert start(su, "'SELECT 1'") == "abcdef01"
    assert outcome(su, "df.start('SELECT 2')") == Error(
        "Failed to create instance: exhausted 10 attempts to generate a collision-free ID"
    )
    assert count_rows(su) == (1, 1)


def test_node_id_collisions_write_nothing(su: Conn) -> None:
    su.execute(
        "CREATE OR REPLACE FUNCTION df._random_node_id() RETURNS text LANGUAGE sql"
        " AS $$ SELECT '0000000a' $$"
    )
    instance = start(su, "'SELECT 1'")
    assert stored_graph(su, instance)["root"].id == "0000000a"
    assert outcome(su, "df.start('a' ~> 'b')") == Error(
        "Failed to create instance: exhausted 10 attempts to generate collision-free node IDs"
    )
    assert count_rows(su) == (1, 1)


# -- text fidelity --------------------------------------------------------------------------------

NASTY = [
    "SELECT 'it''s'",
    'SELECT "quoted col" FROM t',
    "SELECT E'back\\\\slash'",
    "SELECT 1\n-- comment\n;",
    "SELECT '\t tab'",
    "SELECT 'emoji 😀, ñ, 中文, \u2028'",
    "SELECT $x.col, {var}, $$dollar$$",
]


def test_sql_text_and_labels_are_stored_exactly(su: Conn) -> None:
    for text in NASTY:
        label = "label: " + text
        instance = start(su, "%s ~> df.sql(%s) |=> 'n', %s", text, text, label)
        g = stored_graph(su, instance)
        assert (g["root.left"].query, g["root.right"].query) == (text, text)
        assert su.execute(
            "SELECT label FROM df.instances WHERE id = %s", (instance,)
        ).fetchone() == (label,)
