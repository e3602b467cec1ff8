"""Middleware at the API's edge: what a browser may do, and what an error costs.

``BrowserGuard`` keeps a web page the user happens to visit from driving a
local Conveyor (DNS rebinding, cross-site requests):

- **Host allow-list.** When the API serves anonymous loopback callers, or when
  ``CONVEYOR_ALLOWED_HOSTS`` names hosts, a request whose ``Host`` is not
  ``localhost``, a loopback address or a configured name gets 421.
- **Origin.** A WebSocket handshake and a state-changing request (POST, PUT,
  PATCH, DELETE) that carry an ``Origin`` header must come from an allowed host
  or from the API's own origin; otherwise 403 (the WebSocket is refused).
- **JSON bodies.** A state-changing request with a body needs
  ``Content-Type: application/json``; a bodiless one must not declare another
  type. Otherwise 415. HTML forms and ``text/plain`` requests, the ones a page
  can send cross-site without asking, are refused.

``CatchAll`` answers an unexpected exception with a 500 envelope and one log
line holding a plain, bounded traceback (no local variables, secrets
redacted): milliseconds, not the seconds a rendered traceback takes.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.http import fail
from conveyor.observability.logging import format_exception
from conveyor.security.redact import redact

log = structlog.get_logger("conveyor.api")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_REQUIRED = "The body must be JSON with Content-Type: application/json"


def host_name(authority: str) -> str:
    """The host of a ``Host`` header or URL authority: lower case, without port,
    brackets or trailing dot. ``"[::1]:8000"`` -> ``"::1"``."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        authority = authority.partition(":")[0]
    return authority.rstrip(".")


def is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which hosts may address the API. ``allowed``: names from
    ``CONVEYOR_ALLOWED_HOSTS``; ``*`` allows any host, ``.example.com`` (or
    ``*.example.com``) any subdomain of example.com. Loopback always passes.
    ``enforce``: refuse other ``Host`` headers (origins are checked either way)."""

    def __init__(self, allowed: Iterable[str] = (), *, enforce: bool = True) -> None:
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        self.any = False
        for raw in allowed:
            name = raw.strip().lower().rstrip(".")
            if name == "*":
                self.any = True
            elif name.startswith(("*.", ".")):
                self.suffixes.append("." + name.lstrip("*."))
            elif name:
                self.exact.add(host_name(name))
        self.enforce = enforce

    def allows(self, host: str) -> bool:
        return (
            self.any
            or is_loopback_name(host)
            or host in self.exact
            or any(host.endswith(s) for s in self.suffixes)
        )

    def host_ok(self, host_header: str | None) -> bool:
        # No Host (HTTP/1.0 tools): no browser sends that, so nothing to rebind.
        return not self.enforce or host_header is None or self.allows(host_name(host_header))

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        if origin is None:
            return True  # not a browser, or a same-origin GET
        try:
            parts = urlsplit(origin.strip())
            netloc = parts.netloc.lower()
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not netloc:
            return False  # "null" (sandboxed frames, file://) and other schemes
        if host_header is not None and netloc == host_header.strip().lower():
            return True  # the API's own origin (its /docs page)
        return self.allows(host_name(netloc))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class BrowserGuard:
    """Host allow-list, Origin check and JSON-only bodies (see the module doc)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
        host = hosts[0].decode("latin-1") if hosts else None
        problem: tuple[int, str] | None = None
        refused = [h for h in (v.decode("latin-1") for v in hosts) if not self.policy.host_ok(h)]
        if refused:  # every Host header must pass, should a client send two
            problem = (
                421,
                f"Host {host_name(refused[0])!r} is not allowed: address the API as localhost "
                "or 127.0.0.1, or add the name to CONVEYOR_ALLOWED_HOSTS",
            )
        elif kind == "websocket" or scope["method"] in STATE_CHANGING:
            origin = _header(scope, b"origin")
            if not self.policy.origin_ok(origin, host):
                problem = (
                    403,
                    f"Cross-origin request from {origin!r} refused: add its host to "
                    "CONVEYOR_ALLOWED_HOSTS to allow it",
                )
            elif kind == "http":
                problem = self._body_problem(scope)
        if problem is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            # Refuse the handshake itself: a cross-site page never gets a socket.
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008, "reason": ""})
        else:
            await fail(*problem)(scope, receive, send)

    @staticmethod
    def _body_problem(scope: Scope) -> tuple[int, str] | None:
        content_type = _header(scope, b"content-type")
        length = _header(scope, b"content-length")
        has_body = _header(scope, b"transfer-encoding") is not None or (
            length is not None and length.strip() not in ("", "0")
        )
        if content_type is None:
            return (415, JSON_REQUIRED) if has_body else None
        return None if _is_json(content_type) else (415, JSON_REQUIRED)


class CatchAll:
    """500 with the error envelope and a reference for any exception the app did
    not handle; logs one bounded, redacted traceback (never the request's locals)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence, logged below
            reference = report_unexpected(exc, scope.get("method", "WS"), scope.get("path", ""))
            if started:
                return  # too late for a response; the server closes the connection
            if scope["type"] == "http":
                await fail(500, internal_error_text(reference))(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1011, "reason": ""})


def internal_error_text(reference: str) -> str:
    return f"Internal error (reference {reference}); the server log has the details"


def report_unexpected(exc: BaseException, method: str, path: str) -> str:
    """Log ``exc`` once (plain bounded traceback, secrets redacted); its reference."""
    reference = secrets.token_hex(4)
    # The traceback is formatted here, not by the log configuration: an
    # application's own structlog setup may render exc_info with locals.
    log.error(
        "api_unexpected_error",
        reference=reference,
        method=method,
        path=path,
        kind=type(exc).__name__,
        error=redact(_describe(exc)),
        exception=format_exception(exc),
    )
    return reference


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)[:500]
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        return f"{type(exc).__name__} (its description raised an error)"
