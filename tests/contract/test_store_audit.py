"""Contract: the audit log over every backend (append, list, anchors, no fork,
and entries written in the transaction of the change they record)."""

from __future__ import annotations

import asyncio

import pytest
from storekit import at, submit_one

from conveyor.domain.audit import GENESIS, AuditDraft, AuditQuery, make_anchor, verify
from conveyor.domain.errors import InvalidTransition, ValidationError
from conveyor.storage.audit import pending
from conveyor.storage.base import Store
from conveyor.storage.memory import MemoryStore


def draft(action: str = "job.cancel", rid: str = "j1", actor: str = "cli:ann", **kw) -> AuditDraft:
    return AuditDraft.make(action, "job", rid, at=at(1), actor=actor, **kw)


async def everything(store: Store) -> list:
    return await store.list_audit(AuditQuery(limit=1000))


async def test_append_chains_and_lists_in_order(store: Store) -> None:
    first = await store.append_audit([draft(rid="a"), draft(rid="b", actor="key1")])
    assert [e.seq for e in first] == [1, 2]
    assert first[0].prev_hash == GENESIS
    assert first[1].prev_hash == first[0].hash
    (third,) = await store.append_audit([draft("job.retry", rid="a", summary={"n": 1})])
    assert third.seq == 3
    assert third.prev_hash == first[1].hash
    rows = await everything(store)
    assert [e.to_dict() for e in rows] == [e.to_dict() for e in [*first, third]]
    assert verify(rows).ok
    assert [e.seq for e in await store.list_audit(AuditQuery(resource_id="a"))] == [1, 3]
    assert [e.seq for e in await store.list_audit(AuditQuery(actor="key1"))] == [2]
    assert [e.seq for e in await store.list_audit(AuditQuery(action="job.retry"))] == [3]
    assert [e.seq for e in await store.list_audit(AuditQuery(after=1, limit=1))] == [2]
    assert await store.list_audit(AuditQuery(after=3)) == []
    assert rows[2].summary == {"n": 1}


async def test_bad_queries_are_refused(store: Store) -> None:
    for query in (AuditQuery(limit=0), AuditQuery(after=-1), AuditQuery(actor="a\x00b")):
        with pytest.raises(ValidationError):
            await store.list_audit(query)


async def test_hostile_text_round_trips_exactly(store: Store) -> None:
    odd = draft(
        summary={"é": "ünï 😀", "big": 2**70, "f": 0.1, "nested": {"z": [1, None, True]}},
        model="m",
        prompt="p" * 10,
        response="r",
        hash_ai_fields=False,
    )
    await store.append_audit([odd])
    (row,) = await everything(store)
    assert row.summary["big"] == 2**70
    assert row.prompt == "p" * 10
    assert verify([row]).ok


async def test_concurrent_appends_never_fork(store: Store) -> None:
    async def one(i: int) -> None:
        for j in range(5):
            await store.append_audit([draft(rid=f"r{i}-{j}")])

    await asyncio.gather(*(one(i) for i in range(8)))
    rows = await everything(store)
    assert [e.seq for e in rows] == list(range(1, 41))
    assert verify(rows).ok


async def test_anchors_are_kept_once_per_seq(store: Store) -> None:
    (e,) = await store.append_audit([draft()])
    signed = make_anchor(e.seq, e.hash, at(2), b"k" * 32, "key:v1")
    await store.add_audit_anchor(signed)
    await store.add_audit_anchor(make_anchor(e.seq, e.hash, at(3), None, None))
    assert await store.list_audit_anchors() == [signed]
    assert verify([e], [signed], anchor_key=b"k" * 32).ok


async def test_a_change_and_its_entry_commit_together(store: Store) -> None:
    job = await submit_one(store)
    with pending([draft(rid=job.id)]) as scope:
        await store.cancel(job.id, at(1))
    if scope.written is None:  # the memory store has no transactions: appended after
        assert isinstance(store, MemoryStore)
        scope.written = await store.append_audit(scope.drafts)
    (entry,) = await everything(store)
    assert entry.resource_id == job.id
    assert scope.written == [entry]


async def test_a_failed_change_writes_no_entry(store: Store) -> None:
    job = await submit_one(store)
    await store.cancel(job.id, at(1))
    with pending([draft(rid=job.id)]) as scope, pytest.raises(InvalidTransition):
        await store.cancel(job.id, at(2))  # already cancelled: rolled back
    assert scope.written is None
    assert await everything(store) == []


async def test_a_background_task_never_takes_the_entries(store: Store) -> None:
    job = await submit_one(store)
    other = await submit_one(store)
    with pending([draft(rid=job.id)]) as scope:
        # Started inside the scope, so it inherits the context variable; not its owner.
        await asyncio.create_task(store.cancel(other.id, at(1)))
        assert scope.written is None
        await store.cancel(job.id, at(1))
    if scope.written is None:
        scope.written = await store.append_audit(scope.drafts)
    assert [e.resource_id for e in await everything(store)] == [job.id]


async def test_a_read_before_the_change_leaves_the_entries_to_the_change(store: Store) -> None:
    job = await submit_one(store)
    with pending([draft(rid=job.id)]) as scope:
        await store.get(job.id)  # PostgreSQL runs it in a transaction too: it wrote nothing
        await store.list_audit(AuditQuery())
        assert scope.written is None
        await store.cancel(job.id, at(1))
        if not isinstance(store, MemoryStore):
            assert scope.written is not None
    if scope.written is None:
        scope.written = await store.append_audit(scope.drafts)
    assert [e.resource_id for e in await everything(store)] == [job.id]
