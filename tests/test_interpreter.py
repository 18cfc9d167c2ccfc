"""Pure tests of the graph interpreter: no database, no worker.

``Sim`` (tests/interp_sim.py) plays the worker. Tests complete, fail or fire tasks by node id
and check what the interpreter decided.
"""

from __future__ import annotations

import itertools
import json

import pytest
from interp_sim import INSTANCE, G, Sim, rows

from pgdurable.core import interpreter as interp
from pgdurable.core.state import StateFormatError, from_json
from pgdurable.worker.change import change_of

# -- SQL and THEN --------------------------------------------------------------------------------


def test_single_sql_step_completes_with_its_result() -> None:
    g = G()
    a = g.sql("SELECT 42 AS answer")
    sim = Sim(g.graph(a))
    assert sim.pending() == [a]
    assert sim.status(a) == "running"
    assert sim.sql_of(a) == "SELECT 42 AS answer"
    sim.complete(a, rows({"answer": 42}))
    assert sim.outcome == interp.Outcome("completed", rows({"answer": 42}))
    assert sim.status(a) == "completed"
    assert sim.result(a) == {"rows": [{"answer": 42}], "row_count": 1}
    assert sim.stamp(a) == f"{INSTANCE}::1"


def test_then_runs_right_after_left_and_returns_right_result() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    root = g.then(a, b)
    sim = Sim(g.graph(root))
    assert sim.pending() == [a]
    sim.complete(a, rows({"x": 1}))
    assert sim.pending() == [b]
    sim.complete(b, rows({"x": 2}))
    assert sim.outcome and sim.outcome.output == rows({"x": 2})
    assert sim.result(root) == {"rows": [{"x": 2}], "row_count": 1}


def test_failure_stops_the_sequence_and_fails_every_ancestor() -> None:
    g = G()
    a, b, c = g.sql("SELECT 1"), g.sql("SELECT broken"), g.sql("SELECT 3")
    root = g.then(a, b, c)
    sim = Sim(g.graph(root))
    sim.complete(a)
    sim.fail(b, "SQL execution failed: boom")
    assert sim.outcome == interp.Outcome("failed", "SQL execution failed: boom")
    assert sim.status(c) is None  # never started
    for node in (b, root):
        assert sim.status(node) == "failed"
        assert sim.result(node) == "SQL execution failed: boom"


def test_named_result_is_substituted_into_later_steps() -> None:
    g = G()
    a = g.sql("SELECT 7 AS n, 'it''s' AS s", name="x")
    b = g.sql("SELECT $x + 1, $x.s, {greeting}, {sys_instance_id}, {sys_label}")
    sim = Sim(g.graph(g.then(a, b), label="lbl"), variables={"greeting": "'hi'"})
    sim.complete(a, rows({"n": 7, "s": "it's"}))
    assert sim.sql_of(b) == f"SELECT 7 + 1, 'it''s', 'hi', {INSTANCE}, lbl"


def test_substitution_error_fails_the_step_before_it_runs() -> None:
    g = G()
    a = g.sql("SELECT 1 WHERE false", name="x")
    b = g.sql("SELECT $x")
    sim = Sim(g.graph(g.then(a, b)))
    sim.complete(a, rows())
    assert sim.outcome and sim.outcome.status == "failed"
    assert "has no rows" in sim.outcome.output
    assert sim.status(b) == "failed"


def test_a_statement_too_large_once_substituted_fails_before_it_runs() -> None:
    g = G()
    a = g.sql("SELECT repeat('x', 200) AS v", name="x")
    b = g.sql("SELECT $x AS again")
    sim = Sim(g.graph(g.then(a, b)), max_statement_bytes=100)
    sim.complete(a, rows({"v": "x" * 200}))
    assert sim.outcome == interp.Outcome(
        "failed",
        "SQL step statement too large after substitution: more than 100 bytes"
        " (pg_durable.max_result_bytes)",
    )
    assert sim.status(b) == "failed"
    # Counted in bytes, not characters; below the limit it runs.
    sim = Sim(g.graph(g.then(a, b)), max_statement_bytes=100)
    sim.complete(a, rows({"v": "é" * 45}))  # 63 characters, 108 bytes
    assert sim.outcome and sim.outcome.status == "failed"
    sim = Sim(g.graph(g.then(a, b)), max_statement_bytes=100)
    sim.complete(a, rows({"v": "x" * 40}))
    assert sim.pending() == [b]


