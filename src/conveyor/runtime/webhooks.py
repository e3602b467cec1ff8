"""Webhooks: from outbox events to signed HTTP POSTs, each delivery a Conveyor job.

The ``webhooks`` outbox consumer (``WebhookDispatcher``) turns each event
into one ``conveyor.webhook`` job per active endpoint that wants its type,
with an idempotency key per (endpoint, event) so a replayed batch does not
enqueue twice. The job (``WebhookSender.deliver``) POSTs the event envelope,
signed, and logs the attempt; anything but 2xx raises, so the job is
retried with backoff and dead-lettered when its retries run out, like any
job. An endpoint with no delivered attempt for ``webhook_disable_after_seconds``
since it started failing (and at least ``webhook_disable_after`` failed
attempts in a row) is disabled (a ``webhook_disabled`` event says so);
``enable_webhook`` re-activates it and delivers the events it missed.

The HTTP client resolves each endpoint's host once per connection, checks
every address, and connects to a checked one (``PinnedBackend``): a DNS answer
that changes between the check and the connection cannot reach an internal
address. The URL keeps its host name, so the Host header, TLS SNI and
certificate verification use the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpcore
import httpx
import orjson
import structlog

from conveyor.domain.errors import FieldError, Permanent, ValidationError
from conveyor.domain.events import INTERNAL_JOB_PREFIX, envelope, type_matches
from conveyor.domain.ids import new_token
from conveyor.domain.job import Event, NewJob
from conveyor.domain.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
    Webhook,
    WebhookNotFound,
    WebhookState,
    delivery_key,
    sign,
    wanted,
)
from conveyor.runtime.context import JobContext
from conveyor.runtime.observe import WebhookAttempted

if TYPE_CHECKING:
    from conveyor.runtime.ports import RuntimeDeps

log = structlog.get_logger("conveyor.webhooks")

WEBHOOK_JOB = "conveyor.webhook"
USER_AGENT = "Conveyor-Webhooks/1"


#: ``(host, port) -> addresses``: how webhook hosts are resolved (tests inject one).
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, in its order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class TargetRefused(ValueError):
    """The URL resolves to an address webhooks may not reach."""


async def resolve_checked(
    host: str, port: int, *, allow_private: bool, resolver: Resolver = system_resolver
) -> list[str]:
    """Resolve ``host`` once and return its addresses, every one checked.

    Loopback, private, link-local, multicast and other non-global addresses are
    refused (SSRF guard) unless ``allow_private``: if any address is, the host is
    refused. Raises ``TargetRefused``.
    """
    try:
        ipaddress.ip_address(host)
        addresses = [host]  # a literal address: nothing to resolve
    except ValueError:
        try:
            addresses = await resolver(host, port)
        except (OSError, ValueError) as exc:  # ValueError: UnicodeError of a bad IDNA label
            raise TargetRefused(f"cannot resolve {host!r}: {exc}") from None
    if not addresses:
        raise TargetRefused(f"cannot resolve {host!r}: no address")
    if allow_private:
        return addresses
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
        if not address.is_global or address.is_multicast:
            raise TargetRefused(
                f"{host!r} resolves to {address}, a private or internal address; "
                "set CONVEYOR_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    return addresses


async def check_target(
    url: str, *, allow_private: bool, resolver: Resolver = system_resolver
) -> None:
    """Refuse a URL whose host resolves to an internal address (``TargetRefused``)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    await resolve_checked(
        parts.hostname or "", port, allow_private=allow_private, resolver=resolver
    )


async def validate_target(url: str, *, allow_private: bool) -> None:
    """``check_target`` as a ``ValidationError`` on ``url`` (for the API)."""
    try:
        await check_target(url, allow_private=allow_private)
    except TargetRefused as exc:
        raise ValidationError(
            f"Webhook URL refused: {exc}", [FieldError("url", str(exc))]
        ) from None


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that connects only to checked addresses.

    Each new connection resolves its host once (``resolver``), checks every
    address (``resolve_checked``) and connects to those addresses, in order,
    never to the name: nothing resolves it a second time. Pooled connections
    were checked when they were made.
    """

    def __init__(self, *, allow_private: bool, resolver: Resolver = system_resolver) -> None:
        self.allow_private = allow_private
        self.resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve_checked(
            host, port, allow_private=self.allow_private, resolver=self.resolver
        )
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise TargetRefused("webhooks are never sent over a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over ``PinnedBackend``; no proxy from the environment
    (a proxy would resolve the name itself)."""

    def __init__(self, backend: PinnedBackend, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            network_backend=backend,
        )


def delivery_job(deps: RuntimeDeps, hook: Webhook, event: Event) -> NewJob:
    """The ``conveyor.webhook`` job delivering ``event`` to ``hook``."""
    payload = {
        "webhook_id": hook.id,
        "delivery_id": f"{event.id}-{hook.id}-{new_token()[:8]}",
        "event": envelope(event),
    }
    return deps.new_job(
        WEBHOOK_JOB, payload, idempotency_key=delivery_key(hook.id, event.id), internal=True
    )


def feeds_webhooks(event: Event) -> bool:
    """Deliveries' own events never feed webhooks: no loops."""
    return not str(event.data.get("job_type", "")).startswith(INTERNAL_JOB_PREFIX)


@dataclass(frozen=True, slots=True)
class Enabled:
    webhook: Webhook
    replayed: int  # delivery jobs submitted for the events it missed


