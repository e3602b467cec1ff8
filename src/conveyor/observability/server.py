"""A small HTTP server for ``conveyor worker``: ``/metrics``, ``/health``, ``/ready``.

Plain asyncio in the worker's own event loop, no framework: one GET (or HEAD)
per connection, answered and closed. Bounded so a misbehaving client can't
hurt the worker: at most ``MAX_CONNECTIONS`` at once (more are closed at
once), a request head of at most ``MAX_HEAD_BYTES`` read within
``READ_TIMEOUT`` seconds, no request body read.
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
MAX_HEAD_BYTES = 8192
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


class EndpointServer:
    """Serve ``routes`` (path -> coroutine returning a ``Reply``) on host:port."""

    def __init__(self, routes: Mapping[str, Route], *, host: str, port: int) -> None:
        self.routes = dict(routes)
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

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

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()  # too many at once: a scraper retries at its next interval
            return
        async with self._slots:
            try:
                reply, head_only = await self._answer(reader)
                reason = _REASONS.get(reply.status, "")
                head = (
                    f"HTTP/1.1 {reply.status} {reason}\r\n"
                    f"Content-Type: {reply.content_type}\r\n"
                    f"Content-Length: {len(reply.body)}\r\n"
                    "Cache-Control: no-store\r\n"
                    "Connection: close\r\n\r\n"
                ).encode()
                writer.write(head if head_only else head + reply.body)
                async with asyncio.timeout(READ_TIMEOUT):
                    await writer.drain()
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Reply, bool]:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Reply.json(431, _error("request head too large")), False
        except asyncio.IncompleteReadError as exc:
            head = exc.partial
            if not head.strip():
                raise
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return Reply.json(400, _error("malformed request line")), False
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0].decode("latin-1")
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


def _error(text: str) -> dict[str, object]:
    return {"success": False, "error": text}
