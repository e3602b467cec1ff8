"""The EventBus port: fan-out pub/sub, request-reply and durable streams.

Two adapters implement it and pass the same contract suite
(``tests/contract/test_bus.py``): ``memory`` (one process) and ``redis``
(redis-py asyncio: pub/sub for fan-out, Streams with consumer groups for
durable consumers). ``conveyor.app`` picks one from ``CONVEYOR_REDIS_URL``.

Semantics every adapter keeps:

- ``publish`` is fire-and-forget fan-out: subscribers connected now get the
  message, in publish order per publisher; nobody else ever will. Lifecycle
  events reach the bus through the outbox relay, so the outbox (not the bus)
  is what makes them durable.
- Topic patterns are shell globs (``job_*``, ``*``, ``workflow_completed``).
- A handler that raises is logged and does not stop the subscription.
- ``request`` never hangs: no reply within ``timeout`` raises ``BusTimeout``.
- Durable streams deliver each entry to one consumer of a group at least once:
  an entry is redelivered until acknowledged (a handler returning normally acks
  it); entries idle longer than ``claim_idle`` on a dead consumer are reclaimed;
  after ``max_deliveries`` an entry moves to ``<stream>:dead``.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from conveyor.domain.errors import ConveyorError

log = structlog.get_logger(__name__)

Payload = dict[str, Any]

#: Control topics (lifecycle events never travel under these names: they come
#: from the outbox relay, named by event type).
CANCEL_TOPIC = "conveyor.cancel"  # {"job_id": ...}: stop this running job now
WAKE_TOPIC = "conveyor.wake"  # {}: jobs were submitted, fetch now


class BusError(ConveyorError):
    """The bus could not do what was asked (after its own retries)."""


class BusTimeout(BusError, TimeoutError):
    """``request`` got no reply in time (no responder, or a slow one)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One pub/sub message or request."""

    topic: str
    payload: Payload


@dataclass(frozen=True, slots=True)
class Entry:
    """One durable stream entry. ``id`` is the stream's own (Redis ``<ms>-<seq>``)."""

    id: str
    payload: Payload
    deliveries: int = 1


MessageHandler = Callable[[Message], Awaitable[None]]
RequestHandler = Callable[[Message], Awaitable[Payload]]
EntryHandler = Callable[[Entry], Awaitable[None]]


class Subscription(abc.ABC):
    """Handle returned by ``subscribe``/``respond``/``consume``; ``close`` stops it."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How a durable consumer reads its stream."""

    batch: int = 100  # entries per read
    block: float = 1.0  # seconds a read waits for new entries
    claim_idle: float = 30.0  # reclaim entries pending this long on any consumer
    max_deliveries: int = 5  # then the entry moves to ``<stream>:dead``
    start: str = "0"  # where a new group starts: "0" = everything kept, "$" = only new


@dataclass(slots=True)
class BusHealth:
    ok: bool
    backend: str
    detail: Mapping[str, Any] = field(default_factory=dict)


class EventBus(abc.ABC):
    """Publish/subscribe, request/reply and durable streams."""

    backend: str = "abstract"

    async def open(self) -> None:
        """Connect (adapters that need it)."""
        return None

    async def close(self) -> None:
        """Stop every subscription and disconnect."""
        return None

    async def __aenter__(self) -> EventBus:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- fan-out ------------------------------------------------------------------------
    @abc.abstractmethod
    async def publish(self, topic: str, payload: Payload) -> None: ...

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish several messages in order (adapters pipeline this)."""
        for m in messages:
            await self.publish(m.topic, m.payload)

    @abc.abstractmethod
    async def subscribe(self, pattern: str, handler: MessageHandler) -> Subscription:
        """Call ``handler`` for every message whose topic matches the glob ``pattern``.
        Returns once the subscription is live (a publish after it is seen)."""

    # -- request / reply ----------------------------------------------------------------
    @abc.abstractmethod
    async def request(self, topic: str, payload: Payload, timeout: float) -> Payload:  # noqa: ASYNC109 (the port takes a deadline)
        """Send to one responder of ``topic`` and wait for its reply."""

    @abc.abstractmethod
    async def respond(self, topic: str, handler: RequestHandler) -> Subscription:
        """Answer requests on ``topic`` (exact name) with ``handler``'s return value."""

    # -- durable streams ----------------------------------------------------------------
    @abc.abstractmethod
    async def append(self, stream: str, payloads: Sequence[Payload], *, maxlen: int) -> list[str]:
        """Append entries (trimmed to about ``maxlen``); returns their ids in order."""

    @abc.abstractmethod
    async def read(self, stream: str, after: str, count: int) -> list[Entry]:
        """Replay: up to ``count`` entries with id greater than ``after`` ("0" = from start)."""

    @abc.abstractmethod
    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: EntryHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """Run a durable consumer in the background until the subscription closes."""

    @abc.abstractmethod
    async def dead_letters(self, stream: str, count: int = 100) -> list[Entry]:
        """Entries that exceeded ``max_deliveries``, oldest first."""

    def reaches_anyone(self, topics: Sequence[str], stream: str | None = None) -> bool:
        """Whether a publish on any of ``topics`` (or an append to ``stream``) could
        reach a listener. True unless the adapter knows better: the in-process bus
        sees every listener, so the outbox relay skips work nobody would receive."""
        return True

    # -- health -------------------------------------------------------------------------
    @abc.abstractmethod
    async def health(self) -> BusHealth: ...


