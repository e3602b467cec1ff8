"""``/api/audit`` (admin keys), request ids, and audit entries for failed-auth bursts.

- ``RequestId``: every request gets an id, the client's ``X-Request-Id`` when it
  is 1-200 characters of ``A-Za-z0-9._:-``, else a fresh one; it is echoed in
  the ``X-Request-Id`` response header and recorded in the request's audit entries.
- ``AuthFailureBursts``: failed authentications are counted per client address
  and one-minute window; one ``auth.failed`` entry per address and window
  (``summary``: ``count``, ``window_start``) is written when the window is over
  (at the next failure after it, on a timer, or when the API stops).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.http import Auth
from conveyor.app import Conveyor
from conveyor.auditing import AUDIT_ACTOR, AUDIT_REQUEST_ID
from conveyor.domain.audit import MAX_LIST_LIMIT, AuditEntry, AuditQuery
from conveyor.domain.auth import Scope as KeyScope

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
WINDOW_SECONDS = 60
_MAX_ADDRESSES = 100  #: addresses with an entry of their own per window (then one for the rest)


class RequestId:
    """Give each HTTP request an id (module doc) for its audit entries and logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for key, value in scope.get("headers", ()):
            if key == b"x-request-id":
                given = value.decode("latin-1")
                break
        request_id = given if given is not None and _REQUEST_ID.match(given) else uuid.uuid4().hex
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = AUDIT_REQUEST_ID.set(request_id)
        actor = AUDIT_ACTOR.set("anonymous")  # until a key authenticates
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            AUDIT_ACTOR.reset(actor)
            AUDIT_REQUEST_ID.reset(token)


class AuthFailureBursts:
    """One ``auth.failed`` entry per client address per minute of failures."""

    def __init__(self, conveyor: Conveyor, *, clock: Any = time.time) -> None:
        self.conveyor = conveyor
        self._clock = clock
        self._windows: dict[str, tuple[int, int]] = {}  # address -> (window, count)
        # Failures from addresses past the first _MAX_ADDRESSES of a window: one
        # entry for them all (window -> count), so a flood from many addresses (a
        # spoofed X-Forwarded-For, an IPv6 range) neither floods the log nor memory.
        self._others: dict[int, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def hit(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        window = int(self._clock() // WINDOW_SECONDS)
        self.flush(before=window)
        if address in self._windows or len(self._windows) < _MAX_ADDRESSES:
            _, count = self._windows.get(address, (window, 0))
            self._windows[address] = (window, count + 1)
        else:
            self._others[window] = self._others.get(window, 0) + 1
        if self._timer is None:
            with_loop = asyncio.get_running_loop()
            delay = (window + 1) * WINDOW_SECONDS - self._clock() + 0.5
            self._timer = with_loop.call_later(max(delay, 0.5), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush(before=int(self._clock() // WINDOW_SECONDS))
        if self._windows or self._others:  # failures of this minute: their window ends later
            self._timer = asyncio.get_running_loop().call_later(WINDOW_SECONDS / 2, self._tick)

    def flush(self, before: int | None = None) -> None:
        """Write the windows that began before ``before`` (None: every window)."""
        done = [a for a, (w, _) in self._windows.items() if before is None or w < before]
        for address in done:
            window, count = self._windows.pop(address)
            start = datetime.fromtimestamp(window * WINDOW_SECONDS, UTC)
            draft = self.conveyor.audit.draft(
                "auth.failed",
                "client",
                address[:500],
                {
                    "count": count,
                    "window_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "window_seconds": WINDOW_SECONDS,
                },
                actor="anonymous",
            )
            self.conveyor.audit.record_soon(draft)
        for window in [w for w in self._others if before is None or w < before]:
            start = datetime.fromtimestamp(window * WINDOW_SECONDS, UTC)
            draft = self.conveyor.audit.draft(
                "auth.failed",
                "client",
                "*",
                {
                    "count": self._others.pop(window),
                    "other_addresses": True,
                    "window_start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "window_seconds": WINDOW_SECONDS,
                },
                actor="anonymous",
            )
            self.conveyor.audit.record_soon(draft)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        await self.conveyor.audit.drain()


def entry_dict(e: AuditEntry) -> dict[str, Any]:
    return e.to_dict()


def audit_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    admin = [Depends(auth.require(KeyScope.ADMIN))]

    @router.get(
        "/api/audit",
        dependencies=admin,
        tags=["audit"],
        responses={400: {"description": "Invalid filter"}},
    )
    async def list_audit(
        resource_id: Annotated[str | None, Query(min_length=1, max_length=500)] = None,
        actor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        action: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
        after: Annotated[int, Query(ge=0, lt=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
    ) -> dict[str, Any]:
        """Audit entries after ``after`` in ``seq`` order (admin keys): the chain of
        custody of one resource with ``resource_id``. ``next_after``: pass it as
        ``after`` for the next page (null on the last one)."""
        query = AuditQuery(resource_id, actor, action, after, limit)
        entries = await conveyor.audit.list(query)
        more = len(entries) == limit
        return {
            "success": True,
            "entries": [entry_dict(e) for e in entries],
            "next_after": entries[-1].seq if more and entries else None,
        }

    return router
