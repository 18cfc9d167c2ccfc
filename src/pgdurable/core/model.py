"""The workflow graph as the interpreter sees it: nodes loaded from ``df.nodes`` rows.

``df.start`` has already validated the shape of graphs it wrote, but rows can also be inserted
by hand, so loading checks again (missing children, cycles, bad configs) and raises
``GraphError`` with a message the instance can fail with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

LEAF_TYPES = frozenset(
    {"SQL", "SLEEP", "WAIT_SCHEDULE", "BREAK", "HTTP", "HTTP_MULTIPART", "SIGNAL", "CALL"}
)
# The node types, in df._node_types()'s order (tests/test_install.py checks they agree).
NODE_TYPES = (
    "SQL",
    "THEN",
    "IF",
    "JOIN",
    "LOOP",
    "BREAK",
    "RACE",
    "SLEEP",
    "WAIT_SCHEDULE",
    "HTTP",
    "HTTP_MULTIPART",
    "SIGNAL",
    # pgdurable's own wrappers: a step's retry policy and its time limit.
    "RETRY",
    "TIMEOUT",
    # A Python step, called by name (docs/python.md).
    "CALL",
    # A body run for each row of a named result (df.map).
    "MAP",
)
MAX_NODES = 10_000
"""The most nodes a graph may have (df.start's limit)."""
MAX_DEPTH = 256
"""The deepest a node may sit below the root (df.start's limit)."""
TOO_MANY_NODES = (
    f"Workflow exceeds maximum node count of {MAX_NODES}. Simplify the workflow or break it"
    " into multiple instances."
)
TOO_DEEP = (
    f"Graph exceeds maximum nesting depth of {MAX_DEPTH}. Simplify the workflow or break it"
    " into multiple instances."
)

# Node types whose query is a JSON config object.
CONFIG_TYPES = frozenset(
    {
        "IF",
        "LOOP",
        "JOIN",
        "BREAK",
        "WAIT_SCHEDULE",
        "SIGNAL",
        "HTTP",
        "HTTP_MULTIPART",
        "RETRY",
        "TIMEOUT",
        "CALL",
        "MAP",
    }
)
# Node types whose result is never bound to their |=> name (docs/reference.md#named-results).
UNNAMED_RESULT_TYPES = frozenset({"SLEEP", "WAIT_SCHEDULE", "BREAK"})


class GraphError(ValueError):
    """The stored graph cannot be executed."""


@dataclass(frozen=True)
class Node:
    """One node of a workflow graph."""

    id: str
    type: str
    query: str | None = None
    result_name: str | None = None
    left: str | None = None
    right: str | None = None
    condition: str | None = None  # IF (df.if) and while-LOOP condition child
    extras: tuple[str, ...] = ()  # JOIN branches beyond left and right (join3)
    config: Mapping[str, Any] = field(default_factory=dict)  # parsed JSON query, if any

    @property
    def children(self) -> tuple[str, ...]:
        """Child ids in the order execution and explain visit them."""
        kids = [c for c in (self.condition, self.left, self.right) if c]
        return (*kids, *self.extras)

    @property
    def branches(self) -> tuple[str, ...]:
        """JOIN/RACE branch roots in branch order."""
        assert self.left and self.right
        return (self.left, self.right, *self.extras)


@dataclass(frozen=True)
class Graph:
    """An instance's immutable graph."""

    instance_id: str
    root: str
    nodes: Mapping[str, Node]
    label: str | None = None

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes[node_id]


def node_from_row(row: Mapping[str, Any]) -> Node:
    """Build a Node from a ``df.nodes`` row (a mapping with the table's column names)."""
    node_type = row["node_type"]
    query = row.get("query")
    config = _config_of(node_type, query, f"node {row['id']}")
    condition = config.get("condition_node") if node_type in ("IF", "LOOP") else None
    extras = (config.get("extra_nodes") or []) if node_type == "JOIN" else []
    # Rows may have been written by hand: child ids must be ids.
    if not (condition is None or isinstance(condition, str)):
        raise GraphError(f"node {row['id']}: condition_node in {node_type} is not a node id")
    if not (isinstance(extras, list) and all(isinstance(e, str) for e in extras)):
        raise GraphError(f"node {row['id']}: extra_nodes in {node_type} is not a list of node ids")
    return Node(
        id=row["id"],
        type=node_type,
        query=query,
        result_name=row.get("result_name"),
        left=row.get("left_node"),
        right=row.get("right_node"),
        condition=condition,
        extras=tuple(extras),
        config=config,
    )


def _config_of(node_type: str, query: str | None, where: str) -> dict[str, Any]:
    """The JSON config a node of ``node_type`` keeps in ``query`` ({} for other types);
    ``where`` names the node in the error."""
    if node_type not in CONFIG_TYPES or query is None:
        return {}
    try:
        parsed = json.loads(query)
    except ValueError as exc:
        raise GraphError(f"{where}: query in {node_type} is not JSON") from exc
    if not isinstance(parsed, dict):
        raise GraphError(f"{where}: query in {node_type} is not a JSON object")
    return parsed


def graph_from_rows(
    instance_id: str, root: str, rows: Iterable[Mapping[str, Any]], label: str | None = None
) -> Graph:
    """Assemble and check a Graph from an instance's ``df.nodes`` rows."""
    nodes = {n.id: n for n in map(node_from_row, rows)}
    graph = Graph(instance_id=instance_id, root=root, nodes=nodes, label=label)
    _check(graph)
    return graph


def _check(graph: Graph) -> None:
    # Rows written by hand skip df.start's checks, so its limits are applied again here: the
    # interpreter recurses along the tree and must never meet a deeper one.
    if graph.root not in graph.nodes:
        raise GraphError(f"root node {graph.root} not found")
    if len(graph.nodes) > MAX_NODES:
        raise GraphError(TOO_MANY_NODES)
    seen: set[str] = set()
    stack = [(graph.root, 0)]
    while stack:
        node_id, depth = stack.pop()
        if node_id in seen:
            raise GraphError(f"node {node_id} is reachable twice (graphs must be trees)")
        if depth > MAX_DEPTH:
            raise GraphError(TOO_DEEP)
        seen.add(node_id)
        node = graph.nodes.get(node_id)
        if node is None:
            raise GraphError(f"node {node_id} not found")
        _check_node(node)
        stack.extend((child, depth + 1) for child in node.children)


def _check_node(node: Node) -> None:
    t = node.type
    if t not in NODE_TYPES:
        raise GraphError(f"Unknown node_type '{t}'. Valid types: {', '.join(NODE_TYPES)}")
    needs_two = t in ("THEN", "IF", "JOIN", "RACE")
    if needs_two and not (node.left and node.right):
        raise GraphError(f"{t} node {node.id} needs left and right children")
    if t in ("LOOP", "RETRY", "TIMEOUT", "MAP") and not node.left:
        raise GraphError(f"{t} node {node.id} needs a body")
    if t == "IF" and not node.condition and node.config.get("condition_type") is None:
        raise GraphError(f"IF node {node.id} has no condition")
    if t == "SLEEP":
        try:
            if int(node.query or "") < 0:
                raise ValueError
        except ValueError as exc:
            raise GraphError(f"SLEEP node {node.id}: invalid duration {node.query!r}") from exc
    if t == "SIGNAL":
        timeout = node.config.get("timeout_seconds")
        if not isinstance(node.config.get("signal_name"), str) or not (
            timeout is None or _positive(timeout)
        ):
            raise GraphError(f"SIGNAL node {node.id}: invalid config {node.query!r}")
    if t == "WAIT_SCHEDULE" and not isinstance(node.config.get("cron_expr"), str):
        raise GraphError(f"WAIT_SCHEDULE node {node.id}: invalid config {node.query!r}")
    if t in ("HTTP", "HTTP_MULTIPART") and not (
        isinstance(node.config.get("url"), str) and isinstance(node.config.get("method"), str)
    ):
        raise GraphError(f"{t} node {node.id}: invalid config {node.query!r}")
    if t == "RETRY" and not _valid_retry(node.config):
        raise GraphError(f"RETRY node {node.id}: invalid config {node.query!r}")
    if t == "TIMEOUT" and not _positive(node.config.get("timeout_seconds")):
        raise GraphError(f"TIMEOUT node {node.id}: invalid config {node.query!r}")
    if t == "CALL" and not (
        is_step_name(node.config.get("name")) and isinstance(node.config.get("args", {}), dict)
    ):
        raise GraphError(f"CALL node {node.id}: invalid config {node.query!r}")
    if t == "MAP" and not _valid_map(node.config):
        raise GraphError(f"MAP node {node.id}: invalid config {node.query!r}")
    if t in LEAF_TYPES and node.query is None:
        raise GraphError(f"{t} node {node.id} has no query")


_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
MAX_STEP_NAME = 200
"""The longest a Python step's name may be."""


def is_step_name(name: Any) -> bool:
    """Whether ``name`` can name a Python step: identifiers joined by dots ('billing.charge'),
    as df.call and df._call_error (dsl.sql) accept them."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_STEP_NAME
        and _STEP_NAME.fullmatch(name) is not None
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


MAX_MAP_PARALLEL = 1000
"""The most items of a df.map that may run at once."""
_RESULT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _valid_map(config: Mapping[str, Any]) -> bool:
    source, item = config.get("source"), config.get("item", "item")
    parallel = config.get("max_parallel", 10)
    return (
        isinstance(source, str)
        and _RESULT_NAME.fullmatch(source) is not None
        and isinstance(item, str)
        and _RESULT_NAME.fullmatch(item) is not None
        and isinstance(parallel, int)
        and not isinstance(parallel, bool)
        and 1 <= parallel <= MAX_MAP_PARALLEL
        and isinstance(config.get("collect_errors", False), bool)
    )


def _valid_retry(config: Mapping[str, Any]) -> bool:
    attempts = config.get("max_attempts")
    backoff = config.get("backoff_seconds", 1)  # the defaults of df.retry
    cap = config.get("max_backoff_seconds", 60)
    retry_on = config.get("retry_on")
    return (
        isinstance(attempts, int)
        and not isinstance(attempts, bool)
        and attempts >= 1
        and _number(backoff)
        and _number(cap)
        and backoff >= 0
        and cap >= 0
        and (
            retry_on is None
            or (isinstance(retry_on, list) and all(isinstance(c, str) for c in retry_on))
        )
    )


# -- graphs a step returns --------------------------------------------------------------------

CONTINUE_WITH = "df.continue_with"
"""The key of a step result that is the rest of the workflow, as df.continue_with (SQL) makes
it: ``{"df.continue_with": <the graph's JSON text>, "signature": <hex>}``."""

_ENVELOPE_KEYS = ("left_node", "right_node", "condition_node", "extra_nodes")


def continuation_signature(key: str, role: str, graph_text: str) -> str:
    """What df._continuation_signature (calls.sql) computes: a keyed SHA-256 of the role and
    the graph's text, with the database's secret key."""
    return hashlib.sha256(f"{key}:{role}:{graph_text}:{key}".encode()).hexdigest()


def signed_continuation(result: str, role: str, key: str) -> Mapping[str, Any] | None:
    """The graph a SQL step's result continues the workflow with, or None if it is a plain
    result: its one row's one column is what df.continue_with returned for ``role`` (signed
    with the database's ``key``). Data that only looks like it, read from a table or an API,
    is a plain result: without the key, nobody can sign a graph."""
    if not key or CONTINUE_WITH not in result:  # the cheap test first: most results are plain
        return None
    try:
        value = json.loads(result)
    except ValueError:
        return None
    rows = value.get("rows") if isinstance(value, dict) else None
    if not (isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], dict)):
        return None
    if len(rows[0]) != 1:
        return None
    marker = next(iter(rows[0].values()))
    if not (isinstance(marker, dict) and set(marker) == {CONTINUE_WITH, "signature"}):
        return None
    text, signature = marker[CONTINUE_WITH], marker["signature"]
    if not (isinstance(text, str) and isinstance(signature, str)):
        return None
    if not hmac.compare_digest(signature, continuation_signature(key, role, text)):
        return None
    try:
        graph = json.loads(text)
    except ValueError:
        return None
    return graph if isinstance(graph, dict) else None


