"""Contract: finish_many for every action, and fencing by lease token."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from storekit import (
    HEARTBEAT_TIMEOUT,
    all_events,
    at,
    events_since,
    finish,
    last_event_id,
    lease,
    lease_one,
    new,
    register,
    snapshot,
    submit,
    submit_one,
)

from conveyor.domain.errors import InvalidTransition, ValidationError
from conveyor.domain.job import FINISH_ACTIONS, Finish
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import EVENT_RESULT_MAX_BYTES, Store


@pytest.mark.parametrize(
    "result",
    [{"sent": True, "n": [1, 2]}, [1, "two"], "text", 42, None],
    ids=["dict", "list", "str", "int", "none"],
)
async def test_complete_stores_result_and_ends_the_attempt(store: Store, result: Any) -> None:
    job = await submit_one(store)
    got = await lease_one(store, now=at(10))
    mark = await last_event_id(store)

    assert await finish(store, got, Action.COMPLETE, now=at(12.5), result=result)

    done = await store.get(job.id)
    assert done.state is JobState.COMPLETED
    assert done.result == result
    assert done.error is None
    assert done.lease_token is None
    assert done.completed_at == at(12.5)
    assert done.attempt == 1
    (run,) = await store.executions(job.id)
    assert (run.finished_at, run.outcome, run.error) == (at(12.5), "completed", None)
    (event,) = await events_since(store, mark)
    assert (event.type, event.job_id, event.created_at) == ("job_completed", job.id, at(12.5))
    assert event.data["status"] == "completed"
    assert event.data["result"] == result
    assert event.data["duration_ms"] == 2500


async def test_a_large_result_stays_on_the_job_and_its_event_carries_only_its_size(
    store: Store,
) -> None:
    at_limit = {"blob": "x" * (EVENT_RESULT_MAX_BYTES - len('{"blob":""}'))}
    large = {"blob": "y" * (EVENT_RESULT_MAX_BYTES + 1)}
    small_job, large_job = await submit(store, new("small"), new("large"))
    leased = {j.id: j for j in await lease(store, now=at(1), limit=2)}
    mark = await last_event_id(store)

    assert await finish(store, leased[small_job.id], Action.COMPLETE, now=at(2), result=at_limit)
    assert await finish(store, leased[large_job.id], Action.COMPLETE, now=at(2), result=large)

    assert (await store.get(small_job.id)).result == at_limit
    assert (await store.get(large_job.id)).result == large  # the full result, on the job
    small_event, large_event = await events_since(store, mark)
    assert small_event.data["result"] == at_limit
    assert "result_truncated" not in small_event.data
    assert large_event.job_id == large_job.id
    assert large_event.data["result"] is None
    assert large_event.data["result_truncated"] is True
    assert large_event.data["result_size"] == len(orjson.dumps(large))
    assert large_event.data["status"] == "completed"


async def test_complete_clears_the_error_of_an_earlier_attempt(store: Store) -> None:
    job = await submit_one(store)
    assert await finish(store, await lease_one(store), Action.RETRY, now=at(1), error="flaky")
    assert (await store.get(job.id)).error == "flaky"
    assert await finish(store, await lease_one(store, now=at(1)), Action.COMPLETE, now=at(2))
    assert (await store.get(job.id)).error is None


async def test_retry_waits_for_retry_at(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store, now=at(1))
    mark = await last_event_id(store)

    assert await finish(store, got, Action.RETRY, now=at(2), error="timeout", retry_at=at(32))

    waiting = await store.get(job.id)
    assert waiting.state is JobState.PENDING
    assert waiting.error == "timeout"
    assert waiting.run_at == at(32)
    assert waiting.lease_token is None
    assert waiting.completed_at is None
    assert waiting.attempt == 1
    (run,) = await store.executions(job.id)
    assert (run.finished_at, run.outcome, run.error) == (at(2), "retry", "timeout")
    (event,) = await events_since(store, mark)
    assert event.type == "job_retrying"
    assert event.data["status"] == "pending"
    assert event.data["error"] == "timeout"
    assert event.data["run_at"] == at(32).isoformat()

    assert await lease(store, now=at(31)) == []
    again = await lease_one(store, now=at(32))
    assert again.attempt == 2
    assert again.lease_token != got.lease_token


async def test_retry_without_retry_at_is_ready_at_once(store: Store) -> None:
    job = await submit_one(store)
    assert await finish(store, await lease_one(store), Action.RETRY, now=at(5), error="e")
    assert (await store.get(job.id)).run_at == at(5)
    assert (await lease_one(store, now=at(5))).id == job.id


async def test_fail_dead_letters_the_job(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    mark = await last_event_id(store)

    assert await finish(store, got, Action.FAIL, now=at(3), error="Permanent: card declined")

    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error == "Permanent: card declined"
    assert failed.completed_at == at(3)
    assert failed.lease_token is None
    (run,) = await store.executions(job.id)
    assert (run.outcome, run.error) == ("failed", "Permanent: card declined")
    (event,) = await events_since(store, mark)
    assert (event.type, event.data["status"]) == ("job_dead_lettered", "failed")
    assert event.data["error"] == "Permanent: card declined"
    assert await lease(store, now=at(100)) == []


async def test_confirm_cancel_cancels_the_running_job(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    await store.cancel(job.id, at(1))
    mark = await last_event_id(store)

    assert await finish(store, got, Action.CONFIRM_CANCEL, now=at(2))

    cancelled = await store.get(job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.status == "cancelled"
    assert cancelled.error == "cancelled"
    assert cancelled.completed_at == at(2)
    (run,) = await store.executions(job.id)
    assert (run.finished_at, run.outcome) == (at(2), "cancelled")
    (event,) = await events_since(store, mark)
    assert (event.type, event.data["status"]) == ("job_cancelled", "cancelled")


async def test_release_gives_the_attempt_back(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store, now=at(1))
    mark = await last_event_id(store)

    assert await finish(store, got, Action.RELEASE, now=at(4))

    released = await store.get(job.id)
    assert released.state is JobState.PENDING
    assert released.attempt == 0
    assert released.worker_id is None
    assert released.lease_token is None
    assert released.run_at == at(4)
    (event,) = await events_since(store, mark)
    assert event.type == "job_status_changed"
    assert (event.data["status"], event.data["attempt"]) == ("pending", 0)
    assert event.data["reason"] == "worker_shutdown"

    again = await lease_one(store, "w2", now=at(5))
    assert (again.attempt, again.worker_id) == (1, "w2")
    assert [r.attempt for r in await store.executions(job.id)] == [1, 1]


async def test_release_closes_the_execution_row(store: Store, known_bug: Any) -> None:
    job = await submit_one(store)
    await finish(store, await lease_one(store, now=at(1)), Action.RELEASE, now=at(4))
    (run,) = await store.executions(job.id)
    assert (run.attempt, run.finished_at, run.outcome) == (1, at(4), "released")


@pytest.mark.parametrize("action", [Action.FETCH, Action.CANCEL, Action.LOST, Action.DLQ_RETRY])
async def test_finish_with_a_non_finish_action_is_refused(store: Store, action: Action) -> None:
    await submit_one(store)
    got = await lease_one(store)
    before = await snapshot(store)
    assert got.lease_token is not None
    with pytest.raises(InvalidTransition):
        await store.finish_many(
            [
                Finish(got.id, got.lease_token, Action.COMPLETE),
                Finish(got.id, got.lease_token, action),
            ],
            at(1),
        )
    assert await snapshot(store) == before


async def test_unserialisable_result_is_refused_and_changes_nothing(
    store: Store, known_bug: Any
) -> None:
    await submit_one(store)
    got = await lease_one(store)
    before = await snapshot(store)
    with pytest.raises(ValidationError):
        await finish(store, got, Action.COMPLETE, now=at(1), result={"obj": object()})
    assert await snapshot(store) == before


# -- fencing -----------------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(FINISH_ACTIONS))
async def test_finish_with_a_wrong_token_changes_nothing(store: Store, action: Action) -> None:
    job = await submit_one(store)
    await lease_one(store)
    before = await snapshot(store)
    (ok,) = await store.finish_many([Finish(job.id, "not-the-token", action, error="x")], at(1))
    assert ok is False
    assert await snapshot(store) == before


async def test_finish_of_an_unknown_job_is_refused(store: Store) -> None:
    before = await snapshot(store)
    assert await store.finish_many([Finish("nope", "tok", Action.COMPLETE)], at(1)) == [False]
    assert await snapshot(store) == before


async def test_second_finish_of_a_finished_attempt_is_refused(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    assert await finish(store, got, Action.COMPLETE, now=at(1), result="first")
    before = await snapshot(store)
    assert not await finish(store, got, Action.FAIL, now=at(2), error="late")
    assert not await finish(store, got, Action.COMPLETE, now=at(2), result="late")
    assert await snapshot(store) == before
    assert (await store.get(job.id)).result == "first"


async def test_zombie_result_is_rejected_after_rescue_and_refetch(store: Store) -> None:
    await register(store, "zombie", now=at(0))
    job = await submit_one(store)
    old = await lease_one(store, "zombie", now=at(0))
    await register(store, "fresh", now=at(20))
    rescued = await store.rescue(heartbeat_timeout=HEARTBEAT_TIMEOUT, max_lost=3, now=at(20))
    assert [r.job_id for r in rescued] == [job.id]
    new_lease = await lease_one(store, "fresh", now=at(21))
    assert new_lease.lease_token != old.lease_token
    before = await snapshot(store)

    assert not await finish(store, old, Action.COMPLETE, now=at(22), result="zombie")
    assert await snapshot(store) == before
    running = await store.get(job.id)
    assert (running.state, running.worker_id) == (JobState.RUNNING, "fresh")
    assert running.lease_token == new_lease.lease_token

    assert await finish(store, new_lease, Action.COMPLETE, now=at(23), result="fresh")
    done = await store.get(job.id)
    assert (done.state, done.result) == (JobState.COMPLETED, "fresh")
    assert [e.type for e in await all_events(store) if e.type == "job_completed"] == [
        "job_completed"
    ]


async def test_zombie_retry_is_rejected_after_rescue(store: Store) -> None:
    await register(store, "zombie", now=at(0))
    job = await submit_one(store)
    old = await lease_one(store, "zombie", now=at(0))
    await store.rescue(heartbeat_timeout=HEARTBEAT_TIMEOUT, max_lost=3, now=at(20))
    before = await snapshot(store)
    assert not await finish(store, old, Action.RETRY, now=at(21), error="late", retry_at=at(99))
    assert await snapshot(store) == before
    assert (await store.get(job.id)).run_at == at(20)


async def test_two_finishes_of_one_lease_in_one_batch_only_the_first_wins(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    assert got.lease_token is not None
    mark = await last_event_id(store)

    results = await store.finish_many(
        [
            Finish(job.id, got.lease_token, Action.COMPLETE, result="first"),
            Finish(job.id, got.lease_token, Action.FAIL, error="second"),
            Finish(job.id, got.lease_token, Action.COMPLETE, result="third"),
        ],
        at(1),
    )

    assert results == [True, False, False]
    done = await store.get(job.id)
    assert (done.state, done.result, done.error) == (JobState.COMPLETED, "first", None)
    assert [e.type for e in await events_since(store, mark)] == ["job_completed"]
    (run,) = await store.executions(job.id)
    assert run.outcome == "completed"


async def test_mixed_batch_results_line_up_with_the_input(store: Store) -> None:
    a, b, c, d = await submit(store, *(new(t) for t in "abcd"))
    leased = {j.id: j for j in await lease(store, limit=4)}
    la, lb, lc, ld = (leased[j.id] for j in (a, b, c, d))
    assert all(j.lease_token for j in (la, lb, lc, ld))

    results = await store.finish_many(
        [
            Finish(a.id, la.lease_token or "", Action.COMPLETE, result=1),
            Finish(b.id, "stale", Action.COMPLETE, result=2),
            Finish(c.id, lc.lease_token or "", Action.FAIL, error="bad"),
            Finish(d.id, ld.lease_token or "", Action.RETRY, error="again", retry_at=at(9)),
        ],
        at(2),
    )

    assert results == [True, False, True, True]
    states = [(await store.get(j.id)).state for j in (a, b, c, d)]
    assert states == [JobState.COMPLETED, JobState.RUNNING, JobState.FAILED, JobState.PENDING]
