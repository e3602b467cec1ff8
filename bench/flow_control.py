"""Flow control costs (docs/flow_control.md, figures in docs/benchmarks.md).

Not a test. Two measurements per backend (SQLite file, PostgreSQL: its own
server from tests/pg.py):

1. fetch throughput: 20,000 jobs over 1,000 keys, leased 50 at a time by one
   store and completed at once (``fetch`` + ``finish_many``, the worker's two
   statements), without limits and with ``concurrency_limit=2`` per key;
2. fairness: a 100,000-job backlog in tenant A (limit 2 per tenant), an
   in-process worker (concurrency 20, 5 ms jobs, no outbox relay: relaying the
   100,000 submit events is another cost) busy with it, then 100 jobs of tenant B:
   seconds from B's submit until its first and its last job start.

    .venv/bin/python bench/flow_control.py                # both backends, ~2 min
    .venv/bin/python bench/flow_control.py --backend sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conveyor import Conveyor, Settings  # noqa: E402
from conveyor.app import store_from_url  # noqa: E402
from conveyor.domain.flow import FlowLimits, KeyTemplate  # noqa: E402
from conveyor.domain.job import Finish, NewJob  # noqa: E402
from conveyor.domain.states import Action  # noqa: E402
from conveyor.storage.base import Store  # noqa: E402

JOBS = 20_000
KEYS = 1_000
BATCH = 50
BACKLOG = 100_000
SMALL = 100


async def fetch_rate(url: str, limited: bool) -> float:
    """Jobs per second through fetch + finish_many, one store, 50 per fetch."""
    store: Store = store_from_url(url)
    await store.open()
    try:
        now = Conveyor(settings=Settings(database_url="memory://")).now
        if limited:
            limits = FlowLimits("task", KeyTemplate.parse("k{k}"), concurrency_limit=2)
            await store.record_flow_limits([limits], now())
        jobs = [NewJob("task", {"i": i}, concurrency_key=f"k{i % KEYS:04d}") for i in range(JOBS)]
        for i in range(0, JOBS, 5_000):
            await store.enqueue_many(jobs[i : i + 5_000], now())
        done = 0
        t0 = time.perf_counter()
        while done < JOBS:
            got = await store.fetch(
                "bench", queues=("default",), job_types=("task",), limit=BATCH, now=now()
            )
            if not got:
                raise SystemExit(f"fetch returned nothing after {done} jobs")
            assert all(j.lease_token for j in got)
            await store.finish_many(
                [Finish(j.id, j.lease_token or "", Action.COMPLETE, None) for j in got], now()
            )
            done += len(got)
        return JOBS / (time.perf_counter() - t0)
    finally:
        await store.close()


async def small_tenant_wait(url: str) -> dict[str, float]:
    """Seconds from tenant B's submit until its first and last job start."""
    app = Conveyor(settings=Settings(database_url=url, poll_interval=0.05))
    started: dict[str, list[float]] = {"A": [], "B": []}

    @app.job("work", concurrency_key="tenant:{tenant}", concurrency_limit=2)
    async def work(ctx: Any, tenant: str, i: int = 0) -> None:
        started[tenant].append(time.perf_counter())
        await asyncio.sleep(0.005)  # wait-ok: the job's simulated work

    await app.open()
    try:
        for i in range(0, BACKLOG, 10_000):
            await app.enqueue_many("work", [{"tenant": "A", "i": n} for n in range(i, i + 10_000)])
        worker = app.worker(concurrency=20, maintenance=False)  # no outbox relay: see docs
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 60
        while len(started["A"]) < 50:  # busy with A's backlog
            if time.monotonic() > deadline:
                raise SystemExit("the worker did not start A's jobs")
            await asyncio.sleep(0.01)  # wait-ok: polling with a deadline
        t0 = time.perf_counter()
        await app.enqueue_many("work", [{"tenant": "B", "i": n} for n in range(SMALL)])
        while len(started["B"]) < SMALL:
            if time.monotonic() > deadline + 60:
                raise SystemExit(f"only {len(started['B'])} of B's jobs started")
            await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
        worker.request_stop()
        worker.request_stop()
        await task
        return {"first": started["B"][0] - t0, "last": started["B"][-1] - t0}
    finally:
        await app.close()


async def run(name: str, make_url: Any, rounds: int) -> None:
    plain: list[float] = []
    limited: list[float] = []
    for r in range(rounds):  # alternated: a shared machine's load hits both alike
        plain.append(await fetch_rate(make_url(f"plain{r}"), False))
        limited.append(await fetch_rate(make_url(f"limited{r}"), True))
    p, lim = statistics.median(plain), statistics.median(limited)
    print(
        f"{name}: fetch+finish median of {rounds}: {p:,.0f} jobs/s without limits "
        f"({', '.join(f'{x:,.0f}' for x in plain)}), {lim:,.0f} jobs/s with 1,000 keys x "
        f"limit 2 ({', '.join(f'{x:,.0f}' for x in limited)}): {lim / p:.0%}",
        flush=True,
    )
    wait = await small_tenant_wait(make_url("fair"))
    print(
        f"{name}: {BACKLOG:,} jobs of tenant A queued, {SMALL} of tenant B submitted: B's first "
        f"job started after {wait['first'] * 1000:.1f} ms, its last after "
        f"{wait['last'] * 1000:.0f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.backend in ("sqlite", "both"):
            asyncio.run(run("SQLite", lambda n: f"sqlite:///{tmp}/{n}.db", args.rounds))
        if args.backend in ("postgres", "both"):
            from pg import PostgresServer

            with PostgresServer() as server:

                def make(n: str) -> str:
                    server.execute(f"CREATE DATABASE {n}")
                    return server.dsn(n)

                asyncio.run(run("PostgreSQL", make, args.rounds))


if __name__ == "__main__":
    main()
