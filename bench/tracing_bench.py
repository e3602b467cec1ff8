"""Cost of OpenTelemetry tracing on the hot path: jobs/s with tracing off vs on.

One process, one SQLite file (durable defaults), one worker (concurrency 20),
no-op async jobs. Rounds alternate off / on so both see the same machine state.
"On" is the SDK as a deployment runs it: a ``TracerProvider`` with a
``BatchSpanProcessor`` whose exporter is an in-memory sink (counts the spans and
drops them), jobs submitted while tracing (so each carries ``traceparent`` and its
``process`` span is a child of a ``submit`` span). Also times 1-by-1 submits.

    .venv/bin/python bench/tracing_bench.py            # ~1 min
    .venv/bin/python bench/tracing_bench.py --jobs 5000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from conveyor import Conveyor
from conveyor.domain.job import Finish
from conveyor.observability import tracing
from conveyor.settings import Settings


class Sink(SpanExporter):
    """Counts exported spans and drops them (an exporter with no network)."""

    def __init__(self) -> None:
        self.spans = 0
        self.parented = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        self.parented += sum(1 for s in spans if s.name.startswith("process") and s.parent)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


async def noop(ctx: Any, n: int = 0) -> int:
    return n


async def process_round(app: Conveyor, jobs: int, waiting: int) -> tuple[float, float]:
    """Enqueue ``jobs`` (bulk, untimed), then time a worker processing them and the
    ``waiting`` jobs already queued."""
    for start in range(0, jobs, 1000):
        await app.enqueue_many("noop", [{"n": i} for i in range(start, min(jobs, start + 1000))])
    done = 0
    jobs += waiting
    all_done = asyncio.Event()

    def finished(_: Finish, accepted: bool) -> None:
        nonlocal done
        done += 1
        if done >= jobs:
            all_done.set()

    app.on_finish(finished)
    worker = app.worker(concurrency=20, maintenance=False)
    began, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(all_done.wait(), 300)
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    worker.request_stop()
    await task
    app.signals._finish_listeners.remove(finished)  # type: ignore[attr-defined]
    return jobs / elapsed, cpu / jobs * 1e6


async def submit_round(app: Conveyor, jobs: int) -> float:
    began = time.perf_counter()
    for i in range(jobs):
        await app.enqueue("noop", {"n": i})
    elapsed = time.perf_counter() - began
    return jobs / elapsed


async def main(args: argparse.Namespace) -> None:
    sink = Sink()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(sink))
    results: dict[str, dict[str, list[float]]] = {
        "off": {"process": [], "submit": [], "cpu": []},
        "on": {"process": [], "submit": [], "cpu": []},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                db = Path(tmp) / f"{mode}-{r}.db"
                tracing.use(provider if mode == "on" else None)
                app = Conveyor(settings=Settings(database_url=f"sqlite:///{db}"))
                app.job("noop")(noop)
                async with app:
                    results[mode]["submit"].append(await submit_round(app, args.submits))
                    rate, cpu = await process_round(app, args.jobs, args.submits)
                    results[mode]["process"].append(rate)
                    results[mode]["cpu"].append(cpu)
                print(
                    f"round {r + 1} tracing {mode:>3}: process "
                    f"{results[mode]['process'][-1]:8,.0f} jobs/s "
                    f"({results[mode]['cpu'][-1]:5.1f} CPU us/job), submit 1-by-1 "
                    f"{results[mode]['submit'][-1]:6,.0f} /s",
                    flush=True,
                )
    tracing.use(None)
    provider.force_flush()
    provider.shutdown()
    print()
    print(f"python {sys.version.split()[0]}, {args.jobs:,} jobs a round, {args.rounds} rounds each")
    for what in ("process", "submit"):
        off = statistics.median(results["off"][what])
        on = statistics.median(results["on"][what])
        print(
            f"{what:>8}: off {off:8,.0f} /s   on {on:8,.0f} /s   cost {100 * (1 - on / off):5.1f}%"
            "  (medians)"
        )
    off, on = statistics.median(results["off"]["cpu"]), statistics.median(results["on"]["cpu"])
    print(f"     CPU: off {off:8.1f} us/job on {on:8.1f} us/job  +{on - off:.1f} us/job")
    expected = args.rounds * (args.jobs + args.submits)
    print(f"spans exported {sink.spans:,}; process spans with a submit parent {sink.parented:,}")
    assert sink.parented == expected, (sink.parented, expected)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--submits", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
