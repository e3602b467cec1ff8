"""Events end to end on SQLite: the outbox relay to the bus, ``GET /api/events``,
the WebSocket stream (resume without gap or duplicate) and the event hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import conveyor.demo
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.bus.base import Message
from conveyor.bus.memory import MemoryBus
from conveyor.domain.events import EventFilter
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.domain.webhooks import Webhook
from conveyor.runtime.hub import EventHub
from conveyor.runtime.relay import EVENTS_STREAM, OutboxConsumer, bus_relay, skip_unheard
from conveyor.runtime.webhooks import WebhookDispatcher
from conveyor.security.api_keys import new_api_key
from conveyor.settings import Settings
from support import ServedApi, async_wait_until, running_worker


def settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path}/events.db",
        poll_interval=0.05,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        shutdown_grace=2.0,
        event_poll_interval=0.02,
        **extra,
    )


@pytest.fixture
async def cv(tmp_path: Path) -> AsyncIterator[Conveyor]:
    app = Conveyor(settings=settings(tmp_path))
    conveyor.demo.register(app)
    await app.open()
    try:
        yield app
    finally:
        await app.close()


async def all_event_ids(app: Conveyor) -> list[int]:
    out, cursor = [], 0
    while batch := await app.store.events_after(cursor, 1000):
        out.extend(e.id for e in batch)
        cursor = batch[-1].id
    return out


# -- relay ----------------------------------------------------------------------------------------
async def test_the_worker_relays_every_lifecycle_event_to_the_bus(cv: Conveyor) -> None:
    seen: list[dict[str, Any]] = []

    async def collect(message: Message) -> None:
        seen.append(message.payload)

    sub = await cv.bus.subscribe("job_*", collect)
    async with running_worker(cv, 50):
        jobs = [await cv.enqueue("test_job", {"n": i}) for i in range(30)]

        async def relayed() -> bool:
            return sum(1 for p in seen if p["type"] == "job_completed") == 30

        await async_wait_until(relayed, 20, "30 job_completed on the bus")
    await sub.close()
    completed = [p for p in seen if p["type"] == "job_completed"]
    assert {p["job_id"] for p in completed} == {j.id for j in jobs}
    first = completed[0]
    assert first["version"] == 1
    assert first["job_type"] == "test_job"
    assert first["queue"] == "default"
    assert "result" in first["data"]
    assert "duration_ms" in first["data"]
    ids = [p["id"] for p in seen]
    assert ids == sorted(ids)  # one publisher, in outbox order
    stream = await cv.bus.read(EVENTS_STREAM, "0", 10_000)
    assert {e.payload["id"] for e in stream} >= set(ids)


async def test_only_one_relay_works_at_a_time_and_another_takes_over(cv: Conveyor) -> None:
    await cv.submit_many([cv.new_job("test_job") for _ in range(120)])
    bus = MemoryBus()
    got: list[int] = []

    async def handler(events: Any) -> None:
        got.extend(e.id for e in events)
        await bus.publish("x", {})

    a = OutboxConsumer(cv.store, "relay", handler, clock=cv.now, batch=50, lease_ttl=0.5)
    b = OutboxConsumer(cv.store, "relay", handler, clock=cv.now, batch=50, lease_ttl=0.5)
    assert await a.step() == 50
    assert await b.step() == 0  # a holds the lease
    assert not b.leader
    # a dies without releasing; once its lease expires, b continues from a's position.
    await async_wait_until(lambda: _step(b), 5, "b to take over")
    while await b.step():
        pass
    assert got == sorted(set(got))  # nothing twice, in order
    assert got == await all_event_ids(cv)


async def _step(consumer: OutboxConsumer) -> bool:
    return await consumer.step() > 0


async def test_relay_handler_failure_is_retried_from_the_same_position(cv: Conveyor) -> None:
    await cv.submit_many([cv.new_job("test_job") for _ in range(10)])
    calls: list[list[int]] = []

    async def flaky(events: Any) -> None:
        calls.append([e.id for e in events])
        if len(calls) == 1:
            raise ConnectionError("bus down")

    relay = OutboxConsumer(cv.store, "relay", flaky, clock=cv.now, batch=100)
    with pytest.raises(ConnectionError):
        await relay.step()
    assert await relay.step() == 10
    assert calls[0] == calls[1]


async def test_bus_relay_appends_then_publishes(cv: Conveyor) -> None:
    await cv.submit_many([cv.new_job("test_job") for _ in range(5)])
    bus = MemoryBus()
    relay = OutboxConsumer(cv.store, "relay", bus_relay(bus, stream_maxlen=3), clock=cv.now)
    assert await relay.step() == 5
    entries = await bus.read(EVENTS_STREAM, "0", 100)
    assert 3 <= len(entries) <= 5  # trimmed to about maxlen
    assert entries[-1].payload["type"] == "job_submitted"


# -- GET /api/events ------------------------------------------------------------------------------
async def test_get_events_filters_and_pages_with_next_after(cv: Conveyor) -> None:
    async with running_worker(cv, 50):
        jobs = [await cv.enqueue("test_job", {"n": i}) for i in range(12)]

        async def done() -> bool:
            return all([(await cv.store.get(j.id)).status == "completed" for j in jobs])

        await async_wait_until(done, 20, "jobs to complete")
    api = create_app(cv)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        first = (
            await client.get("/api/events", params={"types": "job_completed", "limit": 5})
        ).json()
        assert first["success"] is True
        assert [e["type"] for e in first["events"]] == ["job_completed"] * 5
        second = (
            await client.get(
                "/api/events",
                params={"types": "job_completed", "limit": 100, "after": first["next_after"]},
            )
        ).json()
        ids = [e["job_id"] for e in first["events"] + second["events"]]
        assert sorted(ids) == sorted(j.id for j in jobs)
        assert len(set(ids)) == 12
        one = (await client.get("/api/events", params={"job_id": jobs[0].id})).json()
        assert {e["job_id"] for e in one["events"]} == {jobs[0].id}
        assert one["events"][0]["type"] == "job_submitted"
        bad = await client.get("/api/events", params={"types": "job_finished"})
        assert bad.status_code == 400
        assert "matches no event type" in bad.json()["details"][0]["message"]
        assert (await client.get("/api/events", params={"after": -1})).status_code == 400


# -- WebSocket ------------------------------------------------------------------------------------
async def read_events(ws: Any, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    """At least ``n`` events (each frame is a JSON array of envelopes)."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            frame = orjson.loads(await ws.recv())
            assert isinstance(frame, list), frame
            assert frame, "empty frame"
            out.extend(frame)
    return out


