"""The dashboard's graph diagram (dashboard/diagram.py): node rows in, SVG out. Pure, except
the last test, which draws a real instance from df.instance_nodes."""

from __future__ import annotations

import itertools
import json
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgdurable import dsl as df
from pgdurable.core.model import Graph, expand
from pgdurable.dashboard.diagram import (
    MAX_DRAWN,
    Box,
    Diagram,
    Frame,
    NodeView,
    Rect,
    draw,
    layout,
    to_svg,
    views,
)

SVG = "{http://www.w3.org/2000/svg}"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# -- helpers ------------------------------------------------------------------------------------


def build(
    graph: df.Node | str, status: str = "pending", seed: str = "seed"
) -> tuple[str, dict[str, NodeView]]:
    """The rows df.start would store for ``graph`` (ids aside: ``seed`` draws them), every
    node ``status``."""
    envelope = json.loads(df.as_node(graph).to_json())
    root, nodes = expand(envelope, Graph("i", "r", {}), "r", seed)
    return root, {
        n.id: NodeView(n.id, n.type, n.query, n.result_name, n.left, n.right, status=status)
        for n in nodes
    }


def row(node_id: str, node_type: str, query: str | None = None, **kw: Any) -> NodeView:
    return NodeView(node_id, node_type, query, **kw)


def graph_of(*nodes: NodeView) -> dict[str, NodeView]:
    return {n.node_id: n for n in nodes}


def stamp(execution_id: str) -> str:
    return json.dumps({"execution_id": execution_id})


def set_all(nodes: dict[str, NodeView], node_type: str, **changes: Any) -> None:
    for node_id, view in list(nodes.items()):
        if view.node_type == node_type:
            nodes[node_id] = replace(view, **changes)


