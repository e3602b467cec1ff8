"""`conveyor up` as a subprocess for the benchmarks that load it (api_load, ws_fanout)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


@contextlib.asynccontextmanager
async def conveyor_up(db_url: str, *args: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Run `conveyor up --port PORT *args` on ``db_url`` until the block ends; the
    process's ``port`` attribute says where it listens."""
    port = free_port()
    env = dict(os.environ, CONVEYOR_DATABASE_URL=db_url, CONVEYOR_LOG_LEVEL="WARNING")
    server = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "up", "--port", str(port), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server.port = port  # type: ignore[attr-defined]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("conveyor up did not start within 20 s")
                await asyncio.sleep(0.05)  # polling a deadline-bounded start
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
