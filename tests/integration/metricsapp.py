"""Job types for the metrics tests, run in real worker processes."""

from __future__ import annotations

from typing import Any

from conveyor import Conveyor, JobContext
from conveyor.domain.retry import RetryPolicy


class BoomError(Exception):
    """The one exception class ``boom`` raises (its metrics' error_type)."""


async def ok(ctx: JobContext) -> dict[str, Any]:
    return {"attempt": ctx.attempt}


async def boom(ctx: JobContext) -> None:
    raise BoomError("always")


def register(app: Conveyor) -> None:
    app.job("ok")(ok)
    app.job("boom", max_retries=1, retry=RetryPolicy(base=0.01, max_delay=0.01))(boom)
