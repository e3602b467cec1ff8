"""Cost of OpenTelemetry tracing on the hot path: jobs/s with tracing off vs on.

One process, one SQLite file (durable defaults), one worker (concurrency 20),
no-op async jobs. Rounds alternate off / on so both see the same machine state.
"On" is the SDK as a deployment runs it: a ``TracerProvider`` with a
``BatchSpanProcessor`` whose exporter is an in-memory sink (counts the spans and
drops them), jobs submitted while tracing (so each carries ``traceparent`` and its
``process`` span is a child of a ``submit`` span); "on 10%" samples a tenth of the
traces (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``..._ARG=0.1``). Also
times 1-by-1 submits.

The garbage collector is set as ``conveyor worker`` sets it (young-generation
threshold 10,000, the start-up heap frozen); ``--default-gc`` keeps the
interpreter's defaults, as a process embedding a worker has unless it sets them.

    .venv/bin/python bench/tracing_bench.py            # 5 rounds x 3 modes, ~2 min
    .venv/bin/python bench/tracing_bench.py --jobs 5000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

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
    for start in range(0, jobs, 100):  # 100 submit spans per 10,000 jobs (traces to sample)
        await app.enqueue_many("noop", [{"n": i} for i in range(start, min(jobs, start + 100))])
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


def _provider(sink: SpanExporter, ratio: float = 1.0) -> TracerProvider:
    """The SDK as deployed: batch export, the default parent-based sampler (or one
    keeping ``ratio`` of the traces, decided at submit)."""
    sampler = ParentBased(TraceIdRatioBased(ratio)) if ratio < 1 else None
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(sink, max_queue_size=100_000))
    return provider


def per_span_cost(provider_factory: Any) -> tuple[float, float, float]:
    """Microseconds of one attempt's span as the worker makes it (extract, start,
    make current, outcome, end), of the same for a job whose submit was not
    sampled, and of a bare SDK span, in a tight loop."""
    from opentelemetry.trace import SpanKind

    from conveyor.domain.job import Job
    from conveyor.domain.states import JobState

    provider = provider_factory()
    tracing.use(provider)
    job = Job(
        id="019ad4c1e2f3a4b5c6d7e8f901234567",
        job_type="noop",
        state=JobState.RUNNING,
        payload={},
        attempt=1,
        metadata={"traceparent": "00-429261ba6c16190eb7e56883d5d6092b-b0469139a704b174-01"},
    )
    unsampled = Job(
        id=job.id,
        job_type="noop",
        state=JobState.RUNNING,
        payload={},
        attempt=1,
        metadata={"traceparent": job.metadata["traceparent"][:-2] + "00"},
    )
    tracer = provider.get_tracer("bench")

    def attempt() -> None:
        span = tracing.start_job(job)
        assert span is not None
        tracing.end_job(span, "complete", None)

    def unsampled_attempt() -> None:
        span = tracing.start_job(unsampled)
        assert span is not None
        tracing.end_job(span, "complete", None)

    def bare() -> None:
        tracer.start_span("x", kind=SpanKind.CONSUMER).end()

    n = 2_000
    costs = [
        min(timeit.repeat(fn, number=n, repeat=9)) / n * 1e6
        for fn in (attempt, unsampled_attempt, bare)
    ]
    tracing.use(None)
    provider.shutdown()
    return costs[0], costs[1], costs[2]


MODES = ("off", "on", "on 10%")


def summary(rounds: dict[str, list[float]], pick: Any) -> dict[str, float]:
    """Medians (``pick``), or the best round of each figure (``None``): on a
    shared machine the best is the least disturbed."""
    if pick is not None:
        return {w: pick(v) for w, v in rounds.items()}
    return {
        "process": max(rounds["process"]),
        "submit": max(rounds["submit"]),
        "cpu": min(rounds["cpu"]),
    }


async def main(args: argparse.Namespace) -> None:
    if not args.default_gc:
        gc.set_threshold(10_000, 50, 100)  # as conveyor.cli.main.main
        gc.freeze()  # as Conveyor.run_worker, once everything is imported
    sink, sampled_sink = Sink(), Sink()
    providers = {"off": None, "on": _provider(sink), "on 10%": _provider(sampled_sink, 0.1)}
    results: dict[str, dict[str, list[float]]] = {
        m: {"process": [], "submit": [], "cpu": []} for m in MODES
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES[r % 3 :] + MODES[: r % 3]:  # each mode leads a round in turn
                db = Path(tmp) / f"{mode.replace(' ', '').replace('%', '')}-{r}.db"
                tracing.use(providers[mode])
                app = Conveyor(settings=Settings(database_url=f"sqlite:///{db}"))
                app.job("noop")(noop)
                async with app:
                    results[mode]["submit"].append(await submit_round(app, args.submits))
                    rate, cpu = await process_round(app, args.jobs, args.submits)
                    results[mode]["process"].append(rate)
                    results[mode]["cpu"].append(cpu)
                print(
                    f"round {r + 1} tracing {mode:>6}: process "
                    f"{results[mode]['process'][-1]:8,.0f} jobs/s "
                    f"({results[mode]['cpu'][-1]:5.1f} CPU us/job), submit 1-by-1 "
                    f"{results[mode]['submit'][-1]:6,.0f} /s",
                    flush=True,
                )
    tracing.use(None)
    for provider in providers.values():
        if provider is not None:
            provider.force_flush()
            provider.shutdown()
    print()
    print(
        f"python {sys.version.split()[0]}, {args.jobs:,} jobs a round, {args.rounds} rounds each, "
        f"gc {'defaults' if args.default_gc else 'as conveyor worker'}"
    )
    for label, pick in (("medians", statistics.median), ("best rounds", None)):
        off = summary(results["off"], pick)
        for mode in MODES[1:]:
            got = summary(results[mode], pick)
            print(
                f"tracing {mode:>6} vs off ({label}): process {got['process']:,.0f} vs "
                f"{off['process']:,.0f} jobs/s ({100 * (1 - got['process'] / off['process']):+.1f}%"
                f" cost); CPU {got['cpu']:.1f} vs {off['cpu']:.1f} us/job "
                f"({100 * (got['cpu'] / off['cpu'] - 1):+.1f}%); submit 1-by-1 "
                f"{got['submit']:,.0f} vs {off['submit']:,.0f} /s"
            )
    span_us, unsampled_us, bare_us = per_span_cost(provider_factory=lambda: _provider(Sink()))
    print(
        f"per attempt (tight loop, min of 9): start_job+end_job {span_us:.1f} us; "
        f"unsampled job {unsampled_us:.1f} us; a bare SDK span {bare_us:.1f} us"
    )
    expected = args.rounds * (args.jobs + args.submits)
    print(f"spans exported {sink.spans:,}; process spans with a submit parent {sink.parented:,}")
    assert sink.parented == expected, (sink.parented, expected)
    print(f"10% sampled: {sampled_sink.parented:,} process spans of {expected:,} recorded")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--submits", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--default-gc", action="store_true", help="the interpreter's gc settings")
    asyncio.run(main(parser.parse_args()))
