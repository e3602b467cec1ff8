"""Contract: workers, heartbeats and the rescue of jobs whose worker died."""

from __future__ import annotations

from typing import Any

from storekit import (
    HEARTBEAT_TIMEOUT,
    all_events,
    at,
    events_since,
    finish,
    last_event_id,
    lease,
    lease_one,
    register,
    snapshot,
    submit_one,
    worker_info,
)

from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


async def rescue(
    store: Store, now_s: float, max_lost: int = 2
) -> list[tuple[str, str | None, Action]]:
    rescued = await store.rescue(
        heartbeat_timeout=HEARTBEAT_TIMEOUT, max_lost=max_lost, now=at(now_s)
    )
    return [(r.job_id, r.worker_id, r.action) for r in rescued]


async def worker_states(store: Store) -> dict[str, str]:
    return {w.id: w.state for w in await store.list_workers()}


# -- registration and heartbeats -----------------------------------------------------------


async def test_register_worker_is_listed_with_its_details(store: Store) -> None:
    info = worker_info("w1", host="box", pid=99, queues=("q1", "q2"), job_types=("a", "b"))
    await store.register_worker(info, at(3))
    (w,) = await store.list_workers()
    assert (w.id, w.host, w.pid, w.concurrency) == ("w1", "box", 99, 4)
    assert (w.queues, w.job_types) == (("q1", "q2"), ("a", "b"))
    assert (w.started_at, w.heartbeat_at, w.state, w.jobs_running) == (at(3), at(3), "running", 0)
    (event,) = await all_events(store)
    assert (event.type, event.job_id, event.created_at) == ("worker_status_changed", None, at(3))
    assert event.data == {"worker_id": "w1", "status": "running"}


async def test_list_workers_lists_every_worker(store: Store) -> None:
    for i in range(3):
        await register(store, f"w{i}", now=at(i))
    assert [w.id for w in await store.list_workers()] == ["w0", "w1", "w2"]


async def test_heartbeat_refreshes_the_worker(store: Store) -> None:
    await register(store, "w1", now=at(0))
    assert await store.heartbeat("w1", 3, at(5)) == set()
    (w,) = await store.list_workers()
    assert (w.heartbeat_at, w.jobs_running, w.state) == (at(5), 3, "running")


async def test_heartbeat_returns_this_workers_cancel_requested_jobs(store: Store) -> None:
    await register(store, "w1")
    await register(store, "w2")
    a = await submit_one(store, "a")
    b = await submit_one(store, "b")
    c = await submit_one(store, "c")
    await lease(store, "w1", job_types=("a", "b"))
    await lease(store, "w2", job_types=("c",))
    await store.cancel(a.id, at(1))
    await store.cancel(c.id, at(1))

    assert await store.heartbeat("w1", 2, at(2)) == {a.id}
    assert await store.heartbeat("w2", 1, at(2)) == {c.id}
    assert b.id not in await store.heartbeat("w1", 2, at(3))


async def test_heartbeat_stops_returning_a_cancel_once_confirmed(store: Store) -> None:
    await register(store, "w1")
    job = await submit_one(store)
    got = await lease_one(store, "w1")
    await store.cancel(job.id, at(1))
    assert await store.heartbeat("w1", 1, at(2)) == {job.id}
    assert await finish(store, got, Action.CONFIRM_CANCEL, now=at(3))
    assert await store.heartbeat("w1", 0, at(4)) == set()


async def test_heartbeat_of_a_worker_declared_dead_revives_it(store: Store) -> None:
    # Its jobs were rescued already (its late results will be fenced off); the
    # worker itself may go on taking new jobs.
    await register(store, "w1", now=at(0))
    await rescue(store, 20)
    assert (await worker_states(store))["w1"] == "dead"
    assert await store.heartbeat("w1", 0, at(21)) == set()
    assert (await worker_states(store))["w1"] == "running"


async def test_deregister_stops_the_worker(store: Store) -> None:
    await register(store, "w1", now=at(0))
    mark = await last_event_id(store)
    await store.deregister_worker("w1", at(9))
    (w,) = await store.list_workers()
    assert (w.state, w.heartbeat_at, w.jobs_running) == ("stopped", at(9), 0)
    (event,) = await events_since(store, mark)
    assert event.type == "worker_status_changed"
    assert event.data == {"worker_id": "w1", "status": "stopped"}


async def test_deregister_twice_emits_one_event(store: Store, known_bug: Any) -> None:
    await register(store, "w1")
    mark = await last_event_id(store)
    await store.deregister_worker("w1", at(1))
    await store.deregister_worker("w1", at(2))
    assert len(await events_since(store, mark)) == 1


async def test_deregister_of_an_unknown_worker_does_nothing(store: Store) -> None:
    await store.deregister_worker("ghost", at(1))
    assert await store.list_workers() == []
    assert await all_events(store) == []


# -- rescue --------------------------------------------------------------------------------


