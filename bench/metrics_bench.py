"""What metrics cost: processing jobs/s with metrics on vs off, and /metrics scrape time.

Not a test: a bounded script that prints figures (127.0.0.1 only, temp files).

1. processing: N no-op jobs pre-loaded, one in-process worker (concurrency 50)
   runs them; "on" wires exactly what ``conveyor worker --metrics-port`` does
   (finish listener, observer, the endpoint server) and scrapes ``/metrics``
   every second while the worker runs (a scrape interval 15x shorter than
   Prometheus's usual); "off" wires nothing. Off and on alternate, ``--rounds``
   times each, on a fresh store each run; the median of each is reported.
2. scrape: a worker process's ``/metrics`` over HTTP with 100 job types x 10
   queues: every (type, status) and (type, error type) counter, duration and
   wait histograms, 20 API routes, and the fleet gauges read from a SQLite store
   holding unfinished jobs of every type and queue (the fleet read forced on
   every scrape, no 1 s cache). Target: <= 50 ms.

Usage::

    .venv/bin/python bench/metrics_bench.py            # N=20,000, 3 rounds
    .venv/bin/python bench/metrics_bench.py --quick    # N=3,000, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import httpx
import structlog

from conveyor.app import Conveyor
from conveyor.domain.job import Finish
from conveyor.domain.states import Action
from conveyor.observability.endpoints import WorkerEndpoints
from conveyor.settings import Settings

TARGET_SCRAPE_MS = 50.0
TARGET_COST = 0.05


def quiet() -> None:
    import prometheus_client

    prometheus_client.disable_created_metrics()  # as the conveyor command does
    logging.disable(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def process_run(url: str, n: int, *, metrics: bool) -> float:
    """Jobs/s for ``n`` no-op jobs on a fresh store, with or without metrics."""
    settings = Settings(database_url=url, concurrency=50, poll_interval=0.05)
    app = Conveyor(settings=settings)
    done = asyncio.Event()
    count = 0

    @app.job("noop")
    async def noop(ctx: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with app:
        for start in range(0, n, 1000):
            await app.submit_many([app.new_job("noop") for _ in range(min(1000, n - start))])
        worker = app.worker()
        endpoints: WorkerEndpoints | None = None
        scraper: asyncio.Task[None] | None = None
        if metrics:
            port = free_port()
            endpoints = WorkerEndpoints(app.deps, worker, host="127.0.0.1", port=port)
            await endpoints.start()

            async def scrape() -> None:
                async with httpx.AsyncClient() as c:
                    while True:
                        await c.get(f"http://127.0.0.1:{port}/metrics")
                        await asyncio.sleep(1.0)  # wait-ok: the scrape interval

            scraper = asyncio.create_task(scrape())
        started = time.perf_counter()
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(done.wait(), timeout=120)
        worker.request_stop()
        await asyncio.wait_for(run, timeout=60)  # the last outcomes are written
        elapsed = time.perf_counter() - started
        if scraper is not None:
            scraper.cancel()
        if endpoints is not None:
            await endpoints.close()
    return n / elapsed


async def processing(n: int, rounds: int, backend: str) -> dict[str, Any]:
    off: list[float] = []
    on: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for flag, out in ((False, off), (True, on)):
                url = "memory://" if backend == "memory" else f"sqlite:///{tmp}/p{i}{flag}.db"
                out.append(await process_run(url, n, metrics=flag))
    m_off, m_on = statistics.median(off), statistics.median(on)
    return {
        "backend": backend,
        "n": n,
        "off": off,
        "on": on,
        "median_off": m_off,
        "median_on": m_on,
        "cost": 1 - m_on / m_off,
    }


async def scrape_bench(types: int, queues: int, scrapes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        app = Conveyor(settings=Settings(database_url=f"sqlite:///{tmp}/s.db"))
        names = [f"type_{t:03d}" for t in range(types)]
        qnames = [f"queue_{q}" for q in range(queues)]
        for i, name in enumerate(names):
            app.job(name, queue=qnames[i % queues])(_noop)
        async with app:
            # Unfinished jobs of every type in every queue, for the fleet read.
            batch = [app.new_job(t, queue=q) for t in names for q in qnames for _ in range(3)]
            await app.submit_many(batch)
            worker = app.worker()
            port = free_port()
            ep = WorkerEndpoints(app.deps, worker, host="127.0.0.1", port=port)
            m = ep.metrics
            now = app.now()
            jobs = (await app.store.list_jobs(_query(len(batch)))).jobs
            m.jobs_started([_shift(j, now) for j in jobs], now)
            errors = [f"Error{e}" for e in range(3)]
            for t in names:
                for action in (Action.COMPLETE, Action.RETRY, Action.FAIL, Action.CONFIRM_CANCEL):
                    for e in errors:
                        m.job_finished(
                            Finish("x", "t", action, job_type=t, duration=0.3, error_type=e), True
                        )
            for r in range(20):
                for status in ("200", "201", "400", "404"):
                    m.http_duration.labels("GET", f"/api/route_{r}", status).observe(0.002)
            await ep.start()
            times: list[float] = []
            size = 0
            async with httpx.AsyncClient() as c:
                for _ in range(scrapes):
                    ep.exporter._at = -1e9  # force the fleet read on every scrape
                    t0 = time.perf_counter()
                    resp = await c.get(f"http://127.0.0.1:{port}/metrics")
                    times.append((time.perf_counter() - t0) * 1000)
                    size = len(resp.content)
                    assert resp.status_code == 200
                    assert b"conveyor_queue_depth{" in resp.content
            series = sum(1 for line in resp.text.splitlines() if line and line[0] != "#")
            t0 = time.perf_counter()
            for _ in range(scrapes):
                m.render()
            render_ms = (time.perf_counter() - t0) * 1000 / scrapes
            await ep.close()
    times.sort()
    return {
        "types": types,
        "queues": queues,
        "series": series,
        "bytes": size,
        "p50_ms": statistics.median(times),
        "p95_ms": times[int(len(times) * 0.95) - 1],
        "max_ms": times[-1],
        "render_ms": render_ms,
    }


async def _noop(ctx: Any) -> None:
    return None


def _query(limit: int) -> Any:
    from conveyor.domain.job import JobQuery

    return JobQuery(limit=min(limit, 1000))


def _shift(job: Any, now: Any) -> Any:
    from dataclasses import replace

    return replace(job, run_at=now - timedelta(seconds=(hash(job.id) % 600) / 10))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    n = args.n or (3_000 if args.quick else 20_000)
    rounds = args.rounds or (1 if args.quick else 3)
    quiet()
    for backend in ("memory", "sqlite"):
        r = await processing(n, rounds, backend)
        print(
            f"processing {backend:6} N={n}: off {r['median_off']:,.0f} jobs/s, "
            f"on {r['median_on']:,.0f} jobs/s, cost {r['cost']:+.1%} "
            f"(target <= {TARGET_COST:.0%}; runs off {[round(x) for x in r['off']]}, "
            f"on {[round(x) for x in r['on']]})"
        )
    s = await scrape_bench(100, 10, 20 if args.quick else 50)
    print(
        f"scrape 100 types x 10 queues: p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, "
        f"max {s['max_ms']:.1f} ms (target <= {TARGET_SCRAPE_MS:.0f} ms); "
        f"{s['series']:,} samples, {s['bytes'] / 1024:,.0f} KiB; render alone "
        f"{s['render_ms']:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
