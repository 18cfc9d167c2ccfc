"""Terminal and JSON renderings of instances and their nodes. Pure: rows in, output out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from ..core.model import GraphError, Node, node_from_row

Row = Mapping[str, Any]

# Status -> (marker, style); markers as in df.explain (docs/monitoring.md#dfexplain).
MARKERS = {
    "completed": ("✓", "green"),
    "failed": ("✗", "red"),
    "cancelled": ("✗", "magenta"),
    "running": ("⏳", "yellow"),
    "pending": ("○", "dim"),
    "skipped": ("⊘", "dim"),
}
RESULT_WIDTH = 120
ERROR_WIDTH = 400


def to_json(value: Any) -> str:
    """JSON for scripts: timestamps in ISO 8601, JSON columns parsed."""
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def node_record(row: Row) -> dict[str, Any]:
    """A node row as JSON-ready data, its result parsed when it is JSON."""
    record = dict(row)
    record["result"] = _parsed(row.get("result"))
    return record


def _parsed(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def instances_table(rows: Iterable[Row]) -> Table:
    """``pgdurable ls``: one line per instance."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "STATUS", "LABEL", "RUNS", "CREATED", "COMPLETED", "OUTPUT"):
        table.add_column(column, overflow="fold" if column == "OUTPUT" else "ellipsis")
    for row in rows:
        # Text, not str: labels and outputs are the user's, never rich markup.
        table.add_row(
            Text(row["instance_id"]),
            _status_text(row["status"]),
            Text(row["label"] or ""),
            Text(str(row["execution_count"] or "")),
            Text(_timestamp(row["created_at"])),
            Text(_timestamp(row["completed_at"])),
            Text(_cut(row["output"] or "", 60)),
        )
    return table


def instance_view(instance: Row, nodes: list[Row], now: datetime) -> RenderableType:
    """``pgdurable show``: a header, then the graph as a tree with each node's status,
    duration, and result or error."""
    label = f" ({instance['label']})" if instance["label"] else ""
    header = Text.assemble(
        ("Instance ", "bold"),
        (f"{instance['instance_id']}{label}  ", "bold"),
        _status_text(instance["status"]),
    )
    end = instance.get("finished_at") or instance["completed_at"]
    timing = f"started {_timestamp(instance['created_at'])}"
    if instance["status"] in ("pending", "running"):
        timing += f", running for {format_duration(instance['created_at'], now)}"
    elif end is not None:
        timing += f", took {format_duration(instance['created_at'], end)}"
    if instance.get("execution") and instance["execution"] > 1:
        timing += f", execution {instance['execution']}"
    parts: list[RenderableType] = [header, Text(timing, style="dim")]
    if instance.get("output"):
        parts.append(Text(f"output: {_cut(instance['output'], RESULT_WIDTH)}"))
    tree = node_tree(instance["root_node"], nodes, now)
    if tree is not None:
        parts.append(tree)
    return Group(*parts)


def node_tree(root: str, rows: list[Row], now: datetime) -> Tree | None:
    """The graph under ``root`` as a rich Tree (None if the root row is missing)."""
    by_id = {row["node_id"]: row for row in rows}
    nodes: dict[str, Node] = {}
    for row in rows:
        try:  # rows may have been written by hand: show what is there, never fail
            nodes[row["node_id"]] = node_from_row(
                {
                    "id": row["node_id"],
                    "node_type": row["node_type"],
                    "query": row["query"],
                    "result_name": row["result_name"],
                    "left_node": row["left_node"],
                    "right_node": row["right_node"],
                }
            )
        except GraphError:
            nodes[row["node_id"]] = Node(
                row["node_id"],
                row["node_type"],
                query=row["query"],
                left=row["left_node"],
                right=row["right_node"],
            )
    if root not in nodes:
        return None
    tree = Tree("", hide_root=True, guide_style="dim")
    _add_sequence(tree, nodes[root], _Graph(nodes, by_id, now))
    return tree


class _Graph:
    """What the tree is drawn from, and the nodes drawn so far: a graph written by hand may
    loop back or share a child, and each node is drawn once."""

    def __init__(self, nodes: Mapping[str, Node], rows: Mapping[str, Row], now: datetime):
        self.nodes, self.rows, self.now = nodes, rows, now
        self.drawn: set[str] = set()

    def child(self, node_id: str | None) -> Node | None:
        if node_id is None or node_id not in self.nodes or node_id in self.drawn:
            return None
        self.drawn.add(node_id)
        return self.nodes[node_id]


def _add_sequence(parent: Tree, node: Node, graph: _Graph) -> None:
    # A THEN chain reads as the steps in order, as in df.explain.
    graph.drawn.add(node.id)
    stack = [node]
    while stack:
        current = stack.pop()
        if current.type == "THEN":
            right, left = graph.child(current.right), graph.child(current.left)
            stack += [n for n in (right, left) if n is not None]
        else:
            _add_node(parent, current, graph)


