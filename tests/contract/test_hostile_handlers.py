"""Hostile handlers, on every backend: whatever a handler raises or returns, its
outcome is recorded, the other jobs are not held back and the worker lives on.

Each case comes from a public bug report of another queue (see issue "Hardening"):
unencodable exception texts, NUL characters, absurd retry delays, SystemExit,
self-raised CancelledError, results JSON can't hold.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from appkit import app_on, finished

from conveyor import Conveyor, Permanent, Retry
from conveyor.domain.job import Finish, JobQuery
from conveyor.domain.limits import MAX_ERROR_CHARS, MAX_RETRY_DELAY_SECONDS
from conveyor.domain.states import EVENT_FOR_ACTION, Action, JobState
from conveyor.storage.base import Store
from support import async_wait_until, running_worker


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(
        store, heartbeat_timeout=1.0, shutdown_grace=0.5, allow_unknown_job_types=True
    ) as conveyor:
        yield conveyor


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ exploded")


async def test_unstorable_error_texts_are_recorded_and_never_block_other_jobs(app):
    errors: dict[str, BaseException] = {
        "surrogate": FileNotFoundError(os.fsdecode(b"report-\xff.csv")),
        "nul": ValueError("bad\x00byte"),
        "huge": ValueError("x" * (MAX_ERROR_CHARS * 20)),
        "unprintable": Unprintable(),
    }

    @app.job("hostile", max_retries=0)
    async def hostile(ctx, kind: str) -> None:
        raise errors[kind]

    @app.job("fine")
    async def fine(ctx, n: int) -> int:
        return n

    bad = [(await app.enqueue("hostile", {"kind": k})).id for k in errors]
    good = [(await app.enqueue("fine", {"n": i})).id for i in range(5)]
    async with running_worker(app, concurrency=10):
        jobs = await finished(app, bad + good)
    assert [jobs[i].result for i in good] == list(range(5))
    assert all(jobs[i].state is JobState.COMPLETED for i in good)
    by_kind = dict(zip(errors, (jobs[i] for i in bad), strict=True))
    assert all(j.state is JobState.FAILED for j in by_kind.values())
    assert by_kind["surrogate"].error.startswith("FileNotFoundError: report-\ufffd.csv")
    assert by_kind["nul"].error == "ValueError: bad\ufffdbyte"
    assert len(by_kind["huge"].error) < MAX_ERROR_CHARS + 100
    assert "[truncated" in by_kind["huge"].error
    assert by_kind["unprintable"].error.startswith("Unprintable: <Unprintable whose str() failed>")
    history = await app.store.executions(bad[0])
    assert history[-1].error.startswith("FileNotFoundError: report-\ufffd.csv")


async def test_results_are_made_storable_or_fail_with_the_reason(app):
    results: dict[str, Any] = {
        "nul": {"text": "a\x00b"},
        "surrogate": {"name": os.fsdecode(b"\xfe.txt")},
        "nan": {"score": math.nan},
        "inf": [1.0, math.inf],
        "object": {"when": object()},
    }

    @app.job("returns", max_retries=0)
    async def returns(ctx, kind: str) -> Any:
        return results[kind]

    ids = {k: (await app.enqueue("returns", {"kind": k})).id for k in results}
    async with running_worker(app):
        jobs = await finished(app, list(ids.values()))
    got = {k: jobs[i] for k, i in ids.items()}
    assert got["nul"].state is JobState.COMPLETED
    assert got["nul"].result == {"text": "a\ufffdb"}
    assert got["surrogate"].result == {"name": "\ufffd.txt"}
    assert got["nan"].state is JobState.FAILED
    assert "result.score is not a finite number" in got["nan"].error
    assert "result[1] is not a finite number" in got["inf"].error
    assert "not JSON-serialisable" in got["object"].error


async def test_retry_delays_are_clamped_and_nan_means_the_backoff(app):
    delays = {"huge": 1e13, "inf": math.inf, "nan": math.nan, "negative_zero": -0.0}

    @app.job("again", max_retries=1)
    async def again(ctx, kind: str) -> str:
        if ctx.attempt == 1:
            raise Retry("later", delay=delays[kind])
        return "second attempt"

    before = app.now()
    ids = {k: (await app.enqueue("again", {"kind": k})).id for k in delays}

    async def retried() -> dict[str, datetime] | None:
        events = await app.store.events_after(0, 1000)
        run_at = {
            e.job_id: datetime.fromisoformat(e.data["run_at"])
            for e in events
            if e.type == EVENT_FOR_ACTION[Action.RETRY].value
        }
        return run_at if len(run_at) == len(ids) else None

    async with running_worker(app):
        run_at = await async_wait_until(retried, 20, "every job's retry event")
        done = await finished(app, [ids["nan"], ids["negative_zero"]])
    limit = before + timedelta(seconds=MAX_RETRY_DELAY_SECONDS)
    after = app.now() + timedelta(seconds=MAX_RETRY_DELAY_SECONDS)
    assert limit <= run_at[ids["huge"]] <= after
    assert limit <= run_at[ids["inf"]] <= after
    # NaN: the job type's backoff (at most 1 s for the first retry by default).
    assert run_at[ids["nan"]] <= before + timedelta(seconds=2)
    assert all(j.result == "second attempt" for j in done.values())
    for kind in ("huge", "inf"):
        job = await app.store.get(ids[kind])
        assert (job.state, job.attempt) == (JobState.PENDING, 1)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_base_exceptions_fail_the_attempt_not_the_worker(app, sync):
    raisers = {
        "exit": lambda: sys.exit(3),
        "interrupt": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
        "generator_exit": lambda: (_ for _ in ()).throw(GeneratorExit()),
        "cancelled": lambda: (_ for _ in ()).throw(asyncio.CancelledError()),
    }

    if sync:

        @app.job("raiser", max_retries=0)
        def raiser(ctx, kind: str) -> None:
            raisers[kind]()

    else:

        @app.job("raiser", max_retries=0)
        async def raiser(ctx, kind: str) -> None:
            raisers[kind]()

    @app.job("after")
    async def after(ctx) -> str:
        return "still alive"

    ids = [(await app.enqueue("raiser", {"kind": k})).id for k in raisers]
    async with running_worker(app) as worker:
        jobs = await finished(app, ids)
        last = await app.enqueue("after")
        done = await finished(app, [last.id])
        assert not worker.stopping
    assert done[last.id].result == "still alive"
    names = ["SystemExit: 3", "KeyboardInterrupt", "GeneratorExit", "CancelledError"]
    for job_id, name in zip(ids, names, strict=True):
        assert jobs[job_id].state is JobState.FAILED, name
        assert jobs[job_id].error == name
        (attempt,) = await app.store.executions(job_id)
        assert attempt.outcome == "failed"


async def test_a_self_raised_cancelled_error_is_retried_then_dead_lettered(app):
    runs: list[int] = []

    @app.job("cancels_itself", max_retries=2, retry=None)
    async def cancels_itself(ctx) -> None:
        runs.append(ctx.attempt)
        raise Retry("again", delay=0) if ctx.attempt == 0 else asyncio.CancelledError()

    job = await app.enqueue("cancels_itself")
    async with running_worker(app):
        jobs = await finished(app, [job.id])
    assert jobs[job.id].state is JobState.FAILED
    assert runs == [1, 2, 3]
    assert [e.outcome for e in await app.store.executions(job.id)] == ["retry", "retry", "failed"]


async def test_one_outcome_the_store_refuses_is_failed_alone(app, store):
    """A finish that still can't be written (built by hand, past every cleaning) is
    isolated by splitting the batch: the others commit, it fails with the reason."""

    @app.job("w")
    async def w(ctx) -> None: ...

    for _ in range(5):
        await app.enqueue("w")
    worker = app.worker(concurrency=5)
    await store.register_worker(worker_info(worker), app.now())
    leased = await store.fetch(
        worker.id, queues=("default",), job_types=("w",), limit=5, now=app.now()
    )
    assert len(leased) == 5
    finishes = [
        Finish(j.id, j.lease_token, Action.COMPLETE, result=i) for i, j in enumerate(leased)
    ]
    poison = leased[2]
    finishes[2] = Finish(poison.id, poison.lease_token, Action.COMPLETE, result={"s": "\udcff"})
    written, unwritten, _ = await worker._write(finishes)
    assert unwritten == []
    assert [ok for _, ok in written] == [True] * 5
    for i, j in enumerate(leased):
        stored = await store.get(j.id)
        if j.id == poison.id:
            assert stored.state is JobState.FAILED
            assert stored.error.startswith("the job's outcome could not be stored (complete)")
        else:
            assert (stored.state, stored.result) == (JobState.COMPLETED, i)


def worker_info(worker: Any) -> Any:
    from conveyor.domain.job import WorkerInfo

    return WorkerInfo(worker.id, "h", 1, worker.queues, worker.job_types, worker.concurrency)


async def test_listing_after_hostile_jobs_still_works(app):
    @app.job("boom", max_retries=0)
    async def boom(ctx) -> None:
        raise ValueError("\udcff\x00" * 10)

    job = await app.enqueue("boom")
    async with running_worker(app):
        await finished(app, [job.id])
    page = await app.store.list_jobs(JobQuery())
    assert [j.id for j in page.jobs] == [job.id]


class HangingStr(Exception):
    release = threading.Event()

    def __str__(self) -> str:
        HangingStr.release.wait(30)
        return "late"


async def test_review_breaks_fail_only_their_attempt(app):
    """Found by a review: a handler cancelling its own task, a sync StopIteration,
    its own TimeoutError, an exception whose __str__ hangs, a huge integer delay."""
    HangingStr.release.clear()

    @app.job("self_cancel", max_retries=1, timeout=5)
    async def self_cancel(ctx) -> None:
        asyncio.current_task().cancel()
        await asyncio.sleep(1)  # wait-ok: the self-cancel is delivered at this await

    @app.job("stop_iteration", max_retries=0, timeout=5)
    def stop_iteration(ctx) -> None:
        raise StopIteration("boom")

    @app.job("own_timeout", max_retries=0, timeout=300)
    async def own_timeout(ctx) -> None:
        # wait-ok: the sleep provokes the handler's own TimeoutError
        await asyncio.wait_for(asyncio.sleep(10), 0.01)

    @app.job("hanging_str", max_retries=0)
    async def hanging_str(ctx) -> None:
        raise HangingStr()

    @app.job("big_int_delay", max_retries=1)
    async def big_int_delay(ctx) -> str:
        if ctx.attempt == 1:
            raise Retry("later", delay=10**400)
        return "second"

    ids = {
        name: (await app.enqueue(name)).id
        for name in ("self_cancel", "stop_iteration", "own_timeout", "hanging_str")
    }
    delayed = await app.enqueue("big_int_delay")
    try:
        async with running_worker(app):
            jobs = await finished(app, list(ids.values()))

            async def retried() -> bool:
                job = await app.store.get(delayed.id)
                return job.attempt == 1 and job.state is JobState.PENDING

            await async_wait_until(retried, 10, "the delayed job to wait for its retry")
    finally:
        HangingStr.release.set()
    got = {name: jobs[i] for name, i in ids.items()}
    assert all(j.state is JobState.FAILED for j in got.values())
    assert got["self_cancel"].error == "CancelledError"
    outcomes = [e.outcome for e in await app.store.executions(ids["self_cancel"])]
    assert outcomes == ["retry", "failed"]  # attempts counted, never handed back
    assert got["stop_iteration"].error == "StopIteration: boom"
    assert got["own_timeout"].error == "TimeoutError"  # not JobTimeout
    # The event loop went on (the heartbeat, this test) while __str__ hung.
    assert "did not come within" in got["hanging_str"].error
    job = await app.store.get(delayed.id)
    assert job.run_at >= app.now() + timedelta(days=29)


class ClassHang(Exception):
    """isinstance() consults __class__ when the type check fails: hostile code."""

    @property
    def __class__(self):  # type: ignore[override]
        HangingStr.release.wait(30)
        return ClassHang


class HangFloat(float):
    def __float__(self) -> float:
        HangingStr.release.wait(30)
        return 5.0


async def test_classifying_a_hostile_exception_never_freezes_the_loop(app):
    HangingStr.release.clear()

    @app.job("class_hang", max_retries=0)
    async def class_hang(ctx) -> None:
        raise ClassHang("x")

    @app.job("float_hang", max_retries=1)
    async def float_hang(ctx) -> str:
        if ctx.attempt == 1:
            raise Retry("later", delay=HangFloat(5.0))
        return "second"

    first = await app.enqueue("class_hang")
    second = await app.enqueue("float_hang")
    try:
        async with running_worker(app):
            jobs = await finished(app, [first.id, second.id])
    finally:
        HangingStr.release.set()
    assert "did not come within" in jobs[first.id].error
    assert jobs[second.id].result == "second"  # retried with the backoff meanwhile


class PermanentHangingStr(Permanent):
    def __str__(self) -> str:
        HangingStr.release.wait(30)
        return "never in time"


async def test_hanging_texts_never_use_up_the_describers(app):
    """Exceptions whose __str__ never returns used to hold the worker's two
    describe threads for good: every later custom exception then timed out and a
    Permanent one was retried as transient (run again, never dead-lettered)."""
    HangingStr.release.clear()

    @app.job("hangs", max_retries=0)
    async def hangs(ctx) -> None:
        raise HangingStr()

    @app.job("declined", max_retries=3)
    async def declined(ctx) -> None:
        try:
            raise KeyError("card")
        except KeyError as exc:
            raise Permanent("card declined") from exc  # the README's pattern

    @app.job("permanent_hangs", max_retries=3)
    async def permanent_hangs(ctx) -> None:
        raise PermanentHangingStr()

    try:
        hanging = [(await app.enqueue("hangs")).id for _ in range(3)]
        async with running_worker(app):
            await finished(app, hanging, timeout=30)
            later = [(await app.enqueue("declined")).id, (await app.enqueue("permanent_hangs")).id]
            jobs = await finished(app, later, timeout=30)
    finally:
        HangingStr.release.set()
    for job_id in later:
        runs = await app.store.executions(job_id)
        assert [r.outcome for r in runs] == ["failed"], (jobs[job_id].error, runs)
    assert jobs[later[0]].error == "Permanent: card declined"
    assert "did not come within" in jobs[later[1]].error
