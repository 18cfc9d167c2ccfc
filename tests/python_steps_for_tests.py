"""Python steps the tests call (tests/test_python_steps.py): imported by in-process workers,
and by worker subprocesses with ``--import python_steps_for_tests`` (tests/ on PYTHONPATH).

Steps that write through ``ctx.conn`` insert into ``public.py_effects`` (created by the tests),
which has no unique constraint: a write that committed twice shows as two rows. Steps that run
outside a transaction append a line to the file named by $PGDURABLE_TEST_CALL_LOG instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

from pgdurable import StepContext, step

PY_EFFECTS_DDL = """
CREATE TABLE public.py_effects (
    instance  text NOT NULL,
    note      text,
    attempt   integer,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@step("billing.charge")
async def charge(ctx: StepContext, order_id: int, amount: str) -> dict[str, Any]:
    """Writes a row in the step's transaction; its result says what it was given."""
    await ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, %s, %s)",
        (ctx.instance_id, f"charge {order_id} {amount}", ctx.attempt),
    )
    return {"charged": True, "order_id": order_id, "amount": amount}


@step("billing.sync_charge")
def sync_charge(ctx: StepContext, order_id: int) -> dict[str, Any]:
    """The same from a sync function, through its blocking connection."""
    ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, %s, %s)",
        (ctx.instance_id, f"sync {order_id}", ctx.attempt),
    )
    row = ctx.conn.execute("SELECT current_user").fetchone()
    return {"order_id": order_id, "user": row[0] if row else None}


@step("util.echo")
async def echo(ctx: StepContext, **values: Any) -> dict[str, Any]:
    """Returns its arguments, to show how they were bound."""
    return values


@step("util.add")
def add(ctx: StepContext, a: int, b: int) -> int:
    return a + b


@step("util.fail")
async def fail(ctx: StepContext, message: str) -> None:
    """Writes, then raises: the write must not count."""
    await ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, 'fail', %s)",
        (ctx.instance_id, ctx.attempt),
    )
    raise ValueError(message)


@step("util.flaky")
async def flaky(ctx: StepContext, succeed_at: int) -> dict[str, int]:
    """Fails until its attempt number ``succeed_at`` (df.retry's attempts run it again)."""
    await ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, 'flaky', %s)",
        (ctx.instance_id, ctx.attempt),
    )
    count = await ctx.conn.execute(
        "SELECT count(*) FROM public.py_effects WHERE instance = %s AND note = 'flaky'",
        (ctx.instance_id,),
    )
    row = await count.fetchone()
    # Rolled back attempts leave no row: only this one is seen.
    if row is None or row[0] != 1:
        raise AssertionError(f"saw {row} flaky rows")
    if ctx.attempt < succeed_at:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"attempt": ctx.attempt}


@step("util.not_json")
async def not_json(ctx: StepContext) -> object:
    return {1, 2, 3}


@step("util.commits")
async def commits(ctx: StepContext) -> None:
    await ctx.conn.commit()


@step("util.sleep_forever")
async def sleep_forever(ctx: StepContext) -> None:
    """Writes, then waits until interrupted: the write must not count."""
    await ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, 'sleeper', %s)",
        (ctx.instance_id, ctx.attempt),
    )
    await asyncio.sleep(3600)


@step("util.sync_until_cancelled", transaction=False)
def sync_until_cancelled(ctx: StepContext) -> str:
    """A sync step outside a transaction that returns once it sees it was cancelled, and
    says so in the call log (after saying it started)."""
    _log_call(ctx, "started")
    deadline = time.monotonic() + 60
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    _log_call(ctx, "noticed cancel" if ctx.cancelled else "never cancelled")
    return "done"


@step("outside.record", transaction=False)
async def record(ctx: StepContext, note: str, pause_first: float = 0.0) -> dict[str, Any]:
    """Outside any transaction: logs the call with its idempotency key, and pauses on its
    first attempt (a worker can be killed meanwhile)."""
    assert ctx.conn is None
    _log_call(ctx, note)
    if ctx.run == 1 and pause_first:
        await asyncio.sleep(pause_first)
    return {"key": ctx.idempotency_key, "run": ctx.run}


@step("outside.flaky", transaction=False)
def outside_flaky(ctx: StepContext, succeed_at: int) -> str:
    _log_call(ctx, "flaky")
    if ctx.attempt < succeed_at:
        raise ConnectionError("the service is down")
    return ctx.idempotency_key


@step("crash.slow_write")
async def slow_write(ctx: StepContext, pause_first: float) -> dict[str, int]:
    """Writes, then pauses on its first attempt (a worker can be killed meanwhile)."""
    await ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, 'slow', %s)",
        (ctx.instance_id, ctx.run),
    )
    if ctx.run == 1:
        await asyncio.sleep(pause_first)
    return {"run": ctx.run}


def _log_call(ctx: StepContext, note: str) -> None:
    path = os.environ.get("PGDURABLE_TEST_CALL_LOG")
    if not path:
        return
    line = {
        "instance": ctx.instance_id,
        "key": ctx.idempotency_key,
        "attempt": ctx.attempt,
        "run": ctx.run,
        "note": note,
        "pid": os.getpid(),
    }
    with open(path, "a") as log:
        log.write(json.dumps(line) + "\n")


@step("util.plan")
async def plan(ctx: StepContext, count: int) -> Any:
    """Returns the rest of the workflow: ``count`` SQL steps in parallel, then their sum."""
    from pgdurable import dsl

    if count == 0:
        return {"nothing": "to do"}
    branches = [dsl.sql(f"SELECT {i} AS n") for i in range(1, count + 1)]
    work: dsl.Node = branches[0]
    for branch in branches[1:]:
        work = work & branch
    return work.named("parts") >> dsl.call("util.echo", {"parts": "$parts"})


@step("util.too_deep")
async def too_deep(ctx: StepContext, depth: int) -> Any:
    """Returns a graph nested ``depth`` levels deep."""
    from pgdurable import dsl

    node = dsl.sql("SELECT 1")
    for _ in range(depth):
        node = dsl.timeout(node, 60)
    return node


RELEASE_STUBBORN = threading.Event()
"""What util.sync_stubborn waits for (a test sets it)."""


@step("util.sync_stubborn")
def sync_stubborn(ctx: StepContext) -> str:
    """Writes, then waits for RELEASE_STUBBORN without looking at ctx.cancelled."""
    ctx.conn.execute(
        "INSERT INTO public.py_effects (instance, note, attempt) VALUES (%s, 'stubborn', %s)",
        (ctx.instance_id, ctx.attempt),
    )
    RELEASE_STUBBORN.wait(60)
    return "late"
