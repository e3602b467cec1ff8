"""Conveyor on SQLite: throughput and latency with the durable defaults.

Not a test: a script that prints figures. Every workload counts completions in
the database (all N jobs in state ``completed`` / ``pending``), never in logs,
and every step has a deadline after which it stops by itself and reports what
it saw. Databases live in fresh temporary directories (same disk as /tmp).

Workloads (SQLite defaults of ``SQLiteStore``: WAL, ``synchronous=FULL``):

1. enqueue single: ``await app.enqueue`` one at a time;
2. enqueue bulk: ``app.submit_many`` in batches of 1,000 (``new_job`` included);
3. processing: pre-load N no-op jobs, start ONE worker process, time from
   ``worker.run()`` until the last job is committed as completed;
4. enqueue->start latency with an idle worker, in-process (same event loop)
   and cross-process (the worker learns of new jobs from the database only).

The machine has 2 cores: before each step the script waits for it to be quiet,
and measures a step again when other processes took CPU while it ran.

Usage::

    .venv/bin/python bench/sqlite_bench.py            # full size, median of 3
    .venv/bin/python bench/sqlite_bench.py --quick    # small N, 1 repetition
    .venv/bin/python bench/sqlite_bench.py --markdown /tmp/sqlite-bench.md
    .venv/bin/python bench/sqlite_bench.py --only processing --n-process 100000 \\
        --child-wrapper "py-spy record -r 250 --threads --idle -f raw -o /tmp/{run}.txt --"

The worker child is this same script run with ``--worker-child``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import shlex
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from conveyor.app import Conveyor
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from conveyor.storage.sqlite import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from common import git_revision

# pgqueuer 1.6.0 on PostgreSQL 15, same machine (/work/shared/PEERS.md).
PGQ = {
    "single": 2_265.0,
    "bulk": 61_779.0,
    "process": 5_818.0,
    "p50": 2.2,
    "p95": 2.8,
    "p99": 3.3,
}
TARGET_PROCESS = 10_000.0
TARGET_BULK = 50_000.0
TARGET_P95_MS = 2.0

FULL = {
    "single": 2_000,
    "bulk": 20_000,
    "process": 20_000,
    "latency": 500,
    "repeat": 3,
}
QUICK = {
    "single": 300,
    "bulk": 5_000,
    "process": 3_000,
    "latency": 100,
    "repeat": 1,
}
BULK_BATCH = 1_000
LATENCY_GAP = 0.005  # seconds between two enqueues in the latency workloads
LATENCY_WARMUP = 10  # jobs enqueued (and awaited) before the measured ones, not counted


def quiet_logs() -> None:
    """WARNING and above only, on stderr (as PEERS.md did for every peer)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def make_app(db: Path, *, concurrency: int = 10, poll_interval: float = 1.0) -> Any:
    app = Conveyor(
        settings=Settings(
            database_url=f"sqlite:///{db}",
            concurrency=concurrency,
            poll_interval=poll_interval,
        )
    )
    return app


def register_jobs(app: Any, stamps: dict[int, float] | None = None) -> None:
    """``noop``: returns None. ``stamp``: records perf_counter() at its start.

    With ``stamps`` the start time goes into that dict (in-process runs); without,
    the handler returns it so it is stored as the job's result (cross-process).
    ``perf_counter`` is CLOCK_MONOTONIC on Linux: comparable across processes.
    """

    @app.job("noop", max_retries=0)
    async def noop(ctx: Any) -> None:
        return None

    if stamps is None:

        @app.job("stamp", max_retries=0)
        async def stamp(ctx: Any, i: int) -> float:
            return time.perf_counter()

    else:

        @app.job("stamp", max_retries=0)
        async def stamp_local(ctx: Any, i: int) -> None:
            stamps[i] = time.perf_counter()


async def counts(app: Any) -> dict[str, int]:
    by_state = await app.store.count_by_state()
    return {s.value: n for s, n in by_state.items() if n}


async def wait_for_state(
    app: Any, state: JobState, n: int, deadline: float, interval: float = 0.1
) -> tuple[bool, dict[str, int]]:
    """Poll ``count_by_state`` until ``n`` jobs are in ``state`` or the deadline passes."""
    while True:
        c = await counts(app)
        if c.get(state.value, 0) >= n:
            return True, c
        if time.monotonic() > deadline:
            return False, c
        await asyncio.sleep(interval)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[max(0, min(len(sorted_values) - 1, rank - 1))]


