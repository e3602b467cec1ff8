"""Contract: fetch order, delays, filters, limits, attempts and execution rows."""

from __future__ import annotations

from typing import Any

import pytest
from storekit import BASE, at, finish, lease, lease_one, new, register, submit, submit_one

from conveyor.domain.errors import ValidationError
from conveyor.domain.job import NewJob
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


async def test_higher_priority_is_fetched_first(store: Store) -> None:
    await submit(store, *(new(f"p{p}", priority=p) for p in (10, 90, 50, 0, 100)))
    got = await lease(store, limit=10)
    assert [j.priority for j in got] == [100, 90, 50, 10, 0]


async def test_priority_beats_age(store: Store) -> None:
    old = await submit_one(store, "old", priority=10, now=at(0))
    young = await submit_one(store, "young", priority=20, now=at(60))
    assert [j.id for j in await lease(store, now=at(61), limit=1)] == [young.id]
    assert [j.id for j in await lease(store, now=at(61), limit=1)] == [old.id]


async def test_fifo_within_a_priority_in_one_batch(store: Store) -> None:
    jobs = await submit(store, *(new("t", payload={"i": i}) for i in range(8)))
    got = [(await lease_one(store)).id for _ in range(8)]
    assert got == [j.id for j in jobs]


async def test_fifo_within_a_priority_across_batches_at_the_same_instant(store: Store) -> None:
    ids = [(await submit_one(store, "t", payload={"i": i})).id for i in range(6)]
    got = await lease(store, limit=10)
    assert [j.id for j in got] == ids


async def test_order_is_priority_then_fifo(store: Store) -> None:
    spec = [("a", 10), ("b", 50), ("c", 10), ("d", 50), ("e", 90), ("f", 10)]
    await submit(store, *(new(name, priority=p) for name, p in spec))
    assert [j.job_type for j in await lease(store, limit=10)] == ["e", "b", "d", "a", "c", "f"]


async def test_delayed_job_is_not_fetched_before_run_at(store: Store) -> None:
    job = await submit_one(store, run_at=at(30))
    assert job.state is JobState.PENDING
    assert job.run_at == at(30)
    assert await lease(store, now=at(29)) == []
    assert await lease(store, now=at(29.999)) == []
    (got,) = await lease(store, now=at(30))  # due exactly at run_at
    assert got.id == job.id


async def test_run_at_in_the_past_is_ready_at_once(store: Store) -> None:
    job = await submit_one(store, run_at=at(-3600), now=at(0))
    (got,) = await lease(store, now=at(0))
    assert got.id == job.id


async def test_a_delayed_job_does_not_hold_back_ready_ones(store: Store) -> None:
    await submit_one(store, "later", priority=100, run_at=at(60))
    ready = await submit_one(store, "now", priority=0)
    assert [j.id for j in await lease(store, now=at(1))] == [ready.id]


async def test_queue_filter(store: Store) -> None:
    await submit(store, new("a", queue="q1"), new("b", queue="q2"), new("c", queue="q3"))
    got = await lease(store, queues=("q1", "q3"))
    assert sorted(j.job_type for j in got) == ["a", "c"]
    assert await lease(store, queues=("nope",)) == []
    assert [j.job_type for j in await lease(store, queues=())] == ["b"]  # () means any


async def test_job_type_filter(store: Store) -> None:
    await submit(store, new("a"), new("b"), new("c"), new("a"))
    got = await lease(store, job_types=("a",))
    assert [j.job_type for j in got] == ["a", "a"]
    assert await lease(store, job_types=("zzz",)) == []
    assert sorted(j.job_type for j in await lease(store, job_types=())) == ["b", "c"]


async def test_queue_and_job_type_filters_combine(store: Store) -> None:
    await submit(
        store,
        new("a", queue="q1"),
        new("b", queue="q1"),
        new("a", queue="q2"),
    )
    got = await lease(store, queues=("q1",), job_types=("a",))
    assert [(j.queue, j.job_type) for j in got] == [("q1", "a")]