def the(items: Iterable[Any], **match: Any) -> Any:
    """The one item whose attributes have the given values."""
    found = [i for i in items if all(getattr(i, k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} items match {match}"
    return found[0]


def box_of(diagram: Diagram, node_type: str) -> Box:
    box: Box = the(diagram.boxes, node_type=node_type)
    return box


def frame_of(diagram: Diagram, kind: str) -> Frame:
    frame: Frame = the(diagram.frames, kind=kind)
    return frame


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # raises on XML that is not well-formed


def groups(svg: str) -> dict[str, ET.Element]:
    """The SVG's node groups by element id."""
    return {g.attrib["id"]: g for g in parse(svg).iter(f"{SVG}g") if "id" in g.attrib}


def inside(inner: Rect, outer: Rect) -> bool:
    return (
        outer.x <= inner.x
        and inner.right <= outer.right
        and outer.y <= inner.y
        and inner.bottom <= outer.bottom
    )


def overlap(a: Rect, b: Rect) -> bool:
    return a.x < b.right and b.x < a.right and a.y < b.bottom and b.y < a.bottom


def check_geometry(d: Diagram) -> None:
    """No two boxes overlap; frames nest or stay apart; everything is on the canvas."""
    rects = sorted((b.rect for b in d.boxes), key=lambda r: (r.y, r.x))
    for i, a in enumerate(rects):  # a sweep: only boxes that start above a's bottom
        for b in itertools.takewhile(lambda r, a=a: r.y < a.bottom, rects[i + 1 :]):
            assert not overlap(a, b), (a, b)
    for f, g in itertools.combinations([f.rect for f in d.frames], 2):
        assert inside(f, g) or inside(g, f) or not overlap(f, g), (f, g)
    canvas = Rect(0, 0, d.width, d.height)
    for r in [*(b.rect for b in d.boxes), *(f.rect for f in d.frames), *(b.rect for b in d.bars)]:
        assert inside(r, canvas), r
    for frame in d.frames:  # a frame's boxes are inside it, the others outside
        for box in d.boxes:
            assert inside(box.rect, frame.rect) or not overlap(box.rect, frame.rect)


# -- each node type -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("graph", "node_type", "label"),
    [
        (df.sql("SELECT 1"), "SQL", "SQL: SELECT 1"),
        (df.sql("SELECT a,\n       b\n  FROM t"), "SQL", "SQL: SELECT a, b FROM t"),
        (df.http("https://example.com/x", "get"), "HTTP", "HTTP GET https://example.com/x"),
        (
            df.http_multipart("https://example.com/up", parts=[{"name": "f", "data_b64": ""}]),
            "HTTP_MULTIPART",
            "HTTP POST https://example.com/up",
        ),
        (df.call("billing.charge", {"id": 7}), "CALL", "CALL billing.charge"),
        (df.sleep(60), "SLEEP", "SLEEP 60s"),
        (df.wait_for_schedule("*/5 * * * *"), "WAIT_SCHEDULE", "WAIT '*/5 * * * *'"),
        (df.wait_for_signal("approval"), "SIGNAL", "SIGNAL 'approval'"),
        (df.wait_for_signal("approval", 3600), "SIGNAL", "SIGNAL 'approval' (3600s)"),
        (df.break_(), "BREAK", "BREAK"),
        (df.break_("done"), "BREAK", "BREAK 'done'"),
    ],
)
def test_each_step_is_a_box_with_explains_words(graph: df.Node, node_type: str, label: str) -> None:
    root, nodes = build(graph, "completed")
    d = layout(root, nodes, 1)
    box = box_of(d, node_type)
    assert (box.kind, box.node_id, box.label, box.status) == ("step", root, label, "completed")
    assert box.title.startswith(label)
    g = groups(to_svg(d))[f"node-{root}"]
    assert g.attrib["class"].split() == [
        "node",
        "step",
        "status-completed",
        f"type-{node_type.lower()}",
    ]
    assert g.find(f"{SVG}title") is not None
    assert label in (g.findtext(f"{SVG}title") or "")
    link = g.find(f"{SVG}a")
    assert link is not None and link.attrib["href"] == f"#step-{root}"
    assert link.find(f"{SVG}circle") is not None  # the status marker


def test_a_box_shows_its_name_and_how_long_it_ran() -> None:
    root, nodes = build(df.sql("SELECT 1").named("one"), "completed")
    nodes[root] = replace(nodes[root], started_at=T0, updated_at=T0 + timedelta(seconds=3.14))
    assert box_of(layout(root, nodes, 1), "SQL").detail == "completed · 3.1 s · |=> 'one'"
    nodes[root] = replace(nodes[root], status="running")
    running = layout(root, nodes, 1, now=T0 + timedelta(minutes=2, seconds=5))
    assert box_of(running, "SQL").detail == "running · 2m 05s · |=> 'one'"
    assert box_of(layout(root, nodes, 1), "SQL").detail == "running · |=> 'one'"  # no now


def test_compound_nodes_and_their_labels() -> None:
    graph = (
        df.join("SELECT 1", "SELECT 2", "SELECT 3")
        >> ("SELECT 4" | df.sleep(1))
        >> df.if_("SELECT true", "SELECT 5", "SELECT 6")
        >> df.if_rows("r", "SELECT 7", "SELECT 8")
        >> df.loop("SELECT 9")
        >> df.loop("SELECT 10", "SELECT false")
        >> df.retry("SELECT 11", 3, retry_on=["40001", "http"])
        >> df.retry("SELECT 12", 1)
        >> df.timeout("SELECT 13", 2.5)
        >> df.map_("r", "SELECT $item.id", 4)
    )
    root, nodes = build(graph)
    d = layout(root, nodes, 1)
    forks = [b.label for b in d.boxes if b.kind == "fork"]
    assert forks == ["JOIN (3)", "RACE"]
    assert [b.label for b in d.boxes if b.kind == "decision"] == ["IF", "IF 'r' has rows"]
    assert [(f.kind, f.label) for f in d.frames] == [
        ("loop", "LOOP (infinite)"),
        ("loop", "LOOP (while)"),
        ("retry", "RETRY (max 3 attempts, on 40001, http)"),
        ("retry", "RETRY (max 1 attempt)"),
        ("timeout", "TIMEOUT 2.5s"),
        ("map", "MAP 'r' (max 4 at once) · each item"),
    ]
    # Every SQL step is drawn once, in order; THEN nodes are not drawn.
    steps = [b.label for b in d.boxes if b.kind == "step"]
    assert steps[:3] == ["SQL: SELECT 1", "SQL: SELECT 2", "SQL: SELECT 3"]
    assert "SQL: SELECT false" in steps and len(steps) == 17
    assert not [b for b in d.boxes if b.node_type == "THEN"]
    svg = to_svg(d)
    ids = groups(svg)
    for view in nodes.values():
        assert (f"node-{view.node_id}" in ids) == (view.node_type != "THEN")
    # JOIN/RACE/IF: a fork and a merge bar each; the IF's arms are labelled.
    assert sorted(b.kind for b in d.bars) == ["fork"] * 4 + ["merge"] * 4
    assert [e.label for e in d.edges if e.label] == ["then", "else", "then", "else", "while"]
    assert [e.kind for e in d.edges].count("loop-back") == 2
    check_geometry(d)


def test_branches_side_by_side_between_fork_and_merge() -> None:
    root, nodes = build(df.join("SELECT 1", df.sleep(2) >> "SELECT 3", "SELECT 4"))
    d = layout(root, nodes, 1)
    fork = box_of(d, "JOIN")
    first, second, third = (the(d.boxes, label=f"SQL: SELECT {n}") for n in (1, 3, 4))
    sleep = box_of(d, "SLEEP")
    assert first.rect.y == sleep.rect.y == third.rect.y > fork.rect.bottom
    assert first.rect.right < sleep.rect.x and sleep.rect.right < third.rect.x
    assert second.rect.y > sleep.rect.bottom and second.rect.x == sleep.rect.x
    fork_bar, merge_bar = the(d.bars, kind="fork"), the(d.bars, kind="merge")
    assert fork.rect.bottom < fork_bar.rect.y < first.rect.y
    assert merge_bar.rect.y > second.rect.bottom
    assert fork_bar.rect.x < first.rect.x + first.rect.w // 2
    assert fork_bar.rect.right > third.rect.x + third.rect.w // 2
    check_geometry(d)


def test_a_sequence_reads_top_to_bottom_on_one_axis() -> None:
    root, nodes = build(df.sql("SELECT 1") >> "SELECT 2" >> df.sleep(3) >> "SELECT 4")
    d = layout(root, nodes, 1)
    assert [b.label for b in d.boxes] == [
        "SQL: SELECT 1",
        "SQL: SELECT 2",
        "SLEEP 3s",
        "SQL: SELECT 4",
    ]
    assert len({b.rect.x for b in d.boxes}) == 1
    assert all(a.rect.bottom < b.rect.y for a, b in itertools.pairwise(d.boxes))
    # The edges between them are straight, from one box's bottom to the next one's top.
    for edge, (a, b) in zip(d.edges, itertools.pairwise(d.boxes), strict=True):
        (x1, y1), (x2, y2) = edge.points
        assert x1 == x2 == a.rect.x + a.rect.w // 2 and (y1, y2) == (a.rect.bottom, b.rect.y)


def test_nesting_join_inside_loop_inside_retry_inside_timeout() -> None:
    inner = df.loop(df.join("SELECT 1", df.map_("r", df.call("s.one"))) >> "SELECT 2")
    root, nodes = build(df.timeout(df.retry(inner, 5), 60))
    d = layout(root, nodes, 1)
    timeout, retry, loop, map_ = (frame_of(d, k) for k in ("timeout", "retry", "loop", "map"))
    assert inside(retry.rect, timeout.rect) and inside(loop.rect, retry.rect)
    assert inside(map_.rect, loop.rect)
    assert inside(box_of(d, "CALL").rect, map_.rect)
    assert inside(box_of(d, "JOIN").rect, loop.rect) and not inside(
        box_of(d, "JOIN").rect, map_.rect
    )
    assert [f.kind for f in d.frames] == ["timeout", "retry", "loop", "map"]  # outer first
    check_geometry(d)


# -- statuses -----------------------------------------------------------------------------------


def test_statuses_become_classes_the_inferred_one_first() -> None:
    root, nodes = build(df.sql("SELECT 1") >> df.retry(df.sleep(1), 2) >> "SELECT 2" >> "SELECT 3")
    by_query = {v.query: v.node_id for v in nodes.values()}
    one, sleep, two, three = (by_query[q] for q in ("SELECT 1", "1", "SELECT 2", "SELECT 3"))
    retry = next(v.node_id for v in nodes.values() if v.node_type == "RETRY")
    nodes[one] = replace(nodes[one], status="completed")
    nodes[sleep] = replace(nodes[sleep], status="failed")
    nodes[retry] = replace(nodes[retry], status="failed")
    nodes[two] = replace(nodes[two], status="pending", inferred_status="skipped")
    nodes[three] = replace(nodes[three], status="completed", inferred_status="pending")
    ids = groups(draw(root, nodes, 1))
    status_of = {
        k: next(c for c in g.attrib["class"].split() if c.startswith("status-"))
        for k, g in ids.items()
    }
    assert status_of == {
        f"node-{one}": "status-completed",
        f"node-{sleep}": "status-failed",
        f"node-{retry}": "status-failed",
        f"node-{two}": "status-skipped",
        f"node-{three}": "status-pending",
    }
    assert "frame" in ids[f"node-{retry}"].attrib["class"].split()
    title = ids[f"node-{two}"].findtext(f"{SVG}title") or ""
    assert "⊘ skipped (stored: pending)" in title


def test_the_style_colours_every_status() -> None:
    root, nodes = build("SELECT 1", "running")
    style = parse(draw(root, nodes, 1)).findtext(f"{SVG}style") or ""
    for status in ("completed", "failed", "cancelled", "running", "pending", "skipped"):
        assert f".status-{status}" in style
    assert "stroke-width: 3" in style.split(".status-running .box", 1)[1].split("}")[0]
    assert ".untaken" in style


@pytest.mark.parametrize(
    ("if_status", "then_status", "else_status", "greyed"),
    [
        ("completed", "completed", "skipped", "else"),
        ("completed", "pending", "completed", "then"),  # an old graph: pending, not skipped
        ("running", "running", "pending", "else"),
        ("failed", "failed", "skipped", "else"),
        ("running", "pending", "pending", None),  # the condition still runs
        ("pending", "pending", "pending", None),
        ("skipped", "skipped", "skipped", None),  # the IF itself did not run
    ],
)
def test_the_arm_not_taken_is_greyed(
    if_status: str, then_status: str, else_status: str, greyed: str | None
) -> None:
    graph = df.if_("SELECT true", df.sleep(1) >> "SELECT 'then'", "SELECT 'else'")
    root, nodes = build(graph)
    if_node = nodes[root]
    assert if_node.left_node and if_node.right_node
    nodes[root] = replace(if_node, status=if_status)
    nodes[if_node.left_node] = replace(nodes[if_node.left_node], status=then_status)
    nodes[if_node.right_node] = replace(nodes[if_node.right_node], status=else_status)
    d = layout(root, nodes, 1)
    muted = {b.label for b in d.boxes if b.muted}
    expected = {
        None: set(),
        "then": {"SLEEP 1s", "SQL: SELECT 'then'"},
        "else": {"SQL: SELECT 'else'"},
    }[greyed]
    assert muted == expected
    assert {e.label for e in d.edges if e.muted and e.label} == ({greyed} if greyed else set())
    ids = groups(to_svg(d))
    for box in d.boxes:
        assert ("untaken" in ids[f"node-{box.node_id}"].attrib["class"].split()) == box.muted


# -- loops, retries, continued graphs, maps -----------------------------------------------------


def test_a_root_loop_shows_the_generation_given() -> None:
    root, nodes = build(df.loop("SELECT 1"), "running")
    assert frame_of(layout(root, nodes, 7), "loop").label == "LOOP (infinite) · iteration 7"
    nodes[root] = replace(nodes[root], status="pending")  # not started: no iteration
    assert frame_of(layout(root, nodes, 0), "loop").label == "LOOP (infinite)"


def test_a_nested_loop_counts_the_stamps_of_its_own_execution() -> None:
    """A loop not at the root of an execution has an execution of its own, scoped
    "<its stamp's scope>::<its stamp's generation>::<its id>" (interpreter._start_loop)."""
    nodes = graph_of(
        row("0000000a", "LOOP", None, left_node="0000000b", status="running"),  # the root
        row("0000000b", "THEN", None, left_node="0000000c", right_node="0000000d"),
        row("0000000c", "SQL", "SELECT 1", status="completed", status_details=stamp("i::2")),
        row(
            "0000000d",
            "LOOP",
            None,
            left_node="0000000e",
            status="running",
            status_details=stamp("i::2"),
        ),
        # This iteration of the root loop: the inner loop is in its 3rd iteration...
        row(
            "0000000e",
            "SQL",
            "SELECT 2",
            status="running",
            status_details=stamp("i::2::0000000d::3"),
        ),
    )
    # ... stamps of the root's first iteration (the inner loop's older execution) do not count.
    nodes["0000000f"] = row(
        "0000000f", "SQL", "SELECT 9", status_details=stamp("i::1::0000000d::9")
    )
    d = layout("0000000a", nodes, 2)
    assert [f.label for f in d.frames] == [
        "LOOP (infinite) · iteration 2",
        "LOOP (infinite) · iteration 3",
    ]


def test_a_loop_at_the_root_of_a_branch_iterates_the_branch() -> None:
    nodes = graph_of(
        row(
            "0000000a", "JOIN", None, left_node="0000000b", right_node="0000000d", status="running"
        ),
        row(
            "0000000b",
            "LOOP",
            None,
            left_node="0000000c",
            status="running",
            status_details=stamp("i::1::0000000b::4"),
        ),
        row(
            "0000000c",
            "SQL",
            "SELECT 1",
            status="running",
            status_details=stamp("i::1::0000000b::5"),
        ),
        row(
            "0000000d",
            "SQL",
            "SELECT 2",
            status="completed",
            status_details=stamp("i::1::0000000d::1"),
        ),
    )
    assert frame_of(layout("0000000a", nodes, 1), "loop").label == "LOOP (infinite) · iteration 5"


def test_a_while_loop_draws_its_condition_after_its_body() -> None:
    root, nodes = build(df.loop(df.sleep(1), "SELECT n < 3 FROM t"))
    d = layout(root, nodes, 1)
    body, condition = box_of(d, "SLEEP"), box_of(d, "SQL")
    assert condition.rect.y > body.rect.bottom
    while_edge = the(d.edges, label="while")
    assert while_edge.points[-1] == (condition.rect.x + condition.rect.w // 2, condition.rect.y)
    back = the(d.edges, kind="loop-back")
    frame = frame_of(d, "loop")
    assert back.points[0][1] == condition.rect.bottom and back.points[-1][1] == body.rect.y
    assert all(frame.rect.x < x < frame.rect.right for x, _ in back.points)
    assert max(x for x, _ in back.points) > condition.rect.right  # beside the boxes


@pytest.mark.parametrize(
    ("status", "error", "attempt"),
    [
        ("running", None, "attempt 1 of 4"),
        ("running", "attempt 1: boom\nattempt 2: SQL execution failed: x", "attempt 3 of 4"),
        ("completed", "attempt 1: boom", "attempt 2 of 4"),
        (
            "failed",
            "attempt 1: a\nattempt 2: b\nattempt 3: c\nattempt 4: d",
            "attempt 4 of 4 (gave up)",
        ),
        # An error text of several lines is one attempt.
        ("running", "attempt 1: Traceback:\n  line 2\nattempt 2: x", "attempt 3 of 4"),
    ],
)
def test_a_retry_shows_its_attempt(status: str, error: str | None, attempt: str) -> None:
    root, nodes = build(df.retry("SELECT 1", 4))
    nodes[root] = replace(nodes[root], status=status, error=error)
    d = layout(root, nodes, 1)
    frame = frame_of(d, "retry")
    assert frame.label == f"RETRY (max 4 attempts) · {attempt}"
    for line in (error or "").splitlines():
        assert line in frame.title.splitlines()


def test_a_retry_not_started_shows_no_attempt() -> None:
    root, nodes = build(df.retry("SELECT 1", 4), "pending")
    assert frame_of(layout(root, nodes, 1), "retry").label == "RETRY (max 4 attempts)"


def test_a_step_that_continued_draws_its_graph_below_it() -> None:
    root, nodes = build(df.sql("SELECT df.continue_with(...)") >> "SELECT 'after'", "completed")
    step = next(v for v in nodes.values() if v.query == "SELECT df.continue_with(...)")
    # What the worker records: the generated graph's nodes, and the step's left_node.
    more_root, more = build(df.call("a.b") >> df.sleep(1), "completed", seed="more")
    nodes.update(more)
    nodes[step.node_id] = replace(step, left_node=more_root)
    d = layout(root, nodes, 1)
    frame = frame_of(d, "continued")
    assert frame.label == "⤷ continued with" and frame.node_id == step.node_id
    sql = the(d.boxes, node_id=step.node_id)
    call, sleep, after = (
        box_of(d, "CALL"),
        box_of(d, "SLEEP"),
        the(d.boxes, label="SQL: SELECT 'after'"),
    )
    assert (
        sql.rect.bottom < frame.rect.y
        and inside(call.rect, frame.rect)
        and inside(sleep.rect, frame.rect)
    )
    assert after.rect.y > frame.rect.bottom
    ids = groups(to_svg(d))
    assert f"node-{step.node_id}" in ids  # the step's box; its frame has no id of its own
    check_geometry(d)


def test_a_python_step_continues_the_same_way() -> None:
    nodes = graph_of(
        row("0000000a", "CALL", '{"name":"plan.next","args":{}}', left_node="0000000b"),
        row("0000000b", "SQL", "SELECT 1"),
    )
    d = layout("0000000a", nodes, 1)
    assert inside(box_of(d, "SQL").rect, frame_of(d, "continued").rect)


def test_a_map_frames_its_body() -> None:
    root, nodes = build(df.map_("users", df.call("mail.welcome") >> "UPDATE users SET ok", 4))
    d = layout(root, nodes, 1)
    frame = frame_of(d, "map")
    assert frame.label == "MAP 'users' (max 4 at once) · each item"
    assert inside(box_of(d, "CALL").rect, frame.rect) and inside(box_of(d, "SQL").rect, frame.rect)


# -- hostile input ------------------------------------------------------------------------------

HOSTILE = "</text><script>alert(1)</script>&amp;\"'<![CDATA[x]]>"


def test_all_text_is_escaped() -> None:
    nodes = graph_of(
        row("0000000a", "THEN", None, left_node="0000000b", right_node="0000000c"),
        row("0000000b", "SQL", HOSTILE, result_name=HOSTILE, status="failed", error=HOSTILE),
        row("0000000c", "THEN", None, left_node="0000000d", right_node="0000000e"),
        row("0000000d", "HTTP", json.dumps({"method": HOSTILE, "url": HOSTILE})),
        row("0000000e", "THEN", None, left_node=HOSTILE, right_node="0000000f"),
        row("0000000f", "THEN", None, left_node="0000000g", right_node=HOSTILE + "x"),
        row("0000000g", HOSTILE, HOSTILE, status=HOSTILE, inferred_status=HOSTILE),
    )
    nodes[HOSTILE + "x"] = row(HOSTILE + "x", "SQL", "SELECT 1", status="completed")
    svg = draw("0000000a", nodes, 1)
    tree = parse(svg)
    assert not [e for e in tree.iter() if e.tag.split("}")[-1].lower() == "script"]
    assert "<script" not in svg
    titles = [t.text or "" for t in tree.iter(f"{SVG}title")]
    assert any(t.startswith(f"SQL: {HOSTILE}") for t in titles)  # the hostile text, as text
    assert any(f"|=> '{HOSTILE}'" in t for t in titles)
    assert any(f"missing node {HOSTILE}" in t for t in titles)
    texts = "".join(tree.itertext())
    assert "</text><script>alert(1)</script>" in texts
    # Classes never carry the text as it is, and links stay in the page.
    for element in tree.iter():
        assert set(element.attrib.get("class", "")) <= set(
            "abcdefghijklmnopqrstuvwxyz0123456789-_ "
        )
        href = element.attrib.get("href")
        assert href is None or href.startswith("#step-")
    hostile_ids = [g for g in tree.iter(f"{SVG}g") if g.attrib.get("id") == f"node-{HOSTILE}x"]
    assert len(hostile_ids) == 1


def test_characters_xml_cannot_hold_are_replaced() -> None:
    text = "a\x00b\x1bc\ufffe\ud800d\U0001f600"
    root, nodes = build(df.sql(text))
    nodes[root] = replace(nodes[root], result_name="\x07")
    tree = parse(draw(root, nodes, 1))
    assert "SQL: a\ufffdb\ufffdc\ufffd\ufffdd\U0001f600" in "".join(tree.itertext())


def test_status_and_type_classes_are_sanitised() -> None:
    nodes = graph_of(row("0000000a", 'X" onload="alert(1)', None, status="Running Fast!"))
    g = groups(draw("0000000a", nodes, 1))["node-0000000a"]
    assert g.attrib["class"].split() == [
        "node",
        "step",
        "status-running-fast",
        "type-x-onload-alert-1",
    ]
    assert set(g.attrib) == {"id", "class"}


# -- robustness ---------------------------------------------------------------------------------


def drawn_ids(d: Diagram) -> list[str]:
    ids = [b.node_id for b in d.boxes if b.kind not in ("missing", "repeat", "cut")]
    ids += [f.node_id for f in d.frames if f.kind != "continued"]
    return [i for i in ids if i is not None]


def robust(root: str, nodes: dict[str, NodeView]) -> Diagram:
    d = layout(root, nodes, 1)
    assert len(drawn_ids(d)) == len(set(drawn_ids(d)))  # each node once
    check_geometry(d)
    parse(to_svg(d))
    return d


def test_cycles_are_drawn_once() -> None:
    d = robust(
        "0000000a",
        graph_of(
            row("0000000a", "THEN", None, left_node="0000000b", right_node="0000000c"),
            row("0000000b", "SQL", "SELECT 1"),
            row("0000000c", "THEN", None, left_node="0000000b", right_node="0000000a"),
        ),
    )
    assert [b.kind for b in d.boxes] == ["step", "repeat", "repeat"]
    assert the(d.boxes, kind="repeat", node_id="0000000a").label == "→ 0000000a (drawn elsewhere)"
    assert robust("0000000a", graph_of(row("0000000a", "LOOP", None, left_node="0000000a")))
    d = robust(
        "0000000a",
        graph_of(
            row(
                "0000000a",
                "IF",
                '{"condition_node":"0000000a"}',
                left_node="0000000a",
                right_node="0000000a",
            ),
        ),
    )
    assert [b.kind for b in d.boxes] == ["repeat", "decision", "repeat", "repeat"]


def test_a_node_reachable_twice_is_drawn_once() -> None:
    d = robust(
        "0000000a",
        graph_of(
            row("0000000a", "JOIN", None, left_node="0000000b", right_node="0000000b"),
            row("0000000b", "SLEEP", "1"),
        ),
    )
    assert [b.kind for b in d.boxes] == ["fork", "step", "repeat"]


def test_missing_children_become_small_boxes() -> None:
    d = robust(
        "0000000a",
        graph_of(
            row("0000000a", "THEN", None, left_node="0000000b", right_node=None),
            row(
                "0000000b",
                "JOIN",
                '{"extra_nodes":["00000404"]}',
                left_node="0000000c",
                right_node="00000405",
            ),
            row("0000000c", "RETRY", '{"max_attempts":2}'),
        ),
    )
    missing = [b.label for b in d.boxes if b.kind == "missing"]
    assert missing == [
        "missing node",
        "missing node 00000405",
        "missing node 00000404",
        "missing node",
    ]
    assert all(b.rect.h < box_of(d, "JOIN").rect.h + 10 for b in d.boxes if b.kind == "missing")
    d = robust("00000bad", {})
    assert [b.label for b in d.boxes] == ["missing node 00000bad"]
    assert d.notes == ("The root node 00000bad has no row.",)


@pytest.mark.parametrize(
    "node_type",
    [
        "IF",
        "LOOP",
        "JOIN",
        "RETRY",
        "TIMEOUT",
        "MAP",
        "HTTP",
        "SIGNAL",
        "WAIT_SCHEDULE",
        "CALL",
        "BREAK",
        "HTTP_MULTIPART",
    ],
)
@pytest.mark.parametrize(
    "query",
    [
        None,
        "not json",
        "[1, 2]",
        "5",
        '"text"',
        "{}",
        '{"condition_node": 5, "extra_nodes": 5}',
        '{"condition_node": ["x"], "extra_nodes": [["x"], {"y": 1}, 3], "max_attempts": true}',
        '{"url": {"a": [1]}, "method": null, "timeout_seconds": "soon", "retry_on": "x"}',
        "[" * 100_000 + "]" * 100_000,
        '{"n": 1e999, "max_parallel": -1}',
    ],
)
def test_any_config_is_drawn(node_type: str, query: str | None) -> None:
    nodes = graph_of(
        row("0000000a", node_type, query, left_node="0000000b", right_node="0000000c"),
        row("0000000b", "SQL", "SELECT 1"),
        row("0000000c", "SQL", "SELECT 2"),
    )
    d = robust("0000000a", nodes)
    assert "0000000a" in drawn_ids(d)


def test_unknown_types_draw_what_they_point_at() -> None:
    d = robust(
        "0000000a",
        graph_of(
            row(
                "0000000a",
                "FANCY",
                "whatever it holds",
                left_node="0000000b",
                right_node="0000000c",
            ),
            row("0000000b", "SQL", "SELECT 1"),
            row("0000000c", "", None),
        ),
    )
    fancy = box_of(d, "FANCY")
    assert (fancy.kind, fancy.label) == ("step", "FANCY whatever it holds")
    assert frame_of(d, "continued").label == "under FANCY"
    ids = groups(to_svg(d))
    assert "type-fancy" in ids["node-0000000a"].attrib["class"].split()
    assert "type-unknown" in ids["node-0000000c"].attrib["class"].split()


def test_rows_as_read_from_the_database() -> None:
    rows = [
        {
            "node_id": "0000000a",
            "node_type": "SQL",
            "query": "SELECT 1",
            "result_name": None,
            "left_node": None,
            "right_node": None,
            "status": "completed",
            "inferred_status": "completed",
            "status_details": {"execution_id": "i::1"},
            "error": None,
            "started_at": T0,
            "updated_at": T0,
            "result": "{}",
        },
        {
            "id": "0000000b",
            "node_type": "SLEEP",
            "query": "1",
            "status": "pending",
            "status_details": '{"execution_id": "i::1"}',
        },
    ]
    nodes = views(rows)
    assert nodes["0000000a"].status_details == '{"execution_id": "i::1"}'
    assert nodes["0000000b"] == NodeView(
        "0000000b", "SLEEP", "1", status_details='{"execution_id": "i::1"}'
    )
    assert nodes["0000000b"].shown_status == "pending"


# -- size ---------------------------------------------------------------------------------------


def test_long_text_is_cut_to_fit_its_box() -> None:
    long_sql = "SELECT " + ", ".join(f"column_{i}" for i in range(200))
    wide = "SELECT '" + "漢字" * 50 + "'"
    root, nodes = build(df.sql(long_sql).named("n" * 60) >> wide >> df.retry(df.sleep(1), 3))
    d = layout(root, nodes, 1)
    svg = parse(to_svg(d))
    sizes = {"label": 12, "detail": 10, "frame-label": 11}  # px, as the style sets them
    rects = [*(b.rect for b in d.boxes), *(f.rect for f in d.frames)]
    for text in svg.iter(f"{SVG}text"):
        size = sizes.get(text.attrib["class"])
        if size is None:
            continue
        content = text.text or ""
        width = sum(1.2 if "\u4e00" <= c <= "\u9fff" else 0.6 for c in content) * size
        x, y = float(text.attrib["x"]), float(text.attrib["y"])
        within = min(
            (r for r in rects if r.x < x < r.right and r.y < y < r.bottom), key=lambda r: r.w
        )
        assert x + width <= within.right, content
    cut = [t.text for t in svg.iter(f"{SVG}text") if (t.text or "").endswith("…")]
    assert len(cut) == 3  # the long statement, the wide one, the long name
    title = the(d.boxes, node_type="SQL", label=f"SQL: {long_sql}").title
    assert title.startswith(f"SQL: {long_sql[:1900]}")  # tooltips are capped too


def chain(n: int, step: Any) -> df.Node:
    graph = df.as_node(step(0))
    for i in range(1, n):
        graph = graph >> step(i)
    return graph


def test_a_graph_of_a_thousand_nodes_lays_out_quickly() -> None:
    graph = chain(
        101,
        lambda i: (
            df.join(f"SELECT {i}", df.retry(df.sleep(i), 2))
            >> df.if_(f"SELECT {i} > 5", "SELECT 'big'", "SELECT 'small'")
        ),
    )
    root, nodes = build(graph, "completed")
    assert 1000 <= len(nodes) <= MAX_DRAWN
    start = time.perf_counter()
    svg = draw(root, nodes, 1)
    took = time.perf_counter() - start
    assert took < 0.5, took
    d = layout(root, nodes, 1)
    assert d.notes == () and d.drawn == len(nodes)
    check_geometry(d)
    parse(svg)


def test_a_wide_join_of_two_hundred_branches() -> None:
    graph: df.Node = df.as_node("SELECT 0")
    for i in range(1, 200):
        graph = graph & f"SELECT {i}"
    root, nodes = build(graph)
    d = layout(root, nodes, 1)
    assert len([b for b in d.boxes if b.kind == "step"]) == 200
    check_geometry(d)
    root_svg = parse(to_svg(d))
    assert root_svg.attrib["viewBox"] == f"0 0 {d.width} {d.height}"


def test_graphs_beyond_the_limits_are_cut_with_a_note() -> None:
    nodes = graph_of(
        *(
            row(f"{i:08x}", "THEN", None, left_node=f"s{i}", right_node=f"{i + 1:08x}")
            for i in range(5000)
        )
    )
    nodes.update((f"s{i}", row(f"s{i}", "SQL", f"SELECT {i}")) for i in range(5000))
    d = robust(f"{0:08x}", nodes)
    assert d.drawn == MAX_DRAWN
    assert d.boxes[-1].kind == "cut"
    assert d.notes == (f"Only {MAX_DRAWN:,} of the graph's {len(nodes):,} nodes are drawn.",)
    # A (hand-written) JOIN of many branches stops at the limit too, with one placeholder.
    extras = [f"b{i}" for i in range(5000)]
    joins = graph_of(
        row("0000000a", "JOIN", json.dumps({"extra_nodes": extras}), left_node="x", right_node="y"),
        *(row(b, "SLEEP", "1") for b in ["x", "y", *extras]),
    )
    d = robust("0000000a", joins)
    assert d.drawn == MAX_DRAWN
    assert [b.kind for b in d.boxes].count("step") == MAX_DRAWN - 1
    assert [b.kind for b in d.boxes].count("cut") == 1


@pytest.mark.parametrize("node_type", ["LOOP", "RETRY", "IF", "JOIN", "SQL", "FANCY"])
def test_hand_written_graphs_nested_deeper_than_any_valid_one(node_type: str) -> None:
    depth = 1500
    query = (
        '{"max_attempts": 1}'
        if node_type == "RETRY"
        else "SELECT 1"
        if node_type == "SQL"
        else None
    )
    nodes = graph_of(
        *(
            row(
                f"{i:08x}",
                node_type,
                query,
                left_node=f"{i + 1:08x}",
                right_node="leaf" if node_type in ("IF", "JOIN") else None,
            )
            for i in range(depth)
        )
    )
    nodes["leaf"] = row("leaf", "SQL", "SELECT 1")
    d = robust(f"{0:08x}", nodes)
    assert "Nodes nested more than" in d.notes[-1]


def nested(depth: int) -> df.Node:
    """A graph ``depth`` levels deep, every kind of compound node on the way down."""
    wrappers = [
        lambda g: df.loop(g),
        lambda g: df.retry(g, 2),
        lambda g: df.timeout(g, 5),
        lambda g: df.map_("r", g),
        lambda g: df.if_("SELECT true", g, "SELECT 'else'"),
        lambda g: df.join(g, "SELECT 'other'"),
        lambda g: df.race("SELECT 'other'", g),
    ]
    graph = df.as_node("SELECT 'deepest'")
    for i in range(depth):
        graph = wrappers[i % len(wrappers)](graph)
    return graph


def test_a_valid_graph_at_the_depth_limit_is_drawn_whole() -> None:
    root, nodes = build(nested(255))  # the deepest expand (df.start) accepts
    d = layout(root, nodes, 1)
    assert d.notes == () and d.drawn == len(nodes)
    assert the(d.boxes, label="SQL: SELECT 'deepest'")
    check_geometry(d)


def test_the_layout_recurses_little() -> None:
    """A web server calls it with a stack of its own: at the nesting limit, the layout needs
    fewer than 600 frames of Python's default 1,000."""
    root, nodes = build(nested(255))
    continued = graph_of(
        *(row(f"{i:08x}", "SQL", "SELECT 1", left_node=f"{i + 1:08x}") for i in range(400))
    )

    def depth() -> int:
        frame, n = sys._getframe(), 0
        while frame.f_back is not None:
            frame, n = frame.f_back, n + 1
        return n

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth() + 600)
    try:
        draw(root, nodes, 1)
        draw(f"{0:08x}", continued, 1)
    finally:
        sys.setrecursionlimit(limit)


# -- a real instance ----------------------------------------------------------------------------


def test_a_real_instance_drawn_from_df_instance_nodes(app: Any, worker: Any) -> None:
    app.conn.execute("CREATE TABLE app.counter (n int); INSERT INTO app.counter VALUES (0)")
    app.conn.execute("CREATE TABLE app.tries (n int)")
    instance, status = app.run(
        "'SELECT 1 AS one' |=> 'a'"
        " ~> df.join('SELECT 2', df.retry('INSERT INTO app.tries VALUES (1)'"
        "                                 ~> 'SELECT 1 / (count(*) - 1) FROM app.tries', 3, 0))"
        " ~> ('SELECT true' ?> 'SELECT 4' !> 'SELECT 5')"
        " ~> df.loop('UPDATE app.counter SET n = n + 1 RETURNING n' |=> 'c', 'SELECT $c.n < 3')"
    )
    assert status == "completed"
    cur = app.conn.cursor()
    cur.execute(
        "SELECT n.node_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node,"
        "       n.status, n.inferred_status, n.status_details, d.error, d.started_at,"
        "       n.updated_at"
        "  FROM df.instance_nodes(%s) n"
        "  JOIN df.nodes d ON d.instance_id = %s AND d.id = n.node_id",
        (instance, instance),
    )
    columns = [c.name for c in cur.description]
    rows = [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]
    ((root, generation),) = app.conn.execute(
        "SELECT i.root_node, r.generation FROM df.instances i"
        "  JOIN df._runs r ON r.instance_id = i.id WHERE i.id = %s",
        (instance,),
    ).fetchall()
    d = layout(root, views(rows), generation)
    check_geometry(d)
    ids = groups(to_svg(d))
    for r in rows:
        if r["node_type"] != "THEN":
            classes = ids[f"node-{r['node_id']}"].attrib["class"].split()
            assert f"status-{r['inferred_status']}" in classes
    assert the(d.boxes, label="SQL: SELECT 5").muted
    assert not the(d.boxes, label="SQL: SELECT 4").muted
    assert frame_of(d, "loop").label == "LOOP (while) · iteration 3"
    retry = frame_of(d, "retry")
    assert retry.label == "RETRY (max 3 attempts) · attempt 2 of 3"
    assert "attempt 1: SQL execution failed" in retry.title
