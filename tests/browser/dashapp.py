"""Job types for the dashboard's browser tests (``conveyor up --app dashapp``).

``conveyor up`` registers the demo types too: the tests use its ``fail`` with
``{"permanent": true}`` (dead-lettered at its first attempt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conveyor import Conveyor, JobContext, Permanent


async def ok(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    return {"n": n, "attempt": ctx.attempt}


def gate(ctx: JobContext, fifo: str) -> dict[str, Any]:
    """Runs until the test writes to the named pipe ``fifo``: opening it for
    reading blocks until a writer opens it, so the test decides when the job
    finishes, with no timer."""
    return {"released": Path(fifo).read_text()}


async def broken(ctx: JobContext) -> None:
    """A second dead-lettering type, for the dead-letter page's type filter."""
    raise Permanent("broken on purpose")


def needs_file(ctx: JobContext, path: str) -> dict[str, Any]:
    """Fails for good until the file ``path`` exists (a retry then succeeds)."""
    if not Path(path).exists():
        raise Permanent(f"{path} does not exist yet")
    return {"found": path}


def register(app: Conveyor) -> None:
    app.job("ok")(ok)
    app.job("gate")(gate)
    app.job("broken")(broken)
    app.job("needs_file")(needs_file)
