"""The in-memory EventBus: one process, asyncio, the same semantics as Redis.

Product code, not a test double: it serialises payloads like the Redis
adapter (so both accept and reject the same payloads and hand every
subscriber its own copy), and raises the same errors.

- Fan-out: each subscriber has a ``Mailbox`` (own queue and task); ``publish``
  only enqueues, so a slow handler never blocks the publisher, and messages
  keep publish order.
- Request/reply: one queue of requests per topic shared by its responders, so
  exactly one responder answers; like a Redis list, a request waits there for
  a responder until its deadline, then the requester gets ``BusTimeout``.
- Streams: entries ``<n>-0``; consumer groups with a last-delivered id and a
  pending list (owner, delivery time, delivery count) that mirror Redis
  ``XREADGROUP``/``XACK``/``XAUTOCLAIM``. A failed entry stays pending and is
  redelivered once it has been idle ``claim_idle`` (by whichever consumer
  reclaims it first); after ``max_deliveries`` it moves to ``<stream>:dead``.
- Memory is bounded by bytes, not only by entries: each stream (dead letters
  included) keeps at most ``max_stream_bytes`` of encoded payloads (oldest
  entries trimmed first; the newest entry is always kept, even if it alone is
  larger), and each subscriber's backlog of undelivered messages is bounded the
  same way (the oldest are dropped, and a warning logged). ``accounted_bytes``
  says how much is held; ``health`` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from conveyor.bus.base import (
    BusError,
    BusHealth,
    BusTimeout,
    ConsumerOptions,
    Entry,
    EntryHandler,
    EventBus,
    Mailbox,
    Message,
    MessageHandler,
    Payload,
    RequestHandler,
    Subscription,
    decode_payload,
    encode_payload,
    stop_task,
)

__all__ = ["MemoryBus"]

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

#: Default of ``max_stream_bytes`` (``CONVEYOR_EVENT_STREAM_MAX_BYTES``): 64 MiB.
DEFAULT_MAX_STREAM_BYTES = 64 * 1024 * 1024


def parse_id(entry_id: str) -> tuple[int, int]:
    """``"12-0"`` -> ``(12, 0)``; ``"0"`` and ``"12"`` are accepted like Redis does."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise BusError(f"invalid stream id {entry_id!r}: expected '<n>-<m>' or '0'") from None


@dataclass(slots=True)
class _Record:
    data: bytes
    origin: str | None = None  # dead letters: the id the entry had in its stream
    deliveries: int = 1  # dead letters: how often it had been delivered


@dataclass(slots=True)
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass(slots=True)
class _Group:
    last_delivered: int
    pending: dict[int, _Pending] = field(default_factory=dict)  # seq -> state, seq order


class _Stream:
    def __init__(self) -> None:
        self.records: dict[int, _Record] = {}
        self.first = 1  # seq of the oldest record kept
        self.last = 0  # seq of the newest record ever appended
        self.groups: dict[str, _Group] = {}
        self.changed = asyncio.Event()
        self.bytes = 0  # encoded payload bytes of the records kept

    def add(self, record: _Record, maxlen: int | None, max_bytes: int) -> str:
        self.last += 1
        self.records[self.last] = record
        self.bytes += len(record.data)
        if maxlen is not None:
            while self.last - self.first + 1 > maxlen:
                self.drop_oldest()
        # The newest record stays even when it alone is over the budget: an append
        # that nobody could ever read would be a silent loss.
        while self.bytes > max_bytes and self.first < self.last:
            self.drop_oldest()
        return f"{self.last}-0"

    def drop_oldest(self) -> None:
        record = self.records.pop(self.first, None)
        if record is not None:
            self.bytes -= len(record.data)
        for group in self.groups.values():
            group.pending.pop(self.first, None)
        self.first += 1

    def notify(self) -> None:
        # Waiters hold the old event: set it and give newcomers a fresh one.
        self.changed.set()
        self.changed = asyncio.Event()


class _TaskSubscription(Subscription):
    def __init__(self, task: asyncio.Task[None], on_close: Callable[[], None]) -> None:
        self._task = task
        self._on_close = on_close
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close()
        await stop_task(self._task)


class _MailboxSubscription(Subscription):
    def __init__(self, registry: list[Mailbox], mailbox: Mailbox) -> None:
        self._registry = registry
        self._mailbox = mailbox

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._registry.remove(self._mailbox)
        await self._mailbox.close()


@dataclass(slots=True)
class _Request:
    message: Message
    reply: asyncio.Future[Payload]
    deadline: float


