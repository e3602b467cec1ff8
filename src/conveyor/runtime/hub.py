"""One tail of the outbox per process, fanned out to many live subscribers.

The WebSocket endpoint does not read the bus: it reads the outbox, the one
ordered, durable record of events, so a client that resumes with
``after=<event id>`` gets every later event exactly once. Reading the outbox
once per process (not once per client) and sharing the encoded JSON keeps 50
clients as cheap as one.

A subscriber first catches up from the store on its own, then joins the
hub's in-memory log at the point where the two meet, with no await in
between: no gap, no duplicate. A subscriber that cannot keep up (its queue is
full) is dropped with a reason instead of slowing the others; it can resume
with the last id it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import orjson
import structlog

from conveyor.domain.events import EventFilter, envelope
from conveyor.domain.job import Event
from conveyor.storage.base import Store

log = structlog.get_logger("conveyor.hub")


class UnknownEvent(LookupError):
    """``after`` names an event id the store has not reached."""


@dataclass(slots=True)
class _Entry:
    event: Event
    text: str  # the envelope as JSON, encoded once for every subscriber


@dataclass(eq=False)
class Subscriber:
    filter: EventFilter
    queue: asyncio.Queue[_Entry | None]
    dropped: str | None = None
    last_id: int = 0
    _done: asyncio.Event = field(default_factory=asyncio.Event)


class EventHub:
    def __init__(
        self,
        store: Store,
        *,
        poll_interval: float = 0.05,
        buffer: int = 10_000,
        queue_size: int = 1_000,
        batch: int = 1_000,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.queue_size = queue_size
        self.batch = batch
        self._log: deque[_Entry] = deque(maxlen=buffer)
        self._index: dict[int, int] = {}  # event id -> absolute position in the log
        self._base = 0  # absolute position of _log[0]
        self._position: int | None = None  # last event id read; None = not started
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._catching_up = 0
        self._advanced = asyncio.Condition()
        self._wake = asyncio.Event()

    # -- the tail -------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def _ensure_tailing(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._tail(), name="conveyor-event-hub")

    async def close(self) -> None:
        for sub in list(self._subscribers):
            self._drop(sub, "server shutting down")
        self._catching_up = 0
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
                await self._append(events)
            if len(events) < self.batch:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _append(self, events: list[Event]) -> None:
        for e in events:
            if len(self._log) == self._log.maxlen:
                old = self._log.popleft()
                self._index.pop(old.event.id, None)
                self._base += 1
            entry = _Entry(e, orjson.dumps(envelope(e)).decode())
            self._index[e.id] = self._base + len(self._log)
            self._log.append(entry)
            for sub in list(self._subscribers):
                self._offer(sub, entry)
        self._position = events[-1].id
        async with self._advanced:
            self._advanced.notify_all()

    def _offer(self, sub: Subscriber, entry: _Entry) -> None:
        if sub.dropped or not sub.filter.matches(entry.event):
            return
        try:
            sub.queue.put_nowait(entry)
        except asyncio.QueueFull:
            self._drop(sub, f"slow consumer: more than {sub.queue.maxsize} events behind")

    def _drop(self, sub: Subscriber, reason: str) -> None:
        if sub.dropped is None:
            sub.dropped = reason
            self._subscribers.discard(sub)
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
            # a full queue: the reader sees `dropped` once it drains what it has

    # -- subscribing ----------------------------------------------------------------
    def subscriber(self, flt: EventFilter, queue_size: int | None = None) -> Subscriber:
        """A subscriber that may fall ``queue_size`` events behind (default: the hub's)."""
        return Subscriber(flt, asyncio.Queue(queue_size or self.queue_size))

    async def stream(
        self, sub: Subscriber, after: int | None = None, *, max_batch: int = 500
    ) -> AsyncGenerator[list[tuple[int, str]], None]:
        """Yield lists of ``(event id, envelope JSON)`` from after ``after``
        (None = from now), in order, as many as are ready (up to ``max_batch``).

        Raises ``UnknownEvent`` if ``after`` is beyond the newest event. Ends
        (after the events queued so far) when the subscriber is dropped;
        ``sub.dropped`` says why. Use as ``async for``.
        """
        latest = await self.store.latest_event_id()
        if self._position is None:
            self._position = latest
        if after is None:
            self._attach(sub, None)
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
            while True:
                if sub.dropped is not None and sub.queue.empty():
                    return
                entry = await sub.queue.get()
                if entry is None:
                    return
                items = [(entry.event.id, entry.text)]
                while len(items) < max_batch and not sub.queue.empty():
                    more = sub.queue.get_nowait()
                    if more is None:
                        break
                    items.append((more.event.id, more.text))
                sub.last_id = items[-1][0]
                yield items
        finally:
            self._subscribers.discard(sub)

    def _near_head(self, sub: Subscriber, start: int) -> bool:
        """Joining the log at ``start`` leaves the subscriber room to keep up."""
        return self._base + len(self._log) - start <= sub.queue.maxsize // 2

    async def _catch_up(
        self, sub: Subscriber, after: int
    ) -> AsyncGenerator[list[tuple[int, str]], None]:
        """Read the store from ``after`` until the hub's log can take over."""
        cursor = after
        while True:
            start = (
                self._base + len(self._log)
                if cursor == self._position
                else (self._index[cursor] + 1 if cursor in self._index else None)
            )
            if start is not None and self._near_head(sub, start):
                self._attach(sub, start)
                return
            events = await self.store.events_after(cursor, self.batch)
            items: list[tuple[int, str]] = []
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
                async with self._advanced:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._advanced.wait(), 1.0)

    def _attach(self, sub: Subscriber, start: int | None) -> None:
        """Queue the log from absolute position ``start`` (None = nothing) and go live.
        No awaits in here: nothing can slip in between."""
        if start is not None:
            for entry in list(self._log)[max(0, start - self._base) :]:
                self._offer(sub, entry)
        if sub.dropped is None:
            self._subscribers.add(sub)
            self._ensure_tailing()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
