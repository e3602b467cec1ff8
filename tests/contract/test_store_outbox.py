"""Contract: every transition appends exactly its lifecycle event, in order."""

from __future__ import annotations

from typing import Any

import pytest
from storekit import (
    all_events,
    at,
    events_since,
    finish,
    last_event_id,
    lease_one,
    new,
    register,
    snapshot,
    submit,
    submit_one,
    types_since,
)

from conveyor.domain.errors import ValidationError
from conveyor.domain.job import Finish
from conveyor.domain.states import Action
from conveyor.storage.base import Store

COMMON_KEYS = {"job_id", "job_type", "queue", "status", "attempt"}


async def test_a_job_life_writes_its_events_in_order(store: Store) -> None:
    job = await submit_one(store, "email", queue="mail", priority=80, now=at(0))
    first = await lease_one(store, "w1", now=at(1))
    assert await finish(store, first, Action.RETRY, now=at(2), error="flaky", retry_at=at(3))
    second = await lease_one(store, "w1", now=at(3))
    assert await finish(store, second, Action.COMPLETE, now=at(4), result={"ok": 1})

    events = await all_events(store)
    assert [e.type for e in events] == [
        "job_submitted",
        "job_started",
        "job_retrying",
        "job_started",
        "job_completed",
    ]
    assert [e.created_at for e in events] == [at(0), at(1), at(2), at(3), at(4)]
    assert all(e.job_id == job.id for e in events)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert ids[0] >= 1
    for e in events:
        assert e.data.keys() >= COMMON_KEYS
        assert (e.data["job_id"], e.data["job_type"], e.data["queue"]) == (job.id, "email", "mail")
    assert [(e.data["status"], e.data["attempt"]) for e in events] == [
        ("pending", 0),
        ("running", 1),
        ("pending", 1),
        ("running", 2),
        ("completed", 2),
    ]
    assert events[0].data["priority"] == 80
    assert events[1].data["worker_id"] == "w1"


