"""One tail of the outbox per process, shared by many live subscribers.

The WebSocket endpoint does not read the bus: it reads the outbox, the one
ordered, durable record of events, so a client that resumes with
``after=<event id>`` gets every later event exactly once. The hub reads the
outbox once per process and keeps the recent events, each encoded to JSON
once, in an in-memory log; every subscriber reads that log through its own
cursor (pull, not push: a batch costs a subscriber one wake-up, not one
queue operation per event).

A subscriber that resumes from an older event first catches up from the
store on its own, then joins the log where the two meet, with no await in
between: no gap, no duplicate. A subscriber that falls more than its
``max_lag`` events behind the head is dropped with a reason instead of
holding memory or slowing the others; it can resume with the last id it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import orjson
import structlog

from conveyor.domain.events import EventFilter, envelope
from conveyor.domain.job import Event
from conveyor.storage.base import Store

log = structlog.get_logger("conveyor.hub")

Items = list[tuple[int, str]]  # (event id, envelope JSON)


class UnknownEvent(LookupError):
    """``after`` names an event id the store has not reached."""


@dataclass(slots=True)
class _Entry:
    event: Event
    text: str  # the envelope as JSON, encoded once for every subscriber


@dataclass(eq=False, slots=True)
class Subscriber:
    filter: EventFilter
    max_lag: int
    next: int | None = None  # absolute log position to read next; None = not attached
    dropped: str | None = None
    dropped_event: asyncio.Event = field(default_factory=asyncio.Event)


class EventHub:
    def __init__(
        self,
        store: Store,
        *,
        poll_interval: float = 0.02,
        buffer: int = 20_000,
        queue_size: int = 1_000,
        batch: int = 1_000,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.buffer = max(buffer, queue_size * 2)
        self.queue_size = queue_size
        self.batch = batch
        self._log: list[_Entry] = []
        self._index: dict[int, int] = {}  # event id -> absolute position in the log
        self._base = 0  # absolute position of _log[0]
        self._position: int | None = None  # last event id read; None = not started
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._catching_up = 0
        self._changed = asyncio.Event()  # replaced (after being set) on every append
        self._wake = asyncio.Event()

    @property
    def head(self) -> int:
        """Absolute position after the newest entry."""
        return self._base + len(self._log)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the tail -------------------------------------------------------------------
    def wake(self) -> None:
        """Read the outbox now (this process just wrote events)."""
        self._wake.set()

    def _ensure_tailing(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._tail(), name="conveyor-event-hub")

    async def close(self) -> None:
        for sub in list(self._subscribers):
            self._drop(sub, "server shutting down")
        self._catching_up = 0
        self._signal()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _tail(self) -> None:
        backoff = 0.0
        while self._subscribers or self._catching_up:
            try:
                assert self._position is not None
                events = await self.store.events_after(self._position, self.batch)
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store comes back; so do we
                backoff = min(5.0, max(0.1, backoff * 2))
                log.warning("event_hub_read_failed", error=str(exc))
                await asyncio.sleep(backoff)  # wait-ok: backoff before retrying the store
                continue
            if events:
                self._append(events)
            if len(events) < self.batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    def _append(self, events: list[Event]) -> None:
        for e in events:
            self._index[e.id] = self.head
            self._log.append(_Entry(e, orjson.dumps(envelope(e)).decode()))
        self._position = events[-1].id
        if len(self._log) > 2 * self.buffer:  # trim in bulk: amortised O(1) per event
            cut = len(self._log) - self.buffer
            for entry in self._log[:cut]:
                self._index.pop(entry.event.id, None)
            del self._log[:cut]
            self._base += cut
        for sub in list(self._subscribers):
            assert sub.next is not None
            if self.head - sub.next > sub.max_lag:
                self._drop(sub, f"slow consumer: more than {sub.max_lag} events behind")
        self._signal()

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _drop(self, sub: Subscriber, reason: str) -> None:
        if sub.dropped is None:
            sub.dropped = reason
            sub.dropped_event.set()
            self._subscribers.discard(sub)

    # -- subscribing ----------------------------------------------------------------
    def subscriber(self, flt: EventFilter, queue_size: int | None = None) -> Subscriber:
        """A subscriber that may fall ``queue_size`` events behind (default: the hub's)."""
        return Subscriber(flt, queue_size or self.queue_size)

    async def stream(
        self, sub: Subscriber, after: int | None = None, *, max_batch: int = 500
    ) -> AsyncGenerator[Items, None]:
        """Yield lists of ``(event id, envelope JSON)`` from after ``after``
        (None = from now), in order, as many as are ready (up to ``max_batch``).

        Raises ``UnknownEvent`` if ``after`` is beyond the newest event. Ends
        when the subscriber is dropped; ``sub.dropped`` says why. Use as
        ``async for``.
        """
        latest = await self.store.latest_event_id()
        if self._position is None:
            self._position = latest
        if after is None:
            self._attach(sub, self.head)
        else:
            if after > latest:
                raise UnknownEvent(after)
            self._catching_up += 1
            try:
                async for items in self._catch_up(sub, after):
                    yield items
            finally:
                self._catching_up -= 1
        try:
            while sub.dropped is None:
                changed = self._changed
                items = self._take(sub, max_batch)
                if items:
                    yield items
                elif sub.next == self.head:
                    await changed.wait()
        finally:
            self._subscribers.discard(sub)

    def _take(self, sub: Subscriber, max_batch: int) -> Items:
        """Advance ``sub`` over up to ``max_batch`` log entries; return those it wants."""
        assert sub.next is not None
        if sub.next < self._base:
            self._drop(sub, "slow consumer: fell out of the hub's buffer")
            return []
        start = sub.next - self._base
        chunk = self._log[start : start + max_batch]
        sub.next += len(chunk)
        flt = sub.filter
        if flt.types or flt.job_id is not None or flt.queue is not None:
            return [(e.event.id, e.text) for e in chunk if flt.matches(e.event)]
        return [(e.event.id, e.text) for e in chunk]

    def _near_head(self, sub: Subscriber, start: int) -> bool:
        """Joining the log at ``start`` leaves the subscriber room to keep up."""
        return self.head - start <= sub.max_lag // 2

    async def _catch_up(self, sub: Subscriber, after: int) -> AsyncGenerator[Items, None]:
        """Read the store from ``after`` until the hub's log can take over."""
        cursor = after
        while True:
            start = (
                self.head
                if cursor == self._position
                else (self._index[cursor] + 1 if cursor in self._index else None)
            )
            if start is not None and self._near_head(sub, start):
                self._attach(sub, start)
                return
            events = await self.store.events_after(cursor, self.batch)
            items: Items = []
            for e in events:
                at = self._index.get(e.id)
                if at is not None and self._near_head(sub, at):
                    # The hub has it: join there (this one included). Attach before
                    # yielding: nothing may happen between the check and the join.
                    self._attach(sub, at)
                    if items:
                        yield items
                    return
                cursor = e.id
                if sub.filter.matches(e):
                    items.append((e.id, orjson.dumps(envelope(e)).decode()))
            if items:
                yield items
            if not events:  # ahead of the hub's tail: wait for it to read our cursor
                self._ensure_tailing()
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)

    def _attach(self, sub: Subscriber, start: int) -> None:
        """Go live from absolute log position ``start``. No awaits in here."""
        sub.next = start
        self._subscribers.add(sub)
        self._ensure_tailing()