def test_named_then_binds_the_right_result() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    named = g.then(a, b, name="t")
    c = g.sql("SELECT $t")
    sim = Sim(g.graph(g.then(named, c)))
    sim.complete(a, rows({"v": 1}))
    sim.complete(b, rows({"v": 2}))
    assert sim.sql_of(c) == "SELECT 2"


# -- IF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "taken"),
    [
        (rows({"ok": True}), "then"),
        (rows({"ok": False}), "else"),
        (rows(), "else"),
        (rows({"n": "0.00"}), "else"),
        (rows({"n": "yes"}), "then"),
        (rows({"n": None}), "else"),
    ],
)
def test_if_takes_the_branch_the_condition_says(condition: str, taken: str) -> None:
    g = G()
    cond, then, else_ = g.sql("SELECT c"), g.sql("SELECT 'then'"), g.sql("SELECT 'else'")
    root = g.if_(cond, then, else_)
    sim = Sim(g.graph(root))
    assert sim.pending() == [cond]
    sim.complete(cond, condition)
    expected, other = (then, else_) if taken == "then" else (else_, then)
    assert sim.pending() == [expected]
    sim.complete(expected, rows({"branch": taken}))
    assert sim.status(other) is None
    assert sim.result(root) == {"rows": [{"branch": taken}], "row_count": 1}


def test_if_condition_failure_fails_the_if() -> None:
    g = G()
    root = g.if_(g.sql("SELECT x"), g.sql("SELECT 1"), g.sql("SELECT 2"))
    sim = Sim(g.graph(root))
    sim.fail(g.graph(root)[root].condition or "", "bad")
    assert sim.outcome == interp.Outcome("failed", "bad")


@pytest.mark.parametrize(
    ("result", "expect"),
    [
        (rows({"a": 1}), "then"),
        (rows(), "else"),
        ('{"status":200}', "df.if_rows: result 'r' is not a SQL result (missing row_count)"),
        ("not json", "df.if_rows: invalid result JSON"),
    ],
)
def test_if_rows_branches_on_row_count(result: str, expect: str) -> None:
    g = G()
    a = g.sql("SELECT ...", name="r")
    then, else_ = g.sql("SELECT 'then'"), g.sql("SELECT 'else'")
    sim = Sim(g.graph(g.then(a, g.if_rows("r", then, else_))))
    sim.complete(a, result)
    if expect in ("then", "else"):
        assert sim.pending() == [then if expect == "then" else else_]
    else:
        assert sim.outcome and sim.outcome.output.startswith(expect)


def test_if_rows_with_unknown_name_fails() -> None:
    g = G()
    sim = Sim(g.graph(g.if_rows("nope", g.sql("SELECT 1"), g.sql("SELECT 2"))))
    assert sim.outcome == interp.Outcome("failed", "df.if_rows: result 'nope' not found")


# -- JOIN ----------------------------------------------------------------------------------------


def test_join_runs_branches_together_and_returns_results_in_branch_order() -> None:
    g = G()
    a, b, c = g.sql("SELECT 1"), g.sql("SELECT 2"), g.sleep(5)
    root = g.join(a, b, c)
    sim = Sim(g.graph(root))
    assert sim.pending() == sorted([a, b, c])
    sim.complete(b, rows({"b": 2}))
    sim.fire(c)
    assert sim.outcome is None
    sim.complete(a, rows({"a": 1}))
    assert sim.outcome is not None
    assert json.loads(sim.outcome.output) == [
        {"rows": [{"a": 1}], "row_count": 1},
        {"rows": [{"b": 2}], "row_count": 1},
        {"slept": True, "seconds": 5},
    ]
    assert sim.outcome.output.startswith('[{"rows":[{"a":1}]')  # compact


