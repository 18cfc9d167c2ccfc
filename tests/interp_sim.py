"""A worker in miniature for pure interpreter tests: ``G`` builds graphs node by node and
``Sim`` keeps the state (round-tripped through its stored JSON, as the store does), the
outstanding tasks, every node write and the outcome.

At every event the simulator also checks what no test states but every test relies on: the
interpreter left the state it was given unchanged, the stored form reads back as the same
state, and the state holds no execution or environment that no live activation uses."""

from __future__ import annotations

import json
from typing import Any

from pgdurable.core import interpreter as interp
from pgdurable.core.model import Graph, Node
from pgdurable.core.state import (
    ROOT,
    ForkActivation,
    InstanceState,
    LoopActivation,
    MapActivation,
    from_json,
    to_json,
)

INSTANCE = "abcd0123"


class G:
    """Builds a graph node by node; ids are n0001, n0002, ... in creation order."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}

    def add(self, type_: str, query: str | None = None, **kw: Any) -> str:
        node_id = f"{len(self.nodes) + 1:08x}"
        config = kw.pop("config", None) or {}
        if query and type_ in ("BREAK",):
            config = json.loads(query)
        self.nodes[node_id] = Node(node_id, type_, query=query, config=config, **kw)
        return node_id

    def sql(self, text: str, name: str | None = None) -> str:
        return self.add("SQL", text, result_name=name)

    def then(self, *steps: str, name: str | None = None) -> str:
        left = steps[0]
        for i, right in enumerate(steps[1:], start=2):
            left = self.add(
                "THEN", left=left, right=right, result_name=name if i == len(steps) else None
            )
        return left

    def join(self, *branches: str, name: str | None = None) -> str:
        extras = tuple(branches[2:])
        return self.add(
            "JOIN",
            json.dumps({"extra_nodes": list(extras)}) if extras else None,
            left=branches[0],
            right=branches[1],
            extras=extras,
            result_name=name,
        )

    def race(self, a: str, b: str) -> str:
        return self.add("RACE", left=a, right=b)

    def if_(self, cond: str, then: str, else_: str) -> str:
        return self.add("IF", "{}", left=then, right=else_, condition=cond)

    def if_rows(self, name: str, then: str, else_: str) -> str:
        cfg = {"condition_type": "result_has_rows", "result_name": name}
        return self.add("IF", json.dumps(cfg), left=then, right=else_, config=cfg)

    def loop(self, body: str, cond: str | None = None, name: str | None = None) -> str:
        return self.add("LOOP", None, left=body, condition=cond, result_name=name)

    def brk(self, value: str | None = None) -> str:
        return self.add("BREAK", json.dumps({"break_value": value}))

    def sleep(self, seconds: int) -> str:
        return self.add("SLEEP", str(seconds))

    def graph(self, root: str, label: str | None = None) -> Graph:
        return Graph(INSTANCE, root, self.nodes, label)


def rows(*records: dict[str, Any]) -> str:
    return json.dumps({"rows": list(records), "row_count": len(records)}, separators=(",", ":"))


class Sim:
    """A worker in miniature."""

    def __init__(
        self,
        graph: Graph,
        variables: dict[str, str] | None = None,
        now: float = 1000,
        max_statement_bytes: int = interp.DEFAULT_MAX_BYTES,
    ):
        self.graph = graph
        self.limit = {"max_statement_bytes": max_statement_bytes}
        self.variables = variables or {}
        self.now = now
        self.tasks: dict[int, interp.TaskSpec] = {}
        self.writes: list[interp.NodeWrite] = []
        self.outcome: interp.Outcome | None = None
        self.ended_executions: list[interp.EndedExecution] = []  # as monitoring records them
        self.stored: dict[str, Any] = {}  # the state as the store keeps it
        self.state = InstanceState.initial(graph.instance_id)
        self._apply(interp.start(graph, self.variables, now, **self.limit))

    def _apply(self, t: interp.Transition) -> None:
        assert to_json(self.state) == self.stored or not self.stored, "the old state changed"
        assert t.next_state is not None
        _check_ownership(t.next_state)
        self.stored = json.loads(json.dumps(t.state))  # through JSON text, as jsonb does
        loaded = from_json(self.stored)
        assert loaded == t.next_state, "the stored form does not read back as the state"
        self.state = loaded
        self.writes += t.writes
        for aid in t.dropped:
            self.tasks.pop(aid, None)
        for task in t.tasks:
            self.tasks[task.activation] = task
        if t.outcome:
            assert self.outcome is None, "an instance finishes once"
            self.outcome = t.outcome
            self.tasks.clear()
        if t.ended_execution:
            self.ended_executions.append(t.ended_execution)
        self.generation = t.generation

    def task(self, node_id: str) -> interp.TaskSpec:
        found = [t for t in self.tasks.values() if t.node_id == node_id]
        assert found, f"no task for {node_id}; tasks: {self.pending()}"
        return found[0]

    def pending(self) -> list[str]:
        return sorted(t.node_id for t in self.tasks.values())

    def sql_of(self, node_id: str) -> str:
        payload = self.task(node_id).payload
        assert payload is not None
        return str(payload["sql"])

    def tasks_of(self, node_id: str) -> list[interp.TaskSpec]:
        """The node's tasks, in activation order (a df.map body runs once per item)."""
        return sorted(
            (t for t in self.tasks.values() if t.node_id == node_id), key=lambda t: t.activation
        )

    def complete(
        self, node_id: str, result: str | None = None, task: interp.TaskSpec | None = None
    ) -> None:
        task = task or self.task(node_id)
        del self.tasks[task.activation]
        self._apply(
            interp.step_succeeded(
                self.graph,
                self.state,
                self.variables,
                task.activation,
                result or rows(),
                self.now,
                **self.limit,
            )
        )

    def fail(
        self,
        node_id: str,
        error: str,
        code: str | None = None,
        task: interp.TaskSpec | None = None,
    ) -> None:
        task = task or self.task(node_id)
        del self.tasks[task.activation]
        self._apply(
            interp.step_failed(
                self.graph, self.state, self.variables, task.activation, error, self.now, code
            )
        )

    def fire(self, node_id: str) -> None:
        task = self.task(node_id)
        assert task.kind == "timer"
        assert task.run_at is not None
        self.now = max(self.now, task.run_at)
        del self.tasks[task.activation]
        self._apply(
            interp.timer_fired(self.graph, self.state, self.variables, task.activation, self.now)
        )

    def cancel(self) -> None:
        """df.cancel: the tasks go, the state stays as it is."""
        self.tasks.clear()

    def restart(self) -> None:
        """df.restart: the state the instance kept when it failed or was cancelled runs on."""
        self.outcome = None
        self.tasks.clear()
        self._apply(interp.resume(self.graph, self.state, self.variables, self.now, **self.limit))

    def status(self, node_id: str) -> str | None:
        found = [w.status for w in self.writes if w.node_id == node_id]
        return found[-1] if found else None

    def result(self, node_id: str) -> Any:
        found = [w.result for w in self.writes if w.node_id == node_id]
        return json.loads(found[-1]) if found and found[-1] else None

    def stamp(self, node_id: str) -> str:
        return [w.execution_id for w in self.writes if w.node_id == node_id][-1]


def _check_ownership(state: InstanceState) -> None:
    """Every execution and environment is the instance's own or used by a live activation,
    and every one an activation uses exists."""
    execs, envs = {ROOT}, {ROOT}
    for act in state.acts.values():
        execs.add(act.exec_id)
        envs.add(act.env_id)
        if isinstance(act, ForkActivation):
            execs.update(act.branch_execs)
            envs.update(act.branch_envs)
        if isinstance(act, LoopActivation):
            execs.add(act.loop_exec)
        if isinstance(act, MapActivation):
            execs.update(e for _, e, _ in act.running)
            envs.update(v for _, _, v in act.running)
    assert set(state.execs) == execs, (sorted(state.execs), sorted(execs))
    assert set(state.envs) == envs, (sorted(state.envs), sorted(envs))
