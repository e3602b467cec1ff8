"""Demo job types: ``conveyor worker conveyor.demo`` runs them.

- ``test_job``: returns its payload.
- ``sleep``: ``{"seconds": x}`` sleeps x seconds (cancellable).
- ``fail``: ``{}`` fails every attempt (retried, then dead-lettered);
  ``{"times": n}`` fails the first n attempts only; ``{"permanent": true}`` goes
  to the dead-letter queue at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conveyor.app import Conveyor
from conveyor.domain.errors import Permanent
from conveyor.domain.retry import RetryPolicy
from conveyor.runtime.context import JobContext


async def test_job(ctx: JobContext, **payload: Any) -> dict[str, Any]:
    return payload


async def sleep(ctx: JobContext, seconds: float = 1.0) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def fail(
    ctx: JobContext, times: int | None = None, permanent: bool = False
) -> dict[str, int]:
    if times is None or ctx.attempt <= times:
        how = "every attempt" if times is None else f"{times} times"
        message = f"failing on purpose (attempt {ctx.attempt}, fails {how})"
        if permanent:
            raise Permanent(message)
        raise RuntimeError(message)
    return {"attempts": ctx.attempt}


#: What ``conveyor up`` prints about the demo job types at start.
SUMMARY = (
    'test_job {...} returns its payload; sleep {"seconds": 2}; '
    'fail {} fails every attempt, {"times": 1} only the first, '
    '{"permanent": true} goes to the DLQ at once'
)


def register(app: Conveyor) -> None:
    """Register the demo job types on ``app``."""
    app.job("test_job")(test_job)
    app.job("sleep")(sleep)
    app.job("fail", retry=RetryPolicy(base=0.05, factor=2.0, max_delay=1.0))(fail)
