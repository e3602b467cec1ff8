"""A small HTTP server for ``conveyor worker``: ``/metrics``, ``/health``, ``/ready``.

Plain asyncio in the worker's own event loop, no framework: one GET (or HEAD)
per connection, answered and closed. Bounded so a misbehaving client can't
hurt the worker, and so that ``/health`` and ``/ready`` (the orchestrator's
probes) always get an answer:

- at most ``MAX_CONNECTIONS`` connections are held at once. A connection that
  has not sent its request head yet is *idle*: it is closed after
  ``IDLE_TIMEOUT`` seconds, and when the cap is reached the oldest idle one is
  closed to make room for the newcomer (a real client sends its request at
  once, so it is never the oldest);
- routes other than the probes (``/metrics``: a scrape may read the store) hold
  at most ``MAX_CONNECTIONS - PROBE_SLOTS`` of them; the rest are kept for the
  probes, which answer from memory (``/ready`` asks the store, bounded by its
  own timeout);
- when every slot is busy answering, a newcomer gets ``503`` within
  ``OVERFLOW_TIMEOUT`` seconds (``/health`` its usual 200: the process is
  alive) instead of waiting; at most ``MAX_OVERFLOW`` such answers are pending
  at once, beyond that a connection is closed unanswered;
- a request head of at most ``MAX_HEAD_BYTES``, no request body read, the
  answer written within ``READ_TIMEOUT`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson
import structlog

from conveyor.domain.errors import ConfigurationError

log = structlog.get_logger("conveyor.metrics")

MAX_CONNECTIONS = 16
#: Of ``MAX_CONNECTIONS``, slots only ``PROBES`` may use.
PROBE_SLOTS = 4
#: Paths answered from the probe slots.
PROBES = frozenset({"/health", "/ready"})
#: Seconds a connection may stay without a complete request head.
IDLE_TIMEOUT = 2.0
#: Connections answered 503 at once when every slot is busy, and how long each
#: may take to send its request head.
MAX_OVERFLOW = 64
OVERFLOW_TIMEOUT = 0.5
MAX_HEAD_BYTES = 8192
#: Seconds to write an answer to a client that reads slowly.
READ_TIMEOUT = 5.0
#: Seconds a handler (a scrape reading the store) may take.
HANDLER_TIMEOUT = 10.0

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    @classmethod
    def json(cls, status: int, data: object) -> Reply:
        return cls(status, JSON_TYPE, orjson.dumps(data))


Route = Callable[[], Awaitable[Reply]]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_HEALTH = "/health"


class EndpointServer:
    """Serve ``routes`` (path -> coroutine returning a ``Reply``) on host:port."""

    def __init__(self, routes: Mapping[str, Route], *, host: str, port: int) -> None:
        self.routes = dict(routes)
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        # Connections still reading their request head, oldest first (a dict keeps
        # insertion order); and how many are being answered.
        self._idle: dict[asyncio.StreamWriter, None] = {}
        self._busy = 0
        self._busy_other = 0  # of _busy, those not answering a probe
        self._overflow = 0

    async def start(self) -> None:
        """Listen; ``ConfigurationError`` when the port can't be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD_BYTES, backlog=64
            )
        except (OSError, socket.gaierror) as exc:
            raise ConfigurationError(
                f"Cannot serve metrics on {self.host}:{self.port} "
                f"({exc.strerror or exc}): choose another --metrics-port"
            ) from None
        log.info("metrics_server_started", host=self.host, port=self.bound_port)

    @property
    def bound_port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections held in slots now (idle ones included, overflow not)."""
        return len(self._idle) + self._busy

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._idle):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS and self._idle:
            # Make room: the oldest idle connection has had the longest to speak.
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.transport.abort()
        if self.connections >= MAX_CONNECTIONS:
            await self._overflowing(reader, writer)
            return
        self._idle[writer] = None
        try:
            try:
                head = await self._read_head(reader, IDLE_TIMEOUT)
            finally:
                self._idle.pop(writer, None)
            path = _path(head) if head is not None else None
            probe = path in PROBES
            if not probe and self._busy_other >= MAX_CONNECTIONS - PROBE_SLOTS:
                reply, head_only = _busy_reply(), False
                self._busy += 1
                try:
                    await self._write(writer, reply, head_only)
                finally:
                    self._busy -= 1
                return
            self._busy += 1
            self._busy_other += not probe
            try:
                reply, head_only = await self._answer(head)
                await self._write(writer, reply, head_only)
            finally:
                self._busy -= 1
                self._busy_other -= not probe
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _overflowing(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Every slot is busy answering: 503 quickly (``/health``: 200, it is a
        liveness probe and the process is alive), never a wait for a slot."""
        if self._overflow >= MAX_OVERFLOW:
            writer.transport.abort()
            return
        self._overflow += 1
        try:
            # Read the head first: closing with it unread would reset the connection
            # and lose the answer.
            head = await self._read_head(reader, OVERFLOW_TIMEOUT)
            if head is not None and _path(head) == _HEALTH and _HEALTH in self.routes:
                reply, head_only = await self._answer(head)
            else:
                reply, head_only = _busy_reply(), False
            await self._write(writer, reply, head_only)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._overflow -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader, timeout: float) -> bytes | None:  # noqa: ASYNC109 - two callers, two budgets
        """The request head; ``None`` when it is too large (answered 431)."""
        try:
            async with asyncio.timeout(timeout):
                return await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                raise
            return exc.partial

    async def _write(self, writer: asyncio.StreamWriter, reply: Reply, head_only: bool) -> None:
        reason = _REASONS.get(reply.status, "")
        extra = "Retry-After: 1\r\n" if reply.status == 503 else ""
        head = (
            f"HTTP/1.1 {reply.status} {reason}\r\n"
            f"Content-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(reply.body)}\r\n"
            "Cache-Control: no-store\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if head_only else head + reply.body)
        async with asyncio.timeout(READ_TIMEOUT):
            await writer.drain()

    async def _answer(self, head: bytes | None) -> tuple[Reply, bool]:
        if head is None:
            return Reply.json(431, _error("request head too large")), False
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return Reply.json(400, _error("malformed request line")), False
        method = parts[0]
        path = _path(head)
        route = self.routes.get(path)
        if route is None:
            return Reply.json(404, _error(f"not found: try {', '.join(self.routes)}")), False
        if method not in (b"GET", b"HEAD"):
            return Reply.json(405, _error("use GET")), False
        try:
            async with asyncio.timeout(HANDLER_TIMEOUT):
                return await route(), method == b"HEAD"
        except Exception as exc:  # noqa: BLE001 - answered, logged, the worker goes on
            log.warning("metrics_endpoint_failed", path=path, error=str(exc))
            return Reply.json(500, _error("internal error (see the worker's log)")), False


def _path(head: bytes) -> str:
    """The path of a request head's target ("" when the line is malformed)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3:
        return ""
    return parts[1].split(b"?", 1)[0].decode("latin-1")


def _busy_reply() -> Reply:
    return Reply.json(503, _error("busy: too many connections, retry shortly"))


def _error(text: str) -> dict[str, object]:
    return {"success": False, "error": text}
