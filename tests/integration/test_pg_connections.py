"""The PostgreSQL store's connections: the kept connection ("lane") that spares
single calls the pool's acquire/release survives statement errors, cancels and
a killed backend, and concurrent calls still share the pool; the job list
pages through an index."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from conveyor.domain.errors import StoreError, StoreUnavailable
from conveyor.domain.job import NewJob
from conveyor.storage.postgres import PostgresStore

pytestmark = pytest.mark.usefixtures("pg_server")


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(postgres_dsn, max_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def submit(store: PostgresStore, n: int = 1) -> None:
    await store.enqueue_many([NewJob("lane") for _ in range(n)], datetime.now(UTC))


async def backend_pid(store: PostgresStore) -> int:
    async with store._conn() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    return pid


async def test_a_statement_error_keeps_the_connection(store: PostgresStore) -> None:
    pid = await backend_pid(store)
    with pytest.raises(StoreError, match="division by zero"):
        async with store._conn() as conn:
            await conn.execute("SELECT 1/0")
    await submit(store)
    assert await backend_pid(store) == pid


async def test_a_call_cancelled_mid_query_leaves_a_working_store(store: PostgresStore) -> None:
    async def slow() -> None:
        async with store._conn() as conn:
            await conn.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    deadline = time.monotonic() + 10
    while not store._lane_busy:  # the sleep holds the lane
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # wait-ok: polling a condition with a deadline
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    started = time.monotonic()
    await submit(store)
    assert time.monotonic() - started < 5, "the next call waited for the cancelled sleep"
    counts = await store.count_by_state()
    assert sum(counts.values()) == 1


async def test_a_killed_backend_costs_at_most_one_failed_call(
    store: PostgresStore, postgres_dsn: str
) -> None:
    import asyncpg

    pid = await backend_pid(store)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()

    failures, deadline = 0, time.monotonic() + 10
    while True:
        try:
            await submit(store)
            break
        except StoreUnavailable:
            failures += 1
            assert time.monotonic() < deadline, "the store did not recover"
    assert failures <= 1
    assert await backend_pid(store) != pid
    assert sum((await store.count_by_state()).values()) == 1


async def test_concurrent_calls_share_the_pool(store: PostgresStore) -> None:
    await asyncio.gather(*(submit(store, 3) for _ in range(40)))
    assert sum((await store.count_by_state()).values()) == 120
    assert not store._lane_busy


async def test_the_default_job_list_reads_an_index_not_the_whole_table(
    store: PostgresStore,
) -> None:
    from conveyor.domain.job import JobQuery
    from conveyor.storage.postgres import list_sql

    for _ in range(5):
        await submit(store, 1000)
    async with store._conn() as conn:
        await conn.execute("ANALYZE conveyor.jobs")
        for query in (JobQuery(), JobQuery(descending=False)):  # newest / oldest first
            sql = "EXPLAIN " + list_sql(query)
            plan = "\n".join(
                r[0] for r in await conn.fetch(sql, None, None, None, None, 50, 0, False)
            )
            assert "Index Scan" in plan, plan
            assert "jobs_created" in plan, plan
            assert "Seq Scan" not in plan, plan


async def test_a_batch_cancelled_mid_insert_is_all_or_nothing(store: PostgresStore) -> None:
    jobs = [NewJob("lane", {"n": i}) for i in range(20_000)]
    task = asyncio.create_task(store.enqueue_many(jobs, datetime.now(UTC)))
    deadline = time.monotonic() + 10
    while not store._lane_busy:  # the batch holds the kept connection
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)  # wait-ok: polling a condition with a deadline
    await asyncio.sleep(0.02)  # wait-ok: let the insert statement reach the server
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # or it committed just before
        await task

    stored = sum((await store.count_by_state()).values())
    assert stored in (0, len(jobs)), f"{stored} of {len(jobs)} jobs of one batch stored"
    await submit(store)  # the store still works
    assert sum((await store.count_by_state()).values()) == stored + 1


async def test_finishing_locks_jobs_by_id_even_when_statistics_say_none_run(
    store: PostgresStore,
) -> None:
    """A backlog analyzed before the workers start says "no job runs": lock_running
    then picked the index of running jobs and scanned all of them per id, and a
    finish of 12,600 jobs outlasted its 60 s timeout (bench/pg_backlog.py)."""
    from conveyor.storage.postgres import Q

    await submit(store, 3000)
    async with store._conn() as conn:
        await conn.execute("ANALYZE conveyor.jobs")  # every job pending
        ids = [
            r[0]
            for r in await conn.fetch(
                "UPDATE conveyor.jobs SET state = 'running', lease_token = 't', worker_id = 'w',"
                " started_at = now() WHERE seq IN (SELECT seq FROM conveyor.jobs LIMIT 2000)"
                " RETURNING id"
            )
        ]
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + Q["lock_running"], ids))
    assert "jobs_pkey" in plan, plan
    assert "jobs_running" not in plan, plan
    assert "jobs_state_created" not in plan, plan
