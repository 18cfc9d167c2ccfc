"""An instance's interpreter state as typed records, and the one place that knows its stored form.

The state is what the interpreter needs between two events: the *activations* in progress
(one per running node, forming a tree that mirrors the part of the graph that runs), the
*executions* that give node stamps their scope and generation, and the *environments* that
hold named results. Activations, executions and environments are numbered by one counter.

Immutability. Every record is a frozen dataclass and every container in a state is typed as
read-only (``Mapping``, ``tuple``). A transition never changes the state it is given: it
shallow-copies the three tables and puts new records and new environments in the copies. So
the caller may keep the old state (the worker holds it until its checkpoint commits, the tests
compare before and after), and the new state shares every record and environment that did not
change with the old one instead of deep-copying the whole state at every event. Code must not
mutate a record or an environment it read from a state; mypy enforces that through the types.

Stored form. :func:`to_json` and :func:`from_json` alone know the JSON keys. The form carries
``format`` (:data:`STATE_FORMAT`); a state of another format is refused rather than guessed at.
The database stores it and never reads into it: what SQL needs to know of a transition, the
transition says explicitly (worker/change.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

STATE_FORMAT = 2
"""The version of the stored form written by :func:`to_json`. Format 1 (string ids, untagged
records) was never released and is not read."""

ROOT = 0
"""The id of the instance's own execution and environment, which live as long as it does."""

OutcomeKind = Literal["ok", "fail", "brk"]
"""How an activation ended: ``ok`` with a result, ``fail`` with an error text, or ``brk``: a
df.break unwinding to the nearest loop, with its value."""

SlotName = Literal["left", "right", "cond", "branch", "body"]
Slot = SlotName | int | None
"""Where an activation sits in its parent: a named child, a JOIN/RACE branch index, or None
for the root activation."""

LoopPhase = Literal["body", "cond", "pad"]
RetryPhase = Literal["body", "backoff"]

_SLOT_NAMES: tuple[SlotName, ...] = ("left", "right", "cond", "branch", "body")
_OUTCOME_KINDS: tuple[OutcomeKind, ...] = ("ok", "fail", "brk")
_LOOP_PHASES: tuple[LoopPhase, ...] = ("body", "cond", "pad")
_RETRY_PHASES: tuple[RetryPhase, ...] = ("body", "backoff")


class StateFormatError(ValueError):
    """A stored state is not one :func:`from_json` can read."""


@dataclass(frozen=True, slots=True)
class Ended:
    """How an activation ended: its outcome kind, its value (a result's JSON text, an error
    text or a break value) and, for a failure, its class (a SQLSTATE, an ``http_*`` class or
    ``timeout``) for df.retry."""

    kind: OutcomeKind
    value: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class Execution:
    """A scope of node stamps (``status_details``): ``scope::gen`` is the stamp of every node
    that runs in it. The instance, each JOIN/RACE branch and each nested loop have one; a loop
    bumps ``gen`` per iteration."""

    scope: str
    gen: int


@dataclass(frozen=True, slots=True)
class Activation:
    """One execution of one node: which node, under which parent activation and in which of
    its slots, stamped in which execution, binding names in which environment. Leaves, THEN
    and IF need nothing more; the subclasses add what their node types keep."""

    node: str
    parent: int | None
    slot: Slot
    exec_id: int
    env_id: int