def test_join_waits_for_all_then_reports_first_failed_branch() -> None:
    g = G()
    a, b, c = g.sql("SELECT 1"), g.sql("SELECT x"), g.sql("SELECT y")
    root = g.join(a, b, c)
    sim = Sim(g.graph(root))
    sim.fail(c, "third")
    sim.fail(b, "second")
    assert sim.outcome is None
    sim.complete(a)
    assert sim.outcome == interp.Outcome("failed", "JOIN branch 2 failed: second")
    assert sim.result(root) == "JOIN branch 2 failed: second"


def test_join_branches_see_names_from_before_the_fork_but_not_each_other() -> None:
    g = G()
    first = g.sql("SELECT 1", name="before")
    left = g.then(g.sql("SELECT 'l'", name="mine"), g.sql("SELECT $before, $mine"))
    right = g.sql("SELECT $mine?")
    after = g.sql("SELECT $mine")
    root = g.then(first, g.join(left, right), after)
    sim = Sim(g.graph(root))
    sim.complete(first, rows({"v": 1}))
    right_sql = sim.sql_of(right)
    (left_first,) = [n for n in sim.pending() if n != right]
    sim.complete(left_first, rows({"v": "l"}))
    assert right_sql == "SELECT $mine?"  # unknown names are left as they are
    (left_second,) = [n for n in sim.pending() if n != right]
    assert sim.sql_of(left_second) == "SELECT 1, 'l'"
    sim.complete(left_second)
    sim.complete(right)
    assert sim.sql_of(after) == "SELECT 'l'"  # merged back after the join


def test_join_branches_get_their_own_execution_stamps() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    root = g.join(a, b)
    sim = Sim(g.graph(root))
    assert sim.stamp(root) == f"{INSTANCE}::1"
    assert sim.stamp(a) == f"{INSTANCE}::1::{a}::1"
    assert sim.stamp(b) == f"{INSTANCE}::1::{b}::1"


# -- RACE ----------------------------------------------------------------------------------------


def test_race_first_finisher_wins_and_loser_tasks_are_dropped() -> None:
    g = G()
    slow = g.then(g.sql("SELECT slow"), g.sql("SELECT never"))
    fast = g.sleep(1)
    root = g.race(slow, fast)
    sim = Sim(g.graph(root))
    assert len(sim.pending()) == 2
    sim.fire(fast)
    assert sim.outcome == interp.Outcome("completed", '{"slept": true, "seconds": 1}')
    assert sim.tasks == {}
    never = g.graph(root)[slow].right
    assert sim.status(never or "") is None


def test_race_failure_of_first_finisher_fails_the_race() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    sim = Sim(g.graph(g.race(a, b)))
    sim.fail(b, "nope")
    assert sim.outcome == interp.Outcome("failed", "RACE right branch failed: nope")
    assert sim.tasks == {}


def test_race_losing_loop_is_stamped_failed() -> None:
    g = G()
    looping = g.loop(g.sql("SELECT tick"))
    root = g.race(looping, g.sql("SELECT winner"))
    sim = Sim(g.graph(root))
    sim.complete(g.graph(root)[root].right or "")
    assert sim.status(looping) == "failed"
    assert sim.result(looping) == interp.LOOP_LOST_RACE
    assert sim.outcome and sim.outcome.status == "completed"


def test_race_decided_during_activation_never_starts_the_other_branch() -> None:
    g = G()
    body = g.race(g.brk("out"), g.sql("SELECT never"))
    looping = g.loop(body)
    sim = Sim(g.graph(looping))
    assert sim.outcome == interp.Outcome("completed", '"out"')
    assert sim.tasks == {}


# -- LOOP and BREAK ------------------------------------------------------------------------------


