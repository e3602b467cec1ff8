"""Contract: cancel, retry and purge of dead-lettered jobs, prune."""

from __future__ import annotations

from typing import Any

import pytest
from storekit import (
    BASE,
    all_events,
    at,
    events_since,
    finish,
    last_event_id,
    lease,
    lease_one,
    new,
    register,
    run_to,
    snapshot,
    submit,
    submit_one,
)

from conveyor.domain.errors import (
    InvalidTransition,
    JobNotCancellable,
    JobNotFound,
)
from conveyor.domain.job import Job, JobQuery
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


async def failed_job(store: Store, job_type: str = "task", **fields: Any) -> Job:
    job = await submit_one(store, job_type, **fields)
    (got,) = await lease(store, job_types=(job_type,), limit=1)
    assert await finish(store, got, Action.FAIL, error="boom")
    return await store.get(job.id)


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_pending_is_immediate(store: Store) -> None:
    job = await submit_one(store)
    mark = await last_event_id(store)

    cancelled = await store.cancel(job.id, at(2))

    for j in (cancelled, await store.get(job.id)):
        assert j.state is JobState.CANCELLED
        assert j.status == "cancelled"
        assert j.error == "cancelled"
        assert j.completed_at == at(2)
    (event,) = await events_since(store, mark)
    assert (event.type, event.job_id, event.data["status"]) == (
        "job_cancelled",
        job.id,
        "cancelled",
    )
    assert await lease(store, now=at(3)) == []


async def test_cancel_delayed_job_is_immediate(store: Store) -> None:
    job = await submit_one(store, run_at=at(600))
    await store.cancel(job.id, at(1))
    assert await lease(store, now=at(600)) == []
    assert (await store.get(job.id)).state is JobState.CANCELLED


async def test_cancel_blocked_is_immediate(store: Store) -> None:
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    cancelled = await store.cancel(child.id, at(1))
    assert cancelled.state is JobState.CANCELLED
    await run_to(store, parent, Action.COMPLETE, now=at(2))
    assert (await store.get(child.id)).state is JobState.CANCELLED  # not revived


async def test_cancel_running_asks_the_worker_and_waits(store: Store) -> None:
    await register(store, "w1")
    job = await submit_one(store)
    got = await lease_one(store, "w1")
    mark = await last_event_id(store)

    flagged = await store.cancel(job.id, at(5))

    for j in (flagged, await store.get(job.id)):
        assert j.state is JobState.RUNNING
        assert j.status == "cancelling"
        assert j.cancel_requested_at == at(5)
        assert j.lease_token == got.lease_token
    (event,) = await events_since(store, mark)
    assert (event.type, event.data["status"]) == ("job_status_changed", "cancelling")
    assert (await store.count_by_state())[JobState.RUNNING] == 1

    # Asking again changes nothing and says nothing.
    before = await snapshot(store)
    again = await store.cancel(job.id, at(6))
    assert again.cancel_requested_at == at(5)
    assert await snapshot(store) == before

    assert await store.heartbeat("w1", 1, at(7)) == {job.id}
    assert await finish(store, got, Action.CONFIRM_CANCEL, now=at(8))
    assert (await store.get(job.id)).state is JobState.CANCELLED


@pytest.mark.parametrize("action", [Action.COMPLETE, Action.FAIL, Action.CONFIRM_CANCEL])
async def test_cancel_of_a_finished_job_is_refused(store: Store, action: Action) -> None:
    job = await submit_one(store)
    done = await run_to(store, job, action)
    before = await snapshot(store)
    with pytest.raises(JobNotCancellable) as info:
        await store.cancel(job.id, at(9))
    assert isinstance(info.value, InvalidTransition)
    assert info.value.job_id == job.id
    assert info.value.state == done.state.value
    assert done.state.value in str(info.value)
    assert await snapshot(store) == before


async def test_cancel_of_a_cancelled_job_is_refused(store: Store) -> None:
    job = await submit_one(store)
    await store.cancel(job.id, at(1))
    with pytest.raises(JobNotCancellable):
        await store.cancel(job.id, at(2))


async def test_cancel_of_an_unknown_job_is_not_found(store: Store) -> None:
    with pytest.raises(JobNotFound) as info:
        await store.cancel("no-such-job", at(1))
    assert isinstance(info.value, LookupError)
    assert info.value.job_id == "no-such-job"
    assert await all_events(store) == []


