"""Pure tests of workflows that grow at run time, df.map and df.continue_with: no database."""

from __future__ import annotations

import json
from typing import Any

import pytest
from interp_sim import G, Sim, rows

from pgdurable.core import interpreter as interp


def map_(g: G, source: str, body: str, parallel: int = 10, **config: Any) -> str:
    cfg = {"source": source, "item": "item", "max_parallel": parallel} | config
    return g.add("MAP", json.dumps(cfg), left=body, config=cfg)


def source_rows(n: int) -> str:
    return rows(*({"id": i} for i in range(1, n + 1)))


def started(sim: Sim, body: str) -> list[str]:
    return [str((t.payload or {}).get("sql")) for t in sim.tasks_of(body)]


def test_items_run_at_most_max_parallel_at_once_and_results_keep_row_order() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = g.sql("UPDATE t SET done = true WHERE id = $item.id")
    m = map_(g, "rows", body, parallel=2)
    sim = Sim(g.graph(g.then(first, m)))
    sim.complete(first, source_rows(5))
    assert started(sim, body) == [
        "UPDATE t SET done = true WHERE id = 1",
        "UPDATE t SET done = true WHERE id = 2",
    ]
    # The second item ends first; the third starts in its place.
    _, two = sim.tasks_of(body)
    sim.complete(body, rows({"n": 2}), task=two)
    assert [s[-1] for s in started(sim, body)] == ["1", "3"]
    while sim.tasks_of(body):
        task = sim.tasks_of(body)[-1]
        assert len(sim.tasks_of(body)) <= 2
        item = json.loads(str((task.payload or {})["sql"]).rsplit(" ", 1)[1])
        sim.complete(body, rows({"n": item}), task=task)
    assert sim.outcome is not None and sim.outcome.status == "completed"
    assert json.loads(sim.outcome.output) == [
        rows({"n": i}) and json.loads(rows({"n": i})) for i in range(1, 6)
    ]


def test_each_item_has_its_own_stamp_and_idempotency_key() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    cfg = {"name": "x.y", "args": {"id": "$item.id"}}
    body = g.add("CALL", json.dumps(cfg), config=cfg)
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body))))
    sim.complete(first, source_rows(3))
    payloads = [t.payload or {} for t in sim.tasks_of(body)]
    assert [p["args"] for p in payloads] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert len({p["idempotency_key"] for p in payloads}) == 3


def test_a_failing_item_fails_the_map_and_cancels_the_others() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = g.sql("SELECT $item.id")
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body, parallel=3))))
    sim.complete(first, source_rows(5))
    _, two, _ = sim.tasks_of(body)
    sim.fail(body, "boom", "23505", task=two)
    assert sim.tasks == {}  # the others were dropped, and no new item started
    assert sim.outcome == interp.Outcome("failed", "df.map item 2 failed: boom")


def test_collect_errors_runs_every_item_and_says_how_each_ended() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = g.sql("SELECT $item.id")
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body, collect_errors=True))))
    sim.complete(first, source_rows(3))
    a, b, c = sim.tasks_of(body)
    sim.fail(body, "boom", task=b)
    sim.complete(body, rows({"v": 3}), task=c)
    sim.complete(body, rows({"v": 1}), task=a)
    assert sim.outcome is not None and json.loads(sim.outcome.output) == [
        {"ok": True, "result": {"rows": [{"v": 1}], "row_count": 1}},
        {"ok": False, "error": "boom"},
        {"ok": True, "result": {"rows": [{"v": 3}], "row_count": 1}},
    ]


def test_a_json_array_is_mapped_element_by_element_and_an_empty_one_gives_an_empty_array() -> None:
    g = G()
    first = g.sql("SELECT 1", name="list")
    body = g.sql("SELECT $item")
    sim = Sim(g.graph(g.then(first, map_(g, "list", body))))
    sim.complete(first, '["a", "b"]')
    # An item that is not a row object stands for its JSON text, as any such result does.
    assert started(sim, body) == ["""SELECT '"a"'""", """SELECT '"b"'"""]

    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = g.sql("SELECT $item.id")
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body))))
    sim.complete(first, rows())
    assert sim.outcome == interp.Outcome("completed", "[]")


def test_a_source_that_is_missing_or_not_a_list_fails_the_map() -> None:
    for result, error in (
        (None, "df.map: result 'nope' not found"),
        ('{"a": 1}', "df.map: result 'nope' is neither a row set nor a JSON array"),
    ):
        g = G()
        first = g.sql("SELECT 1", name="nope" if result else "other")
        sim = Sim(g.graph(g.then(first, map_(g, "nope", g.sql("SELECT 1")))))
        sim.complete(first, result or rows())
        assert sim.outcome == interp.Outcome("failed", error)


