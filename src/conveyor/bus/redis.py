"""The Redis EventBus (redis-py asyncio): pub/sub for fan-out, Streams for durability.

Keys and channels (all under ``prefix``, default ``conveyor``; see ``Keys``)::

    {prefix}:topic:{topic}          PUBLISH channel; subscribers PSUBSCRIBE to globs
    {prefix}:rpc:{topic}            list of pending requests (RPUSH / BLPOP)
    {prefix}:reply:{bus id}         channel each bus instance receives its replies on
    {prefix}:stream:{stream}        stream (XADD MAXLEN ~, consumer groups)
    {prefix}:stream:{stream}:dead   dead letters: fields id, p (payload), n (deliveries)

Pub/sub runs on one dedicated connection read by one task, which hands each
message to the matching subscribers' mailboxes (own queue and task each), so a
slow handler never stalls the reader. ``subscribe`` returns once Redis has
confirmed the PSUBSCRIBE. When the connection drops the reader reconnects with
exponential backoff (capped at 5 s) and subscribes to every pattern again;
messages published meanwhile are lost, as pub/sub promises nothing more.

Requests go to a list per topic, so exactly one responder (BLPOP) takes each;
it publishes the answer on the requester's reply channel with the request's
correlation id. A request carries its deadline: responders drop expired ones.

Durable consumers read their group with XREADGROUP: first their own pending
entries (id ``0``: what they held when they stopped or lost the connection),
then new ones (``>``); every ``claim_idle / 4`` they XAUTOCLAIM entries idle
longer than ``claim_idle`` (a dead consumer's, or their own failed ones: a
handler that raises leaves its entry pending, so it is retried after
``claim_idle``). XPENDING gives the delivery count; past ``max_deliveries`` the
entry is copied to ``:dead`` and acknowledged in one MULTI.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
from conveyor.observability.redis_client import timed_client

__all__ = ["Keys", "RedisBus", "redact_url"]

log = structlog.get_logger(__name__)

# Connection trouble: retried by our loops with backoff; anything else is a bug or a bad reply.
DISCONNECTED = (RedisConnectionError, RedisTimeoutError, OSError)
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 5.0
CONFIRM_TIMEOUT = 10.0  # seconds subscribe/open wait for Redis to confirm a subscription
HEALTH_TIMEOUT = 1.0
# A command with no reply this long fails (and is retried); blocking reads block less.
SOCKET_TIMEOUT = 10.0
MAX_BLOCK = 5.0
_GLOB_CHARS = re.compile(r"([*?\[\]\\])")


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key and channel the bus uses (one place, see the module docstring)."""

    prefix: str

    def topic(self, topic: str) -> str:
        return f"{self.prefix}:topic:{topic}"

    def topic_glob(self, pattern: str) -> bytes:
        # The prefix is literal: escape any glob character in it, keep the pattern's.
        literal = _GLOB_CHARS.sub(r"\\\1", f"{self.prefix}:topic:")
        return (literal + pattern).encode()

    def requests(self, topic: str) -> str:
        return f"{self.prefix}:rpc:{topic}"

    def reply(self, bus_id: str) -> str:
        return f"{self.prefix}:reply:{bus_id}"

    def stream(self, stream: str) -> str:
        return f"{self.prefix}:stream:{stream}"

    def dead(self, stream: str) -> str:
        return f"{self.prefix}:stream:{stream}:dead"


