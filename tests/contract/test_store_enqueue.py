"""Contract: enqueue_many, validation, idempotency keys and dependencies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from storekit import (
    BASE,
    all_events,
    at,
    finish,
    lease,
    lease_one,
    new,
    run_to,
    snapshot,
    submit,
    submit_one,
)

from conveyor.domain.errors import ValidationError
from conveyor.domain.job import JobQuery, NewJob
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store

# -- enqueue_many ----------------------------------------------------------------------


async def test_enqueue_stores_every_field_and_returns_pending_jobs(store: Store) -> None:
    job = NewJob(
        "send_email",
        payload={"to": "a@b.c", "n": 3, "tags": ["x", "y"], "nested": {"ok": True, "f": 1.5}},
        queue="mail",
        priority=70,
        max_retries=5,
        timeout_ms=1234,
        metadata={"trace": "abc"},
        created_by="alice",
        workflow_id="wf-1",
    )
    (result,) = await store.enqueue_many([job], at(5))

    assert result.duplicate is False
    got = await store.get(result.job.id)
    for j in (result.job, got):
        assert j.state is JobState.PENDING
        assert j.status == "pending"
        assert j.job_type == "send_email"
        assert j.payload == {
            "to": "a@b.c",
            "n": 3,
            "tags": ["x", "y"],
            "nested": {"ok": True, "f": 1.5},
        }
        assert j.queue == "mail"
        assert j.priority == 70
        assert j.max_retries == 5
        assert j.timeout_ms == 1234
        assert j.metadata == {"trace": "abc"}
        assert j.created_by == "alice"
        assert j.workflow_id == "wf-1"
        assert j.attempt == 0
        assert j.lost_count == 0
        assert j.lease_token is None
        assert j.worker_id is None
        assert j.result is None
        assert j.error is None
        assert j.run_at == at(5)  # no run_at: ready at once
        assert j.created_at == at(5)
        assert j.completed_at is None


async def test_enqueue_defaults(store: Store) -> None:
    job = await submit_one(store, "plain")
    assert (job.queue, job.priority, job.max_retries, job.timeout_ms) == ("default", 50, 3, 300_000)
    assert job.payload == {}
    assert job.metadata == {}
    assert job.depends_on == []


async def test_enqueue_batch_keeps_order_and_gives_unique_ids(store: Store) -> None:
    jobs = await submit(store, *(new(f"t{i}", payload={"i": i}) for i in range(20)))
    assert [j.job_type for j in jobs] == [f"t{i}" for i in range(20)]
    assert len({j.id for j in jobs}) == 20
    for j in jobs:
        assert (await store.get(j.id)).payload == {"i": int(j.job_type[1:])}
    assert (await store.count_by_state())[JobState.PENDING] == 20


async def test_enqueue_empty_batch_writes_nothing(store: Store) -> None:
    assert await store.enqueue_many([], BASE) == []
    assert await all_events(store) == []


async def test_one_bad_job_rejects_the_whole_batch_with_every_problem(store: Store) -> None:
    before = await snapshot(store)
    batch = [
        new("good"),
        new("bad", priority=101),
        new("", max_retries=-1),
        new("good2"),
    ]
    with pytest.raises(ValidationError) as info:
        await store.enqueue_many(batch, BASE)

    fields = [d.field for d in info.value.details]
    assert fields == ["jobs[1].priority", "jobs[2].job_type", "jobs[2].max_retries"]
    assert "jobs[1].priority must be an integer from 0 to 100" in str(info.value)
    assert await snapshot(store) == before


async def test_validation_details_of_a_single_job_have_no_batch_prefix(store: Store) -> None:
    with pytest.raises(ValidationError) as info:
        await store.enqueue_many([new("x", queue="bad queue!", timeout_ms=0)], BASE)
    assert [d.field for d in info.value.details] == ["queue", "timeout_ms"]
    assert all(d.message for d in info.value.details)
    assert (await store.count_by_state())[JobState.PENDING] == 0


async def test_naive_run_at_is_rejected(store: Store) -> None:
    naive = datetime(2026, 1, 1)  # noqa: DTZ001 - the invalid input under test
    with pytest.raises(ValidationError) as info:
        await store.enqueue_many([new("x", run_at=naive)], BASE)
    assert [d.field for d in info.value.details] == ["run_at"]
    assert await all_events(store) == []


UNSERIALISABLE: list[Any] = [
    pytest.param({"obj": object()}, id="object"),
    pytest.param({"s": {1, 2}}, id="set"),
    pytest.param({"big": 2**70}, id="int-over-64-bits"),
    pytest.param({"nested": {1: "non-str key"}}, id="non-str-key"),
]


@pytest.mark.parametrize("payload", UNSERIALISABLE)
async def test_json_unserialisable_payload_is_a_validation_error_and_writes_nothing(
    store: Store, known_bug: Any, payload: dict[str, Any]
) -> None:
    before = await snapshot(store)
    with pytest.raises(ValidationError) as info:
        await store.enqueue_many([new("ok"), new("bad", payload=payload)], BASE)
    assert info.value.details
    assert await snapshot(store) == before


async def test_json_unserialisable_metadata_is_a_validation_error(
    store: Store, known_bug: Any
) -> None:
    with pytest.raises(ValidationError):
        await store.enqueue_many([new("bad", metadata={"when": object()})], BASE)
    assert await all_events(store) == []


async def test_payload_comes_back_as_json(store: Store, known_bug: Any) -> None:
    job = await submit_one(store, payload={"pair": (1, 2)})
    assert (await store.get(job.id)).payload == {"pair": [1, 2]}


# -- idempotency -----------------------------------------------------------------------


async def test_second_submit_with_same_key_returns_first_job_flagged_duplicate(
    store: Store,
) -> None:
    (first,) = await store.enqueue_many([new("a", idempotency_key="k1", payload={"v": 1})], at(0))
    (second,) = await store.enqueue_many([new("a", idempotency_key="k1", payload={"v": 2})], at(1))

    assert first.duplicate is False
    assert second.duplicate is True
    assert second.job.id == first.job.id
    assert second.job.payload == {"v": 1}
    assert (await store.count_by_state())[JobState.PENDING] == 1
    assert [e.type for e in await all_events(store)] == ["job_submitted"]


async def test_same_key_twice_in_one_batch_creates_one_job(store: Store) -> None:
    results = await store.enqueue_many(
        [new("a", idempotency_key="k"), new("b"), new("a", idempotency_key="k")], BASE
    )
    assert [r.duplicate for r in results] == [False, False, True]
    assert results[2].job.id == results[0].job.id
    assert (await store.count_by_state())[JobState.PENDING] == 2
    assert [e.job_id for e in await all_events(store)] == [results[0].job.id, results[1].job.id]


async def test_duplicate_of_a_running_job_is_still_a_duplicate(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    await lease_one(store)
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(1))
    assert again.duplicate is True
    assert again.job.id == first.id
    assert again.job.state is JobState.RUNNING


async def test_duplicate_of_a_blocked_job_is_still_a_duplicate(store: Store) -> None:
    parent = await submit_one(store, "parent")
    first = await submit_one(store, idempotency_key="k", depends_on=[parent.id])
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(1))
    assert again.duplicate is True
    assert again.job.id == first.id


@pytest.mark.parametrize("action", [Action.COMPLETE, Action.FAIL, Action.CONFIRM_CANCEL])
async def test_a_finished_job_keeps_its_key(store: Store, action: Action) -> None:
    # A client that retries its POST after the first job finished gets that job
    # back, not a second run.
    first = await submit_one(store, idempotency_key="k")
    done = await run_to(store, first, action)
    assert done.state.is_terminal
    events = len(await all_events(store))

    (again,) = await store.enqueue_many([new(idempotency_key="k", payload={"v": 2})], at(10))
    assert again.duplicate is True
    assert again.job.id == first.id
    assert again.job.state is done.state
    assert again.job.payload == first.payload
    assert (await store.count_by_state())[JobState.PENDING] == 0
    assert len(await all_events(store)) == events  # a duplicate writes nothing


async def test_a_completed_job_returns_its_result_to_a_repeated_submit(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    leased = await lease_one(store, now=at(1))
    assert await finish(store, leased, Action.COMPLETE, now=at(2), result={"charged": 1})
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(3))
    assert (again.duplicate, again.job.id) == (True, first.id)
    assert again.job.result == {"charged": 1}


async def test_a_cancelled_pending_job_keeps_its_key(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    await store.cancel(first.id, at(1))
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(2))
    assert again.duplicate is True
    assert again.job.id == first.id
    assert again.job.state is JobState.CANCELLED


async def test_a_finished_job_in_the_same_batch_as_its_repeat(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    await run_to(store, first, Action.COMPLETE)
    results = await store.enqueue_many(
        [new("b"), new(idempotency_key="k"), new("c", idempotency_key="k2")], at(5)
    )
    assert [r.duplicate for r in results] == [False, True, False]
    assert results[1].job.id == first.id
    assert results[1].job.state is JobState.COMPLETED


async def test_a_job_cancelled_at_birth_holds_its_key(store: Store) -> None:
    parent = await submit_one(store, "parent")
    await run_to(store, parent, Action.FAIL)
    (child,) = await store.enqueue_many(
        [new("child", idempotency_key="k", depends_on=[parent.id])], at(1)
    )
    assert child.duplicate is False
    assert child.job.state is JobState.CANCELLED
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(2))
    assert (again.duplicate, again.job.id) == (True, child.job.id)


async def test_a_job_cancelled_at_birth_is_a_duplicate_of_a_finished_holder(
    store: Store,
) -> None:
    first = await submit_one(store, idempotency_key="k")
    await run_to(store, first, Action.COMPLETE)
    parent = await submit_one(store, "parent", now=at(1))
    await run_to(store, parent, Action.FAIL, now=at(1))
    (child,) = await store.enqueue_many(
        [new("child", idempotency_key="k", depends_on=[parent.id])], at(2)
    )
    assert (child.duplicate, child.job.id) == (True, first.id)


async def test_the_key_is_free_again_once_its_job_is_pruned(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    await run_to(store, first, Action.COMPLETE, now=at(1))
    assert await store.prune(at(100)) == 1
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(101))
    assert again.duplicate is False
    assert again.job.id != first.id
    assert again.job.state is JobState.PENDING


async def test_the_key_is_free_again_once_its_failed_job_is_purged(store: Store) -> None:
    first = await submit_one(store, idempotency_key="k")
    await run_to(store, first, Action.FAIL, now=at(1))
    assert await store.purge_failed([first.id], at(2)) == 1
    (again,) = await store.enqueue_many([new(idempotency_key="k")], at(3))
    assert again.duplicate is False
    assert again.job.id != first.id


async def test_different_keys_are_different_jobs(store: Store) -> None:
    results = await store.enqueue_many([new(idempotency_key="k1"), new(idempotency_key="k2")], BASE)
    assert [r.duplicate for r in results] == [False, False]
    assert results[0].job.id != results[1].job.id


# -- dependencies ----------------------------------------------------------------------


async def test_child_is_blocked_until_every_parent_completes(store: Store) -> None:
    p1, p2 = await submit(store, new("p1"), new("p2"))
    child = await submit_one(store, "child", depends_on=[p1.id, p2.id], now=at(1))
    assert child.state is JobState.BLOCKED
    assert sorted((await store.get(child.id)).depends_on) == sorted([p1.id, p2.id])

    leased = {j.id: j for j in await lease(store, now=at(2))}
    assert set(leased) == {p1.id, p2.id}  # the blocked child is never fetched

    assert await finish(store, leased[p1.id], Action.COMPLETE, now=at(3))
    assert (await store.get(child.id)).state is JobState.BLOCKED
    assert await lease(store, now=at(3)) == []

    assert await finish(store, leased[p2.id], Action.COMPLETE, now=at(4))
    unblocked = await store.get(child.id)
    assert unblocked.state is JobState.PENDING
    assert unblocked.run_at == at(4)
    (got,) = await lease(store, now=at(4))
    assert got.id == child.id


async def test_a_retried_parent_keeps_its_child_blocked(store: Store) -> None:
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    leased = await lease_one(store)
    assert await finish(store, leased, Action.RETRY, now=at(1), error="e", retry_at=at(5))
    assert (await store.get(child.id)).state is JobState.BLOCKED


async def test_child_of_completed_parent_is_pending_at_once(store: Store) -> None:
    parent = await submit_one(store, "parent")
    await run_to(store, parent, Action.COMPLETE)
    child = await submit_one(store, "child", depends_on=[parent.id], now=at(1))
    assert child.state is JobState.PENDING
    assert (await store.get(child.id)).state is JobState.PENDING


@pytest.mark.parametrize("action", [Action.FAIL, Action.CONFIRM_CANCEL])
async def test_child_of_failed_or_cancelled_parent_is_cancelled_at_submit(
    store: Store, action: Action
) -> None:
    parent = await submit_one(store, "parent")
    await run_to(store, parent, action)
    child = await submit_one(store, "child", depends_on=[parent.id], now=at(1))
    assert child.state is JobState.CANCELLED
    got = await store.get(child.id)
    assert got.state is JobState.CANCELLED
    assert got.error
    assert got.completed_at == at(1)


async def test_dead_lettered_parent_cancels_children_and_grandchildren(store: Store) -> None:
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    grandchild = await submit_one(store, "grandchild", depends_on=[child.id])
    sibling = await submit_one(store, "unrelated")

    leased = await lease(store, now=at(1), job_types=("parent",))
    assert await finish(store, leased[0], Action.FAIL, now=at(2), error="boom")

    for job in (child, grandchild):
        got = await store.get(job.id)
        assert got.state is JobState.CANCELLED
        assert got.error
        assert got.completed_at == at(2)
    assert (await store.get(sibling.id)).state is JobState.PENDING
    cancelled = [e.job_id for e in await all_events(store) if e.type == "job_cancelled"]
    assert sorted(cancelled) == sorted([child.id, grandchild.id])


async def test_cancelled_parent_cancels_children_and_grandchildren(store: Store) -> None:
    parent = await submit_one(store, "parent", run_at=at(100))
    child = await submit_one(store, "child", depends_on=[parent.id])
    grandchild = await submit_one(store, "grandchild", depends_on=[child.id])

    await store.cancel(parent.id, at(1))

    for job in (parent, child, grandchild):
        got = await store.get(job.id)
        assert got.state is JobState.CANCELLED
        assert got.completed_at == at(1)


async def test_one_failed_parent_of_two_cancels_the_child(store: Store) -> None:
    ok_parent = await submit_one(store, "ok", run_at=at(100))
    bad_parent = await submit_one(store, "bad")
    child = await submit_one(store, "child", depends_on=[ok_parent.id, bad_parent.id])
    await run_to(store, bad_parent, Action.FAIL, now=at(1))
    assert (await store.get(child.id)).state is JobState.CANCELLED
    assert (await store.get(ok_parent.id)).state is JobState.PENDING


async def test_cascade_cancel_error_matches_submit_time_error(store: Store, known_bug: Any) -> None:
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    await run_to(store, parent, Action.FAIL)
    late_child = await submit_one(store, "late", depends_on=[parent.id], now=at(1))
    cascaded = await store.get(child.id)
    assert cascaded.error == late_child.error == "a parent job failed or was cancelled"


async def test_unknown_parent_is_a_validation_error_and_writes_nothing(store: Store) -> None:
    parent = await submit_one(store, "parent")
    before = await snapshot(store)
    with pytest.raises(ValidationError) as info:
        await store.enqueue_many(
            [new("ok"), new("child", depends_on=[parent.id, "no-such-job"])], at(1)
        )
    assert [d.field for d in info.value.details] == ["depends_on"]
    assert "no-such-job" in str(info.value)
    assert await snapshot(store) == before


async def test_blocked_children_are_listed_as_blocked(store: Store) -> None:
    parent = await submit_one(store, "parent")
    await submit(store, *(new("child", depends_on=[parent.id]) for _ in range(3)))
    page = await store.list_jobs(JobQuery(states=(JobState.BLOCKED,)))
    assert page.total == 3
    assert (await store.count_by_state())[JobState.BLOCKED] == 3
