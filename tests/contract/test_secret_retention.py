"""Contract: secret versions are kept for a time after they are replaced
(``CONVEYOR_SECRETS_RETENTION``, every backend), and a worker's cached value
(5 min TTL) is dropped when the secret is rotated or deleted elsewhere."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest
from appkit import app_on, finished
from storekit import at

from conveyor import Conveyor, JobContext
from conveyor.domain.errors import ConfigurationError
from conveyor.domain.secrets import SecretNotFound
from conveyor.domain.states import JobState
from conveyor.security.vault import MasterKey, StoreSecrets
from conveyor.settings import Settings
from conveyor.storage.base import Store
from support import async_wait_until, running_worker

DAY = 86_400.0


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def versions(store: Store, name: str) -> list[int]:
    (info,) = [i for i in await store.list_secrets() if i.name == name]
    found = []
    for v in range(1, info.version + 1):
        try:
            found.append((await store.get_secret(name, v)).version)
        except SecretNotFound:  # pruned
            continue
    return found


async def test_prune_drops_versions_replaced_before_the_cutoff(store: Store) -> None:
    clock = Clock(at(0))
    v = StoreSecrets(store, [MasterKey.generate()], clock)  # no retention: prune by hand
    await v.set("a", "one")
    await v.set("single", "only")
    clock.now = at(100)
    await v.set("a", "two")
    clock.now = at(200)
    await v.set("a", "three")
    assert await store.prune_secret_versions(at(99)) == 0  # nothing replaced that early
    assert await versions(store, "a") == [1, 2, 3]
    assert await store.prune_secret_versions(at(100)) == 1  # v1 was replaced at 100
    assert await versions(store, "a") == [2, 3]
    assert await store.prune_secret_versions(at(10**6)) == 1  # the newest always stays
    assert await versions(store, "a") == [3]
    assert await versions(store, "single") == [1]
    assert await v.get("a") == "three"


async def test_a_set_prunes_by_time_and_by_count(store: Store) -> None:
    clock = Clock(at(0))
    v = StoreSecrets(store, [MasterKey.generate()], clock, keep=5, retention=30 * DAY)
    await v.set("k", "one")
    clock.now = at(10)
    await v.set("k", "two")
    assert await versions(store, "k") == [1, 2]  # replaced 0 s ago: kept
    clock.now = at(30 * DAY + 10)
    await v.set("k", "three")  # v1 was replaced 30 days ago: it goes
    assert await versions(store, "k") == [2, 3]
    assert await v.get("k", version=2) == "two"
    for i in range(4, 9):
        await v.set("k", str(i))  # the count still caps them
    assert await versions(store, "k") == [4, 5, 6, 7, 8]

    none_kept = StoreSecrets(store, [MasterKey.generate()], clock, retention=0.0)
    await none_kept.set("z", "a")
    await none_kept.set("z", "b")
    assert await versions(store, "z") == [2]


def test_the_retention_setting() -> None:
    assert Settings().secrets_retention == 30 * DAY
    env = {"CONVEYOR_SECRETS_RETENTION": "3600"}
    assert Settings.from_env(env).secrets_retention == 3600.0
    for bad in ("-1", "nan", "1e12", "soon"):
        with pytest.raises(ConfigurationError, match=r"(?i)secrets_retention"):
            Settings.from_env({"CONVEYOR_SECRETS_RETENTION": bad})


async def test_workers_prune_old_versions(store: Store) -> None:
    # Versions written on a clock 60 days back: the first maintenance pass of a
    # worker (on the real clock) drops the replaced one.
    old = StoreSecrets(store, [MasterKey.generate()], lambda: at(0))
    await old.set("legacy", "one")
    await old.set("legacy", "two")
    async with app_on(store, heartbeat_interval=0.1, heartbeat_timeout=1.0) as app:
        assert app.now() > at(31 * DAY)
        async with running_worker(app):

            async def pruned() -> bool:
                return await versions(store, "legacy") == [2]

            await async_wait_until(pruned, 20, "the worker to prune version 1")


def digest(ctx: JobContext, token: str) -> str:
    """The SHA-256 of the resolved secret (never the value itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


async def test_a_workers_cached_value_is_dropped_on_rotation(store: Store) -> None:
    key = MasterKey.generate()

    def register(app: Conveyor) -> None:
        app.job("digest", max_retries=0)(digest)

    async with app_on(store, register, master_key=key.to_base64(), secrets_cache_ttl=300.0) as app:
        elsewhere = StoreSecrets(store, [key], app.now)  # another process's vault
        await elsewhere.set("api_token", "first")
        ref = {"token": {"$secret": "api_token"}}
        async with running_worker(app):
            first = await app.enqueue("digest", ref)
            await finished(app, [first.id])
            assert app.secrets._cache["api_token"][1] == "first"  # cached for 5 min
            await elsewhere.set("api_token", "second")  # rotated by another process
            second = await app.enqueue("digest", ref)
            await finished(app, [second.id])
            await elsewhere.delete("api_token")
            third = await app.enqueue("digest", ref)
            jobs = await finished(app, [first.id, second.id, third.id])
    assert jobs[first.id].result == hashlib.sha256(b"first").hexdigest()
    assert jobs[second.id].result == hashlib.sha256(b"second").hexdigest()
    assert jobs[third.id].state is JobState.FAILED  # not served from the cache
    assert "api_token" in (jobs[third.id].error or "")