async def test_dead_letter_events(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    mark = await last_event_id(store)
    assert await finish(store, got, Action.FAIL, now=at(1), error="x")
    assert await types_since(store, mark) == [("job_dead_lettered", job.id)]


async def test_cancel_events(store: Store) -> None:
    pending = await submit_one(store, "p")
    mark = await last_event_id(store)
    await store.cancel(pending.id, at(1))
    assert await types_since(store, mark) == [("job_cancelled", pending.id)]

    running = await submit_one(store, "r")
    got = await lease_one(store)
    mark = await last_event_id(store)
    await store.cancel(running.id, at(2))
    assert await finish(store, got, Action.CONFIRM_CANCEL, now=at(3))
    assert await types_since(store, mark) == [
        ("job_status_changed", running.id),
        ("job_cancelled", running.id),
    ]


async def test_unblock_and_dlq_retry_and_release_are_status_changes(store: Store) -> None:
    parent = await submit_one(store, "parent")
    child = await submit_one(store, "child", depends_on=[parent.id])
    got = await lease_one(store)
    mark = await last_event_id(store)
    assert await finish(store, got, Action.COMPLETE, now=at(1))
    events = await events_since(store, mark)
    assert [(e.type, e.job_id) for e in events] == [
        ("job_completed", parent.id),
        ("job_status_changed", child.id),
    ]
    assert events[1].data["status"] == "pending"

    got = await lease_one(store, now=at(2))
    mark = await last_event_id(store)
    assert await finish(store, got, Action.RELEASE, now=at(3))
    assert await types_since(store, mark) == [("job_status_changed", child.id)]

    got = await lease_one(store, now=at(4))
    assert await finish(store, got, Action.FAIL, now=at(5), error="x")
    mark = await last_event_id(store)
    await store.retry_failed([child.id], at(6))
    assert await types_since(store, mark) == [("job_status_changed", child.id)]


async def test_worker_events(store: Store) -> None:
    await register(store, "w1", now=at(0))
    await register(store, "w2", now=at(0))
    await store.heartbeat("w2", 0, at(10))
    await store.rescue(heartbeat_timeout=15, max_lost=2, now=at(20))
    await store.deregister_worker("w2", at(21))
    events = await all_events(store)
    assert [(e.type, e.job_id, e.data) for e in events] == [
        ("worker_status_changed", None, {"worker_id": "w1", "status": "running"}),
        ("worker_status_changed", None, {"worker_id": "w2", "status": "running"}),
        ("worker_status_changed", None, {"worker_id": "w1", "status": "dead"}),
        ("worker_status_changed", None, {"worker_id": "w2", "status": "stopped"}),
    ]


async def test_heartbeats_write_no_events(store: Store) -> None:
    await register(store, "w1")
    mark = await last_event_id(store)
    for t in range(1, 5):
        await store.heartbeat("w1", 0, at(t))
    assert await events_since(store, mark) == []


async def test_batch_events_follow_the_batch(store: Store) -> None:
    jobs = await submit(store, *(new(f"t{i}") for i in range(5)))
    assert [e.job_id for e in await all_events(store)] == [j.id for j in jobs]


async def test_events_after_resumes_from_a_cursor_with_a_limit(store: Store) -> None:
    await submit(store, *(new() for _ in range(10)))
    everything = await all_events(store)
    assert len(everything) == 10

    seen = []
    cursor = 0
    while True:
        chunk = await store.events_after(cursor, 3)
        if not chunk:
            break
        assert len(chunk) <= 3
        seen += chunk
        cursor = chunk[-1].id
    assert [e.id for e in seen] == [e.id for e in everything]
    assert await store.events_after(everything[-1].id, 100) == []
    assert [e.id for e in await store.events_after(everything[4].id, 100)] == [
        e.id for e in everything[5:]
    ]


async def test_refused_operations_write_no_events(store: Store) -> None:
    job = await submit_one(store)
    got = await lease_one(store)
    before = await snapshot(store)
    with pytest.raises(ValidationError):
        await store.enqueue_many([new("bad name!")], at(1))
    with pytest.raises(ValidationError):
        await store.enqueue_many([new(depends_on=["ghost"])], at(1))
    assert await store.finish_many([Finish(job.id, "stale", Action.COMPLETE)], at(1)) == [False]
    assert got.lease_token
    assert await snapshot(store) == before


async def test_event_ids_increase_over_a_busy_history(store: Store) -> None:
    await register(store, "w1", now=at(0))
    for i in range(5):
        await submit(store, new(f"a{i}"), new(f"b{i}", run_at=at(i)), now=at(i))
        got = await lease_one(store, "w1", now=at(i))
        assert await finish(store, got, Action.COMPLETE, now=at(i))
        await store.heartbeat("w1", 0, at(i))
    victim = await lease_one(store, "w1", now=at(5))
    await store.cancel(victim.id, at(6))
    await store.rescue(heartbeat_timeout=1, max_lost=1, now=at(30))
    events = await all_events(store)
    ids = [e.id for e in events]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    times = [e.created_at for e in events]
    assert times == sorted(times)


async def test_event_data_says_why(store: Store, known_bug: Any) -> None:
    job = await submit_one(store, "a")
    got = await lease_one(store)
    await store.cancel(job.id, at(1))
    assert await finish(store, got, Action.CONFIRM_CANCEL, now=at(2))
    (cancelled,) = await events_since(store, await last_event_id(store) - 1)
    assert cancelled.data.get("error") == "cancelled"

    doomed = await submit_one(store, "b")
    assert await finish(store, await lease_one(store), Action.FAIL, now=at(3), error="x")
    mark = await last_event_id(store)
    await store.retry_failed([doomed.id], at(4))
    (retried,) = await events_since(store, mark)
    assert retried.data.get("reason") == "dlq_retry"
