"""Pure tests of df.retry, df.timeout and HTTP steps in the interpreter: no database."""

from __future__ import annotations

import json
from typing import Any

import pytest
from interp_sim import INSTANCE, G, Sim, rows

from pgdurable.core import interpreter as interp
from pgdurable.worker.change import change_of


def retry(g: G, body: str, attempts: int, **config: Any) -> str:
    cfg = {"max_attempts": attempts, "backoff_seconds": 1, "max_backoff_seconds": 60}
    cfg.update(config)
    return g.add("RETRY", json.dumps(cfg), left=body, config=cfg)


def timeout(g: G, body: str, seconds: float, name: str | None = None) -> str:
    cfg = {"timeout_seconds": seconds}
    return g.add("TIMEOUT", json.dumps(cfg), left=body, config=cfg, result_name=name)


def http(g: G, **config: Any) -> str:
    cfg = {"url": "https://example.com/x", "method": "POST", "body": None, "headers": None}
    cfg |= {"timeout_seconds": 30} | config
    return g.add("HTTP", json.dumps(cfg), config=cfg)


def errors(sim: Sim, node_id: str) -> str | None:
    """The node's error column as the store would leave it after every transition so far."""
    text: str | None = None
    for w in sim.writes:
        if w.node_id != node_id or w.error is None:
            continue
        op, line = w.error
        lines = [] if op == "set" or not text else [text]
        text = "\n".join([*lines, line]) or None
    return text


# -- df.retry ----------------------------------------------------------------------------------


def test_retry_reruns_a_failed_step_after_a_backoff_and_succeeds() -> None:
    g = G()
    step = g.sql("UPDATE t SET n = n + 1")
    r = retry(g, step, 3)
    sim = Sim(g.graph(r))
    sim.fail(step, "deadlock detected", "40P01")
    assert sim.pending() == [r]  # only the backoff timer: nothing runs meanwhile
    backoff = sim.task(r)
    assert backoff.kind == "timer" and backoff.run_at is not None
    assert 1000 + 0.5 <= backoff.run_at <= 1000 + 1.0
    sim.fire(r)
    assert sim.pending() == [step]
    sim.complete(step, rows({"n": 1}))
    assert sim.outcome == interp.Outcome("completed", rows({"n": 1}))
    assert errors(sim, r) == "attempt 1: deadlock detected"
    assert sim.status(r) == "completed"


def test_retry_gives_up_after_max_attempts_with_the_last_error_and_every_attempt_recorded() -> None:
    g = G()
    step = g.sql("SELECT 1/0")
    r = retry(g, step, 3)
    sim = Sim(g.graph(r))
    for attempt in (1, 2):
        sim.fail(step, f"boom {attempt}")
        sim.fire(r)
    sim.fail(step, "boom 3")
    assert sim.outcome == interp.Outcome("failed", "boom 3")
    assert errors(sim, r) == "attempt 1: boom 1\nattempt 2: boom 2\nattempt 3: boom 3"
    assert sim.status(r) == "failed"


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter_between_half_and_all() -> None:
    config = {"backoff_seconds": 2, "max_backoff_seconds": 10}
    delays = [interp.backoff_delay(config, a, "seed") for a in range(1, 7)]
    for delay, full in zip(delays, [2, 4, 8, 10, 10, 10], strict=True):
        assert full / 2 <= delay <= full
    # Deterministic for one step, different across steps (so they do not retry in lockstep).
    assert interp.backoff_delay(config, 3, "a") == interp.backoff_delay(config, 3, "a")
    assert len({interp.backoff_delay(config, 3, f"s{i}") for i in range(20)}) > 15
    assert interp.backoff_delay({"backoff_seconds": 0, "max_backoff_seconds": 0}, 5, "x") == 0