async def test_websocket_resume_gets_every_event_exactly_once(cv: Conveyor) -> None:
    total_jobs = 1000
    async with ServedApi(create_app(cv)) as served, running_worker(cv, 50):
        first_half: list[dict[str, Any]] = []
        async with websockets.connect(f"{served.ws_url}/api/events/ws?after=0") as ws:
            submit = asyncio.create_task(
                cv.submit_many([cv.new_job("test_job", {"n": i}) for i in range(total_jobs)])
            )
            first_half = await read_events(ws, 1200)
            await submit
        assert len(first_half) < 3 * total_jobs
        # Disconnected mid-stream while the worker keeps going; resume where we left off.
        last = first_half[-1]["id"]
        rest: list[dict[str, Any]] = []

        async def finished() -> bool:
            query = JobQuery(states=(JobState.COMPLETED,), job_type="test_job", limit=1)
            return (await cv.store.list_jobs(query)).total == total_jobs

        await async_wait_until(finished, 60, "1,000 jobs to complete")
        expected = await all_event_ids(cv)
        async with websockets.connect(f"{served.ws_url}/api/events/ws?after={last}") as ws:
            rest = await read_events(ws, len(expected) - len(first_half))
    got = [e["id"] for e in first_half + rest]
    assert got == expected  # every event, once, in order, across both connections
    assert sum(1 for e in first_half + rest if e["type"] == "job_completed") == total_jobs


