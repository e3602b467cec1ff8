"""Helpers shared by the integration and acceptance tests (no sleeping to wait)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # poll interval of a deadline-bounded wait
        delay = min(delay * 1.5, 0.2)


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(delay)  # poll interval of a deadline-bounded wait
        delay = min(delay * 1.5, 0.1)


def conveyor_env(db_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CONVEYOR_DATABASE_URL=db_url,
        PYTHONPATH=os.pathsep.join([str(TESTS / "integration"), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def conveyor_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor.cli.main", *args]


def run_cli(
    db_url: str, *args: str, check: bool = True, **extra: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        conveyor_cmd(*args),
        env=conveyor_env(db_url, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"conveyor {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


class WorkerProcess:
    """A ``conveyor worker`` subprocess whose stderr goes to a file we can read."""

    def __init__(self, db_url: str, log: Path, *apps: str, **env: str) -> None:
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            conveyor_cmd("worker", *apps),
            env=conveyor_env(db_url, **env),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()


# -- promise-test helpers: executions are counted from the handlers' own log ---------------
FAST_WORKER_ENV = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.2",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "1.0",
    "CONVEYOR_POLL_INTERVAL": "0.05",
    "CONVEYOR_LOG_LEVEL": "INFO",
}


def exec_lines(log: Path) -> list[list[str]]:
    """``[job_id, attempt, pid, event]`` per line that jobapp handlers appended."""
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def done_counts(log: Path) -> Counter[str]:
    return Counter(job_id for job_id, _attempt, _pid, ev in exec_lines(log) if ev == "done")


def start_worker(
    db_url: str, tmp_path: Path, log: Path, name: str, *args: str, **env: str
) -> WorkerProcess:
    """A ``conveyor worker jobapp [args]`` subprocess with fast heartbeats."""
    return WorkerProcess(
        db_url,
        tmp_path / f"{name}.out",
        "jobapp",
        *args,
        CONVEYOR_TEST_LOG=str(log),
        **{**FAST_WORKER_ENV, **env},
    )


async def sigkill_mid_job_and_restart(
    app: Any, db_url: str, tmp_path: Path, log: Path, *args: str
) -> tuple[Any, list[Any], int, int]:
    """Worker A (``conveyor worker jobapp [args]``) starts a long job and is killed
    with -9; worker B (same args: with ``--worker-id``, the same id) starts at once
    and finishes it. Returns (the job, its executions, A's pid, B's pid)."""
    job = await app.enqueue("hang_first", {"seconds": 60})
    a = start_worker(db_url, tmp_path, log, "a", *args)
    try:
        wait_until(lambda: any(ev == "start" for *_x, ev in exec_lines(log)), 20, "attempt 1")
        a.signal(signal.SIGKILL)
        a.wait()
        b = start_worker(db_url, tmp_path, log, "b", *args)
        try:

            async def terminal() -> Any:
                current = await app.store.get(job.id)
                return current if current.state.is_terminal else None

            # heartbeat_timeout (1 s) + a heartbeat/rescue interval + margin
            done = await async_wait_until(terminal, 1.0 + 0.2 + 8.0, "rescue and completion")
        finally:
            b.signal(signal.SIGTERM)
            assert b.wait() == 0, b.output()
    finally:
        a.stop()
    return done, await app.store.executions(job.id), a.pid, b.pid


def worker_pid(worker_id: str) -> int:
    """The pid in a default worker id (``<host>-<pid>-<random>``)."""
    return int(worker_id.rsplit("-", 2)[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedApi:
    """An ASGI app served by uvicorn on a free loopback port, in this event loop."""

    def __init__(self, api: Any) -> None:
        import uvicorn

        from conveyor.cli.serve import _Server

        self.port = free_port()
        config = uvicorn.Config(
            api, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_hub_subscribers(self) -> int:
        """Live subscribers of the app's event hub (the WebSocket clients it serves)."""
        return int(self.server.config.app.state.hub.subscribers)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ServedApi:
        self.task = asyncio.create_task(self.server.serve())

        async def started() -> bool:
            assert self.task is not None
            if self.task.done():
                self.task.result()  # raise its error
            return bool(self.server.started)

        await async_wait_until(started, 10, "uvicorn to start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


def running_worker(app: Any, concurrency: int = 20) -> Any:
    """``async with running_worker(app) as worker``: a worker task in this event loop,
    started (its ``started`` event set) and stopped gracefully on exit."""
    import contextlib

    @contextlib.asynccontextmanager
    async def run() -> Any:
        worker = app.worker(concurrency=concurrency)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.started.wait(), 10)
        try:
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 15)

    return run()
