"""The graph interpreter: pure functions from (graph, state, event) to a Transition.

No I/O happens here. The worker feeds events (an instance starts, a step finished, a timer
fired) and persists what comes back: the new state, node status writes, tasks to run, tasks
to drop, and the instance outcome. All of it is plain data so it can be stored as JSON and
tested without a database.

Model. An *activation* is one execution of one node. Activations form a tree mirroring the
part of the graph that is running; a finished activation reports its outcome to its parent,
which decides what runs next (spec §7). Outcomes are ``ok`` (with a result), ``fail`` (with
an error text) or ``brk`` (a df.break unwinding to the nearest loop, with its value).

Named results live in *environments*: JOIN/RACE branches get a copy of the parent's
environment and merge back when the fork finishes (§7.4). *Executions* give the
``status_details`` stamps of §9.4: the instance root and every JOIN/RACE branch and nested
loop have one, with a generation bumped per loop iteration.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .cron import cron_error, next_tick
from .http_request import build_request, idempotency_key
from .model import UNNAMED_RESULT_TYPES, Graph, Node
from .substitute import SubstitutionError, substitute_sql
from .truth import is_true

STATE_FORMAT = 1
MAX_LOOP_ITERATIONS = 100_000
# A loop iteration takes at least this long; a quick one waits on a timer before the next,
# so a loop without a sleep cannot spin (spec §7.7).
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
CANCELLED_BY_TIMEOUT = "Cancelled: the enclosing df.timeout expired after {seconds}s"

# The failure classes a df.retry 'http' entry stands for: transient ones only, never a
# request the policy blocked or a malformed one.
HTTP_TRANSIENT = frozenset({"http_5xx", "http_timeout", "http_connection", "http_request"})

# Failures of a step that its df.timeout's backstop causes: a statement cancelled by
# statement_timeout (SQLSTATE 57014), an HTTP request cut short.
_BACKSTOPS = frozenset({"57014", "http_timeout"})
# Timers further away than this (a century) are set at this distance: PostgreSQL's
# timestamps end in the year 294276.
MAX_WAIT_SECONDS = 100 * 365 * 86400.0

# The default of pg_durable.max_result_bytes: the most bytes of a SQL step's result, and of its
# statement once named results are substituted into it (10 MiB, as for HTTP responses). Any
# transition may start a SQL step, so every entry point takes the limit (max_statement_bytes).
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
STATEMENT_TOO_LARGE = (
    "SQL step statement too large after substitution: more than {limit} bytes "
    "(pg_durable.max_result_bytes)"
)

OutcomeKind = Literal["ok", "fail", "brk"]
State = dict[str, Any]


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
    """Work for the worker: run a SQL statement or an HTTP request, wake up at ``run_at``
    (epoch seconds), or wait for a signal until ``run_at``."""

    activation: int
    kind: Literal["sql", "http", "timer", "signal"]
    node_id: str
    payload: dict[str, Any] | None = None
    run_at: float | None = None  # None: now (a signal wait: no deadline)


@dataclass(frozen=True)
class Outcome:
    """The instance finished: ``completed`` with the root result, or ``failed`` with an error."""

    status: Literal["completed", "failed"]
    output: str


@dataclass
class Transition:
    """Everything one event changed."""

    state: State
    writes: list[NodeWrite] = field(default_factory=list)
    tasks: list[TaskSpec] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # activations whose tasks must go
    outcome: Outcome | None = None

    @property
    def generation(self) -> int:
        """The root execution's generation (iterations of a root loop), for monitoring."""
        gen: int = self.state["execs"]["0"]["gen"] if self.state.get("execs") else 1
        return gen


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
    state: State = {
        "format": STATE_FORMAT,
        "next": 1,
        "acts": {},
        "execs": {"0": {"scope": graph.instance_id, "gen": 1}},
        "envs": {"0": {}},
    }
    run = _Run(graph, state, variables, now, max_statement_bytes)
    run.activate(graph.root, parent=None, slot=None, exec_id="0", env_id="0")
    return run.finish_transition()


