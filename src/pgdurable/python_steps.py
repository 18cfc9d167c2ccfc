"""Python steps: functions registered by name and called from the DSL with ``df.call``.

::

    from pgdurable import StepContext, step

    @step("billing.charge")
    async def charge(ctx: StepContext, order_id: int, amount: str) -> dict:
        await ctx.conn.execute("UPDATE accounts SET ...", (...))
        return {"charged": True}

A worker started with ``--import myapp.steps`` imports the module, which registers its steps
here, and from then on claims the calls of those names (docs/python.md). This module holds
the registry and what a step sees; the worker runs them (worker/calls.py).
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .core.model import is_step_name

__all__ = ["StepContext", "StepDefinition", "import_steps", "registered", "step"]


@dataclass
class StepContext:
    """What a running Python step knows of itself.

    ``conn`` is a connection logged in as the role that started the workflow, inside the
    transaction that records the step's result (an ``AsyncConnection`` for an async step, a
    ``Connection`` for a sync one): what the step writes through it takes effect exactly once.
    It is None for a step registered with ``transaction=False``, which runs outside any
    transaction, at least once; ``idempotency_key`` is then the same at every run of the step
    (after a crash, or a df.retry), for the services it calls.
    """

    name: str
    instance_id: str
    node_id: str
    idempotency_key: str
    attempt: int = 1
    """The attempt of the enclosing df.retry (1 without one)."""
    run: int = 1
    """How many times a worker started this attempt: more than 1 after a worker died (or
    gave up on it) while running it."""
    conn: Any = None  # AsyncConnection | Connection | None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """Whether the step was cancelled (df.cancel, df.timeout, a lost RACE): a sync step
        should check it now and then and return; its result is not recorded. (An async step
        is interrupted with ``asyncio.CancelledError`` instead.)"""
        return self._cancelled.is_set()


@dataclass(frozen=True)
class StepDefinition:
    """A registered Python step."""

    name: str
    function: Callable[..., Any]
    transaction: bool = True

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function (run on the worker's event loop)."""
        return inspect.iscoroutinefunction(self.function)

    def bind(self, ctx: StepContext, args: Mapping[str, Any]) -> inspect.BoundArguments:
        """The call of the function with ``args`` as keyword arguments (raises TypeError if
        they do not fit its parameters)."""
        return inspect.signature(self.function).bind(ctx, **args)


_REGISTRY: dict[str, StepDefinition] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def step(name: str, *, transaction: bool = True) -> Callable[[_F], _F]:
    """Register the decorated function as the Python step ``name`` (identifiers joined by
    dots: the name is the stable key that graphs call it by). The function takes a
    :class:`StepContext` first, then the call's arguments by keyword, and returns a
    JSON-serialisable value. ``transaction=False`` runs it outside a transaction (for calls
    to the outside world)."""
    if not is_step_name(name):
        raise ValueError(f"invalid step name {name!r}: identifiers joined by dots, e.g. 'a.b'")

    def register(function: _F) -> _F:
        known = _REGISTRY.get(name)
        if known is not None and _qualified(known.function) != _qualified(function):
            raise ValueError(
                f"Python step {name!r} is registered twice: {_qualified(known.function)} and"
                f" {_qualified(function)}"
            )
        _REGISTRY[name] = StepDefinition(name, function, transaction)
        return function

    return register


def registered() -> dict[str, StepDefinition]:
    """The steps registered so far, by name."""
    return dict(_REGISTRY)


def import_steps(modules: Iterable[str]) -> dict[str, StepDefinition]:
    """Import the modules that register steps (``myapp.steps``); the steps registered then.
    An import that fails raises ImportError naming the module."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ImportError(f"cannot import Python steps from {module!r}: {exc!r}") from exc
    return registered()


def _qualified(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', '?')}"
