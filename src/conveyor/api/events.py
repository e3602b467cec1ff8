"""Events and webhooks over HTTP: ``GET /api/events``, the WebSocket
``/api/events/ws`` and ``/api/webhooks``. ``create_app`` wires it in."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response

from conveyor.api.guard import internal_error_text, report_unexpected
from conveyor.api.http import JSON, ApiError, Auth, sees_internal
from conveyor.api.models import WebhookCreate
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import ConveyorError, StoreUnavailable, ValidationError
from conveyor.domain.events import (
    TYPE_FILTERS_REGEX,
    EventFilter,
    envelope,
    parse_type_patterns,
)
from conveyor.domain.ids import new_token
from conveyor.domain.webhooks import Webhook, validate_webhook
from conveyor.presenters import delivery_dict, webhook_dict
from conveyor.runtime.hub import EventHub, UnknownEvent
from conveyor.runtime.webhooks import enable_webhook as enable_and_replay
from conveyor.runtime.webhooks import validate_target
from conveyor.security.webhook_secrets import create_webhook as create_sealed_webhook
from conveyor.security.webhook_secrets import delete_webhook as delete_sealed_webhook

log = structlog.get_logger("conveyor.api")

#: WebSocket close codes (4000-4999 are the application's own).
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TRY_AGAIN_LATER = 1013  # dropped as a slow consumer, or the store is away
CLOSE_UNSUPPORTED_DATA = 1003  # a binary frame: the protocol is JSON text
CLOSE_INTERNAL_ERROR = 1011

CLOSE_TIMEOUT = 2.0  # seconds to send a close frame to a client that stopped reading
MAX_SCAN_PAGES = 20  # GET /api/events reads at most this many pages to fill a filtered page


#: Event ids are 64-bit signed integers in every store.
MAX_EVENT_ID = 2**63 - 1


def _filter(
    types: str | None, job_id: str | None, queue: str | None, key: Any = None
) -> EventFilter:
    """The client's filter; events of Conveyor's own jobs only for an admin key or
    keyless loopback use (``key`` None), as in the job listings."""
    return EventFilter(
        parse_type_patterns(types), job_id or None, queue or None, sees_internal(key)
    )


def event_router(conveyor: Conveyor, auth: Auth, hub: EventHub) -> APIRouter:
    router = APIRouter()
    read = [Depends(auth.require(KeyScope.READ))]
    admin = [Depends(auth.require(KeyScope.ADMIN))]

    # -- events -------------------------------------------------------------------------
    @router.get("/api/events", dependencies=read, tags=["events"])
    async def list_events(
        request: Request,
        after: Annotated[
            int, Query(ge=0, le=MAX_EVENT_ID, description="Last event id seen; 0 = oldest kept")
        ] = 0,
        types: Annotated[
            str | None,
            # Documented, not enforced here: parse_type_patterns says what is wrong.
            Query(
                max_length=500,
                examples=["job_*"],
                json_schema_extra={"pattern": TYPE_FILTERS_REGEX},
            ),
        ] = None,
        job_id: Annotated[str | None, Query(max_length=64)] = None,
        queue: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Events after ``after`` in delivery order. Poll again with ``after=next_after``:
        it moves past events the filter skipped, so no event is read twice."""
        flt = _filter(types, job_id, queue, getattr(request.state, "api_key", None))
        cursor, out = after, list[dict[str, Any]]()
        for _ in range(MAX_SCAN_PAGES):
            batch = await conveyor.store.events_after(cursor, max(limit, 500))
            for e in batch:
                if len(out) == limit:
                    break
                cursor = e.id
                if flt.matches(e):
                    out.append(envelope(e))
            if len(out) == limit or len(batch) < max(limit, 500):
                break
        return {"success": True, "events": out, "next_after": cursor}

    @router.websocket("/api/events/ws")
    async def events_ws(websocket: WebSocket) -> None:
        """Live events as JSON text frames; see docs/events.md."""
        await websocket.accept()
        params = websocket.query_params
        try:
            key = await auth.authenticate(websocket, KeyScope.READ)
        except ApiError as exc:
            code = CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHORIZED
            await websocket.close(code, _reason(exc.error))
            return
        try:
            flt = _filter(params.get("types"), params.get("job_id"), params.get("queue"), key)
            raw_after = params.get("after")
            after = None if raw_after in (None, "") else int(raw_after)
            if after is not None and not 0 <= after <= MAX_EVENT_ID:
                raise ValueError
        except ValidationError as exc:
            details = "; ".join(d.message for d in exc.details)
            await websocket.close(CLOSE_BAD_REQUEST, _reason(f"{exc.message}: {details}"))
            return
        except ValueError:
            await websocket.close(CLOSE_BAD_REQUEST, "after must be an event id (integer >= 0)")
            return

        async def still_allowed() -> tuple[int, str]:
            """Waits while the caller may read; the close code once it may not
            (its key revoked, or anonymous access ended by a new key)."""
            while True:
                await asyncio.sleep(auth.recheck_interval)  # the re-check period
                try:
                    await auth.authenticate(websocket, KeyScope.READ, cached=True)
                except ApiError as exc:
                    code = CLOSE_FORBIDDEN if exc.status == 403 else CLOSE_UNAUTHORIZED
                    return code, _reason(exc.error)
                except ConveyorError:
                    continue  # the store is away: the stream itself reports that

        await _stream(websocket, hub, flt, after, still_allowed)

    # -- webhooks -----------------------------------------------------------------------
    @router.post(
        "/api/webhooks",
        status_code=201,
        dependencies=admin,
        tags=["webhooks"],
        responses={400: {"description": "Invalid or refused URL, unknown event type"}},
    )
    async def create_webhook(body: WebhookCreate) -> Response:
        """Register an endpoint. The response shows the secret once: keep it."""
        url, patterns = validate_webhook(body.url, body.event_types, body.secret)
        await validate_target(url, allow_private=conveyor.settings.webhook_allow_private)
        secret = body.secret or secrets.token_urlsafe(32)
        hook = Webhook(
            id="wh_" + new_token(),
            url=url,
            event_types=patterns,
            secret=secret,
            created_at=conveyor.now(),
        )
        summary = {"url": url, "event_types": list(patterns)}
        async with conveyor.audit.change("webhook.create", "webhook", hook.id, summary):
            hook = await create_sealed_webhook(conveyor.store, conveyor.secrets, hook)
        return JSON(
            {"success": True, "webhook": webhook_dict(hook), "secret": secret}, status_code=201
        )

    @router.get("/api/webhooks", dependencies=admin, tags=["webhooks"])
    async def list_webhooks() -> dict[str, Any]:
        hooks = await conveyor.store.list_webhooks()
        return {"success": True, "webhooks": [webhook_dict(w) for w in hooks]}

    @router.get(
        "/api/webhooks/{webhook_id}",
        dependencies=admin,
        tags=["webhooks"],
        responses={404: {"description": "Unknown webhook"}},
    )
    async def get_webhook(webhook_id: str) -> dict[str, Any]:
        hook = await conveyor.store.get_webhook(webhook_id)
        return {"success": True, "webhook": webhook_dict(hook)}

    @router.delete(
        "/api/webhooks/{webhook_id}",
        dependencies=admin,
        tags=["webhooks"],
        responses={404: {"description": "Unknown webhook"}},
    )
    async def delete_webhook(webhook_id: str) -> dict[str, Any]:
        """Delete an endpoint and its delivery log; queued deliveries are dropped."""
        async with conveyor.audit.change("webhook.delete", "webhook", webhook_id):
            await delete_sealed_webhook(conveyor.store, conveyor.secrets, webhook_id)
        return {"success": True, "deleted": webhook_id}

    @router.post(
        "/api/webhooks/{webhook_id}/enable",
        dependencies=admin,
        tags=["webhooks"],
        responses={404: {"description": "Unknown webhook"}},
    )
    async def enable_webhook(webhook_id: str) -> dict[str, Any]:
        """Re-activate a disabled endpoint and deliver the events it missed while
        disabled (those the outbox still keeps). ``replayed``: delivery jobs
        submitted; 0 for an endpoint that was active already."""
        async with conveyor.audit.change("webhook.enable", "webhook", webhook_id):
            enabled = await enable_and_replay(conveyor.deps, webhook_id)
        return {
            "success": True,
            "webhook": webhook_dict(enabled.webhook),
            "replayed": enabled.replayed,
        }

    @router.get(
        "/api/webhooks/{webhook_id}/deliveries",
        dependencies=admin,
        tags=["webhooks"],
        responses={404: {"description": "Unknown webhook"}},
    )
    async def list_deliveries(
        webhook_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, Any]:
        """Delivery attempts, newest first (each retry is its own row)."""
        attempts = await conveyor.store.list_deliveries(webhook_id, limit)
        return {"success": True, "deliveries": [delivery_dict(d) for d in attempts]}

    return router


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