async def test_stale_worker_is_marked_dead_and_its_jobs_requeued(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1", now=at(1))
    mark = await last_event_id(store)

    assert await rescue(store, 16) == [(job.id, "w1", Action.LOST)]

    assert await worker_states(store) == {"w1": "dead"}
    back = await store.get(job.id)
    assert back.state is JobState.PENDING
    assert back.error == "worker_lost"
    assert back.lost_count == 1
    assert back.lease_token is None
    assert back.run_at == at(16)
    assert back.attempt == 1
    (run,) = await store.executions(job.id)
    assert (run.finished_at, run.outcome, run.error) == (at(16), "lost", "worker_lost")
    events = await events_since(store, mark)
    assert [(e.type, e.job_id) for e in events] == [
        ("worker_status_changed", None),
        ("job_retrying", job.id),
    ]
    assert events[0].data == {"worker_id": "w1", "status": "dead"}
    assert events[1].data["status"] == "pending"
    assert events[1].data["error"] == "worker_lost"

    again = await lease_one(store, "w2", now=at(17))
    assert again.attempt == 2


async def test_heartbeat_exactly_at_the_timeout_is_still_alive(store: Store) -> None:
    await register(store, "w1", now=at(0))
    await submit_one(store)
    await lease_one(store, "w1")
    assert await rescue(store, HEARTBEAT_TIMEOUT) == []
    assert await worker_states(store) == {"w1": "running"}


async def test_a_live_worker_never_loses_its_jobs(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1", now=at(0))
    # The job runs for an hour; the worker keeps heartbeating.
    for t in range(10, 3610, 30):
        await store.heartbeat("w1", 1, at(t))
        if t % 600 == 10:
            before = await snapshot(store)
            assert await rescue(store, t + 5) == []
            assert await snapshot(store) == before
    assert (await store.get(job.id)).state is JobState.RUNNING


async def test_only_the_dead_workers_jobs_are_rescued(store: Store) -> None:
    await register(store, "dead", now=at(0))
    await register(store, "alive", now=at(0))
    a = await submit_one(store, "a")
    b = await submit_one(store, "b")
    await lease(store, "dead", job_types=("a",))
    await lease(store, "alive", job_types=("b",))
    await store.heartbeat("alive", 1, at(10))

    assert await rescue(store, 20) == [(a.id, "dead", Action.LOST)]
    assert (await store.get(b.id)).state is JobState.RUNNING
    assert await worker_states(store) == {"dead": "dead", "alive": "running"}


async def test_second_loss_quarantines_the_job(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1", now=at(0))
    assert await rescue(store, 20, max_lost=2) == [(job.id, "w1", Action.LOST)]

    await register(store, "w2", now=at(20))
    await lease_one(store, "w2", now=at(21))
    mark = await last_event_id(store)
    assert await rescue(store, 40, max_lost=2) == [(job.id, "w2", Action.QUARANTINE)]

    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED
    assert failed.error == "worker_lost"
    assert failed.lost_count == 2
    assert failed.completed_at == at(40)
    assert [(e.type, e.job_id) for e in await events_since(store, mark)] == [
        ("worker_status_changed", None),
        ("job_dead_lettered", job.id),
    ]
    assert [r.outcome for r in await store.executions(job.id)] == ["lost", "lost"]
    assert await lease(store, now=at(41)) == []


async def test_max_lost_one_quarantines_on_the_first_loss(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1")
    assert await rescue(store, 20, max_lost=1) == [(job.id, "w1", Action.QUARANTINE)]
    assert (await store.get(job.id)).state is JobState.FAILED


async def test_loss_on_the_last_attempt_quarantines(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store, max_retries=0)
    await lease_one(store, "w1")
    assert await rescue(store, 20, max_lost=5) == [(job.id, "w1", Action.QUARANTINE)]
    assert (await store.get(job.id)).state is JobState.FAILED


async def test_quarantine_cancels_the_children(store: Store) -> None:
    await register(store, "w1", now=at(0))
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    await lease_one(store, "w1")
    await rescue(store, 20, max_lost=1)
    assert (await store.get(child.id)).state is JobState.CANCELLED


async def test_cancel_requested_job_of_a_dead_worker_is_cancelled(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    child = await submit_one(store, "child", depends_on=[job.id])
    await lease_one(store, "w1")
    await store.cancel(job.id, at(1))
    mark = await last_event_id(store)

    assert await rescue(store, 20) == [(job.id, "w1", Action.CONFIRM_CANCEL)]

    cancelled = await store.get(job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.status == "cancelled"
    assert cancelled.completed_at == at(20)
    assert (await store.get(child.id)).state is JobState.CANCELLED
    types = [(e.type, e.job_id) for e in await events_since(store, mark)]
    assert types[:2] == [("worker_status_changed", None), ("job_cancelled", job.id)]
    assert ("job_cancelled", child.id) in types
    assert await lease(store, now=at(21)) == []


async def test_cancel_requested_job_of_a_dead_worker_reads_cancelled(
    store: Store, known_bug: Any
) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1")
    await store.cancel(job.id, at(1))
    await rescue(store, 20)
    assert (await store.get(job.id)).error == "cancelled"


async def test_a_dead_worker_is_declared_dead_once(store: Store) -> None:
    await register(store, "w1", now=at(0))
    await rescue(store, 20)
    mark = await last_event_id(store)
    assert await rescue(store, 40) == []
    assert await events_since(store, mark) == []


async def test_a_stopped_worker_is_not_declared_dead(store: Store) -> None:
    await register(store, "w1", now=at(0))
    await store.deregister_worker("w1", at(1))
    mark = await last_event_id(store)
    assert await rescue(store, 100) == []
    assert await worker_states(store) == {"w1": "stopped"}
    assert await events_since(store, mark) == []


async def test_running_job_of_a_stopped_worker_is_rescued(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1")
    await store.deregister_worker("w1", at(1))
    assert await rescue(store, 2) == [(job.id, "w1", Action.LOST)]
    assert (await store.get(job.id)).state is JobState.PENDING


async def test_rescue_with_nothing_to_do_writes_nothing(store: Store) -> None:
    await register(store, "w1", now=at(0))
    before = await snapshot(store)
    assert await rescue(store, 5) == []
    assert await snapshot(store) == before


# -- history of lost attempts ----------------------------------------------------------------


async def test_every_attempt_stays_in_the_history_including_lost_ones(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store, max_retries=5)
    await lease_one(store, "w1", now=at(1))
    assert await rescue(store, 20, max_lost=3) == [(job.id, "w1", Action.LOST)]  # w1 died

    await register(store, "w2", now=at(20))
    got = await lease_one(store, "w2", now=at(21))
    assert await finish(store, got, Action.RETRY, now=at(22), error="flaky", retry_at=at(22))

    await register(store, "w3", now=at(22))
    await lease_one(store, "w3", now=at(23))
    await store.heartbeat("w2", 0, at(30))
    assert await rescue(store, 40, max_lost=3) == [(job.id, "w3", Action.LOST)]  # w3 died

    await store.heartbeat("w2", 0, at(40))
    got = await lease_one(store, "w2", now=at(41))
    assert await finish(store, got, Action.COMPLETE, now=at(42), result={"ok": True})

    history = [
        (e.attempt, e.worker_id, e.started_at, e.finished_at, e.outcome, e.error)
        for e in await store.executions(job.id)
    ]
    assert history == [
        (1, "w1", at(1), at(20), "lost", "worker_lost"),
        (2, "w2", at(21), at(22), "retry", "flaky"),
        (3, "w3", at(23), at(40), "lost", "worker_lost"),
        (4, "w2", at(41), at(42), "completed", None),
    ]
    done = await store.get(job.id)
    assert (done.state, done.attempt, done.lost_count) == (JobState.COMPLETED, 4, 2)


async def test_a_lost_attempt_after_a_shutdown_release_is_in_the_history(store: Store) -> None:
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    got = await lease_one(store, "w1", now=at(1))
    assert await finish(store, got, Action.RELEASE, now=at(2))
    await store.deregister_worker("w1", at(2))
    await register(store, "w2", now=at(3))
    await lease_one(store, "w2", now=at(4))
    assert await rescue(store, 30) == [(job.id, "w2", Action.LOST)]
    outcomes = [(e.attempt, e.worker_id, e.outcome) for e in await store.executions(job.id)]
    assert outcomes == [(1, "w1", "released"), (1, "w2", "lost")]


async def test_a_worker_restarted_under_its_id_has_its_old_jobs_rescued(store: Store) -> None:
    # `conveyor worker --worker-id w1` killed with -9 mid-job and started again at
    # once: its heartbeat never lapses, yet the old process's job is gone with it.
    await register(store, "w1", now=at(0))
    job = await submit_one(store)
    await lease_one(store, "w1", now=at(1))
    await store.register_worker(worker_info("w1", pid=5151), at(5))  # the new process

    (w,) = await store.list_workers()
    assert (w.pid, w.started_at, w.state, w.jobs_running) == (5151, at(5), "running", 0)
    await store.heartbeat("w1", 0, at(6))
    assert await rescue(store, 7) == [(job.id, "w1", Action.LOST)]
    back = await store.get(job.id)
    assert (back.state, back.lost_count) == (JobState.PENDING, 1)
    assert [(e.attempt, e.outcome) for e in await store.executions(job.id)] == [(1, "lost")]

    # The new process's own jobs are safe, even when fetched in the same instant.
    again = await lease_one(store, "w1", now=at(7))
    assert again.attempt == 2
    assert await rescue(store, 7) == []
    assert await rescue(store, 8) == []
    assert await finish(store, again, Action.COMPLETE, now=at(9))
    assert [e.outcome for e in await store.executions(job.id)] == ["lost", "completed"]
