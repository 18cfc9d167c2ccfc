"""Pure tests of df.restart in the interpreter (interp.resume): no database.

A failed instance keeps the state just before its failure; a cancelled one the state it had.
``Sim.restart`` runs that state on, as a worker does with a restart task."""

from __future__ import annotations

import json
from typing import Any

from interp_sim import INSTANCE, G, Sim, rows

from pgdurable.core import interpreter as interp
from pgdurable.core.state import InstanceState, JoinActivation, from_json, to_json


def retry(g: G, body: str, attempts: int) -> str:
    cfg = {"max_attempts": attempts, "backoff_seconds": 1, "max_backoff_seconds": 60}
    return g.add("RETRY", json.dumps(cfg), left=body, config=cfg)


def timeout(g: G, body: str, seconds: float) -> str:
    cfg = {"timeout_seconds": seconds}
    return g.add("TIMEOUT", json.dumps(cfg), left=body, config=cfg)


def signal(g: G, name: str, seconds: float | None = None) -> str:
    cfg = {"signal_name": name, "timeout_seconds": seconds}
    return g.add("SIGNAL", json.dumps(cfg), config=cfg)


def map_(g: G, source: str, body: str, parallel: int = 10, **config: Any) -> str:
    cfg = {"source": source, "item": "item", "max_parallel": parallel} | config
    return g.add("MAP", json.dumps(cfg), left=body, config=cfg)


def runs(sim: Sim) -> list[str]:
    """The steps running now (their tasks), by node."""
    return sim.pending()


def test_a_failed_step_runs_again_with_the_names_bound_before_and_nothing_before_it() -> None:
    g = G()
    a = g.sql("INSERT INTO t VALUES (1) RETURNING 7 AS n", name="a")
    b = g.sql("SELECT $a.n FROM missing")
    c = g.sql("SELECT 3")
    root = g.then(a, b, c)
    sim = Sim(g.graph(root))
    sim.complete(a, rows({"n": 7}))
    sim.fail(b, "relation missing does not exist")
    assert sim.outcome == interp.Outcome("failed", "relation missing does not exist")
    assert sim.status(root) == "failed"

    sim.now += 60
    sim.restart()
    assert runs(sim) == [b]  # a does not run again
    assert sim.sql_of(b) == "SELECT 7 FROM missing"
    assert sim.status(b) == "running" and sim.status(root) == "running"
    assert sim.stamp(b) == f"{INSTANCE}::1"  # the same execution: a stays current
    assert sim.generation == 1
    sim.complete(b)
    sim.complete(c, rows({"x": 3}))
    assert sim.outcome == interp.Outcome("completed", rows({"x": 3}))
    assert [w.node_id for w in sim.writes].count(a) == 2  # running, completed: once


def test_the_state_kept_at_a_failure_is_the_one_before_it() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    sim = Sim(g.graph(g.then(a, b)))
    sim.complete(a)
    before = sim.state
    sim.fail(b, "boom")
    assert sim.state == before


def test_a_join_runs_only_its_failed_branch_again_from_where_it_failed() -> None:
    g = G()
    a = g.sql("SELECT 1", name="a")
    b = g.sql("SELECT $a.v")
    slow = g.sleep(30)
    other = g.sql("SELECT 'other'", name="o")
    j = g.join(g.then(a, b), g.then(slow, other))
    after = g.sql("SELECT $o.w")
    sim = Sim(g.graph(g.then(j, after)))
    sim.complete(a, rows({"v": 1}))
    sim.fail(b, "boom")
    assert sim.outcome is None  # the JOIN waits for its other branch
    sim.fire(slow)
    sim.complete(other, rows({"w": 2}))
    assert sim.outcome == interp.Outcome("failed", "JOIN branch 1 failed: boom")

    sim.restart()
    assert runs(sim) == [b]  # neither a nor the other branch runs again
    assert sim.sql_of(b) == "SELECT 1"
    assert sim.status(j) == "running"
    sim.complete(b, rows({"b": 1}))
    assert sim.sql_of(after) == "SELECT 2"  # the names of the branch that completed
    sim.complete(after)
    assert sim.outcome is not None and sim.outcome.status == "completed"
    assert sim.result(j) == [
        {"rows": [{"b": 1}], "row_count": 1},
        {"rows": [{"w": 2}], "row_count": 1},
    ]


