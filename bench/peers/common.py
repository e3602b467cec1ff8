"""What every peer's worker and producer share (standard library only).

The per-peer modules (``conveyor_peer.py``, ``pgqueuer_peer.py``, ...) run in
their own virtualenvs; they import this file from their own folder.

Completion is counted by the handlers themselves, never read from logs: every
job's handler appends ``"<id> <perf_counter>\\n"`` to a file of its process,
``$BENCH_OUT_DIR/stamps-<pid>.txt`` (one ``write`` on an ``O_APPEND`` file: no
torn lines between threads). ``perf_counter`` is ``CLOCK_MONOTONIC`` on Linux,
so stamps of different processes compare with each other and with the
producer's send times.

A producer is ``python <peer>_peer.py produce MODE ...`` (see ``producer_main``):
the peer module supplies an object with ``open``/``close``/``enqueue(i)`` and,
where the library has a bulk API, ``enqueue_many(ids)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

OUT_ENV = "BENCH_OUT_DIR"
BULK_BATCH = 1_000
WARMUP_BASE = 10_000_000  # ids of warm-up jobs (never counted)

_fd: int | None = None
_fd_pid: int | None = None


def stamp(i: int) -> None:
    """Record that job ``i``'s handler started now (called by every peer's handler)."""
    global _fd, _fd_pid
    t = time.perf_counter()
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:  # first job, or a forked child
        out = os.environ[OUT_ENV]
        _fd = os.open(f"{out}/stamps-{pid}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = pid
    os.write(_fd, b"%d %.9f\n" % (i, t))


def quiet_logging() -> None:
    """WARNING and above, on stderr: the same for every peer (PEERS.md)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


class StampReader:
    """Reads the stamp files of a folder incrementally (complete lines only)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self._rest: dict[Path, bytes] = {}
        self.stamps: dict[int, float] = {}  # first stamp of each id
        self.duplicates = 0
        self.total = 0

    def poll(self) -> int:
        """Read what was appended since the last call; returns the number of distinct ids."""
        for path in sorted(self.folder.glob("stamps-*.txt")):
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            self._offsets[path] = offset + len(data)
            data = self._rest.pop(path, b"") + data
            lines = data.split(b"\n")
            if lines[-1]:
                self._rest[path] = lines[-1]
            for line in lines[:-1]:
                i_raw, t_raw = line.split()
                i, t = int(i_raw), float(t_raw)
                self.total += 1
                if i in self.stamps:
                    self.duplicates += 1
                    self.stamps[i] = min(self.stamps[i], t)
                else:
                    self.stamps[i] = t
        return len(self.stamps)

    def count_in(self, ids: Iterable[int]) -> int:
        return sum(1 for i in ids if i in self.stamps)


class Producer(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, i: int) -> None: ...


async def _timed(deadline: float, ids: range, step: Callable[[range], Awaitable[None]]) -> int:
    done = 0
    for start in range(0, len(ids), BULK_BATCH):
        chunk = ids[start : start + BULK_BATCH]
        await step(chunk)
        done += len(chunk)
        if time.monotonic() > deadline:
            break
    return done


async def _produce(producer: Any, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.deadline
    ids = range(args.first, args.first + args.n)
    await producer.open()
    try:
        if args.mode == "single":

            async def one_by_one(chunk: range) -> None:
                for i in chunk:
                    await producer.enqueue(i)

            t0 = time.perf_counter()
            done = await _timed(deadline, ids, one_by_one)
            return {"elapsed": time.perf_counter() - t0, "sent": done}
        if args.mode == "bulk":
            many = getattr(producer, "enqueue_many", None)
            if many is None:
                return {"error": "no bulk API"}

            async def bulk(chunk: range) -> None:
                await many(list(chunk))

            t0 = time.perf_counter()
            done = await _timed(deadline, ids, bulk)
            return {"elapsed": time.perf_counter() - t0, "sent": done}
        if args.mode == "preload":  # fastest way in; not timed for the table
            many = getattr(producer, "enqueue_many", None)

            async def fast(chunk: range) -> None:
                if many is not None:
                    await many(list(chunk))
                else:  # no bulk API: 50 single enqueues in flight at a time
                    for s in range(0, len(chunk), 50):
                        await asyncio.gather(*(producer.enqueue(i) for i in chunk[s : s + 50]))

            t0 = time.perf_counter()
            done = await _timed(deadline, ids, fast)
            return {"elapsed": time.perf_counter() - t0, "sent": done}
        if args.mode == "latency":
            return await _latency(producer, args, ids, deadline)
        raise SystemExit(f"unknown mode {args.mode}")
    finally:
        await producer.close()


async def _latency(
    producer: Any, args: argparse.Namespace, ids: range, deadline: float
) -> dict[str, Any]:
    """Warm up (jobs the worker must run first), then ``n`` jobs ``gap`` s apart."""
    reader = StampReader(Path(os.environ[OUT_ENV]))
    warm = range(WARMUP_BASE, WARMUP_BASE + args.warmup)
    for i in warm:
        await producer.enqueue(i)
    while reader.poll() < len(warm):
        if time.monotonic() > deadline:
            return {"error": f"warm-up jobs not run ({len(reader.stamps)}/{len(warm)})"}
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # the worker is idle again
    sent: dict[int, float] = {}
    start = time.perf_counter()
    for k, i in enumerate(ids):
        delay = start + k * args.gap - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter()
        await producer.enqueue(i)
        sent[i] = t
        if time.monotonic() > deadline:
            break
    Path(args.out).write_text(json.dumps(sent))
    return {"elapsed": time.perf_counter() - start, "sent": len(sent)}


def producer_main(make: Callable[[], Any], argv: list[str]) -> None:
    """``produce MODE --n N [--first I] [--gap S] [--warmup W] [--out FILE] [--deadline S]``.

    Prints one JSON line: ``{"elapsed": seconds, "sent": jobs}`` or ``{"error": ...}``.
    """
    p = argparse.ArgumentParser(prog="produce")
    p.add_argument("mode", choices=["single", "bulk", "preload", "latency"])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--gap", type=float, default=0.005)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default="")
    p.add_argument("--deadline", type=float, default=120.0)
    args = p.parse_args(argv)
    quiet_logging()
    result = asyncio.run(_produce(make(), args))
    print(json.dumps(result), flush=True)


def main(
    make_producer: Callable[[], Any],
    queued: Callable[[], Awaitable[dict[str, Any]]],
    extra: dict[str, Callable[[list[str]], None]] | None = None,
) -> None:
    """Entry point of a peer module: ``produce ...``, ``queued`` or a command of ``extra``."""
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "produce":
        producer_main(make_producer, rest)
    elif command == "queued":
        quiet_logging()
        print(json.dumps(asyncio.run(queued())), flush=True)
    elif extra and command in extra:
        extra[command](rest)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} produce|queued|{'|'.join(extra or {})} ...")


def git_revision() -> str:
    """The commit measured, with ``+dirty src`` when src/ has uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "revision unknown"
    return f"commit {head or '?'}{' +dirty src' if dirty else ''}"
