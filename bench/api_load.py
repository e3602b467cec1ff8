"""Load test of the REST API: POST /api/jobs and GET /api/jobs/{id} at a fixed rate.

Not a test: a bounded load generator that prints latency percentiles. It starts
`conveyor up` itself (temp SQLite file, free loopback port), sends requests at
``--rate`` per second for ``--seconds`` (open loop: a request is sent on
schedule whether or not earlier ones returned), then stops the server.

    .venv/bin/python bench/api_load.py                 # 200 req/s, 20 s, each endpoint
    .venv/bin/python bench/api_load.py --rate 500 --seconds 10

Targets (issue 3): submit p95 <= 10 ms, status p95 <= 5 ms, zero errors.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from upserver import conveyor_up, pct


async def run_phase(
    client: httpx.AsyncClient, name: str, rate: float, seconds: float, make_request
) -> dict[str, object]:
    latencies: list[float] = []
    errors: list[str] = []
    total = int(rate * seconds)
    start = time.perf_counter()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            response = await make_request(client, i)
            ok = response.status_code in (200, 201)
            if not ok:
                errors.append(f"{response.status_code} {response.text[:100]}")
        except httpx.HTTPError as exc:
            errors.append(repr(exc))
            return
        latencies.append((time.perf_counter() - t0) * 1000)

    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # the schedule of an open-loop load, not a wait
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
    elapsed = time.perf_counter() - start
    return {
        "name": name,
        "requests": total,
        "achieved_rate": total / elapsed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50": pct(latencies, 50),
        "p95": pct(latencies, 95),
        "p99": pct(latencies, 99),
        "mean": statistics.fmean(latencies) if latencies else float("nan"),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'load.db'}"
        async with conveyor_up(db_url) as server:
            base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
                ids: list[str] = []

                async def submit(c: httpx.AsyncClient, i: int) -> httpx.Response:
                    r = await c.post(
                        "/api/jobs", json={"job_type": "test_job", "payload": {"i": i}}
                    )
                    if r.status_code == 201:
                        ids.append(r.json()["job_id"])
                    return r

                async def status(c: httpx.AsyncClient, i: int) -> httpx.Response:
                    return await c.get(f"/api/jobs/{ids[i % len(ids)]}")

                results = [
                    await run_phase(client, "POST /api/jobs", args.rate, args.seconds, submit)
                ]
                results.append(
                    await run_phase(client, "GET /api/jobs/{id}", args.rate, args.seconds, status)
                )
    print(
        f"conveyor up on SQLite (WAL, synchronous=FULL), {args.rate:.0f} req/s for "
        f"{args.seconds:.0f} s per endpoint, open loop, one client process, loopback"
    )
    print(
        f"{'endpoint':<22}{'requests':>9}{'rate/s':>9}{'errors':>8}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
    )
    for r in results:
        print(
            f"{r['name']:<22}{r['requests']:>9}{r['achieved_rate']:>9.0f}{r['errors']:>8}"
            f"{r['p50']:>9.2f}{r['p95']:>9.2f}{r['p99']:>9.2f}"
        )
        for e in r["first_errors"]:
            print("   error:", e)
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
