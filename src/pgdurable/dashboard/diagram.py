"""An instance's graph drawn as an SVG diagram. Pure: node rows in, SVG text out.

The input is what ``df.instance_nodes(id)`` returns, joined with ``df.nodes`` for the retry
history and timings (:class:`NodeView`), with the instance's root node and its current
generation. :func:`layout` places every node (typed data, testable without SVG);
:func:`to_svg` writes the placed diagram; :func:`draw` does both.

Workflow graphs are series-parallel, so the layout is recursive: a sequence (a chain of THEN
nodes) stacks its steps top to bottom; JOIN and RACE put their branches side by side between
a fork and a merge bar; an IF draws its condition, a decision, then its arms side by side;
LOOP, RETRY, TIMEOUT and MAP draw a frame around their body, and a SQL or Python step that
continued with a generated graph (df.continue_with) a "continued with" frame below it. Every
block is entered at the middle of its top edge and left at the middle of its bottom edge, so
the edges between blocks are straight lines. Labels use df.explain's words (explain.sql).

Rows may be written by hand (users may INSERT into df.nodes), so nothing here trusts them:
missing children, unknown types, cycles, shared children and unreadable configs are drawn as
well as they can be, each node at most once, and every text from the graph is escaped.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import quote

from ..core.model import CONFIG_TYPES
from ..monitor.render import MARKERS, format_duration

MAX_DRAWN = 2_000
"""The most nodes one diagram draws; the rest is summed up in a note."""
MAX_NESTING = 256
"""The deepest nesting drawn (df.start's limit: a valid graph is always drawn whole).
Hand-written rows may nest deeper, and the layout recurses about twice per level."""

# Sizes in px. Widths are even so that centring a block in another never rounds: every block
# is entered and left at its exact middle, and edges stay straight.
MARGIN = 16
STEP_W, STEP_H = 280, 40
SMALL_H = 26  # placeholders: a missing node, a node drawn elsewhere, the rest not drawn
PILL_W, PILL_H = 168, 26  # an IF's decision, a JOIN's or RACE's fork
BAR_H = 4  # fork and merge bars
V_GAP = 28  # between blocks of a sequence, and above and below branches
H_GAP = 24  # between branches
PAD = 16  # inside frames
HEADER_H = 24  # a frame's label
LOOP_GAP = 14  # room above a loop's body for the edge back to its start
NOTE_H = 20
FONT = 12  # labels, monospace: one character is 0.6 em wide in the usual monospace fonts
SMALL_FONT = 10
FRAME_FONT = 11
TITLE_MAX = 2_000  # characters of a tooltip taken from one text of the graph
MAX_ERROR_LINES = 50  # of a retry's history in its tooltip


# -- the input ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """One node as the dashboard reads it: a row of ``df.instance_nodes(id)`` joined with
    ``df.nodes`` (``error``, ``started_at``)."""

    node_id: str
    node_type: str
    query: str | None = None
    result_name: str | None = None
    left_node: str | None = None
    right_node: str | None = None
    status: str = "pending"
    inferred_status: str | None = None
    status_details: str | None = None  # {"execution_id": "<scope>::<generation>"}, as text
    error: str | None = None  # a df.retry's failed attempts, one line each
    started_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def shown_status(self) -> str:
        """The status a reader should see: the inferred one when there is one."""
        return self.inferred_status or self.status

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NodeView:
        """A view of a row with df.instance_nodes' column names (``id`` for ``node_id`` is
        accepted too, as df.nodes names it); ``status_details`` may be text or parsed JSON."""
        details = row.get("status_details")
        if details is not None and not isinstance(details, str):
            details = _json_text(details)
        return cls(
            node_id=str(row["node_id"] if "node_id" in row else row["id"]),
            node_type=str(row.get("node_type")),
            query=_opt_str(row.get("query")),
            result_name=_opt_str(row.get("result_name")),
            left_node=_opt_str(row.get("left_node")),
            right_node=_opt_str(row.get("right_node")),
            status=str(row.get("status") or "pending"),
            inferred_status=_opt_str(row.get("inferred_status")),
            status_details=details,
            error=_opt_str(row.get("error")),
            started_at=row.get("started_at"),
            updated_at=row.get("updated_at"),
        )


def views(rows: Iterable[Mapping[str, Any]]) -> dict[str, NodeView]:
    """Rows (see :meth:`NodeView.from_row`) by node id, ready for :func:`layout`."""
    out: dict[str, NodeView] = {}
    for row in rows:
        view = NodeView.from_row(row)
        out[view.node_id] = view
    return out


# -- the diagram --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    """A rectangle in px, from the diagram's top left corner."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h


