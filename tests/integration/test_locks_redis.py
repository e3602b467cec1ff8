"""Locks on a real Redis (``CONVEYOR_LOCKS_BACKEND=redis``): the store's lock contract
with Redis's own clock running the TTLs, tokens that grow across release and expiry,
and Redis restarts (the AOF keeps the counters)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from conveyor import Conveyor
from conveyor.domain.errors import (
    LockLost,
    LockNotAcquired,
    StaleFencingToken,
    StoreUnavailable,
)
from conveyor.settings import Settings
from conveyor.storage.redis_locks import RedisLocks
from redis_server import RedisServer
from support import async_wait_until


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def locks(redis_server: RedisServer) -> AsyncIterator[RedisLocks]:
    backend = RedisLocks(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        yield backend
    finally:
        await backend.close()


async def test_acquire_contend_release_by_owner_only(locks: RedisLocks) -> None:
    assert await locks.acquire_lock("invoice:42", "a", 30, now()) == 1
    assert await locks.acquire_lock("invoice:42", "b", 30, now()) is None
    assert await locks.acquire_lock("invoice:42", "a", 30, now()) is None
    assert not await locks.release_lock("invoice:42", "b", 1, now())
    assert not await locks.release_lock("invoice:42", "a", 2, now())
    assert await locks.check_lock("invoice:42", 1, now())
    assert await locks.release_lock("invoice:42", "a", 1, now())
    assert not await locks.check_lock("invoice:42", 1, now())
    assert await locks.acquire_lock("invoice:42", "b", 30, now()) == 2


async def test_expiry_extend_and_tokens_that_only_grow(locks: RedisLocks) -> None:
    assert await locks.acquire_lock("k", "a", 0.3, now()) == 1
    assert await locks.extend_lock("k", "a", 1, 0.3, now())
    assert not await locks.extend_lock("k", "b", 1, 30, now())

    async def taken() -> int | None:
        return await locks.acquire_lock("k", "b", 30, now())

    assert await async_wait_until(taken, 5, "the 0.3 s lock to expire") == 2
    assert not await locks.extend_lock("k", "a", 1, 30, now())
    assert not await locks.release_lock("k", "a", 1, now())
    assert not await locks.check_lock("k", 1, now())
    assert await locks.check_lock("k", 2, now())
    tokens = [2]
    for i in range(5):
        assert await locks.release_lock("k", "b" if i == 0 else f"o{i - 1}", tokens[-1], now())
        token = await locks.acquire_lock("k", f"o{i}", 30, now())
        assert token is not None
        tokens.append(token)
    assert tokens == [2, 3, 4, 5, 6, 7]


async def test_list_locks_in_key_order(locks: RedisLocks) -> None:
    t = now()
    for key in ("b", "a[1]*", "c"):
        assert await locks.acquire_lock(key, f"owner-{key}", 30, t) == 1
    assert await locks.release_lock("b", "owner-b", 1, t)
    held = await locks.list_locks(now())
    assert [(i.key, i.owner, i.held) for i in held] == [
        ("a[1]*", "owner-a[1]*", True),
        ("c", "owner-c", True),
    ]
    assert held[0].acquired_at is not None
    assert abs((held[0].acquired_at - t).total_seconds()) < 0.001
    assert held[0].expires_at is not None
    assert held[0].expires_at > now()
    everything = await locks.list_locks(now(), include_free=True)
    assert [(i.key, i.token, i.held) for i in everything] == [
        ("a[1]*", 1, True),
        ("b", 1, False),
        ("c", 1, True),
    ]
    assert len(await locks.list_locks(now(), limit=1, include_free=True)) == 1


async def test_concurrent_acquirers_get_one_holder(locks: RedisLocks) -> None:
    results = await asyncio.gather(
        *(locks.acquire_lock("hot", f"o{i}", 30, now()) for i in range(50))
    )
    assert [r for r in results if r is not None] == [1]


async def test_app_locks_on_redis_with_leases_in_the_store(
    redis_server: RedisServer, tmp_path
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        redis_url=redis_server.url,
        locks_backend="redis",
    )
    app = Conveyor(settings=settings)
    async with app:
        assert isinstance(app.locks.backend, RedisLocks)
        key = f"invoice:{uuid.uuid4().hex}"
        async with app.lock(key, ttl=30) as lock:
            assert lock.token == 1
            with pytest.raises(LockNotAcquired):
                await app.locks.acquire(key, wait=0.2)
            async with app.leader("reports") as lease:
                listed = {r.key: r.token for r in await app.list_locks(limit=1000)}
                assert listed[key] == 1
                assert listed["leader:reports"] == lease.token
            assert await app.store.list_locks(app.now()) == []  # the lock itself is in Redis

        async def slow() -> str:
            await asyncio.sleep(0.6)  # wait-ok: outlives the 0.2 s TTL, renewed meanwhile
            return "done"

        assert await app.with_lock(key, slow, ttl=0.2) == "done"
        with pytest.raises(StaleFencingToken):
            await app.locks.check(key, 1)


async def test_tokens_survive_a_redis_restart_and_an_outage_is_store_unavailable(
    private_redis_server: RedisServer,
) -> None:
    locks = RedisLocks(private_redis_server.url)
    try:
        assert await locks.acquire_lock("k", "a", 30, now()) == 1
        assert await locks.release_lock("k", "a", 1, now())
        private_redis_server.kill()
        with pytest.raises(StoreUnavailable):
            await locks.acquire_lock("k", "b", 30, now())
        private_redis_server.restart()

        async def taken() -> int | None:
            try:
                return await locks.acquire_lock("k", "b", 30, now())
            except StoreUnavailable:
                return None

        assert await async_wait_until(taken, 15, "Redis back") == 2  # the AOF kept the counter
    finally:
        await locks.close()


async def test_a_lost_redis_lock_cancels_with_lock(redis_server: RedisServer, tmp_path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        redis_url=redis_server.url,
        locks_backend="redis",
    )
    async with Conveyor(settings=settings) as app:
        key = f"k:{uuid.uuid4().hex}"

        async def work() -> None:
            (info,) = [r for r in await app.locks.list(limit=1000) if r.key == key]
            assert info.owner is not None
            assert await app.locks.backend.release_lock(key, info.owner, info.token, now())
            await asyncio.Event().wait()

        with pytest.raises(LockLost):
            await asyncio.wait_for(app.with_lock(key, work, ttl=1, renew_every=0.05), 10)