async def test_websocket_filters_and_answers_pings(cv: Conveyor) -> None:
    async with ServedApi(create_app(cv)) as served, running_worker(cv, 50):
        url = f"{served.ws_url}/api/events/ws?types=job_completed&queue=default"
        async with websockets.connect(url) as ws:
            await ws.send("ping")
            assert orjson.loads(await ws.recv()) == {"type": "pong"}
            job = await cv.enqueue("test_job", {"x": 1})
            (event,) = await read_events(ws, 1)  # job_submitted and job_started filtered out
            assert event["type"] == "job_completed"
            assert event["job_id"] == job.id
            assert event["data"]["result"] == {"x": 1}


async def test_websocket_rejects_bad_filters_and_requires_a_key(cv: Conveyor) -> None:
    async with ServedApi(create_app(cv, allow_anonymous=True)) as served:
        async with websockets.connect(f"{served.ws_url}/api/events/ws?types=nope") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4400
        assert "matches no event type" in closed.value.rcvd.reason
        async with websockets.connect(f"{served.ws_url}/api/events/ws?after=999999") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4400

        key, record = new_api_key("reader", "read", cv.now())
        await cv.store.create_api_key(record)

        # keys_exist is cached for a second: poll until the API requires the key.
        async def refused() -> bool:
            async with websockets.connect(f"{served.ws_url}/api/events/ws") as ws:
                try:
                    await asyncio.wait_for(ws.recv(), 0.5)
                except ConnectionClosed as exc:
                    return exc.rcvd is not None and exc.rcvd.code == 4401
                except TimeoutError:
                    return False
            return False

        await async_wait_until(refused, 10, "anonymous WebSocket to be refused")
        url = f"{served.ws_url}/api/events/ws?token={key}&after=0"
        async with websockets.connect(url) as ws:
            await ws.send("ping")
            assert orjson.loads(await ws.recv()) == {"type": "pong"}
        headers = {"Authorization": f"Bearer {key}"}
        async with websockets.connect(
            f"{served.ws_url}/api/events/ws", additional_headers=headers
        ) as ws:
            await ws.send("ping")
            assert orjson.loads(await ws.recv()) == {"type": "pong"}


# -- the hub --------------------------------------------------------------------------------------
async def test_a_slow_subscriber_is_dropped_without_slowing_the_others(cv: Conveyor) -> None:
    # batch=1: the hub reads one event at a time, so the slow one sees its first
    # event alone and then falls behind while it does not read on.
    hub = EventHub(cv.store, poll_interval=0.01, queue_size=5, batch=1)
    slow = hub.subscriber(EventFilter())
    fast = hub.subscriber(EventFilter(), queue_size=1000)
    slow_stream = hub.stream(slow, None)
    fast_stream = hub.stream(fast, None)
    try:
        # Prime both generators (they attach on their first step).
        slow_first = asyncio.create_task(anext(slow_stream))
        fast_first = asyncio.create_task(anext(fast_stream))
        await async_wait_until(_true_when(lambda: hub.subscribers == 2), 5, "2 subscribers")
        await cv.submit_many([cv.new_job("test_job") for _ in range(40)])
        got = [i for i, _ in await fast_first]
        while len(got) < 40:
            got.extend(i for i, _ in await asyncio.wait_for(anext(fast_stream), 5))
        slow_got = [i for i, _ in await slow_first]
        await async_wait_until(_true_when(lambda: slow.dropped is not None), 5, "slow dropped")
        assert "slow consumer" in (slow.dropped or "")
        assert fast.dropped is None
        assert got == await all_event_ids(cv)
        # The slow one still gets what was queued before the drop, then its stream ends.
        slow_got += [i for items in [x async for x in slow_stream] for i, _ in items]
        assert 1 <= len(slow_got) < 40  # what it read before the drop, then the end
        assert slow_got == got[: len(slow_got)]
    finally:
        await hub.close()


