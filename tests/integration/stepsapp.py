"""Job types for the durable-steps promise test, run in real worker processes.

Each durable step's function appends a line to ``$CONVEYOR_TEST_LOG`` when it
runs (O_APPEND: processes never interleave a line), and the handler appends one
once a step is stored: the test counts executions from these lines alone.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import Conveyor, JobContext


def _record(ctx: JobContext, event: str) -> None:
    line = f"{ctx.job_id} {ctx.attempt} {os.getpid()} {event}\n".encode()
    fd = os.open(os.environ["CONVEYOR_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _work(ctx: JobContext, n: int) -> dict[str, Any]:
    _record(ctx, f"ran{n}")
    return {"step": n, "pid": os.getpid()}


async def three_steps(ctx: JobContext, hold: float = 60.0) -> dict[str, Any]:
    """Three durable steps; attempt 1 stops after step 2 is stored (and is killed)."""
    one = await ctx.step("one", _work, ctx, 1)
    _record(ctx, "stored1")
    two = await ctx.step("two", _work, ctx, 2)
    _record(ctx, "stored2")
    if ctx.attempt == 1:
        await asyncio.sleep(hold)  # wait-ok: the test kills the worker here
    three = await ctx.step("three", _work, ctx, 3)
    _record(ctx, "done")
    return {"steps": [one, two, three], "attempt": ctx.attempt, "pid": os.getpid()}


def three_steps_sync(ctx: JobContext, hold: float = 60.0) -> dict[str, Any]:
    """``three_steps`` as a sync handler (steps without ``await``)."""
    one = ctx.step("one", _work, ctx, 1)
    _record(ctx, "stored1")
    two = ctx.step("two", _work, ctx, 2)
    _record(ctx, "stored2")
    if ctx.attempt == 1:
        time.sleep(hold)  # wait-ok: the test kills the worker here
    three = ctx.step("three", _work, ctx, 3)
    _record(ctx, "done")
    return {"steps": [one, two, three], "attempt": ctx.attempt, "pid": os.getpid()}


def register(app: Conveyor) -> None:
    app.job("three_steps")(three_steps)
    app.job("three_steps_sync")(three_steps_sync)
    app.job("three_steps_process", isolation="process")(three_steps)
    app.job("three_steps_sync_process", isolation="process")(three_steps_sync)


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def counted_steps(ctx: JobContext, path: str) -> dict[str, Any]:
    """A step that appends to ``path`` when it runs, a checkpoint, and a first
    attempt that fails after both were stored."""
    first = ctx.step("first", _append_and_return, path, "first")
    if ctx.last_checkpoint is None:
        ctx.checkpoint({"after": "first"})
        raise RuntimeError("the first attempt fails after its step")
    return {"first": first, "checkpoint": ctx.last_checkpoint, "attempt": ctx.attempt}


async def counted_steps_async(ctx: JobContext, path: str) -> dict[str, Any]:
    """``counted_steps`` as an async handler."""
    first = await ctx.step("first", _append_and_return, path, "first")
    if ctx.last_checkpoint is None:
        await ctx.checkpoint({"after": "first"})
        raise RuntimeError("the first attempt fails after its step")
    return {"first": first, "checkpoint": ctx.last_checkpoint, "attempt": ctx.attempt}


def _append_and_return(path: str, value: str) -> list[Any]:
    _append(path, value)
    return [value, os.getpid()]


def zombie_steps(ctx: JobContext, flag: str, out: str) -> str:
    """Stores step "a", then waits for ``flag`` (the test takes its lease meanwhile)
    and tries step "b": the name of what that raised goes to ``out``."""
    ctx.step("a", lambda: "a")
    deadline = time.monotonic() + 20
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)  # wait-ok: polls the test's flag file, bounded
    try:
        ctx.step("b", lambda: "b")
    except Exception as exc:
        _append(out, type(exc).__name__)
        raise
    _append(out, "stored")
    return "b stored"