class MemoryBus(EventBus):
    """EventBus for one process. ``clock`` (monotonic seconds) is injectable for tests.

    ``max_stream_bytes`` (>= 1) bounds each stream and each subscriber's backlog
    by the size of the encoded JSON payloads they hold (see the module docstring).
    """

    backend = "memory"

    def __init__(
        self, *, clock: Clock = time.monotonic, max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES
    ) -> None:
        if max_stream_bytes < 1:
            raise ValueError(f"max_stream_bytes must be >= 1 (got {max_stream_bytes})")
        self._clock = clock
        self.max_stream_bytes = max_stream_bytes
        self._subscribers: list[Mailbox] = []
        self._requests: dict[str, asyncio.Queue[_Request]] = {}
        self._streams: dict[str, _Stream] = {}
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        for mailbox in list(self._subscribers):
            await mailbox.close()
        self._subscribers.clear()
        self._subscriptions.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("the bus is closed")

    # -- fan-out ------------------------------------------------------------------------
    async def publish(self, topic: str, payload: Payload) -> None:
        self._check_open()
        data = encode_payload(payload)
        for mailbox in self._subscribers:
            if fnmatch.fnmatchcase(topic, mailbox.pattern):
                mailbox.put(Message(topic, decode_payload(data)), len(data))

    async def publish_many(self, messages: Sequence[Message]) -> None:
        for m in messages:
            await self.publish(m.topic, m.payload)

    async def subscribe(self, pattern: str, handler: MessageHandler) -> Subscription:
        self._check_open()
        mailbox = Mailbox(pattern, handler, max_bytes=self.max_stream_bytes)
        self._subscribers.append(mailbox)
        return _MailboxSubscription(self._subscribers, mailbox)

    def reaches_anyone(self, topics: Sequence[str], stream: str | None = None) -> bool:
        if stream is not None and (st := self._streams.get(stream)) is not None and st.groups:
            return True
        return any(
            fnmatch.fnmatchcase(topic, mailbox.pattern)
            for mailbox in self._subscribers
            for topic in topics
        )

    # -- request / reply ----------------------------------------------------------------
    async def request(self, topic: str, payload: Payload, timeout: float) -> Payload:  # noqa: ASYNC109 (the port takes a deadline)
        self._check_open()
        data = encode_payload(payload)
        reply: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        deadline = self._clock() + timeout
        queue = self._requests.setdefault(topic, asyncio.Queue())
        queue.put_nowait(_Request(Message(topic, decode_payload(data)), reply, deadline))
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError:
            raise BusTimeout(
                f"no reply to request on {topic!r} within {timeout:g}s: "
                "is a responder running for this topic?"
            ) from None

    async def respond(self, topic: str, handler: RequestHandler) -> Subscription:
        self._check_open()
        queue = self._requests.setdefault(topic, asyncio.Queue())
        task = asyncio.create_task(
            self._serve(topic, queue, handler), name=f"bus-responder:{topic}"
        )
        return self._track(task)

    async def _serve(
        self, topic: str, queue: asyncio.Queue[_Request], handler: RequestHandler
    ) -> None:
        while True:
            req = await queue.get()
            if req.reply.done() or self._clock() > req.deadline:
                continue  # the requester gave up: nobody would read the answer
            try:
                answer = encode_payload(await handler(req.message))
            except Exception as exc:
                log.exception("bus.responder_failed", topic=topic)
                if not req.reply.done():
                    req.reply.set_exception(
                        BusError(f"responder for {topic!r} failed: {type(exc).__name__}: {exc}")
                    )
                continue
            if not req.reply.done():
                req.reply.set_result(decode_payload(answer))

    # -- durable streams ----------------------------------------------------------------
    def _stream(self, name: str) -> _Stream:
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream()
        return stream

    async def append(self, stream: str, payloads: Sequence[Payload], *, maxlen: int) -> list[str]:
        self._check_open()
        encoded = [encode_payload(p) for p in payloads]  # all or nothing
        st = self._stream(stream)
        ids = [st.add(_Record(data), maxlen, self.max_stream_bytes) for data in encoded]
        st.notify()
        return ids

    async def read(self, stream: str, after: str, count: int) -> list[Entry]:
        self._check_open()
        st = self._streams.get(stream)
        if st is None:
            return []
        start = max(parse_id(after)[0] + 1, st.first)
        out: list[Entry] = []
        for seq in range(start, st.last + 1):
            if len(out) >= count:
                break
            record = st.records.get(seq)
            if record is not None:
                out.append(Entry(f"{seq}-0", decode_payload(record.data)))
        return out

    async def dead_letters(self, stream: str, count: int = 100) -> list[Entry]:
        self._check_open()
        st = self._streams.get(f"{stream}:dead")
        if st is None:
            return []
        out: list[Entry] = []
        for seq in range(st.first, st.last + 1):
            record = st.records.get(seq)
            if record is not None:
                origin = record.origin or f"{seq}-0"
                out.append(Entry(origin, decode_payload(record.data), record.deliveries))
            if len(out) >= count:
                break
        return out

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: EntryHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        self._check_open()
        opts = options or ConsumerOptions()
        st = self._stream(stream)
        if group not in st.groups:
            last = st.last if opts.start == "$" else parse_id(opts.start)[0]
            st.groups[group] = _Group(last_delivered=last)
        task = asyncio.create_task(
            self._consume(stream, st, st.groups[group], consumer, handler, opts),
            name=f"bus-consumer:{stream}:{group}:{consumer}",
        )
        return self._track(task)

    async def _consume(
        self,
        stream: str,
        st: _Stream,
        group: _Group,
        consumer: str,
        handler: EntryHandler,
        opts: ConsumerOptions,
    ) -> None:
        # Like the Redis adapter: own pending entries first (a restarted consumer
        # finishes what it had), then new ones; reclaim idle ones every so often.
        history_after: int | None = 0
        claim_every = max(opts.claim_idle / 4, 0.01)
        wait = min(opts.block, claim_every)
        next_claim = self._clock()
        while True:
            now = self._clock()
            batch: list[tuple[int, int]] = []
            if now >= next_claim:
                next_claim = now + claim_every
                batch = self._claim(group, consumer, opts, now)
            if not batch and history_after is not None:
                batch = self._own_pending(group, consumer, history_after, opts.batch, now)
                history_after = batch[-1][0] if batch else None
            if not batch:
                batch = self._new_entries(st, group, consumer, opts.batch, now)
            if not batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await st.changed.wait()
                continue
            for seq, deliveries in batch:
                await self._deliver(stream, st, group, seq, deliveries, handler, opts)

    def _claim(
        self, group: _Group, consumer: str, opts: ConsumerOptions, now: float
    ) -> list[tuple[int, int]]:
        batch: list[tuple[int, int]] = []
        for seq, p in group.pending.items():
            if now - p.delivered_at >= opts.claim_idle:
                p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
                batch.append((seq, p.deliveries))
                if len(batch) >= opts.batch:
                    break
        return batch

    def _own_pending(
        self, group: _Group, consumer: str, after: int, count: int, now: float
    ) -> list[tuple[int, int]]:
        batch: list[tuple[int, int]] = []
        for seq, p in group.pending.items():
            if seq > after and p.consumer == consumer:
                p.delivered_at, p.deliveries = now, p.deliveries + 1
                batch.append((seq, p.deliveries))
                if len(batch) >= count:
                    break
        return batch

    def _new_entries(
        self, st: _Stream, group: _Group, consumer: str, count: int, now: float
    ) -> list[tuple[int, int]]:
        batch: list[tuple[int, int]] = []
        seq = max(group.last_delivered + 1, st.first)
        while seq <= st.last and len(batch) < count:
            group.pending[seq] = _Pending(consumer, now, 1)
            batch.append((seq, 1))
            seq += 1
        if batch:
            group.last_delivered = batch[-1][0]
        return batch

    async def _deliver(
        self,
        stream: str,
        st: _Stream,
        group: _Group,
        seq: int,
        deliveries: int,
        handler: EntryHandler,
        opts: ConsumerOptions,
    ) -> None:
        record = st.records.get(seq)
        if record is None:  # trimmed away while pending
            group.pending.pop(seq, None)
            return
        entry_id = f"{seq}-0"
        if deliveries > opts.max_deliveries:
            self._dead_letter(stream, group, seq, record, deliveries - 1)
            return
        try:
            await handler(Entry(entry_id, decode_payload(record.data), deliveries))
        except Exception:
            log.exception(
                "bus.entry_handler_failed", stream=stream, id=entry_id, deliveries=deliveries
            )
            if deliveries >= opts.max_deliveries:
                self._dead_letter(stream, group, seq, record, deliveries)
            return
        group.pending.pop(seq, None)  # ack

    def _dead_letter(
        self, stream: str, group: _Group, seq: int, record: _Record, deliveries: int
    ) -> None:
        dead = self._stream(f"{stream}:dead")
        dead.add(
            _Record(record.data, origin=f"{seq}-0", deliveries=deliveries),
            None,
            self.max_stream_bytes,
        )
        dead.notify()
        group.pending.pop(seq, None)
        log.warning("bus.entry_dead_lettered", stream=stream, id=f"{seq}-0", deliveries=deliveries)

    # -- health -------------------------------------------------------------------------
    def accounted_bytes(self) -> int:
        """Encoded payload bytes this bus holds now: every stream's entries plus
        every subscriber's undelivered messages."""
        return sum(st.bytes for st in self._streams.values()) + sum(
            m.queued_bytes for m in self._subscribers
        )

    async def health(self) -> BusHealth:
        return BusHealth(
            ok=not self._closed,
            backend=self.backend,
            detail={
                "subscribers": len(self._subscribers),
                "streams": len(self._streams),
                "bytes": self.accounted_bytes(),
                "max_stream_bytes": self.max_stream_bytes,
            },
        )

    def _track(self, task: asyncio.Task[None]) -> Subscription:
        sub = _TaskSubscription(task, lambda: self._subscriptions.discard(sub))
        self._subscriptions.add(sub)
        return sub