def test_loop_iterates_until_break_and_returns_the_break_value() -> None:
    g = G()
    work = g.sql("SELECT n", name="r")
    check = g.if_(g.sql("SELECT $r.n >= 3"), g.brk('{"k": 1}'), g.sql("SELECT 'again'"))
    looping = g.loop(g.then(work, check))
    sim = Sim(g.graph(looping))
    for n in (1, 2, 3):
        sim.complete(work, rows({"n": n}))
        cond = g.graph(looping)[check].condition or ""
        assert sim.sql_of(cond) == f"SELECT {n} >= 3"
        sim.complete(cond, rows({"?column?": n >= 3}))
        if n < 3:
            again = g.graph(looping)[check].right or ""
            sim.complete(again)
            assert sim.task(looping).kind == "timer"  # quick iteration padded to 1 s
            sim.fire(looping)
            assert sim.generation == n + 1
            assert sim.stamp(work) == f"{INSTANCE}::{n + 1}"  # re-stamped in the new generation
    assert sim.outcome == interp.Outcome("completed", '{"k":1}')
    assert sim.status(looping) == "completed"


def test_slow_iteration_is_not_padded() -> None:
    g = G()
    body = g.sql("SELECT 1")
    looping = g.loop(body)
    sim = Sim(g.graph(looping))
    sim.now += 5
    sim.complete(body)
    assert sim.pending() == [body]
    assert sim.stamp(body) == f"{INSTANCE}::2"


def test_while_loop_stops_when_condition_is_false_with_last_body_result() -> None:
    g = G()
    body, cond = g.sql("SELECT n"), g.sql("SELECT more")
    looping = g.loop(body, cond)
    sim = Sim(g.graph(looping))
    sim.complete(body, rows({"n": 1}))
    sim.complete(cond, rows({"more": True}))
    sim.fire(looping)
    sim.complete(body, rows({"n": 2}))
    sim.complete(cond, rows({"more": False}))
    assert sim.outcome == interp.Outcome("completed", rows({"n": 2}))


def test_root_loop_forgets_names_between_iterations() -> None:
    g = G()
    first, second = g.sql("SELECT $x?"), g.sql("SELECT 1", name="x")
    looping = g.loop(g.then(first, second))
    sim = Sim(g.graph(looping))
    assert sim.sql_of(first) == "SELECT $x?"
    sim.complete(first)
    sim.complete(second, rows({"v": 5}))
    sim.fire(looping)
    assert sim.sql_of(first) == "SELECT $x?"  # unknown again: the map was reset


def test_nested_loop_keeps_names_across_iterations_and_break_exits_inner_only() -> None:
    g = G()
    counter = g.sql("SELECT $c.n? AS prev", name="c")
    inner = g.loop(g.then(counter, g.brk("inner")), name="inner_result")
    after = g.sql("SELECT $inner_result")
    outer = g.loop(g.then(inner, after))
    sim = Sim(g.graph(outer))
    assert sim.sql_of(counter) == "SELECT $c.n? AS prev"
    sim.complete(counter, rows({"n": 1}))
    assert sim.status(inner) == "completed"
    assert sim.sql_of(after) == "SELECT '\"inner\"'"
    assert sim.stamp(counter) == f"{INSTANCE}::1::{inner}::1"
    sim.complete(after)
    sim.fire(outer)
    assert sim.sql_of(counter) == "SELECT $c.n? AS prev"  # the root loop reset the names


def test_break_inside_join_exits_loop_after_all_branches() -> None:
    g = G()
    slow = g.sql("SELECT slow")
    looping = g.loop(g.join(g.brk("b"), slow))
    sim = Sim(g.graph(looping))
    assert sim.outcome is None
    sim.complete(slow)
    assert sim.outcome == interp.Outcome("completed", '"b"')


def test_break_outside_a_loop_fails_the_instance() -> None:
    g = G()
    root = g.then(g.sql("SELECT 1"), g.brk())
    sim = Sim(g.graph(root))
    sim.complete(g.graph(root)[root].left or "")
    assert sim.outcome == interp.Outcome("failed", interp.BREAK_OUTSIDE_LOOP)
    assert sim.status(root) == "failed"


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(None, "null"), ("done", '"done"'), ('{"a": [1, 2]}', '{"a":[1,2]}'), ("42", "42")],
)
def test_break_value_encoding(value: str | None, encoded: str) -> None:
    g = G()
    sim = Sim(g.graph(g.loop(g.brk(value))))
    assert sim.outcome == interp.Outcome("completed", encoded)


