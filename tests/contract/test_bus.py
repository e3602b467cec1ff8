"""The EventBus contract: every adapter (``memory``, ``redis``) passes these tests.

Negative checks ("X was not delivered") never wait for time to pass: a marker
published after X by the same publisher arrives after X would have, so once
the marker is in, X is known to be absent.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from conveyor.bus.base import (
    BusError,
    BusTimeout,
    ConsumerOptions,
    Entry,
    EntryHandler,
    EventBus,
    Message,
    MessageHandler,
    Payload,
    RequestHandler,
)
from conveyor.bus.redis import RedisBus
from redis_server import RedisServer

# The fixtures (bus, peer, redis_bus, redis_server, private_redis_server) live in buskit.py.
pytest_plugins = ["buskit"]

FAST = ConsumerOptions(block=0.05, claim_idle=0.2, max_deliveries=3)


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or predicate}")
        await asyncio.sleep(0.01)  # poll interval of a deadline-bounded wait


class Inbox:
    """Collects what a handler receives; ``wait_for(n)`` waits on a signal, not a sleep."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.items


def collect(inbox: Inbox) -> MessageHandler:
    async def handler(message: Message) -> None:
        inbox.add(message)

    return handler


# -- fan-out --------------------------------------------------------------------------------


async def test_exact_topic_gets_only_its_own_messages(bus: EventBus) -> None:
    inbox = Inbox()
    await bus.subscribe("job_completed", collect(inbox))
    await bus.publish("job_failed", {"n": 1})
    await bus.publish("job_completed_late", {"n": 2})
    await bus.publish("job_completed", {"n": 3})
    got = await inbox.wait_for(1)
    assert got == [Message("job_completed", {"n": 3})]


async def test_glob_patterns(bus: EventBus) -> None:
    jobs, everything = Inbox(), Inbox()
    await bus.subscribe("job_*", collect(jobs))
    await bus.subscribe("*", collect(everything))
    for topic in ("job_completed", "workflow_completed", "job_failed"):
        await bus.publish(topic, {"topic": topic})
    await everything.wait_for(3)
    await jobs.wait_for(2)
    assert [m.topic for m in everything.items] == [
        "job_completed",
        "workflow_completed",
        "job_failed",
    ]
    assert [m.topic for m in jobs.items] == ["job_completed", "job_failed"]


async def test_subscribers_on_other_connections_get_messages(bus: EventBus, peer: EventBus) -> None:
    inbox = Inbox()
    await peer.subscribe("job_*", collect(inbox))
    await bus.publish("job_started", {"id": "j1", "nested": {"a": [1, 2]}})
    assert await inbox.wait_for(1) == [
        Message("job_started", {"id": "j1", "nested": {"a": [1, 2]}})
    ]


async def test_unsubscribe_stops_delivery(bus: EventBus) -> None:
    closed, kept = Inbox(), Inbox()
    sub = await bus.subscribe("t", collect(closed))
    await bus.subscribe("t", collect(kept))
    await bus.publish("t", {"n": 1})
    await closed.wait_for(1)
    await kept.wait_for(1)
    await sub.close()
    await bus.publish("t", {"n": 2})
    await kept.wait_for(2)
    assert [m.payload["n"] for m in closed.items] == [1]


async def test_last_unsubscribe_of_a_pattern_then_resubscribe(bus: EventBus) -> None:
    first = Inbox()
    async with await bus.subscribe("t", collect(first)):
        await bus.publish("t", {"n": 1})
        await first.wait_for(1)
    again = Inbox()
    await bus.subscribe("t", collect(again))
    await bus.publish("t", {"n": 2})
    assert [m.payload["n"] for m in await again.wait_for(1)] == [2]
    assert len(first.items) == 1


async def test_messages_arrive_in_publish_order(bus: EventBus) -> None:
    inbox = Inbox()
    await bus.subscribe("seq", collect(inbox))
    for i in range(1000):
        await bus.publish("seq", {"i": i})
    got = await inbox.wait_for(1000, timeout=10)
    assert [m.payload["i"] for m in got] == list(range(1000))


async def test_failing_handler_keeps_its_subscription(bus: EventBus) -> None:
    inbox = Inbox()

    async def flaky(message: Message) -> None:
        inbox.add(message)
        if message.payload["n"] % 2 == 0:
            raise RuntimeError("handler bug")

    await bus.subscribe("t", flaky)
    for n in range(4):
        await bus.publish("t", {"n": n})
    got = await inbox.wait_for(4)
    assert [m.payload["n"] for m in got] == [0, 1, 2, 3]