def expand(envelope: Mapping[str, Any], graph: Graph, at: str, seed: str) -> tuple[str, list[Node]]:
    """The nodes of ``envelope`` (a graph as the DSL builders write it), to run in place of
    node ``at`` of ``graph``: checked as df.start checks a graph, and within its limits
    counting the nodes ``graph`` has already. Ids are drawn from ``seed``, none of them taken
    in ``graph``. Returns the new root's id and the nodes, parents before children. Raises
    GraphError."""
    depth = _depth_of(graph, at)
    taken = set(graph.nodes)
    made: list[Node] = []

    def new_id(path: str) -> str:
        counter = 0
        while True:
            digest = hashlib.sha256(f"{seed}:{path}:{counter}".encode()).hexdigest()[:8]
            if digest not in taken:
                taken.add(digest)
                return digest
            counter += 1

    def visit(doc: Any, path: str, level: int) -> str:
        if len(graph.nodes) + len(made) >= MAX_NODES:
            raise GraphError(TOO_MANY_NODES)
        if level > MAX_DEPTH:
            raise GraphError(TOO_DEEP)
        if not isinstance(doc, dict):
            raise GraphError(f"{path}: a node must be a JSON object")
        node_type = doc.get("node_type")
        if not isinstance(node_type, str) or node_type not in NODE_TYPES:
            raise GraphError(f"{path}: Unknown node_type '{node_type}'")
        query, name = doc.get("query"), doc.get("result_name")
        if not (query is None or isinstance(query, str)):
            raise GraphError(f"{path}: query must be a string")
        if not (name is None or (isinstance(name, str) and _RESULT_NAME.fullmatch(name))):
            raise GraphError(f"{path}: result_name must match [a-zA-Z_][a-zA-Z0-9_]*")
        present = {k for k in _ENVELOPE_KEYS if doc.get(k) not in (None, [])}
        allowed = _CHILD_KEYS.get(node_type, set())
        if present - allowed:
            raise GraphError(
                f"{path}: {sorted(present - allowed)[0]} is not valid for {node_type} nodes"
            )
        node_id = new_id(path)
        index = len(made)
        made.append(Node(node_id, node_type))  # a placeholder: parents before children
        left = (
            visit(doc["left_node"], f"{path}.left", level + 1) if "left_node" in present else None
        )
        right = (
            visit(doc["right_node"], f"{path}.right", level + 1)
            if "right_node" in present
            else None
        )
        config = _config_of(node_type, query, path)
        if "condition_node" in present:
            config["condition_node"] = visit(doc["condition_node"], f"{path}.condition", level + 1)
        if "extra_nodes" in present:
            extras = doc["extra_nodes"]
            if not isinstance(extras, list):
                raise GraphError(f"{path}: extra_nodes must be an array")
            config["extra_nodes"] = [
                visit(e, f"{path}.extra[{i}]", level + 1) for i, e in enumerate(extras)
            ]
        if node_type in ("THEN", "RACE"):
            query = None
        elif config and ("condition_node" in present or "extra_nodes" in present):
            query = json.dumps(config, separators=(",", ":"), ensure_ascii=False)
        node = node_from_row(
            {
                "id": node_id,
                "node_type": node_type,
                "query": query,
                "result_name": name,
                "left_node": left,
                "right_node": right,
            }
        )
        try:
            _check_node(node)
        except GraphError as exc:
            raise GraphError(f"{path}: {exc}") from None
        made[index] = node
        return node_id

    root = visit(envelope, "root", depth + 1)
    return root, made


# The children each node type may have in a graph's JSON text.
_CHILD_KEYS: Mapping[str, set[str]] = {
    "THEN": {"left_node", "right_node"},
    "RACE": {"left_node", "right_node"},
    "JOIN": {"left_node", "right_node", "extra_nodes"},
    "IF": {"left_node", "right_node", "condition_node"},
    "LOOP": {"left_node", "condition_node"},
    "RETRY": {"left_node"},
    "TIMEOUT": {"left_node"},
    "MAP": {"left_node"},
}


def _depth_of(graph: Graph, node_id: str) -> int:
    """How deep ``node_id`` sits below the graph's root."""
    stack = [(graph.root, 0)]
    while stack:
        current, depth = stack.pop()
        if current == node_id:
            return depth
        node = graph.nodes.get(current)
        if node is not None:
            stack.extend((child, depth + 1) for child in node.children)
    return 0
