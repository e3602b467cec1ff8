"""Helpers of the Store contract suite: a frozen clock and short ways to drive a store.

Every test passes ``now`` explicitly: ``at(seconds)`` is ``BASE`` plus that many
seconds, so nothing here reads the wall clock or sleeps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.domain.job import Event, Finish, Job, JobQuery, NewJob, WorkerInfo
from conveyor.domain.states import Action
from conveyor.storage.base import Store

BASE = datetime(2026, 1, 1, tzinfo=UTC)
HEARTBEAT_TIMEOUT = 15.0


def at(seconds: float = 0.0) -> datetime:
    """The frozen clock: ``BASE`` plus ``seconds``."""
    return BASE + timedelta(seconds=seconds)


# -- driving a store -----------------------------------------------------------------
def new(job_type: str = "task", **fields: Any) -> NewJob:
    return NewJob(job_type, **fields)


async def submit(store: Store, *jobs: NewJob, now: datetime = BASE) -> list[Job]:
    return [r.job for r in await store.enqueue_many(list(jobs), now)]


async def submit_one(
    store: Store, job_type: str = "task", *, now: datetime = BASE, **fields: Any
) -> Job:
    (job,) = await submit(store, new(job_type, **fields), now=now)
    return job


def worker_info(worker_id: str = "w1", **fields: Any) -> WorkerInfo:
    values: dict[str, Any] = {
        "host": "host-a",
        "pid": 4242,
        "queues": ("default",),
        "job_types": (),
        "concurrency": 4,
    }
    values.update(fields)
    return WorkerInfo(id=worker_id, **values)


async def register(store: Store, worker_id: str = "w1", *, now: datetime = BASE) -> None:
    await store.register_worker(worker_info(worker_id), now)


async def lease(
    store: Store,
    worker_id: str = "w1",
    *,
    now: datetime = BASE,
    limit: int = 10,
    queues: tuple[str, ...] = (),
    job_types: tuple[str, ...] = (),
) -> list[Job]:
    return await store.fetch(worker_id, queues=queues, job_types=job_types, limit=limit, now=now)


async def lease_one(store: Store, worker_id: str = "w1", *, now: datetime = BASE) -> Job:
    jobs = await lease(store, worker_id, now=now, limit=1)
    assert len(jobs) == 1, f"expected one ready job, fetched {len(jobs)}"
    return jobs[0]


async def finish(
    store: Store, job: Job, action: Action, *, now: datetime = BASE, **fields: Any
) -> bool:
    assert job.lease_token is not None
    (ok,) = await store.finish_many([Finish(job.id, job.lease_token, action, **fields)], now)
    return ok


async def run_to(store: Store, job: Job, action: Action, *, now: datetime = BASE) -> Job:
    """Lease ``job`` (it must be the only ready one) and finish it with ``action``."""
    leased = await lease_one(store, now=now)
    assert leased.id == job.id
    assert await finish(store, leased, action, now=now, error="boom")
    return await store.get(job.id)


async def all_events(store: Store) -> list[Event]:
    return await store.events_after(0, 100_000)


async def last_event_id(store: Store) -> int:
    events = await all_events(store)
    return events[-1].id if events else 0


async def events_since(store: Store, after_id: int) -> list[Event]:
    return await store.events_after(after_id, 100_000)


async def types_since(store: Store, after_id: int) -> list[tuple[str, str | None]]:
    return [(e.type, e.job_id) for e in await events_since(store, after_id)]


async def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything observable, to show that a refused operation changed nothing."""
    page = await store.list_jobs(JobQuery(limit=1000, sort="created_at"))
    jobs = sorted(
        (
            j.id,
            j.state,
            j.status,
            j.attempt,
            j.lease_token,
            j.worker_id,
            j.error,
            repr(j.result),
            j.run_at,
            j.updated_at,
            j.completed_at,
            j.lost_count,
        )
        for j in page.jobs
    )
    executions = {j[0]: await store.executions(j[0]) for j in jobs}
    events = [(e.id, e.type, e.job_id) for e in await all_events(store)]
    workers = sorted((w.id, w.state, w.heartbeat_at) for w in await store.list_workers())
    return (jobs, executions, events, await store.count_by_state(), workers)
