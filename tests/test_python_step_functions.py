"""Python steps without a database: the registry, binding arguments, results and errors
(python_steps.py, worker/calls.py), and the CALL node's shape (core/model.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from pgdurable.core.model import GraphError, graph_from_rows, is_step_name
from pgdurable.python_steps import StepContext, StepDefinition, import_steps, step
from pgdurable.worker import calls


def ctx() -> StepContext:
    return StepContext("t.step", "abcd0123", "0000aaaa", "key", 1)


def test_step_names_are_identifiers_joined_by_dots() -> None:
    assert is_step_name("billing.charge") and is_step_name("_x.y2.z")
    for bad in ("", "a..b", "a.", ".a", "a b", "1a", "a-b", "a" * 201, None, 3):
        assert not is_step_name(bad), bad
    with pytest.raises(ValueError, match="invalid step name"):
        step("not valid")


def test_a_name_registered_for_two_functions_is_refused() -> None:
    @step("tests.registry.twice")
    def first(ctx: StepContext) -> None: ...

    step("tests.registry.twice")(first)  # the same function again (a re-import): fine

    def second(ctx: StepContext) -> None: ...

    with pytest.raises(ValueError, match="registered twice"):
        step("tests.registry.twice")(second)


def test_a_module_that_fails_to_import_is_named() -> None:
    with pytest.raises(ImportError, match=r"cannot import Python steps from 'no\.such\.module'"):
        import_steps(["no.such.module"])


def test_arguments_bind_by_keyword_after_the_context() -> None:
    def f(ctx: StepContext, a: int, b: int = 2) -> int:
        return a + b

    definition = StepDefinition("t.f", f)
    bound = definition.bind(ctx(), {"a": 1})
    assert f(*bound.args, **bound.kwargs) == 3
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        definition.bind(ctx(), {})


def run(function: Any, args: dict[str, Any] | None = None, limit: float | None = None) -> Any:
    definition = StepDefinition("t.step", function)
    c = ctx()
    invocation = calls.Invocation(definition, c, definition.bind(c, args or {}), 100)
    return asyncio.run(invocation.run(limit))


def test_results_must_be_json_within_the_limit() -> None:
    assert run(lambda ctx: {"a": [1, "é"]}) == calls.CallOutcome(True, '{"a":[1,"é"]}')
    for value, why in ((float("nan"), "not JSON"), ({1}, "not JSON"), ("x" * 200, "more than")):
        outcome = run(lambda ctx, v=value: v)
        assert not outcome.succeeded and outcome.code == "call_invalid" and why in outcome.value


def test_an_exception_becomes_an_error_with_its_last_frames() -> None:
    def boom(ctx: StepContext) -> None:
        raise KeyError("missing")

    outcome = run(boom)
    assert outcome.code == "python" and isinstance(outcome.exception, KeyError)
    first, *rest = outcome.value.splitlines()
    assert first == "Python step 't.step' failed: KeyError: 'missing'"
    assert rest[0] == "Traceback (most recent call last):"
    assert 'raise KeyError("missing")' in outcome.value


def test_a_step_past_its_deadline_is_cut_short() -> None:
    async def slow(ctx: StepContext) -> None:
        await asyncio.sleep(10)

    outcome = run(slow, limit=0.05)
    assert outcome.code == "call_timeout"


def test_call_nodes_need_a_name_and_object_arguments() -> None:
    def graph(query: str) -> Any:
        row = {"id": "00000001", "node_type": "CALL", "query": query}
        return graph_from_rows("abcd0123", "00000001", [row])

    graph('{"name": "a.b", "args": {"x": 1}}')
    graph('{"name": "a.b"}')
    for bad in ('{"name": "a b"}', '{"name": "a.b", "args": [1]}', '{"args": {}}'):
        with pytest.raises(GraphError, match="CALL node 00000001: invalid config"):
            graph(bad)


def test_a_timeout_the_function_raises_itself_is_its_own_failure() -> None:
    async def impatient(ctx: StepContext) -> None:
        raise TimeoutError("the service did not answer")

    outcome = run(impatient, limit=30)
    assert outcome.code == "python" and "TimeoutError: the service did not answer" in outcome.value


def test_a_sync_step_past_its_deadline_is_abandoned() -> None:
    release = threading.Event()

    def stuck(ctx: StepContext) -> None:
        release.wait(10)

    definition = StepDefinition("t.stuck", stuck)
    c = ctx()
    invocation = calls.Invocation(definition, c, definition.bind(c, {}), 100)

    async def scenario() -> None:
        outcome = await invocation.run(0.05)
        assert outcome.code == "call_timeout" and c.cancelled and invocation.abandoned
        release.set()
        await invocation.settled()
        assert not invocation.abandoned

    asyncio.run(scenario())
