"""The lifecycle event catalog and the JSON envelope every consumer sees.

An outbox row (``Event``) becomes this envelope on the bus, on the WebSocket,
in ``GET /api/events`` and in webhook bodies (``docs/events.md``)::

    {"id": 42, "type": "job_completed", "version": 1,
     "timestamp": "2026-11-23T12:00:00.123456+00:00",
     "job_id": "...", "job_type": "send_email", "queue": "default",
     "data": {"status": "completed", "attempt": 1, "result": {...}, "duration_ms": 12.5}}
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.job import INTERNAL_JOB_PREFIX as _INTERNAL_JOB_PREFIX
from conveyor.domain.job import Event
from conveyor.domain.schedules import SCHEDULE_FIRED as _SCHEDULE_FIRED
from conveyor.domain.states import EVENT_VERSION, EventType
from conveyor.domain.workflow import WORKFLOW_EVENT_TYPES

#: Events about Conveyor's own machinery (webhook endpoints, not jobs).
WEBHOOK_DISABLED = "webhook_disabled"

#: A cron schedule fired: written with the job it submitted (docs/schedules.md).
SCHEDULE_FIRED = _SCHEDULE_FIRED

#: Every event type a consumer can ask for.
EVENT_TYPES: tuple[str, ...] = (
    *(t.value for t in EventType),
    WEBHOOK_DISABLED,
    *WORKFLOW_EVENT_TYPES,
    SCHEDULE_FIRED,
)

#: Job types Conveyor runs for itself (``conveyor.``); their events never feed
#: webhooks (no loops).
INTERNAL_JOB_PREFIX = _INTERNAL_JOB_PREFIX

#: The filters the OpenAPI document advertises (the parser accepts any glob that
#: matches a known type; this regex lists the useful ones).
_ONE_FILTER = (
    "("
    + "|".join(
        [
            r"\*",
            r"job_\*",
            r"worker_\*",
            r"webhook_\*",
            r"workflow_\*",
            r"schedule_\*",
            *EVENT_TYPES,
        ]
    )
    + ")"
)
TYPE_FILTER_REGEX = f"^{_ONE_FILTER}$"
TYPE_FILTERS_REGEX = rf"^(\s*{_ONE_FILTER}\s*(,\s*{_ONE_FILTER}\s*)*)?$"

_ENVELOPE_KEYS = ("job_id", "job_type", "queue")
_PATTERN_RE = re.compile(r"^[a-z_*?\[\]]{1,64}$")


def envelope(event: Event) -> dict[str, Any]:
    """The public, versioned JSON form of an outbox event."""
    data = dict(event.data)
    head = {k: data.pop(k, None) for k in _ENVELOPE_KEYS}
    if head["job_id"] is None:
        head["job_id"] = event.job_id
    return {
        "id": event.id,
        "type": event.type,
        "version": EVENT_VERSION,
        "timestamp": event.created_at.isoformat(),
        **head,
        "data": data,
    }


def parse_type_patterns(raw: str | Sequence[str] | None, field: str = "types") -> tuple[str, ...]:
    """Glob patterns (``job_*``, ``*``, ``job_failed``) from a comma list or a list.

    Each must match at least one known event type, so a typo is an error and
    not a silent stream of nothing.
    """
    if raw is None:
        return ()
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    if isinstance(raw, str) and not raw.strip():
        return ()
    problems = []
    if any(not p.strip() for p in items):
        problems.append(FieldError(field, "has an empty pattern (a stray comma?)"))
    patterns = tuple(p.strip() for p in items if p.strip())
    for p in patterns:
        if not _PATTERN_RE.match(p):
            problems.append(FieldError(field, f"{p!r} is not an event type pattern"))
        elif not any(fnmatch.fnmatchcase(t, p) for t in EVENT_TYPES):
            problems.append(
                FieldError(field, f"{p!r} matches no event type (known: {', '.join(EVENT_TYPES)})")
            )
    if problems:
        raise ValidationError("Invalid event type filter", problems)
    return patterns


def type_matches(patterns: Sequence[str], event_type: str) -> bool:
    """Whether ``event_type`` matches any pattern (no patterns = everything)."""
    return not patterns or any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What a WebSocket or polling client asked for."""

    types: tuple[str, ...] = ()
    job_id: str | None = None
    queue: str | None = None
    #: Events of Conveyor's own jobs (``conveyor.`` types) too: admin keys only.
    include_internal: bool = False

    def matches(self, event: Event) -> bool:
        if self.job_id is not None and event.job_id != self.job_id:
            return False
        if not self.include_internal and str(event.data.get("job_type", "")).startswith(
            INTERNAL_JOB_PREFIX
        ):
            return False
        if self.queue is not None and event.data.get("queue") != self.queue:
            return False
        return type_matches(self.types, event.type)
