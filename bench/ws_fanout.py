"""WebSocket fan-out: N clients receiving every lifecycle event of a steady job load.

Not a test: a bounded benchmark. It starts `conveyor up` itself (temp SQLite
file, free loopback port, its worker runs the jobs), connects ``--clients``
WebSocket clients to ``/api/events/ws`` (all event types), then submits
``--rate`` jobs per second for ``--seconds`` straight into the same SQLite
file from this process (10 ms batches). The clients are spread over ``--client-procs`` processes
(2) so that their own parsing does not queue the measurement. Each job makes three events
(submitted, started, completed). Delivery latency is the receive time minus
the event's own timestamp (the moment its transaction wrote it), same clock.

    .venv/bin/python bench/ws_fanout.py                     # 50 clients, 1,000 jobs/s, 10 s

Target (issue 5): 50 clients, 1,000 jobs/s, delivery p95 <= 50 ms, no client dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import websockets
from upserver import conveyor_up, pct

from conveyor.app import Conveyor
from conveyor.settings import Settings


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    def __init__(self, compression: str | None) -> None:
        self.compression = compression
        self.events = 0
        self.frames = 0
        self.latencies: list[float] = []
        self.by_type: dict[str, list[float]] = {}
        self.closed: str | None = None

    async def run(self, url: str, ready: asyncio.Event, stop: asyncio.Event, expected: int) -> None:
        async with websockets.connect(url, max_size=None, compression=self.compression) as ws:
            await ws.send("ping")
            await ws.recv()  # pong: the subscription is live
            ready.set()
            try:
                while not stop.is_set() and self.events < expected:
                    try:
                        message = await asyncio.wait_for(ws.recv(), 0.5)
                    except TimeoutError:
                        continue
                    now = time.time()
                    frame = orjson.loads(message)
                    if not isinstance(frame, list):
                        continue
                    self.frames += 1
                    self.events += len(frame)
                    for e in frame:
                        ts = datetime.fromisoformat(e["timestamp"]).timestamp()
                        ms = (now - ts) * 1000
                        self.latencies.append(ms)
                        self.by_type.setdefault(e["type"], []).append(ms)
            except websockets.ConnectionClosed as exc:
                self.closed = (
                    f"{exc.rcvd.code if exc.rcvd else '?'} {exc.rcvd.reason if exc.rcvd else ''}"
                )


def client_process(
    url: str, n: int, expected: int, compression: str | None, deadline: float, results: Any
) -> None:
    """A process with ``n`` WebSocket clients; reports when live, then its measurements."""

    async def run() -> None:
        stop = asyncio.Event()
        clients = [Client(compression) for _ in range(n)]
        readies = [asyncio.Event() for _ in clients]
        tasks = [
            asyncio.create_task(c.run(url, r, stop, expected))
            for c, r in zip(clients, readies, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
        results.put(("ready", n))
        cpu0 = cpu_seconds(os.getpid())
        await asyncio.wait(tasks, timeout=deadline)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        results.put(
            (
                "done",
                {
                    "latencies": [x for c in clients for x in c.latencies],
                    "by_type": {
                        k: [x for c in clients for x in c.by_type.get(k, [])]
                        for k in ("job_submitted", "job_started", "job_completed")
                    },
                    "events": [c.events for c in clients],
                    "frames": sum(c.frames for c in clients),
                    "closed": [c.closed for c in clients if c.closed],
                    "cpu": cpu_seconds(os.getpid()) - cpu0,
                },
            )
        )

    asyncio.run(run())


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=int, default=1000, help="jobs per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--client-procs", type=int, default=2, help="processes the clients are spread over"
    )
    parser.add_argument(
        "--deflate", action="store_true", help="negotiate permessage-deflate (off by default)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'ws.db'}"
        async with conveyor_up(db_url, "--concurrency", "100") as server:
            port = server.port  # type: ignore[attr-defined]
            compression = "deflate" if args.deflate else None
            url = f"ws://127.0.0.1:{port}/api/events/ws"
            total = int(args.rate * args.seconds)
            expected = 3 * total
            ctx = multiprocessing.get_context("spawn")
            results = ctx.Queue()
            shares = [
                len(range(i, args.clients, args.client_procs)) for i in range(args.client_procs)
            ]
            procs = [
                ctx.Process(
                    target=client_process,
                    args=(url, k, expected, compression, args.seconds + 60, results),
                )
                for k in shares
                if k
            ]
            for proc in procs:
                proc.start()
            for _ in procs:
                kind, _n = results.get(timeout=60)
                assert kind == "ready"

            app = Conveyor(settings=Settings(database_url=db_url))
            await app.open()
            server_cpu0, own_cpu0 = cpu_seconds(server.pid), cpu_seconds(os.getpid())
            per_tick = max(1, args.rate // 100)
            start = time.perf_counter()
            sent = 0
            while sent < total:
                n = min(per_tick, total - sent)
                await app.submit_many([app.new_job("test_job", {"i": sent + k}) for k in range(n)])
                sent += n
                delay = start + sent / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the schedule of an open-loop load
            submit_seconds = time.perf_counter() - start
            reports = [results.get(timeout=args.seconds + 90)[1] for _ in procs]
            drained = time.perf_counter() - start
            server_cpu = cpu_seconds(server.pid) - server_cpu0
            own_cpu = cpu_seconds(os.getpid()) - own_cpu0
            await app.close()
            for proc in procs:
                proc.join(10)
    latencies = [x for r in reports for x in r["latencies"]]
    complete = sum(1 for r in reports for n in r["events"] if n >= expected)
    dropped = [c for r in reports for c in r["closed"]]
    frames = sum(r["frames"] for r in reports)
    clients_cpu = sum(r["cpu"] for r in reports)
    print(
        f"conveyor up on SQLite, {args.clients} WebSocket clients (all event types), "
        f"{args.rate} jobs/s for {args.seconds:.0f} s ({submit_seconds:.1f} s to submit, "
        f"{drained:.1f} s until drained), 3 events per job"
    )
    print(f"events per client expected {expected}; clients with all of them: {complete}")
    print(f"dropped clients: {len(dropped)} {dropped[:3]}")
    print(
        f"deliveries {len(latencies)}  frames {frames}  "
        f"({len(latencies) / max(frames, 1):.1f} events per frame)"
    )
    print(
        f"delivery latency ms: p50 {pct(latencies, 50):.1f}  p95 {pct(latencies, 95):.1f}  "
        f"p99 {pct(latencies, 99):.1f}  max {max(latencies):.1f}"
    )
    print(
        f"CPU over the run: server {server_cpu / drained:.0%} of a core, load generator "
        f"{own_cpu / drained:.0%}, {len(procs)} client processes {clients_cpu / drained:.0%}"
    )
    for kind in ("job_submitted", "job_started", "job_completed"):
        values = [x for r in reports for x in r["by_type"][kind]]
        if values:
            print(f"  {kind:<15} p50 {pct(values, 50):.1f}  p95 {pct(values, 95):.1f}")
    return 0 if complete == args.clients else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
