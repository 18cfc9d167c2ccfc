"""The change a checkpoint writes: the one contract between the worker and ``df._checkpoint``.

``df._checkpoint`` (schema/engine.sql) takes it as one jsonb argument, ``p_change``::

    state            the instance's interpreter state, in core/state.py's stored form
    generation       the root execution's generation (iterations of a root loop)
    writes           [{"id", "status", "result", "execution_id", "error_op", "error",
                       "started"}]: at most one per node; result is JSON text or null;
                     error_op is 'set' (error replaces the node's error column), 'append'
                     (error is added as lines) or null (the column stays); started is true
                     when the node became running in this change (it may have ended since)
    tasks            [{"activation", "kind", "node_id", "payload", "run_at"}]: work to queue;
                     run_at is epoch seconds, or null for now
    dropped          activations whose tasks are abandoned (RACE losers)
    outcome          null, or {"status": "completed" | "failed", "output": text}
    ended_execution  null, or {"generation", "output"}: a root loop began its next iteration,
                     and the execution of that generation ended with that body result
    version          null, or the instance's checkpoint count the state was computed after,
                     when the worker knew it from its own last checkpoint instead of reading
                     it under df._checkpoint_begin's lock (df._checkpoint checks it)
    nodes            absent, or [{"id", "node_type", "query", "result_name", "left_node",
                     "right_node"}]: nodes a step's result added to the graph
                     (df.continue_with), parents first
    continued        with nodes: [{"id", "left_node"}]: the steps those graphs run in place
                     of, and each graph's root (stored as the step's left_node)
    callable         absent, or the names of the Python steps among the tasks that the
                     worker writing the checkpoint has: those may be leased to it

:func:`change_of` builds it from an interpreter transition; :meth:`Change.to_json` is its one
serializer. Everything SQL learns of a transition is here: SQL never reads the state itself.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from ..core.interpreter import EndedExecution, NodeWrite, Outcome, TaskSpec, Transition
from ..core.model import Node


@dataclass(frozen=True)
class NodeChange:
    """What a checkpoint writes to one df.nodes row: the net effect of its writes."""

    id: str
    status: str
    result: str | None
    execution_id: str
    error_op: Literal["set", "append"] | None
    error: str | None
    started: bool = False


@dataclass(frozen=True)
class Change:
    """``p_change`` of df._checkpoint (see the module's docstring)."""

    state: dict[str, Any]
    generation: int
    writes: tuple[NodeChange, ...]
    tasks: tuple[TaskSpec, ...]
    dropped: tuple[int, ...]
    outcome: Outcome | None
    ended_execution: EndedExecution | None
    version: int | None = None
    new_nodes: tuple[Node, ...] = ()
    continued: tuple[tuple[str, str], ...] = ()
    callable: tuple[str, ...] = ()

    def to_json(self) -> str:
        """The JSON text df._checkpoint reads: compact, UTF-8 as is."""
        document = {
            "state": self.state,
            "generation": self.generation,
            "writes": [
                {
                    "id": w.id,
                    "status": w.status,
                    "result": w.result,
                    "execution_id": w.execution_id,
                    "error_op": w.error_op,
                    "error": w.error,
                    "started": w.started,
                }
                for w in self.writes
            ],
            "tasks": [
                {
                    "activation": t.activation,
                    "kind": t.kind,
                    "node_id": t.node_id,
                    "payload": t.payload,
                    "run_at": t.run_at,
                }
                for t in self.tasks
            ],
            "dropped": list(self.dropped),
            "outcome": (
                {"status": self.outcome.status, "output": self.outcome.output}
                if self.outcome
                else None
            ),
            "ended_execution": (
                {
                    "generation": self.ended_execution.generation,
                    "output": self.ended_execution.output,
                }
                if self.ended_execution
                else None
            ),
            "version": self.version,
        }
        if self.new_nodes:
            document["nodes"] = [
                {
                    "id": n.id,
                    "node_type": n.type,
                    "query": n.query,
                    "result_name": n.result_name,
                    "left_node": n.left,
                    "right_node": n.right,
                }
                for n in self.new_nodes
            ]
            document["continued"] = [{"id": s, "left_node": r} for s, r in self.continued]
        if self.callable:
            document["callable"] = list(self.callable)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def change_of(
    transition: Transition, version: int | None = None, steps: Collection[str] = ()
) -> Change:
    """The change that records ``transition`` (computed from the state of checkpoint
    ``version``, if given): one write per node, its errors folded. ``steps``: the Python
    steps the writing worker has."""
    by_node: dict[str, list[NodeWrite]] = {}
    for w in transition.writes:
        by_node.setdefault(w.node_id, []).append(w)
    writes = []
    for node_id, node_writes in by_node.items():
        last = node_writes[-1]
        error_op, error = _fold_errors(node_writes)
        started = any(w.status == "running" for w in node_writes)
        writes.append(
            NodeChange(
                node_id, last.status, last.result, last.execution_id, error_op, error, started
            )
        )
    return Change(
        state=transition.state,
        generation=transition.generation,
        writes=tuple(writes),
        tasks=tuple(transition.tasks),
        dropped=tuple(transition.dropped),
        outcome=transition.outcome,
        ended_execution=transition.ended_execution,
        version=version,
        new_nodes=tuple(transition.new_nodes),
        continued=tuple(transition.continued),
        callable=tuple(
            sorted(
                {str((t.payload or {}).get("name")) for t in transition.tasks if t.kind == "call"}
                & set(steps)
            )
        ),
    )


def _fold_errors(
    writes: list[NodeWrite],
) -> tuple[Literal["set", "append"] | None, str | None]:
    """The net effect of a node's error changes within one transition."""
    op: Literal["set", "append"] | None = None
    lines: list[str] = []
    for w in writes:
        if w.error is None:
            continue
        kind, text = w.error
        if kind == "set":
            op, lines = "set", [text] if text else []
        else:
            op = op or "append"
            lines.append(text)
    return op, "\n".join(lines) if op else None
