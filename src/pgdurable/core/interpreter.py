"""The graph interpreter: pure functions from (graph, state, event) to a Transition.

No I/O happens here. The worker feeds events (an instance starts, a step finished, a timer
fired) and persists what comes back: the new state, node status writes, tasks to run, tasks
to drop, and the instance outcome. All of it is plain data so it can be stored as JSON and
tested without a database.

Model. An *activation* is one execution of one node. Activations form a tree mirroring the
part of the graph that is running; a finished activation reports its outcome to its parent,
which decides what runs next. Outcomes are ``ok`` (with a result), ``fail`` (with an error
text) or ``brk`` (a df.break unwinding to the nearest loop, with its value).

Named results live in *environments*: JOIN/RACE branches start from the names their fork
had and their names merge back into it when the fork finishes, so concurrent branches never
see each other's results. *Executions* give the ``status_details`` stamps that monitoring
groups nodes by: the instance root and every JOIN/RACE branch and nested loop have one, with
a generation bumped per loop iteration.

The state types, and the rule that a transition never changes the state it is given, are in
:mod:`pgdurable.core.state`. What each node type does is in :data:`NODE_HANDLERS`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from .cron import cron_error, next_tick
from .http_request import build_request, idempotency_key
from .model import UNNAMED_RESULT_TYPES, Graph, GraphError, Node, expand
from .state import (
    ROOT,
    Activation,
    Ended,
    Execution,
    ForkActivation,
    InstanceState,
    JoinActivation,
    LoopActivation,
    MapActivation,
    RetryActivation,
    Slot,
    Suspended,
    TimeoutActivation,
    to_json,
)
from .substitute import SubstitutionError, substitute_json, substitute_sql
from .truth import is_true

MAX_LOOP_ITERATIONS = 100_000
MAX_MAP_ITEMS = 10_000
"""The most items a df.map runs (as many as $name.* expands into a SQL VALUES list)."""
# A loop iteration takes at least this long; a quick one waits on a timer before the next,
# so a loop without a sleep cannot spin through its iteration limit in a burst of checkpoints.
MIN_ITERATION_SECONDS = 1.0

LOOP_LOST_RACE = "Loop branch cancelled after losing RACE"
BREAK_OUTSIDE_LOOP = (
    "df.break() was called outside of a loop. df.break() may only be used inside df.loop()."
)
LOOP_LIMIT = (
    f"Loop exceeded maximum iteration count of {MAX_LOOP_ITERATIONS}. "
    "Use df.break() to exit the loop or restructure the workflow."
)

TIMED_OUT = "Timed out after {seconds}s (df.timeout)"
RESTARTED = "restarted: attempts counted afresh"
NOTHING_TO_RESTART = (
    "df.restart: this instance ended without a state to restart from (it ended under an "
    "earlier pgdurable release); start it again instead"
)
CANCELLED_BY_TIMEOUT = "Cancelled: the enclosing df.timeout expired after {seconds}s"

# The failure classes a df.retry 'http' entry stands for: transient ones only, never a
# request the policy blocked or a malformed one.
HTTP_TRANSIENT = frozenset({"http_5xx", "http_timeout", "http_connection", "http_request"})

# Failures of a step that its df.timeout's backstop causes: a statement cancelled by
# statement_timeout (SQLSTATE 57014), an HTTP request or a Python step cut short.
_BACKSTOPS = frozenset({"57014", "http_timeout", "call_timeout"})
# Failures that no df.retry retries, whatever its retry_on: running the step again cannot
# change them (a Python step's arguments that do not bind, a result that is not JSON, a step
# its submitter may not call).
NEVER_RETRIED = frozenset({"call_invalid", "call_forbidden", "graph_invalid"})
# The steps whose result may be the rest of the workflow (df.continue_with).
_CONTINUABLE = frozenset({"SQL", "CALL"})
# Timers further away than this (a century) are set at this distance: PostgreSQL's
# timestamps end in the year 294276.
MAX_WAIT_SECONDS = 100 * 365 * 86400.0

# The default of pg_durable.max_result_bytes: the most bytes of a SQL step's result, and of its
# statement once named results are substituted into it (10 MiB, as for HTTP responses). Any
# transition may start a SQL step, so every entry point takes the limit (max_statement_bytes).
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
CALL_TOO_LARGE = (
    "Python step '{name}': arguments too large after substitution: more than {limit} bytes "
    "(pg_durable.max_result_bytes)"
)
STATEMENT_TOO_LARGE = (
    "SQL step statement too large after substitution: more than {limit} bytes "
    "(pg_durable.max_result_bytes)"
)


@dataclass(frozen=True)
class NodeWrite:
    """Stamp a node: ``running`` (result cleared), ``completed`` or ``failed`` with a result.

    ``error`` changes the node's error column (a df.retry's attempt history): ``("set",
    text)`` replaces it, ``("append", line)`` adds a line; None leaves it alone.
    """

    node_id: str
    status: Literal["running", "completed", "failed"]
    result: str | None  # JSON text
    execution_id: str
    error: tuple[Literal["set", "append"], str] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Work for the worker: run a SQL statement, an HTTP request or a Python step, wake up at
    ``run_at`` (epoch seconds), or wait for a signal until ``run_at``."""

    activation: int
    kind: Literal["sql", "http", "timer", "signal", "call"]
    node_id: str
    payload: dict[str, Any] | None = None
    run_at: float | None = None  # None: now (a signal wait: no deadline)


@dataclass(frozen=True)
class Outcome:
    """The instance finished: ``completed`` with the root result, or ``failed`` with an error."""

    status: Literal["completed", "failed"]
    output: str


@dataclass(frozen=True)
class EndedExecution:
    """A root loop began its next iteration: the root execution of ``generation`` ended, its
    body's result ``output`` (JSON text; None for a NULL result). Monitoring keeps a history
    of these (df._executions)."""

    generation: int
    output: str | None


@dataclass
class Transition:
    """Everything one event changed. ``next_state`` is the state to pass with the next event
    (None: the instance failed before it had one). For an instance that failed, it is the
    state just before the failure, which :func:`resume` runs again (df.restart)."""

    next_state: InstanceState | None
    writes: list[NodeWrite] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # activations whose tasks must go
    outcome: Outcome | None = None
    ended_execution: EndedExecution | None = None
    # A step returned the rest of the workflow (df.continue_with): the graph with its nodes,
    # the nodes to record, and the steps each generated graph runs in place of (step, root).
    graph: Graph | None = None
    new_nodes: list[Node] = field(default_factory=list)
    continued: list[tuple[str, str]] = field(default_factory=list)

    @property
    def state(self) -> dict[str, Any]:
        """``next_state`` in the form the store keeps (:func:`state.to_json`), built anew at
        each access."""
        return to_json(self.next_state)

    @property
    def generation(self) -> int:
        """The root execution's generation (iterations of a root loop), for monitoring."""
        return self.next_state.execs[ROOT].gen if self.next_state else 1