def test_loop_iteration_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interp, "MAX_LOOP_ITERATIONS", 3)
    g = G()
    body = g.sql("SELECT 1")
    sim = Sim(g.graph(g.loop(body)))
    for _ in range(3):
        sim.now += 2
        sim.complete(body)
    assert sim.outcome == interp.Outcome("failed", interp.LOOP_LIMIT)


def test_loop_in_join_branch_iterates_its_branch_execution() -> None:
    g = G()
    body = g.sql("SELECT 1")
    looping = g.loop(g.then(body, g.brk()))
    root = g.join(looping, g.sql("SELECT 2"))
    sim = Sim(g.graph(root))
    assert sim.stamp(body) == f"{INSTANCE}::1::{looping}::1"


# -- SLEEP and others ----------------------------------------------------------------------------


def test_sleep_sets_a_timer_and_results_in_slept_json() -> None:
    g = G()
    s = g.sleep(30)
    sim = Sim(g.graph(s), now=100.0)
    assert sim.task(s).run_at == 130.0
    sim.fire(s)
    assert sim.outcome == interp.Outcome("completed", '{"slept": true, "seconds": 30}')


def test_sleep_never_binds_its_name() -> None:
    g = G()
    s = g.add("SLEEP", "0", result_name="z")
    after = g.sql("SELECT $z?")
    sim = Sim(g.graph(g.then(s, after)))
    sim.fire(s)
    assert sim.sql_of(after) == "SELECT $z?"


def test_stale_events_are_ignored() -> None:
    g = G()
    a = g.sql("SELECT 1")
    sim = Sim(g.graph(a))
    t = interp.step_succeeded(sim.graph, sim.state, {}, 999, rows(), sim.now)
    assert t.writes == [] and t.tasks == [] and t.outcome is None


def test_deep_sequence_does_not_exhaust_the_stack() -> None:
    g = G()
    steps = [g.sql(f"SELECT {i}") for i in range(257)]
    root = g.then(*steps)  # 256 nested THEN nodes
    sim = Sim(g.graph(root))
    for step in steps:
        sim.complete(step)
    assert sim.outcome and sim.outcome.status == "completed"


def test_state_stays_small_as_a_loop_runs() -> None:
    g = G()
    body = g.sql("SELECT 1", name="x")
    sim = Sim(g.graph(g.loop(body)))
    sizes = []
    for _ in range(50):
        sim.now += 2
        sim.complete(body)
        sizes.append(len(json.dumps(sim.stored)))
    assert max(sizes) - min(sizes) < 16  # only counters grow, by a digit or two


def test_nested_loop_iterates_across_its_padding_timer() -> None:
    g = G()
    body = g.sql("SELECT n")
    inner = g.loop(g.then(body, g.if_(g.sql("SELECT done"), g.brk("x"), g.sql("SELECT 1"))))
    root = g.then(g.sql("SELECT first"), inner)
    sim = Sim(g.graph(root))
    sim.complete(g.graph(root)[root].left or "")
    check = g.graph(root)[g.graph(root)[inner].left or ""].right or ""
    cond = g.graph(root)[check].condition or ""
    for n in (1, 2):
        sim.complete(body, rows({"n": n}))
        sim.complete(cond, rows({"done": n == 2}))
        if n == 1:
            sim.complete(g.graph(root)[check].right or "")
            sim.fire(inner)  # the inner loop's own execution survives the wait
            assert sim.stamp(body) == f"{INSTANCE}::1::{inner}::2"
    assert sim.outcome == interp.Outcome("completed", '"x"')


# -- waits: signals and schedules ---------------------------------------------------------------


