"""Hostile job types for the acceptance tests (``conveyor up --app hostileapp``)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from conveyor import Conveyor, JobContext


async def exit_now(ctx: JobContext, code: int = 3) -> None:
    sys.exit(code)


def block_first(ctx: JobContext, seconds: float = 30.0) -> dict[str, Any]:
    """Sync: attempt 1 blocks its thread, ignoring ``ctx.cancelled``; later ones return."""
    with open(os.environ["CONVEYOR_TEST_LOG"], "a") as log:
        log.write(f"{ctx.job_id} {ctx.attempt} {os.getpid()} start\n")
    if ctx.attempt == 1:
        time.sleep(seconds)  # wait-ok: careless blocking work
    return {"attempt": ctx.attempt}


async def charge(ctx: JobContext, order_id: str) -> dict[str, str]:
    return {"charged": order_id}


def register(app: Conveyor) -> None:
    app.job("exit_now", max_retries=0)(exit_now)
    app.job("block_first", timeout=600)(block_first)
    app.job("charge", queue="payments", max_retries=0)(charge)
