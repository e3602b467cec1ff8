"""Contract: flow control in the fetch (docs/flow_control.md) on every backend.

Concurrency limits per key hold across concurrent fetchers, rate limits per fixed
window, keys are served round-robin, paused queues are not fetched from, and a
job's requirements route it to workers that offer them.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from storekit import at, finish, lease, new, submit, worker_info

from conveyor.domain.errors import ValidationError
from conveyor.domain.flow import FlowLimits, KeyTemplate, RateLimit
from conveyor.domain.job import Job
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


def limits(job_type: str = "task", **fields: object) -> FlowLimits:
    return FlowLimits(job_type, **fields)  # type: ignore[arg-type]


async def running_by_key(store: Store) -> Counter[str | None]:
    from conveyor.domain.job import JobQuery

    page = await store.list_jobs(JobQuery(states=(JobState.RUNNING,), limit=1000))
    return Counter(j.concurrency_key for j in page.jobs)


async def test_concurrency_limit_per_key(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=2)], at(0))
    await submit(
        store, *(new("task", concurrency_key=f"t{i % 3}", payload={"i": i}) for i in range(30))
    )
    got = await lease(store, limit=100)
    assert Counter(j.concurrency_key for j in got) == {"t0": 2, "t1": 2, "t2": 2}
    assert await lease(store, limit=100) == []  # every key at its limit
    # One finishes: exactly one more of that key may start.
    done = next(j for j in got if j.concurrency_key == "t1")
    assert await finish(store, done, Action.COMPLETE)
    (more,) = await lease(store, limit=100)
    assert more.concurrency_key == "t1"


async def test_concurrency_limit_without_key_counts_the_whole_type(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=3)], at(0))
    await submit(store, *(new("task") for _ in range(10)), *(new("other") for _ in range(4)))
    got = await lease(store, limit=100)
    assert Counter(j.job_type for j in got) == {"task": 3, "other": 4}


async def test_limit_never_exceeded_by_concurrent_fetchers(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=2)], at(0))
    await submit(
        store, *(new("task", concurrency_key=f"k{i % 5}", payload={"i": i}) for i in range(200))
    )
    running: list[Job] = []
    for _round in range(6):
        batches = await asyncio.gather(*(lease(store, f"w{n}", limit=7) for n in range(4)))
        for b in batches:
            running.extend(b)
        held = await running_by_key(store)
        assert max(held.values()) <= 2, held
        # Finish some, so the next round has room again.
        for job in running[: len(running) // 2]:
            await finish(store, job, Action.COMPLETE)
        running = running[len(running) // 2 :]


async def test_rate_limit_per_fixed_window(store: Store) -> None:
    await store.record_flow_limits(
        [limits(rate_limit=RateLimit(3, 10.0), concurrency_key=KeyTemplate.parse("{t}"))], at(0)
    )
    await submit(store, *(new("task", concurrency_key="a", payload={"i": i}) for i in range(10)))
    first = await lease(store, now=at(0), limit=100)
    assert len(first) == 3
    for job in first:
        await finish(store, job, Action.COMPLETE, now=at(1))
    assert await lease(store, now=at(9.9), limit=100) == []  # same window: used up
    assert len(await lease(store, now=at(10), limit=100)) == 3  # a new window
    assert await lease(store, now=at(15), limit=100) == []


async def test_a_fetch_with_a_stale_clock_never_reopens_a_window(store: Store) -> None:
    # Two workers read their clocks, the later one fetches first (the other waited for
    # the store): the window it counted must not be reset by the earlier clock.
    await store.record_flow_limits(
        [limits(rate_limit=RateLimit(3, 10.0), concurrency_key=KeyTemplate.parse("{t}"))], at(0)
    )
    await submit(store, *(new("task", concurrency_key="a", payload={"i": i}) for i in range(10)))
    assert len(await lease(store, now=at(10.1), limit=100)) == 3  # window [10, 20)
    assert await lease(store, now=at(9.9), limit=100) == []  # window [0, 10): stale
    assert await lease(store, now=at(10.5), limit=100) == []  # still full
    assert len(await lease(store, now=at(20), limit=100)) == 3


async def test_round_robin_with_a_big_backlog_in_one_key(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=1000)], at(0))
    await submit(store, *(new("task", concurrency_key="big", payload={"i": i}) for i in range(300)))
    small = await submit(
        store, *(new("task", concurrency_key="small", payload={"i": i}) for i in range(3))
    )
    got = await lease(store, limit=4)
    # Each key's first jobs before any key's later ones: the small key is not starved.
    assert [j.id for j in got if j.concurrency_key == "small"] == [small[0].id, small[1].id]
    assert Counter(j.concurrency_key for j in got) == {"big": 2, "small": 2}


async def test_keys_take_turns_across_fetches(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=100)], at(0))
    keys = [f"k{i:02d}" for i in range(10)]
    await submit(
        store, *(new("task", concurrency_key=k, payload={"i": i}) for i in range(5) for k in keys)
    )
    seen: list[str | None] = []
    for _ in range(5):
        got = await lease(store, limit=2)
        seen.extend(j.concurrency_key for j in got)
    # Ten fetches of 2 would serve every key once before any twice.
    assert sorted(seen) == keys


async def test_queue_concurrency_limit(store: Store) -> None:
    await store.set_queue("default", at(0), concurrency_limit=2)
    await submit(store, *(new("task", payload={"i": i}) for i in range(5)))
    await submit(store, *(new("task", queue="other", payload={"i": i}) for i in range(3)))
    got = await lease(store, limit=100)
    assert Counter(j.queue for j in got) == {"default": 2, "other": 3}
    await store.set_queue("default", at(1), concurrency_limit=None)
    assert len(await lease(store, limit=100)) == 3


async def test_paused_queue_is_not_fetched_then_is_after_resume(store: Store) -> None:
    await submit(store, *(new("task", payload={"i": i}) for i in range(3)))
    info = await store.set_queue("default", at(0), paused=True)
    assert info.paused
    assert info.pending == 3
    assert await lease(store, limit=10) == []
    queues = {q.name: q for q in await store.list_queues()}
    assert queues["default"].paused
    stats = await store.flow_stats(at(0))
    assert stats.paused == {"default": 3}
    await store.set_queue("default", at(1), paused=False)
    assert len(await lease(store, limit=10)) == 3


async def test_pause_leaves_running_jobs_alone(store: Store) -> None:
    (job,) = await submit(store, new("task"))
    (running,) = await lease(store)
    await store.set_queue("default", at(0), paused=True)
    assert await finish(store, running, Action.COMPLETE)
    assert (await store.get(job.id)).state is JobState.COMPLETED


async def test_requirements_route_jobs_to_capable_workers(store: Store) -> None:
    gpu, plain = await submit(store, new("task", requires={"gpu": "a100"}), new("task"))
    assert (await store.get(gpu.id)).requires == {"gpu": "a100"}
    got = await store.fetch("w1", queues=(), job_types=(), limit=10, now=at(0))
    assert [j.id for j in got] == [plain.id]
    wrong = await store.fetch(
        "w2", queues=(), job_types=(), limit=10, now=at(0), capabilities={"gpu": "t4"}
    )
    assert wrong == []
    (right,) = await store.fetch(
        "w3",
        queues=(),
        job_types=(),
        limit=10,
        now=at(0),
        capabilities={"gpu": "a100", "region": "eu"},
    )
    assert right.id == gpu.id


async def test_requirements_with_limits(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=5)], at(0))
    await submit(
        store,
        new("task", concurrency_key="a", requires={"gpu": "a100"}),
        new("task", concurrency_key="a"),
    )
    got = await store.fetch("w1", queues=(), job_types=(), limit=10, now=at(0))
    assert [j.requires for j in got] == [None]


async def test_worker_capabilities_are_recorded(store: Store) -> None:
    await store.register_worker(worker_info("w1", capabilities={"gpu": "a100"}), at(0))
    (w,) = await store.list_workers()
    assert w.capabilities == {"gpu": "a100"}


async def test_flow_limits_round_trip_and_removal(store: Store) -> None:
    lim = limits(
        concurrency_key=KeyTemplate.parse("tenant:{tenant_id}"),
        concurrency_limit=2,
        rate_limit=RateLimit(100, 60.0),
        requires={"gpu": "a100"},
    )
    await store.record_flow_limits([lim], at(0))
    (got,) = await store.list_flow_limits()
    assert (got.concurrency_key, got.concurrency_limit, got.rate_limit, dict(got.requires)) == (
        lim.concurrency_key,
        2,
        RateLimit(100, 60.0),
        {"gpu": "a100"},
    )
    await store.record_flow_limits([limits()], at(1))
    assert await store.list_flow_limits() == []


async def test_flow_stats_count_held_jobs(store: Store) -> None:
    await store.record_flow_limits([limits(concurrency_limit=1)], at(0))
    await submit(store, *(new("task", concurrency_key="a", payload={"i": i}) for i in range(4)))
    await submit(store, new("other", requires={"gpu": "a100"}))
    await lease(store, limit=10)
    stats = await store.flow_stats(at(0))
    assert stats.concurrency == {"task": 3}
    assert list(stats.requirements.values()) == [1]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_limit": True}, "concurrency_limit"),
        ({"paused": "yes"}, "paused"),
    ],
)
async def test_bad_queue_changes_are_refused(store: Store, change: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        await store.set_queue("default", at(0), **change)
    assert err.value.details[0].field == field
    assert await store.list_queues() == []


async def test_bad_queue_name_is_refused(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.set_queue("bad queue\x00", at(0), paused=True)


@pytest.mark.parametrize(
    "requires", [{"gpu": 1}, {"bad key": "x"}, {"gpu": "x" * 101}, "gpu=a100", {"k": "\x00"}]
)
async def test_bad_requirements_are_refused(store: Store, requires: object) -> None:
    with pytest.raises(ValidationError):
        await submit(store, new("task", requires=requires))
    from conveyor.domain.job import JobQuery

    assert (await store.list_jobs(JobQuery())).total == 0


async def test_a_worker_serving_limited_and_unlimited_types(store: Store) -> None:
    await store.record_flow_limits(
        [limits(concurrency_key=KeyTemplate.parse("{t}"), concurrency_limit=1)], at(0)
    )
    await submit(store, *(new("task", concurrency_key="a", payload={"i": i}) for i in range(50)))
    low, high = await submit(store, new("other", priority=10), new("other2", priority=90))
    # Submitted before the template existed: no key, so not limited.
    (old,) = await submit(store, new("task", payload={"old": True}))
    got = await store.fetch(
        "w1", queues=("default",), job_types=("task", "other", "other2"), limit=10, now=at(0)
    )
    assert Counter(j.concurrency_key for j in got if j.job_type == "task") == {"a": 1, None: 1}
    others = [j.id for j in got if j.job_type != "task"]
    assert others == [high.id, low.id]  # priority still orders types without limits
    assert old.id in {j.id for j in got}


async def test_flow_stats_with_and_without_requirements_in_one_queue(store: Store) -> None:
    await submit(store, new("task", requires={"gpu": "a100"}), new("task"), new("task"))
    stats = await store.flow_stats(at(0))
    assert sum(stats.requirements.values()) == 1
    assert stats.held()["paused_queue"] == 0


async def test_rate_windows_long_over_are_pruned(store: Store) -> None:
    from conveyor.domain.flow import MAX_RATE_WINDOW_SECONDS

    keyed = KeyTemplate.parse("{t}")
    await store.record_flow_limits(
        [
            limits(rate_limit=RateLimit(3, 10.0), concurrency_key=keyed),
            limits("other", rate_limit=RateLimit(3, 10.0), concurrency_key=keyed),
        ],
        at(0),
    )
    await submit(
        store,
        *(new("task", concurrency_key=k, payload={"i": i}) for k in "abc" for i in range(4)),
        new("other", concurrency_key="z"),
    )
    first = await lease(store, now=at(0), limit=100)  # windows: task/a, task/b, task/c, other/z
    assert len(first) == 10
    # The rate of "other" is gone: its window is kept as long as the longest rate's.
    await store.record_flow_limits([limits("other")], at(1))
    assert await store.prune_flow_windows(at(80)) == 0  # within 2 windows + 60 s
    assert await store.prune_flow_windows(at(81)) == 3  # task/a, task/b, task/c
    assert len(await lease(store, now=at(81), limit=100)) == 3  # a fresh window each key
    assert await store.prune_flow_windows(at(82)) == 0  # the new windows stay
    far = 2 * MAX_RATE_WINDOW_SECONDS + 61
    assert await store.prune_flow_windows(at(far)) == 4  # other/z and the fresh ones