@dataclass(frozen=True)
class Box:
    """A node drawn as a box, or a placeholder where a node cannot be drawn.

    ``kind``: ``step`` (a leaf, or a node of an unknown type), ``decision`` (an IF),
    ``fork`` (a JOIN or a RACE), or a placeholder: ``missing`` (a child with no row),
    ``repeat`` (a node reached a second time, drawn elsewhere), ``cut`` (not drawn: the
    diagram's limits)."""

    kind: str
    node_id: str | None  # the node drawn, or referred to by a placeholder
    node_type: str  # "" for a placeholder
    status: str  # the status shown (inferred); "" for a placeholder
    label: str  # uncut: to_svg cuts it to fit the box
    detail: str  # a second, smaller line ("" for none)
    title: str  # the tooltip: the label uncut, the status, a retry's failed attempts
    rect: Rect
    muted: bool = False  # in the arm of an IF that was not taken


@dataclass(frozen=True)
class Frame:
    """A compound node drawn around its body: ``kind`` is ``loop``, ``retry``, ``timeout``,
    ``map``, or ``continued``: the graph a step continued with (df.continue_with), or what a
    node of an unknown type points at; ``node_id`` is then the node's, whose box already
    carries it, so the frame has no element id."""

    kind: str
    node_id: str
    node_type: str
    status: str
    label: str
    title: str
    rect: Rect
    muted: bool = False


@dataclass(frozen=True)
class Bar:
    """A JOIN's, RACE's or IF's fork (``kind`` ``fork``) or merge (``merge``) bar."""

    kind: str
    node_id: str
    status: str
    rect: Rect
    muted: bool = False


@dataclass(frozen=True)
class Edge:
    """A line from one block to the next, through ``points``. ``kind`` is ``flow`` or
    ``loop-back`` (a loop's return to the start of its body); ``label`` names an IF's arm
    (``then``, ``else``) or a loop's condition (``while``)."""

    points: tuple[tuple[int, int], ...]
    kind: str = "flow"
    label: str = ""
    muted: bool = False


@dataclass(frozen=True)
class Diagram:
    """A placed diagram: what :func:`to_svg` draws."""

    width: int
    height: int
    boxes: tuple[Box, ...]
    frames: tuple[Frame, ...]  # outer frames before the frames inside them
    bars: tuple[Bar, ...]
    edges: tuple[Edge, ...]
    notes: tuple[str, ...]  # shown above the graph, e.g. that it was cut
    drawn: int  # nodes visited (THEN nodes included)


def draw(
    root: str, nodes: Mapping[str, NodeView], generation: int, now: datetime | None = None
) -> str:
    """The SVG of an instance's graph: ``root`` its root node id, ``nodes`` its nodes by id,
    ``generation`` the iteration of a loop at its root (df._runs.generation); ``now`` lets
    running steps show how long they have run."""
    return to_svg(layout(root, nodes, generation, now))


def layout(
    root: str, nodes: Mapping[str, NodeView], generation: int, now: datetime | None = None
) -> Diagram:
    """Place every node of the graph under ``root`` (arguments as for :func:`draw`)."""
    builder = _Builder(nodes, generation, now)
    block = builder.sequence(root, None, 0)
    notes: list[str] = []
    if root not in nodes:
        notes.append(f"The root node {root} has no row.")
    if builder.cut:
        notes.append(f"Only {builder.visited:,} of the graph's {len(nodes):,} nodes are drawn.")
    if builder.too_deep:
        notes.append(f"Nodes nested more than {MAX_NESTING} levels deep are not drawn.")
    out = _Out()
    top = MARGIN + NOTE_H * len(notes)
    note_w = max((_text_width(n, FONT) for n in notes), default=0)
    width = max(block.w, note_w) + 2 * MARGIN
    block.place(MARGIN + (width - 2 * MARGIN - block.w) // 2, top, out, False)
    return Diagram(
        width=width,
        height=top + block.h + MARGIN,
        boxes=tuple(out.boxes),
        frames=tuple(out.frames),
        bars=tuple(out.bars),
        edges=tuple(out.edges),
        notes=tuple(notes),
        drawn=builder.visited,
    )


# -- measuring and placing blocks ---------------------------------------------------------------


@dataclass
class _Out:
    boxes: list[Box] = field(default_factory=list)
    frames: list[Frame] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)


class _Block(Protocol):
    """A measured part of the diagram (``w`` by ``h`` px), placed by its top left corner. It
    is entered at the middle of its top edge and left at the middle of its bottom edge."""

    w: int
    h: int

    def place(self, x: int, y: int, out: _Out, muted: bool) -> None: ...


class _Leaf:
    """One box."""

    def __init__(self, box: Box):
        self.box, self.w, self.h = box, box.rect.w, box.rect.h

    def place(self, x: int, y: int, out: _Out, muted: bool) -> None:
        rect = replace(self.box.rect, x=x, y=y)
        out.boxes.append(replace(self.box, rect=rect, muted=muted))