async def test_slow_handler_does_not_block_publish_or_others(bus: EventBus) -> None:
    gate = asyncio.Event()
    fast = Inbox()

    async def stuck(message: Message) -> None:
        await gate.wait()

    await bus.subscribe("t", stuck)
    await bus.subscribe("t", collect(fast))
    for n in range(50):
        await bus.publish("t", {"n": n})
    await fast.wait_for(50)
    gate.set()


async def test_publish_many_keeps_order(bus: EventBus) -> None:
    inbox = Inbox()
    await bus.subscribe("batch_*", collect(inbox))
    messages = [Message(f"batch_{i % 3}", {"i": i}) for i in range(300)]
    await bus.publish_many(messages)
    await bus.publish_many([])
    assert await inbox.wait_for(300) == messages


async def test_unserialisable_payload_is_rejected(bus: EventBus) -> None:
    with pytest.raises(BusError, match="JSON"):
        await bus.publish("t", {"x": object()})


# -- request / reply ------------------------------------------------------------------------


async def test_request_reply_round_trip(bus: EventBus, peer: EventBus) -> None:
    async def double(message: Message) -> Payload:
        return {"double": message.payload["n"] * 2, "topic": message.topic}

    await peer.respond("math.double", double)
    replies = await asyncio.gather(
        *(bus.request("math.double", {"n": n}, timeout=5) for n in range(20))
    )
    assert replies == [{"double": n * 2, "topic": "math.double"} for n in range(20)]


async def test_each_request_goes_to_one_responder(bus: EventBus, peer: EventBus) -> None:
    calls: list[str] = []

    def responder(name: str) -> RequestHandler:
        async def handle(message: Message) -> Payload:
            calls.append(name)
            return {"by": name}

        return handle

    await bus.respond("who", responder("a"))
    await peer.respond("who", responder("b"))
    for _ in range(10):
        await bus.request("who", {}, timeout=5)
    assert len(calls) == 10


async def test_request_without_responder_times_out(bus: EventBus) -> None:
    started = time.monotonic()
    with pytest.raises(BusTimeout, match="no reply") as info:
        await bus.request(f"nobody-{uuid.uuid4().hex}", {"q": 1}, timeout=0.3)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert elapsed < 0.3 + 2.0, f"request took {elapsed:.2f}s for a 0.3s timeout"


async def test_failing_responder_answers_with_an_error(bus: EventBus) -> None:
    async def broken(message: Message) -> Payload:
        raise ValueError("no such account")

    await bus.respond("acct", broken)
    with pytest.raises(BusError, match="no such account"):
        await bus.request("acct", {}, timeout=5)


# -- durable streams ------------------------------------------------------------------------


def stream_name() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def test_append_and_replay(bus: EventBus) -> None:
    s = stream_name()
    ids = await bus.append(s, [{"n": n} for n in range(10)], maxlen=1000)
    assert len(ids) == 10
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids})  # strictly increasing
    assert [e.payload["n"] for e in await bus.read(s, "0", 100)] == list(range(10))
    after = await bus.read(s, ids[4], 3)
    assert [(e.id, e.payload["n"]) for e in after] == [(ids[n], n) for n in (5, 6, 7)]
    assert await bus.read(s, ids[-1], 10) == []
    assert await bus.read(stream_name(), "0", 10) == []
    more = await bus.append(s, [{"n": 10}], maxlen=1000)
    assert id_key(more[0]) > id_key(ids[-1])


async def test_maxlen_trims_oldest(bus: EventBus) -> None:
    s = stream_name()
    ids: list[str] = []
    for start in range(0, 500, 50):
        ids += await bus.append(s, [{"n": n} for n in range(start, start + 50)], maxlen=20)
    kept = await bus.read(s, "0", 1000)
    # Redis trims approximately (whole nodes of 100 entries): about maxlen, never fewer.
    assert 20 <= len(kept) <= 20 + 150
    assert kept[-1].id == ids[-1]
    assert kept[0].id != ids[0]
    assert [e.payload["n"] for e in kept] == list(range(500 - len(kept), 500))


