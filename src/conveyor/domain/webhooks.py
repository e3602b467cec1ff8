"""Webhook endpoints, delivery attempts and the signature scheme (pure).

A delivery is signed as ``X-Conveyor-Signature: t=<unix>,v1=<hex>`` where
``<hex>`` is HMAC-SHA256 with the endpoint's secret over ``"<t>.<body>"``.
Receivers recompute it and reject a timestamp older than their tolerance.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from urllib.parse import SplitResult, urlsplit

from conveyor.domain.errors import FieldError, NotFound, ValidationError
from conveyor.domain.events import parse_type_patterns, type_matches

SIGNATURE_HEADER = "X-Conveyor-Signature"
EVENT_HEADER = "X-Conveyor-Event"
DELIVERY_HEADER = "X-Conveyor-Delivery"
MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 16


class WebhookState(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


class WebhookNotFound(NotFound):
    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"Webhook {webhook_id!r} not found")
        self.webhook_id = webhook_id


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    event_types: tuple[str, ...]
    secret: str
    created_at: datetime
    state: WebhookState = WebhookState.ACTIVE
    consecutive_failures: int = 0
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    # The first failed attempt since the last delivered one (None: not failing).
    failing_since: datetime | None = None
    last_delivered_at: datetime | None = None
    # While disabled: the id of its ``webhook_disabled`` event; re-enabling
    # delivers the matching events after it.
    replay_after: int | None = None
    # The vault secret holding the signing secret (``secret`` is then empty); None:
    # the secret is stored as given, unencrypted (no master key when it was made).
    secret_ref: str | None = None


@dataclass(frozen=True, slots=True)
class DisablePolicy:
    """When an endpoint that keeps failing is disabled: once it has had no
    delivered attempt for ``after_seconds`` since its first failure, with at least
    ``min_failures`` failed attempts in a row. Either at 0: never."""

    after_seconds: float = 86_400.0
    min_failures: int = 20

    def should_disable(self, hook: Webhook, now: datetime) -> bool:
        """Whether ``hook``, just after recording a failed attempt at ``now``, is due."""
        if self.after_seconds <= 0 or self.min_failures <= 0 or hook.failing_since is None:
            return False
        failing_for = (now - hook.failing_since).total_seconds()
        return hook.consecutive_failures >= self.min_failures and failing_for >= self.after_seconds

    def reason(self, hook: Webhook, now: datetime) -> str:
        assert hook.failing_since is not None
        failing_for = (now - hook.failing_since).total_seconds()
        return (
            f"no delivery succeeded for {_duration(failing_for)} "
            f"({hook.consecutive_failures} failed attempts in a row)"
        )


def _duration(seconds: float) -> str:
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3_600:
        return f"{seconds / 3_600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.1f} seconds"


class DeliveryOutcome(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One HTTP attempt to deliver one event to one endpoint."""

    webhook_id: str
    delivery_id: str  # same for every attempt of one event: receivers dedupe on it
    event_id: int
    event_type: str
    job_id: str | None  # the delivery job
    attempt: int
    outcome: DeliveryOutcome
    status_code: int | None
    error: str | None
    duration_ms: float
    created_at: datetime


def validate_webhook(
    url: object, event_types: object, secret: object
) -> tuple[str, tuple[str, ...]]:
    """Check a webhook's fields; returns the URL and the type patterns."""
    problems: list[FieldError] = []
    clean_url = ""
    if not isinstance(url, str) or not url:
        problems.append(FieldError("url", "is required"))
    elif len(url) > MAX_URL_LENGTH:
        problems.append(FieldError("url", f"is longer than {MAX_URL_LENGTH} characters"))
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(FieldError("url", "must be an absolute http:// or https:// URL"))
        elif parts.username or parts.password:
            problems.append(FieldError("url", "must not carry credentials; use the secret"))
        elif not _valid_port(parts):
            problems.append(FieldError("url", "has an invalid port (1-65535)"))
        else:
            clean_url = url
    patterns: tuple[str, ...] = ()
    if not isinstance(event_types, list | tuple) or not event_types:
        problems.append(FieldError("event_types", "must be a non-empty list of event types"))
    elif not all(isinstance(t, str) for t in event_types):
        problems.append(FieldError("event_types", "must be strings"))
    else:
        try:
            patterns = parse_type_patterns(list(event_types), "event_types")
        except ValidationError as exc:
            problems.extend(exc.details)
    if secret is not None and (not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH):
        problems.append(
            FieldError("secret", f"must be a string of at least {MIN_SECRET_LENGTH} characters")
        )
    if problems:
        raise ValidationError("Invalid webhook", problems)
    return clean_url, patterns


def _valid_port(parts: SplitResult) -> bool:
    try:
        port = parts.port
    except ValueError:
        return False
    return port is None or port > 0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Conveyor-Signature`` header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """Receiver side: whether ``header`` signs ``body`` and is at most ``tolerance`` s old."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, header.strip())


def delivery_key(webhook_id: str, event_id: int) -> str:
    """Idempotency key of the delivery job (a relay replay never enqueues it twice)."""
    return f"webhook:{webhook_id}:{event_id}"


def wanted(webhooks: Sequence[Webhook], event_type: str) -> list[Webhook]:
    return [
        w
        for w in webhooks
        if w.state is WebhookState.ACTIVE and type_matches(w.event_types, event_type)
    ]