async def enable_webhook(deps: RuntimeDeps, webhook_id: str, *, batch: int = 500) -> Enabled:
    """Re-activate a disabled endpoint and deliver what it missed.

    Every event after its ``webhook_disabled`` event, up to the newest one when
    it is enabled, that its types match and the outbox still keeps (see
    ``CONVEYOR_RETENTION``) gets a delivery job. Later events are the
    dispatcher's; one that both submit is deduplicated by the delivery's
    idempotency key. An endpoint already active is returned unchanged, with
    nothing replayed. Raises ``WebhookNotFound``.
    """
    hook, after = await deps.store.enable_webhook(webhook_id)
    if after is None:
        return Enabled(hook, 0)
    # Read after the enable committed: any dispatcher batch that still saw the
    # endpoint disabled ends at or before this event.
    until = await deps.store.latest_event_id()
    replayed, cursor, done = 0, after, until == after
    while not done:
        events = await deps.store.events_after(cursor, batch)
        if not events:
            break
        jobs = []
        for e in events:
            if feeds_webhooks(e) and type_matches(hook.event_types, e.type):
                jobs.append(delivery_job(deps, hook, e))
            if e.id == until:
                done = True
                break
        if jobs:
            results = await deps.submit_many(jobs)
            replayed += sum(1 for r in results if not r.duplicate)
        cursor = events[-1].id
    log.info("webhook_enabled", webhook_id=hook.id, replayed=replayed)
    return Enabled(hook, replayed)


class WebhookDispatcher:
    """Outbox batch handler: one delivery job per (matching endpoint, event)."""

    def __init__(self, deps: RuntimeDeps) -> None:
        self.deps = deps

    async def _webhooks(self) -> list[Webhook]:
        hooks = await self.deps.store.list_webhooks()
        return [w for w in hooks if w.state is WebhookState.ACTIVE]

    async def skip_to(self) -> int | None:
        """With no active endpoint, skip ahead: the newest id is read before the
        endpoints, so one created after the check gets every event after it."""
        if await self._webhooks():  # endpoints exist: deliver, no more queries
            return None
        latest = await self.deps.store.latest_event_id()
        return None if await self._webhooks() else latest

    async def __call__(self, events: Sequence[Event]) -> None:
        hooks = await self._webhooks()
        if not hooks:
            return
        jobs = [
            delivery_job(self.deps, hook, e)
            for e in events
            if feeds_webhooks(e)
            for hook in wanted(hooks, e.type)
        ]
        if jobs:
            await self.deps.submit_many(jobs)


class WebhookSender:
    """The ``conveyor.webhook`` job handler and the HTTP client it shares."""

    def __init__(
        self,
        deps: RuntimeDeps,
        *,
        timeout: float,
        disable_after: int,
        allow_private: bool,
        clock: Callable[[], datetime],
        disable_after_seconds: float | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.deps = deps
        self.timeout = timeout
        if disable_after_seconds is None:
            disable_after_seconds = deps.settings.webhook_disable_after_seconds
        self.policy = DisablePolicy(after_seconds=disable_after_seconds, min_failures=disable_after)
        self.allow_private = allow_private
        self.resolver = resolver
        # The certificate authorities HTTPS endpoints are verified against (None:
        # httpx's bundle). Set before the first delivery, like ``resolver``.
        self.ssl_context: ssl.SSLContext | None = None
        self._clock = clock
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            backend = PinnedBackend(allow_private=self.allow_private, resolver=self.resolver)
            self._client = httpx.AsyncClient(
                transport=PinnedTransport(backend, self.ssl_context),
                timeout=self.timeout,
                follow_redirects=False,  # a redirect could lead to an internal address
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
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
            hook = await self.deps.store.get_webhook(webhook_id)
        except WebhookNotFound:
            raise Permanent(f"webhook {webhook_id} was deleted") from None
        if hook.state is not WebhookState.ACTIVE:
            raise Permanent(f"webhook {webhook_id} is disabled: {hook.disabled_reason}")
        body = orjson.dumps(event)
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: str(event.get("type", "")),
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(await self._signing_secret(hook), int(time.time()), body),
        }
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        kind = "delivered"
        try:
            # The client's backend resolves and checks the host as it connects.
            response = await self.client().post(hook.url, content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error, kind = f"HTTP {status}", "http_error"
        except TargetRefused as exc:
            error, kind = f"refused: {exc}", "refused"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            kind = "network_error"
        duration_ms = (time.perf_counter() - started) * 1000
        if self.deps.signals.observing:
            self.deps.signals.observe(WebhookAttempted(kind, duration_ms / 1000))
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
            after = await self.deps.store.record_delivery(attempt, self.policy)
        except WebhookNotFound:
            raise Permanent(f"webhook {webhook_id} was deleted") from None
        if error is None:
            return {"status_code": status, "duration_ms": attempt.duration_ms}
        if after.state is not WebhookState.ACTIVE:
            log.warning("webhook_disabled", webhook_id=hook.id, reason=after.disabled_reason)
            raise Permanent(f"{error}; webhook disabled: {after.disabled_reason}")
        raise WebhookDeliveryFailed(error)

    async def _signing_secret(self, hook: Webhook) -> str:
        """The endpoint's signing secret: from the vault when its row names one
        (``secret_ref``), else the row's own (stored before a master key existed)."""
        if hook.secret_ref is None:
            return hook.secret
        return await (self.deps.secrets or _no_vault)(hook.secret_ref)


async def _no_vault(name: str) -> str:
    raise WebhookDeliveryFailed(f"the signing secret is in the vault ({name}); no vault is wired")


class WebhookDeliveryFailed(Exception):
    """A delivery attempt got no 2xx: the job retries with backoff."""