async def test_group_delivers_each_entry_once_across_consumers(
    bus: EventBus, peer: EventBus
) -> None:
    s = stream_name()
    seen: list[tuple[str, str]] = []

    def consumer(name: str) -> EntryHandler:
        async def handle(entry: Entry) -> None:
            seen.append((name, entry.id))
            await asyncio.sleep(0)  # wait-ok: yield so the other consumer runs

        return handle

    opts = ConsumerOptions(batch=10, block=0.05)
    await bus.consume(s, "g", "c1", consumer("c1"), opts)
    await peer.consume(s, "g", "c2", consumer("c2"), opts)
    ids = await bus.append(s, [{"n": n} for n in range(200)], maxlen=10_000)
    await eventually(lambda: len(seen) >= 200, what="200 entries handled")
    # A late marker: once it is handled, every earlier entry has been (at most once).
    marker = await bus.append(s, [{"n": "marker"}], maxlen=10_000)
    await eventually(lambda: any(i == marker[0] for _, i in seen), what="marker handled")
    handled = [i for _, i in seen if i != marker[0]]
    assert sorted(handled, key=id_key) == ids


async def test_group_start_dollar_skips_existing_entries(bus: EventBus) -> None:
    s = stream_name()
    await bus.append(s, [{"n": "old"}], maxlen=100)
    inbox = Inbox()

    async def handle(entry: Entry) -> None:
        inbox.add(entry.payload["n"])

    await bus.consume(s, "g", "c1", handle, ConsumerOptions(block=0.05, start="$"))
    await bus.append(s, [{"n": "new"}], maxlen=100)
    assert await inbox.wait_for(1) == ["new"]


async def test_failed_entry_is_redelivered(bus: EventBus) -> None:
    s = stream_name()
    deliveries: list[tuple[int, int]] = []

    async def handle(entry: Entry) -> None:
        deliveries.append((entry.payload["n"], entry.deliveries))
        if entry.payload["n"] == 1 and entry.deliveries == 1:
            raise RuntimeError("transient")

    await bus.consume(s, "g", "c1", handle, FAST)
    await bus.append(s, [{"n": n} for n in range(3)], maxlen=100)
    await eventually(lambda: (1, 2) in deliveries, what="entry 1 redelivered")
    assert sorted(deliveries) == [(0, 1), (1, 1), (1, 2), (2, 1)]
    assert await bus.dead_letters(s) == []


async def test_dead_consumers_entries_are_reclaimed(bus: EventBus, peer: EventBus) -> None:
    s = stream_name()
    started = asyncio.Event()

    async def dies(entry: Entry) -> None:
        started.set()
        await asyncio.Event().wait()  # hangs until its consumer is closed: a dead process

    ids = await bus.append(s, [{"n": n} for n in range(5)], maxlen=100)
    dead = await bus.consume(s, "g", "doomed", dies, FAST)
    await asyncio.wait_for(started.wait(), 5)
    await dead.close()

    rescued: dict[str, int] = {}

    async def survivor(entry: Entry) -> None:
        rescued[entry.id] = entry.deliveries

    await peer.consume(s, "g", "survivor", survivor, FAST)
    await eventually(lambda: len(rescued) == 5, what="all 5 entries reclaimed")
    assert sorted(rescued, key=id_key) == ids
    assert all(n >= 2 for n in rescued.values()), rescued


async def test_restarted_consumer_gets_its_own_pending_entries_first(bus: EventBus) -> None:
    s = stream_name()
    started = asyncio.Event()

    async def hangs(entry: Entry) -> None:
        started.set()
        await asyncio.Event().wait()

    ids = await bus.append(s, [{"n": n} for n in range(3)], maxlen=100)
    slow = ConsumerOptions(block=0.05, claim_idle=60)  # no reclaiming: only its own history
    first = await bus.consume(s, "g", "worker-1", hangs, slow)
    await asyncio.wait_for(started.wait(), 5)
    await first.close()

    got: list[Entry] = []

    async def handle(entry: Entry) -> None:
        got.append(entry)

    await bus.consume(s, "g", "worker-1", handle, slow)
    await eventually(lambda: len(got) == 3, what="pending entries re-read")
    assert [e.id for e in got] == ids
    assert [e.deliveries for e in got] == [2, 2, 2]