@pytest.mark.parametrize(
    ("retry_on", "code", "retried"),
    [
        (None, None, True),
        (None, "42P01", True),
        (["40001"], "40001", True),
        (["40001"], "40P01", False),
        (["40"], "40P01", True),
        (["40"], None, False),
        (["http"], "http_5xx", True),
        (["http"], "http_connection", True),
        (["http"], "http_blocked", False),
        (["http_5xx"], "http_timeout", False),
        (["timeout"], "timeout", True),
        (["timeout"], "http_timeout", True),
        (["timeout"], "57014", False),
    ],
)
def test_retry_on_selects_which_failures_retry(
    retry_on: list[str] | None, code: str | None, retried: bool
) -> None:
    g = G()
    step = g.sql("x")
    r = retry(g, step, 2, retry_on=retry_on)
    sim = Sim(g.graph(r))
    sim.fail(step, "error", code)
    assert (sim.outcome is None) == retried


def test_failure_codes_travel_up_through_sequences_joins_and_races() -> None:
    g = G()
    a, b = g.sql("a"), g.sql("b")
    r = retry(g, g.then(g.sql("first"), g.join(a, b)), 2, retry_on=["40001"])
    sim = Sim(g.graph(r))
    sim.complete(g.nodes[g.nodes[g.nodes[r].left].left].id)  # type: ignore[index]
    sim.fail(a, "serialization failure", "40001")
    sim.complete(b)
    assert sim.outcome is None and sim.pending() == [r]  # JOIN failed with 40001: retried


def test_retry_runs_the_whole_subtree_again_in_the_same_execution() -> None:
    g = G()
    first, second = g.sql("INSERT 1", "one"), g.sql("SELECT $one")
    r = retry(g, g.then(first, second), 2)
    sim = Sim(g.graph(r))
    stamp = sim.stamp(first)
    sim.complete(first, rows({"v": 1}))
    sim.fail(second, "nope")
    sim.fire(r)
    assert sim.pending() == [first]  # from the start of the wrapped step
    assert sim.stamp(first) == stamp


def test_a_retry_inside_a_loop_starts_every_iteration_with_a_fresh_history() -> None:
    g = G()
    step = g.sql("x")
    r = retry(g, step, 2)
    loop = g.loop(r)
    sim = Sim(g.graph(loop))
    sim.fail(step, "first")
    sim.fire(r)
    sim.complete(step)
    assert errors(sim, r) == "attempt 1: first"
    sim.fire(loop)  # the 1 s iteration padding
    assert errors(sim, r) is None


def test_cancelling_a_retry_during_its_backoff_drops_only_its_timer() -> None:
    g = G()
    step = g.sql("x")
    r = retry(g, step, 5)
    race = g.race(r, g.sleep(1))
    sim = Sim(g.graph(race))
    sim.fail(step, "e")
    sim.fire(g.nodes[race].right)  # type: ignore[arg-type]
    assert sim.outcome is not None and sim.outcome.status == "completed"


# -- df.timeout --------------------------------------------------------------------------------


def test_a_step_that_finishes_in_time_cancels_its_timeout_timer() -> None:
    g = G()
    step = g.sql("SELECT 1", "r")
    t = timeout(g, step, 5)
    sim = Sim(g.graph(g.then(t, g.sql("SELECT $r"))))
    assert sim.task(t).run_at == 1005
    assert sim.task(step).payload == {"sql": "SELECT 1", "deadline": 1005}
    sim.complete(step, rows({"x": 7}))
    assert t not in sim.pending()  # its timer was dropped
    assert sim.pending() == [g.nodes[g.nodes[sim.graph.root].right].id]  # type: ignore[index]


def test_an_expired_timeout_abandons_the_step_and_fails_with_a_timeout() -> None:
    g = G()
    step = g.sql("SELECT pg_sleep(60)")
    t = timeout(g, step, 2.5)
    sim = Sim(g.graph(t))
    sim.fire(t)
    assert sim.outcome == interp.Outcome("failed", "Timed out after 2.5s (df.timeout)")
    assert step not in sim.pending()
    assert sim.status(step) == "failed"
    assert sim.result(step) == "Cancelled: the enclosing df.timeout expired after 2.5s"


