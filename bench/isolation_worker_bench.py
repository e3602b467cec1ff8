"""End-to-end cost of process isolation: the same trivial sync handler through a
real worker on SQLite, in thread mode and in process mode, side by side.

Not a test: prints jobs/s and per-job time for each mode and the ratio. Each mode
enqueues ``--jobs`` jobs (default 2,000) in one batch, starts a worker with
``--concurrency`` slots (default 4) and times until every job is completed
(store writes, leases, events included), so the figure is what a user sees.

Usage::

    .venv/bin/python bench/isolation_worker_bench.py [--jobs 2000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import noop_jobs

from conveyor import Conveyor
from conveyor.domain.states import JobState
from conveyor.settings import Settings


async def run(mode: str, jobs: int, concurrency: int, folder: Path) -> float:
    settings = Settings(
        database_url=f"sqlite:///{folder / (mode + '.db')}",
        concurrency=concurrency,
        poll_interval=0.05,
    )
    app = Conveyor(settings=settings)
    app.job("noop", isolation=mode)(noop_jobs.noop)
    async with app:
        await app.enqueue_many("noop", [{"n": i} for i in range(jobs)])
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        started = time.perf_counter()
        while (await app.store.count_by_state())[JobState.COMPLETED] < jobs:
            await asyncio.sleep(0.02)  # poll interval of the measurement
            if task.done():
                raise RuntimeError("the worker stopped early") from task.exception()
        elapsed = time.perf_counter() - started
        worker.request_stop()
        await task
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            m: await run(m, args.jobs, args.concurrency, Path(tmp)) for m in ("thread", "process")
        }
    cpus = os.cpu_count()
    print(
        f"\n{args.jobs} trivial sync jobs through a worker on SQLite, "
        f"concurrency {args.concurrency}, {cpus} CPUs"
    )
    print(f"{'mode':10} {'seconds':>8} {'jobs/s':>8} {'ms/job':>8} {'vs thread':>10}")
    base = results["thread"]
    for mode, secs in results.items():
        print(
            f"{mode:10} {secs:8.2f} {args.jobs / secs:8.0f} {secs * 1000 / args.jobs:8.3f} "
            f"{secs / base:9.2f}x"
        )
    extra = (results["process"] - base) * 1e6 / args.jobs
    print(f"process isolation adds {extra:.0f} us per job end to end at this concurrency")


if __name__ == "__main__":
    asyncio.run(main())
