"""What the worker tells its metrics (metrics.py) and traces (tracing.py) of its steps.

The worker calls in at a few points: when it takes a step up, when a checkpoint commits, when
it is done with a task, at claims. A worker without ``--metrics-port`` and ``--trace`` has no
Telemetry, and its step path makes none of these calls.

A step's outcome is what the committed checkpoint wrote to the step's node (df.nodes.status
``completed`` or ``failed``): the one place every path of a step ends at (alone, in a batch,
with its instance's start, in another database, recorded as a failure). A task that ends
without such a checkpoint (withdrawn by a cancel or a lost RACE, taken over by another
worker, deferred, the worker stopping) has no outcome.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.interpreter import Outcome, Transition
from ..core.model import Graph
from .metrics import STEP_KINDS, WorkerMetrics
from .queries import Task

# The task kinds of the steps a worker runs from start to end; waits are "timer" and "signal".
_RUN_KINDS = frozenset({"sql", "http", "call"})
_WAITS = frozenset({"timer", "signal"})


class Tracing(Protocol):
    """The traces of steps and instances (tracing.py; a Protocol, so that OpenTelemetry is
    imported only by a worker that traces)."""

    def step_began(self, task: Task, kind: str, node_id: str) -> Any:
        """Start the span of step ``node_id`` that ``task`` runs; returns it."""

    def commented(self, sql: str, span: Any) -> str:
        """``sql`` with ``span``'s trace context in a comment."""

    def step_ended(self, span: Any, status: str, error: str | None) -> None:
        """End ``span``: its step ended ``completed`` or ``failed`` (with ``error``)."""

    def step_abandoned(self, span: Any) -> None:
        """End ``span`` of a step that ended without an outcome."""

    def instance_ended(self, task: Task, outcome: Outcome) -> None:
        """Emit the span of ``task``'s instance, which ended with ``outcome``."""


@dataclass
class _Step:
    """A step the worker took up: under the id of the task that runs it (a start's task, for
    the first step run in its transaction)."""

    kind: str
    node_id: str
    token: uuid.UUID  # of that task: only its own end forgets the step (see settled)
    began: float  # time.monotonic()
    span: Any = None  # its trace span (tracing.py), if traced
    done: bool = False  # its outcome was recorded


class Telemetry:
    """The worker's hooks into its ``metrics`` and ``tracing`` (either may be None)."""

    def __init__(self, metrics: WorkerMetrics | None, tracing: Tracing | None = None):
        self.metrics = metrics
        self.tracing = tracing
        self._steps: dict[int, _Step] = {}

    # -- the step path -------------------------------------------------------------------------

    def began(self, task: Task) -> Task:
        """The worker takes ``task`` up; a SQL step's task comes back with its statement
        carrying its trace context (see sql_began)."""
        if task.kind not in _RUN_KINDS or task.node_id is None:
            return task
        if task.kind != "sql":
            self._began(task, task.kind, task.node_id)
            return task
        payload = task.payload or {}
        sql = str(payload.get("sql", ""))
        traced = self.sql_began(task, task.node_id, sql)
        if traced is sql:
            return task
        return dataclasses.replace(task, payload={**payload, "sql": traced})

    def sql_began(self, task: Task, node_id: str, sql: str) -> str:
        """The SQL step ``node_id`` of ``task`` (its own, or the first step a start runs)
        begins: its statement ``sql``, with the trace context in a comment if traced."""
        step = self._began(task, "sql", node_id)
        if step.span is None or self.tracing is None:
            return sql
        return self.tracing.commented(sql, step.span)

    def _began(self, task: Task, kind: str, node_id: str) -> _Step:
        step = self._steps.get(task.id)
        if step is not None and step.node_id == node_id and not step.done:
            return step  # run again (a batch rolled back, a lost connection): the same step
        step = _Step(kind, node_id, task.token, time.monotonic())
        if self.metrics is not None:
            self.metrics.started[kind] += 1
        if self.tracing is not None:
            step.span = self.tracing.step_began(task, kind, node_id)
        self._steps[task.id] = step
        return step

    def committed(self, task: Task, transition: Transition, graph: Graph | None) -> None:
        """``task``'s checkpoint of ``transition`` committed (``graph``: the instance's, if
        the worker has it)."""
        step = self._steps.get(task.id)
        if step is not None and not step.done:
            written = _written(transition, step.node_id)
            if written is not None:
                step.done = True
                seconds = time.monotonic() - step.began
                if self.metrics is not None:
                    self.metrics.finished(step.kind, written[0], seconds)
                if self.tracing is not None and step.span is not None:
                    self.tracing.step_ended(step.span, *written)
        elif task.kind in _WAITS and graph is not None and task.node_id is not None:
            kind = _kind(graph, task.node_id)
            written = _written(transition, task.node_id)
            if kind is not None and written is not None and self.metrics is not None:
                self.metrics.finished(kind, written[0], None)
        if self.metrics is not None:
            self._queued(transition, graph, self.metrics)
        if transition.outcome is not None and self.tracing is not None:
            self.tracing.instance_ended(task, transition.outcome)

    @staticmethod
    def _queued(transition: Transition, graph: Graph | None, metrics: WorkerMetrics) -> None:
        """The waits that begin, and the retries scheduled, with ``transition``."""
        for spec in transition.tasks:
            if spec.kind == "signal":
                metrics.started["signal"] += 1
            elif spec.kind == "timer" and graph is not None:
                node = graph.nodes.get(spec.node_id)
                if node is None:
                    continue
                if node.type == "RETRY":  # its backoff: the next attempt comes after it
                    metrics.retries += 1
                elif STEP_KINDS.get(node.type) == "timer":
                    metrics.started["timer"] += 1

    def settled(self, task: Task, followups: Iterable[Task]) -> None:
        """The worker is done with ``task``, whose checkpoint handed it ``followups``: a step
        it began and did not see end ends without an outcome (withdrawn, taken away, the
        worker stopping), unless a follow-up runs it (a start's first step that runs alone
        after all: a statement that cannot run in a transaction block, say)."""
        step = self._steps.get(task.id)
        if step is None or step.token != task.token:
            return  # another task on this row (a checkpoint's follow-up) has it now
        for followup in followups:
            if followup.id == task.id and followup.node_id == step.node_id and not step.done:
                step.token = followup.token
                return
        del self._steps[task.id]
        if not step.done and self.tracing is not None and step.span is not None:
            self.tracing.step_abandoned(step.span)

    def egress_refused(self) -> None:
        """The egress policy refused an HTTP step's request."""
        if self.metrics is not None:
            self.metrics.egress_refused += 1

    # -- claims and leases ----------------------------------------------------------------------

    def claimed(self, tasks: Iterable[Task]) -> None:
        """A claim leased ``tasks``."""
        if self.metrics is not None:
            for task in tasks:
                self.metrics.claimed(task.kind, task.waited, task.lease_expired)

    def released(self, count: int) -> None:
        """This worker gave back ``count`` tasks of workers whose session ended."""
        if self.metrics is not None:
            self.metrics.leases_expired["worker_gone"] += count


def _kind(graph: Graph, node_id: str) -> str | None:
    node = graph.nodes.get(node_id)
    return None if node is None else STEP_KINDS.get(node.type)


def _written(transition: Transition, node_id: str) -> tuple[str, str | None] | None:
    """The outcome ``transition`` wrote to node ``node_id`` (its status, and its error for a
    failure), or None if it ended nothing there."""
    for write in reversed(transition.writes):
        if write.node_id == node_id and write.status != "running":
            return write.status, write.result if write.status == "failed" else None
    return None