def _add_node(parent: Tree, node: Node, graph: _Graph) -> None:
    rows, now = graph.rows, graph.now
    row = rows[node.id]
    branch = parent.add(_node_label(node, row, now))
    status = row["inferred_status"] or row["status"]
    if status == "failed" and node.type not in _COMPOUND:
        branch.add(Text(_cut(result_text(row["result"]), ERROR_WIDTH), style="red"))
    elif status == "completed" and node.type not in _COMPOUND and row["result"] is not None:
        branch.add(Text("= " + _cut(result_text(row["result"]), RESULT_WIDTH), style="dim"))
    for line in (row.get("error") or "").splitlines():  # a df.retry's failed attempts
        branch.add(Text(_cut(line, ERROR_WIDTH), style="dim red"))
    for title, child_id in _groups(node):
        child = graph.child(child_id)
        if child is not None:
            group = branch.add(Text(title, style="dim"))
            _add_sequence(group, child, graph)


_COMPOUND = frozenset({"IF", "LOOP", "JOIN", "RACE", "RETRY", "TIMEOUT", "THEN", "MAP"})


def _groups(node: Node) -> list[tuple[str, str]]:
    """A compound node's children, each under the heading df.explain gives it."""
    t = node.type
    if t == "IF":
        arms = [("then:", node.left), ("else:", node.right)]
        return [(title, c) for title, c in [("condition:", node.condition), *arms] if c]
    if t == "LOOP":
        return [(title, c) for title, c in [("body:", node.left), ("while:", node.condition)] if c]
    if t in ("JOIN", "RACE") and node.left and node.right:
        return [(f"branch {i}:", b) for i, b in enumerate(node.branches, start=1)]
    if t == "RETRY" and node.left:
        return [("attempt:", node.left)]
    if t == "TIMEOUT" and node.left:
        return [("within:", node.left)]
    if t == "MAP" and node.left:
        return [("each item:", node.left)]
    if t in ("SQL", "CALL") and node.left:  # the graph the step returned (df.continue_with)
        return [("continued with:", node.left)]
    return []


def _node_label(node: Node, row: Row, now: datetime) -> Text:
    status = row["inferred_status"] or row["status"]
    marker, style = MARKERS.get(status, ("?", ""))
    text = Text.assemble((f"{marker} ", style), describe(node))
    if node.result_name:
        text.append(f" |=> '{node.result_name}'", style="cyan")
    started = row.get("started_at")
    if started is not None and status in ("running", "completed", "failed"):
        end = now if status == "running" else row["updated_at"]
        text.append(f"  {format_duration(started, end)}", style="dim")
    if row.get("has_worker") is False:  # a Python step no live worker has
        text.append(f"  {NO_WORKER}", style="yellow")
    return text


NO_WORKER = "waiting for a worker that has this step"


def describe(node: Node) -> str:
    """A node in one line: its type and what it does."""
    c = node.config
    t = node.type
    if t == "SQL":
        return "SQL: " + _cut(" ".join((node.query or "").split()), 70)
    if t == "SLEEP":
        return f"sleep {node.query}s"
    if t == "WAIT_SCHEDULE":
        return f"wait for schedule '{c.get('cron_expr')}'"
    if t == "SIGNAL":
        timeout = c.get("timeout_seconds")
        return f"wait for signal '{c.get('signal_name')}'" + (
            f" ({timeout}s)" if timeout is not None else ""
        )
    if t in ("HTTP", "HTTP_MULTIPART"):
        return f"HTTP {c.get('method')} {_cut(str(c.get('url')), 60)}"
    if t == "CALL":
        return f"call {c.get('name')}"
    if t == "MAP":
        return f"map over '{c.get('source')}' (max {c.get('max_parallel', 10)} at once)"
    if t == "BREAK":
        value = c.get("break_value")
        return "break" + (f" '{_cut(str(value), 30)}'" if value is not None else "")
    if t == "LOOP":
        return "loop (while)" if node.condition else "loop"
    if t == "JOIN":
        return f"join ({2 + len(node.extras)})"
    if t == "RETRY":
        return f"retry (max {c.get('max_attempts')} attempts)"
    if t == "TIMEOUT":
        return f"timeout {c.get('timeout_seconds')}s"
    return t.lower()


def format_duration(start: datetime, end: datetime) -> str:
    """``412 ms``, ``3.1 s``, ``2m 05s``, ``1h 02m``."""
    seconds = max((end - start).total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _status_text(status: str) -> Text:
    marker, style = MARKERS.get(status, ("?", ""))
    return Text(f"{marker} {status}", style=style)


def _timestamp(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def result_text(result: Any) -> str:
    """A result or output for people: JSON re-spaced, text as it is."""
    parsed = _parsed(result)
    return parsed if isinstance(parsed, str) else json.dumps(parsed, ensure_ascii=False)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
