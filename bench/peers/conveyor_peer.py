"""Conveyor (PostgreSQL or SQLite) for bench/peers/run.py; runs in /work/main/.venv.

    python conveyor_peer.py worker --concurrency 200   # until SIGTERM/SIGINT
    python conveyor_peer.py produce single --n 1000
    python conveyor_peer.py queued

``$BENCH_DB_URL`` names the database. The worker is what ``conveyor worker``
does (``app.run_worker()`` on the CLI's event loop, uvloop when installed;
signals -> graceful stop), plus a stats file (peak RSS, CPU) at exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from common import OUT_ENV, main, quiet_logging, stamp

from conveyor.app import Conveyor
from conveyor.cli.loop import run as run_loop
from conveyor.settings import Settings


def make_app(concurrency: int = 10) -> Conveyor:
    app = Conveyor(
        settings=Settings(database_url=os.environ["BENCH_DB_URL"], concurrency=concurrency)
    )

    @app.job("noop", max_retries=0)
    async def noop(ctx: Any, i: int) -> None:
        stamp(i)

    return app


def quiet() -> None:
    quiet_logging()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


async def run_worker(concurrency: int) -> None:
    app = make_app(concurrency)
    await app.open()
    worker = app.worker(concurrency=concurrency)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        await worker.run()
    finally:
        await app.close()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stats = {
        "processed": worker.processed,
        "seconds": time.perf_counter() - t0,
        "maxrss_kb": ru1.ru_maxrss,
        "cpu_user": ru1.ru_utime - ru0.ru_utime,
        "cpu_sys": ru1.ru_stime - ru0.ru_stime,
    }
    Path(os.environ[OUT_ENV], f"stats-{os.getpid()}.json").write_text(json.dumps(stats))


def worker_command(argv: list[str]) -> None:
    concurrency = int(argv[argv.index("--concurrency") + 1]) if "--concurrency" in argv else 200
    quiet()
    run_loop(run_worker(concurrency))  # the loop `conveyor worker` runs on


class Producer:
    def __init__(self) -> None:
        quiet()
        self.app = make_app()

    async def open(self) -> None:
        await self.app.open()

    async def close(self) -> None:
        await self.app.close()

    async def enqueue(self, i: int) -> None:
        await self.app.enqueue("noop", {"i": i})

    async def enqueue_many(self, ids: list[int]) -> None:
        await self.app.enqueue_many("noop", [{"i": i} for i in ids])


async def queued() -> dict[str, Any]:
    quiet()
    app = make_app()
    await app.open()
    try:
        counts = {s.value: n for s, n in (await app.store.count_by_state()).items() if n}
    finally:
        await app.close()
    return {"queued": counts.get("pending", 0), "done": counts.get("completed", 0), **counts}


if __name__ == "__main__":
    main(Producer, queued, {"worker": worker_command})