def test_signal_wait_creates_a_wait_task_with_its_deadline() -> None:
    g = G()
    w = g.add(
        "SIGNAL",
        '{"signal_name":"go","timeout_seconds":30}',
        config={"signal_name": "go", "timeout_seconds": 30},
    )
    sim = Sim(g.graph(w), now=100.0)
    task = sim.task(w)
    assert (task.kind, task.run_at, task.payload) == (
        "signal",
        130.0,
        {"signal_name": "go", "deadline": 130.0},
    )


def test_signal_received_and_timed_out_results() -> None:
    g = G()
    cfg = {"signal_name": "go", "timeout_seconds": None}
    a = g.add("SIGNAL", json.dumps(cfg), config=cfg, result_name="s")
    b = g.add("SIGNAL", json.dumps(cfg), config=cfg)
    after = g.sql("SELECT $s.data, $s.timed_out")
    sim = Sim(g.graph(g.then(g.then(a, b), after)))
    task = sim.task(a)
    assert task.run_at is None  # no timeout: waits for ever
    del sim.tasks[task.activation]
    sim._apply(interp.signal_received(sim.graph, sim.state, {}, task.activation, {"ok": 1}, 5))
    assert sim.result(a) == {"signal_name": "go", "timed_out": False, "data": {"ok": 1}}
    task = sim.task(b)
    del sim.tasks[task.activation]
    sim._apply(interp.signal_timed_out(sim.graph, sim.state, {}, task.activation, 9))
    assert sim.result(b) == {"signal_name": "go", "timed_out": True, "data": None}
    assert sim.sql_of(after) == "SELECT '{\"ok\":1}', false"


def test_stale_signal_events_are_ignored() -> None:
    g = G()
    a = g.sql("SELECT 1")
    sim = Sim(g.graph(a))
    t = interp.signal_received(sim.graph, sim.state, {}, 999, None, sim.now)
    assert t.writes == [] and t.tasks == [] and t.outcome is None


def test_wait_schedule_sleeps_until_the_next_tick() -> None:
    g = G()
    cfg = {"cron_expr": "*/5 * * * *"}
    w = g.add("WAIT_SCHEDULE", json.dumps(cfg), config=cfg, result_name="ignored")
    after = g.sql("SELECT $ignored?")
    start = 1767225630.0  # 2026-01-01T00:00:30Z
    sim = Sim(g.graph(g.then(w, after)), now=start)
    assert sim.task(w).run_at == 1767225900.0  # 00:05:00
    sim.fire(w)
    assert sim.result(w) == {"scheduled": True}
    assert sim.sql_of(after) == "SELECT $ignored?"  # WAIT_SCHEDULE never binds its name


def test_wait_schedule_with_a_bad_expression_fails_the_step() -> None:
    g = G()
    cfg = {"cron_expr": "61 * * * *"}
    sim = Sim(g.graph(g.add("WAIT_SCHEDULE", json.dumps(cfg), config=cfg)))
    assert sim.outcome is not None and sim.outcome.status == "failed"
    assert sim.outcome.output.startswith("Invalid cron expression '61 * * * *': ")


def test_schedule_loop_keeps_its_cadence_without_drift() -> None:
    g = G()
    cfg = {"cron_expr": "*/5 * * * *"}
    w = g.add("WAIT_SCHEDULE", json.dumps(cfg), config=cfg)
    work = g.sql("SELECT 1")
    looping = g.loop(g.then(w, work))
    sim = Sim(g.graph(looping), now=1767225630.0)
    ticks = []
    for _ in range(5):
        ticks.append(sim.task(w).run_at)
        sim.fire(w)
        sim.now += 7  # the work takes a while (so no 1 s padding); the ticks must not shift
        sim.complete(work)
    assert [b - a for a, b in itertools.pairwise(ticks)] == [300.0] * 4


# -- the stored state ----------------------------------------------------------------------------