def test_names_bound_inside_an_item_stay_in_it() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    inner = g.sql("SELECT $item.id AS v", name="v")
    body = g.then(inner, g.sql("SELECT $v"))
    m = map_(g, "rows", body)
    after = g.sql("SELECT $v?")
    sim = Sim(g.graph(g.then(g.then(first, m), after)))
    sim.complete(first, source_rows(2))
    for task in sim.tasks_of(inner):
        item = str((task.payload or {})["sql"]).split()[1]
        sim.complete(inner, rows({"v": int(item)}), task=task)
    assert started(sim, body) == []
    assert sorted(str((t.payload or {})["sql"]) for t in sim.tasks.values()) == [
        "SELECT 1",
        "SELECT 2",
    ]
    for task in list(sim.tasks.values()):
        sim.complete(task.node_id, rows(), task=task)
    assert sim.sql_of(after) == "SELECT $v?"  # no result of that name out here


# -- steps that return the rest of the workflow ------------------------------------------------


def test_a_step_that_returns_a_graph_runs_it_in_its_place() -> None:
    g = G()
    step = g.sql("SELECT plan", name="planned")
    after = g.sql("SELECT $planned.total")
    sim = Sim(g.graph(g.then(step, after)))
    rest = {
        "node_type": "JOIN",
        "left_node": {"node_type": "SQL", "query": "SELECT 1"},
        "right_node": {"node_type": "SQL", "query": "SELECT 2"},
    }
    transition = interp.step_succeeded(
        sim.graph, sim.state, {}, sim.task(step).activation, rows(), sim.now, continue_with=rest
    )
    assert transition.graph is not None and len(transition.new_nodes) == 3
    join_id = transition.continued[0][1]
    assert transition.continued == [(step, join_id)]
    assert transition.graph[step].left == join_id
    new_sql = [n.id for n in transition.new_nodes if n.type == "SQL"]
    assert sorted(t.node_id for t in transition.tasks) == sorted(new_sql)
    # The graph must be read again by a worker that had it before.
    assert not interp.covers(sim.graph, transition.next_state)
    assert interp.covers(transition.graph, transition.next_state)


def test_only_a_graph_signed_for_the_role_continues_a_sql_step() -> None:
    from pgdurable.core.model import continuation_signature, signed_continuation

    text = json.dumps({"node_type": "SQL", "query": "SELECT 1"})

    def result(signature: str, graph: object = text) -> str:
        return rows({"c": {"df.continue_with": graph, "signature": signature}})

    good = continuation_signature("k", "app", text)
    assert signed_continuation(result(good), "app", "k") == json.loads(text)
    assert signed_continuation(result(good), "other", "k") is None  # another role's
    assert signed_continuation(result(good), "app", "other key") is None
    assert signed_continuation(result(good), "app", "") is None  # no key: nothing continues
    assert signed_continuation(result("0" * 64), "app", "k") is None
    assert signed_continuation(result(good, json.loads(text)), "app", "k") is None
    two_rows = json.dumps({"rows": [{"c": 1}, {"c": 2}], "row_count": 2})
    assert signed_continuation(two_rows, "app", "k") is None


def test_generated_ids_are_new_and_limits_count_the_existing_graph() -> None:
    from pgdurable.core.model import MAX_NODES, GraphError, expand

    g = G()
    step = g.sql("SELECT 1")
    graph = g.graph(step)
    chain: dict[str, Any] = {"node_type": "SQL", "query": "SELECT 0"}
    for _ in range(5):
        chain = {"node_type": "THEN", "left_node": chain, "right_node": chain}
    root, nodes = expand(chain, graph, step, "seed")
    assert len(nodes) == 63 and len({n.id for n in nodes} | set(graph.nodes)) == 64
    assert nodes[0].id == root
    big = dict(graph.nodes) | {f"{i:08x}x": graph.nodes[step] for i in range(MAX_NODES - 10)}
    with pytest.raises(GraphError, match="maximum node count"):
        expand(chain, interp.Graph(graph.instance_id, graph.root, big), step, "seed")
    with pytest.raises(GraphError, match=r"root\.left: left_node is not valid for SQL nodes"):
        bad_leaf = {"node_type": "SQL", "query": "x", "left_node": chain}
        expand({"node_type": "THEN", "left_node": bad_leaf, "right_node": chain}, graph, step, "s")


def test_a_map_of_items_that_end_as_they_start_does_not_recurse() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = map_(g, "nothing", g.sql("SELECT 1"))  # fails at once: no result 'nothing'
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body, parallel=5, collect_errors=True))))
    sim.complete(first, source_rows(3000))
    assert sim.outcome is not None and sim.outcome.status == "completed"
    results = json.loads(sim.outcome.output)
    assert len(results) == 3000 and all(r["ok"] is False for r in results)