@dataclass(frozen=True, slots=True)
class ForkActivation(Activation):
    """A RACE or JOIN (a JOIN's is a :class:`JoinActivation`): each branch runs in its own
    execution and environment, which this activation owns."""

    branch_execs: tuple[int, ...]
    branch_envs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Suspended:
    """What a JOIN branch was running when it failed: its activations, and the executions and
    environments they owned, as they were just before the failure. The JOIN keeps them until
    it ends, so that a restart (df.restart) runs the failed branch again from where it failed
    rather than from its start. Only a failure writes one: a branch that succeeds costs
    nothing."""

    acts: Mapping[int, Activation]
    execs: Mapping[int, Execution]
    envs: Mapping[int, Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class JoinActivation(ForkActivation):
    """A JOIN also keeps how each branch ended (None: still running) until all have, and
    what each failed branch was running (``suspended``, by branch index)."""

    done: tuple[Ended | None, ...]
    suspended: tuple[tuple[int, Suspended], ...] = ()


@dataclass(frozen=True, slots=True)
class LoopActivation(Activation):
    """A LOOP. A loop at the root of an execution iterates that one (``loop_exec`` is its own
    ``exec_id``, and it restores ``base_env``, the names it started with, at each iteration);
    any other loop owns an execution of its own. ``last`` is the body's result of the latest
    iteration, the loop's result if its condition ends it."""

    loop_exec: int
    iteration: int
    phase: LoopPhase
    started: float  # when the current iteration began (epoch seconds)
    base_env: Mapping[str, str] | None = None
    last: str | None = None

    @property
    def inline(self) -> bool:
        """Whether the loop iterates the execution it runs in rather than one of its own."""
        return self.loop_exec == self.exec_id


@dataclass(frozen=True, slots=True)
class RetryActivation(Activation):
    """A df.retry: the attempt running (1-based), or waiting out its backoff."""

    attempt: int
    phase: RetryPhase


@dataclass(frozen=True, slots=True)
class TimeoutActivation(Activation):
    """A df.timeout and the moment it expires (epoch seconds)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class MapActivation(Activation):
    """A df.map over ``count`` items: how many it started so far, the execution and
    environment of each item running (``running``: item index, execution id, environment id;
    this activation owns them), and each item's outcome once it ended (None: not yet)."""

    count: int
    started: int
    running: tuple[tuple[int, int, int], ...]
    done: tuple[Ended | None, ...]


@dataclass(frozen=True, slots=True)
class InstanceState:
    """Everything the interpreter keeps between two events of an instance."""

    next_id: int
    acts: Mapping[int, Activation]
    execs: Mapping[int, Execution]
    envs: Mapping[int, Mapping[str, str]]

    @classmethod
    def initial(cls, instance_id: str) -> InstanceState:
        """The state before the root activates: the instance's execution, an empty
        environment."""
        return cls(
            next_id=ROOT + 1,
            acts={},
            execs={ROOT: Execution(instance_id, 1)},
            envs={ROOT: {}},
        )

    def single_path(self) -> bool:
        """Whether what runs is one path from the root to one leaf: every activation a THEN,
        an IF or a leaf, none of the kinds that run branches or keep timers of their own
        (JOIN, RACE, LOOP, RETRY, TIMEOUT). The instance then has one task at most."""
        return all(type(act) is Activation for act in self.acts.values())


# -- the stored form ---------------------------------------------------------------------------


def to_json(state: InstanceState | None) -> dict[str, Any]:
    """The stored form of ``state``: a JSON object (as Python values) of format
    :data:`STATE_FORMAT`. None, an instance that failed before it ran, is stored as ``{}``."""
    if state is None:
        return {}
    return {
        "format": STATE_FORMAT,
        "next": state.next_id,
        "acts": {str(aid): _activation_to_json(act) for aid, act in state.acts.items()},
        "execs": {str(eid): {"scope": e.scope, "gen": e.gen} for eid, e in state.execs.items()},
        "envs": {str(eid): dict(env) for eid, env in state.envs.items()},
    }


def from_json(doc: Mapping[str, Any] | None) -> InstanceState | None:
    """The state stored as ``doc`` (see :func:`to_json`); None for no state (NULL or ``{}``).
    Raises :class:`StateFormatError` for another format or a malformed state."""
    if not doc:
        return None
    if doc.get("format") != STATE_FORMAT:
        raise StateFormatError(
            f"instance state of format {doc.get('format')!r}: this worker reads format"
            f" {STATE_FORMAT} only"
        )
    # Every checkpoint reads the whole state, so the checks are inline type tests: a state
    # that fails them was not written by to_json, and is refused before anything runs on it.
    try:
        next_id = doc["next"]
        _check(type(next_id) is int, "next", next_id)
        return InstanceState(
            next_id=next_id,
            acts={int(k): _activation_from_json(v) for k, v in doc["acts"].items()},
            execs={int(k): _execution_from_json(v) for k, v in doc["execs"].items()},
            envs={int(k): _names(v) for k, v in doc["envs"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, StateFormatError):
            raise
        raise StateFormatError(f"malformed instance state: {exc!r}") from exc


def _activation_to_json(act: Activation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node": act.node,
        "parent": act.parent,
        "slot": act.slot,
        "exec": act.exec_id,
        "env": act.env_id,
    }
    if isinstance(act, ForkActivation):
        out["branch_execs"] = list(act.branch_execs)
        out["branch_envs"] = list(act.branch_envs)
        if isinstance(act, JoinActivation):
            out["kind"] = "join"
            out["done"] = [None if d is None else [d.kind, d.value, d.code] for d in act.done]
            if act.suspended:
                out["suspended"] = {str(i): _suspended_to_json(b) for i, b in act.suspended}
        else:
            out["kind"] = "race"
    elif isinstance(act, LoopActivation):
        out["kind"] = "loop"
        out["loop_exec"] = act.loop_exec
        if act.last is not None:
            out["last"] = act.last
        out["iter"] = act.iteration
        out["phase"] = act.phase
        out["started"] = act.started
        if act.base_env is not None:
            out["base_env"] = dict(act.base_env)
    elif isinstance(act, RetryActivation):
        out["kind"] = "retry"
        out["attempt"] = act.attempt
        out["phase"] = act.phase
    elif isinstance(act, TimeoutActivation):
        out["kind"] = "timeout"
        out["deadline"] = act.deadline
    elif isinstance(act, MapActivation):
        out["kind"] = "map"
        out["count"] = act.count
        out["started"] = act.started
        out["running"] = [list(r) for r in act.running]
        out["done"] = [None if d is None else [d.kind, d.value, d.code] for d in act.done]
    return out


def _activation_from_json(doc: Mapping[str, Any]) -> Activation:
    node, parent, slot = doc["node"], doc["parent"], doc["slot"]
    exec_id, env_id = doc["exec"], doc["env"]
    _check(
        type(node) is str
        and (parent is None or type(parent) is int)
        and (slot is None or type(slot) is int or slot in _SLOT_NAMES)
        and type(exec_id) is int
        and type(env_id) is int,
        "activation",
        doc,
    )
    common = (node, parent, slot, exec_id, env_id)
    kind = doc.get("kind")
    if kind is None:
        return Activation(*common)
    if kind == "race" or kind == "join":
        execs, envs = tuple(doc["branch_execs"]), tuple(doc["branch_envs"])
        _check(_ints(execs) and _ints(envs), "branches", doc)
        if kind == "race":
            return ForkActivation(*common, execs, envs)
        done = tuple(None if d is None else _ended(d) for d in doc["done"])
        suspended = tuple(
            (int(i), _suspended_from_json(b)) for i, b in doc.get("suspended", {}).items()
        )
        return JoinActivation(*common, execs, envs, done, suspended)
    if kind == "loop":
        loop_exec, iteration, phase, started = (
            doc["loop_exec"],
            doc["iter"],
            doc["phase"],
            doc["started"],
        )
        base_env, last = doc.get("base_env"), doc.get("last")
        _check(
            type(loop_exec) is int
            and type(iteration) is int
            and phase in _LOOP_PHASES
            and type(started) in (int, float)
            and (last is None or type(last) is str),
            "loop",
            doc,
        )
        return LoopActivation(
            *common,
            loop_exec=loop_exec,
            iteration=iteration,
            phase=phase,
            started=float(started),
            base_env=None if base_env is None else _names(base_env),
            last=last,
        )
    if kind == "retry":
        attempt, phase = doc["attempt"], doc["phase"]
        _check(type(attempt) is int and phase in _RETRY_PHASES, "retry", doc)
        return RetryActivation(*common, attempt=attempt, phase=phase)
    if kind == "timeout":
        deadline = doc["deadline"]
        _check(type(deadline) in (int, float), "timeout", doc)
        return TimeoutActivation(*common, deadline=float(deadline))
    if kind == "map":
        count, started = doc["count"], doc["started"]
        running = tuple(tuple(r) for r in doc["running"])
        _check(
            type(count) is int
            and type(started) is int
            and all(len(r) == 3 and _ints(r) for r in running),
            "map",
            doc,
        )
        done = tuple(None if d is None else _ended(d) for d in doc["done"])
        return MapActivation(*common, count, started, running, done)
    raise StateFormatError(f"unknown activation kind {kind!r}")


def _suspended_to_json(branch: Suspended) -> dict[str, Any]:
    return {
        "acts": {str(aid): _activation_to_json(act) for aid, act in branch.acts.items()},
        "execs": {str(eid): {"scope": e.scope, "gen": e.gen} for eid, e in branch.execs.items()},
        "envs": {str(eid): dict(env) for eid, env in branch.envs.items()},
    }


def _suspended_from_json(doc: Mapping[str, Any]) -> Suspended:
    return Suspended(
        acts={int(k): _activation_from_json(v) for k, v in doc["acts"].items()},
        execs={int(k): _execution_from_json(v) for k, v in doc["execs"].items()},
        envs={int(k): _names(v) for k, v in doc["envs"].items()},
    )


def _execution_from_json(doc: Mapping[str, Any]) -> Execution:
    scope, gen = doc["scope"], doc["gen"]
    _check(type(scope) is str and type(gen) is int, "execution", doc)
    return Execution(scope, gen)


def _ended(doc: Any) -> Ended:
    kind, value, code = doc
    _check(
        kind in _OUTCOME_KINDS and type(value) is str and (code is None or type(code) is str),
        "branch outcome",
        doc,
    )
    return Ended(kind, value, code)


def _names(doc: Mapping[str, Any]) -> dict[str, str]:
    names = dict(doc)
    _check(set(map(type, names.values())) <= {str}, "environment", doc)
    return names


def _ints(values: tuple[Any, ...]) -> bool:
    return set(map(type, values)) <= {int}


def _check(ok: bool, what: str, doc: Any) -> None:
    if not ok:
        raise StateFormatError(f"malformed {what} in instance state: {doc!r:.200}")