# -- helpers both adapters share ---------------------------------------------------------


def encode_payload(payload: Payload) -> bytes:
    """Payload -> JSON bytes; every adapter serialises, so both accept the same payloads."""
    try:
        return orjson.dumps(payload)
    except TypeError as exc:  # orjson.JSONEncodeError
        raise BusError(f"payload is not JSON-serialisable: {exc}") from exc


def decode_payload(data: bytes | str) -> Payload:
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise BusError(f"bus payload must be a JSON object, got {type(value).__name__}")
    return value


class Mailbox:
    """One subscriber: its own queue and task, so a slow handler never blocks
    ``publish`` (or the Redis reader) and messages keep their order.

    With ``max_bytes``, the messages waiting for the handler hold at most that
    many payload bytes (as given to ``put``): a handler that falls behind loses
    the oldest ones (pub/sub promises no more; Redis itself disconnects such a
    subscriber) and a warning says how many, instead of the process growing
    without bound."""

    def __init__(
        self, pattern: str, handler: MessageHandler, *, max_bytes: int | None = None
    ) -> None:
        self.pattern = pattern
        self._handler = handler
        self._max_bytes = max_bytes
        self._queue: asyncio.Queue[tuple[Message, int]] = asyncio.Queue()
        self.queued_bytes = 0
        self.dropped = 0
        self._task = asyncio.create_task(self._run(), name=f"bus-subscriber:{pattern}")

    def put(self, message: Message, size: int = 0) -> None:
        """Queue ``message``; ``size`` is its encoded payload length in bytes."""
        self._queue.put_nowait((message, size))
        self.queued_bytes += size
        if self._max_bytes is None or self.queued_bytes <= self._max_bytes:
            return
        dropped = 0
        # The newest message stays, like the newest entry of a bounded stream.
        while self.queued_bytes > self._max_bytes and self._queue.qsize() > 1:
            _old, old_size = self._queue.get_nowait()
            self.queued_bytes -= old_size
            dropped += 1
        self.dropped += dropped
        log.warning(
            "bus.subscriber_overflow",
            pattern=self.pattern,
            dropped=dropped,
            dropped_total=self.dropped,
            max_bytes=self._max_bytes,
        )

    async def _run(self) -> None:
        while True:
            message, size = await self._queue.get()
            self.queued_bytes -= size
            try:
                await self._handler(message)
            except Exception:
                log.exception("bus.handler_failed", topic=message.topic, pattern=self.pattern)

    async def close(self) -> None:
        await stop_task(self._task)


async def stop_task(task: asyncio.Task[Any], recancel_after: float = 0.5) -> None:
    """Cancel ``task`` and wait for it to end, without swallowing our own cancellation.

    A cancellation can be lost: Python 3.11's ``asyncio.wait_for`` (redis-py wraps
    socket writes in it) returns normally when the cancel lands as the write
    completes, and the task runs on. So it is cancelled again every
    ``recancel_after`` seconds until it ends. A task stopping itself (a handler
    closing its own subscription) is only cancelled."""
    if task is asyncio.current_task():
        task.cancel()
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=recancel_after)