def test_a_timeout_around_a_join_gets_its_whole_duration_and_the_wait_waits_again() -> None:
    g = G()
    bad = g.sql("SELECT broken")
    wait = signal(g, "go")
    t = timeout(g, g.join(bad, wait), 10)
    sim = Sim(g.graph(t), now=1000)
    sim.fail(bad, "broken")
    sim.fire(t)  # the branch waiting for its signal was still running
    assert sim.outcome is not None
    assert sim.outcome.output.startswith("Timed out after 10s")

    sim.now = 5000
    sim.restart()
    assert runs(sim) == sorted([bad, wait, t])
    assert sim.task(t).run_at == 5010
    assert sim.task(bad).payload == {"sql": "SELECT broken", "deadline": 5010}
    assert sim.status(wait) == "running"
    sim.complete(bad)
    task = sim.task(wait)
    del sim.tasks[task.activation]
    sim._apply(interp.signal_received(sim.graph, sim.state, {}, task.activation, 1, sim.now))
    assert sim.outcome is not None and sim.outcome.status == "completed"
    assert t not in sim.pending()  # its timer went


def test_a_cancelled_sleep_sleeps_its_whole_duration_again() -> None:
    g = G()
    a, nap, b = g.sql("SELECT 1"), g.sleep(100), g.sql("SELECT 2")
    sim = Sim(g.graph(g.then(a, nap, b)), now=1000)
    sim.complete(a)
    assert sim.task(nap).run_at == 1100
    sim.cancel()
    sim.now = 1050
    sim.restart()
    assert runs(sim) == [nap]
    assert sim.task(nap).run_at == 1150
    sim.fire(nap)
    sim.complete(b)
    assert sim.outcome is not None and sim.outcome.status == "completed"


def test_a_retry_counts_its_attempts_afresh() -> None:
    g = G()
    step = g.add("CALL", '{"name": "x.y", "args": {}}', config={"name": "x.y", "args": {}})
    r = retry(g, step, 2)
    sim = Sim(g.graph(r))
    key = (sim.task(step).payload or {})["idempotency_key"]
    sim.fail(step, "one", "python")
    sim.fire(r)
    assert (sim.task(step).payload or {})["attempt"] == 2
    sim.fail(step, "two", "python")
    assert sim.outcome == interp.Outcome("failed", "two")

    sim.restart()
    payload = sim.task(step).payload or {}
    assert payload["attempt"] == 1 and payload["idempotency_key"] == key
    sim.fail(step, "three", "python")
    assert sim.outcome is None  # a second attempt is still to come
    sim.fire(r)
    assert (sim.task(step).payload or {})["attempt"] == 2
    sim.fail(step, "four", "python")
    assert sim.outcome == interp.Outcome("failed", "four")
    errors = [w.error for w in sim.writes if w.node_id == r and w.error]
    assert ("append", interp.RESTARTED) in errors


def test_a_retry_cancelled_during_its_backoff_tries_again_at_once() -> None:
    g = G()
    step = g.sql("SELECT 1")
    r = retry(g, step, 5)
    sim = Sim(g.graph(r))
    sim.fail(step, "one")
    assert runs(sim) == [r]  # backing off
    sim.cancel()
    sim.restart()
    assert runs(sim) == [step]


def test_a_loop_resumes_in_the_iteration_it_was_in() -> None:
    g = G()
    a, b = g.sql("SELECT a"), g.sql("SELECT b")
    loop = g.loop(g.then(a, b), g.sql("SELECT true"))
    sim = Sim(g.graph(loop))
    sim.complete(a)
    sim.complete(b)
    sim.complete(sim.pending()[0], rows({"c": True}))  # the condition
    sim.fire(loop)
    sim.complete(a)
    assert sim.generation == 2
    sim.fail(b, "boom")
    sim.restart()
    assert runs(sim) == [b]
    assert sim.stamp(b) == f"{INSTANCE}::2" and sim.generation == 2


def test_a_loop_cancelled_between_iterations_goes_on_with_the_next() -> None:
    g = G()
    a = g.sql("SELECT a")
    loop = g.loop(a)
    sim = Sim(g.graph(loop), now=1000)
    sim.complete(a)
    assert runs(sim) == [loop]  # the 1 s between iterations
    sim.cancel()
    sim.now = 2000
    sim.restart()
    sim.fire(loop)
    assert runs(sim) == [a] and sim.generation == 2


