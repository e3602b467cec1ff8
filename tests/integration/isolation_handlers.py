"""Handlers run in child processes by tests/integration/test_isolation.py.

Module-level functions only: a child finds them by module and name. ``tests/``
is on ``sys.path`` (pytest ``pythonpath``), which the children inherit.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import struct
import sys
import threading
import time
from typing import Any

from conveyor import Conveyor, JobContext, Permanent, Retry

app = Conveyor("memory://")


def echo(ctx: JobContext, **payload: Any) -> dict[str, Any]:
    return {
        "payload": payload,
        "pid": os.getpid(),
        "ctx": {
            "job_id": ctx.job_id,
            "job_type": ctx.job_type,
            "attempt": ctx.attempt,
            "max_retries": ctx.max_retries,
            "queue": ctx.queue,
            "worker_id": ctx.worker_id,
            "metadata": ctx.metadata,
            "is_cancelled": ctx.is_cancelled,
        },
    }


async def async_echo(ctx: JobContext, n: int) -> dict[str, Any]:
    await asyncio.sleep(0)  # wait-ok: yields once, to prove the handler runs on an event loop
    return {"n": n, "pid": os.getpid(), "loop": type(asyncio.get_running_loop()).__name__}


@app.job("decorated")
def decorated(ctx: JobContext, x: int) -> int:
    return x * 2


def pid(ctx: JobContext) -> int:
    return os.getpid()


def fail(ctx: JobContext, message: str) -> None:
    raise ValueError(message)


def permanent(ctx: JobContext) -> None:
    raise Permanent("card declined")


def retry(ctx: JobContext, delay: float) -> None:
    raise Retry("later", delay=delay)


class Flaky(Exception):
    pass


def flaky(ctx: JobContext) -> None:
    raise Flaky("listed as permanent by the policy")


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no description for you")


def bad_str(ctx: JobContext) -> None:
    raise BadStr()


def nasty_text(ctx: JobContext) -> None:
    raise FileNotFoundError(os.fsdecode(b"report-\xff.csv") + "\x00" + "x" * 100_000)


def exit3(ctx: JobContext) -> None:
    sys.exit(3)


def keyboard(ctx: JobContext) -> None:
    raise KeyboardInterrupt


def cancelled_error(ctx: JobContext) -> None:
    raise asyncio.CancelledError


def generator_exit(ctx: JobContext) -> None:
    raise GeneratorExit


def hard_exit(ctx: JobContext) -> None:
    os._exit(7)


def segfault(ctx: JobContext) -> None:
    ctypes.string_at(0)


def hog(ctx: JobContext, mb: int) -> int:
    block = bytearray(mb * 1024 * 1024)
    return len(block)


def touch(ctx: JobContext, mb: int) -> int:
    """Really use ``mb`` MiB (written pages), then free them."""
    block = bytearray(b"\x01") * (mb * 1024 * 1024)
    return len(block)


def not_json(ctx: JobContext) -> object:
    return {"when": object()}


def nan(ctx: JobContext) -> dict[str, Any]:
    return {"x": [1.0, float("nan")]}


def none_result(ctx: JobContext) -> dict[str, Any]:
    return {"x": None}


def hang(ctx: JobContext, marker: str) -> None:
    """Write its pid to ``marker``, then never return (ignores ctx.cancelled)."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(3600)  # wait-ok: the hang under test


def hang_ignoring_sigterm(ctx: JobContext, marker: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hang(ctx, marker)


def wait_cancelled(ctx: JobContext, marker: str, done: str) -> str:
    """Wait for ctx.cancelled (set by SIGTERM), record that it saw it, return."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    ctx.cancelled.wait()
    with open(done, "w") as f:
        f.write("cancelled")
    return "stopped"


async def async_hang(ctx: JobContext, marker: str, done: str) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        with open(done, "w") as f:
            f.write(f"cancelled {ctx.is_cancelled}")
        raise


def grandchild(ctx: JobContext, marker: str) -> None:
    """Start a grandchild that would outlive the job, then hang."""
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(3600)  # wait-ok: the hang under test
    with open(marker, "w") as f:
        f.write(f"{os.getpid()} {pid}")
    while True:
        time.sleep(3600)  # wait-ok: the hang under test


def barrier(ctx: JobContext, directory: str, n: int) -> int:
    """Rendezvous of ``n`` jobs: each writes a file, then waits for ``n`` files."""
    with open(os.path.join(directory, str(os.getpid())), "w") as f:
        f.write("here")
    deadline = time.monotonic() + 20
    while len(os.listdir(directory)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the other jobs never ran at the same time")
        time.sleep(0.005)  # wait-ok: a poll with a deadline across processes (no shared event)
    return os.getpid()


def _socket() -> Any:
    from conveyor.runtime import isolation

    assert isolation._CHILD is not None
    return isolation._CHILD.sock


def garbage(ctx: JobContext) -> None:
    _socket().sendall(b"\x00\x00\x00\x05hello")
    time.sleep(3600)  # wait-ok: the hang under test


def huge_header(ctx: JobContext) -> None:
    _socket().sendall(struct.pack(">I", 0xFFFFFFF0) + b"x")
    time.sleep(3600)  # wait-ok: the hang under test


def half_message(ctx: JobContext) -> None:
    _socket().sendall(struct.pack(">I", 100) + b'{"kind": "out')
    os._exit(0)


def thread_count(ctx: JobContext) -> int:
    return threading.active_count()


def leave_thread(ctx: JobContext, marker: str) -> int:
    """Return while a thread it started keeps running (and writing its pid)."""

    def forever() -> None:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(3600)  # wait-ok: the stray thread under test

    threading.Thread(target=forever, daemon=False).start()
    deadline = time.monotonic() + 20
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)  # wait-ok: a poll with a deadline for the thread's marker file
    return os.getpid()


def imported(ctx: JobContext, name: str) -> bool:
    return name in sys.modules


def scribble(ctx: JobContext) -> int:
    """Write junk to every inherited descriptor that is not a socket (its own
    channel): pipes a forkserver child might have kept (review finding)."""
    import stat

    hit = 0
    for fd in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            os.write(fd, b"xx")
            hit += 1
        except OSError:
            pass
    return hit


def nap(ctx: JobContext, seconds: float) -> str:
    time.sleep(seconds)  # wait-ok: the job's simulated work
    return "rested"


def retry_in_ages(ctx: JobContext) -> str:
    if ctx.attempt == 1:
        raise Retry("later", delay=10**400)  # a float can't hold it: clamped, not a crash
    return "second"


class SlowToSay(Exception):
    def __str__(self) -> str:
        time.sleep(30)  # wait-ok: a hostile __str__
        return "late"


def slow_to_say(ctx: JobContext) -> None:
    raise SlowToSay()


def produce(ctx: JobContext, n: int) -> dict[str, Any]:
    return {"rows": list(range(n)), "pid": os.getpid()}


def consume(ctx: JobContext) -> dict[str, Any]:
    """A workflow step reading its parents' results in a child process."""
    return {
        "total": sum(sum(r["rows"]) for r in ctx.parent_results.values()),
        "parents": sorted(ctx.parent_results),
        "pid": os.getpid(),
    }
