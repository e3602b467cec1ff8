"""Job types for the promise tests, run in real worker processes.

Every handler appends one line per execution to ``$CONVEYOR_TEST_LOG`` (O_APPEND,
so concurrent processes never interleave a line): that is how tests count
executions without trusting the store or the logs.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from conveyor import Conveyor, JobContext


def _record(ctx: JobContext, event: str) -> None:
    path = os.environ["CONVEYOR_TEST_LOG"]
    line = f"{ctx.job_id} {ctx.attempt} {os.getpid()} {event}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def record(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    _record(ctx, "done")
    return {"n": n, "pid": os.getpid()}


async def hang_first(ctx: JobContext, seconds: float = 60.0) -> dict[str, Any]:
    """Attempt 1 announces itself then runs long; later attempts finish at once."""
    _record(ctx, "start")
    if ctx.attempt == 1:
        await asyncio.sleep(seconds)  # wait-ok: the job's simulated work
    _record(ctx, "done")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def blocking_first(ctx: JobContext, seconds: float = 3.0) -> dict[str, Any]:
    """Sync handler: attempt 1 blocks its thread for ``seconds`` (a zombie when paused)."""
    _record(ctx, "start")
    if ctx.attempt == 1:
        time.sleep(seconds)  # wait-ok: the job's simulated (blocking) work
    _record(ctx, "done")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


async def slow(ctx: JobContext, seconds: float = 0.05) -> dict[str, Any]:
    _record(ctx, "start")
    await asyncio.sleep(seconds)  # wait-ok: the job's simulated work
    _record(ctx, "done")
    return {"pid": os.getpid()}


async def wf_step(ctx: JobContext, seconds: float = 0.05) -> dict[str, Any]:
    """A workflow step: announces itself, works a little, returns what it saw."""
    _record(ctx, "start")
    await asyncio.sleep(seconds)  # wait-ok: the step's simulated work
    _record(ctx, "done")
    return {"step": ctx.step_name, "parents": sorted(ctx.parent_results), "pid": os.getpid()}


def register(app: Conveyor) -> None:
    app.job("record")(record)
    app.job("hang_first")(hang_first)
    app.job("blocking_first")(blocking_first)
    app.job("slow")(slow)
    app.job("wf_step")(wf_step)
