"""The EventBus adapters (memory, Redis): throughput and latency.

Not a test: a script that prints a table. It starts its own redis-server
(``tests/redis_server.py``: loopback, AOF with ``appendfsync always``, so
stream appends are fsynced like in production) and measures, per adapter:

1. publish throughput: ``publish_many`` in batches of 100, N messages (50,000),
   ONE subscriber counting receipts; timed from the first publish until the
   subscriber has received all N (counted, not assumed);
2. publish->handler latency: 2,000 single ``publish`` calls paced at a fixed
   rate (1,000/s); each payload carries the send time (``perf_counter``), the
   handler records ``now - sent``; p50/p95/p99 in ms;
3. stream append throughput: ``append`` in batches of 100 and one at a time;
   the stream's entry count is checked at the end.

Every step has a deadline (``--deadline``) and reports what it saw if it runs out.

Usage::

    .venv/bin/python bench/bus_bench.py
    .venv/bin/python bench/bus_bench.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conveyor.bus.base import EventBus, Message
from conveyor.bus.memory import MemoryBus
from conveyor.bus.redis import RedisBus
from redis_server import RedisServer


@dataclass
class Result:
    name: str
    value: str


async def wait_until(predicate: Callable[[], bool], deadline: float) -> bool:
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def publish_throughput(bus: EventBus, n: int, batch: int, deadline_s: float) -> str:
    received = 0
    done = asyncio.Event()

    async def count(message: Message) -> None:
        nonlocal received
        received += 1
        if received >= n:
            done.set()

    topic = f"bench_{uuid.uuid4().hex[:6]}"
    sub = await bus.subscribe(topic, count)
    payload = {"job_id": "00000000-0000-0000-0000-000000000000", "state": "completed", "n": 0}
    started = time.perf_counter()
    for start in range(0, n, batch):
        await bus.publish_many(
            [Message(topic, {**payload, "n": i}) for i in range(start, min(start + batch, n))]
        )
    published = time.perf_counter()
    try:
        await asyncio.wait_for(done.wait(), deadline_s)
    except TimeoutError:
        await sub.close()
        return f"FAILED: {received}/{n} received in {deadline_s}s"
    elapsed = time.perf_counter() - started
    await sub.close()
    return (
        f"{n / elapsed:>10,.0f} msg/s  ({n:,} in {elapsed:.2f}s; "
        f"publish side {n / (published - started):,.0f} msg/s)"
    )


async def publish_latency(bus: EventBus, n: int, rate: float, deadline_s: float) -> str:
    latencies: list[float] = []

    async def record(message: Message) -> None:
        latencies.append(time.perf_counter() - message.payload["sent"])

    topic = f"lat_{uuid.uuid4().hex[:6]}"
    sub = await bus.subscribe(topic, record)
    interval = 1 / rate
    next_at = time.perf_counter()
    for i in range(n):
        next_at += interval
        await bus.publish(topic, {"i": i, "sent": time.perf_counter()})
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    ok = await wait_until(lambda: len(latencies) >= n, time.perf_counter() + deadline_s)
    await sub.close()
    if not ok:
        return f"FAILED: {len(latencies)}/{n} received"
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return f"p50 {q[49]:.3f} ms  p95 {q[94]:.3f} ms  p99 {q[98]:.3f} ms  max {ms[-1]:.3f} ms"


async def append_throughput(bus: EventBus, n: int, batch: int) -> str:
    stream = f"bench-{uuid.uuid4().hex[:6]}"
    payload = {"job_id": "00000000-0000-0000-0000-000000000000", "state": "completed"}
    started = time.perf_counter()
    for start in range(0, n, batch):
        size = min(batch, n - start)
        await bus.append(stream, [{**payload, "n": start + i} for i in range(size)], maxlen=n * 2)
    elapsed = time.perf_counter() - started
    kept = await bus.read(stream, "0", n + 1)
    check = "" if len(kept) == n else f"  (WARNING: {len(kept)} entries kept, expected {n})"
    return f"{n / elapsed:>10,.0f} entries/s  ({n:,} in {elapsed:.2f}s){check}"


async def run_adapter(name: str, bus: EventBus, args: argparse.Namespace) -> list[Result]:
    results = []
    async with bus:
        results.append(
            Result(
                f"publish_many x{args.batch} -> 1 subscriber",
                await publish_throughput(bus, args.messages, args.batch, args.deadline),
            )
        )
        results.append(
            Result(
                f"latency publish->handler @ {args.rate:,.0f}/s",
                await publish_latency(bus, args.latency, args.rate, args.deadline),
            )
        )
        results.append(
            Result(
                f"append x{args.batch}",
                await append_throughput(bus, args.entries, args.batch),
            )
        )
        results.append(Result("append x1", await append_throughput(bus, args.single_entries, 1)))
    return [Result(f"{name:<6} {r.name}", r.value) for r in results]


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with RedisServer() as server:
        rows = await run_adapter("memory", MemoryBus(), args)
        rows += await run_adapter("redis", RedisBus(server.url, prefix="bench"), args)
    width = max(len(r.name) for r in rows)
    print(f"\n{'workload':<{width}}  result")
    print(f"{'-' * width}  {'-' * 60}")
    for r in rows:
        print(f"{r.name:<{width}}  {r.value}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--latency", type=int, default=2_000, help="paced single publishes")
    p.add_argument("--rate", type=float, default=1_000, help="publishes per second when paced")
    p.add_argument("--entries", type=int, default=50_000, help="stream entries, batched")
    p.add_argument("--single-entries", type=int, default=5_000, help="stream entries, one by one")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds per step")
    p.add_argument("--quick", action="store_true", help="small N")
    args = p.parse_args()
    if args.quick:
        args.messages, args.latency, args.entries, args.single_entries = 5_000, 300, 5_000, 500
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
