"""Sync handlers that block: honest timeouts, no fetch without a free thread, and
never two runs of one job at once (timeout, cancel, shutdown), on every backend."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from appkit import FINAL, app_on

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.domain.states import JobState
from conveyor.runtime.status import collect_status
from conveyor.storage.base import Store
from support import async_wait_until, running_worker


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(
        store, heartbeat_interval=0.1, heartbeat_timeout=1.0, shutdown_grace=0.2, max_stuck_jobs=99
    ) as conveyor:
        yield conveyor


async def state_of(app: Conveyor, job_id: str) -> JobState:
    return (await app.store.get(job_id)).state


async def test_stuck_sync_handlers_hold_their_slots_and_later_jobs_wait_unstarted(app):
    release = threading.Event()
    started: list[str] = []

    @app.job("blocks", timeout=0.2, max_retries=0)
    def blocks(ctx) -> None:
        started.append(ctx.job_id)
        release.wait(30)  # ignores ctx.cancelled, as careless code does

    @app.job("quick", timeout=0.2)
    def quick(ctx) -> str:
        started.append(ctx.job_id)
        return "ran"

    stuck = [(await app.enqueue("blocks")).id for _ in range(2)]
    async with running_worker(app, concurrency=2) as worker:
        await async_wait_until(
            lambda: _true(worker.stuck_jobs() == 2), 10, "both handlers reported stuck"
        )
        async with _client(app, worker) as c:
            ready = (await c.get("/ready")).json()
            assert ready["workers"][0]["stuck_jobs"] == 2
            assert ready["status"] == "ready"  # below max_stuck_jobs
            metrics = (await c.get("/metrics")).text
            assert f'conveyor_worker_stuck_jobs{{worker_id="{worker.id}"}} 2.0' in metrics

        async def recorded() -> bool:  # what `conveyor status` and other processes read
            status = await collect_status(app.deps)
            return [w["stuck_jobs"] for w in status["workers"]] == [2]

        await async_wait_until(recorded, 10, "the stuck count in the worker's heartbeat")
        later = [(await app.enqueue("quick")).id for _ in range(3)]
        # No free thread: the later jobs are not even fetched, so their timeout
        # cannot start counting while they wait.
        for _ in range(5):
            await worker._wait(0.05)  # an observation window: nothing may change
            assert [await state_of(app, i) for i in later] == [JobState.PENDING] * 3
        # Still running (they are), never handed to anyone else.
        assert [await state_of(app, i) for i in stuck] == [JobState.RUNNING] * 2
        release.set()

        async def all_final() -> bool:
            return all([await state_of(app, i) in FINAL for i in stuck + later])

        await async_wait_until(all_final, 10, "every job finished")
    for job_id in stuck:
        job = await app.store.get(job_id)
        assert job.state is JobState.FAILED
        assert job.error.startswith("JobTimeout: job timed out after 0.2s")
    assert [(await app.store.get(i)).result for i in later] == ["ran"] * 3
    assert sorted(started) == sorted(stuck + later)  # each ran once


async def test_cancel_of_a_blocking_sync_job_is_confirmed_only_when_its_thread_returns(app):
    release = threading.Event()
    entered = threading.Event()

    @app.job("blocks", timeout=60)
    def blocks(ctx) -> str:
        entered.set()
        release.wait(30)
        return "finished anyway"

    job = await app.enqueue("blocks")
    async with running_worker(app, concurrency=1) as worker:
        await async_wait_until(lambda: _true(entered.is_set()), 10, "the handler to start")
        await app.cancel(job.id)
        for _ in range(5):
            await worker._wait(0.05)  # an observation window: nothing may change
            assert (await app.store.get(job.id)).status == "cancelling"
        release.set()
        await async_wait_until(
            lambda: _is(app, job.id, JobState.CANCELLED), 10, "the cancel to be confirmed"
        )


async def test_shutdown_never_hands_back_a_job_whose_thread_still_runs(app, store):
    release = threading.Event()
    entered = threading.Event()

    @app.job("blocks", timeout=60)
    def blocks(ctx) -> None:
        entered.set()
        release.wait(30)

    @app.job("polite", timeout=60)
    async def polite(ctx) -> None:
        import asyncio

        await asyncio.Event().wait()  # cancellable: its code stops on shutdown

    job = await app.enqueue("blocks")
    other = await app.enqueue("polite")
    try:
        async with running_worker(app, concurrency=2) as worker:
            await async_wait_until(lambda: _true(entered.is_set()), 10, "the handler to start")
            await async_wait_until(
                lambda: _is(app, other.id, JobState.RUNNING), 10, "the polite job to start"
            )
    finally:
        release.set()
    assert worker.abandoned == 1
    stuck = await app.store.get(job.id)
    assert (stuck.state, stuck.attempt, stuck.worker_id) == (JobState.RUNNING, 1, worker.id)
    polite_job = await app.store.get(other.id)
    assert polite_job.state is JobState.PENDING  # its code stopped: handed back
    # The lease dies with the process; the rescuer runs it again as after a crash.
    later = app.now() + timedelta(seconds=app.settings.heartbeat_timeout + 1)
    rescued = await store.rescue(heartbeat_timeout=1.0, max_lost=5, now=later)
    assert [r.job_id for r in rescued] == [job.id]
    again = await app.store.get(job.id)
    assert again.state is JobState.PENDING


async def test_a_worker_whose_slots_are_all_stuck_stops_and_says_so(app, store):
    release = threading.Event()
    app.settings = app.settings.with_(max_stuck_jobs=1)

    @app.job("blocks", timeout=0.1, max_retries=0)
    def blocks(ctx) -> None:
        release.wait(30)

    job = await app.enqueue("blocks")
    try:
        async with running_worker(app, concurrency=2) as worker:
            await async_wait_until(lambda: _true(worker.stopping), 10, "the worker to stop")
            async with _client(app, worker) as c:
                resp = await c.get("/ready")
                assert resp.status_code == 503
                assert "stuck" in resp.json()["error"]
    finally:
        release.set()
    assert worker.abandoned == 1  # left to the rescuer, never handed back
    assert (await app.store.get(job.id)).state is JobState.RUNNING


def _client(app: Conveyor, worker) -> httpx.AsyncClient:
    api = create_app(app, workers=[worker])
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


def _true(value: bool):
    async def check() -> bool:
        return value

    return check()


async def _is(app: Conveyor, job_id: str, state: JobState) -> bool:
    return (await app.store.get(job_id)).state is state
