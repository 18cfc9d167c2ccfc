"""The Python steps of bench/run.py's call1 and callsql1 shapes (workers run with
``--import bench_steps``, bench/ on their PYTHONPATH)."""

from __future__ import annotations

from pgdurable import StepContext, step


@step("bench.noop")
async def noop(ctx: StepContext) -> None:
    """Does nothing: what a Python step costs by itself."""


@step("bench.insert")
async def insert(ctx: StepContext, v: int) -> None:
    """The SQL step's statement, from Python: what calling it from Python adds."""
    await ctx.conn.execute("INSERT INTO bench_effects(v) VALUES (%s)", (v,))