def test_a_statement_timeout_at_the_deadline_counts_as_the_timeout() -> None:
    g = G()
    step = g.sql("SELECT pg_sleep(60)")
    t = timeout(g, step, 1)
    r = retry(g, t, 2, retry_on=["timeout"])
    sim = Sim(g.graph(r))
    sim.now += 2  # the backstop fired after the deadline, before the timer was handled
    sim.fail(step, "canceling statement due to statement timeout", "57014")
    assert sim.outcome is None and sim.pending() == [r]  # retried as a timeout
    assert errors(sim, r) == "attempt 1: Timed out after 1s (df.timeout)"
    sim.fire(r)
    sim.fail(step, "canceling statement due to user request", "57014")  # before the deadline
    assert sim.outcome == interp.Outcome("failed", "canceling statement due to user request")


def test_a_late_result_of_a_timed_out_step_is_ignored() -> None:
    g = G()
    step = g.sql("x")
    t = timeout(g, step, 1)
    # (In a JOIN whose other branch still runs: a failed instance keeps the state before its
    # failure, to restart from, and has no tasks left to report anything.)
    sim = Sim(g.graph(g.join(g.then(t, g.sql("after")), g.sql("other"))))
    activation = sim.task(step).activation
    sim.fire(t)
    assert sim.outcome is None
    late = interp.step_succeeded(sim.graph, sim.state, {}, activation, rows(), sim.now)
    assert late.writes == [] and late.tasks == [] and late.outcome is None


def test_timeout_around_a_wait_and_a_loop_drops_everything_inside() -> None:
    g = G()
    sleep = g.sleep(3600)
    body = g.then(g.sql("tick"), sleep)
    loop = g.loop(body)
    t = timeout(g, loop, 10)
    sim = Sim(g.graph(t))
    sim.complete(g.nodes[body].left)  # type: ignore[arg-type]
    assert sim.pending() == sorted([sleep, t])
    sim.fire(t)
    assert sim.pending() == []
    assert sim.outcome is not None and sim.outcome.status == "failed"
    assert sim.status(loop) == "failed"


def test_retry_of_a_timeout_retries_timed_out_attempts() -> None:
    g = G()
    step = g.sql("SELECT slow()")
    t = timeout(g, step, 5)
    r = retry(g, t, 2, retry_on=["timeout"])
    sim = Sim(g.graph(r))
    sim.fire(t)
    assert sim.outcome is None and sim.pending() == [r]
    sim.fire(r)
    assert sim.task(t).run_at == pytest.approx(sim.now + 5)  # a fresh deadline per attempt
    sim.complete(step)
    assert sim.outcome is not None and sim.outcome.status == "completed"


def test_timeout_of_a_retry_bounds_every_attempt_and_the_backoffs() -> None:
    g = G()
    step = g.sql("x")
    r = retry(g, step, 10, backoff_seconds=30)
    t = timeout(g, r, 20)
    sim = Sim(g.graph(t))
    sim.fail(step, "e")
    assert sim.pending() == sorted([r, t])
    sim.fire(t)
    assert sim.outcome == interp.Outcome("failed", "Timed out after 20s (df.timeout)")
    assert sim.pending() == []


def test_nested_timeouts_give_steps_the_nearest_deadline() -> None:
    g = G()
    step = g.sql("x")
    sim = Sim(g.graph(timeout(g, timeout(g, step, 50), 10)))
    assert sim.task(step).payload == {"sql": "x", "deadline": 1010}


def test_a_timeout_names_its_result_like_any_node() -> None:
    g = G()
    t = timeout(g, g.sql("SELECT 1"), 5, name="v")
    after = g.sql("SELECT $v")
    sim = Sim(g.graph(g.then(t, after)))
    sim.complete(g.nodes[t].left, rows({"a": 42}))  # type: ignore[arg-type]
    assert sim.sql_of(after) == "SELECT 42"