def step_succeeded(
    graph: Graph,
    state: State,
    variables: dict[str, str],
    activation: int,
    result: str,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """A SQL step's statement ran; ``result`` is its result JSON."""
    return _leaf_finished(
        graph, state, variables, activation, "ok", result, now, None, max_statement_bytes
    )


def step_failed(
    graph: Graph,
    state: State,
    variables: dict[str, str],
    activation: int,
    error: str,
    now: float,
    code: str | None = None,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """A step failed with ``error``; the failure propagates (spec §7.1). ``code`` classifies
    it for df.retry: a SQLSTATE, or one of the ``http_*`` classes of HTTP steps."""
    return _leaf_finished(
        graph, state, variables, activation, "fail", error, now, code, max_statement_bytes
    )


def _leaf_finished(
    graph: Graph,
    state: State,
    variables: dict[str, str],
    activation: int,
    kind: OutcomeKind,
    value: str,
    now: float,
    code: str | None,
    max_statement_bytes: int,
) -> Transition:
    run = _Run(graph, _copy(state), variables, now, max_statement_bytes)
    if run.act(activation) is not None:  # else a stale event: the activation is gone
        run.finish(activation, kind, value, code)
    return run.finish_transition()


def timer_fired(
    graph: Graph,
    state: State,
    variables: dict[str, str],
    activation: int,
    now: float,
    *,
    max_statement_bytes: int = DEFAULT_MAX_BYTES,
) -> Transition:
    """A timer of ``activation`` is due: a SLEEP ends, a padded loop iteration begins, a
    df.retry backoff is over, or a df.timeout expires."""
    run = _Run(graph, _copy(state), variables, now, max_statement_bytes)
    act = run.act(activation)
    if act is not None:
        node = graph[act["node"]]
        if node.type == "SLEEP":
            seconds = int(node.query or "0")
            run.finish(activation, "ok", f'{{"slept": true, "seconds": {seconds}}}')
        elif node.type == "WAIT_SCHEDULE":
            run.finish(activation, "ok", '{"scheduled": true}')
        elif node.type == "LOOP" and act.get("phase") == "pad":
            run.begin_iteration(activation)
        elif node.type == "RETRY" and act.get("phase") == "backoff":
            run.begin_attempt(activation)
        elif node.type == "TIMEOUT":
            run.time_out(activation)
    return run.finish_transition()


def signal_received(
    graph: Graph,
    state: State,
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
        graph, state, variables, activation, "ok", _compact(result), now, None, max_statement_bytes
    )


def signal_timed_out(
    graph: Graph,
    state: State,
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
        graph, state, variables, activation, "ok", _compact(result), now, None, max_statement_bytes
    )


def _signal_name(graph: Graph, state: State, activation: int) -> Any:
    act = state["acts"].get(str(activation))
    return graph[act["node"]].config.get("signal_name") if act else None


def is_waiting(state: State | None, activation: int) -> bool:
    """Whether ``activation`` still exists, i.e. a task of it is still wanted."""
    return bool(state) and str(activation) in state["acts"]  # type: ignore[index]


def fail_instance(state: State | None, error: str) -> Transition:
    """The instance cannot run at all (e.g. its role is gone): fail it without running nodes."""
    return Transition(state=state or {}, outcome=Outcome("failed", error))


# -- the machinery -----------------------------------------------------------------------------


def _copy(state: State) -> State:
    """A private copy of a JSON state: the caller's stays untouched (faster than deepcopy)."""
    copied: State = json.loads(json.dumps(state))
    return copied


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _parse(text: str) -> Any:
    """A result string as JSON; text that is not JSON counts as a JSON string (spec §7.1)."""
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


def retryable(code: str | None, retry_on: Any) -> bool:
    """Whether a failure classified ``code`` is retried by a df.retry whose ``retry_on`` is
    given (None: every failure is). Entries are SQLSTATE codes ('40001'), SQLSTATE classes
    ('40'), 'http' (any transient HTTP failure), an ``http_*`` class, or 'timeout' (a
    df.timeout or HTTP timeout)."""
    if retry_on is None:
        return True
    if code is None:
        return False
    for entry in retry_on:
        if entry == code or (entry == "http" and code in HTTP_TRANSIENT):
            return True
        if entry == "timeout" and code in ("timeout", "http_timeout"):
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


@dataclass(frozen=True)
class _Ended:
    """How a child activation ended, as its parent's ``_child_of_<type>`` handler sees it:
    in which slot of the parent, with which outcome, value and failure code."""

    slot: Any
    kind: OutcomeKind
    value: str
    code: str | None


class _Run:
    """One transition in progress: mutates ``state`` and collects the effects."""

    def __init__(
        self,
        graph: Graph,
        state: State,
        variables: dict[str, str],
        now: float,
        max_statement_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.graph = graph
        self.state = state
        self.variables = variables
        self.now = now
        self.max_statement_bytes = max_statement_bytes
        self.out = Transition(state=state)

    # -- bookkeeping ---------------------------------------------------------------------------

    def act(self, aid: int) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.state["acts"].get(str(aid))
        return found

    def _new_id(self) -> int:
        n: int = self.state["next"]
        self.state["next"] = n + 1
        return n

    def _new_exec(self, parent_exec: str, child_root: str) -> str:
        parent = self.state["execs"][parent_exec]
        eid = str(self._new_id())
        scope = f"{parent['scope']}::{parent['gen']}::{child_root}"
        self.state["execs"][eid] = {"scope": scope, "gen": 1}
        return eid

    def _new_env(self, copy_of: str) -> str:
        eid = str(self._new_id())
        self.state["envs"][eid] = dict(self.state["envs"][copy_of])
        return eid

    def _stamp(self, exec_id: str) -> str:
        ex = self.state["execs"][exec_id]
        return f"{ex['scope']}::{ex['gen']}"

    def _write(
        self,
        act: dict[str, Any],
        status: Any,
        result: str | None,
        error: tuple[Literal["set", "append"], str] | None = None,
    ) -> None:
        stamp = self._stamp(act["exec"])
        self.out.writes.append(NodeWrite(act["node"], status, result, stamp, error))

    def finish_transition(self) -> Transition:
        # A RACE decided while its branches were still starting dropped activations that
        # had already asked for work; that work must never be queued.
        live = self.state["acts"]
        self.out.tasks = [t for t in self.out.tasks if str(t.activation) in live]
        self._collect_garbage()
        return self.out

    def _collect_garbage(self) -> None:
        acts = self.state["acts"].values()
        live_execs = {"0"} | {a["exec"] for a in acts}
        live_envs = {"0"} | {a["env"] for a in acts}
        for a in acts:
            live_execs.update(a.get("branch_execs", ()))
            if "loop_exec" in a:  # also while no body activation runs (padding timer)
                live_execs.add(a["loop_exec"])
            live_envs.update(a.get("branch_envs", ()))
        for key, live in (("execs", live_execs), ("envs", live_envs)):
            table = self.state[key]
            for k in [k for k in table if k not in live]:
                del table[k]

    # -- activation ----------------------------------------------------------------------------

    def activate(
        self, node_id: str, parent: int | None, slot: Any, exec_id: str, env_id: str
    ) -> None:
        """Start executing ``node_id`` as a child of ``parent``."""
        node = self.graph[node_id]
        aid = self._new_id()
        act: dict[str, Any] = {
            "node": node_id,
            "parent": parent,
            "slot": slot,
            "exec": exec_id,
            "env": env_id,
        }
        self.state["acts"][str(aid)] = act
        self._write(act, "running", None)
        handler = getattr(self, f"_start_{node.type.lower()}", None)
        if handler is None:
            self.finish(
                aid, "fail", f"{node.type} steps are not supported by this pgdurable worker yet"
            )
        else:
            handler(aid, act, node)

    def _start_sql(self, aid: int, act: dict[str, Any], node: Node) -> None:
        try:
            text = substitute_sql(
                node.query or "",
                self.state["envs"][act["env"]],
                self.variables,
                self.graph.instance_id,
                self.graph.label,
            )
        except SubstitutionError as exc:
            self.finish(aid, "fail", str(exc))
            return
        # Named results are at most this big each, but a statement may use many, or one many
        # times; the task row and the worker that claims it must not hold more.
        limit = self.max_statement_bytes
        if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
            self.finish(aid, "fail", STATEMENT_TOO_LARGE.format(limit=limit))
            return
        payload: dict[str, Any] = {"sql": text}
        self._add_deadline(act, payload)
        self.out.tasks.append(TaskSpec(aid, "sql", node.id, payload))

    def _start_http(self, aid: int, act: dict[str, Any], node: Node) -> None:
        key = idempotency_key(self._stamp(act["exec"]), node.id)
        try:
            payload = build_request(
                node,
                self.state["envs"][act["env"]],
                self.variables,
                self.graph.instance_id,
                self.graph.label,
                key,
            )
        except SubstitutionError as exc:
            self.finish(aid, "fail", str(exc))
            return
        self._add_deadline(act, payload)
        self.out.tasks.append(TaskSpec(aid, "http", node.id, payload))

    _start_http_multipart = _start_http

    def _add_deadline(self, act: dict[str, Any], payload: dict[str, Any]) -> None:
        """Tell the worker when the nearest enclosing df.timeout expires, so a statement or
        request cannot outlive it even if the cancel that the timeout sends is lost."""
        deadlines = []
        parent = act["parent"]
        while parent is not None:
            ancestor = self.state["acts"][str(parent)]
            if "deadline" in ancestor:
                deadlines.append(ancestor["deadline"])
            parent = ancestor["parent"]
        if deadlines:
            payload["deadline"] = min(deadlines)

    def _start_sleep(self, aid: int, act: dict[str, Any], node: Node) -> None:
        seconds = min(int(node.query or "0"), MAX_WAIT_SECONDS)
        self.out.tasks.append(TaskSpec(aid, "timer", node.id, None, self.now + seconds))

    def _start_wait_schedule(self, aid: int, act: dict[str, Any], node: Node) -> None:
        # The next tick is computed now, when the wait starts, from the database clock (UTC);
        # a tick missed while no worker ran fires once, late (docs/schedules.md).
        expr = str(node.config.get("cron_expr", ""))
        error = cron_error(expr)
        if error is not None:
            self.finish(aid, "fail", f"Invalid cron expression '{expr}': {error}")
            return
        tick = next_tick(expr, self.now)
        self.out.tasks.append(TaskSpec(aid, "timer", node.id, None, tick))

    def _start_signal(self, aid: int, act: dict[str, Any], node: Node) -> None:
        name = node.config.get("signal_name")
        timeout = node.config.get("timeout_seconds")
        deadline = self.now + float(timeout) if timeout else None
        payload = {"signal_name": name, "deadline": deadline}
        self.out.tasks.append(TaskSpec(aid, "signal", node.id, payload, deadline))

    def _start_break(self, aid: int, act: dict[str, Any], node: Node) -> None:
        self.finish(aid, "brk", _break_value(node))

    def _start_retry(self, aid: int, act: dict[str, Any], node: Node) -> None:
        act["attempt"] = 0
        self._write(act, "running", None, ("set", ""))  # a new execution: a new history
        self.begin_attempt(aid)

    def begin_attempt(self, aid: int) -> None:
        """Run the next attempt of df.retry ``aid``."""
        act = self.act(aid)
        assert act is not None
        act["attempt"] += 1
        act["phase"] = "body"
        body = self.graph[act["node"]].left
        assert body
        self.activate(body, aid, "body", act["exec"], act["env"])

    def _start_timeout(self, aid: int, act: dict[str, Any], node: Node) -> None:
        act["deadline"] = self.now + min(float(node.config["timeout_seconds"]), MAX_WAIT_SECONDS)
        self.out.tasks.append(TaskSpec(aid, "timer", node.id, None, act["deadline"]))
        assert node.left
        self.activate(node.left, aid, "body", act["exec"], act["env"])

    def time_out(self, aid: int) -> None:
        """df.timeout ``aid`` expired before its step finished: abandon the step."""
        act = self.act(aid)
        assert act is not None
        seconds = _number_text(self.graph[act["node"]].config["timeout_seconds"])
        for child, _ in self._children(aid):
            self._drop_subtree(child, CANCELLED_BY_TIMEOUT.format(seconds=seconds))
        self.out.dropped.append(aid)  # its timer, unless that is what fired
        self.finish(aid, "fail", TIMED_OUT.format(seconds=seconds), "timeout")

    def _start_then(self, aid: int, act: dict[str, Any], node: Node) -> None:
        assert node.left
        self.activate(node.left, aid, "left", act["exec"], act["env"])

    def _start_if(self, aid: int, act: dict[str, Any], node: Node) -> None:
        if node.condition:
            self.activate(node.condition, aid, "cond", act["exec"], act["env"])
            return
        # df.if_rows: branch on a named SQL result without running anything (spec §7.6).
        name = str(node.config.get("result_name"))
        env = self.state["envs"][act["env"]]
        if name not in env:
            self.finish(aid, "fail", f"df.if_rows: result '{name}' not found")
            return
        try:
            parsed = json.loads(env[name])
        except ValueError as exc:
            self.finish(aid, "fail", f"df.if_rows: invalid result JSON: {exc}")
            return
        count = parsed.get("row_count") if isinstance(parsed, dict) else None
        if not isinstance(count, int | float) or isinstance(count, bool):
            self.finish(
                aid, "fail", f"df.if_rows: result '{name}' is not a SQL result (missing row_count)"
            )
            return
        self._take_branch(aid, act, node, count > 0)

    def _take_branch(self, aid: int, act: dict[str, Any], node: Node, condition: bool) -> None:
        branch = node.left if condition else node.right
        assert branch
        self.activate(branch, aid, "branch", act["exec"], act["env"])

    def _start_join(self, aid: int, act: dict[str, Any], node: Node) -> None:
        self._fork(aid, act, node)

    def _start_race(self, aid: int, act: dict[str, Any], node: Node) -> None:
        self._fork(aid, act, node)

    def _fork(self, aid: int, act: dict[str, Any], node: Node) -> None:
        branches = node.branches
        act["branch_execs"] = [self._new_exec(act["exec"], b) for b in branches]
        act["branch_envs"] = [self._new_env(act["env"]) for _ in branches]
        act["done"] = [None] * len(branches)
        for i, branch in enumerate(branches):
            if self.act(aid) is None:  # an earlier branch already decided a RACE
                return
            self.activate(branch, aid, i, act["branch_execs"][i], act["branch_envs"][i])

    def _start_loop(self, aid: int, act: dict[str, Any], node: Node) -> None:
        parent = self.act(act["parent"]) if act["parent"] is not None else None
        # A loop at the root of an execution (the instance, or a JOIN/RACE branch) iterates that
        # execution; any other loop gets an execution of its own (spec §7.7, §9.4).
        inline = parent is None or self.graph[parent["node"]].type in ("JOIN", "RACE")
        act["inline"] = inline
        act["loop_exec"] = act["exec"] if inline else self._new_exec(act["exec"], node.id)
        act["iter"] = 0
        if inline:
            # A root loop starts every iteration with the names it started with (spec §7.4).
            act["base_env"] = dict(self.state["envs"][act["env"]])
        self.begin_iteration(aid)

    def begin_iteration(self, aid: int) -> None:
        """Start the next iteration of loop ``aid``."""
        act = self.act(aid)
        assert act is not None
        node = self.graph[act["node"]]
        if act["iter"] >= MAX_LOOP_ITERATIONS:
            self.finish(aid, "fail", LOOP_LIMIT)
            return
        act["iter"] += 1
        act["phase"] = "body"
        act["started"] = self.now
        if act["iter"] > 1:
            self.state["execs"][act["loop_exec"]]["gen"] += 1
            if act["inline"]:
                self.state["envs"][act["env"]] = dict(act["base_env"])
                self._write(act, "running", None)
        assert node.left
        self.activate(node.left, aid, "body", act["loop_exec"], act["env"])

    # -- completion ----------------------------------------------------------------------------

    def finish(self, aid: int, kind: OutcomeKind, value: str, code: str | None = None) -> None:
        """Activation ``aid`` ended; stamp it, bind its name, and tell its parent. ``code``
        classifies a failure (see step_failed)."""
        act = self.state["acts"].pop(str(aid))
        node = self.graph[act["node"]]
        if kind == "fail":
            self._write(act, "failed", _compact(value))
        else:
            self._write(act, "completed", _as_json_text(value))
        if kind == "ok" and node.result_name and node.type not in UNNAMED_RESULT_TYPES:
            self.state["envs"][act["env"]][node.result_name] = value
        parent = act["parent"]
        if parent is None:
            self._finish_instance(act, kind, value)
        else:
            self._child_done(parent, act["slot"], kind, value, code)

    def _finish_instance(self, act: dict[str, Any], kind: OutcomeKind, value: str) -> None:
        if kind == "ok":
            self.out.outcome = Outcome("completed", value)
        elif kind == "fail":
            self.out.outcome = Outcome("failed", value)
        else:
            self._write(act, "failed", _compact(BREAK_OUTSIDE_LOOP))
            self.out.outcome = Outcome("failed", BREAK_OUTSIDE_LOOP)

    def _child_done(
        self, aid: int, slot: Any, kind: OutcomeKind, value: str, code: str | None
    ) -> None:
        act = self.act(aid)
        assert act is not None
        node = self.graph[act["node"]]
        ended = _Ended(slot, kind, value, code)
        getattr(self, f"_child_of_{node.type.lower()}")(aid, act, node, ended)

    def _child_of_then(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        if end.kind == "ok" and end.slot == "left":
            assert node.right
            self.activate(node.right, aid, "right", act["exec"], act["env"])
        else:
            self.finish(aid, end.kind, end.value, end.code)

    def _child_of_if(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        if end.kind == "ok" and end.slot == "cond":
            self._take_branch(aid, act, node, is_true(end.value))
        else:
            self.finish(aid, end.kind, end.value, end.code)

    def _child_of_join(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        act["done"][end.slot] = [end.kind, end.value, end.code]
        if any(d is None for d in act["done"]):
            return
        # Entries of states written before failure codes existed have two elements.
        for i, (k, v, *c) in enumerate(act["done"], start=1):
            if k == "fail":
                self.finish(aid, "fail", f"JOIN branch {i} failed: {v}", c[0] if c else None)
                return
        for env_id in act["branch_envs"]:
            self.state["envs"][act["env"]].update(self.state["envs"][env_id])
        for k, v, *_ in act["done"]:
            if k == "brk":
                self.finish(aid, "brk", v)
                return
        self.finish(aid, "ok", _compact([_parse(d[1]) for d in act["done"]]))

    def _child_of_race(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        for loser in [a for a, b in self._children(aid) if b != end.slot]:
            self._drop_subtree(loser)
        if end.kind == "fail":
            side = "left" if end.slot == 0 else "right"
            self.finish(aid, "fail", f"RACE {side} branch failed: {end.value}", end.code)
            return
        self.state["envs"][act["env"]].update(self.state["envs"][act["branch_envs"][end.slot]])
        self.finish(aid, end.kind, end.value)

    def _child_of_loop(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        if end.kind == "fail":
            self.finish(aid, "fail", end.value, end.code)
        elif end.kind == "brk":
            self.finish(aid, "ok", end.value)
        elif end.slot == "body":
            act["last"] = end.value
            if node.condition:
                act["phase"] = "cond"
                self.activate(node.condition, aid, "cond", act["loop_exec"], act["env"])
            else:
                self._next_iteration(aid, act)
        elif is_true(end.value):
            self._next_iteration(aid, act)
        else:
            self.finish(aid, "ok", act["last"])

    def _next_iteration(self, aid: int, act: dict[str, Any]) -> None:
        due = act["started"] + MIN_ITERATION_SECONDS
        if self.now < due:
            act["phase"] = "pad"
            self.out.tasks.append(TaskSpec(aid, "timer", act["node"], None, due))
        else:
            self.begin_iteration(aid)

    def _child_of_retry(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        if end.kind != "fail":
            self.finish(aid, end.kind, end.value, end.code)
            return
        attempt = int(act["attempt"])
        self._write(act, "running", None, ("append", f"attempt {attempt}: {end.value}"))
        if attempt >= int(node.config["max_attempts"]) or not retryable(
            end.code, node.config.get("retry_on")
        ):
            self.finish(aid, end.kind, end.value, end.code)
            return
        act["phase"] = "backoff"
        delay = backoff_delay(node.config, attempt, f"{self._stamp(act['exec'])}:{node.id}")
        self.out.tasks.append(TaskSpec(aid, "timer", node.id, None, self.now + delay))

    def _child_of_timeout(self, aid: int, act: dict[str, Any], node: Node, end: _Ended) -> None:
        if end.kind == "fail" and end.code in _BACKSTOPS and self.now >= act["deadline"]:
            # The backstop (see _add_deadline) beat the timer: the same outcome.
            self.time_out(aid)
            return
        self.out.dropped.append(aid)  # the step finished in time: its timer goes
        self.finish(aid, end.kind, end.value, end.code)

    # -- RACE losers ---------------------------------------------------------------------------

    def _children(self, aid: int) -> list[tuple[int, Any]]:
        return [(int(k), a["slot"]) for k, a in self.state["acts"].items() if a["parent"] == aid]

    def _drop_subtree(self, aid: int, reason: str | None = None) -> None:
        """Abandon a RACE loser (or a step a df.timeout gave up on, ``reason`` saying so):
        its activations vanish and their tasks are dropped. RACE losers are left for
        monitoring to infer, except loops; timed-out nodes are stamped failed."""
        for child, _ in self._children(aid):
            self._drop_subtree(child, reason)
        act = self.state["acts"].pop(str(aid))
        self.out.dropped.append(aid)
        if reason is not None:
            self._write(act, "failed", _compact(reason))
        elif self.graph[act["node"]].type == "LOOP":
            self._write(act, "failed", _compact(LOOP_LOST_RACE))