class Backoff:
    """Exponential reconnect delays: 0.05 s, 0.1 s, ... capped at 5 s."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class _TaskSubscription(Subscription):
    def __init__(self, bus: RedisBus, task: asyncio.Task[None]) -> None:
        self._bus = bus
        self._task = task

    async def close(self) -> None:
        self._bus._tasks.discard(self._task)
        await stop_task(self._task)


class _PatternSubscription(Subscription):
    def __init__(self, bus: RedisBus, channel: bytes, mailbox: Mailbox) -> None:
        self._bus = bus
        self._channel = channel
        self._mailbox = mailbox

    async def close(self) -> None:
        await self._bus._unsubscribe(self._channel, self._mailbox)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBus(EventBus):
    """EventBus on Redis. ``url`` like ``redis://[:password@]host:6379/0``.

    ``max_subscriber_bytes``: each subscriber's backlog of messages not yet handled
    holds at most this many payload bytes in this process (oldest dropped, see
    ``Mailbox``); None = unbounded."""

    backend = "redis"

    def __init__(
        self, url: str, *, prefix: str = "conveyor", max_subscriber_bytes: int | None = None
    ) -> None:
        self._url = url
        self._max_subscriber_bytes = max_subscriber_bytes
        self._safe_url = redact_url(url)
        self.keys = Keys(prefix)
        self._bus_id = uuid.uuid4().hex
        self._reply_channel = self.keys.reply(self._bus_id).encode()
        self._client: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._pipe_client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        # PSUBSCRIBE channel -> its subscribers' mailboxes; confirmed = live on this connection.
        self._patterns: dict[bytes, list[Mailbox]] = {}
        self._confirmed: set[bytes] = set()
        self._confirm_waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._replies: dict[str, asyncio.Future[Payload]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        self._closed = False
        # Commands retry a little on their own (a dropped pooled connection is reopened);
        # longer outages are ridden out by the loops below, with their own backoff.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3)
        self._client = self._connect(SOCKET_TIMEOUT, retry)
        # Pipelines (publish_many, append) go through a client without a socket timeout:
        # redis-py would wrap every reply read of a pipeline in its own timeout (40% of
        # the CPU of a 100-message publish); one asyncio.timeout per call bounds it instead.
        self._pipe_client = self._connect(None, retry)
        # The pub/sub connection never retries inside redis-py: the reader owns reconnecting.
        # (Blocking pub/sub reads are exempt from the socket timeout in redis-py.)
        self._sub_client = self._connect(SOCKET_TIMEOUT, Retry(ExponentialBackoff(), retries=0))
        try:
            async with asyncio.timeout(10.0):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._disconnect()
            raise BusError(
                f"cannot connect to Redis at {self._safe_url}: {exc}. Is redis-server running "
                "and the URL (CONVEYOR_REDIS_URL) right?"
            ) from exc
        # Replies arrive on our own channel: it must be live before the first request.
        waiter = self._confirm_waiter(self._reply_channel)
        self._reader = asyncio.create_task(self._read_loop(), name="bus-redis-pubsub")
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await waiter
        except TimeoutError:
            await self.close()
            raise BusError(
                f"Redis at {self._safe_url} did not confirm a subscription in {CONFIRM_TIMEOUT:g}s"
            ) from None
        log.info("bus.redis_opened", url=self._safe_url, prefix=self.keys.prefix)

    def _connect(self, socket_timeout: float | None, retry: Retry) -> aioredis.Redis:
        # RESP2 pinned: the reply shapes parsed below are the same in redis-py 5 to 8
        # (8 defaults to RESP3).
        return timed_client(  # commands timed into conveyor_redis_command_seconds{client="bus"}
            self._url,
            "bus",
            socket_connect_timeout=2.0,
            socket_timeout=socket_timeout,
            socket_keepalive=True,
            retry=retry,
            decode_responses=False,
            protocol=2,
        )

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            await stop_task(task)
        self._tasks.clear()
        if self._reader is not None:
            await stop_task(self._reader)
            self._reader = None
        for mailboxes in self._patterns.values():
            for mailbox in mailboxes:
                await mailbox.close()
        self._patterns.clear()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(BusError("the bus was closed before the reply arrived"))
        self._replies.clear()
        await self._disconnect()

    async def _disconnect(self) -> None:
        await self._drop_pubsub()
        for client in (self._client, self._sub_client, self._pipe_client):
            if client is not None:
                await client.aclose()
        self._client = self._sub_client = self._pipe_client = None

    @property
    def client(self) -> aioredis.Redis:
        return self._require_open()

    def _pipeline(self) -> Any:
        self._require_open()
        assert self._pipe_client is not None
        return self._pipe_client.pipeline(transaction=False)

    def _require_open(self) -> aioredis.Redis:
        if self._client is None or self._closed:
            raise BusError("the Redis bus is not open: call `await bus.open()` first")
        return self._client

    # -- pub/sub reader -----------------------------------------------------------------
    async def _connect_pubsub(self) -> PubSub:
        assert self._sub_client is not None
        pubsub = self._sub_client.pubsub()
        # Connect first, publish it after: subscribe() must never race us to connect it.
        try:
            await pubsub.subscribe(self._reply_channel)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            raise
        self._pubsub = pubsub
        self._confirmed.clear()
        if self._patterns:
            await pubsub.psubscribe(*self._patterns)
        return pubsub

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._confirmed.clear()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def _read_loop(self) -> None:
        backoff = Backoff()
        while not self._closed:
            try:
                pubsub = self._pubsub or await self._connect_pubsub()
                message = await pubsub.get_message(timeout=None)
            except DISCONNECTED as exc:
                delay = backoff.next()
                log.warning("bus.pubsub_disconnected", error=str(exc), retry_in=delay)
                await self._drop_pubsub()
                await asyncio.sleep(delay)
                continue
            except Exception:
                delay = backoff.next()
                log.exception("bus.pubsub_failed", retry_in=delay)
                await self._drop_pubsub()
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if message is None:
                continue
            try:
                self._dispatch(message)
            except Exception:
                log.exception("bus.dispatch_failed", kind=message.get("type"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "pmessage":
            mailboxes = self._patterns.get(message["pattern"])
            if not mailboxes:
                return
            topic = _str(message["channel"]).removeprefix(self.keys.topic(""))
            data: bytes = message["data"]
            for mailbox in mailboxes:
                try:
                    payload = decode_payload(data)
                except (orjson.JSONDecodeError, BusError):
                    log.warning("bus.bad_message", topic=topic)
                    return
                mailbox.put(Message(topic, payload), len(data))
        elif kind == "message" and message["channel"] == self._reply_channel:
            self._on_reply(message["data"])
        elif kind in ("psubscribe", "subscribe"):
            channel: bytes = message["channel"]
            self._confirmed.add(channel)
            for fut in self._confirm_waiters.pop(channel, []):
                if not fut.done():
                    fut.set_result(None)

    def _confirm_waiter(self, channel: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirm_waiters.setdefault(channel, []).append(fut)
        return fut

    # -- fan-out ------------------------------------------------------------------------
    async def publish(self, topic: str, payload: Payload) -> None:
        data = encode_payload(payload)
        try:
            await self.client.publish(self.keys.topic(topic), data)
        except RedisError as exc:
            raise BusError(f"publish to {topic!r} on {self._safe_url} failed: {exc}") from exc

    async def publish_many(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        encoded = [(self.keys.topic(m.topic), encode_payload(m.payload)) for m in messages]
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT), self._pipeline() as pipe:
                for channel, data in encoded:
                    pipe.publish(channel, data)
                await pipe.execute()
        except TimeoutError:
            raise BusError(f"publish_many on {self._safe_url} timed out") from None
        except RedisError as exc:
            raise BusError(f"publish_many on {self._safe_url} failed: {exc}") from exc

    async def subscribe(self, pattern: str, handler: MessageHandler) -> Subscription:
        self._require_open()
        channel = self.keys.topic_glob(pattern)
        mailbox = Mailbox(pattern, handler, max_bytes=self._max_subscriber_bytes)
        first = channel not in self._patterns
        self._patterns.setdefault(channel, []).append(mailbox)
        subscription = _PatternSubscription(self, channel, mailbox)
        if channel in self._confirmed:
            return subscription
        waiter = self._confirm_waiter(channel)
        if first and self._pubsub is not None:
            # If the connection is down, the reader's reconnect subscribes to it.
            with contextlib.suppress(*DISCONNECTED):
                await self._pubsub.psubscribe(channel)
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await waiter
        except TimeoutError:
            await subscription.close()
            raise BusError(
                f"Redis at {self._safe_url} did not confirm the subscription to {pattern!r} "
                f"in {CONFIRM_TIMEOUT:g}s (is it reachable?)"
            ) from None
        return subscription

    async def _unsubscribe(self, channel: bytes, mailbox: Mailbox) -> None:
        mailboxes = self._patterns.get(channel, [])
        with contextlib.suppress(ValueError):
            mailboxes.remove(mailbox)
        await mailbox.close()
        if mailboxes or channel not in self._patterns:
            return
        del self._patterns[channel]
        self._confirmed.discard(channel)
        if self._pubsub is not None:
            with contextlib.suppress(*DISCONNECTED):
                await self._pubsub.punsubscribe(channel)

    # -- request / reply ----------------------------------------------------------------
    async def request(self, topic: str, payload: Payload, timeout: float) -> Payload:  # noqa: ASYNC109 (the port takes a deadline)
        correlation = uuid.uuid4().hex
        body = encode_payload(
            {
                "id": correlation,
                "reply": self._reply_channel.decode(),
                "deadline": time.time() + timeout,  # wall clock: responders may be elsewhere
                "payload": payload,
            }
        )
        reply: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = reply
        try:
            async with asyncio.timeout(timeout):
                await self.client.rpush(self.keys.requests(topic), body)
                return await reply
        except TimeoutError:
            raise BusTimeout(
                f"no reply to request on {topic!r} within {timeout:g}s: "
                "is a responder running for this topic?"
            ) from None
        except RedisError as exc:
            raise BusError(f"request on {topic!r} to {self._safe_url} failed: {exc}") from exc
        finally:
            self._replies.pop(correlation, None)

    def _on_reply(self, data: bytes) -> None:
        try:
            reply = orjson.loads(data)
            fut = self._replies.pop(reply["id"], None)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("bus.bad_reply")
            return
        if fut is None or fut.done():
            return  # the requester timed out already
        if reply.get("ok"):
            fut.set_result(reply["payload"])
        else:
            fut.set_exception(BusError(reply.get("error", "the responder failed")))

    async def respond(self, topic: str, handler: RequestHandler) -> Subscription:
        self._require_open()
        task = asyncio.create_task(self._serve(topic, handler), name=f"bus-responder:{topic}")
        self._tasks.add(task)
        return _TaskSubscription(self, task)

    async def _serve(self, topic: str, handler: RequestHandler) -> None:
        key = self.keys.requests(topic)
        backoff = Backoff()
        while not self._closed:
            try:
                popped = await self.client.blpop([key], timeout=1)
            except DISCONNECTED as exc:
                delay = backoff.next()
                log.warning("bus.responder_disconnected", topic=topic, error=str(exc))
                await asyncio.sleep(delay)
                continue
            except Exception:
                delay = backoff.next()
                log.exception("bus.responder_read_failed", topic=topic, retry_in=delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if popped is None:
                continue
            try:
                req = orjson.loads(popped[1])
                correlation, reply_to = req["id"], req["reply"]
                deadline, payload = float(req["deadline"]), req["payload"]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("bus.bad_request", topic=topic)
                continue
            if time.time() > deadline:
                continue  # the requester has given up
            try:
                answer = encode_payload(
                    {
                        "id": correlation,
                        "ok": True,
                        "payload": await handler(Message(topic, payload)),
                    }
                )
            except Exception as exc:
                log.exception("bus.responder_failed", topic=topic)
                error = f"responder for {topic!r} failed: {type(exc).__name__}: {exc}"
                answer = orjson.dumps({"id": correlation, "ok": False, "error": error})
            try:
                await self.client.publish(reply_to, answer)
            except DISCONNECTED as exc:
                log.warning("bus.reply_lost", topic=topic, error=str(exc))

    # -- durable streams ----------------------------------------------------------------
    async def append(self, stream: str, payloads: Sequence[Payload], *, maxlen: int) -> list[str]:
        if not payloads:
            return []
        key = self.keys.stream(stream)
        encoded = [encode_payload(p) for p in payloads]
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT), self._pipeline() as pipe:
                for data in encoded:
                    pipe.xadd(key, {b"p": data}, maxlen=maxlen, approximate=True)
                ids = await pipe.execute()
        except TimeoutError:
            raise BusError(f"append to stream {stream!r} on {self._safe_url} timed out") from None
        except RedisError as exc:
            raise BusError(
                f"append to stream {stream!r} on {self._safe_url} failed: {exc}"
            ) from exc
        return [_str(i) for i in ids]

    async def read(self, stream: str, after: str, count: int) -> list[Entry]:
        start = "-" if after in ("0", "0-0", "-") else f"({after}"
        try:
            rows: Any = await self.client.xrange(
                self.keys.stream(stream), min=start, max="+", count=count
            )
        except ResponseError as exc:
            raise BusError(f"cannot read stream {stream!r} after {after!r}: {exc}") from exc
        except RedisError as exc:
            raise BusError(f"read of stream {stream!r} on {self._safe_url} failed: {exc}") from exc
        return [Entry(_str(i), decode_payload(f[b"p"])) for i, f in rows]

    async def dead_letters(self, stream: str, count: int = 100) -> list[Entry]:
        try:
            rows: Any = await self.client.xrange(
                self.keys.dead(stream), min="-", max="+", count=count
            )
        except RedisError as exc:
            raise BusError(f"read of {stream!r} dead letters failed: {exc}") from exc
        return [Entry(_str(f[b"id"]), decode_payload(f[b"p"]), int(f[b"n"])) for _, f in rows]

    async def consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: EntryHandler,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        opts = options or ConsumerOptions()
        try:
            await self._ensure_group(stream, group, opts.start)
        except RedisError as exc:
            raise BusError(f"cannot create group {group!r} on stream {stream!r}: {exc}") from exc
        task = asyncio.create_task(
            self._consume(stream, group, consumer, handler, opts),
            name=f"bus-consumer:{stream}:{group}:{consumer}",
        )
        self._tasks.add(task)
        return _TaskSubscription(self, task)

    async def _ensure_group(self, stream: str, group: str, start: str) -> None:
        try:
            await self.client.xgroup_create(
                self.keys.stream(stream), group, id=start, mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _consume(
        self,
        stream: str,
        group: str,
        consumer: str,
        handler: EntryHandler,
        opts: ConsumerOptions,
    ) -> None:
        key = self.keys.stream(stream)
        claim_every = max(opts.claim_idle / 4, 0.01)
        block_ms = max(1, int(min(opts.block, claim_every, MAX_BLOCK) * 1000))
        history: str | None = "0"  # own pending entries first, then new ones
        cursor = "0-0"
        next_claim = time.monotonic()
        backoff = Backoff()
        recreate = False
        while not self._closed:
            try:
                if recreate:
                    await self._ensure_group(stream, group, opts.start)
                    recreate, history = False, "0"
                batch: list[tuple[str, dict[bytes, bytes] | None, int]] = []
                now = time.monotonic()
                if now >= next_claim:
                    next_claim = now + claim_every
                    cursor, batch = await self._autoclaim(key, group, consumer, opts, cursor)
                if not batch and history is not None:
                    rows = await self._readgroup(key, group, consumer, history, opts.batch, None)
                    history = _str(rows[-1][0]) if rows else None
                    batch = await self._with_deliveries(key, group, rows)
                if not batch:
                    rows = await self._readgroup(key, group, consumer, ">", opts.batch, block_ms)
                    batch = [(_str(i), f, 1) for i, f in rows]
                backoff.reset()
                for entry_id, fields, deliveries in batch:
                    await self._deliver(stream, group, entry_id, fields, deliveries, handler, opts)
            except DISCONNECTED as exc:
                delay = backoff.next()
                log.warning(
                    "bus.consumer_disconnected", stream=stream, group=group, error=str(exc),
                    retry_in=delay,
                )  # fmt: skip
                history = "0"  # after reconnecting, finish what we held first
                await asyncio.sleep(delay)
            except Exception as exc:
                if self._closed:
                    return
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # The stream or group vanished (deleted, or a server without persistence).
                    log.warning("bus.group_recreated", stream=stream, group=group)
                    recreate = True
                    continue
                # Never die silently: a consumer that stops would strand its stream.
                delay = backoff.next()
                log.exception("bus.consumer_failed", stream=stream, group=group, retry_in=delay)
                history = "0"
                await asyncio.sleep(delay)

    async def _readgroup(
        self, key: str, group: str, consumer: str, after: str, count: int, block: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        resp: Any = await self.client.xreadgroup(
            group, consumer, {key: after}, count=count, block=block
        )
        return list(resp[0][1]) if resp else []

    async def _autoclaim(
        self, key: str, group: str, consumer: str, opts: ConsumerOptions, cursor: str
    ) -> tuple[str, list[tuple[str, dict[bytes, bytes] | None, int]]]:
        resp: Any = await self.client.xautoclaim(
            key,
            group,
            consumer,
            min_idle_time=max(1, int(opts.claim_idle * 1000)),
            start_id=cursor,
            count=opts.batch,
        )
        next_cursor, rows = _str(resp[0]), resp[1]
        return next_cursor, await self._with_deliveries(key, group, rows)

    async def _with_deliveries(
        self, key: str, group: str, rows: Sequence[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> list[tuple[str, dict[bytes, bytes] | None, int]]:
        """Attach each redelivered entry's delivery count (XPENDING, one per id, pipelined)."""
        if not rows:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for entry_id, _ in rows:
                pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
            pending = await pipe.execute()
        out = []
        for (entry_id, fields), info in zip(rows, pending, strict=True):
            deliveries = int(info[0]["times_delivered"]) if info else 1
            out.append((_str(entry_id), fields, deliveries))
        return out

    async def _deliver(
        self,
        stream: str,
        group: str,
        entry_id: str,
        fields: dict[bytes, bytes] | None,
        deliveries: int,
        handler: EntryHandler,
        opts: ConsumerOptions,
    ) -> None:
        key = self.keys.stream(stream)
        if not fields:  # trimmed away while pending: nothing left to handle
            await self.client.xack(key, group, entry_id)
            return
        data = fields[b"p"]
        if deliveries > opts.max_deliveries:
            await self._dead_letter(stream, group, entry_id, data, deliveries - 1)
            return
        try:
            payload = decode_payload(data)
        except (orjson.JSONDecodeError, BusError):
            log.exception("bus.bad_entry", stream=stream, id=entry_id)
            await self._dead_letter(stream, group, entry_id, data, deliveries)
            return
        try:
            await handler(Entry(entry_id, payload, deliveries))
        except Exception:
            log.exception(
                "bus.entry_handler_failed", stream=stream, id=entry_id, deliveries=deliveries
            )
            if deliveries >= opts.max_deliveries:
                await self._dead_letter(stream, group, entry_id, data, deliveries)
            return
        await self.client.xack(key, group, entry_id)

    async def _dead_letter(
        self, stream: str, group: str, entry_id: str, data: bytes, deliveries: int
    ) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead(stream), {b"id": entry_id, b"p": data, b"n": deliveries})
            pipe.xack(self.keys.stream(stream), group, entry_id)
            await pipe.execute()
        log.warning("bus.entry_dead_lettered", stream=stream, id=entry_id, deliveries=deliveries)

    # -- health -------------------------------------------------------------------------
    async def health(self) -> BusHealth:
        detail: dict[str, Any] = {"url": self._safe_url, "prefix": self.keys.prefix}
        if self._client is None or self._closed:
            return BusHealth(ok=False, backend=self.backend, detail={**detail, "error": "closed"})
        started = time.perf_counter()
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            detail["error"] = f"{type(exc).__name__}: {exc}"
            return BusHealth(ok=False, backend=self.backend, detail=detail)
        detail["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        detail["pubsub_connected"] = self._reply_channel in self._confirmed
        detail["patterns"] = len(self._patterns)
        detail["tasks"] = len(self._tasks)
        return BusHealth(ok=True, backend=self.backend, detail=detail)
