"""``CONVEYOR_JOB_DEAD_LETTER=false`` on every backend: jobs that fail for good are
deleted ``retention`` after they failed, like completed ones, instead of waiting in
the dead-letter queue; with the DLQ on (the default) they stay."""

from __future__ import annotations

from datetime import timedelta

import pytest
from appkit import app_on

from conveyor import Conveyor
from conveyor.domain.errors import JobNotFound
from conveyor.domain.states import JobState
from conveyor.runtime.dead_letter import prune_dead_letters
from conveyor.settings import Settings
from conveyor.storage.base import Store
from support import async_wait_until, running_worker


async def boom(ctx) -> None:
    raise RuntimeError("boom")


async def fine(ctx) -> None: ...


def register(app: Conveyor) -> None:
    app.job("boom", max_retries=0)(boom)
    app.job("fine")(fine)


async def _state(app: Conveyor, job_id: str, state: JobState):
    async def reached():
        job = await app.store.get(job_id)
        return job if job.state is state else None

    return await async_wait_until(reached, 20, f"job {job_id} to be {state.value}")


async def test_prune_dead_letters_deletes_failures_older_than_the_cutoff_only(store: Store):
    async with app_on(store, register) as app:
        async with running_worker(app):
            older = await _state(app, (await app.enqueue("boom")).id, JobState.FAILED)
            newer = await _state(app, (await app.enqueue("boom")).id, JobState.FAILED)
            done = await _state(app, (await app.enqueue("fine")).id, JobState.COMPLETED)
        assert older.completed_at < newer.completed_at
        assert await prune_dead_letters(app.store, newer.completed_at, app.now()) == 1
        with pytest.raises(JobNotFound):
            await app.store.get(older.id)
        assert (await app.store.get(newer.id)).state is JobState.FAILED
        assert (await app.store.get(done.id)).state is JobState.COMPLETED  # not its business
        later = newer.completed_at + timedelta(seconds=1)
        assert await prune_dead_letters(app.store, later, app.now()) == 1
        assert await prune_dead_letters(app.store, later, app.now()) == 0


async def test_with_the_dlq_off_a_worker_deletes_failures_after_the_retention(store: Store):
    async with app_on(store, register, retention=0.2) as app:
        async with running_worker(app):  # the DLQ on: the failure stays
            failed = await _state(app, (await app.enqueue("boom")).id, JobState.FAILED)

        async def aged() -> bool:
            return app.now() > failed.completed_at + timedelta(seconds=0.2)

        await async_wait_until(aged, 5, "the failure to be older than the retention")
        assert (await app.store.get(failed.id)).state is JobState.FAILED
        app.settings = app.settings.with_(job_dead_letter=False)
        async with running_worker(app):

            async def gone() -> bool:
                try:
                    await app.store.get(failed.id)
                except JobNotFound:
                    return True
                return False

            await async_wait_until(gone, 20, "the maintenance pass to delete the failure")


def test_the_switch_reads_from_the_environment():
    assert Settings.from_env({}).job_dead_letter is True
    assert Settings.from_env({"CONVEYOR_JOB_DEAD_LETTER": "false"}).job_dead_letter is False