class _Seq:
    """Blocks one below the other; ``labels[i]`` names the edge into block ``i``."""

    def __init__(self, items: list[_Block], labels: list[str] | None = None):
        self.items, self.labels = items, labels or [""] * len(items)
        self.w = max(b.w for b in items)
        self.h = sum(b.h for b in items) + V_GAP * (len(items) - 1)

    def place(self, x: int, y: int, out: _Out, muted: bool) -> None:
        cx = x + self.w // 2
        for i, block in enumerate(self.items):
            if i:
                edge = Edge(((cx, y - V_GAP), (cx, y)), label=self.labels[i], muted=muted)
                out.edges.append(edge)
            block.place(x + (self.w - block.w) // 2, y, out, muted)
            y += block.h + V_GAP


class _Parallel:
    """A fork (a JOIN's or RACE's, or an IF's decision) above blocks side by side, which
    meet at a merge bar. ``labels`` name the edges into the branches; ``untaken`` branches
    (an IF's arm not taken) are greyed."""

    def __init__(self, head: Box, branches: list[_Block], labels: list[str], untaken: list[bool]):
        self.head, self.branches, self.labels, self.untaken = head, branches, labels, untaken
        self.inner_w = sum(b.w for b in branches) + H_GAP * (len(branches) - 1)
        self.w = max(self.inner_w, head.rect.w)
        self.h = PILL_H + 10 + 2 * BAR_H + 2 * V_GAP + max(b.h for b in branches)

    def place(self, x: int, y: int, out: _Out, muted: bool) -> None:
        head, cx = self.head, x + self.w // 2
        rect = replace(head.rect, x=x + (self.w - head.rect.w) // 2, y=y)
        out.boxes.append(replace(head, rect=rect, muted=muted))
        bar_y = y + PILL_H + 10
        out.edges.append(Edge(((cx, y + PILL_H), (cx, bar_y)), muted=muted))
        branch_y = bar_y + BAR_H + V_GAP
        merge_y = branch_y + max(b.h for b in self.branches) + V_GAP
        bx = x + (self.w - self.inner_w) // 2
        centres = []
        for block, label, untaken in zip(self.branches, self.labels, self.untaken, strict=True):
            grey = muted or untaken
            bcx = bx + block.w // 2
            centres.append(bcx)
            out.edges.append(Edge(((bcx, bar_y + BAR_H), (bcx, branch_y)), label=label, muted=grey))
            block.place(bx, branch_y, out, grey)
            out.edges.append(Edge(((bcx, branch_y + block.h), (bcx, merge_y)), muted=grey))
            bx += block.w + H_GAP
        # The bars reach a little past the outer branches, and always past the middle.
        left, right = min(centres[0], cx) - 8, max(centres[-1], cx) + 8
        for kind, top in (("fork", bar_y), ("merge", merge_y)):
            rect = Rect(left, top, right - left, BAR_H)
            out.bars.append(Bar(kind, head.node_id or "", head.status, rect, muted))


class _Framed:
    """A frame with a label above its body; a loop's has an edge back to its body's start."""

    def __init__(self, frame: Frame, body: _Block, loop_back: bool):
        self.frame, self.body, self.loop_back = frame, body, loop_back
        self.top = HEADER_H + (LOOP_GAP if loop_back else 4)
        self.w = max(body.w, STEP_W) + 2 * PAD
        self.h = self.top + body.h + PAD + (PAD // 2 if loop_back else 0)

    def place(self, x: int, y: int, out: _Out, muted: bool) -> None:
        out.frames.append(replace(self.frame, rect=Rect(x, y, self.w, self.h), muted=muted))
        body_y = y + self.top
        self.body.place(x + (self.w - self.body.w) // 2, body_y, out, muted)
        if self.loop_back:
            # Down from the body's end, up the frame's right side (where nothing else is
            # drawn), and into the body's start.
            cx, side = x + self.w // 2, x + self.w - PAD // 2
            end, below, above = body_y + self.body.h, body_y + self.body.h + PAD // 2, y + HEADER_H
            points = (
                (cx, end),
                (cx, below),
                (side, below),
                (side, above),
                (cx, above),
                (cx, body_y),
            )
            out.edges.append(Edge(points, kind="loop-back", muted=muted))


# -- from nodes to blocks -----------------------------------------------------------------------

_STAMP = re.compile(r"(.+)::([0-9]{1,9})", re.DOTALL)  # monitoring.sql's reading of a stamp
_ATTEMPT = re.compile(r"attempt ([0-9]{1,9}):")
_LEAVES = frozenset(
    {"SQL", "SLEEP", "WAIT_SCHEDULE", "BREAK", "HTTP", "HTTP_MULTIPART", "SIGNAL", "CALL"}
)
_FRAMED = {"LOOP": "loop", "RETRY": "retry", "TIMEOUT": "timeout", "MAP": "map"}
# A loop whose parent is one of these (or that is the root) iterates its parent's execution;
# the interpreter (_start_loop) gives any other loop an execution of its own.
_INLINE_LOOP_PARENTS = frozenset({"JOIN", "RACE", "MAP"})
_FINISHED = frozenset({"completed", "failed"})
_STARTED = frozenset({"running", "completed", "failed"})
_ORIGIN = Rect(0, 0, 0, 0)  # where a box or frame is made, before it is placed
_PLACEHOLDER_TITLES = {
    "missing": "No row has this node's id.",
    "repeat": "Reached a second time: a node is drawn once.",
    "cut": "Not drawn: the diagram's limits.",
}


def _placeholder(kind: str, node_id: str | None, label: str) -> _Leaf:
    title = f"{label}\n{_PLACEHOLDER_TITLES[kind]}"
    return _Leaf(Box(kind, node_id, "", "", label, "", title, Rect(0, 0, STEP_W, SMALL_H)))


def _cut() -> _Leaf:
    return _placeholder("cut", None, "… not drawn")


class _Builder:
    """Turns the graph into blocks, visiting each node once."""

    def __init__(self, nodes: Mapping[str, NodeView], generation: int, now: datetime | None):
        self.nodes, self.generation, self.now = nodes, generation, now
        self.seen: set[str] = set()
        self.visited = 0
        self.cut = False  # MAX_DRAWN reached: nothing more is drawn
        self.too_deep = False  # something nested deeper than MAX_NESTING was not drawn
        # Each node's stamp, and the highest generation stamped in each scope (monitoring.sql's
        # scope_max).
        self.stamps: dict[str, tuple[str, int]] = {}
        self.scope_max: dict[str, int] = {}
        for view in nodes.values():
            stamp = _stamp(view.status_details)
            if stamp is not None:
                self.stamps[view.node_id] = stamp
                self.scope_max[stamp[0]] = max(stamp[1], self.scope_max.get(stamp[0], 0))

    def _claim(self, node_id: str | None, depth: int) -> _Leaf | None:
        """Count ``node_id`` as drawn, or the placeholder to draw instead of it."""
        if node_id is None or node_id not in self.nodes:
            return _placeholder("missing", node_id, f"missing node {node_id or ''}".rstrip())
        if node_id in self.seen:
            return _placeholder("repeat", node_id, f"→ {node_id} (drawn elsewhere)")
        if depth > MAX_NESTING:
            self.too_deep = True
            return _placeholder("cut", None, "… nested too deep to draw")
        if self.visited >= MAX_DRAWN:
            self.cut = True
            return _cut()
        self.seen.add(node_id)
        self.visited += 1
        return None

    def sequence(self, node_id: str | None, parent_type: str | None, depth: int) -> _Block:
        """The block of ``node_id`` (whose parent is of ``parent_type``; None for the root).
        A chain of THEN nodes is one flat sequence, walked without recursion (a sequence may
        be thousands of steps long); the recursion is one call per level of nesting."""
        items: list[_Block] = []
        stack: list[tuple[str | None, str | None]] = [(node_id, parent_type)]
        while stack:
            current, parent = stack.pop()
            placeholder = self._claim(current, depth)
            if placeholder is not None:
                items.append(placeholder)
                if self.cut:
                    break
                continue
            assert current is not None
            view = self.nodes[current]
            if view.node_type == "THEN":
                stack += [(view.right_node, "THEN"), (view.left_node, "THEN")]
                continue
            config = _config(view)
            blocks: list[_Block] = []
            for child in _children(view, config):
                blocks.append(self.sequence(child, view.node_type, depth + 1))
                if self.cut:  # the child ends with a placeholder saying so
                    break
            items.append(self._assemble(view, config, parent, blocks))
            if self.cut and stack:
                items.append(_cut())
                break
        return items[0] if len(items) == 1 else _Seq(items)

    def _assemble(
        self,
        view: NodeView,
        config: Mapping[str, Any] | None,
        parent_type: str | None,
        blocks: list[_Block],
    ) -> _Block:
        """The block of a node, given the blocks of its children (:func:`_children`)."""
        t, status = view.node_type, view.shown_status
        if t in ("JOIN", "RACE"):
            head = self._box(view, "fork", config, PILL_W, PILL_H)
            return _Parallel(head, blocks, [""] * len(blocks), [False] * len(blocks))
        if t == "IF":
            condition = blocks.pop(0) if _condition(view, config) and blocks else None
            while len(blocks) < 2:  # the diagram was cut
                blocks.append(_cut())
            arms = [self.nodes.get(a or "") for a in (view.left_node, view.right_node)]
            shown = [a.shown_status if a else None for a in arms]
            decided = status in _FINISHED or any(s in _STARTED for s in shown)
            untaken = [decided and s in ("skipped", "pending") for s in shown]
            head = self._box(view, "decision", config, PILL_W, PILL_H)
            decision = _Parallel(head, blocks, ["then", "else"], untaken)
            return decision if condition is None else _Seq([condition, decision])
        if t in _FRAMED:
            label = _label(view, config)
            extra = ""
            if t == "LOOP" and status in _STARTED:
                iteration = self._iteration(view, parent_type)
                extra = f"iteration {iteration}" if iteration else ""
            elif t == "RETRY" and status in _STARTED:
                extra = _attempt(view, config)
            elif t == "MAP":
                extra = "each item"
            header = f"{label} · {extra}" if extra else label
            frame = Frame(
                _FRAMED[t], view.node_id, t, status, header, self._title(view, header), _ORIGIN
            )
            body = blocks[0] if len(blocks) == 1 else _Seq(blocks, ["", "while"])
            return _Framed(frame, body, t == "LOOP")
        box = _Leaf(self._box(view, "step", config, STEP_W, STEP_H))
        if not blocks:
            return box
        # A SQL or Python step that continued with a graph (df.continue_with) runs it in its
        # place, as its left child; a node of an unknown type shows what it points at alike.
        label = "⤷ continued with" if t in ("SQL", "CALL") else f"under {_flat(t)}"
        frame = Frame("continued", view.node_id, t, status, label, label, _ORIGIN)
        inner = blocks[0] if len(blocks) == 1 else _Seq(blocks)
        return _Seq([box, _Framed(frame, inner, False)])

    def _iteration(self, loop: NodeView, parent_type: str | None) -> int | None:
        """The iteration a loop is in (or ended in), from the execution stamps: a loop at the
        root iterates the instance's execution (the generation given); one at the root of a
        JOIN/RACE branch or a df.map item iterates that branch's or item's, its own stamp's
        scope; any other has an execution of its own, whose scope is
        ``<its stamp's scope>::<its stamp's generation>::<its id>``."""
        if parent_type is None:
            return self.generation if self.generation > 0 else None
        stamp = self.stamps.get(loop.node_id)
        if stamp is None:
            return None
        scope, gen = stamp
        if parent_type in _INLINE_LOOP_PARENTS:
            return self.scope_max.get(scope)
        return self.scope_max.get(f"{scope}::{gen}::{loop.node_id}")

    def _box(
        self, view: NodeView, kind: str, config: Mapping[str, Any] | None, w: int, h: int
    ) -> Box:
        label = _label(view, config)
        detail = ""
        if kind == "step":
            took = self._duration(view)
            name = f"|=> '{_flat(view.result_name)}'" if view.result_name else ""
            detail = " · ".join(p for p in (view.shown_status, took, name) if p)
        title = self._title(view, label)
        return Box(
            kind,
            view.node_id,
            view.node_type,
            view.shown_status,
            label,
            detail,
            title,
            Rect(0, 0, w, h),
        )

    def _duration(self, view: NodeView) -> str:
        status, start = view.shown_status, view.started_at
        if start is None or status not in _STARTED:
            return ""
        end = self.now if status == "running" else view.updated_at
        try:
            return format_duration(start, end) if end is not None else ""
        except TypeError:  # a naive time against an aware one: no duration, not a failure
            return ""

    def _title(self, view: NodeView, label: str) -> str:
        """The tooltip: the label uncut, the name, the status, a retry's failed attempts."""
        lines = [_cap(label)]
        if view.result_name:
            lines.append(f"|=> '{_cap(view.result_name)}'")
        status = view.shown_status
        line = f"{MARKERS.get(status, ('?', ''))[0]} {status}"
        if view.inferred_status and view.inferred_status != view.status:
            line += f" (stored: {view.status})"
        took = self._duration(view)
        lines.append(line + (f", {took}" if took else ""))
        lines += [_cap(line) for line in (view.error or "").splitlines()[:MAX_ERROR_LINES]]
        lines.append(f"node {_cap(view.node_id)}")
        return "\n".join(lines)


def _condition(view: NodeView, config: Mapping[str, Any] | None) -> str | None:
    """An IF's or a while-LOOP's condition node."""
    return _id(config.get("condition_node")) if config else None


def _children(view: NodeView, config: Mapping[str, Any] | None) -> list[str | None]:
    """A node's children in drawing order (None where a required one is not given)."""
    t, left, right = view.node_type, view.left_node, view.right_node
    if t == "JOIN":
        return [left, right, *_ids(config.get("extra_nodes") if config else None)]
    if t == "RACE":
        return [left, right]
    if t == "IF":
        condition = _condition(view, config)
        return [condition, left, right] if condition else [left, right]
    if t == "LOOP":
        condition = _condition(view, config)
        return [left, condition] if condition else [left]
    if t in _FRAMED:
        return [left]
    if t in ("SQL", "CALL"):
        return [left] if left else []
    if t in _LEAVES:
        return []
    return [c for c in (left, right) if c]


# -- labels, in df.explain's words ---------------------------------------------------------------


def _label(view: NodeView, config: Mapping[str, Any] | None) -> str:
    """The node in one line, as df.explain draws it (explain.sql's _explain_entry), uncut."""
    t, q = view.node_type, view.query
    if t in CONFIG_TYPES and config is None and t not in ("IF", "LOOP", "JOIN"):
        return f"{t} {_flat(q or '')}".rstrip()
    c: Mapping[str, Any] = config or {}
    if t == "SQL":
        return f"SQL: {_flat(q or '')}"
    if t == "SLEEP":
        return f"SLEEP {_flat(q or '')}s"
    if t == "WAIT_SCHEDULE":
        return f"WAIT '{_value_text(c.get('cron_expr'))}'"
    if t == "SIGNAL":
        timeout = c.get("timeout_seconds")
        after = f" ({_value_text(timeout)}s)" if _is_number(timeout) else ""
        return f"SIGNAL '{_value_text(c.get('signal_name'))}'{after}"
    if t in ("HTTP", "HTTP_MULTIPART"):
        return f"HTTP {_value_text(c.get('method', '?'))} {_value_text(c.get('url'))}"
    if t == "LOOP":
        return "LOOP (while)" if _id(c.get("condition_node")) else "LOOP (infinite)"
    if t == "BREAK":
        value = c.get("break_value")
        return "BREAK" if value is None else f"BREAK '{_value_text(value)}'"
    if t == "CALL":
        return f"CALL {_value_text(c.get('name', '?'))}"
    if t == "MAP":
        source, parallel = c.get("source", "?"), c.get("max_parallel", 10)
        return f"MAP '{_value_text(source)}' (max {_value_text(parallel)} at once)"
    if t == "IF":  # df.if_rows has no condition node: say what it tests
        has_rows = c.get("condition_type") == "result_has_rows"
        return f"IF '{_value_text(c.get('result_name'))}' has rows" if has_rows else "IF"
    if t == "JOIN":
        return f"JOIN ({2 + len(_ids(c.get('extra_nodes')))})"
    if t == "RACE":
        return "RACE"
    if t == "RETRY":
        attempts = c.get("max_attempts", "?")
        s = "" if attempts == 1 else "s"
        on = c.get("retry_on")
        codes = f", on {', '.join(_value_text(x) for x in on)}" if isinstance(on, list) else ""
        return f"RETRY (max {_value_text(attempts)} attempt{s}{codes})"
    if t == "TIMEOUT":
        return f"TIMEOUT {_value_text(c.get('timeout_seconds', '?'))}s"
    return f"{_flat(t)} {_flat(q or '')}".rstrip()


def _attempt(view: NodeView, config: Mapping[str, Any] | None) -> str:
    """A running or finished df.retry's attempt: its failed attempts are the lines
    ``attempt <n>: <error>`` of its error column; the one after them runs (or succeeded)."""
    failed = 0
    for line in (view.error or "").splitlines():
        match = _ATTEMPT.match(line)
        if match:
            failed = max(failed, int(match[1]))
    status = view.shown_status
    current = max(failed, 1) if status == "failed" else failed + 1
    attempts = config.get("max_attempts") if config else None
    of = f" of {attempts}" if isinstance(attempts, int) and not isinstance(attempts, bool) else ""
    return f"attempt {current}{of}" + (" (gave up)" if status == "failed" else "")


def label(view: NodeView) -> str:
    """The node in one line, in df.explain's words, uncut (as its box in the diagram says)."""
    return _label(view, _config(view))


def _config(view: NodeView) -> Mapping[str, Any] | None:
    """The JSON object a node of a config type keeps in its query; None if it has none or
    it cannot be read (a hand-written row may hold anything)."""
    if view.node_type not in CONFIG_TYPES or view.query is None:
        return None
    try:
        parsed = json.loads(view.query)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _stamp(details: str | None) -> tuple[str, int] | None:
    if not details:
        return None
    try:
        parsed = json.loads(details)
    except (ValueError, RecursionError):
        return None
    execution = parsed.get("execution_id") if isinstance(parsed, dict) else None
    match = _STAMP.fullmatch(execution) if isinstance(execution, str) else None
    return (match[1], int(match[2])) if match else None


def _id(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[str | None]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return str(value)


def _value_text(value: Any) -> str:
    """A config value as text: a string as it is, nothing as nothing, anything else as
    JSON."""
    if value is None:
        return ""
    return _flat(value if isinstance(value, str) else _json_text(value))


def _flat(text: str) -> str:
    """Text on one line: runs of white space (line breaks too) become one space."""
    return " ".join(text.split())


def _cap(text: str) -> str:
    return text if len(text) <= TITLE_MAX else text[: TITLE_MAX - 1] + "…"


# -- SVG -----------------------------------------------------------------------------------------

STYLE = """
.pgd { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace; }
.pgd text { font-size: 12px; fill: #202124; }
.pgd .detail, .pgd .edge-label, .pgd .note { font-size: 10px; fill: #5f6368; }
.pgd .note { font-size: 12px; }
.pgd .box { fill: #fff; stroke: #9aa0a6; stroke-width: 1.5; }
.pgd .frame-box { fill: #f8f9fa; fill-opacity: 0.5; stroke: #9aa0a6; stroke-width: 1.2; }
.pgd .frame-label { font-size: 11px; font-weight: 600; }
.pgd .marker { fill: #9aa0a6; }
.pgd .glyph { font-size: 10px; fill: #fff; font-weight: 700; }
.pgd .bar { fill: #5f6368; }
.pgd .edge { fill: none; stroke: #80868b; stroke-width: 1.2; }
.pgd .loop-back { stroke-dasharray: 4 3; }
.pgd .status-completed .box, .pgd .status-completed .frame-box { stroke: #1e8e3e; }
.pgd .status-completed .marker, .pgd .bar.status-completed { fill: #1e8e3e; }
.pgd .status-failed .box { stroke: #d93025; fill: #fce8e6; }
.pgd .status-failed .frame-box { stroke: #d93025; }
.pgd .status-failed .marker, .pgd .bar.status-failed { fill: #d93025; }
.pgd .status-cancelled .box, .pgd .status-cancelled .frame-box { stroke: #a50e8c; }
.pgd .status-cancelled .marker, .pgd .bar.status-cancelled { fill: #a50e8c; }
.pgd .status-running .box { stroke: #e37400; stroke-width: 3; fill: #fef7e0; }
.pgd .status-running .frame-box { stroke: #e37400; stroke-width: 2.5; }
.pgd .status-running .marker, .pgd .bar.status-running { fill: #e37400; }
.pgd .status-pending .box { stroke: #9aa0a6; }
.pgd .status-skipped .box, .pgd .status-skipped .frame-box {
  stroke: #c7c9cc; stroke-dasharray: 5 3;
}
.pgd .status-skipped text { fill: #9aa0a6; }
.pgd .status-skipped .marker { fill: #dadce0; }
.pgd .untaken { opacity: 0.45; }
.pgd .untaken .box, .pgd .untaken .frame-box, .pgd .edge.untaken { stroke-dasharray: 5 3; }
.pgd .placeholder .box { fill: #f1f3f4; stroke: #bdc1c6; stroke-dasharray: 3 3; }
.pgd .placeholder text { font-size: 11px; fill: #5f6368; font-style: italic; }
.pgd .missing .box { stroke: #d93025; }
.pgd a:hover .box, .pgd a:hover .frame-box { stroke-width: 3; }
"""
_GLYPHS = {"completed": "✓", "failed": "✗", "cancelled": "✗", "running": "▸", "skipped": "–"}


def to_svg(diagram: Diagram) -> str:
    """The diagram as a standalone SVG document (its own <style>; a page may override it)."""
    w, h = diagram.width, diagram.height
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="pgd" width="{w}" height="{h}"'
        f' viewBox="0 0 {w} {h}" role="img" aria-label="workflow graph">',
        f"<style>{STYLE}</style>",
        '<defs><marker id="pgd-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="8"'
        ' markerHeight="8" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#80868b"/>'
        "</marker></defs>",
    ]
    out += [
        _text_svg("note", MARGIN, MARGIN + NOTE_H * i + 12, n) for i, n in enumerate(diagram.notes)
    ]
    out += [_frame_svg(f) for f in diagram.frames]
    out += [_edge_svg(e) for e in diagram.edges]
    for bar in diagram.bars:
        classes = f"bar {bar.kind} status-{_css(bar.status)}" + _untaken(bar.muted)
        out.append(_rect_svg(classes, bar.rect, 2))
    out += [_box_svg(b) for b in diagram.boxes]
    out.append("</svg>")
    return "\n".join(out)


def _box_svg(box: Box) -> str:
    r = box.rect
    placeholder = box.kind in _PLACEHOLDER_TITLES
    if placeholder:
        classes, element_id = f"placeholder {box.kind}", ""
    else:
        classes = f"node {box.kind} status-{_css(box.status)} type-{_css(box.node_type)}"
        element_id = f' id="node-{_xml(box.node_id or "")}"'
    parts = [_rect_svg("box", r, r.h // 2 if box.kind in ("decision", "fork") else 6)]
    text_x = r.x + 10
    if not placeholder:
        mx, my = r.x + 14, r.y + (14 if box.detail else r.h // 2)
        parts.append(_marker_svg(mx, my, 7, box.status))
        text_x = r.x + 27
    room = r.right - 8 - text_x
    if box.detail:
        parts.append(_text_svg("label", text_x, r.y + 18, _fit(box.label, room, FONT)))
        parts.append(_text_svg("detail", text_x, r.y + 32, _fit(box.detail, room, SMALL_FONT)))
    else:
        parts.append(_text_svg("label", text_x, r.y + r.h // 2 + 4, _fit(box.label, room, FONT)))
    body = "".join(parts)
    if box.node_id is not None and box.kind != "missing":
        body = _link_svg(box.node_id, body)
    title = f"<title>{_xml(box.title)}</title>"
    return f'<g{element_id} class="{classes}{_untaken(box.muted)}">{title}{body}</g>'


def _frame_svg(frame: Frame) -> str:
    r = frame.rect
    classes = f"node frame {frame.kind} status-{_css(frame.status)} type-{_css(frame.node_type)}"
    # A "continued with" frame belongs to its step, whose box has the element id.
    element_id = "" if frame.kind == "continued" else f' id="node-{_xml(frame.node_id)}"'
    my = r.y + HEADER_H // 2 + 1
    body = (
        _rect_svg("frame-box", r, 8)
        + _marker_svg(r.x + 14, my, 6, frame.status)
        + _text_svg("frame-label", r.x + 26, my + 4, _fit(frame.label, r.w - 34, FRAME_FONT))
    )
    title = f"<title>{_xml(frame.title)}</title>"
    link = _link_svg(frame.node_id, body)
    return f'<g{element_id} class="{classes}{_untaken(frame.muted)}">{title}{link}</g>'


def _edge_svg(edge: Edge) -> str:
    points = " ".join(f"{x},{y}" for x, y in edge.points)
    classes = f"edge {edge.kind}{_untaken(edge.muted)}"
    line = f'<polyline class="{classes}" points="{points}" marker-end="url(#pgd-arrow)"/>'
    if not edge.label:
        return line
    x, y = edge.points[0]
    return line + _text_svg(f"edge-label{_untaken(edge.muted)}", x + 5, y + 12, edge.label)


def _rect_svg(classes: str, r: Rect, radius: int) -> str:
    return (
        f'<rect class="{classes}" x="{r.x}" y="{r.y}" width="{r.w}" height="{r.h}" rx="{radius}"/>'
    )


def _marker_svg(x: int, y: int, radius: int, status: str) -> str:
    marker = f'<circle class="marker" cx="{x}" cy="{y}" r="{radius}"/>'
    glyph = _GLYPHS.get(status)
    if glyph is None:
        return marker
    return marker + f'<text class="glyph" x="{x}" y="{y + 3.5}" text-anchor="middle">{glyph}</text>'


def _text_svg(classes: str, x: int, y: int, text: str) -> str:
    return f'<text class="{classes}" x="{x}" y="{y}">{_xml(text)}</text>'


def _link_svg(node_id: str, body: str) -> str:
    """``body`` as a link to the dashboard's detail of the step (an anchor on its page)."""
    return f'<a href="#step-{_xml(quote(node_id, safe=""))}">{body}</a>'


def _untaken(muted: bool) -> str:
    return " untaken" if muted else ""


_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """Text safe in XML content and in double-quoted attributes; characters XML 1.0 cannot
    hold at all become U+FFFD."""
    text = _INVALID_XML.sub("\ufffd", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace('"', "&quot;")


_CSS_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def _css(word: str) -> str:
    """A status or node type as a CSS class name part."""
    return _CSS_UNSAFE.sub("-", word.lower()).strip("-") or "unknown"


def _em(ch: str) -> float:
    """A character's width in a monospace font, in em: wide (East Asian) ones take two cells,
    combining ones none."""
    if unicodedata.combining(ch):
        return 0.0
    return 1.2 if unicodedata.east_asian_width(ch) in ("W", "F") else 0.6


def _text_width(text: str, size: int) -> int:
    return int(sum(map(_em, text)) * size) + 1


def _fit(text: str, room: int, size: int) -> str:
    """``text`` cut with … to fit ``room`` px at font ``size``."""
    budget = room / size
    used, fits = 0.0, 0  # fits: the characters that fit with the …
    for i, ch in enumerate(text):
        used += _em(ch)
        if used > budget:
            return text[:fits] + "…"
        if used + 0.6 <= budget:
            fits = i + 1
    return text