async def test_max_deliveries_moves_entry_to_dead_letters(bus: EventBus) -> None:
    s = stream_name()
    calls: list[int] = []

    async def handle(entry: Entry) -> None:
        if entry.payload["n"] == "poison":
            calls.append(entry.deliveries)
            raise ValueError("cannot parse")

    ids = await bus.append(s, [{"n": 0}, {"n": "poison"}, {"n": 2}], maxlen=100)
    await bus.consume(
        s, "g", "c1", handle, ConsumerOptions(block=0.05, claim_idle=0.1, max_deliveries=3)
    )

    async def dead() -> bool:
        return bool(await bus.dead_letters(s))

    await eventually(dead, what="poison entry dead-lettered")
    assert await bus.dead_letters(s) == [Entry(ids[1], {"n": "poison"}, 3)]
    assert calls == [1, 2, 3]
    # Dead letters are an ordinary stream too, readable for replay.
    assert [e.payload for e in await bus.read(f"{s}:dead", "0", 10)] == [{"n": "poison"}]


async def test_health(bus: EventBus) -> None:
    health = await bus.health()
    assert health.ok
    assert health.backend == bus.backend


# -- Redis only -----------------------------------------------------------------------------


async def test_redis_open_unreachable_names_the_url_without_password() -> None:
    from redis_server import free_port

    port = free_port()
    bus = RedisBus(f"redis://:hunter2@127.0.0.1:{port}/0")
    started = time.monotonic()
    with pytest.raises(BusError, match=f"127.0.0.1:{port}") as info:
        await bus.open()
    assert "hunter2" not in str(info.value)
    assert time.monotonic() - started < 10
    await bus.close()


async def test_redis_consumer_recreates_a_deleted_group(redis_bus: RedisBus) -> None:
    bus = redis_bus
    s = stream_name()
    inbox = Inbox()

    async def handle(entry: Entry) -> None:
        inbox.add(entry.payload["n"])

    await bus.consume(s, "g", "c1", handle, ConsumerOptions(block=0.05))
    await bus.append(s, [{"n": 1}], maxlen=100)
    await inbox.wait_for(1)
    await bus.client.delete(bus.keys.stream(s))  # stream and group gone: XREADGROUP -> NOGROUP

    async def delivered_again() -> bool:
        await bus.append(s, [{"n": 2}], maxlen=100)  # may land before the group is back
        try:
            await inbox.wait_for(2, timeout=0.2)
        except TimeoutError:
            return False
        return True

    await eventually(delivered_again, what="the consumer recreated its group")


async def test_redis_restart_durable_consumer_resumes(private_redis_server: RedisServer) -> None:
    server = private_redis_server
    bus = RedisBus(server.url, prefix=f"test-{uuid.uuid4().hex}")
    await bus.open()
    try:
        handled: set[int] = set()
        gate = asyncio.Event()
        holding = asyncio.Event()

        async def handle(entry: Entry) -> None:
            n = entry.payload["n"]
            if n >= 50 and not gate.is_set():
                holding.set()  # entries 50.. are now pending on this consumer
                await gate.wait()
            handled.add(n)

        pings = Inbox()
        await bus.subscribe("ping", collect(pings))
        await bus.consume("orders", "g", "c1", handle, ConsumerOptions(block=0.1, claim_idle=30))

        await bus.append("orders", [{"n": n} for n in range(50)], maxlen=10_000)
        await eventually(lambda: len(handled) == 50, what="first 50 handled")
        await bus.append("orders", [{"n": n} for n in range(50, 100)], maxlen=10_000)
        await asyncio.wait_for(holding.wait(), 5)

        with capture_logs() as logs:
            server.kill()  # SIGKILL with entries read but not acknowledged
            gate.set()  # the handler returns; its XACK meets a dead server

            def logged(event: str) -> Callable[[], bool]:
                return lambda: any(log["event"] == event for log in logs)

            # Down long enough that both loops gave up on redis-py's retries and back off.
            await eventually(logged("bus.consumer_disconnected"), timeout=10)
            await eventually(logged("bus.pubsub_disconnected"), timeout=10)
            assert not (await bus.health()).ok
        server.start()  # same port and directory: the AOF restores stream and group

        await bus.append("orders", [{"n": n} for n in range(100, 150)], maxlen=10_000)
        await eventually(lambda: handled == set(range(150)), timeout=20, what="all 150 handled")

        # Pub/sub is back too: the reader re-subscribed after reconnecting.
        async def ping_arrives() -> bool:
            await bus.publish("ping", {"at": time.monotonic()})
            try:
                await pings.wait_for(1, timeout=0.2)
            except TimeoutError:
                return False
            return True

        await eventually(ping_arrives, timeout=15, what="pub/sub works after restart")
        assert (await bus.health()).ok
    finally:
        await bus.close()
