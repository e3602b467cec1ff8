"""What metrics cost: processing jobs/s with metrics on vs off, and /metrics scrape time.

Not a test: a bounded script that prints figures (127.0.0.1 only, temp files).

1. processing: N no-op jobs pre-loaded in a SQLite file, one in-process worker
   (concurrency 50) runs them; "on" wires exactly what ``conveyor worker
   --metrics-port`` does (finish listener, observer, the endpoint server), and
   "on+scrape 1s" also scrapes ``/metrics`` every second while the worker runs
   (15x Prometheus's usual rate); "off" wires nothing. The three take turns,
   ``--rounds`` times each, on a fresh file each run; medians of
   jobs/s and of CPU time per job are reported (the machine is shared: CPU per
   job is the steadier figure).
2. scrape: a worker process's ``/metrics`` over HTTP with 100 job types x 10
   queues: every (type, status) and (type, error type) counter, duration and
   wait histograms, 20 API routes, and the fleet gauges read from a SQLite store
   holding unfinished jobs of every type and queue (the fleet read forced on
   every scrape, no 1 s cache). Target: <= 50 ms.

Usage::

    .venv/bin/python bench/metrics_bench.py            # N=5,000, 7 rounds
    .venv/bin/python bench/metrics_bench.py --quick    # N=2,000, 2 rounds
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


async def process_run(
    url: str, n: int, *, metrics: bool, scrape_every: float = 0
) -> tuple[float, float]:
    """(jobs/s, CPU microseconds per job) for ``n`` no-op jobs on a fresh store,
    with or without metrics. CPU time counts every thread of this process (the
    SQLite store's too) and is less sensitive than wall time to other processes
    sharing the machine."""
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
                        await asyncio.sleep(scrape_every)  # wait-ok: the scrape interval

            if scrape_every:
                scraper = asyncio.create_task(scrape())
        started, cpu = time.perf_counter(), time.process_time()
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(done.wait(), timeout=120)
        worker.request_stop()
        await asyncio.wait_for(run, timeout=60)  # the last outcomes are written
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if scraper is not None:
            scraper.cancel()
        if endpoints is not None:
            await endpoints.close()
    return n / elapsed, cpu / n * 1e6


async def processing(n: int, rounds: int) -> dict[str, Any]:
    """Off and on alternate (the order swapped each round), each on a fresh
    SQLite file; medians of jobs/s and of CPU per job."""
    modes = {"off": (False, 0.0), "on": (True, 0.0), "on+scrape 1s": (True, 1.0)}
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    order = list(modes)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for j, mode in enumerate(order[i % 3 :] + order[: i % 3]):
                metrics, every = modes[mode]
                url = f"sqlite:///{tmp}/p{i}-{j}.db"
                runs[mode].append(await process_run(url, n, metrics=metrics, scrape_every=every))
    rate = {m: statistics.median(r for r, _ in runs[m]) for m in runs}
    cpu = {m: statistics.median(c for _, c in runs[m]) for m in runs}
    return {
        "n": n,
        "rates": {m: [round(r) for r, _ in runs[m]] for m in runs},
        "rate": rate,
        "cpu": cpu,
        "cost_wall": {m: 1 - rate[m] / rate["off"] for m in runs},
        "cost_cpu": {m: cpu[m] / cpu["off"] - 1 for m in runs},
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
    n = args.n or (2_000 if args.quick else 5_000)
    rounds = args.rounds or (2 if args.quick else 7)
    quiet()
    r = await processing(n, rounds)
    print(
        f"processing (SQLite, N={n}, {rounds} rounds, medians; target cost <= {TARGET_COST:.0%}):"
    )
    for mode in r["rate"]:
        print(
            f"  {mode:13} {r['rate'][mode]:7,.0f} jobs/s  {r['cpu'][mode]:5.0f} us CPU/job  "
            f"cost {r['cost_wall'][mode]:+6.1%} wall {r['cost_cpu'][mode]:+6.1%} CPU  "
            f"runs {r['rates'][mode]}"
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
