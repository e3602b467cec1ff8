"""Contract: distributed locks and leader leases in the store (every backend).

A lock is taken by one holder at a time, freed by its holder only or by
expiry, and every acquisition of a key gets a fencing token greater than any
the key had before, across releases and expiries.
"""

from __future__ import annotations

import asyncio

from storekit import at

from conveyor.domain.locks import leader_key
from conveyor.runtime.locks import Leadership
from conveyor.storage.base import Store


async def test_acquire_contend_release_by_owner_only(store: Store) -> None:
    assert await store.acquire_lock("invoice:42", "a", 30, at(0)) == 1
    assert await store.acquire_lock("invoice:42", "b", 30, at(1)) is None
    assert await store.acquire_lock("invoice:42", "a", 30, at(1)) is None  # not re-entrant
    assert await store.acquire_lock("invoice:43", "b", 30, at(1)) == 1  # keys are separate
    # Neither a stranger nor the owner with a wrong token frees it.
    assert not await store.release_lock("invoice:42", "b", 1, at(2))
    assert not await store.release_lock("invoice:42", "a", 2, at(2))
    assert await store.acquire_lock("invoice:42", "b", 30, at(3)) is None
    assert await store.release_lock("invoice:42", "a", 1, at(4))
    assert not await store.release_lock("invoice:42", "a", 1, at(4))  # once
    assert await store.acquire_lock("invoice:42", "b", 30, at(5)) == 2


async def test_expiry_frees_the_key_and_fences_the_old_holder(store: Store) -> None:
    assert await store.acquire_lock("k", "a", 10, at(0)) == 1
    assert await store.check_lock("k", 1, at(9.9))
    assert await store.acquire_lock("k", "b", 10, at(9.9)) is None
    assert not await store.check_lock("k", 1, at(10))  # expires_at is exclusive
    assert await store.acquire_lock("k", "b", 10, at(10)) == 2
    # The expired holder can neither extend, nor release, nor pass the fence.
    assert not await store.extend_lock("k", "a", 1, 10, at(11))
    assert not await store.release_lock("k", "a", 1, at(11))
    assert not await store.check_lock("k", 1, at(11))
    assert await store.check_lock("k", 2, at(11))
    (info,) = await store.list_locks(at(11))
    assert (info.key, info.owner, info.token, info.held) == ("k", "b", 2, True)


async def test_extend_moves_the_expiry_for_the_holder_only(store: Store) -> None:
    assert await store.acquire_lock("k", "a", 10, at(0)) == 1
    assert await store.extend_lock("k", "a", 1, 10, at(8))  # now until 18
    assert not await store.extend_lock("k", "b", 1, 10, at(8))
    assert not await store.extend_lock("k", "a", 2, 10, at(8))
    assert await store.acquire_lock("k", "b", 10, at(15)) is None
    assert await store.check_lock("k", 1, at(17.5))
    assert not await store.extend_lock("k", "a", 1, 10, at(18))  # already expired
    assert await store.acquire_lock("k", "b", 10, at(18)) == 2


async def test_release_of_an_expired_untaken_lock_frees_it_and_says_it_was_lost(
    store: Store,
) -> None:
    assert await store.acquire_lock("k", "a", 5, at(0)) == 1
    assert not await store.release_lock("k", "a", 1, at(6))  # freed, but it had expired
    assert await store.list_locks(at(6)) == []
    assert await store.acquire_lock("k", "a", 5, at(6)) == 2


async def test_tokens_strictly_increase_across_release_and_expiry(store: Store) -> None:
    tokens, t = [], 0.0
    for i in range(12):
        owner = f"o{i}"
        token = await store.acquire_lock("k", owner, 2, at(t))
        assert token is not None
        tokens.append(token)
        if i % 3 == 0:
            assert await store.release_lock("k", owner, token, at(t + 1))
            t += 1
        elif i % 3 == 1:
            t += 2  # left to expire
        else:
            assert await store.extend_lock("k", owner, token, 2, at(t + 1))
            t += 3
    assert tokens == list(range(1, 13))
    (info,) = await store.list_locks(at(t), include_free=True)
    assert info.token == 12
    assert not info.held


async def test_list_locks_shows_held_keys_or_all_in_key_order(store: Store) -> None:
    for key in ("b", "a", "c"):
        assert await store.acquire_lock(key, f"owner-{key}", 10, at(0)) == 1
    token = 1
    assert await store.release_lock("b", "owner-b", token, at(1))
    held = await store.list_locks(at(2))
    assert [(i.key, i.owner, i.held) for i in held] == [
        ("a", "owner-a", True),
        ("c", "owner-c", True),
    ]
    assert held[0].acquired_at == at(0)
    assert held[0].expires_at == at(10)
    everything = await store.list_locks(at(2), include_free=True)
    assert [(i.key, i.owner, i.held) for i in everything] == [
        ("a", "owner-a", True),
        ("b", None, False),
        ("c", "owner-c", True),
    ]
    assert [i.key for i in await store.list_locks(at(2), limit=1, include_free=True)] == ["a"]
    assert await store.list_locks(at(10)) == []  # all expired


async def test_concurrent_acquirers_get_one_holder(store: Store) -> None:
    results = await asyncio.gather(
        *(store.acquire_lock("hot", f"o{i}", 30, at(0)) for i in range(20))
    )
    assert sorted(r for r in results if r is not None) == [1]
    assert results.count(None) == 19


async def test_leader_handover_after_ttl(store: Store) -> None:
    clock = {"t": 0.0}

    def now():  # a clock the test moves: no sleeping for the TTL
        return at(clock["t"])

    a = Leadership(store, "maint", ttl=10, clock=now, owner="a")
    b = Leadership(store, "maint", ttl=10, clock=now, owner="b")
    assert await a.hold()
    assert not await b.hold()
    first = a.token
    clock["t"] = 5
    assert await a.hold()  # renewed until 15
    assert a.token == first
    clock["t"] = 12
    assert not await b.hold()
    # a stops renewing (dies): b leads once a's lease has run out.
    clock["t"] = 15
    assert await b.hold()
    assert b.token is not None
    assert first is not None
    assert b.token > first
    assert not await a.hold()  # a comes back: b leads now
    assert await store.check_lock(leader_key("maint"), b.token, now())
    assert not await store.check_lock(leader_key("maint"), first, now())
    second = b.token
    await b.resign()
    assert await a.hold()  # a graceful handover is immediate
    assert a.token == second + 1