async def _stream(
    websocket: WebSocket,
    hub: EventHub,
    flt: EventFilter,
    after: int | None,
    still_allowed: Callable[[], Coroutine[Any, Any, tuple[int, str]]],
) -> None:
    """Send events until the client leaves, is dropped or loses its access; answer
    pings meanwhile. Each task below returns the close code and reason that end
    the connection (None: the client left, nothing to send)."""
    sub = hub.subscriber(flt)
    stream = hub.stream(sub, after)

    async def send_events() -> tuple[int, str]:
        # One text frame per ready batch: a JSON array of envelopes, in order.
        try:
            async for items in stream:
                await websocket.send_text("[" + ",".join(text for _, text in items) + "]")
        except UnknownEvent as exc:
            return CLOSE_BAD_REQUEST, f"after={exc.args[0]} is beyond the newest event"
        except StoreUnavailable as exc:
            return CLOSE_TRY_AGAIN_LATER, _reason(f"store unavailable: {exc.reason}")
        except ConveyorError as exc:
            reference = report_unexpected(exc, "WS", websocket.url.path)
            return CLOSE_INTERNAL_ERROR, _reason(internal_error_text(reference))
        return CLOSE_TRY_AGAIN_LATER, sub.dropped or "dropped"

    async def receive() -> tuple[int, str] | None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is None:
                return CLOSE_UNSUPPORTED_DATA, "binary frames are not supported: send text"
            if text.strip() in ("ping", '{"type":"ping"}', '{"type": "ping"}'):
                await websocket.send_text(orjson.dumps({"type": "pong"}).decode())

    async def until_dropped() -> tuple[int, str]:
        await sub.dropped_event.wait()
        return CLOSE_TRY_AGAIN_LATER, sub.dropped or "dropped"

    tasks: set[asyncio.Task[tuple[int, str] | None]] = {
        asyncio.create_task(send_events()),
        asyncio.create_task(receive()),
        # A client whose socket is full blocks the sender inside send_text; the hub
        # drops it (too far behind), and this closes the connection instead of waiting.
        asyncio.create_task(until_dropped()),
        asyncio.create_task(still_allowed()),
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await stream.aclose()
    ending = None
    for task in done:
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            ending = task.result()
            break
    if ending is not None:
        code, reason = ending
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError, OSError):
            async with asyncio.timeout(CLOSE_TIMEOUT):  # a stuck socket: give up on it
                await websocket.close(code, _reason(reason))
