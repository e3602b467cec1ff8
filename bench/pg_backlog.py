"""Is Conveyor-PostgreSQL's throughput flat from a 10k to a 1M-job backlog?

Not a test: loads a backlog with ``submit_many``, vacuums, starts ONE
``conveyor worker`` process (concurrency 200) and times 20,000 completions,
first with ~10,000 queued, then with ~1,000,000 queued. Progress is read from
the outbox's max id (each processed job appends two events), so measuring does
not scan the big table. Starts its own PostgreSQL (tests/pg.py) unless --dsn.

    .venv/bin/python bench/pg_backlog.py            # ~2 min, ~1 GB of disk
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conveyor import Conveyor, JobState, Settings  # noqa: E402

NOOP_APP = (
    "async def noop(ctx):\n    return None\n\n\ndef register(app):\n    app.job('noop')(noop)\n"
)


async def measure(dsn: str, app_dir: str, n: int) -> float:
    env = dict(
        os.environ,
        CONVEYOR_DATABASE_URL=dsn,
        CONVEYOR_CONCURRENCY="200",
        CONVEYOR_LOG_LEVEL="WARNING",
        PYTHONPATH=app_dir,
    )
    conn = await asyncpg.connect(dsn)

    async def processed() -> int:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM conveyor.events")) // 2

    try:
        base = await processed()
        worker = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", "noopbench"], env=env
        )
        try:
            deadline = time.monotonic() + 120
            while await processed() <= base + 2:
                if time.monotonic() > deadline:
                    raise SystemExit("the worker did not start within 120 s")
                await asyncio.sleep(0.01)  # wait-ok: polling with a deadline
            t0, c0 = time.perf_counter(), await processed()
            while (c := await processed()) - c0 < n:
                if time.monotonic() > deadline:
                    raise SystemExit("the worker did not finish within 120 s")
                await asyncio.sleep(0.05)  # wait-ok: polling with a deadline
            return (c - c0) / (time.perf_counter() - t0)
        finally:
            worker.terminate()
            worker.wait(60)
    finally:
        await conn.close()


async def run(dsn: str, app_dir: str) -> None:
    app = Conveyor(settings=Settings(database_url=dsn))
    async with app:
        for backlog in (10_000, 1_000_000):
            pending = (await app.store.count_by_state())[JobState.PENDING]
            t0 = time.perf_counter()
            while pending < backlog + 20_000:
                await app.submit_many([app.new_job("noop", {}) for _ in range(5000)])
                pending += 5000
            load = time.perf_counter() - t0
            conn = await asyncpg.connect(dsn)
            await conn.execute("VACUUM ANALYZE conveyor.jobs")
            await conn.close()
            rate = await measure(dsn, app_dir, 20_000)
            print(f"backlog ~{backlog:>9,}: {rate:>8,.0f} jobs/s  (loaded in {load:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="use this database (it must be empty)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as app_dir:
        Path(app_dir, "noopbench.py").write_text(NOOP_APP)
        if args.dsn:
            asyncio.run(run(args.dsn, app_dir))
            return
        from pg import PostgresServer

        with PostgresServer() as server:
            server.execute("CREATE DATABASE backlog")
            asyncio.run(run(server.dsn("backlog"), app_dir))


if __name__ == "__main__":
    main()
