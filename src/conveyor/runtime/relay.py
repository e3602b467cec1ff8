"""Outbox consumers: move committed lifecycle events onward, at least once, in order.

An ``OutboxConsumer`` is a named reader of the ``events`` outbox with a
persisted position and a lease in the store. Every worker process and ``up``
run one per name; the lease lets exactly one of them work at a time and the
others take over within ``lease_ttl`` seconds when it dies. The position is
advanced only after the handler returned, so a consumer killed mid-batch
hands the batch again to whoever takes over: events may repeat (same ``id``)
but are never skipped.

Two consumers ship with Conveyor: ``relay`` (outbox -> event bus: pub/sub
topics and the durable ``events`` stream) and ``webhooks`` (outbox -> one
delivery job per matching endpoint, see ``runtime/webhooks.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import structlog

from conveyor.bus.base import EventBus, Message
from conveyor.domain.events import EVENT_TYPES, envelope
from conveyor.domain.ids import new_token
from conveyor.domain.job import Event
from conveyor.storage.base import Store

log = structlog.get_logger("conveyor.relay")

BatchHandler = Callable[[Sequence[Event]], Awaitable[None]]
#: Returns a position to jump to when nothing needs the events up to it, else None.
SkipCheck = Callable[[], Awaitable[int | None]]

#: Seconds between checks while a consumer skips ahead (no listener, no endpoint).
SKIP_INTERVAL = 0.5
#: Seconds between stores of the position while skipping ahead.
SKIP_PERSIST_INTERVAL = 5.0

#: The durable bus stream every lifecycle event is appended to.
EVENTS_STREAM = "events"


def consumer_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{new_token()[:8]}"


class OutboxConsumer:
    def __init__(
        self,
        store: Store,
        name: str,
        handler: BatchHandler,
        *,
        clock: Callable[[], datetime],
        owner: str | None = None,
        batch: int = 500,
        lease_ttl: float = 15.0,
        poll_interval: float = 0.05,
        skip_to: SkipCheck | None = None,
    ) -> None:
        if batch < 1 or lease_ttl <= 0 or poll_interval <= 0:
            raise ValueError("batch >= 1, lease_ttl > 0 and poll_interval > 0 are required")
        self.store = store
        self.name = name
        self.handler = handler
        self.owner = owner or consumer_owner()
        self.batch = batch
        self.lease_ttl = lease_ttl
        self.poll_interval = poll_interval
        self.skip_to = skip_to
        self._clock = clock
        self._position: int | None = None  # None = lease not held
        self._lease_until = 0.0  # monotonic
        self._wake = asyncio.Event()
        self.skipping = False  # the last step skipped ahead: nobody needs the events now
        self._persisted_at = 0.0  # monotonic time the position was last stored
        self._stored = -1  # the position last stored by this owner
        self.skip_persist_interval = SKIP_PERSIST_INTERVAL

    @property
    def leader(self) -> bool:
        return self._position is not None and time.monotonic() < self._lease_until

    def wake(self) -> None:
        """Look for new events now instead of at the next poll."""
        self._wake.set()

    async def _hold_lease(self) -> bool:
        """Take or renew the lease when less than half of it is left."""
        if self._position is not None and time.monotonic() < self._lease_until - self.lease_ttl / 2:
            return True
        started = time.monotonic()
        position = await self.store.claim_consumer(
            self.name, self.owner, self.lease_ttl, self._clock()
        )
        if position is None:
            if self._position is not None:
                log.warning("outbox_lease_lost", consumer=self.name, owner=self.owner)
            self._position = None
            return False
        if self._position is None:
            log.info("outbox_lease_taken", consumer=self.name, owner=self.owner, position=position)
            self._position = position
        else:  # renewed: ours may be ahead (skipped, not yet stored), or a successor's
            self._position = max(self._position, position)
        self._stored = position
        self._lease_until = started + self.lease_ttl
        return True

    async def step(self) -> int:
        """One round: hand the next batch to the handler. Returns how many events."""
        if not await self._hold_lease():
            return 0
        assert self._position is not None
        if self.skip_to is not None:
            target = await self.skip_to()
            if target is not None:  # nobody needs these events: move on without reading
                self.skipping = True
                self._position = max(self._position, target)
                # Stored now and then only: a successor that starts from an older
                # position skips again (or, if someone listens by then, repeats a few
                # old events: at least once). Saves a commit per check, and the stored
                # position (the lag operators see) catches up within a few seconds.
                if (
                    self._position > self._stored
                    and time.monotonic() - self._persisted_at > self.skip_persist_interval
                ):
                    await self._persist(self._position)
                return 0
            self.skipping = False
        events = await self.store.events_after(self._position, self.batch)
        if not events:
            return 0
        await self.handler(events)
        last = events[-1].id
        if not await self._persist(last):
            return 0
        self._position = last
        return len(events)

    async def _persist(self, position: int) -> bool:
        """Store the position; False (and the lease dropped) if another owner has it."""
        if not await self.store.advance_consumer(self.name, self.owner, position, self._clock()):
            log.warning("outbox_lease_lost", consumer=self.name, owner=self.owner)
            self._position = None  # someone else took over; it re-sends from its position
            return False
        self._persisted_at = time.monotonic()
        self._stored = position
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; store and handler errors are retried with backoff."""
        backoff = 0.0
        while not stop.is_set():
            try:
                handled = await self.step()
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep relaying after a hiccup
                backoff = min(5.0, max(0.1, backoff * 2))
                log.warning("outbox_consumer_failed", consumer=self.name, error=str(exc))
                await _wait(stop, backoff)
                continue
            if handled >= self.batch:
                continue  # more are waiting
            if self._position is None:  # another process holds the lease
                await _wait(stop, self.lease_ttl / 3)
            elif self.skipping:  # nobody listens: look again now and then, not on every write
                await _wait(stop, max(self.poll_interval, SKIP_INTERVAL))
            else:
                self._wake.clear()
                await _wait(stop, self.poll_interval, self._wake)
        if self._position is not None:
            with contextlib.suppress(Exception):
                await self._persist(self._position)  # a skipped-ahead position, if any
                await self.store.release_consumer(self.name, self.owner, self._clock())
            self._position = None


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def skip_unheard(store: Store, bus: EventBus) -> SkipCheck:
    """For the relay: skip ahead while no one could hear the events (in-process bus
    with no matching subscriber or consumer group). The newest id is read first,
    so a listener that arrives after the check gets everything after it."""

    def heard() -> bool:
        return bus.reaches_anyone(EVENT_TYPES, EVENTS_STREAM)

    async def check() -> int | None:
        if heard():  # the common case on Redis: no query
            return None
        latest = await store.latest_event_id()
        return None if heard() else latest

    return check


def bus_relay(bus: EventBus, *, stream_maxlen: int) -> BatchHandler:
    """The ``relay`` consumer's handler: fan out on pub/sub, append to the stream."""

    async def handle(events: Sequence[Event]) -> None:
        payloads = [envelope(e) for e in events]
        await bus.append(EVENTS_STREAM, payloads, maxlen=stream_maxlen)
        await bus.publish_many([Message(p["type"], p) for p in payloads])

    return handle