# -- HTTP --------------------------------------------------------------------------------------


def test_http_step_becomes_an_http_task_with_substituted_fields_and_a_stable_key() -> None:
    g = G()
    first = g.sql("SELECT 7 AS id", "row")
    call = http(
        g,
        url="https://api.example.com/items/$row.id/details?label={sys_label}",
        body='{"id": $row.id, "who": "{user}"}',
        headers={"X-Id": "$row.id", "X-Skip": 5},
    )
    sim = Sim(g.graph(g.then(first, call), label="nightly"), {"user": "ann"})
    sim.complete(first, rows({"id": 7}))
    task = sim.task(call)
    assert task.kind == "http"
    assert task.payload == {
        "type": "HTTP",
        "method": "POST",
        "url": "https://api.example.com/items/7/details?label=nightly",
        "headers": {"X-Id": "7"},
        "timeout_seconds": 30,
        "idempotency_key": f"pgdurable:{INSTANCE}::1:{call}",
        "body": '{"id": 7, "who": "ann"}',
    }


def test_http_substitution_errors_fail_the_step_before_any_request() -> None:
    g = G()
    call = http(g, url="https://x.example/$missing.field")
    first = g.sql("SELECT 1", "missing")
    sim = Sim(g.graph(g.then(first, call)))
    sim.complete(first, rows({"other": 1}))
    assert sim.outcome is not None and sim.outcome.status == "failed"
    assert "has no field 'field'" in sim.outcome.output


def test_http_response_is_a_named_result_with_fields() -> None:
    g = G()
    call = g.add(
        "HTTP",
        "{}",
        config={"url": "https://x.example", "method": "GET"},
        result_name="resp",
    )
    after = g.sql("SELECT $resp.status, $resp.ok")
    sim = Sim(g.graph(g.then(call, after)))
    envelope = '{"status":200,"body":"hi","encoding":"text","headers":{},"ok":true,"duration_ms":3}'
    sim.complete(call, envelope)
    assert sim.sql_of(after) == "SELECT 200, true"


def test_the_idempotency_key_is_the_same_for_retries_and_new_per_loop_iteration() -> None:
    g = G()
    call = http(g)
    r = retry(g, call, 3)
    loop = g.loop(r)
    sim = Sim(g.graph(loop))
    first = sim.task(call).payload["idempotency_key"]  # type: ignore[index]
    sim.fail(call, "HTTP POST ... returned 503", "http_5xx")
    sim.fire(r)
    assert sim.task(call).payload["idempotency_key"] == first  # type: ignore[index]
    sim.complete(call, '{"status":200}')
    sim.fire(loop)
    assert sim.task(call).payload["idempotency_key"] != first  # type: ignore[index]


def test_multipart_data_substitutes_only_whole_value_references() -> None:
    g = G()
    first = g.sql("SELECT 'aGk=' AS b64", "file")
    parts = [
        {"name": "doc-{sys_instance_id}", "data_b64": " $file.b64 ", "filename": "a.txt"},
        {"name": "raw", "data_b64": "aGVsbG8="},
    ]
    cfg = {"url": "https://x.example/u", "method": "POST", "parts": parts, "headers": None}
    call = g.add("HTTP_MULTIPART", json.dumps(cfg), config=cfg)
    sim = Sim(g.graph(g.then(first, call)))
    sim.complete(first, rows({"b64": "aGk="}))
    assert sim.task(call).payload["parts"] == [  # type: ignore[index]
        {"name": f"doc-{INSTANCE}", "data_b64": "aGk=", "filename": "a.txt"},
        {"name": "raw", "data_b64": "aGVsbG8="},
    ]


def test_multipart_data_mixing_a_reference_with_text_fails() -> None:
    g = G()
    parts = [{"name": "p", "data_b64": "aGk=$x"}]
    cfg = {"url": "https://x.example/u", "method": "POST", "parts": parts}
    call = g.add("HTTP_MULTIPART", json.dumps(cfg), config=cfg)
    sim = Sim(g.graph(call))
    assert sim.outcome is not None
    assert sim.outcome.output.startswith(
        f"HTTP_MULTIPART node {call}: data_b64 for part 'p' mixes a variable reference"
    )


