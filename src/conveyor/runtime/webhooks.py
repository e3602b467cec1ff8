"""Webhooks: from outbox events to signed HTTP POSTs, each delivery a Conveyor job.

The ``webhooks`` outbox consumer (``WebhookDispatcher``) turns each event
into one ``conveyor.webhook`` job per active endpoint that wants its type,
with an idempotency key per (endpoint, event) so a replayed batch does not
enqueue twice. The job (``WebhookSender.deliver``) POSTs the event envelope,
signed, and logs the attempt; anything but 2xx raises, so the job is
retried with backoff and dead-lettered when its retries run out, like any
job. An endpoint failing ``webhook_disable_after`` attempts in a row is
disabled (a ``webhook_disabled`` event says so).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import orjson
import structlog

from conveyor.domain.errors import FieldError, Permanent, ValidationError
from conveyor.domain.events import INTERNAL_JOB_PREFIX, envelope
from conveyor.domain.ids import new_token
from conveyor.domain.job import Event, NewJob
from conveyor.domain.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    DeliveryAttempt,
    DeliveryOutcome,
    Webhook,
    WebhookNotFound,
    WebhookState,
    delivery_key,
    sign,
    wanted,
)
from conveyor.runtime.context import JobContext

if TYPE_CHECKING:
    from conveyor.app import Conveyor

log = structlog.get_logger("conveyor.webhooks")

WEBHOOK_JOB = "conveyor.webhook"
USER_AGENT = "Conveyor-Webhooks/1"


class TargetRefused(ValueError):
    """The URL resolves to an address webhooks may not reach."""


async def check_target(url: str, *, allow_private: bool) -> None:
    """Refuse loopback, private, link-local and other internal addresses (SSRF guard).

    Every address the host resolves to must be public, unless ``allow_private``.
    """
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    port = urlsplit(url).port or 443
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port)
    except (OSError, ValueError) as exc:  # ValueError: UnicodeError of a bad IDNA label
        raise TargetRefused(f"cannot resolve {host!r}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise TargetRefused(
                f"{host!r} resolves to {address}, a private or internal address; "
                "set CONVEYOR_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )


async def validate_target(url: str, *, allow_private: bool) -> None:
    """``check_target`` as a ``ValidationError`` on ``url`` (for the API)."""
    try:
        await check_target(url, allow_private=allow_private)
    except TargetRefused as exc:
        raise ValidationError(
            f"Webhook URL refused: {exc}", [FieldError("url", str(exc))]
        ) from None


class WebhookDispatcher:
    """Outbox batch handler: one delivery job per (matching endpoint, event)."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app

    async def _webhooks(self) -> list[Webhook]:
        hooks = await self.app.store.list_webhooks()
        return [w for w in hooks if w.state is WebhookState.ACTIVE]

    async def skip_to(self) -> int | None:
        """With no active endpoint, skip ahead: the newest id is read before the
        endpoints, so one created after the check gets every event after it."""
        if await self._webhooks():  # endpoints exist: deliver, no more queries
            return None
        latest = await self.app.store.latest_event_id()
        return None if await self._webhooks() else latest

    async def __call__(self, events: Sequence[Event]) -> None:
        hooks = await self._webhooks()
        if not hooks:
            return
        jobs: list[NewJob] = []
        for e in events:
            if str(e.data.get("job_type", "")).startswith(INTERNAL_JOB_PREFIX):
                continue  # deliveries' own events never feed webhooks: no loops
            for hook in wanted(hooks, e.type):
                payload = {
                    "webhook_id": hook.id,
                    "delivery_id": f"{e.id}-{hook.id}-{new_token()[:8]}",
                    "event": envelope(e),
                }
                jobs.append(
                    self.app.new_job(
                        WEBHOOK_JOB,
                        payload,
                        idempotency_key=delivery_key(hook.id, e.id),
                        internal=True,
                    )
                )
        if jobs:
            await self.app.submit_many(jobs)


class WebhookSender:
    """The ``conveyor.webhook`` job handler and the HTTP client it shares."""

    def __init__(
        self,
        app: Conveyor,
        *,
        timeout: float,
        disable_after: int,
        allow_private: bool,
        clock: Callable[[], datetime],
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.disable_after = disable_after
        self.allow_private = allow_private
        self._clock = clock
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=False,  # a redirect could lead to an internal address
                headers={"User-Agent": USER_AGENT},
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver(
        self, ctx: JobContext, webhook_id: str, delivery_id: str, event: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            hook = await self.app.store.get_webhook(webhook_id)
        except WebhookNotFound:
            raise Permanent(f"webhook {webhook_id} was deleted") from None
        if hook.state is not WebhookState.ACTIVE:
            raise Permanent(f"webhook {webhook_id} is disabled: {hook.disabled_reason}")
        body = orjson.dumps(event)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: str(event.get("type", "")),
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(hook.secret, int(time.time()), body),
        }
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            await check_target(hook.url, allow_private=self.allow_private)
            response = await self.client().post(hook.url, content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TargetRefused as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration_ms = (time.perf_counter() - started) * 1000
        outcome = DeliveryOutcome.DELIVERED if error is None else DeliveryOutcome.FAILED
        attempt = DeliveryAttempt(
            webhook_id=hook.id,
            delivery_id=delivery_id,
            event_id=int(event.get("id", 0)),
            event_type=str(event.get("type", "")),
            job_id=ctx.job_id,
            attempt=ctx.attempt,
            outcome=outcome,
            status_code=status,
            error=error,
            duration_ms=round(duration_ms, 3),
            created_at=self._clock(),
        )
        try:
            after = await self.app.store.record_delivery(attempt, self.disable_after)
        except WebhookNotFound:
            raise Permanent(f"webhook {webhook_id} was deleted") from None
        if error is None:
            return {"status_code": status, "duration_ms": attempt.duration_ms}
        if after.state is not WebhookState.ACTIVE:
            log.warning("webhook_disabled", webhook_id=hook.id, reason=after.disabled_reason)
            raise Permanent(f"{error}; webhook disabled: {after.disabled_reason}")
        raise WebhookDeliveryFailed(error)


class WebhookDeliveryFailed(Exception):
    """A delivery attempt got no 2xx: the job retries with backoff."""