async def drain(ws: Any) -> None:
    """Read frames until the connection closes (raises ConnectionClosed)."""
    while True:
        await asyncio.wait_for(ws.recv(), 20)


def _true_when(predicate: Any) -> Any:
    async def check() -> bool:
        return bool(predicate())

    return check


async def test_a_far_behind_subscriber_catches_up_from_the_store_not_the_log(
    cv: Conveyor,
) -> None:
    # The hub's log holds 300 events but a new subscriber may only fall 10 behind:
    # it must read the store until it is close to the head, not be dropped on joining.
    hub = EventHub(cv.store, poll_interval=0.01, queue_size=10)
    live = hub.subscriber(EventFilter(), queue_size=10_000)
    live_stream = hub.stream(live, None)
    try:
        first = asyncio.create_task(anext(live_stream))
        await async_wait_until(_true_when(lambda: hub.subscribers == 1), 5, "live subscriber")
        await cv.submit_many([cv.new_job("test_job") for _ in range(300)])
        seen = [i for i, _ in await first]
        while len(seen) < 300:
            seen.extend(i for i, _ in await asyncio.wait_for(anext(live_stream), 5))
        late = hub.subscriber(EventFilter())
        got: list[int] = []
        late_stream = hub.stream(late, 0)
        while len(got) < 300:
            got.extend(i for i, _ in await asyncio.wait_for(anext(late_stream), 5))
        assert late.dropped is None
        assert got == seen == await all_event_ids(cv)
        await cv.submit_many([cv.new_job("test_job") for _ in range(3)])  # and then live
        while len(got) < 303:
            got.extend(i for i, _ in await asyncio.wait_for(anext(late_stream), 5))
        assert got == await all_event_ids(cv)
        await late_stream.aclose()
    finally:
        await hub.close()


async def test_websocket_resume_on_postgres_with_concurrent_writers(postgres_dsn: str) -> None:
    # Many connections commit events at once on PostgreSQL, so ids commit out of
    # order; the stream must still be complete and duplicate-free across a resume.
    app = Conveyor(
        settings=Settings(
            database_url=postgres_dsn,
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            shutdown_grace=2.0,
            event_poll_interval=0.02,
        )
    )
    conveyor.demo.register(app)
    async with app, ServedApi(create_app(app)) as served, running_worker(app, 50):

        async def writer(k: int) -> None:
            for i in range(100):
                await app.enqueue("test_job", {"k": k, "i": i})

        async with websockets.connect(f"{served.ws_url}/api/events/ws?after=0") as ws:
            writers = asyncio.gather(*(writer(k) for k in range(5)))
            first = await read_events(ws, 600)
            await writers
        last = first[-1]["id"]

        async def finished() -> bool:
            query = JobQuery(states=(JobState.COMPLETED,), job_type="test_job", limit=1)
            return (await app.store.list_jobs(query)).total == 500

        await async_wait_until(finished, 60, "500 jobs to complete")
        expected = await all_event_ids(app)
        async with websockets.connect(f"{served.ws_url}/api/events/ws?after={last}") as ws:
            rest = await read_events(ws, len(expected) - len(first))
    got = [e["id"] for e in first + rest]
    assert sorted(got) == sorted(expected)
    assert len(got) == len(set(got))
    assert got == expected  # the same delivery order as the store's
    job_events = [e for e in first + rest if e["job_id"] and e["job_type"] == "test_job"]
    assert sum(1 for e in job_events if e["type"] == "job_completed") == 500


