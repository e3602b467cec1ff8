"""Job types for the dashboard's browser tests (``conveyor up --app dashapp``).

``conveyor up`` registers the demo types too: the tests use its ``fail`` with
``{"permanent": true}`` (dead-lettered at its first attempt)."""

from __future__ import annotations

from typing import Any

from conveyor import Conveyor, JobContext


async def ok(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    return {"n": n, "attempt": ctx.attempt}


def register(app: Conveyor) -> None:
    app.job("ok")(ok)