# -- retry from the dead-letter queue -------------------------------------------------------


async def test_retry_failed_requeues_with_a_fresh_budget(store: Store) -> None:
    job = await failed_job(store, max_retries=1)
    mark = await last_event_id(store)

    (retried,) = await store.retry_failed([job.id], at(50))

    for j in (retried, await store.get(job.id)):
        assert j.state is JobState.PENDING
        assert j.attempt == 0
        assert j.lost_count == 0
        assert j.run_at == at(50)
        assert j.completed_at is None
        assert j.worker_id is None
        assert j.lease_token is None
    (event,) = await events_since(store, mark)
    assert (event.type, event.job_id, event.data["status"]) == (
        "job_status_changed",
        job.id,
        "pending",
    )
    again = await lease_one(store, now=at(50))
    assert again.attempt == 1
    assert len(await store.executions(job.id)) == 2


async def test_retry_failed_resets_lost_count_of_a_quarantined_job(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1")
    await store.rescue(heartbeat_timeout=15, max_lost=1, now=at(20))
    assert (await store.get(job.id)).lost_count == 1
    (retried,) = await store.retry_failed([job.id], at(21))
    assert (retried.state, retried.lost_count) == (JobState.PENDING, 0)


async def test_retry_failed_of_many(store: Store) -> None:
    jobs = [await failed_job(store, f"t{i}") for i in range(3)]
    retried = await store.retry_failed([j.id for j in jobs], at(5))
    assert [j.id for j in retried] == [j.id for j in jobs]
    assert (await store.count_by_state())[JobState.PENDING] == 3


@pytest.mark.parametrize("other", ["pending", "completed", "cancelled", "running"])
async def test_retry_failed_is_all_or_nothing(store: Store, other: str) -> None:
    failed = await failed_job(store, "f")
    odd = await submit_one(store, "odd")
    if other == "completed":
        await run_to(store, odd, Action.COMPLETE)
    elif other == "cancelled":
        await store.cancel(odd.id, at(1))
    elif other == "running":
        await lease_one(store)
    before = await snapshot(store)

    with pytest.raises(InvalidTransition) as info:
        await store.retry_failed([failed.id, odd.id], at(2))

    assert odd.id in str(info.value)
    assert await snapshot(store) == before
    assert (await store.get(failed.id)).state is JobState.FAILED


async def test_retry_failed_with_an_unknown_id_changes_nothing(store: Store) -> None:
    failed = await failed_job(store)
    before = await snapshot(store)
    with pytest.raises(JobNotFound):
        await store.retry_failed([failed.id, "no-such-job"], at(2))
    assert await snapshot(store) == before


async def test_retry_failed_with_a_repeated_id_retries_once(store: Store, known_bug: Any) -> None:
    failed = await failed_job(store)
    mark = await last_event_id(store)
    retried = await store.retry_failed([failed.id, failed.id], at(2))
    assert [j.id for j in retried] == [failed.id]
    assert len(await events_since(store, mark)) == 1


async def test_a_failed_job_holds_its_key_through_a_retry_from_the_dlq(store: Store) -> None:
    failed = await failed_job(store, idempotency_key="k")
    (repeat,) = await store.enqueue_many([new(idempotency_key="k")], at(1))
    assert (repeat.duplicate, repeat.job.id, repeat.job.state) == (True, failed.id, JobState.FAILED)

    (retried,) = await store.retry_failed([failed.id], at(2))
    assert (retried.state, retried.idempotency_key) == (JobState.PENDING, "k")
    (repeat,) = await store.enqueue_many([new(idempotency_key="k")], at(3))
    assert (repeat.duplicate, repeat.job.id, repeat.job.state) == (
        True,
        failed.id,
        JobState.PENDING,
    )
    page = await store.list_jobs(JobQuery())
    assert [j.id for j in page.jobs if j.idempotency_key == "k"] == [failed.id]


async def test_retry_failed_of_jobs_with_keys_retries_them_all(store: Store) -> None:
    a = await failed_job(store, "a", idempotency_key="ka")
    b = await failed_job(store, "b", idempotency_key="kb")
    retried = await store.retry_failed([a.id, b.id], at(2))
    assert [(j.id, j.state) for j in retried] == [
        (a.id, JobState.PENDING),
        (b.id, JobState.PENDING),
    ]


# -- purge ---------------------------------------------------------------------------------


async def test_purge_failed_by_ids(store: Store) -> None:
    a = await failed_job(store, "a")
    b = await failed_job(store, "b")
    keep = await submit_one(store, "keep")

    assert await store.purge_failed([a.id, a.id], at(5)) == 1

    with pytest.raises(JobNotFound):
        await store.get(a.id)
    with pytest.raises(JobNotFound):
        await store.executions(a.id)
    assert (await store.get(b.id)).state is JobState.FAILED
    assert (await store.get(keep.id)).state is JobState.PENDING


async def test_purge_all_failed(store: Store) -> None:
    for t in ("a", "b", "c"):
        await failed_job(store, t)
    done = await submit_one(store, "done")
    await run_to(store, done, Action.COMPLETE)
    pending = await submit_one(store, "pending")

    assert await store.purge_failed(None, at(5)) == 3

    counts = await store.count_by_state()
    assert counts[JobState.FAILED] == 0
    assert counts[JobState.COMPLETED] == 1
    assert (await store.get(pending.id)).state is JobState.PENDING
    assert await store.purge_failed(None, at(6)) == 0


async def test_purge_of_a_non_failed_job_changes_nothing(store: Store) -> None:
    failed = await failed_job(store, "f")
    pending = await submit_one(store, "p")
    before = await snapshot(store)
    with pytest.raises(InvalidTransition):
        await store.purge_failed([failed.id, pending.id], at(5))
    assert await snapshot(store) == before


async def test_purge_of_an_unknown_job_changes_nothing(store: Store) -> None:
    failed = await failed_job(store)
    before = await snapshot(store)
    with pytest.raises(JobNotFound):
        await store.purge_failed([failed.id, "no-such-job"], at(5))
    assert await snapshot(store) == before


# -- prune ---------------------------------------------------------------------------------


async def test_prune_deletes_only_old_completed_and_cancelled_jobs(store: Store) -> None:
    completed = await submit_one(store, "completed")
    await run_to(store, completed, Action.COMPLETE, now=at(10))
    cancelled = await submit_one(store, "cancelled")
    await store.cancel(cancelled.id, at(20))
    failed = await failed_job(store, "failed")  # at BASE: old, but the DLQ is kept
    pending = await submit_one(store, "pending")  # created at BASE
    running = await submit_one(store, "running")
    await lease(store, job_types=("running",))
    parent = await submit_one(store, "parent", run_at=at(999))
    blocked = await submit_one(store, "blocked", depends_on=[parent.id])

    assert await store.prune(at(15)) == 1
    with pytest.raises(JobNotFound):
        await store.get(completed.id)
    with pytest.raises(JobNotFound):
        await store.executions(completed.id)
    assert (await store.get(cancelled.id)).state is JobState.CANCELLED

    assert await store.prune(at(1000)) == 1
    with pytest.raises(JobNotFound):
        await store.get(cancelled.id)
    for job, state in [
        (failed, JobState.FAILED),
        (pending, JobState.PENDING),
        (running, JobState.RUNNING),
        (blocked, JobState.BLOCKED),
    ]:
        assert (await store.get(job.id)).state is state


async def test_prune_cutoff_is_exclusive(store: Store) -> None:
    job = await submit_one(store)
    await run_to(store, job, Action.COMPLETE, now=at(10))
    assert await store.prune(at(10)) == 0
    assert await store.prune(at(10.5)) == 1


async def test_event_ids_keep_increasing_after_prune(store: Store) -> None:
    jobs = await submit(store, new(), new())
    for job in jobs:
        await store.cancel(job.id, at(1))
    last = await last_event_id(store)
    assert await store.prune(at(100)) == 2
    await submit_one(store, now=at(101))
    events = await all_events(store)
    assert events
    assert events[-1].id > last


async def test_prune_nothing(store: Store) -> None:
    await submit_one(store)
    assert await store.prune(BASE) == 0
    assert (await store.count_by_state())[JobState.PENDING] == 1


@pytest.mark.parametrize("action", [Action.RETRY, Action.RELEASE])
async def test_cancel_requested_job_handed_back_by_its_worker_does_not_run_again(
    store: Store, known_bug: Any, action: Action
) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    await store.cancel(job.id, at(1))
    assert await finish(store, got, action, now=at(2), error="interrupted")
    assert await lease(store, now=at(100)) == []
    assert (await store.get(job.id)).state is JobState.CANCELLED
