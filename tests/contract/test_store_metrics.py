"""Contract: queue_stats (the fleet gauges' one query) and pool_stats."""

from __future__ import annotations

from storekit import at, lease, new, submit, submit_one

from conveyor.domain.job import Finish
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


def by_key(stats: list) -> dict[tuple[str, JobState], tuple[int, object]]:
    return {(s.queue, s.state): (s.count, s.oldest_due) for s in stats}


async def test_queue_stats_of_an_empty_store_is_empty(store: Store) -> None:
    assert await store.queue_stats(at(0)) == []


async def test_queue_stats_counts_unfinished_and_dead_lettered_jobs_by_queue(store: Store) -> None:
    # Two due jobs in "a" (the older one at t=1), one scheduled for later in "a",
    # one due in "b"; then one of "b" runs, one of "a" is dead-lettered.
    await submit(store, new("t", queue="a"), now=at(1))
    await submit(store, new("t", queue="a"), now=at(2))
    await submit(store, new("t", queue="a", run_at=at(500)), now=at(3))
    await submit(store, new("t", queue="b"), now=at(4))
    parent = await submit_one(store, "t", queue="c", now=at(5))
    await submit(store, new("t", queue="c", depends_on=(parent.id,)), now=at(5))
    done = await submit_one(store, "t", queue="d", now=at(6))

    (running,) = await lease(store, "w1", now=at(10), limit=1, queues=("b",))
    assert running.queue == "b"
    await finish_in(store, "a", Action.FAIL)
    assert await finish_in(store, "d", Action.COMPLETE) == done.id

    stats = by_key(await store.queue_stats(at(30)))
    assert stats[("a", JobState.PENDING)][0] == 2  # one due, one scheduled for later
    assert stats[("a", JobState.FAILED)][0] == 1
    assert stats[("b", JobState.RUNNING)][0] == 1
    assert ("b", JobState.PENDING) not in stats
    assert stats[("c", JobState.PENDING)][0] == 1
    assert stats[("c", JobState.BLOCKED)][0] == 1
    # Finished jobs are not counted: queue "d" has only a completed job.
    assert not any(q == "d" for q, _ in stats)
    # The oldest *due* pending job of "a" is the one submitted at t=2 (t=1's was
    # dead-lettered); the one due at t=500 is not due yet.
    assert stats[("a", JobState.PENDING)][1] == at(2)
    assert stats[("c", JobState.PENDING)][1] == at(5)
    # Non-pending rows carry no age.
    assert stats[("a", JobState.FAILED)][1] is None
    # Before anything of "a" is due, it has pending jobs but no due one.
    early = by_key(await store.queue_stats(at(0.5)))
    assert early[("a", JobState.PENDING)] == (2, None)


async def finish_in(store: Store, queue: str, action: Action) -> str:
    """Lease the first ready job of ``queue`` and finish it with ``action``."""
    (job,) = await lease(store, "w2", now=at(11), limit=1, queues=(queue,))
    assert job.lease_token is not None
    (ok,) = await store.finish_many([Finish(job.id, job.lease_token, action, error="e")], at(12))
    assert ok
    return job.id


async def test_pool_stats_is_in_use_and_size_or_none(store: Store) -> None:
    stats = store.pool_stats()
    if stats is None:  # memory and SQLite: no connection pool
        return
    in_use, size = stats
    assert 0 <= in_use <= size
    assert size >= 1