# -- public entry points -----------------------------------------------------------------------


def start(
    graph: Graph,
    variables: dict[str, str],
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """Begin executing an instance: activate the root node. (Every entry point takes
    ``max_statement_bytes``: a SQL step whose statement is longer once substituted fails.)"""
    initial = InstanceState.initial(graph.instance_id)
    run = _Run(graph, initial, variables, now, max_statement_bytes)
    run.activate(graph.root, parent=None, slot=None, exec_id=ROOT, env_id=ROOT)
    return run.finish_transition()


def step_succeeded(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    result: str,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
    continue_with: Mapping[str, Any] | None = None,
) -> Transition:
    """A SQL step's statement ran; ``result`` is its result JSON. With ``continue_with`` (a
    graph the step returned, which the worker checked came from df.continue_with or a Python
    step), the step runs that graph in its place instead of ending."""
    return _leaf_finished(
        graph, state, variables, activation, Ended("ok", result), now, max_statement_bytes,
        continue_with,
    )  # fmt: skip


def step_failed(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    error: str,
    now: float,
    code: str | None = None,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """A step failed with ``error``; the failure propagates to the enclosing nodes until one
    handles it (a df.retry, or the instance fails). ``code`` classifies it for df.retry: a
    SQLSTATE, or one of the ``http_*`` classes of HTTP steps."""
    return _leaf_finished(
        graph, state, variables, activation, Ended("fail", error, code), now, max_statement_bytes
    )


def timer_fired(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """A timer of ``activation`` is due: a SLEEP ends, a padded loop iteration begins, a
    df.retry backoff is over, or a df.timeout expires."""
    run = _Run(graph, state, variables, now, max_statement_bytes)
    act = run.acts.get(activation)
    if act is not None:  # else a stale timer: the activation is gone
        node = graph[act.node]
        handlers = NODE_HANDLERS.get(node.type)
        if handlers is not None and handlers.timer is not None:
            handlers.timer(run, activation, act, node)
    return run.finish_transition()


def signal_received(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    data: Any,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """The SIGNAL wait of ``activation`` consumed a signal carrying ``data`` (parsed JSON)."""
    result = {"signal_name": _signal_name(graph, state, activation), "timed_out": False}
    result["data"] = data
    return _leaf_finished(
        graph, state, variables, activation, Ended("ok", _compact(result)), now, max_statement_bytes
    )


def signal_timed_out(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """The SIGNAL wait of ``activation`` reached its timeout with no signal."""
    result = {"signal_name": _signal_name(graph, state, activation), "timed_out": True}
    result["data"] = None
    return _leaf_finished(
        graph, state, variables, activation, Ended("ok", _compact(result)), now, max_statement_bytes
    )


def resume(
    graph: Graph,
    state: InstanceState | None,
    variables: dict[str, str],
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """Restart a failed or cancelled instance (df.restart) from ``state``, the state it kept
    when it ended: for a failure, the state just before it (see :class:`Transition`); for a
    cancel, the state it had. Every activation in it runs on from where it was: the steps
    that were running or waiting run again (their statements and arguments substituted
    anew, the same idempotency keys: same step, same execution), a SLEEP, a signal wait or
    a schedule wait starts waiting anew, a df.timeout gets its whole duration again, a
    df.retry counts its attempts afresh, a JOIN runs its failed branches again from where
    they failed (:class:`state.Suspended`). What completed stays completed. None (the
    instance failed before it ran) starts it from the beginning."""
    if state is None:
        return start(graph, variables, now, max_statement_bytes=max_statement_bytes)
    if not state.acts:
        return fail_instance(state, NOTHING_TO_RESTART)
    run = _Run(graph, state, variables, now, max_statement_bytes)
    run.resume()
    return run.finish_transition()


def chain(first: Transition, second: Transition, ran: int) -> Transition:
    """``first`` then ``second``, as one transition that one checkpoint writes. ``second``
    consumed the task of activation ``ran`` that ``first`` queued (the worker ran it in the
    same transaction), so that task is never written; nor are tasks of ``first`` that
    ``second`` abandoned."""
    if first.outcome is not None:
        raise ValueError("cannot chain onto a transition that ended the instance")
    queued = {t.activation for t in first.tasks}
    gone = {ran} | (queued & set(second.dropped))
    return Transition(
        next_state=second.next_state,
        writes=[*first.writes, *second.writes],
        tasks=[t for t in first.tasks if t.activation not in gone] + list(second.tasks),
        dropped=[*first.dropped, *(d for d in second.dropped if d not in queued)],
        outcome=second.outcome,
        ended_execution=second.ended_execution or first.ended_execution,
        graph=second.graph or first.graph,
        new_nodes=[*first.new_nodes, *second.new_nodes],
        continued=[*first.continued, *second.continued],
    )


class GraphOutdated(LookupError):
    """The state runs nodes the graph does not have: a step returned the rest of the workflow
    (df.continue_with) since the graph was read. Read it again."""


def covers(graph: Graph, state: InstanceState | None) -> bool:
    """Whether ``graph`` has every node ``state`` runs (see :class:`GraphOutdated`)."""
    return state is None or all(act.node in graph.nodes for act in state.acts.values())


def is_waiting(state: InstanceState | None, activation: int) -> bool:
    """Whether ``activation`` still exists, i.e. a task of it is still wanted."""
    return state is not None and activation in state.acts


def fail_instance(state: InstanceState | None, error: str) -> Transition:
    """The instance cannot run at all (e.g. its role is gone): fail it without running nodes."""
    return Transition(next_state=state, outcome=Outcome("failed", error))


def retryable(code: str | None, retry_on: Any) -> bool:
    """Whether a failure classified ``code`` is retried by a df.retry whose ``retry_on`` is
    given (None: every failure is). Entries are SQLSTATE codes ('40001'), SQLSTATE classes
    ('40'), 'http' (any transient HTTP failure), an ``http_*`` class, 'python' (an exception
    a Python step raised), or 'timeout' (a df.timeout, HTTP or Python step timeout). Failures
    in :data:`NEVER_RETRIED` are never retried."""
    if code in NEVER_RETRIED:
        return False
    if retry_on is None:
        return True
    if code is None:
        return False
    for entry in retry_on:
        if entry == code or (entry == "http" and code in HTTP_TRANSIENT):
            return True
        if entry == "timeout" and code in ("timeout", "http_timeout", "call_timeout"):
            return True
        if len(entry) == 2 and len(code) == 5 and code.startswith(entry):
            return True
    return False


def backoff_delay(config: Any, attempt: int, seed: str) -> float:
    """Seconds to wait after failed ``attempt`` (1-based): exponential from backoff_seconds,
    capped at max_backoff_seconds, with "equal jitter" (between half and all of it). The
    jitter comes from a hash of ``seed`` and the attempt so the interpreter stays pure and
    instances that failed together do not retry together."""
    base = float(config.get("backoff_seconds", 1))
    cap = float(config.get("max_backoff_seconds", 60))
    delay = min(cap, base * 2.0 ** min(attempt - 1, 60), MAX_WAIT_SECONDS)
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    return delay * (0.5 + 0.5 * fraction)


def _leaf_finished(
    graph: Graph,
    state: InstanceState,
    variables: dict[str, str],
    activation: int,
    ended: Ended,
    now: float,
    max_statement_bytes: int,
    continue_with: Mapping[str, Any] | None = None,
) -> Transition:
    run = _Run(graph, state, variables, now, max_statement_bytes)
    if activation in run.acts:  # else a stale event: the activation is gone
        if continue_with is not None and graph[run.acts[activation].node].type in _CONTINUABLE:
            run.continue_with(activation, continue_with)
        else:
            run.finish(activation, ended)
    return run.finish_transition()


def _signal_name(graph: Graph, state: InstanceState, activation: int) -> Any:
    act = state.acts.get(activation)
    return graph[act.node].config.get("signal_name") if act else None


# -- values ------------------------------------------------------------------------------------


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _parse(text: str) -> Any:
    """A result string as JSON; text that is not JSON counts as a JSON string, as it does
    wherever a result is read."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _as_json_text(text: str) -> str:
    """Text suitable for a jsonb column: the text itself if it is JSON, else a JSON string."""
    try:
        json.loads(text)
    except ValueError:
        return _compact(text)
    return text


def _number_text(value: Any) -> str:
    """A number as a person writes it: 10, 0.5 (not 10.0)."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _break_value(node: Node) -> str:
    raw = node.config.get("break_value")
    if raw is None:
        return "null"
    if not isinstance(raw, str):
        return _compact(raw)
    try:
        return _compact(json.loads(raw))
    except ValueError:
        return _compact(raw)


def _item_scope(body: str, index: int) -> str:
    """The last part of a df.map item's execution scope: 8 hex digits, like the node id that
    ends a JOIN branch's, for monitoring to read scopes the same way."""
    return hashlib.sha256(f"{body}#{index}".encode()).hexdigest()[:8]


_A = TypeVar("_A", bound=Activation)


def _expect(act: Activation, kind: type[_A]) -> _A:
    """``act`` as the record its node type keeps (its start handler stored that one)."""
    assert isinstance(act, kind), f"activation of node {act.node} is a {type(act).__name__}"
    return act


def _fields(act: Activation) -> tuple[str, int | None, Slot, int, int]:
    """The fields every activation has, to build a node type's own record from the plain one
    that :meth:`_Run.activate` made."""
    return act.node, act.parent, act.slot, act.exec_id, act.env_id


# -- the machinery -----------------------------------------------------------------------------


class _Run:
    """One transition in progress: private copies of the state's tables, changed in place
    (the records in them are replaced, never changed), and the effects collected so far."""

    def __init__(
        self,
        graph: Graph,
        state: InstanceState,
        variables: dict[str, str],
        now: float,
        max_statement_bytes: int = DEFAULT_MAX_BYTES,
    ):
        if not covers(graph, state):
            raise GraphOutdated(f"instance {graph.instance_id} has nodes this graph lacks")
        self.graph = graph
        self.variables = variables
        self.now = now
        self.max_statement_bytes = max_statement_bytes
        self.next_id = state.next_id
        # Shallow copies: the caller's state keeps its tables; records and environments,
        # immutable, are shared until replaced.
        self.acts: dict[int, Activation] = dict(state.acts)
        self.execs: dict[int, Execution] = dict(state.execs)
        self.envs: dict[int, Mapping[str, str]] = dict(state.envs)
        self.writes: list[NodeWrite] = []
        self.tasks: list[TaskSpec] = []
        self.dropped: list[int] = []
        self.outcome: Outcome | None = None
        self.ended_execution: EndedExecution | None = None
        self.new_nodes: list[Node] = []
        self.continued: list[tuple[str, str]] = []
        self._filling: set[int] = set()  # df.maps starting items now (see _fill)
        # A failure (or a df.break) on its way up, whose origin was remembered (see finish),
        # and the state just before that origin: what the instance keeps to restart from,
        # should the failure end it.
        self._unwinding = False
        self._before_failure: InstanceState | None = None

    # -- bookkeeping ---------------------------------------------------------------------------

    def _new_id(self) -> int:
        n = self.next_id
        self.next_id = n + 1
        return n

    def _new_exec(self, parent_exec: int, child_root: str) -> int:
        parent = self.execs[parent_exec]
        eid = self._new_id()
        self.execs[eid] = Execution(f"{parent.scope}::{parent.gen}::{child_root}", 1)
        return eid

    def _new_env(self, copy_of: int) -> int:
        eid = self._new_id()
        self.envs[eid] = self.envs[copy_of]  # shared until one of them binds a name
        return eid

    def _bind(self, env_id: int, names: Mapping[str, str]) -> None:
        self.envs[env_id] = {**self.envs[env_id], **names}

    def _stamp(self, exec_id: int) -> str:
        ex = self.execs[exec_id]
        return f"{ex.scope}::{ex.gen}"

    def _write(
        self,
        act: Activation,
        status: Literal["running", "completed", "failed"],
        result: str | None,
        error: tuple[Literal["set", "append"], str] | None = None,
    ) -> None:
        stamp = self._stamp(act.exec_id)
        self.writes.append(NodeWrite(act.node, status, result, stamp, error))

    def _remove(self, aid: int) -> Activation:
        """Take activation ``aid`` out of the state with the executions and environments it
        owns. Its children are gone already: a node ends only after its children ended or
        were dropped. (Freeing by owner costs nothing where a sweep for unused ones at each
        transition would read the whole state, as many times as a large JOIN has branches.)"""
        act = self.acts.pop(aid)
        if isinstance(act, ForkActivation):
            for eid in act.branch_execs:
                del self.execs[eid]
            for eid in act.branch_envs:
                del self.envs[eid]
        elif isinstance(act, LoopActivation) and not act.inline:
            del self.execs[act.loop_exec]
        elif isinstance(act, MapActivation):
            for _, eid, vid in act.running:
                del self.execs[eid]
                del self.envs[vid]
        return act

    def _children(self) -> dict[int, list[tuple[int, Slot]]]:
        """Every live activation's children, in activation order: one pass over the state,
        for the few events that drop whole subtrees."""
        index: dict[int, list[tuple[int, Slot]]] = {}
        for aid, act in self.acts.items():
            if act.parent is not None:
                index.setdefault(act.parent, []).append((aid, act.slot))
        return index

    def finish_transition(self) -> Transition:
        """The transition: the new state and the effects collected."""
        # A RACE decided while its branches were still starting dropped activations that
        # had already asked for work; that work must never be queued.
        tasks = [t for t in self.tasks if t.activation in self.acts]
        if self.outcome is not None and self.outcome.status == "failed":
            assert self._before_failure is not None
            state = self._before_failure
        else:
            state = InstanceState(self.next_id, self.acts, self.execs, self.envs)
        return Transition(
            state,
            self.writes,
            tasks,
            self.dropped,
            self.outcome,
            self.ended_execution,
            self.graph if self.new_nodes else None,
            self.new_nodes,
            self.continued,
        )

    def continue_with(self, aid: int, envelope: Mapping[str, Any]) -> None:
        """Step ``aid`` returned the rest of the workflow: run that graph in its place (as
        its child), and end the step with the graph's outcome."""
        act = self.acts[aid]
        node = self.graph[act.node]
        seed = f"{self.graph.instance_id}:{self._stamp(act.exec_id)}:{node.id}:{self.next_id}"
        try:
            root, nodes = expand(envelope, self.graph, node.id, seed)
        except GraphError as exc:
            error = f"the graph step {node.id} returned is invalid: {exc}"
            self.finish(aid, Ended("fail", error, "graph_invalid"))
            return
        grown = {**self.graph.nodes, **{n.id: n for n in nodes}, node.id: replace(node, left=root)}
        self.graph = replace(self.graph, nodes=grown)
        self.new_nodes += nodes
        self.continued.append((node.id, root))
        self.activate(root, aid, "left", act.exec_id, act.env_id)

    def _child_of_step(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        """The graph a step continued with ended: so does the step, as it did."""
        self.finish(aid, end)

    # -- restart -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Run on every activation of the state from where it was (see :func:`resume`)."""
        # A JOIN's failed branches come back as they were when they failed, and with them
        # any failed branches of the JOINs inside them.
        joins = [aid for aid, a in self.acts.items() if isinstance(a, JoinActivation)]
        while joins:
            aid = joins.pop()
            join = _expect(self.acts[aid], JoinActivation)
            if not join.suspended:
                continue
            done = list(join.done)
            for slot, branch in join.suspended:
                self.acts.update(branch.acts)
                self.execs.update(branch.execs)
                self.envs.update(branch.envs)
                done[slot] = None
                joins += [b for b, a in branch.acts.items() if isinstance(a, JoinActivation)]
            self.acts[aid] = replace(join, done=tuple(done), suspended=())
        # Parents before their children: a step reads its enclosing df.timeout's deadline and
        # df.retry's attempt, which are renewed first.
        children = self._children()
        order = [aid for aid, a in self.acts.items() if a.parent is None]
        i = 0
        while i < len(order):
            order += (child for child, _ in children.get(order[i], ()))
            i += 1
        for aid in order:
            if self.outcome is not None:
                return
            act = self.acts.get(aid)
            if act is not None:  # else a step that failed again at once took it along
                self._resume_one(aid, act, aid in children)

    def _resume_one(self, aid: int, act: Activation, has_children: bool) -> None:
        node = self.graph[act.node]
        if isinstance(act, TimeoutActivation):
            limit = min(float(node.config["timeout_seconds"]), MAX_WAIT_SECONDS)
            act = replace(act, deadline=self.now + limit)
            self.acts[aid] = act
            self.tasks.append(TaskSpec(aid, "timer", node.id, None, act.deadline))
        elif isinstance(act, RetryActivation):
            self._write(act, "running", None, ("append", RESTARTED))
            if act.phase == "backoff":
                self._begin_attempt(aid, replace(act, attempt=0))
            else:
                self.acts[aid] = replace(act, attempt=1)
            return
        elif isinstance(act, LoopActivation) and act.phase == "pad":
            due = act.started + MIN_ITERATION_SECONDS
            self.tasks.append(TaskSpec(aid, "timer", node.id, None, due))
        elif type(act) is Activation and not has_children:
            # A step (or a node that failed as it began): it begins again.
            self._write(act, "running", None)
            self._begin(aid, act, node)
            return
        self._write(act, "running", None)

    # -- activation ----------------------------------------------------------------------------

    def activate(
        self, node_id: str, parent: int | None, slot: Slot, exec_id: int, env_id: int
    ) -> None:
        """Start executing ``node_id`` as a child of ``parent``."""
        node = self.graph[node_id]
        aid = self._new_id()
        act = Activation(node_id, parent, slot, exec_id, env_id)
        self._unwinding = False  # new work: whatever failed before was handled
        self.acts[aid] = act
        self._write(act, "running", None)
        self._begin(aid, act, node)

    def _begin(self, aid: int, act: Activation, node: Node) -> None:
        """Run what ``node``'s type does when it starts (its handler)."""
        handlers = NODE_HANDLERS.get(node.type)
        if handlers is None:
            error = f"{node.type} steps are not supported by this pgdurable worker yet"
            self.finish(aid, Ended("fail", error))
        else:
            handlers.start(self, aid, act, node)

    def _start_sql(self, aid: int, act: Activation, node: Node) -> None:
        try:
            text = substitute_sql(
                node.query or "",
                self.envs[act.env_id],
                self.variables,
                self.graph.instance_id,
                self.graph.label,
            )
        except SubstitutionError as exc:
            self.finish(aid, Ended("fail", str(exc)))
            return
        # Named results are at most this big each, but a statement may use many, or one many
        # times; the task row and the worker that claims it must not hold more.
        limit = self.max_statement_bytes
        if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
            self.finish(aid, Ended("fail", STATEMENT_TOO_LARGE.format(limit=limit)))
            return
        payload: dict[str, Any] = {"sql": text}
        self._add_deadline(act, payload)
        self.tasks.append(TaskSpec(aid, "sql", node.id, payload))

    def _start_http(self, aid: int, act: Activation, node: Node) -> None:
        key = idempotency_key(self._stamp(act.exec_id), node.id)
        try:
            payload = build_request(
                node,
                self.envs[act.env_id],
                self.variables,
                self.graph.instance_id,
                self.graph.label,
                key,
            )
        except SubstitutionError as exc:
            self.finish(aid, Ended("fail", str(exc)))
            return
        self._add_deadline(act, payload)
        self.tasks.append(TaskSpec(aid, "http", node.id, payload))

    def _start_call(self, aid: int, act: Activation, node: Node) -> None:
        try:
            args = substitute_json(
                node.config.get("args", {}),
                self.envs[act.env_id],
                self.variables,
                self.graph.instance_id,
                self.graph.label,
            )
        except SubstitutionError as exc:
            self.finish(aid, Ended("fail", str(exc)))
            return
        payload: dict[str, Any] = {
            "name": node.config["name"],
            "args": args,
            "idempotency_key": idempotency_key(self._stamp(act.exec_id), node.id),
            "attempt": self._retry_attempt(act),
        }
        limit = self.max_statement_bytes
        if len(_compact(args).encode()) > limit:
            error = CALL_TOO_LARGE.format(name=node.config["name"], limit=limit)
            self.finish(aid, Ended("fail", error, "call_invalid"))
            return
        self._add_deadline(act, payload)
        self.tasks.append(TaskSpec(aid, "call", node.id, payload))

    def _ancestors(self, act: Activation) -> Iterator[Activation]:
        """The activations enclosing ``act``, nearest first."""
        parent = act.parent
        while parent is not None:
            ancestor = self.acts[parent]
            yield ancestor
            parent = ancestor.parent

    def _retry_attempt(self, act: Activation) -> int:
        """The attempt of the nearest enclosing df.retry (1 without one)."""
        attempts = (a.attempt for a in self._ancestors(act) if isinstance(a, RetryActivation))
        return next(attempts, 1)

    def _add_deadline(self, act: Activation, payload: dict[str, Any]) -> None:
        """Tell the worker when the nearest enclosing df.timeout expires, so a statement or
        request cannot outlive it even if the cancel that the timeout sends is lost."""
        deadlines = [a.deadline for a in self._ancestors(act) if isinstance(a, TimeoutActivation)]
        if deadlines:
            payload["deadline"] = min(deadlines)

    def _start_sleep(self, aid: int, act: Activation, node: Node) -> None:
        seconds = min(int(node.query or "0"), MAX_WAIT_SECONDS)
        self.tasks.append(TaskSpec(aid, "timer", node.id, None, self.now + seconds))

    def _sleep_over(self, aid: int, act: Activation, node: Node) -> None:
        seconds = int(node.query or "0")
        self.finish(aid, Ended("ok", f'{{"slept": true, "seconds": {seconds}}}'))

    def _start_wait_schedule(self, aid: int, act: Activation, node: Node) -> None:
        # The next tick is computed now, when the wait starts, from the database clock (UTC);
        # a tick missed while no worker ran fires once, late (docs/schedules.md).
        expr = str(node.config.get("cron_expr", ""))
        error = cron_error(expr)
        if error is not None:
            self.finish(aid, Ended("fail", f"Invalid cron expression '{expr}': {error}"))
            return
        tick = next_tick(expr, self.now)
        self.tasks.append(TaskSpec(aid, "timer", node.id, None, tick))

    def _schedule_reached(self, aid: int, act: Activation, node: Node) -> None:
        self.finish(aid, Ended("ok", '{"scheduled": true}'))

    def _start_signal(self, aid: int, act: Activation, node: Node) -> None:
        name = node.config.get("signal_name")
        timeout = node.config.get("timeout_seconds")
        deadline = self.now + float(timeout) if timeout else None
        payload = {"signal_name": name, "deadline": deadline}
        self.tasks.append(TaskSpec(aid, "signal", node.id, payload, deadline))

    def _start_break(self, aid: int, act: Activation, node: Node) -> None:
        self.finish(aid, Ended("brk", _break_value(node)))

    def _start_retry(self, aid: int, act: Activation, node: Node) -> None:
        self._write(act, "running", None, ("set", ""))  # a new execution: a new history
        self._begin_attempt(aid, RetryActivation(*_fields(act), attempt=0, phase="body"))

    def _retry_timer(self, aid: int, act: Activation, node: Node) -> None:
        retry = _expect(act, RetryActivation)
        if retry.phase == "backoff":  # else a stale timer
            self._begin_attempt(aid, retry)

    def _begin_attempt(self, aid: int, retry: RetryActivation) -> None:
        """Run the next attempt of df.retry ``aid``."""
        retry = replace(retry, attempt=retry.attempt + 1, phase="body")
        self.acts[aid] = retry
        body = self.graph[retry.node].left
        assert body
        self.activate(body, aid, "body", retry.exec_id, retry.env_id)

    def _start_timeout(self, aid: int, act: Activation, node: Node) -> None:
        limit = min(float(node.config["timeout_seconds"]), MAX_WAIT_SECONDS)
        timeout = TimeoutActivation(*_fields(act), deadline=self.now + limit)
        self.acts[aid] = timeout
        self.tasks.append(TaskSpec(aid, "timer", node.id, None, timeout.deadline))
        assert node.left
        self.activate(node.left, aid, "body", act.exec_id, act.env_id)

    def _time_out(self, aid: int, act: Activation, node: Node) -> None:
        """df.timeout ``aid`` expired before its step finished: abandon the step."""
        if not self._unwinding:  # the timer fired: the failure starts here, not in the step
            self._before_failure = self._snapshot()
        seconds = _number_text(node.config["timeout_seconds"])
        children = self._children()
        for child, _ in children.get(aid, ()):
            self._drop_subtree(child, children, CANCELLED_BY_TIMEOUT.format(seconds=seconds))
        self.dropped.append(aid)  # its timer, unless that is what fired
        self._unwinding = True
        self.finish(aid, Ended("fail", TIMED_OUT.format(seconds=seconds), "timeout"))

    def _start_then(self, aid: int, act: Activation, node: Node) -> None:
        assert node.left
        self.activate(node.left, aid, "left", act.exec_id, act.env_id)

    def _start_if(self, aid: int, act: Activation, node: Node) -> None:
        if node.condition:
            self.activate(node.condition, aid, "cond", act.exec_id, act.env_id)
            return
        # df.if_rows: branch on a named SQL result without running anything.
        name = str(node.config.get("result_name"))
        env = self.envs[act.env_id]
        if name not in env:
            self.finish(aid, Ended("fail", f"df.if_rows: result '{name}' not found"))
            return
        try:
            parsed = json.loads(env[name])
        except ValueError as exc:
            self.finish(aid, Ended("fail", f"df.if_rows: invalid result JSON: {exc}"))
            return
        count = parsed.get("row_count") if isinstance(parsed, dict) else None
        if not isinstance(count, int | float) or isinstance(count, bool):
            error = f"df.if_rows: result '{name}' is not a SQL result (missing row_count)"
            self.finish(aid, Ended("fail", error))
            return
        self._take_branch(aid, act, node, count > 0)

    def _take_branch(self, aid: int, act: Activation, node: Node, condition: bool) -> None:
        branch = node.left if condition else node.right
        assert branch
        self.activate(branch, aid, "branch", act.exec_id, act.env_id)

    def _start_join(self, aid: int, act: Activation, node: Node) -> None:
        execs, envs = self._branch_scopes(act, node)
        done = (None,) * len(node.branches)
        self._fork(aid, JoinActivation(*_fields(act), execs, envs, done), node)

    def _start_race(self, aid: int, act: Activation, node: Node) -> None:
        execs, envs = self._branch_scopes(act, node)
        self._fork(aid, ForkActivation(*_fields(act), execs, envs), node)

    def _branch_scopes(
        self, act: Activation, node: Node
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """An execution and an environment for each branch of a fork."""
        execs = tuple(self._new_exec(act.exec_id, b) for b in node.branches)
        envs = tuple(self._new_env(act.env_id) for _ in node.branches)
        return execs, envs

    def _fork(self, aid: int, fork: ForkActivation, node: Node) -> None:
        self.acts[aid] = fork
        for i, branch in enumerate(node.branches):
            if aid not in self.acts:  # an earlier branch already decided a RACE
                return
            self.activate(branch, aid, i, fork.branch_execs[i], fork.branch_envs[i])

    def _start_loop(self, aid: int, act: Activation, node: Node) -> None:
        parent = self.acts[act.parent] if act.parent is not None else None
        # A loop at the root of an execution (the instance, or a JOIN/RACE branch) iterates that
        # execution, whose generation counts the iterations; any other loop gets an execution
        # of its own, so its iterations do not re-stamp the nodes around it.
        inline = parent is None or self.graph[parent.node].type in ("JOIN", "RACE", "MAP")
        loop = LoopActivation(
            *_fields(act),
            loop_exec=act.exec_id if inline else self._new_exec(act.exec_id, node.id),
            iteration=0,
            phase="body",
            started=self.now,
            # Each iteration of a root loop starts again from the names the loop started with,
            # so the state does not grow with iterations.
            base_env=self.envs[act.env_id] if inline else None,
        )
        self._begin_iteration(aid, loop)

    def _loop_timer(self, aid: int, act: Activation, node: Node) -> None:
        loop = _expect(act, LoopActivation)
        if loop.phase == "pad":  # else a stale timer
            self._begin_iteration(aid, loop)

    def _begin_iteration(self, aid: int, loop: LoopActivation) -> None:
        """Start the next iteration of loop ``aid``."""
        if loop.iteration >= MAX_LOOP_ITERATIONS:
            self.finish(aid, Ended("fail", LOOP_LIMIT))
            return
        loop = replace(loop, iteration=loop.iteration + 1, phase="body", started=self.now)
        self.acts[aid] = loop
        if loop.iteration > 1:
            ex = self.execs[loop.loop_exec]
            self.execs[loop.loop_exec] = Execution(ex.scope, ex.gen + 1)
            if loop.loop_exec == ROOT:
                # Iterations are at least MIN_ITERATION_SECONDS apart: one per transition.
                assert self.ended_execution is None
                self.ended_execution = EndedExecution(ex.gen, loop.last)
            if loop.base_env is not None:
                self.envs[loop.env_id] = loop.base_env
                self._write(loop, "running", None)
        body = self.graph[loop.node].left
        assert body
        self.activate(body, aid, "body", loop.loop_exec, loop.env_id)

    # -- completion ----------------------------------------------------------------------------

    def finish(self, aid: int, ended: Ended) -> None:
        """Activation ``aid`` ended; stamp it, bind its name, and tell its parent.

        A failure or a break that starts here (rather than one a child passes up) remembers
        the state before it: should it end the instance, that is the state df.restart runs
        again. Success does nothing of the kind: it costs what it did."""
        if ended.kind != "ok" and not self._unwinding:
            self._before_failure = self._snapshot()
        self._unwinding = False
        act = self._remove(aid)
        node = self.graph[act.node]
        if ended.kind == "fail":
            self._write(act, "failed", _compact(ended.value))
        else:
            self._write(act, "completed", _as_json_text(ended.value))
        if ended.kind == "ok" and node.result_name and node.type not in UNNAMED_RESULT_TYPES:
            self._bind(act.env_id, {node.result_name: ended.value})
        if act.parent is None:
            self._finish_instance(act, ended)
        else:
            parent = self.acts[act.parent]
            parent_node = self.graph[parent.node]
            on_child = NODE_HANDLERS[parent_node.type].child_ended
            assert on_child is not None, f"{parent_node.type} nodes have no children"
            self._unwinding = ended.kind != "ok"
            on_child(self, act.parent, parent, parent_node, act.slot, ended)
            self._unwinding = False

    def _snapshot(self) -> InstanceState:
        """The state as it is now (its tables copied: the transition goes on changing them)."""
        return InstanceState(self.next_id, dict(self.acts), dict(self.execs), dict(self.envs))

    def _finish_instance(self, act: Activation, ended: Ended) -> None:
        if ended.kind == "ok":
            self.outcome = Outcome("completed", ended.value)
        elif ended.kind == "fail":
            self.outcome = Outcome("failed", ended.value)
        else:
            self._write(act, "failed", _compact(BREAK_OUTSIDE_LOOP))
            self.outcome = Outcome("failed", BREAK_OUTSIDE_LOOP)

    def _child_of_then(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        if end.kind == "ok" and slot == "left":
            assert node.right
            self.activate(node.right, aid, "right", act.exec_id, act.env_id)
        else:
            self.finish(aid, end)

    def _child_of_if(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        if end.kind == "ok" and slot == "cond":
            self._take_branch(aid, act, node, is_true(end.value))
        else:
            self.finish(aid, end)

    def _child_of_join(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        join = _expect(act, JoinActivation)
        assert isinstance(slot, int)
        done = (*join.done[:slot], end, *join.done[slot + 1 :])
        ends = [d for d in done if d is not None]
        if len(ends) < len(done):
            if end.kind == "fail":
                suspended = (*join.suspended, (slot, self._suspend(aid, slot)))
                join = replace(join, suspended=suspended)
            self.acts[aid] = replace(join, done=done)
            return
        for i, d in enumerate(ends, start=1):
            if d.kind == "fail":
                # Ended, as the state df.restart runs again should the failure end the
                # instance: the branch that just succeeded is done with.
                self.acts[aid] = replace(join, done=done)
                self.finish(aid, Ended("fail", f"JOIN branch {i} failed: {d.value}", d.code))
                return
        merged: dict[str, str] = {}
        for env_id in join.branch_envs:
            merged.update(self.envs[env_id])
        self._bind(join.env_id, merged)
        for d in ends:
            if d.kind == "brk":
                self.finish(aid, Ended("brk", d.value))
                return
        self.finish(aid, Ended("ok", _compact([_parse(d.value) for d in ends])))

    def _suspend(self, aid: int, slot: int) -> Suspended:
        """What branch ``slot`` of JOIN ``aid`` was running before the failure that ended it:
        its activations and what they owned, from the state remembered at the failure."""
        before = self._before_failure
        assert before is not None  # a failure on its way up remembered it
        children: dict[int, list[int]] = {}
        for child, a in before.acts.items():
            if a.parent is not None:
                children.setdefault(a.parent, []).append(child)
        branch = [c for c in children.get(aid, ()) if before.acts[c].slot == slot]
        acts: dict[int, Activation] = {}
        while branch:
            child = branch.pop()
            acts[child] = before.acts[child]
            branch += children.get(child, ())
        execs: set[int] = set()
        envs: set[int] = set()
        for a in acts.values():
            if isinstance(a, ForkActivation):
                execs.update(a.branch_execs)
                envs.update(a.branch_envs)
            elif isinstance(a, LoopActivation) and not a.inline:
                execs.add(a.loop_exec)
            elif isinstance(a, MapActivation):
                execs.update(e for _, e, _ in a.running)
                envs.update(v for _, _, v in a.running)
        return Suspended(
            acts,
            {e: before.execs[e] for e in execs},
            {v: before.envs[v] for v in envs},
        )

    def _child_of_race(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        race = _expect(act, ForkActivation)
        children = self._children()
        for loser, loser_slot in children.get(aid, ()):
            if loser_slot != slot:
                self._drop_subtree(loser, children)
        if end.kind == "fail":
            side = "left" if slot == 0 else "right"
            self.finish(aid, Ended("fail", f"RACE {side} branch failed: {end.value}", end.code))
            return
        assert isinstance(slot, int)
        self._bind(race.env_id, self.envs[race.branch_envs[slot]])
        self.finish(aid, Ended(end.kind, end.value))

    def _child_of_loop(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        loop = _expect(act, LoopActivation)
        if end.kind == "fail":
            self.finish(aid, end)
        elif end.kind == "brk":
            self.finish(aid, Ended("ok", end.value))
        elif slot == "body":
            loop = replace(loop, last=end.value)
            if node.condition:
                self.acts[aid] = replace(loop, phase="cond")
                self.activate(node.condition, aid, "cond", loop.loop_exec, loop.env_id)
            else:
                self._next_iteration(aid, loop)
        elif is_true(end.value):
            self._next_iteration(aid, loop)
        else:
            assert loop.last is not None  # the body ran before its condition
            self.finish(aid, Ended("ok", loop.last))

    def _next_iteration(self, aid: int, loop: LoopActivation) -> None:
        due = loop.started + MIN_ITERATION_SECONDS
        if self.now < due:
            self.acts[aid] = replace(loop, phase="pad")
            self.tasks.append(TaskSpec(aid, "timer", loop.node, None, due))
        else:
            self._begin_iteration(aid, loop)

    # -- df.map ----------------------------------------------------------------------------

    def _start_map(self, aid: int, act: Activation, node: Node) -> None:
        items = self._map_items(aid, act, node)
        if items is None:
            return
        done: tuple[Ended | None, ...] = (None,) * len(items)
        self.acts[aid] = MapActivation(*_fields(act), len(items), 0, (), done)
        self._fill(aid, node, items)

    def _map_items(self, aid: int, act: Activation, node: Node) -> list[str] | None:
        """The JSON texts of the items of df.map ``aid``: the rows of its source result, or
        the elements of a JSON array; None (the map failed) if there are none to be had."""
        source = str(node.config.get("source"))
        env = self.envs[act.env_id]
        if source not in env:
            self.finish(aid, Ended("fail", f"df.map: result '{source}' not found"))
            return None
        value = _parse(env[source])
        if isinstance(value, dict) and isinstance(value.get("rows"), list):
            value = value["rows"]
        if not isinstance(value, list):
            error = f"df.map: result '{source}' is neither a row set nor a JSON array"
            self.finish(aid, Ended("fail", error))
            return None
        if len(value) > MAX_MAP_ITEMS:
            error = (
                f"df.map: result '{source}' has {len(value)} items, more than the maximum of"
                f" {MAX_MAP_ITEMS}"
            )
            self.finish(aid, Ended("fail", error))
            return None
        return [_compact(v) for v in value]

    def _start_items(self, aid: int, node: Node, items: list[str]) -> None:
        """Start the next items of df.map ``aid``, up to its max_parallel running."""
        limit = int(node.config.get("max_parallel", 10))
        name = str(node.config.get("item", "item"))
        body = node.left
        assert body
        while aid in self.acts:  # an item that ends at once may end the map
            m = _expect(self.acts[aid], MapActivation)
            if m.started >= m.count or len(m.running) >= limit:
                return
            index = m.started
            exec_id = self._new_exec(m.exec_id, _item_scope(body, index))
            env_id = self._new_env(m.env_id)
            self._bind(env_id, {name: items[index]})
            running = (*m.running, (index, exec_id, env_id))
            self.acts[aid] = replace(m, started=index + 1, running=running)
            self.activate(body, aid, index, exec_id, env_id)

    def _child_of_map(self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended) -> None:
        m = _expect(act, MapActivation)
        assert isinstance(slot, int)
        for index, exec_id, env_id in m.running:
            if index == slot:  # the item's scopes go with it
                del self.execs[exec_id]
                del self.envs[env_id]
        running = tuple(r for r in m.running if r[0] != slot)
        done = (*m.done[:slot], end, *m.done[slot + 1 :])
        m = replace(m, running=running, done=done)
        self.acts[aid] = m
        collect = node.config.get("collect_errors") is True
        if end.kind == "brk" or (end.kind == "fail" and not collect):
            children = self._children()
            for child, _ in children.get(aid, ()):
                self._drop_subtree(child, children)
            if end.kind == "brk":
                self.finish(aid, end)
            else:
                error = f"df.map item {slot + 1} failed: {end.value}"
                self.finish(aid, Ended("fail", error, end.code))
            return
        if aid in self._filling:
            return  # an item that ended as it started: _fill goes on from here
        items = self._map_items(aid, m, node) if m.started < m.count else []
        if items is not None:
            self._fill(aid, node, items)

    def _fill(self, aid: int, node: Node, items: list[str]) -> None:
        """Start items of df.map ``aid`` while it has room, then end it if all have ended.
        Items that end as they start are recorded by _child_of_map, which returns to this
        loop rather than calling it again: a map of many such items must not recurse."""
        self._filling.add(aid)
        try:
            self._start_items(aid, node, items)
        finally:
            self._filling.discard(aid)
        if aid not in self.acts:
            return
        m = _expect(self.acts[aid], MapActivation)
        if m.running or m.started < m.count:
            return
        collect = node.config.get("collect_errors") is True
        ends = [d for d in m.done if d is not None]
        if collect:
            results: list[Any] = [
                {"ok": True, "result": _parse(d.value)}
                if d.kind == "ok"
                else {"ok": False, "error": d.value}
                for d in ends
            ]
        else:
            results = [_parse(d.value) for d in ends]
        self.finish(aid, Ended("ok", _compact(results)))

    def _child_of_retry(
        self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended
    ) -> None:
        retry = _expect(act, RetryActivation)
        if end.kind != "fail":
            self.finish(aid, end)
            return
        attempt = retry.attempt
        self._write(retry, "running", None, ("append", f"attempt {attempt}: {end.value}"))
        if attempt >= int(node.config["max_attempts"]) or not retryable(
            end.code, node.config.get("retry_on")
        ):
            self.finish(aid, end)
            return
        self.acts[aid] = replace(retry, phase="backoff")
        delay = backoff_delay(node.config, attempt, f"{self._stamp(retry.exec_id)}:{node.id}")
        self.tasks.append(TaskSpec(aid, "timer", node.id, None, self.now + delay))

    def _child_of_timeout(
        self, aid: int, act: Activation, node: Node, slot: Slot, end: Ended
    ) -> None:
        timeout = _expect(act, TimeoutActivation)
        if end.kind == "fail" and end.code in _BACKSTOPS and self.now >= timeout.deadline:
            # The backstop (see _add_deadline) beat the timer: the same outcome.
            self._time_out(aid, act, node)
            return
        self.dropped.append(aid)  # the step finished in time: its timer goes
        self.finish(aid, end)

    # -- abandoned subtrees --------------------------------------------------------------------

    def _drop_subtree(
        self, aid: int, children: Mapping[int, list[tuple[int, Slot]]], reason: str | None = None
    ) -> None:
        """Abandon a RACE loser (or a step a df.timeout gave up on, ``reason`` saying so):
        its activations vanish and their tasks are dropped. RACE losers are left for
        monitoring to infer, except loops; timed-out nodes are stamped failed."""
        for child, _ in children.get(aid, ()):
            self._drop_subtree(child, children, reason)
        act = self._remove(aid)
        self.dropped.append(aid)
        if reason is not None:
            self._write(act, "failed", _compact(reason))
        elif self.graph[act.node].type == "LOOP":
            self._write(act, "failed", _compact(LOOP_LOST_RACE))


# -- dispatch by node type ---------------------------------------------------------------------

StartHandler = Callable[[_Run, int, Activation, Node], None]
ChildHandler = Callable[[_Run, int, Activation, Node, Slot, Ended], None]


@dataclass(frozen=True)
class NodeHandlers:
    """What the interpreter does for one node type. Every handler gets the transition in
    progress, the activation's id and record, and its node."""

    start: StartHandler
    """The node activates (its record is the plain :class:`Activation` just stored)."""
    child_ended: ChildHandler | None = None
    """A child activation ended, in the given slot (nodes with children)."""
    timer: StartHandler | None = None
    """A timer the node set is due (nodes that set timers)."""


NODE_HANDLERS: Mapping[str, NodeHandlers] = {
    "SQL": NodeHandlers(_Run._start_sql, _Run._child_of_step),
    "HTTP": NodeHandlers(_Run._start_http),
    "HTTP_MULTIPART": NodeHandlers(_Run._start_http),
    "CALL": NodeHandlers(_Run._start_call, _Run._child_of_step),
    "SIGNAL": NodeHandlers(_Run._start_signal),
    "SLEEP": NodeHandlers(_Run._start_sleep, timer=_Run._sleep_over),
    "WAIT_SCHEDULE": NodeHandlers(_Run._start_wait_schedule, timer=_Run._schedule_reached),
    "BREAK": NodeHandlers(_Run._start_break),
    "THEN": NodeHandlers(_Run._start_then, _Run._child_of_then),
    "IF": NodeHandlers(_Run._start_if, _Run._child_of_if),
    "JOIN": NodeHandlers(_Run._start_join, _Run._child_of_join),
    "RACE": NodeHandlers(_Run._start_race, _Run._child_of_race),
    "LOOP": NodeHandlers(_Run._start_loop, _Run._child_of_loop, timer=_Run._loop_timer),
    "RETRY": NodeHandlers(_Run._start_retry, _Run._child_of_retry, timer=_Run._retry_timer),
    "TIMEOUT": NodeHandlers(_Run._start_timeout, _Run._child_of_timeout, timer=_Run._time_out),
    "MAP": NodeHandlers(_Run._start_map, _Run._child_of_map),
}
"""Each node type's handlers; a type missing here fails when it activates."""
