"""Job types for the flow control process tests (tests/integration/test_flow_processes.py).

Handlers append ``<event> <job_type> <key> <wall time> <pid>`` lines to
``$CONVEYOR_TEST_LOG`` (O_APPEND: concurrent processes never interleave a line),
so the tests judge the limits from the handlers' own stamps.
"""

from __future__ import annotations

import asyncio
import os
import time

from conveyor import Conveyor, JobContext

app = Conveyor()


def _stamp(event: str, job_type: str, key: str) -> None:
    line = f"{event} {job_type} {key} {time.time():.6f} {os.getpid()}\n".encode()
    fd = os.open(os.environ["CONVEYOR_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.job("tenant_work", concurrency_key="tenant:{tenant_id}", concurrency_limit=2)
async def tenant_work(ctx: JobContext, tenant_id: int, i: int = 0) -> int:
    _stamp("start", "tenant_work", f"tenant:{tenant_id}")
    await asyncio.sleep(0.05)  # wait-ok: the job's work; overlapping runs are what is limited
    _stamp("stop", "tenant_work", f"tenant:{tenant_id}")
    return i


@app.job("rated_work", rate_limit="50/s")
async def rated_work(ctx: JobContext, i: int = 0) -> int:
    _stamp("start", "rated_work", "-")
    return i
