"""``conveyor_redis_command_seconds``: the bus, Redis locks and the rate limiter time
their commands against a real Redis, and the series show on ``/metrics``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from contract.appkit import api_client
from conveyor.api.ratelimit import RequestLimits
from conveyor.app import Conveyor
from conveyor.bus.base import Message
from conveyor.bus.redis import RedisBus
from conveyor.observability.metrics import Metrics
from conveyor.settings import Settings
from conveyor.storage.redis_locks import RedisLocks
from redis_server import RedisServer

NAME = "conveyor_redis_command_seconds"


def counts(text: str) -> dict[tuple[str, str], float]:
    """``(client, op)`` -> observations of the histogram in a scrape."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != NAME:
            continue
        for s in family.samples:
            if s.name == f"{NAME}_count":
                out[(s.labels["client"], s.labels["op"])] = s.value
    return out


def delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict:
    """What changed (the family is process-wide: other tests may have counted)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def scrape() -> dict[tuple[str, str], float]:
    return counts(Metrics(process_collector=False).render().decode())


async def test_bus_commands_are_timed_by_op(redis_server: RedisServer) -> None:
    bus = RedisBus(redis_server.url, prefix=f"m-{uuid.uuid4().hex}")
    before = scrape()
    await bus.open()
    try:
        await bus.publish("topic", {"n": 1})
        await bus.publish_many([Message("topic", {"n": i}) for i in range(5)])
        ids = await bus.append("s", [{"n": 1}, {"n": 2}], maxlen=100)
        assert len(await bus.read("s", "0", 10)) == len(ids) == 2
        assert (await bus.health()).ok
    finally:
        await bus.close()
    got = delta(before, scrape())
    assert got[("bus", "publish")] == 1
    assert got[("bus", "pipeline")] == 2  # publish_many and append: one round trip each
    assert got[("bus", "xrange")] == 1
    assert got[("bus", "ping")] >= 2  # open and health
    assert all(client == "bus" for client, _ in got)


async def test_blocking_reads_are_not_timed(redis_server: RedisServer) -> None:
    bus = RedisBus(redis_server.url, prefix=f"m-{uuid.uuid4().hex}")
    await bus.open()
    try:

        async def answer(message: Message) -> object:
            return {"echo": message.payload}

        sub = await bus.respond("rpc", answer)
        before = scrape()
        assert await bus.request("rpc", {"x": 1}, timeout=10) == {"echo": {"x": 1}}
        await sub.close()
    finally:
        await bus.close()
    got = delta(before, scrape())
    assert got[("bus", "rpush")] == 1  # the request
    assert ("bus", "blpop") not in got  # the responder's wait for it


async def test_lock_scripts_are_timed_by_their_name(redis_server: RedisServer) -> None:
    locks = RedisLocks(redis_server.url, prefix=f"m-{uuid.uuid4().hex}")
    before = scrape()
    now = datetime.now(UTC)
    try:
        token = await locks.acquire_lock("k", "me", 30, now)
        assert token is not None
        assert await locks.release_lock("k", "me", token, now)
        assert await locks.list_locks(now) == []
    finally:
        await locks.close()
    got = delta(before, scrape())
    assert got[("locks", "acquire")] >= 1  # twice when Redis had to load the script first
    assert got[("locks", "release")] >= 1
    assert got[("locks", "scan")] >= 1
    assert ("locks", "evalsha") not in got


async def test_shared_rate_limit_checks_are_timed(redis_server: RedisServer) -> None:
    limits = RequestLimits("100/minute", "5/minute", redis_server.url)
    before = scrape()
    try:
        for _ in range(3):
            await limits.key_used(f"key-{uuid.uuid4().hex}")
    finally:
        # The limits library's own client (it has no close of its own): closed in
        # this loop, not collected after it.
        await limits.storage.bridge.storage.aclose()  # type: ignore[attr-defined]
    assert delta(before, scrape()) == {("ratelimit", "hit"): 3}
    local = RequestLimits("100/minute", "5/minute")  # in-process counters: no Redis
    before = scrape()
    await local.key_used("key")
    assert delta(before, scrape()) == {}


async def test_the_series_show_on_the_api_metrics_after_bus_use(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    app = Conveyor(
        settings=Settings(database_url=f"sqlite:///{tmp_path}/r.db", redis_url=redis_server.url)
    )
    async with app, api_client(app) as client:
        await app.bus.publish("metrics-test", {"n": 1})
        text = (await client.get("/metrics")).text
    assert f"# TYPE {NAME} histogram" in text
    assert counts(text)[("bus", "publish")] >= 1
    assert f'{NAME}_bucket{{client="bus",op="publish",le="0.001"}}' in text