def _proc_stat() -> tuple[int, int]:
    """(all, busy) jiffies of the whole machine since boot, from /proc/stat (Linux)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])
    return total, total - values[3] - values[4]  # minus idle and iowait


def _own_cpu() -> float:
    """CPU seconds of this process and its waited-for children (the worker processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of the machine's CPU time that was not idle over ``seconds``."""
    try:
        total0, busy0 = _proc_stat()
        time.sleep(seconds)
        total1, busy1 = _proc_stat()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


class LoadWatch:
    """Waits for a quiet machine before each step; after it, tells how much CPU other
    processes took meanwhile (another test run on a 2-core machine halves the figures)."""

    def __init__(self, wait: float, limit: float = 0.25) -> None:
        self.wait = wait
        self.limit = limit
        self.noisy: list[str] = []
        self._start: tuple[int, int, float] | None = None

    def before(self, label: str) -> None:
        deadline = time.monotonic() + self.wait
        busy = cpu_busy()
        while busy is not None and busy > self.limit and time.monotonic() < deadline:
            busy = cpu_busy(2.0)
        if busy is not None and busy > self.limit:
            print(f"  WARNING: machine {busy:.0%} busy before {label}", flush=True)
        with contextlib.suppress(OSError, ValueError, IndexError):
            self._start = (*_proc_stat(), _own_cpu())

    def after(self) -> float:
        """Share of the machine's CPU that other processes used since ``before``."""
        if self._start is None:
            return 0.0
        total0, busy0, own0 = self._start
        self._start = None
        try:
            total1, busy1 = _proc_stat()
        except (OSError, ValueError, IndexError):
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        machine = (total1 - total0) / tick  # CPU-seconds available (all cores)
        others = (busy1 - busy0) / tick - (_own_cpu() - own0)
        return max(0.0, others / machine) if machine > 0 else 0.0

    def noisy_step(self, label: str, share: float, final: bool) -> bool:
        """True when other processes took enough CPU to spoil the step."""
        if share <= self.limit / 2:
            return False
        if final:
            print(
                f"  WARNING: other processes used {share:.0%} of the machine during {label}: "
                "its figures are lower than on a quiet machine",
                flush=True,
            )
            self.noisy.append(f"{label} ({share:.0%})")
        else:
            print(f"  ({label}: other processes used {share:.0%} of the machine; again)")
        return True


# -- worker child ---------------------------------------------------------------------
def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process by native id, from /proc (Linux only)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            f = stat.rsplit(")", 1)[1].split()
            name = names.get(int(tid), f"tid-{tid}")
            name = name.split("_")[0] if name.startswith("conveyor-") else name
            out[int(tid)] = (name, (int(f[11]) + int(f[12])) / tick)  # utime + stime
    return out


def thread_cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per thread name (pools summed) between two ``thread_cpu`` snapshots."""
    out: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        spent = cpu - before.get(tid, (name, 0.0))[1]
        out[name] = out.get(name, 0.0) + spent
    return out


def vm_hwm_kb() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


async def worker_child(args: argparse.Namespace) -> None:
    """Run one worker: print ``ready``, wait for ``go`` on stdin, run until ``stop``/EOF."""
    quiet_logs()
    app = make_app(Path(args.db), concurrency=args.concurrency, poll_interval=args.poll)
    register_jobs(app)
    await app.open()
    worker = app.worker(concurrency=args.concurrency)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
    loop.add_signal_handler(signal.SIGINT, worker.request_stop)
    print("ready", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        await app.close()
        return

    def watch_stdin() -> None:  # "stop" or EOF (parent gone) ends the run
        sys.stdin.readline()
        loop.call_soon_threadsafe(worker.request_stop)

    threading.Thread(target=watch_stdin, daemon=True).start()
    loop.call_later(args.max_seconds, worker.request_stop)  # never outlive the step
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = thread_cpu()
    t_run = time.time()
    await worker.run()
    t_end = time.time()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu1 = thread_cpu()
    stats = {
        "t_run": t_run,
        "t_end": t_end,
        "processed": worker.processed,
        "maxrss_kb": ru1.ru_maxrss,
        "vmhwm_kb": vm_hwm_kb(),
        "cpu_user": ru1.ru_utime - ru0.ru_utime,
        "cpu_sys": ru1.ru_stime - ru0.ru_stime,
        "threads": thread_cpu_delta(cpu0, cpu1),
        "vol_ctx": ru1.ru_nvcsw - ru0.ru_nvcsw,
        "invol_ctx": ru1.ru_nivcsw - ru0.ru_nivcsw,
    }
    await app.close()
    Path(args.stats).write_text(json.dumps(stats))


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    stats_path: Path
    stderr_path: Path


async def start_child(
    db: Path,
    tmp: Path,
    *,
    concurrency: int,
    poll: float,
    max_seconds: float,
    wrapper: str,
    run: str,
) -> Child:
    stats = tmp / "worker-stats.json"
    stderr_path = tmp / "worker-stderr.txt"
    cmd = [
        *shlex.split(wrapper.replace("{run}", run)),
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker-child",
        "--db",
        str(db),
        "--concurrency",
        str(concurrency),
        "--poll",
        str(poll),
        "--max-seconds",
        str(max_seconds),
        "--stats",
        str(stats),
    ]
    with stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err
        )
    child = Child(proc, stats, stderr_path)
    assert proc.stdout is not None
    try:
        while True:  # wrappers (py-spy) may print lines of their own first
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError("worker child exited before it was ready")
            if line.strip() == b"ready":
                break
    except BaseException:
        await stop_child(child, kill=True)
        raise
    return child


def go(child: Child) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(b"go\n")


async def stop_child(child: Child, *, kill: bool = False) -> dict[str, Any] | None:
    proc = child.proc
    if proc.returncode is None:
        if kill:
            proc.kill()
        else:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                assert proc.stdin is not None
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.returncode != 0 and not kill:
        err = child.stderr_path.read_text(errors="replace")[-2000:]
        print(f"  worker child exited with {proc.returncode}: {err}", file=sys.stderr)
    if os.environ.get("BENCH_SHOW_CHILD_STDERR"):
        print(child.stderr_path.read_text(errors="replace")[-3000:], file=sys.stderr)
    if child.stats_path.exists():
        return json.loads(child.stats_path.read_text())
    return None


# -- workloads ----------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    value: float | None  # the figure (jobs/s or ms); None = the step failed
    runs: list[float] = field(default_factory=list)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(name: str, runs: list[float | None], note: str = "", **extra: Any) -> Result:
    ok = [r for r in runs if r is not None]
    if len(ok) < len(runs):
        note = (note + "; " if note else "") + f"{len(runs) - len(ok)} run(s) failed"
    return Result(name, statistics.median(ok) if ok else None, ok, note, extra)


async def enqueue_single(n: int, tmp: Path, deadline_s: float) -> float | None:
    app = make_app(tmp / "single.db")
    register_jobs(app)
    await app.open()
    try:
        deadline = time.monotonic() + deadline_s
        t0 = time.perf_counter()
        done = 0
        for _ in range(n):
            await app.enqueue("noop", {})
            done += 1
            if time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - t0
        c = await counts(app)
        if done < n or c.get("pending", 0) != n:
            print(f"  enqueue single: only {c.get('pending', 0)}/{n} pending ({done} sent)")
            return None
        return n / elapsed
    finally:
        await app.close()


async def enqueue_bulk(n: int, tmp: Path, deadline_s: float) -> tuple[float | None, float]:
    """jobs/s including ``new_job``, and the share of the time spent in ``submit_many``."""
    app = make_app(tmp / "bulk.db")
    register_jobs(app)
    await app.open()
    try:
        deadline = time.monotonic() + deadline_s
        in_submit = 0.0
        t0 = time.perf_counter()
        for start in range(0, n, BULK_BATCH):
            batch = [app.new_job("noop", {}) for _ in range(min(BULK_BATCH, n - start))]
            t1 = time.perf_counter()
            await app.submit_many(batch)
            in_submit += time.perf_counter() - t1
            if time.monotonic() > deadline:
                break
        elapsed = time.perf_counter() - t0
        c = await counts(app)
        if c.get("pending", 0) != n:
            print(f"  enqueue bulk: only {c.get('pending', 0)}/{n} pending")
            return None, 0.0
        return n / elapsed, in_submit / elapsed
    finally:
        await app.close()


async def preload(app: Any, n: int) -> None:
    for start in range(0, n, BULK_BATCH):
        await app.submit_many([app.new_job("noop", {}) for _ in range(min(BULK_BATCH, n - start))])


async def processing(
    n: int, concurrency: int, tmp: Path, deadline_s: float, wrapper: str
) -> tuple[float | None, dict[str, Any]]:
    db = tmp / f"process-{concurrency}.db"
    app = make_app(db)
    register_jobs(app)
    await app.open()
    info: dict[str, Any] = {}
    try:
        await preload(app, n)
        c = await counts(app)
        if c.get("pending", 0) != n:
            print(f"  processing: preload left {c} (wanted {n} pending)")
            return None, info
        child = await start_child(
            db,
            tmp,
            concurrency=concurrency,
            poll=1.0,
            max_seconds=deadline_s + 5,
            wrapper=wrapper,
            run=f"process-c{concurrency}-{os.getpid()}-{time.monotonic_ns()}",
        )
        t_go = time.perf_counter()
        go(child)
        ok, c = await wait_for_state(app, JobState.COMPLETED, n, time.monotonic() + deadline_s)
        polled = time.perf_counter() - t_go
        stats = await stop_child(child)
        if not ok:
            print(f"  processing c={concurrency}: deadline after {deadline_s}s, counts {c}")
            return None, info
        with contextlib.closing(sqlite3.connect(db)) as raw:
            last_done, first_start = raw.execute(
                "SELECT max(completed_at), min(started_at) FROM jobs WHERE job_type = 'noop'"
            ).fetchone()
        if stats is None:
            print("  processing: no stats from the worker child")
            return None, info
        # completed_at is stamped just before the batch's COMMIT (one fsync later).
        elapsed = last_done - stats["t_run"]
        info = {
            "elapsed": elapsed,
            "polled_elapsed": polled,
            "first_fetch_after": first_start - stats["t_run"],
            "maxrss_kb": stats["maxrss_kb"],
            "vmhwm_kb": stats["vmhwm_kb"],
            "cpu_ms_per_job": (stats["cpu_user"] + stats["cpu_sys"]) * 1000 / n,
            "cpu_user": stats["cpu_user"],
            "cpu_sys": stats["cpu_sys"],
            "threads": stats["threads"],
            "vol_ctx": stats["vol_ctx"],
            "processed": stats["processed"],
            "counts": c,
        }
        return n / elapsed, info
    finally:
        await app.close()


async def latency_in_process(n: int, tmp: Path, deadline_s: float) -> list[float] | None:
    stamps: dict[int, float] = {}
    app = make_app(tmp / "lat-inproc.db")
    register_jobs(app, stamps)
    await app.open()
    worker = app.worker()
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 10)
        sent = await paced_enqueue(app, n)
        ok, c = await wait_for_state(
            app, JobState.COMPLETED, n + LATENCY_WARMUP, time.monotonic() + deadline_s, 0.02
        )
        if not ok:
            print(f"  latency in-process: deadline, counts {c}")
            return None
        return sorted((stamps[i] - sent[i]) * 1000 for i in range(n))
    finally:
        worker.request_stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, 60)
        await app.close()


async def paced_enqueue(app: Any, n: int) -> dict[int, float]:
    """Warm up, then enqueue ``stamp`` jobs one at a time, LATENCY_GAP apart."""
    for i in range(LATENCY_WARMUP):
        await app.enqueue("stamp", {"i": -1 - i})
    await asyncio.sleep(0.5)  # the worker is idle again
    sent: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * LATENCY_GAP - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter()
        await app.enqueue("stamp", {"i": i})
        sent[i] = t
    return sent


async def latency_cross_process(
    n: int, poll: float, tmp: Path, deadline_s: float, wrapper: str
) -> tuple[list[float] | None, dict[str, Any] | None]:
    db = tmp / f"lat-xproc-{poll}.db"
    app = make_app(db)
    register_jobs(app)
    await app.open()
    try:
        child = await start_child(
            db,
            tmp,
            concurrency=10,
            poll=poll,
            max_seconds=deadline_s + 10,
            wrapper=wrapper,
            run=f"latency-poll{poll}-{os.getpid()}-{time.monotonic_ns()}",
        )
        go(child)
        await asyncio.sleep(0.3)
        sent = await paced_enqueue(app, n)
        ok, c = await wait_for_state(
            app, JobState.COMPLETED, n + LATENCY_WARMUP, time.monotonic() + deadline_s, 0.05
        )
        stats = await stop_child(child)
        if not ok:
            print(f"  latency cross-process poll={poll}: deadline, counts {c}")
            return None, stats
        with contextlib.closing(sqlite3.connect(db)) as raw:
            started = {
                json.loads(p)["i"]: json.loads(r)
                for p, r in raw.execute(
                    "SELECT payload, result FROM jobs WHERE job_type = 'stamp' AND state = ?",
                    (JobState.COMPLETED.value,),
                )
            }
        return sorted((started[i] - sent[i]) * 1000 for i in range(n)), stats
    finally:
        await app.close()


# -- report -----------------------------------------------------------------------------------
def fmt_rate(v: float | None) -> str:
    return "FAILED" if v is None else f"{v:,.0f}"


def fmt_ms(v: float | None) -> str:
    return "FAILED" if v is None else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


def ratio(v: float | None, ref: float | None) -> str:
    if v is None or ref is None:
        return "—"
    return f"{v / ref:.2f}x"


def build_rows(r: dict[str, Any]) -> list[list[str]]:
    """metric | Conveyor | target | meets | pgqueuer | Conveyor/pgqueuer."""
    rows: list[list[str]] = []

    def add(
        metric: str,
        value: float | None,
        target: float | None,
        higher_better: bool,
        pgq: float | None,
        unit: str,
        runs: Sequence[float] = (),
    ) -> None:
        fmt = fmt_rate if unit == "jobs/s" else fmt_ms
        if target is None:
            meets = "—"
        elif value is None:
            meets = "NO"
        else:
            meets = "yes" if (value >= target if higher_better else value <= target) else "NO"
        tgt = "—" if target is None else ("≥ " if higher_better else "≤ ") + fmt(target)
        spread = "—" if len(runs) < 2 else f"{fmt(min(runs))}-{fmt(max(runs))}"
        rows.append(
            [
                f"{metric} ({unit})",
                fmt(value),
                spread,
                tgt,
                meets,
                "—" if pgq is None else fmt(pgq),
                ratio(value, pgq),
            ]
        )

    if "single" in r:
        add(
            "enqueue single",
            r["single"].value,
            None,
            True,
            PGQ["single"],
            "jobs/s",
            r["single"].runs,
        )
    if "bulk" in r:
        add(
            "enqueue bulk, batches of 1,000",
            r["bulk"].value,
            TARGET_BULK,
            True,
            PGQ["bulk"],
            "jobs/s",
            r["bulk"].runs,
        )
    for key in sorted(k for k in r if k.startswith("process-")):
        c = key.split("-")[1]
        add(
            f"processing, 1 worker proc, concurrency {c}",
            r[key].value,
            TARGET_PROCESS,
            True,
            PGQ["process"],
            "jobs/s",
            r[key].runs,
        )
    for key, label in (
        ("lat-inproc", "latency in-process"),
        ("lat-xproc-0.01", "latency cross-process, poll_interval 0.01 s"),
        ("lat-xproc-1.0", "latency cross-process, poll_interval 1 s (default)"),
    ):
        if key not in r:
            continue
        lat = r[key]
        for q in ("p50", "p95", "p99"):
            add(
                f"{label} {q}",
                lat.extra.get(q),
                TARGET_P95_MS if q == "p95" else None,
                False,
                PGQ[q],
                "ms",
            )
    rss = [v.extra.get("maxrss_kb") for k, v in r.items() if k.startswith("process-") and v.extra]
    rss = [x for x in rss if x]
    if rss:
        rows.append(["worker peak RSS (MiB), max over runs", f"{max(rss) / 1024:.1f}"] + ["—"] * 5)
    return rows


HEADER = [
    "metric",
    "Conveyor",
    "runs (min-max)",
    "target",
    "meets",
    "pgqueuer 1.6.0",
    "Conveyor / pgqueuer",
]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = []
    for j, row in enumerate([HEADER, *rows]):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]], details: list[str], meta: str) -> str:
    out = [meta, "", "| " + " | ".join(HEADER) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|")
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", *[f"- {d}" for d in details], ""]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------
async def run_all(args: argparse.Namespace) -> int:
    quiet_logs()
    size = dict(QUICK if args.quick else FULL)
    if args.repeat:
        size["repeat"] = args.repeat
    for key in ("single", "bulk", "process", "latency"):
        if getattr(args, f"n_{key}"):
            size[key] = getattr(args, f"n_{key}")
    reps = size["repeat"]
    only = set(args.only or ["single", "bulk", "processing", "latency"])
    concurrencies = args.concurrency or [100, 500]
    results: dict[str, Any] = {}
    details: list[str] = []

    watch = LoadWatch(args.wait_idle)

    async def in_tmp(label: str, fn: Callable[[Path], Any]) -> Any:
        """Run one measurement in a fresh temp dir; again when others disturbed it."""
        for attempt in range(args.retry_noisy + 1):
            watch.before(label)
            with tempfile.TemporaryDirectory(prefix="conveyor-bench-", dir=args.dir) as d:
                result = await fn(Path(d))
            final = attempt == args.retry_noisy
            if not watch.noisy_step(label, watch.after(), final):
                break
        return result

    print(
        f"Conveyor SQLite bench ({git_revision()}): sqlite {sqlite3.sqlite_version}, Python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, repeats={reps}, "
        f"N single={size['single']} bulk={size['bulk']} process={size['process']} "
        f"latency={size['latency']}",
        flush=True,
    )

    if "single" in only:
        runs = []
        for i in range(reps):
            v = await in_tmp("enqueue single", lambda t: enqueue_single(size["single"], t, 120))
            print(f"  enqueue single  run {i + 1}: {fmt_rate(v)} jobs/s", flush=True)
            runs.append(v)
        results["single"] = summarise("single", runs)
    if "bulk" in only:
        runs, shares = [], []
        for i in range(reps):
            v, share = await in_tmp("enqueue bulk", lambda t: enqueue_bulk(size["bulk"], t, 120))
            print(
                f"  enqueue bulk    run {i + 1}: {fmt_rate(v)} jobs/s "
                f"({share:.0%} of the time in submit_many, rest new_job)",
                flush=True,
            )
            runs.append(v)
            shares.append(share)
        results["bulk"] = summarise("bulk", runs)
        details.append(
            f"bulk: new_job() construction is included; submit_many itself took "
            f"{statistics.median(shares):.0%} of the time"
        )
    if "processing" in only:
        for conc in concurrencies:
            runs, infos = [], []
            for i in range(reps):
                v, info = await in_tmp(
                    f"processing c={conc}",
                    lambda t, c=conc: processing(
                        size["process"], c, t, args.deadline, args.child_wrapper
                    ),
                )
                runs.append(v)
                if info:
                    infos.append(info)
                    th = ", ".join(f"{k} {s:.2f}s" for k, s in sorted(info["threads"].items()))
                    print(
                        f"  processing c={conc} run {i + 1}: {fmt_rate(v)} jobs/s "
                        f"({info['elapsed']:.2f}s; parent poll saw {info['polled_elapsed']:.2f}s; "
                        f"CPU {info['cpu_ms_per_job']:.3f} ms/job "
                        f"[user {info['cpu_user']:.2f}s sys {info['cpu_sys']:.2f}s; {th}]; "
                        f"peak RSS {info['maxrss_kb'] / 1024:.1f} MiB)",
                        flush=True,
                    )
                else:
                    print(f"  processing c={conc} run {i + 1}: FAILED", flush=True)
            key = f"process-{conc}"
            best = max(infos, key=lambda x: x["maxrss_kb"]) if infos else {}
            results[key] = summarise(key, runs, **best)
            if infos:
                cpu = statistics.median(x["cpu_ms_per_job"] for x in infos)
                details.append(
                    f"processing c={conc}: worker CPU {cpu:.3f} ms/job (median); time from "
                    "worker.run() to the last completed_at (stamped just before its COMMIT); "
                    "the parent polls count_by_state every 0.1 s"
                )
    if "latency" in only:
        n = size["latency"]
        lat_runs: list[tuple[str, list[float] | None]] = []
        v = await in_tmp("latency in-process", lambda t: latency_in_process(n, t, args.deadline))
        lat_runs.append(("lat-inproc", v))
        for poll in (0.01, 1.0):
            v, _ = await in_tmp(
                f"latency cross-process poll_interval={poll}",
                lambda t, p=poll: latency_cross_process(n, p, t, args.deadline, args.child_wrapper),
            )
            lat_runs.append((f"lat-xproc-{poll}", v))
        for key, lat in lat_runs:
            if lat is None:
                results[key] = Result(key, None, note="failed")
                print(f"  {key}: FAILED", flush=True)
                continue
            q = {p: percentile(lat, int(p[1:])) for p in ("p50", "p95", "p99")}
            q["max"] = lat[-1]
            results[key] = Result(key, q["p95"], extra=q)
            print(
                f"  {key}: p50 {q['p50']:.2f} ms, p95 {q['p95']:.2f} ms, "
                f"p99 {q['p99']:.2f} ms, max {q['max']:.2f} ms (n={len(lat)})",
                flush=True,
            )
        details.append(
            f"latency: {n} jobs enqueued one at a time {LATENCY_GAP * 1000:.0f} ms apart after "
            f"{LATENCY_WARMUP} warm-up jobs, worker concurrency 10; latency = handler start - "
            "perf_counter() just before `await app.enqueue` (includes the enqueue commit)"
        )
        check = getattr(SQLiteStore, "change_check_interval", None)
        details.append(
            "cross-process wake-up: "
            + (
                f"an idle worker checks PRAGMA data_version every {check * 1000:g} ms "
                "(SQLiteStore.change_check_interval), poll_interval is only the fallback"
                if check
                else "none in this version: an idle worker notices jobs by its poll_interval"
            )
        )
    details.append(
        "Conveyor / pgqueuer: above 1 is better for jobs/s, below 1 is better for latency"
    )
    details.append(
        "durability: every figure is with WAL + synchronous=FULL (each commit fsynced); "
        "pgqueuer figures are PostgreSQL 15 fsync=on, 10,000 jobs, median of 3 (PEERS.md)"
    )

    if watch.noisy:
        details.append("WARNING: other processes used CPU during: " + ", ".join(watch.noisy))
    rows = build_rows(results)
    print()
    print(render_text(rows))
    for d in details:
        print(f"  * {d}")
    if args.markdown:
        meta = (
            f"Conveyor SQLite benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {git_revision()}: "
            f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} CPUs; {'quick' if args.quick else 'full'} size, "
            f"median of {reps} run(s)."
        )
        Path(args.markdown).write_text(render_markdown(rows, details, meta))
        print(f"\nmarkdown table written to {args.markdown}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N, one repetition")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as markdown")
    p.add_argument("--repeat", type=int, help="repetitions per throughput figure (median)")
    p.add_argument(
        "--only",
        action="append",
        choices=["single", "bulk", "processing", "latency"],
        help="run only these workloads (repeatable)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="worker concurrency for processing (repeatable; default 100 and 500)",
    )
    for key in ("single", "bulk", "process", "latency"):
        p.add_argument(f"--n-{key}", type=int, metavar="N", help=f"override N of {key}")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="before each step wait up to S seconds for the machine to be quiet (default 60)",
    )
    p.add_argument(
        "--retry-noisy",
        type=int,
        default=2,
        metavar="K",
        help="measure a step again (up to K times) when other processes used the CPU (default 2)",
    )
    p.add_argument("--deadline", type=float, default=120.0, help="seconds per step (default 120)")
    p.add_argument("--dir", help="parent folder of the temporary databases (default: $TMPDIR)")
    p.add_argument(
        "--child-wrapper",
        default="",
        help="command prefixed to the worker child, e.g. a profiler: "
        "'py-spy record -o /tmp/{run}.txt --' ({run} names the step and repetition)",
    )
    # worker child (internal)
    p.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--max-seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_child:
        args.concurrency = (args.concurrency or [10])[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_child:
        asyncio.run(worker_child(args))
        return 0
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    sys.exit(main())
