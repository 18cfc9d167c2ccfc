"""OpenTelemetry traces of instances and steps (``--trace``; see docs/monitoring.md).

Imported only by a worker that traces, so that the ``tracing`` extra (opentelemetry-api and
-sdk) is needed by those alone.

An instance is one trace. Its steps may run on several workers, and again after a crash, so
its trace id and the id of its span are derived from the instance (its id and creation time,
which together tell it apart from a later instance that got the same id): every worker gives
its steps the same parent without asking anyone. The instance's span itself is emitted by the
worker whose checkpoint ends the instance, from the instance's creation to its end. A SQL
step's statement carries its span's context in a comment (sqlcommenter's form), which the
server's logs and pg_stat_activity show.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from .. import __version__
from ..core.interpreter import Outcome
from .queries import Task

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_DESCRIPTION = 1024  # of an error in a span's status: enough to tell what went wrong
# The ids the next span started in this context gets (see _InstanceIds); None: the usual ones.
_FORCED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "pgdurable_forced_span_ids", default=None
)


class TracingUnavailable(Exception):
    """Tracing cannot be set up as configured (an exporter not installed...)."""


def instance_ids(instance_id: str, created_at: datetime | None) -> tuple[int, int]:
    """The trace id of an instance and the span id of its span: the same on every worker."""
    micros = 0 if created_at is None else (created_at - _EPOCH) // _MICROSECOND
    digest = hashlib.sha256(f"pgdurable\0{instance_id}\0{micros}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1  # 0 is no id at all
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace_id, span_id


class _InstanceIds(IdGenerator):
    """A tracer's id generator that gives the ids an instance's span must have when asked to
    (_FORCED, set only around that span's start, in the context of the worker's thread), and
    otherwise those of the generator it wraps."""

    def __init__(self, inner: IdGenerator):
        self.inner = inner

    def generate_span_id(self) -> int:
        forced = _FORCED.get()
        return forced[1] if forced is not None else self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = _FORCED.get()
        return forced[0] if forced is not None else self.inner.generate_trace_id()


def provider_from_env() -> TracerProvider:
    """A tracer provider configured by the standard OTEL_* variables: the resource
    (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES; service.name "pgdurable" if neither names
    one), the sampler (OTEL_TRACES_SAMPLER, read by the SDK) and the exporters
    (OTEL_TRACES_EXPORTER, default "otlp", each configured by its own variables, behind a
    batching span processor)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "pgdurable"}))
    provider = TracerProvider(resource=resource)
    names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    for name in (n.strip() for n in names.split(",")):
        if name in ("", "none"):
            continue
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            hint = " (pip install opentelemetry-exporter-otlp)" if name == "otlp" else ""
            raise TracingUnavailable(
                f"OTEL_TRACES_EXPORTER names '{name}', which is not installed{hint}"
            )
        exporter = next(iter(found)).load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _error_text(result: str | None) -> str:
    """The error of a failed node's result, a JSON string (as df.nodes.result holds it)."""
    try:
        text = json.loads(result or '""')
    except ValueError:
        return result or ""
    return text if isinstance(text, str) else result or ""


class Tracing:
    """The spans of one worker's steps and instances (telemetry.Tracing), made by
    ``provider``'s tracer."""

    def __init__(self, provider: trace.TracerProvider, worker_id: uuid.UUID):
        self.tracer = provider.get_tracer("pgdurable", __version__)
        # The SDK's tracer makes ids with its id_generator: wrapped once (a provider's tracer
        # may be shared by several workers, each in its own thread: _FORCED is per context).
        # Another implementation's tracer gives instance spans ids of its own, which leaves
        # their steps without their parent.
        inner = getattr(self.tracer, "id_generator", None)
        if isinstance(inner, IdGenerator) and not isinstance(inner, _InstanceIds):
            self.tracer.id_generator = _InstanceIds(inner)  # type: ignore[attr-defined]
        self.worker_id = str(worker_id)

    def _parent(self, task: Task) -> otel_context.Context:
        """The context of ``task``'s instance's span, whichever worker emits it."""
        trace_id, span_id = instance_ids(task.instance_id, task.created_at)
        parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=self._flags(trace_id))
        return trace.set_span_in_context(NonRecordingSpan(parent))

    def _flags(self, trace_id: int) -> TraceFlags:
        """Whether the instance's span is sampled (decided by its trace id alone, as its root
        span will be, by the samplers that look at anything): its steps' spans follow."""
        sampler = getattr(self.tracer, "sampler", None)
        if sampler is None:
            return TraceFlags(TraceFlags.SAMPLED)
        decision = sampler.should_sample(None, trace_id, "pgdurable instance").decision
        return TraceFlags(TraceFlags.SAMPLED if decision.is_sampled() else TraceFlags.DEFAULT)

    def step_began(self, task: Task, kind: str, node_id: str) -> Any:
        """Start the span of step ``node_id`` (of ``kind``) that ``task`` runs."""
        return self.tracer.start_span(
            f"pgdurable step {kind}",
            context=self._parent(task),
            attributes={
                "pgdurable.instance.id": task.instance_id,
                "pgdurable.node.id": node_id,
                "pgdurable.step.kind": kind,
                "pgdurable.task.id": task.id,
                "pgdurable.task.attempt": task.attempts,
                "pgdurable.worker.id": self.worker_id,
            },
        )

    @staticmethod
    def commented(sql: str, span: Any) -> str:
        """``sql`` with ``span``'s context in a comment, sqlcommenter's
        ``/*traceparent='00-<trace>-<span>-<flags>'*/``, on a line of its own after the
        statement: a ``--`` comment that ends the statement cannot swallow it, and it moves
        no error position in the statement."""
        ctx = span.get_span_context()
        return (
            f"{sql}\n/*traceparent='00-{ctx.trace_id:032x}-{ctx.span_id:016x}"
            f"-{int(ctx.trace_flags):02x}'*/"
        )

    @staticmethod
    def step_ended(span: Any, status: str, error: str | None) -> None:
        """End a step's span: ``completed``, or ``failed`` with ``error`` (its node's result)."""
        span.set_attribute("pgdurable.step.status", status)
        if status == "failed":
            span.set_status(Status(StatusCode.ERROR, _error_text(error)[:_MAX_DESCRIPTION]))
        span.end()

    @staticmethod
    def step_abandoned(span: Any) -> None:
        """End the span of a step that ended without an outcome (see telemetry.py)."""
        span.set_attribute("pgdurable.step.status", "abandoned")
        span.end()

    def instance_ended(self, task: Task, outcome: Outcome) -> None:
        """Emit the span of ``task``'s instance, from its creation to now."""
        ids = instance_ids(task.instance_id, task.created_at)
        attributes: dict[str, Any] = {
            "pgdurable.instance.id": task.instance_id,
            "pgdurable.instance.status": outcome.status,
            "pgdurable.instance.submitted_by": task.role,
        }
        if task.label is not None:
            attributes["pgdurable.instance.label"] = task.label
        start = None
        if task.created_at is not None:
            start = (task.created_at - _EPOCH) // _MICROSECOND * 1000
        forced = _FORCED.set(ids)
        try:
            span = self.tracer.start_span(
                "pgdurable instance",
                context=otel_context.Context(),  # a root: the trace is the instance's
                attributes=attributes,
                start_time=start,
            )
        finally:
            _FORCED.reset(forced)
        if outcome.status == "failed":
            span.set_status(Status(StatusCode.ERROR, outcome.output[:_MAX_DESCRIPTION]))
        span.end(end_time=time.time_ns())
