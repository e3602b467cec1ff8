"""Cost of process isolation: a trivial sync handler in child processes vs threads.

Not a test: a script that prints a table. The same handler (``noop``: returns
its payload's ``n``) runs

- ``thread``: as the worker runs sync handlers today, ``run_in_executor`` on a
  ``ThreadPoolExecutor`` of ``size`` threads, with a fresh ``JobContext`` per job;
- ``process``: through ``ProcessPool.run`` (``runtime/isolation.py``), its
  ``size`` children started beforehand (``pool.start()``), so the figure is the
  steady state: one JSON message each way per job over a socket pair;
- ``process, fresh child per job``: ``max_jobs_per_child=1``, so every job also
  pays for starting a child (a fork from the forkserver) and ending one;

at concurrency 1 (per-job latency: ``overhead`` = process minus thread) and at
concurrency ``size`` (throughput). It also times one child start: the first
(which starts the forkserver and imports Conveyor there) and later ones.

Each step runs for ``--seconds`` (default 1) or ``--max-jobs``, whichever
comes first, after a short warm-up; the whole script takes a few seconds.

Usage::

    .venv/bin/python bench/isolation_bench.py
    .venv/bin/python bench/isolation_bench.py --size 4 --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from conveyor.runtime.context import JobContext
from conveyor.runtime.isolation import ChildJob, HandlerRef, ProcessPool


def noop(ctx: JobContext, n: int) -> int:
    return n


def ctx_for(i: int) -> JobContext:
    return JobContext(
        job_id=f"job-{i}",
        job_type="noop",
        attempt=1,
        max_retries=3,
        queue="default",
        worker_id="bench",
        metadata={},
    )


def child_job(i: int) -> ChildJob:
    return ChildJob(
        job_id=f"job-{i}",
        job_type="noop",
        attempt=1,
        max_retries=3,
        queue="default",
        worker_id="bench",
        metadata={},
        payload={"n": i},
        handler=HANDLER,
        is_async=False,
    )


HANDLER = HandlerRef.of(noop)  # "__main__.noop": the children import this script as __mp_main__


async def measure(
    run_one: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float, max_jobs: int
) -> tuple[int, float]:
    """Jobs done and seconds taken by ``concurrency`` loops calling ``run_one``."""
    counter = itertools.count()
    deadline = time.perf_counter() + seconds
    done = 0

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= max_jobs:
                return
            await run_one(i)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    size = args.size
    rows: list[tuple[str, int, int, float]] = []
    results: dict[tuple[str, int], float] = {}

    threads = ThreadPoolExecutor(size, thread_name_prefix="bench")
    loop = asyncio.get_running_loop()

    async def in_thread(i: int) -> Any:
        result = await loop.run_in_executor(threads, partial(noop, ctx_for(i), n=i))
        assert result == i
        return result

    t0 = time.perf_counter()
    pool = ProcessPool(size)
    await pool.start()
    first_start = time.perf_counter() - t0

    async def in_process(i: int) -> Any:
        outcome = await pool.run(child_job(i), 30)
        assert outcome.ok, outcome
        assert outcome.result == i, outcome
        return outcome.result

    fresh = ProcessPool(size, max_jobs_per_child=1)
    await fresh.start()

    async def in_fresh_child(i: int) -> Any:
        outcome = await fresh.run(child_job(i), 30)
        assert outcome.ok, outcome
        assert outcome.result == i, outcome
        return outcome.result

    modes: list[tuple[str, Callable[[int], Awaitable[Any]], float]] = [
        ("thread", in_thread, 1.0),
        ("process", in_process, 1.0),
        ("process, fresh child per job", in_fresh_child, 0.5),
    ]
    try:
        for concurrency in sorted({1, size}):
            for name, run_one, share in modes:
                await measure(run_one, concurrency, 0.1, 200)  # warm-up
                done, took = await measure(
                    run_one, concurrency, args.seconds * share, args.max_jobs
                )
                rows.append((name, concurrency, done, took))
                results[(name, concurrency)] = done / took
        starts = fresh.stats.started
        start_ms: dict[str, float] = {}
        for method in ("forkserver", "spawn"):
            one = ProcessPool(1, start_method=method)
            t0 = time.perf_counter()
            await one.start()
            start_ms[method] = (time.perf_counter() - t0) * 1000
            assert one.stats.alive == 1
            await one.close()
    finally:
        await pool.close()
        await fresh.close()
        threads.shutdown()

    print(
        f"\nProcess isolation vs threads: trivial sync handler, pool size {size}, "
        f"{os.cpu_count()} CPUs, start method {pool.start_method}"
    )
    print(
        f"first pool start (forkserver + Conveyor import, {size} children): "
        f"{first_start * 1000:.0f} ms; children started by the fresh-child pool: {starts}"
    )
    print(
        f"one more child, started and said hello: forkserver {start_ms['forkserver']:.0f} ms, "
        f"spawn {start_ms['spawn']:.0f} ms (a fresh interpreter importing Conveyor)\n"
    )
    header = f"{'mode':<30} {'conc':>4} {'jobs':>7} {'jobs/s':>9} {'us/job':>8} {'vs thread':>10}"
    print(header)
    print("-" * len(header))
    for name, concurrency, done, took in rows:
        rate = done / took
        per_job = took / done * 1e6 * concurrency  # latency of one job at this concurrency
        ratio = results[("thread", concurrency)] / rate
        print(f"{name:<30} {concurrency:>4} {done:>7} {rate:>9.0f} {per_job:>8.0f} {ratio:>9.1f}x")
    for concurrency in sorted({1, size}):
        t = 1e6 / results[("thread", concurrency)]
        p = 1e6 / results[("process", concurrency)]
        f = 1e6 / results[("process, fresh child per job", concurrency)]
        ratio = results[("thread", concurrency)] / results[("process", concurrency)]
        print(
            f"\nconcurrency {concurrency}: extra time per job (1 / jobs/s) with process isolation "
            f"{p - t:.0f} us (warm child), {f - t:.0f} us (fresh child per job); "
            f"threads do {ratio:.1f}x the jobs/s of warm children"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="children / threads (default 2)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per step (default 1)")
    parser.add_argument("--max-jobs", type=int, default=200_000, help="cap on jobs per step")
    asyncio.run(main(parser.parse_args()))
