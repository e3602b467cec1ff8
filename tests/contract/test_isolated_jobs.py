"""Jobs of ``isolation="process"`` job types through a real worker, on every
backend: a crash, ``os._exit``, a hang past the timeout or a cancel ends only that
attempt (its child is killed), the worker lives on, a handler gets coerced values."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from appkit import app_on, finished

from conveyor import Conveyor
from conveyor.domain.errors import ConfigurationError
from conveyor.domain.states import JobState
from conveyor.storage.base import Store
from integration import isolation_handlers as h
from support import async_wait_until, running_worker


def register(conveyor: Conveyor) -> None:
    iso: dict[str, Any] = {"isolation": "process", "max_retries": 0}
    conveyor.job("hard_exit", **iso)(h.hard_exit)
    conveyor.job("segfault", **iso)(h.segfault)
    conveyor.job("exit3", **iso)(h.exit3)
    conveyor.job("hang", timeout=0.5, **iso)(h.hang)
    conveyor.job("wait_cancelled", timeout=60, **iso)(h.wait_cancelled)
    conveyor.job("async_echo", **iso)(h.async_echo)
    conveyor.job("pid", **iso)(h.pid)
    conveyor.job("in_thread")(h.pid)  # the same function, not isolated
    conveyor.job("scribble", **iso)(h.scribble)
    conveyor.job("retry_in_ages", isolation="process", max_retries=1)(h.retry_in_ages)
    conveyor.job("slow_to_say", timeout=60, **iso)(h.slow_to_say)
    conveyor.job("nap", timeout=60, **iso)(h.nap)
    conveyor.job("produce", **iso)(h.produce)
    conveyor.job("consume", **iso)(h.consume)


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, register, heartbeat_timeout=2.0, shutdown_grace=0.5) as conveyor:
        yield conveyor


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_crashes_and_hangs_end_only_their_attempt(app, tmp_path: Path):
    marker = tmp_path / "hang.pid"
    ids = {
        "hard_exit": (await app.enqueue("hard_exit")).id,
        "segfault": (await app.enqueue("segfault")).id,
        "exit3": (await app.enqueue("exit3")).id,
        "hang": (await app.enqueue("hang", {"marker": str(marker)})).id,
        "echo": (await app.enqueue("async_echo", {"n": "7"})).id,
        "thread": (await app.enqueue("in_thread")).id,
    }
    async with running_worker(app, concurrency=4) as worker:
        jobs = await finished(app, list(ids.values()), timeout=60)
        assert not worker.stopping
    got = {k: jobs[i] for k, i in ids.items()}
    assert got["echo"].state is JobState.COMPLETED
    assert got["echo"].result["n"] == 7  # coerced to the signature's int in the child
    assert got["echo"].result["pid"] != os.getpid()
    assert got["thread"].result == os.getpid()
    for kind in ("hard_exit", "segfault", "exit3", "hang"):
        assert got[kind].state is JobState.FAILED, kind
    assert "exit" in got["hard_exit"].error.lower()
    assert "SIGSEGV" in got["segfault"].error or "signal" in got["segfault"].error.lower()
    assert got["exit3"].error == "SystemExit: 3"
    assert got["hang"].error.startswith("JobTimeout")
    assert not alive(int(marker.read_text()))  # the hanging child was killed


async def test_cancel_kills_the_child_and_is_confirmed(app, tmp_path: Path):
    marker, done = tmp_path / "m.pid", tmp_path / "done"
    job = await app.enqueue("wait_cancelled", {"marker": str(marker), "done": str(done)})
    async with running_worker(app, concurrency=2):
        await async_wait_until(_exists(marker), 60, "the child to start the job")
        await app.cancel(job.id)
        jobs = await finished(app, [job.id], timeout=60)
    assert jobs[job.id].state is JobState.CANCELLED
    assert not alive(int(marker.read_text()))


async def test_shutdown_kills_isolated_jobs_and_hands_them_back(app, tmp_path: Path):
    marker, done = tmp_path / "m.pid", tmp_path / "done"
    job = await app.enqueue("wait_cancelled", {"marker": str(marker), "done": str(done)})
    async with running_worker(app, concurrency=2) as worker:
        await async_wait_until(_exists(marker), 60, "the child to start the job")
    # Its code stopped for sure (the child is dead): handed back, not abandoned.
    assert worker.abandoned == 0
    assert not alive(int(marker.read_text()))
    assert (await app.store.get(job.id)).state is JobState.PENDING


async def test_a_job_scribbling_on_inherited_descriptors_harms_no_sibling(app):
    napping = await app.enqueue("nap", {"seconds": 1.5})
    async with running_worker(app, concurrency=3):

        async def started() -> bool:
            return (await app.store.get(napping.id)).state is JobState.RUNNING

        await async_wait_until(started, 60, "the napping job to start")
        scribbler = await app.enqueue("scribble")
        jobs = await finished(app, [napping.id, scribbler.id], timeout=60)
    assert jobs[scribbler.id].state is JobState.COMPLETED
    assert jobs[scribbler.id].result == 0  # nothing but stdio and its own socket open
    assert jobs[napping.id].result == "rested"


async def test_hostile_exceptions_in_a_child_are_reported_in_time(app):
    ages = await app.enqueue("retry_in_ages")
    slow = await app.enqueue("slow_to_say")
    async with running_worker(app, concurrency=2):
        jobs = await finished(app, [slow.id], timeout=20)  # far below its 60 s timeout

        async def waiting() -> bool:
            job = await app.store.get(ages.id)
            return job.attempt == 1 and job.state is JobState.PENDING

        await async_wait_until(waiting, 30, "the retry to be scheduled")
    assert "did not come within" in jobs[slow.id].error
    job = await app.store.get(ages.id)
    assert job.run_at >= app.now() + timedelta(days=29)  # clamped to 30 days


async def test_worker_wide_process_isolation_keeps_conveyors_own_jobs_in_process(app):
    worker = app.worker(isolation="process")  # the webhook job is a bound method
    assert not worker._isolated(app.registry["conveyor.webhook"])
    assert worker._isolated(app.registry["in_thread"])


def _exists(path: Path):
    async def check() -> bool:
        return path.exists() and path.read_text() != ""

    return check


def test_a_handler_a_child_cannot_import_is_refused_when_the_worker_is_built():
    app = Conveyor("memory://")
    app.job("inline", isolation="process")(lambda ctx: None)
    with pytest.raises(ConfigurationError, match="module level"):
        app.worker()


async def test_a_workflow_step_in_a_child_reads_its_parents_results(app):
    wf = app.workflow("iso-etl")
    a = wf.step("a", "produce", n=3)
    b = wf.step("b", "produce", n=2)
    wf.step("sum", "consume", after=[a, b])
    run = await wf.submit()
    async with running_worker(app, concurrency=2):
        done = await run.wait(timeout=60)
    steps = {s.name: s for s in done.steps or []}
    assert steps["sum"].result["total"] == 0 + 1 + 2 + 0 + 1
    assert steps["sum"].result["parents"] == ["a", "b"]
    assert steps["sum"].result["pid"] != os.getpid()
