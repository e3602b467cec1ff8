"""PostgreSQL outbox ids can commit out of order; readers must never skip one.

A transaction that took event id N and is still open must hold back every
event committed after it, or a reader whose cursor passed N + 1 would never
see N. The store delivers settled events in (transaction id, id) order.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from conveyor.domain.job import NewJob
from conveyor.storage.postgres import PostgresStore


async def test_an_open_transaction_holds_back_later_events(postgres_dsn: str) -> None:
    now = datetime.now(UTC)
    store = PostgresStore(postgres_dsn)
    await store.open()
    caller = await asyncpg.connect(postgres_dsn)
    try:
        tx = caller.transaction()
        await tx.start()
        # The caller's transaction takes the first event id and stays open...
        (early,) = await store.enqueue_many([NewJob("early")], now, connection=caller)
        # ...while an autocommit enqueue takes a later id and commits first.
        (late,) = await store.enqueue_many([NewJob("late")], now)
        assert await store.events_after(0, 100) == []  # 'late' is held back, not skipped
        assert await store.latest_event_id() == 0
        await tx.commit()
        events = await store.events_after(0, 100)
        assert [e.job_id for e in events] == [early.job.id, late.job.id]
        assert await store.latest_event_id() == events[-1].id
        # A reader that had read up to 'early' resumes with exactly 'late'.
        assert [e.job_id for e in await store.events_after(events[0].id, 100)] == [late.job.id]
    finally:
        await caller.close()
        await store.close()


async def test_a_transaction_that_commits_last_sorts_last_even_with_a_smaller_id(
    postgres_dsn: str,
) -> None:
    now = datetime.now(UTC)
    store = PostgresStore(postgres_dsn)
    await store.open()
    first, second = await asyncpg.connect(postgres_dsn), await asyncpg.connect(postgres_dsn)
    try:
        await store.enqueue_many([NewJob("before")], now)
        seen = await store.events_after(0, 100)
        cursor = seen[-1].id
        t1, t2 = first.transaction(), second.transaction()
        await t1.start()
        await t2.start()
        (a,) = await store.enqueue_many([NewJob("a")], now, connection=first)
        (b,) = await store.enqueue_many([NewJob("b")], now, connection=second)
        await t2.commit()
        assert await store.events_after(cursor, 100) == []
        await t1.rollback()  # a's id is a gap for good
        after = await store.events_after(cursor, 100)
        assert [e.job_id for e in after] == [b.job.id]
        assert a.job.id not in {e.job_id for e in after}
    finally:
        await first.close()
        await second.close()
        await store.close()


async def test_a_polling_reader_gets_every_event_once_under_concurrent_writers(
    postgres_dsn: str,
) -> None:
    # The reader polls from its last event (the store remembers that event's txid)
    # while five connections commit in interleaved order.
    import asyncio

    writer_store, reader, reference = (PostgresStore(postgres_dsn) for _ in range(3))
    for s in (writer_store, reader, reference):
        await s.open()
    try:

        async def writer() -> None:
            for _ in range(60):
                await writer_store.enqueue_many([NewJob("t")], datetime.now(UTC))

        writers = asyncio.gather(*(writer() for _ in range(5)))
        got: list[int] = []
        cursor = 0
        while True:
            batch = await reader.events_after(cursor, 7)
            got.extend(e.id for e in batch)
            if batch:
                cursor = batch[-1].id
            elif writers.done():
                break
            await asyncio.sleep(0)  # wait-ok: yield to the writers between polls
        await writers
        while batch := await reader.events_after(cursor, 7):
            got.extend(e.id for e in batch)
            cursor = batch[-1].id
        everything = await reference.events_after(0, 10_000)
        assert len(everything) == 300
        assert got == [e.id for e in everything]
    finally:
        for s in (writer_store, reader, reference):
            await s.close()