async def test_fetch_limit(store: Store) -> None:
    await submit(store, *(new() for _ in range(5)))
    assert len(await lease(store, limit=2)) == 2
    assert len(await lease(store, limit=2)) == 2
    assert len(await lease(store, limit=2)) == 1
    assert await lease(store, limit=2) == []


async def test_fetch_limit_zero_fetches_nothing(store: Store) -> None:
    await submit_one(store)
    assert await lease(store, limit=0) == []
    assert (await store.count_by_state())[JobState.PENDING] == 1


async def test_fetch_leases_the_job(store: Store) -> None:
    await register(store, "w1")
    job = await submit_one(store, now=at(0))
    (got,) = await lease(store, "w1", now=at(7))
    stored = await store.get(job.id)
    for j in (got, stored):
        assert j.id == job.id
        assert j.state is JobState.RUNNING
        assert j.status == "running"
        assert j.attempt == 1
        assert j.lease_token
        assert j.worker_id == "w1"
        assert j.started_at == at(7)
        assert j.updated_at == at(7)
    assert got.lease_token == stored.lease_token
    (execution,) = await store.executions(job.id)
    assert (execution.job_id, execution.attempt, execution.worker_id) == (job.id, 1, "w1")
    assert execution.started_at == at(7)
    assert (execution.finished_at, execution.outcome, execution.error) == (None, None, None)


async def test_a_leased_job_is_not_fetched_again(store: Store) -> None:
    await submit_one(store)
    assert len(await lease(store, "w1")) == 1
    assert await lease(store, "w2") == []


async def test_every_fetch_increments_attempt_with_a_new_token_and_execution(
    store: Store,
) -> None:
    job = await submit_one(store, max_retries=5)
    tokens = []
    for n in range(1, 4):
        got = await lease_one(store, now=at(n * 10))
        assert got.attempt == n
        tokens.append(got.lease_token)
        assert await finish(store, got, Action.RETRY, now=at(n * 10 + 1), error=f"e{n}")
    assert len(set(tokens)) == 3
    runs = await store.executions(job.id)
    assert [r.attempt for r in runs] == [1, 2, 3]
    assert [r.started_at for r in runs] == [at(10), at(20), at(30)]
    assert [r.outcome for r in runs] == ["retry"] * 3
    assert [r.error for r in runs] == ["e1", "e2", "e3"]


async def test_batch_fetch_gives_each_job_an_execution(store: Store) -> None:
    jobs = await submit(store, *(new() for _ in range(3)))
    got = await lease(store, "w9", now=at(2))
    assert {j.id for j in got} == {j.id for j in jobs}
    for j in jobs:
        (run,) = await store.executions(j.id)
        assert (run.attempt, run.worker_id, run.started_at) == (1, "w9", at(2))


async def test_fetch_of_nothing_writes_nothing(store: Store) -> None:
    assert await lease(store) == []
    assert await store.events_after(0, 100) == []


@pytest.mark.parametrize("state_job", ["blocked", "cancelled", "completed"])
async def test_only_pending_jobs_are_fetched(store: Store, state_job: str) -> None:
    parent = await submit_one(store, "parent", run_at=at(100))
    if state_job == "blocked":
        await store.enqueue_many([NewJob("child", depends_on=[parent.id])], BASE)
    elif state_job == "cancelled":
        await store.cancel((await submit_one(store, "x")).id, BASE)
    else:
        await submit_one(store, "x")
        got = await lease_one(store)
        assert await finish(store, got, Action.COMPLETE)
    assert await lease(store, now=at(50)) == []


async def test_negative_fetch_limit_is_refused(store: Store, known_bug: Any) -> None:
    await submit(store, new(), new(), new())
    with pytest.raises(ValidationError):
        await lease(store, limit=-1)
    assert (await store.count_by_state())[JobState.PENDING] == 3
