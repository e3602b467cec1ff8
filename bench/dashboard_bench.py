"""How long does each dashboard page take on the server with a big PostgreSQL backlog?

Not a test: starts its own PostgreSQL (tests/pg.py) unless --dsn, loads N jobs
(default 1,000,000) straight into ``conveyor.jobs`` with one INSERT ... SELECT
(90% completed over the last 7 days with a busy last hour, 7% pending over 5
queues, 2% failed, the rest cancelled, blocked and running) plus 2 events per
job for the newest 300,000, runs VACUUM ANALYZE, then renders every page
in-process (the FastAPI app over httpx's ASGI transport) and prints the
server-side time of each (its ``Server-Timing: page;dur=`` header: store reads
and template rendering) as p50 / p95 / max over 20 requests after a warm-up.

    .venv/bin/python bench/dashboard_bench.py               # ~2-3 min, ~1.5 GB of disk
    .venv/bin/python bench/dashboard_bench.py --jobs 200000 # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conveyor import Conveyor, Settings  # noqa: E402
from conveyor.api.app import create_app  # noqa: E402
from conveyor.dashboard import router as dashboard_module  # noqa: E402

LOAD_JOBS = """
INSERT INTO conveyor.jobs (id, queue, job_type, state, priority, payload, result, error,
    attempt, max_retries, run_at, worker_id, created_by, created_at, started_at, completed_at,
    updated_at)
SELECT lpad(to_hex((extract(epoch FROM c) * 1000)::bigint), 12, '0') || substr(md5(i::text), 1, 20),
       'q' || (i % 5),
       CASE WHEN i % 997 = 0 THEN 'rare'
            ELSE (ARRAY['email', 'sms', 'report', 'resize'])[1 + i % 4] END,
       st, 50, jsonb_build_object('n', i),
       CASE WHEN st = 'completed' THEN '{"ok": true}'::jsonb END,
       CASE WHEN st = 'failed' THEN 'RuntimeError: boom' END,
       CASE WHEN st IN ('pending', 'blocked') THEN 0 ELSE 1 END, 3, c,
       CASE WHEN st = 'running' THEN 'w-bench' END, 'api:bench' || (i % 3), c,
       CASE WHEN st IN ('completed', 'failed', 'running') THEN c + interval '40 ms' END,
       CASE WHEN st IN ('completed', 'failed', 'cancelled') THEN c + interval '90 ms' END,
       c + interval '90 ms'
FROM (
    SELECT i,
           -- the newest 3% inside the last hour, the rest over 7 days
           CASE WHEN i > n * 0.97 THEN now() - ((n - i) / (n * 0.03))::float8 * interval '1 hour'
                ELSE now() - interval '1 hour'
                     - (((n * 0.97) - i) / (n * 0.97))::float8 * interval '7 days'
           END AS c,
           CASE WHEN i % 100 < 90 THEN 'completed' WHEN i % 100 < 97 THEN 'pending'
                WHEN i % 100 < 99 THEN 'failed' WHEN i % 1000 < 995 THEN 'cancelled'
                WHEN i % 1000 < 998 THEN 'blocked' ELSE 'running' END AS st
    FROM (SELECT $1::bigint AS n) p, generate_series(1, p.n) AS i
) s
"""

LOAD_EVENTS = """
INSERT INTO conveyor.events (type, job_id, data, created_at)
SELECT t, j.id, jsonb_build_object('job_id', j.id, 'job_type', j.job_type, 'queue', j.queue),
       CASE WHEN t = 'job_submitted' THEN j.created_at ELSE j.updated_at END
FROM (SELECT * FROM conveyor.jobs ORDER BY seq DESC LIMIT $1) j,
     unnest(ARRAY['job_submitted', 'job_completed']) AS t