def test_http_under_a_timeout_carries_the_deadline() -> None:
    g = G()
    call = http(g)
    sim = Sim(g.graph(timeout(g, call, 3)))
    assert sim.task(call).payload["deadline"] == 1003  # type: ignore[index]


# -- what a checkpoint writes -------------------------------------------------------------------


def test_error_changes_of_one_transition_fold_into_one_write() -> None:
    w = interp.NodeWrite
    transition = interp.Transition(
        next_state=None,
        writes=[
            w("r", "running", None, "x::1", ("set", "")),
            w("r", "running", None, "x::1", ("append", "attempt 1: a")),
            w("r", "failed", '"a"', "x::1"),
            w("s", "running", None, "x::1", ("append", "one")),
            w("s", "running", None, "x::1", ("append", "two")),
            w("q", "completed", "1", "x::1"),
        ],
    )
    writes = {d["id"]: d for d in json.loads(change_of(transition).to_json())["writes"]}
    assert (writes["r"]["status"], writes["r"]["error_op"], writes["r"]["error"]) == (
        "failed",
        "set",
        "attempt 1: a",
    )
    assert (writes["s"]["error_op"], writes["s"]["error"]) == ("append", "one\ntwo")
    assert (writes["q"]["error_op"], writes["q"]["error"]) == (None, None)


# -- Python steps ------------------------------------------------------------------------------


def call(g: G, name: str, args: Any = None, result_name: str | None = None) -> str:
    cfg: dict[str, Any] = {"name": name, "args": args if args is not None else {}}
    return g.add("CALL", json.dumps(cfg), config=cfg, result_name=result_name)


def test_a_call_queues_its_substituted_arguments_with_a_key_and_its_retry_attempt() -> None:
    g = G()
    first = g.sql("SELECT 1", name="o")
    c = call(g, "billing.charge", {"id": "$o", "note": "order $o", "keep": ["$o.x?", 2]})
    r = retry(g, c, 3)
    sim = Sim(g.graph(g.then(first, r)))
    sim.complete(first, rows({"x": 7}))
    task = sim.task(c)
    assert task.kind == "call" and task.payload is not None
    key = task.payload["idempotency_key"]
    assert task.payload == {
        "name": "billing.charge",
        "args": {"id": 7, "note": "order 7", "keep": [7, 2]},
        "idempotency_key": key,
        "attempt": 1,
    }
    sim.fail(c, "boom", "python")
    sim.fire(r)
    again = sim.task(c)
    assert again.payload is not None
    assert again.payload["attempt"] == 2 and again.payload["idempotency_key"] == key


def test_a_call_whose_reference_cannot_be_substituted_fails_without_running() -> None:
    g = G()
    c = call(g, "util.echo", {"v": "$missing.x"})
    first = g.sql("SELECT 1", name="missing")
    sim = Sim(g.graph(g.then(first, c)))
    sim.complete(first, rows())
    assert sim.pending() == []
    assert sim.outcome is not None and sim.outcome.status == "failed"
    assert "has no rows" in sim.outcome.output


def test_a_call_under_a_timeout_carries_its_deadline() -> None:
    g = G()
    c = call(g, "util.echo")
    sim = Sim(g.graph(timeout(g, c, 5)))
    task = sim.task(c)
    assert task.payload is not None and task.payload["deadline"] == 1000 + 5


@pytest.mark.parametrize("code", sorted(interp.NEVER_RETRIED))
def test_failures_a_retry_cannot_change_are_never_retried(code: str) -> None:
    assert not interp.retryable(code, None)
    assert not interp.retryable(code, [code])
    assert interp.retryable("python", None) and interp.retryable("python", ["python"])
    assert interp.retryable("call_timeout", ["timeout"])
