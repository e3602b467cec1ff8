"""What does a workflow step cost next to a plain job with ``depends_on``?

Not a test. For each backend (SQLite file, and PostgreSQL when available: it
starts its own server with tests/pg.py), side by side in one run:

1. throughput: 1,000 workflows of 10 steps (half a chain, half a fan-out/fan-in:
   1 -> 8 -> 1) against 10,000 plain jobs in the same shapes chained with
   ``depends_on``. Everything is submitted first, then one in-process worker
   (concurrency 50) runs it all: steps/s and this process's CPU ms per step
   (event loop + store threads; the PostgreSQL server's CPU is not in it).
2. latency with an idle worker: a parent's completion (its ``completed_at``) to
   its child's start (``started_at``), p50/p95 over 200 two-step workflows;
   against a plain job's enqueue -> start (``created_at`` -> ``started_at``).

    .venv/bin/python bench/workflow_bench.py            # ~1-2 min
    .venv/bin/python bench/workflow_bench.py --quick    # small N
    .venv/bin/python bench/workflow_bench.py --no-postgres
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conveyor import Conveyor, JobState, Settings  # noqa: E402
from conveyor.domain.workflow import WorkflowStatus  # noqa: E402
from conveyor.workflows import parse_definition  # noqa: E402

DEADLINE = 300.0


def make_app(url: str) -> Conveyor:
    app = Conveyor(
        settings=Settings(
            database_url=url,
            concurrency=50,
            poll_interval=0.05,
            log_level="WARNING",
            heartbeat_interval=1.0,
        )
    )

    @app.job("step")
    async def step(ctx: Any) -> dict[str, Any]:
        return {"n": len(ctx.parent_results)}

    return app


def chain() -> list[dict[str, Any]]:
    return [
        {"name": f"s{i}", "job_type": "step", "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(10)
    ]


def fan() -> list[dict[str, Any]]:
    mids = [f"m{i}" for i in range(8)]
    return [
        {"name": "root", "job_type": "step"},
        *({"name": m, "job_type": "step", "depends_on": ["root"]} for m in mids),
        {"name": "join", "job_type": "step", "depends_on": mids},
    ]


async def wait_done(app: Conveyor, total: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        counts = await app.store.count_by_state()
        if counts[JobState.COMPLETED] >= total:
            return
        if counts[JobState.FAILED] or counts[JobState.CANCELLED]:
            raise SystemExit(f"jobs failed: {counts}")
        if time.monotonic() > deadline:
            raise SystemExit(f"not done after {DEADLINE} s: {counts}")
        await asyncio.sleep(0.05)  # polling with a deadline


async def process(app: Conveyor, total: int) -> tuple[float, float]:
    """Run one worker until ``total`` jobs completed: (seconds, CPU seconds)."""
    worker = app.worker()
    t0, c0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(worker.run())
    try:
        await wait_done(app, total)
    finally:
        worker.request_stop()
        await task
    return time.perf_counter() - t0, time.process_time() - c0


async def workflows_run(url: str, n: int) -> dict[str, float]:
    app = make_app(url)
    async with app:
        t0 = time.perf_counter()
        for i in range(n):
            steps = chain() if i % 2 == 0 else fan()
            await app.workflows.submit(parse_definition({"name": "bench", "steps": steps}))
        submit = time.perf_counter() - t0
        secs, cpu = await process(app, n * 10)
        _page, total = await app.workflows.list(status="completed", limit=1)
        assert total == n, total
    return {"submit_s": submit, "run_s": secs, "cpu_s": cpu, "steps": n * 10}


async def plain_run(url: str, n: int) -> dict[str, float]:
    """The same shapes as plain jobs: submitted layer by layer (a child names its
    parents' ids), every group's layer in one ``submit_many``."""
    app = make_app(url)
    async with app:
        t0 = time.perf_counter()
        chains, fans = (n + 1) // 2, n // 2
        prev = [None] * chains
        for _ in range(10):
            jobs = [app.new_job("step", {}, depends_on=[p] if p else ()) for p in prev]
            prev = [r.job.id for r in await app.submit_many(jobs)]
        roots = [
            r.job.id for r in await app.submit_many([app.new_job("step") for _ in range(fans)])
        ]
        mids = [
            [
                r.job.id
                for r in await app.submit_many(
                    [app.new_job("step", depends_on=[root]) for _ in range(8)]
                )
            ]
            for root in roots
        ]
        await app.submit_many([app.new_job("step", depends_on=m) for m in mids])
        submit = time.perf_counter() - t0
        secs, cpu = await process(app, n * 10)
    return {"submit_s": submit, "run_s": secs, "cpu_s": cpu, "steps": n * 10}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def latency(url: str, samples: int) -> dict[str, float]:
    app = make_app(url)
    async with app:
        worker = app.worker()
        task = asyncio.create_task(worker.run())
        committed: dict[str, datetime] = {}
        app.on_finish(lambda f, ok: committed.__setitem__(f.job_id, datetime.now(UTC)))
        try:
            hand: list[float] = []
            after_commit: list[float] = []
            plain: list[float] = []
            for _ in range(samples):
                run = await app.submit_workflow(
                    {
                        "name": "lat",
                        "steps": [
                            {"name": "a", "job_type": "step"},
                            {"name": "b", "job_type": "step", "depends_on": ["a"]},
                        ],
                    }
                )
                wf = await app.workflows.wait(run.id, timeout=30, poll=0.005)
                assert wf.status is WorkflowStatus.COMPLETED
                a, b = wf.steps or []
                assert a.finished_at is not None
                assert b.started_at is not None
                hand.append((b.started_at - a.finished_at).total_seconds() * 1000)
                after_commit.append((b.started_at - committed[a.job_id]).total_seconds() * 1000)
                job = await app.enqueue("step")
                deadline = time.monotonic() + 30
                while (j := await app.store.get(job.id)).state is not JobState.COMPLETED:
                    if time.monotonic() > deadline:
                        raise SystemExit("plain job did not finish")
                    await asyncio.sleep(0.002)  # polling with a deadline
                assert j.created_at is not None
                assert j.started_at is not None
                plain.append((j.started_at - j.created_at).total_seconds() * 1000)
        finally:
            worker.request_stop()
            await task
    return {
        "handoff_p50": pct(hand, 0.5),
        "handoff_p95": pct(hand, 0.95),
        "commit_p50": pct(after_commit, 0.5),
        "commit_p95": pct(after_commit, 0.95),
        "plain_p50": pct(plain, 0.5),
        "plain_p95": pct(plain, 0.95),
    }


async def backend(name: str, url_for: Any, n: int, samples: int) -> list[str]:
    wf = await workflows_run(url_for("wf"), n)
    pl = await plain_run(url_for("plain"), n)
    lat = await latency(url_for("lat"), samples)
    rows = []
    for label, r in (("workflow steps", wf), ("plain jobs + depends_on", pl)):
        rate_s = r["steps"] / r["run_s"]
        cpu_ms = r["cpu_s"] * 1000 / r["steps"]
        rows.append(
            f"| {name} | {label} | {r['steps']:,} | {r['submit_s']:.2f} | {rate_s:,.0f} "
            f"| {cpu_ms:.3f} |"
        )
    ratio = (wf["cpu_s"] / wf["steps"]) / (pl["cpu_s"] / pl["steps"])
    rate = (pl["steps"] / pl["run_s"]) / (wf["steps"] / wf["run_s"])
    rows.append(
        f"| {name} | ratio workflow / plain | | | time x{rate:.2f} "
        f"| CPU x{ratio:.2f} (target <= 1.5) |"
    )
    lat_rows = [
        f"| {name} | {what} | {lat[key + '_p50']:.2f} | {lat[key + '_p95']:.2f} |"
        for what, key in (
            ("parent's finish starts -> child start (workflow)", "handoff"),
            ("parent's finish committed -> child start (workflow)", "commit"),
            ("enqueue -> start (plain job)", "plain"),
        )
    ]
    return [*rows, "LAT", *lat_rows]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    n, samples = (100, 40) if args.quick else (1000, 200)
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        out += await backend("SQLite", lambda k: f"sqlite:///{tmp}/{k}.db", n, samples)
        if not args.no_postgres:
            from pg import PostgresServer

            server = PostgresServer()
            server.start()
            try:

                def pg_url(k: str) -> str:
                    server.execute(f"CREATE DATABASE {k}")
                    return server.dsn(k)

                out += await backend("PostgreSQL", pg_url, n, samples)
            finally:
                server.stop()
    tput = [r for r in out if r != "LAT" and "->" not in r]
    lat = [r for r in out if "->" in r]
    print(
        f"\nThroughput ({n:,} workflows x 10 steps vs {n * 10:,} plain jobs; "
        "one worker, concurrency 50)\n"
    )
    print("| backend | what | steps | submit s | steps/s | client CPU ms/step |")
    print("|---|---|---:|---:|---:|---:|")
    print("\n".join(tput))
    print(f"\nLatency with an idle worker ({samples} samples), ms\n")
    print("| backend | what | p50 | p95 |")
    print("|---|---|---:|---:|")
    print("\n".join(lat))


if __name__ == "__main__":
    asyncio.run(main())
