"""How late a cron schedule's jobs are submitted: 1-second schedules fired by N
in-process schedulers on one SQLite file (or PostgreSQL with --database-url),
for a bounded window. Prints the lag (job created_at - fire time) percentiles
and checks that no fire time made two jobs.

    python bench/schedule_fire_bench.py [--schedulers 3] [--schedules 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path

from conveyor import Conveyor
from conveyor.domain.job import JobQuery
from conveyor.settings import Settings


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedulers", type=int, default=3)
    parser.add_argument("--schedules", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-cron-bench-"))
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"

    def make() -> Conveyor:
        app = Conveyor(settings=Settings(database_url=url, allow_unknown_job_types=True))
        for i in range(args.schedules):
            app.schedule(f"bench-{i}", "* * * * * *", "bench_tick", {"i": i})
        return app

    apps = [make() for _ in range(args.schedulers)]
    for app in apps:
        await app.open()
    schedulers = [app.scheduler() for app in apps]
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    await asyncio.sleep(args.seconds)  # the measured window
    for s in schedulers:
        s.request_stop()
    await asyncio.gather(*tasks)
    page = await apps[0].store.list_jobs(JobQuery(limit=1000, job_type="bench_tick"))
    jobs = list(page.jobs)
    offset = 1000
    while len(jobs) < page.total:
        more = await apps[0].store.list_jobs(
            JobQuery(limit=1000, offset=offset, job_type="bench_tick")
        )
        jobs.extend(more.jobs)
        offset += 1000
    lags = sorted(
        (j.created_at - datetime.fromisoformat(j.metadata["fire_at"])).total_seconds() * 1000
        for j in jobs
        if j.created_at is not None
    )
    doubled = [
        k for k, n in Counter((j.schedule_id, j.metadata["fire_at"]) for j in jobs).items() if n > 1
    ]
    for app in apps:
        await app.close()
    backend = url.split(":", 1)[0]
    print(
        f"backend {backend}, {args.schedulers} schedulers, "
        f"{args.schedules} schedules x 1/s, {args.seconds:g} s"
    )
    print(f"jobs fired: {len(jobs)}; fire times fired twice: {len(doubled)}")
    if lags:
        q = statistics.quantiles(lags, n=100)
        print(f"lag ms: p50 {q[49]:.1f}  p95 {q[94]:.1f}  p99 {q[98]:.1f}  max {lags[-1]:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
