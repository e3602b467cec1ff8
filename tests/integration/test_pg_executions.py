"""PostgreSQL writes an attempt's execution row once, when it ends; an attempt
started by an older version (open row from before migration 0003) is closed
instead of recorded twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from conveyor.domain.job import Finish, NewJob, WorkerInfo
from conveyor.domain.states import Action
from conveyor.storage.postgres import PostgresStore

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


async def _running(store: PostgresStore) -> tuple[str, str]:
    await store.register_worker(
        WorkerInfo(id="w1", host="h", pid=1, queues=("default",), job_types=("t",), concurrency=1),
        NOW,
    )
    await store.enqueue_many([NewJob("t")], NOW)
    (job,) = await store.fetch("w1", queues=["default"], job_types=["t"], limit=1, now=NOW)
    assert job.lease_token is not None
    return job.id, job.lease_token


async def test_running_attempt_shows_from_the_job_row_then_one_row(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        job_id, token = await _running(store)
        (run,) = await store.executions(job_id)
        assert (run.attempt, run.worker_id, run.started_at, run.finished_at) == (1, "w1", NOW, None)
        done = NOW + timedelta(seconds=1)
        finish = Finish(job_id, token, Action.COMPLETE, result={"ok": 1})
        assert await store.finish_many([finish], done) == [True]
        (run,) = await store.executions(job_id)
        assert (run.attempt, run.worker_id, run.started_at) == (1, "w1", NOW)
        assert (run.finished_at, run.outcome) == (done, "completed")
    finally:
        await store.close()


async def test_an_open_row_from_an_older_version_is_closed_not_duplicated(
    postgres_dsn: str,
) -> None:
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        job_id, token = await _running(store)
        conn = await asyncpg.connect(postgres_dsn)
        try:  # what fetch wrote before migration 0003
            await conn.execute(
                "INSERT INTO conveyor.job_executions (job_id, attempt, worker_id, started_at) "
                "VALUES ($1, 1, 'w1', $2)",
                job_id,
                NOW,
            )
        finally:
            await conn.close()
        (run,) = await store.executions(job_id)  # the open row, not a second one
        assert run.finished_at is None
        finish = Finish(job_id, token, Action.COMPLETE, result=None)
        assert await store.finish_many([finish], NOW + timedelta(seconds=1)) == [True]
        (run,) = await store.executions(job_id)
        assert run.outcome == "completed"
    finally:
        await store.close()
