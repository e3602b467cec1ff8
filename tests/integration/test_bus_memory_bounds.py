"""The in-process bus holds a bounded number of bytes, whatever the events carry.

Measured with the bus's own accounting (``MemoryBus.accounted_bytes``: encoded
payload bytes kept in streams and in subscribers' backlogs), not with RSS.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson

from conveyor import Conveyor, JobContext, Settings
from conveyor.bus.base import Message
from conveyor.bus.memory import DEFAULT_MAX_STREAM_BYTES, MemoryBus
from conveyor.bus.redis import RedisBus
from conveyor.runtime.relay import EVENTS_STREAM
from conveyor.storage.base import EVENT_RESULT_MAX_BYTES
from support import async_wait_until, running_worker

KIB = 1024
MIB = 1024 * KIB


def blob(n: int, size: int) -> dict[str, object]:
    return {"n": n, "blob": "x" * size}


async def test_a_stream_keeps_at_most_max_stream_bytes() -> None:
    bus = MemoryBus(max_stream_bytes=1 * MIB)
    entry = len(orjson.dumps(blob(0, 64 * KIB)))
    ids: list[str] = []
    for n in range(300):
        ids += await bus.append("s", [blob(n, 64 * KIB)], maxlen=10_000)
        assert bus.accounted_bytes() <= 1 * MIB
    kept = await bus.read("s", "0", 10_000)
    assert len(kept) == 1 * MIB // entry  # the newest that fit, not 300
    assert kept[-1].id == ids[-1]
    assert [e.payload["n"] for e in kept] == list(range(300 - len(kept), 300))
    assert (await bus.health()).detail["bytes"] == bus.accounted_bytes()
    await bus.close()


async def test_an_entry_larger_than_the_budget_is_kept_alone_until_the_next() -> None:
    bus = MemoryBus(max_stream_bytes=1 * MIB)
    await bus.append("s", [blob(0, 10 * KIB)], maxlen=100)
    (big,) = await bus.append("s", [blob(1, 2 * MIB)], maxlen=100)
    assert [e.id for e in await bus.read("s", "0", 10)] == [big]
    await bus.append("s", [blob(2, 10 * KIB)], maxlen=100)
    assert [e.payload["n"] for e in await bus.read("s", "0", 10)] == [2]
    assert bus.accounted_bytes() < 20 * KIB
    await bus.close()


async def test_a_slow_subscriber_holds_a_bounded_backlog_and_gets_the_newest() -> None:
    bus = MemoryBus(max_stream_bytes=1 * MIB)
    release = asyncio.Event()
    got: list[int] = []

    async def slow(message: Message) -> None:
        await release.wait()
        got.append(message.payload["n"])

    sub = await bus.subscribe("t", slow)
    for n in range(200):
        await bus.publish("t", blob(n, 64 * KIB))
        assert bus.accounted_bytes() <= 1 * MIB
    release.set()
    await async_wait_until(lambda: _settled(got, 199), 10, "the newest message handled")
    # What fits in the budget (plus one the handler may have taken early), not 200.
    assert 1 < len(got) <= 1 * MIB // (64 * KIB) + 1
    assert got == sorted(got)  # still in publish order
    assert bus.accounted_bytes() == 0
    await sub.close()
    await bus.close()


async def _settled(got: list[int], last: int) -> bool:
    return bool(got) and got[-1] == last


def test_the_budget_comes_from_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("CONVEYOR_EVENT_STREAM_MAX_BYTES", str(5 * MIB))
    app = Conveyor("memory://")
    assert isinstance(app.bus, MemoryBus)
    assert app.bus.max_stream_bytes == 5 * MIB
    default = Conveyor("memory://", settings=Settings()).bus
    assert isinstance(default, MemoryBus)
    assert default.max_stream_bytes == DEFAULT_MAX_STREAM_BYTES == Settings().event_stream_max_bytes


async def test_subscribing_to_large_results_keeps_the_bus_small(tmp_path: Path) -> None:
    """The docs' ``app.bus.subscribe`` with jobs returning 1 MB each: events carry a
    marker instead of the result, the bus stays within its budget, and the result
    is on the job."""
    app = Conveyor(
        settings=Settings(
            database_url="memory://",
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            event_poll_interval=0.02,
            event_stream_max_bytes=256 * KIB,
        )
    )

    @app.job("report")
    async def report(ctx: JobContext, n: int) -> dict[str, object]:
        return blob(n, MIB)

    seen: list[dict[str, object]] = []
    peak = 0

    async def on_completed(message: Message) -> None:
        nonlocal peak
        seen.append(message.payload)
        assert isinstance(app.bus, MemoryBus)
        peak = max(peak, app.bus.accounted_bytes())

    async with app:
        sub = await app.bus.subscribe("job_completed", on_completed)
        async with running_worker(app, 10):
            jobs = [await app.enqueue("report", {"n": n}) for n in range(40)]
            await async_wait_until(
                lambda: _count(seen, 40), 30, "40 job_completed events on the bus"
            )
        await sub.close()
        assert isinstance(app.bus, MemoryBus)
        assert peak <= 256 * KIB
        assert app.bus.accounted_bytes() <= 256 * KIB
        sizes = {j.id: len(orjson.dumps(blob(n, MIB))) for n, j in enumerate(jobs)}
        assert min(sizes.values()) > EVENT_RESULT_MAX_BYTES
        for event in seen:
            data = event["data"]
            assert isinstance(data, dict)
            assert data["result"] is None
            assert data["result_truncated"] is True
            assert data["result_size"] == sizes[str(event["job_id"])]
        stream = await app.bus.read(EVENTS_STREAM, "0", 10_000)
        assert stream, "the relay appended to the stream"
        full = await app.store.get(jobs[0].id)
        assert full.result == blob(0, MIB)


async def _count(seen: list[dict[str, object]], n: int) -> bool:
    return len(seen) >= n


async def test_a_slow_subscriber_of_the_redis_bus_holds_a_bounded_backlog(redis_server) -> None:
    bus = RedisBus(
        redis_server.url, prefix=f"test-{uuid.uuid4().hex}", max_subscriber_bytes=1 * MIB
    )
    await bus.open()
    release = asyncio.Event()
    got: list[int] = []

    async def slow(message: Message) -> None:
        await release.wait()
        got.append(message.payload["n"])

    try:
        sub = await bus.subscribe("t", slow)
        for n in range(100):
            await bus.publish("t", blob(n, 64 * KIB))
        await async_wait_until(lambda: _all_arrived(bus, 100), 10, "all 100 messages to arrive")
        mailboxes = [m for boxes in bus._patterns.values() for m in boxes]
        assert all(m.queued_bytes <= 1 * MIB for m in mailboxes)
        release.set()
        await async_wait_until(lambda: _settled(got, 99), 10, "the newest message handled")
        assert 1 < len(got) <= 1 * MIB // (64 * KIB) + 1
        assert got == sorted(got)
        await sub.close()
    finally:
        await bus.close()


async def _all_arrived(bus: RedisBus, n: int) -> bool:
    """Every message was dropped or is queued (one more may be in the handler's hands)."""
    mailboxes = [m for boxes in bus._patterns.values() for m in boxes]
    return sum(m.dropped + m._queue.qsize() for m in mailboxes) >= n - 1
