"""Job types for the tracing and JSON-log tests, run in ``conveyor worker`` processes.

The handlers open spans of their own through the plain OpenTelemetry API: they
must nest under the worker's ``process`` span, in the thread of a sync handler too.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from conveyor import Conveyor, JobContext

tracer = trace.get_tracer("traceapp")


async def traced_ok(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    with tracer.start_as_current_span("handler work"):
        return {"n": n}


def traced_sync(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    with tracer.start_as_current_span("sync handler work"):
        return {"n": n}


async def always_fails(ctx: JobContext) -> None:
    raise ValueError("this job always fails")


async def fails_first(ctx: JobContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"attempt": ctx.attempt}


async def logs_a_warning(ctx: JobContext) -> None:
    ctx.logger.warning("handler_noticed_something", detail="inside the job's span")


def register(app: Conveyor) -> None:
    app.job("traced_ok")(traced_ok)
    app.job("traced_sync")(traced_sync)
    app.job("always_fails", max_retries=0)(always_fails)
    app.job("fails_first", max_retries=2)(fails_first)
    app.job("logs_a_warning")(logs_a_warning)
