"""Contract: ``app.lock``, ``app.with_lock``, the fence, ``app.leader``, ``GET /api/locks``
on every backend (the store keeps the locks)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import pytest
from appkit import api_client, app_on

from conveyor.domain.errors import (
    LockLost,
    LockNotAcquired,
    StaleFencingToken,
    ValidationError,
)
from conveyor.domain.locks import leader_key
from conveyor.security.api_keys import new_api_key
from conveyor.storage.base import Store


async def test_lock_block_gives_a_token_and_releases_at_the_end(store: Store) -> None:
    async with app_on(store) as app:
        async with app.lock("invoice:42", ttl=30) as lock:
            assert lock.token == 1
            assert lock.held
            await lock.check()
            with pytest.raises(LockNotAcquired, match="invoice:42"):
                async with app.lock("invoice:42"):
                    pass
            await lock.extend(60)
            assert lock.remaining > 30
            (info,) = await app.list_locks()
            assert (info.key, info.token, info.owner) == ("invoice:42", 1, lock.owner)
        assert not lock.held
        assert await app.list_locks() == []
        async with app.lock("invoice:42") as again:
            assert again.token == 2  # never reused
        with pytest.raises(StaleFencingToken) as stale:
            await app.locks.check("invoice:42", 1)
        assert stale.value.token == 1


async def test_wait_takes_the_lock_once_the_holder_releases(store: Store) -> None:
    async with app_on(store) as app:
        holder = await app.locks.acquire("k", ttl=30)
        waiter = asyncio.create_task(app.locks.acquire("k", ttl=30, wait=10))
        await asyncio.sleep(0.1)  # wait-ok: the waiter must be polling a held lock
        assert not waiter.done()
        started = time.monotonic()
        assert await holder.release()
        lock = await asyncio.wait_for(waiter, 5)
        assert lock.token == holder.token + 1
        assert time.monotonic() - started < 1.0  # woken at once in this process
        await lock.release()


async def test_wait_gives_up_at_its_deadline(store: Store) -> None:
    async with app_on(store) as app, app.lock("k", ttl=30):
        started = time.monotonic()
        with pytest.raises(LockNotAcquired, match=r"waited 0\.3s"):
            await app.locks.acquire("k", wait=0.3)
        assert 0.3 <= time.monotonic() - started < 2.0


async def test_an_expired_lock_is_taken_over_and_its_token_fenced(store: Store) -> None:
    async with app_on(store) as app:
        old = await app.locks.acquire("k", ttl=0.2)
        new = await app.locks.acquire("k", ttl=30, wait=5)  # once the 0.2 s ran out
        assert new.token == old.token + 1
        assert not old.held
        with pytest.raises(StaleFencingToken):
            await old.check()
        with pytest.raises(LockLost) as lost:
            await old.extend(30)
        assert lost.value.token == old.token
        assert not await old.release()  # can't free the new holder's lock
        await new.check()
        assert await new.release()


async def test_with_lock_returns_the_result_and_renews_past_the_ttl(store: Store) -> None:
    async with app_on(store) as app:

        async def work(x: int, *, y: int) -> int:
            await asyncio.sleep(0.5)  # wait-ok: outlives the 0.2 s TTL, renewed meanwhile
            (info,) = await app.list_locks()
            assert info.held
            return x + y

        assert await app.with_lock("k", work, 1, y=2, ttl=0.2) == 3
        assert await app.list_locks() == []
        (info,) = await app.list_locks(include_free=True)
        assert info.token == 1


async def test_with_lock_cancels_the_function_when_the_lock_is_lost(store: Store) -> None:
    async with app_on(store) as app:
        cancelled = asyncio.Event()

        async def work() -> None:
            (info,) = await app.list_locks()
            assert info.owner is not None
            # Someone frees and takes the lock from under us (as after an expiry).
            assert await store.release_lock("k", info.owner, info.token, app.now())
            assert await store.acquire_lock("k", "thief", 30, app.now()) == info.token + 1
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(LockLost, match="'k'"):
            await asyncio.wait_for(app.with_lock("k", work, ttl=1, renew_every=0.05), 10)
        assert cancelled.is_set()
        (info,) = await app.list_locks()
        assert info.owner == "thief"  # the loser left the new holder alone


async def test_leader_block_leads_alone_and_is_cancelled_when_the_lease_is_lost(
    store: Store,
) -> None:
    async with app_on(store) as app:
        other = app.leader("reports", ttl=0.6)
        entered = asyncio.Event()
        cancelled = asyncio.Event()

        async def lead() -> None:
            async with app.leader("reports", ttl=0.6) as lease:
                assert lease.is_leader
                entered.set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

        task = asyncio.create_task(lead())
        await asyncio.wait_for(entered.wait(), 5)
        with pytest.raises(LockNotAcquired):
            await other.wait_until_leader(wait=0.3)
        (info,) = await app.list_locks()
        assert info.key == leader_key("reports")
        assert await store.release_lock(info.key, info.owner or "", info.token, app.now())
        assert await other.hold()  # took the lease: the first leader must stop
        with pytest.raises(LockLost):
            await asyncio.wait_for(task, 5)
        assert cancelled.is_set()
        assert other.is_leader
        await other.resign()


async def test_leader_block_resigns_at_the_end_and_outside_cancels_stay_cancels(
    store: Store,
) -> None:
    async with app_on(store) as app:
        async with app.leader("x", ttl=5) as lease:
            first = lease.token
        second = app.leader("x", ttl=5)
        assert await second.hold()  # no wait for the TTL: resigned
        assert second.token == (first or 0) + 1
        await second.resign()

        async def lead() -> None:
            async with app.leader("x", ttl=5):
                await asyncio.Event().wait()

        task = asyncio.create_task(lead())
        await asyncio.sleep(0.2)  # wait-ok: let it become leader and block
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": ""}, "key"),
        ({"key": "a\x00b"}, "key"),
        ({"key": "x" * 201}, "key"),
        ({"key": 7}, "key"),
        ({"key": "k", "ttl": math.nan}, "ttl"),
        ({"key": "k", "ttl": math.inf}, "ttl"),
        ({"key": "k", "ttl": 0}, "ttl"),
        ({"key": "k", "ttl": True}, "ttl"),
        ({"key": "k", "ttl": 10**12}, "ttl"),
        ({"key": "k", "wait": -1}, "wait"),
        ({"key": "k", "wait": math.nan}, "wait"),
        ({"key": "k", "wait": "5"}, "wait"),
    ],
)
async def test_bad_lock_arguments_are_refused_and_change_nothing(
    store: Store, kwargs: dict, field: str
) -> None:
    async with app_on(store) as app:
        with pytest.raises(ValidationError) as bad:
            async with app.lock(**kwargs):
                pass
        assert [d.field for d in bad.value.details] == [field]
        with pytest.raises(ValidationError):
            app.leader("\x00")
        with pytest.raises(ValidationError):
            await app.locks.check("k", -1)
        assert await app.list_locks(include_free=True) == []


async def test_api_lists_locks_for_admins_only(store: Store) -> None:
    async with app_on(store) as app:
        read_secret, read_key = new_api_key("r", "read", app.now())
        admin_secret, admin_key = new_api_key("a", "admin", app.now())
        await store.create_api_key(read_key)
        await store.create_api_key(admin_key)
        as_read = {"Authorization": f"Bearer {read_secret}"}
        as_admin = {"Authorization": f"Bearer {admin_secret}"}
        async with api_client(app) as client:
            async with app.lock("invoice:42", ttl=30) as lock:
                assert (await client.get("/api/locks", headers=as_read)).status_code == 403
                r = await client.get("/api/locks", headers=as_admin)
                assert r.status_code == 200
                (row,) = r.json()["locks"]
                assert (row["key"], row["token"], row["held"]) == ("invoice:42", lock.token, True)
                assert row["owner"] == lock.owner
                bad = await client.get("/api/locks?limit=0", headers=as_admin)
                assert bad.status_code == 400
                assert bad.json()["details"]
                # Read-only: no way to take or free a lock over HTTP.
                assert (await client.post("/api/locks", headers=as_admin)).status_code == 405
                assert (await client.delete("/api/locks", headers=as_admin)).status_code == 405
            r = await client.get("/api/locks?include_free=true", headers=as_admin)
            assert [(x["key"], x["held"]) for x in r.json()["locks"]] == [("invoice:42", False)]


async def test_one_worker_leads_the_maintenance_passes_and_hands_over_on_stop(
    store: Store,
) -> None:
    from datetime import timedelta

    from storekit import worker_info

    from conveyor.domain.job import NewJob
    from conveyor.runtime.locks import MAINTENANCE_LEADER
    from support import async_wait_until, running_worker

    key = leader_key(MAINTENANCE_LEADER)
    async with app_on(store, allow_unknown_job_types=True) as app:
        # A job leased to a worker that died long ago: the leader's pass rescues it.
        past = app.now() - timedelta(seconds=100)
        await store.register_worker(worker_info("dead"), past)
        (submitted,) = await store.enqueue_many([NewJob("orphan")], past)
        (leased,) = await store.fetch("dead", queues=(), job_types=(), limit=1, now=past)

        async def leaders() -> list:
            return [r for r in await app.list_locks() if r.key == key]

        async with running_worker(app) as first:
            (lease,) = await async_wait_until(leaders, 10, "a maintenance leader")

            async def rescued() -> bool:
                job = await store.get(leased.id)
                return job.lost_count == 1

            await async_wait_until(rescued, 10, "the dead worker's job rescued")
            async with running_worker(app) as second:
                await asyncio.sleep(0.6)  # wait-ok: three maintenance intervals of both
                assert [(r.owner, r.token) for r in await leaders()] == [(lease.owner, lease.token)]
                first.request_stop()

                async def handed_over() -> list:
                    rows = await leaders()
                    return [r for r in rows if r.owner != lease.owner]

                (after,) = await async_wait_until(handed_over, 10, "the second to lead")
                assert after.token == lease.token + 1
                assert second.id != first.id
        assert submitted.job.id == leased.id


async def test_a_leader_body_that_swallows_the_cancel_still_learns_it_lost(
    store: Store,
) -> None:
    async with app_on(store) as app:

        async def lead() -> None:
            async with app.leader("swallow", ttl=0.6) as lease:
                key, token = lease.key, lease.token or 0
                (info,) = await app.list_locks()
                assert await store.release_lock(key, info.owner or "", token, app.now())
                assert await store.acquire_lock(key, "thief", 30, app.now()) == token + 1
                # A body that ignores the cancel still gets LockLost at the end.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(10)  # wait-ok: cancelled by the lost lease

        task = asyncio.create_task(lead())
        with pytest.raises(LockLost):
            await asyncio.wait_for(task, 10)
        assert task.cancelling() == 0


async def test_with_lock_refuses_a_plain_function_and_releases(store: Store) -> None:
    async with app_on(store) as app:
        with pytest.raises(TypeError, match="async function"):
            await app.with_lock("k", lambda: 42)
        assert await app.list_locks() == []
        with pytest.raises(TypeError, match="async function"):
            await app.with_lock("k", "not callable")  # type: ignore[arg-type]
        (info,) = await app.list_locks(include_free=True)
        assert info.token == 1  # the second call took nothing


@pytest.mark.parametrize("renew_every", [0, -5, math.nan, math.inf, "5", True])
async def test_with_lock_refuses_a_bad_renew_period_before_taking_the_lock(
    store: Store, renew_every: object
) -> None:
    # 0, NaN or a negative period used to renew every 5 ms (a store write each
    # time) for as long as the function ran; a string failed only after it had started.
    ran: list[int] = []

    async def work() -> int:
        ran.append(1)
        return 1

    async with app_on(store) as app:
        with pytest.raises(ValidationError) as bad:
            await app.with_lock("k", work, renew_every=renew_every)  # type: ignore[arg-type]
        assert [d.field for d in bad.value.details] == ["renew_every"]
        assert ran == []
        assert await app.list_locks(include_free=True) == []