def test_a_root_loop_says_which_execution_ended_with_which_result() -> None:
    """Monitoring's execution history comes from this fact, not from reading the state."""
    g = G()
    body = g.sql("SELECT n")
    looping = g.loop(body)
    sim = Sim(g.graph(looping))
    sim.complete(body, rows({"n": 1}))
    assert sim.ended_executions == []  # the next iteration waits for its padding timer
    sim.fire(looping)
    assert sim.generation == 2
    assert sim.ended_executions == [interp.EndedExecution(1, rows({"n": 1}))]
    sim.complete(body, rows({"n": 2}))
    sim.fire(looping)
    assert sim.ended_executions[1:] == [interp.EndedExecution(2, rows({"n": 2}))]


def test_a_nested_loop_ends_no_root_execution() -> None:
    g = G()
    first, body = g.sql("SELECT 0"), g.sql("SELECT 1")
    inner = g.loop(body)
    sim = Sim(g.graph(g.then(first, inner)))
    sim.complete(first)
    sim.complete(body)
    sim.fire(inner)
    assert sim.ended_executions == [] and sim.generation == 1


def test_a_state_of_another_format_is_refused() -> None:
    g = G()
    sim = Sim(g.graph(g.sql("SELECT 1")))
    assert from_json(sim.stored) == sim.state
    with pytest.raises(StateFormatError, match="format 1"):
        from_json({**sim.stored, "format": 1})
    assert from_json({}) is None and from_json(None) is None


def test_a_malformed_state_is_refused() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    sim = Sim(g.graph(g.join(a, b)))
    sim.complete(a)
    join = next(x for x in sim.stored["acts"].values() if x.get("kind") == "join")
    assert join["done"][0][:2] == ["ok", rows()]
    join["done"][0] = join["done"][0][:2]  # [kind, value]: no failure code
    with pytest.raises(StateFormatError):
        from_json(sim.stored)
    join["done"][0] = None
    join["exec"] = str(join["exec"])
    with pytest.raises(StateFormatError, match="activation"):
        from_json(sim.stored)


# -- chain: a start and its first step written by one checkpoint ----------------------------------


def _start_then_step(graph: G, root: str, result: str) -> tuple[interp.Transition, int]:
    built = graph.graph(root)
    started = interp.start(built, {}, 1000)
    [first] = [t for t in started.tasks if t.kind == "sql"]
    assert started.next_state is not None
    step = interp.step_succeeded(built, started.next_state, {}, first.activation, result, 1001)
    return interp.chain(started, step, first.activation), first.activation


def test_chain_of_a_start_and_its_only_step_ends_the_instance() -> None:
    g = G()
    a = g.sql("SELECT 1 AS x")
    chained, _ = _start_then_step(g, a, rows({"x": 1}))
    assert chained.tasks == [] and chained.dropped == []
    assert chained.outcome == interp.Outcome("completed", rows({"x": 1}))
    change = change_of(chained)
    [write] = change.writes
    assert (write.id, write.status, write.started) == (a, "completed", True)


def test_chain_queues_what_follows_and_never_the_task_it_ran() -> None:
    g = G()
    a, b = g.sql("SELECT 1"), g.sql("SELECT 2")
    chained, ran = _start_then_step(g, g.then(a, b), rows({"x": 1}))
    assert [t.node_id for t in chained.tasks] == [b]
    assert ran not in {t.activation for t in chained.tasks}
    assert chained.outcome is None
    written = {w.id: (w.status, w.started) for w in change_of(chained).writes}
    assert written[a] == ("completed", True) and written[b] == ("running", True)


def test_chain_drops_queued_tasks_the_step_abandoned_without_writing_them() -> None:
    g = G()
    a = g.sql("SELECT 'fast' AS w")
    root = g.race(a, g.sleep(60))
    chained, _ = _start_then_step(g, root, rows({"w": "fast"}))
    # The RACE was decided: the sleep's timer, queued by the start, is neither queued nor
    # listed as dropped (it was never written).
    assert chained.tasks == [] and chained.dropped == []
    assert chained.outcome is not None and chained.outcome.status == "completed"


def test_chain_refuses_a_start_that_ended_the_instance() -> None:
    failed = interp.fail_instance(None, "no")
    with pytest.raises(ValueError):
        interp.chain(failed, failed, 1)