def test_a_map_runs_only_the_items_that_had_not_completed() -> None:
    g = G()
    first = g.sql("SELECT ids", name="rows")
    body = g.sql("SELECT $item.id")
    sim = Sim(g.graph(g.then(first, map_(g, "rows", body, parallel=2))))
    sim.complete(first, rows(*({"id": i} for i in range(1, 5))))
    one, two = sim.tasks_of(body)
    sim.complete(body, rows({"n": 1}), task=one)
    three = sim.tasks_of(body)[1]
    assert (three.payload or {})["sql"] == "SELECT 3"
    sim.fail(body, "boom", task=two)
    assert sim.outcome == interp.Outcome("failed", "df.map item 2 failed: boom")

    sim.restart()
    assert [(t.payload or {})["sql"] for t in sim.tasks_of(body)] == ["SELECT 2", "SELECT 3"]
    while sim.tasks_of(body):
        task = sim.tasks_of(body)[0]
        n = int(str((task.payload or {})["sql"]).split()[1])
        sim.complete(body, rows({"n": n}), task=task)
    assert sim.outcome is not None and sim.outcome.status == "completed"
    assert [r["rows"][0]["n"] for r in json.loads(sim.outcome.output)] == [1, 2, 3, 4]


def test_a_race_runs_both_branches_again() -> None:
    g = G()
    a, b = g.sql("SELECT a"), signal(g, "go", 60)
    sim = Sim(g.graph(g.race(a, b)), now=0)
    sim.fail(a, "boom")
    assert sim.outcome is not None
    sim.now = 100
    sim.restart()
    assert runs(sim) == sorted([a, b])
    assert sim.task(b).run_at == 160


def test_nested_joins_run_their_failed_branches_again() -> None:
    g = G()
    a, b, c, d = g.sql("SELECT a"), g.sql("SELECT b"), g.sql("SELECT c"), g.sql("SELECT d")
    inner = g.join(g.then(a, b), c)
    outer = g.join(inner, d)
    sim = Sim(g.graph(outer))
    sim.complete(a)
    sim.fail(b, "b failed")
    sim.complete(c)  # the inner JOIN fails, in a branch of the outer one, which waits
    joins = [x for x in sim.state.acts.values() if isinstance(x, JoinActivation)]
    assert [len(j.suspended) for j in joins] == [1]
    assert from_json(json.loads(json.dumps(to_json(sim.state)))) == sim.state
    sim.fail(d, "d failed")
    assert sim.outcome is not None
    sim.restart()
    assert runs(sim) == sorted([b, d])
    sim.complete(b)
    sim.complete(d)
    assert sim.outcome is not None and sim.outcome.status == "completed"


def test_http_and_python_steps_keep_their_idempotency_keys() -> None:
    g = G()
    cfg = {"url": "https://example.com/x", "method": "POST", "body": None, "headers": None}
    h = g.add("HTTP", json.dumps(cfg), config=cfg)
    sim = Sim(g.graph(h))
    before = sim.task(h).payload
    sim.fail(h, "HTTP 503", "http_5xx")
    sim.restart()
    assert sim.task(h).payload == before


def test_a_step_that_fails_as_it_begins_fails_again_and_can_be_restarted_again() -> None:
    g = G()
    a = g.sql("SELECT 1")
    b = g.if_rows("missing", g.sql("SELECT 2"), g.sql("SELECT 3"))
    sim = Sim(g.graph(g.then(a, b)))
    sim.complete(a)
    assert sim.outcome is not None and "missing" in sim.outcome.output
    kept = sim.state
    sim.restart()
    assert sim.outcome is not None and "missing" in sim.outcome.output
    assert sim.state == kept


def test_an_instance_that_never_ran_starts_from_the_beginning() -> None:
    g = G()
    a = g.sql("SELECT 1")
    t = interp.resume(g.graph(a), None, {}, 5)
    assert [x.node_id for x in t.tasks] == [a] and t.outcome is None


def test_a_state_without_activations_is_not_restarted() -> None:
    g = G()
    a = g.sql("SELECT 1")
    empty = InstanceState.initial(INSTANCE)
    t = interp.resume(g.graph(a), empty, {}, 5)
    assert t.outcome == interp.Outcome("failed", interp.NOTHING_TO_RESTART)
    assert t.tasks == []