async def test_the_relay_skips_events_no_one_can_hear_on_the_in_process_bus(
    cv: Conveyor,
) -> None:
    bus = MemoryBus()
    handled: list[int] = []

    async def handler(events: Any) -> None:
        handled.extend(e.id for e in events)

    relay = OutboxConsumer(
        cv.store, "relay", handler, clock=cv.now, skip_to=skip_unheard(cv.store, bus)
    )
    await cv.submit_many([cv.new_job("test_job") for _ in range(5)])
    assert await relay.step() == 0
    assert handled == []
    skipped_to = await cv.store.latest_event_id()
    assert await cv.store.claim_consumer("relay", relay.owner, 15, cv.now()) == skipped_to
    seen: list[Message] = []

    async def listen(message: Message) -> None:
        seen.append(message)

    sub = await bus.subscribe("job_submitted", listen)
    await cv.submit_many([cv.new_job("test_job") for _ in range(3)])
    assert await relay.step() == 3
    assert handled == (await all_event_ids(cv))[-3:]  # only what came after a listener
    await sub.close()
    assert not bus.reaches_anyone(["job_submitted"], EVENTS_STREAM)


async def test_the_webhook_dispatcher_skips_while_no_endpoint_exists(cv: Conveyor) -> None:
    dispatcher = WebhookDispatcher(cv.deps)
    consumer = OutboxConsumer(
        cv.store, "webhooks", dispatcher, clock=cv.now, skip_to=dispatcher.skip_to
    )
    await cv.submit_many([cv.new_job("test_job") for _ in range(4)])
    assert await consumer.step() == 0  # skipped: no endpoint
    await cv.store.create_webhook(
        Webhook("wh1", "http://127.0.0.1:9/h", ("job_submitted",), "s" * 32, cv.now())
    )
    await cv.submit_many([cv.new_job("test_job") for _ in range(2)])
    assert await consumer.step() == 2
    deliveries = await cv.store.list_jobs(JobQuery(job_type="conveyor.webhook", limit=10))
    assert deliveries.total == 2  # one per event after the endpoint existed


async def test_a_websocket_client_that_stops_reading_is_closed_with_a_reason(
    tmp_path: Path,
) -> None:
    app = Conveyor(settings=settings(tmp_path, ws_queue_size=20, allow_unknown_job_types=True))
    await app.open()
    try:
        async with ServedApi(create_app(app)) as served:
            url = f"{served.ws_url}/api/events/ws"
            # A tiny receive window: the client's socket fills up at once.
            async with websockets.connect(url, max_queue=1, max_size=None) as ws:
                await ws.send("ping")
                assert orjson.loads(await ws.recv()) == {"type": "pong"}
                ws.transport.pause_reading()  # stop reading: the server's sends block
                for _ in range(20):
                    await app.submit_many([app.new_job("test_job") for _ in range(500)])
                    if served.api_hub_subscribers() == 0:
                        break
                await async_wait_until(
                    _true_when(lambda: served.api_hub_subscribers() == 0), 20, "the drop"
                )
                ws.transport.resume_reading()
                with pytest.raises(ConnectionClosed) as closed:
                    await drain(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1013
            assert "slow consumer" in closed.value.rcvd.reason
    finally:
        await app.close()


async def test_a_skipping_relay_stores_its_position_now_and_then_and_catches_up_idle(
    cv: Conveyor,
) -> None:
    async def nobody(events: Any) -> None:
        raise AssertionError("a skipping relay reads no events")

    relay = OutboxConsumer(
        cv.store, "relay", nobody, clock=cv.now, skip_to=skip_unheard(cv.store, MemoryBus())
    )
    await cv.submit_many([cv.new_job("test_job") for _ in range(3)])
    assert await relay.step() == 0
    first = await cv.store.latest_event_id()
    assert await cv.store.consumer_positions() == {"relay": first}  # the first skip is stored
    await cv.submit_many([cv.new_job("test_job") for _ in range(3)])
    assert await relay.step() == 0
    assert await cv.store.consumer_positions() == {"relay": first}  # not on every check
    relay.skip_persist_interval = 0.0  # time has passed: the next (idle) check stores it
    assert await relay.step() == 0
    assert await cv.store.consumer_positions() == {"relay": await cv.store.latest_event_id()}
