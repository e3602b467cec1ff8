"""Fixtures of the bus contract suite (``pytest_plugins`` of ``test_bus.py``).

``bus`` runs each test once per adapter (ids ``memory`` and ``redis``).
``peer`` is a second handle on the same bus, as another process would have
one: the same ``MemoryBus`` object, or a second ``RedisBus`` (own connections)
with the same key prefix. Each Redis test has its own prefix
(``test-<uuid>``), so tests never see each other's keys.

``redis_server`` and ``private_redis_server`` live in ``tests/conftest.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from conveyor.bus.base import EventBus
from conveyor.bus.memory import MemoryBus
from conveyor.bus.redis import RedisBus
from redis_server import RedisServer

ADAPTERS = ["memory", "redis"]


@pytest.fixture(params=ADAPTERS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        adapter: EventBus = MemoryBus()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        adapter = RedisBus(server.url, prefix=f"test-{uuid.uuid4().hex}")
    await adapter.open()
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest.fixture
async def redis_bus(redis_server: RedisServer) -> AsyncIterator[RedisBus]:
    """For the Redis-only tests: a bus with its own prefix on the session's server."""
    adapter = RedisBus(redis_server.url, prefix=f"test-{uuid.uuid4().hex}")
    await adapter.open()
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest.fixture
async def peer(bus: EventBus) -> AsyncIterator[EventBus]:
    if isinstance(bus, RedisBus):
        other = RedisBus(bus._url, prefix=bus.keys.prefix)
        await other.open()
        try:
            yield other
        finally:
            await other.close()
    else:
        yield bus
