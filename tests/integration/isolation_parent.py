"""A worker stand-in for test_isolation: starts a pool, runs a job that hangs,
and is then killed with SIGKILL by the test. Usage: isolation_parent.py MARKER"""

from __future__ import annotations

import asyncio
import sys

from conveyor.runtime.isolation import ChildJob, HandlerRef, ProcessPool
from integration import isolation_handlers


async def main(marker: str) -> None:
    pool = ProcessPool(1, kill_grace=0.5)
    job = ChildJob(
        job_id="orphan",
        job_type="hang",
        attempt=1,
        max_retries=0,
        queue="default",
        worker_id="parent",
        metadata={},
        payload={"marker": marker},
        handler=HandlerRef.of(isolation_handlers.hang),
        is_async=False,
    )
    await pool.run(job, None)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