ORDER BY 4
"""

TIMING = re.compile(r"page;dur=([0-9.]+)")


async def load(dsn: str, jobs: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        await conn.execute(LOAD_JOBS, jobs)
        await conn.execute(LOAD_EVENTS, min(jobs, 300_000))
        await conn.execute(
            "INSERT INTO conveyor.workers (id, host, pid, queues, job_types, concurrency,"
            " started_at, heartbeat_at, state, jobs_running)"
            ' VALUES (\'w-bench\', \'bench\', 1, \'["q0", "q1", "q2", "q3", "q4"]\', \'[]\','
            " 50, now(), now(), 'running', 3)"
        )
        await conn.execute("VACUUM ANALYZE conveyor.jobs")
        await conn.execute("VACUUM ANALYZE conveyor.events")
        print(f"loaded {jobs:,} jobs in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        await conn.close()


async def pages(dsn: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        newest = await conn.fetchrow(
            "SELECT id, created_at FROM conveyor.jobs ORDER BY created_at DESC LIMIT 1"
        )
        deep = await conn.fetchrow(
            "SELECT id, created_at FROM conveyor.jobs ORDER BY created_at LIMIT 1 OFFSET 1000"
        )
    finally:
        await conn.close()
    cursor = f"{deep['created_at'].timestamp():.6f}~{deep['id']}"
    return [
        ("overview", "/"),
        ("jobs", "/ui/jobs"),
        ("jobs state=pending", "/ui/jobs?state=pending"),
        ("jobs state=failed", "/ui/jobs?state=failed"),
        ("jobs queue=q3", "/ui/jobs?queue=q3"),
        ("jobs created_by", "/ui/jobs?created_by=api:bench1"),
        ("jobs job_type=rare (0.1%)", "/ui/jobs?job_type=rare"),
        ("jobs job_type=none (no job)", "/ui/jobs?job_type=nothing"),
        ("jobs older page (deep)", f"/ui/jobs?before={cursor}"),
        ("jobs id prefix", f"/ui/jobs?q={newest['id'][:10]}"),
        ("job detail", f"/ui/jobs/{newest['id']}"),
        ("queues", "/ui/queues"),
        ("workers", "/ui/workers"),
        ("dlq", "/ui/dlq"),
        ("dlq job_type=email", "/ui/dlq?job_type=email"),
        ("workflows", "/ui/workflows"),
        ("webhooks", "/ui/webhooks"),
        ("locks", "/ui/locks"),
    ]


async def measure(dsn: str, rounds: int) -> None:
    # Every request reads the store: the overview's reads are otherwise shared for
    # a second, and 20 back-to-back requests would mostly time that sharing.
    dashboard_module.OVERVIEW_TTL = 0.0
    app = Conveyor(settings=Settings(database_url=dsn))
    async with app:
        api = create_app(app)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            print(f"{'page':<28} {'first ms':>8} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
            for name, path in await pages(dsn):
                # The first request warms plans, templates and the overview's
                # closed minutes; its time is shown but not in the percentiles.
                first = TIMING.search((await c.get(path)).headers.get("server-timing", ""))
                times = []
                for _ in range(rounds):
                    r = await c.get(path)
                    assert r.status_code == 200, (path, r.status_code, r.text[:300])
                    match = TIMING.search(r.headers.get("server-timing", ""))
                    assert match, path
                    times.append(float(match[1]))
                times.sort()
                p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
                cold = float(first[1]) if first else float("nan")
                print(
                    f"{name:<28} {cold:>8.1f} {statistics.median(times):>8.1f} {p95:>8.1f}"
                    f" {times[-1]:>8.1f}",
                    flush=True,
                )


async def run(dsn: str, jobs: int, rounds: int, *, fill: bool = True) -> None:
    if fill:
        async with Conveyor(settings=Settings(database_url=dsn)):
            pass  # migrations
        await load(dsn, jobs)
    await measure(dsn, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this database (it must be empty)")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--measure-only", action="store_true", help="--dsn holds a loaded database already"
    )
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(run(args.dsn, args.jobs, args.rounds, fill=not args.measure_only))
        return
    from pg import PostgresServer

    with PostgresServer() as server:
        server.execute("CREATE DATABASE dashboard")
        asyncio.run(run(server.dsn("dashboard"), args.jobs, args.rounds))


if __name__ == "__main__":
    main()
