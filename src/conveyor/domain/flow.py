"""Flow control values: concurrency keys, limits, rate windows, requirements, queues.

Pure: parsing and validation only. The store enforces the limits in its fetch
(see ``docs/flow_control.md``); this module says what a valid limit is, once,
for every entry point (Python, REST, CLI, batch).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.limits import text_error

MAX_KEY_CHARS = 255
MAX_CONCURRENCY_LIMIT = 1_000_000
MAX_RATE_LIMIT = 1_000_000_000
MAX_RATE_WINDOW_SECONDS = 7 * 86_400
MIN_RATE_WINDOW_SECONDS = 0.001
MAX_REQUIREMENTS = 20

_CAP_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_CAP_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
_RATE_RE = re.compile(
    r"^\s*(\d{1,10})\s*/\s*(\d{0,7}(?:\.\d{1,3})?)\s*(ms|s|sec|m|min|h)?\s*$", re.IGNORECASE
)
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_FORMATTER = string.Formatter()


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` jobs start per fixed window of ``window`` seconds.

    Windows are aligned to the UNIX epoch (``floor(now / window)``): each holds at
    most ``limit`` starts, so any ``window``-long span that straddles two windows
    may see up to ``2 * limit`` (the burst at a window edge)."""

    limit: int
    window: float

    def __str__(self) -> str:
        return f"{self.limit}/{self.window:g}s"

    def window_start(self, now_ts: float) -> float:
        return math.floor(now_ts / self.window) * self.window


def parse_rate_limit(value: object, field_name: str = "rate_limit") -> RateLimit:
    """``"100/60s"``, ``"50/s"``, ``"10/m"``, ``"5/500ms"``, ``"1000/h"``, or a
    ``RateLimit`` / ``(limit, seconds)`` pair. Raises ``ValidationError``."""
    if isinstance(value, RateLimit):
        limit, window = value.limit, value.window
    elif isinstance(value, tuple) and len(value) == 2:
        limit, window = value
    elif isinstance(value, str):
        match = _RATE_RE.match(value)
        if match is None:
            raise _invalid(
                field_name,
                f"must look like '100/60s' (N starts per window; units ms, s, m, h), "
                f"got {value[:50]!r}",
            )
        limit = int(match[1])
        window = float(match[2] or 1) * _UNITS[(match[3] or "s").lower()]
    else:
        raise _invalid(field_name, "must be text like '100/60s'")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RATE_LIMIT:
        raise _invalid(field_name, f"must allow 1 to {MAX_RATE_LIMIT} starts per window")
    if (
        isinstance(window, bool)
        or not isinstance(window, int | float)
        or not math.isfinite(window)
        or not MIN_RATE_WINDOW_SECONDS <= window <= MAX_RATE_WINDOW_SECONDS
    ):
        raise _invalid(
            field_name,
            f"window must be from {MIN_RATE_WINDOW_SECONDS} to {MAX_RATE_WINDOW_SECONDS} seconds",
        )
    return RateLimit(limit, float(window))


def check_concurrency_limit(value: object, field_name: str = "concurrency_limit") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(field_name, "must be an integer")
    if not 1 <= value <= MAX_CONCURRENCY_LIMIT:
        raise _invalid(field_name, f"must be from 1 to {MAX_CONCURRENCY_LIMIT}")
    return value


def key_error(value: object) -> str | None:
    """Why ``value`` can't be a concurrency key (1-255 characters of text)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_CHARS:
        return f"must be text of 1-{MAX_KEY_CHARS} characters"
    return text_error(value)


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """A concurrency key computed from the payload: ``"tenant:{tenant_id}"``.

    Fields name top-level payload keys; their values must be text, integers or
    booleans. No attribute access, indexing or format specs."""

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: object, field_name: str = "concurrency_key") -> KeyTemplate:
        problem = key_error(text)
        if problem is not None:
            raise _invalid(field_name, problem)
        assert isinstance(text, str)
        names: list[str] = []
        try:
            parts = list(_FORMATTER.parse(text))
        except ValueError as exc:
            raise _invalid(field_name, f"is not a valid template: {exc}") from None
        for _literal, name, spec, conversion in parts:
            if name is None:
                continue
            if not _FIELD_RE.match(name) or spec or conversion:
                raise _invalid(
                    field_name,
                    "template fields must be plain payload names like {tenant_id} "
                    "(no indexing, attributes or format specs)",
                )
            names.append(name)
        return cls(text, tuple(dict.fromkeys(names)))

    def render(self, payload: Mapping[str, Any]) -> str:
        """The key for ``payload``. Raises ``ValidationError`` naming the missing or
        unusable payload field."""
        if not self.fields:
            return self.text
        values: dict[str, str] = {}
        for name in self.fields:
            if name not in payload:
                raise _invalid(
                    f"payload.{name}", f"is required by the concurrency key {self.text!r}"
                )
            v = payload[name]
            if isinstance(v, bool):
                values[name] = "true" if v else "false"
            elif isinstance(v, int | str):
                values[name] = str(v)
            else:
                raise _invalid(
                    f"payload.{name}",
                    f"must be text or an integer: the concurrency key {self.text!r} uses it",
                )
        key = self.text.format(**values)
        problem = key_error(key)
        if problem is not None:
            raise _invalid("concurrency_key", f"(computed {key[:40]!r}...) {problem}")
        return key


def check_requirements(value: object, field_name: str = "requires") -> dict[str, str]:
    """Requirements (of a job) or capabilities (of a worker): ``{"gpu": "a100"}``.
    Keys: 1-64 of letters, digits, ``_``, ``-``; values: 1-100 of those and
    ``.``, ``:``; at most 20 pairs. Raises ``ValidationError``."""
    if not isinstance(value, Mapping):
        raise _invalid(field_name, "must be an object of name -> value (text)")
    if len(value) > MAX_REQUIREMENTS:
        raise _invalid(field_name, f"must have at most {MAX_REQUIREMENTS} entries")
    errs: list[FieldError] = []
    for k, v in value.items():
        if not isinstance(k, str) or not _CAP_KEY_RE.match(k):
            errs.append(FieldError(field_name, "names must be 1-64 letters, digits, '_' or '-'"))
        elif not isinstance(v, str) or not _CAP_VALUE_RE.match(v):
            errs.append(
                FieldError(
                    f"{field_name}.{k}",
                    "must be text of 1-100 letters, digits, '_', '-', '.', ':'",
                )
            )
    if errs:
        raise ValidationError(
            f"Invalid {field_name}: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
        )
    return {k: value[k] for k in sorted(value)}


def parse_capability(text: str) -> tuple[str, str]:
    """``"gpu=a100"`` from the command line. Raises ``ValidationError``."""
    name, sep, value = text.partition("=")
    if not sep:
        raise _invalid("capability", f"must be NAME=VALUE (got {text[:50]!r})")
    pair = check_requirements({name.strip(): value.strip()}, "capability")
    return next(iter(pair.items()))


def unmet(requires: Mapping[str, str], capabilities: Mapping[str, str]) -> dict[str, str]:
    """The requirements ``capabilities`` does not meet."""
    return {k: v for k, v in requires.items() if capabilities.get(k) != v}


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """A job type's flow control as registered (``@app.job(...)``); recorded in the
    store by workers so every process enforces and applies the same."""

    job_type: str
    concurrency_key: KeyTemplate | None = None
    concurrency_limit: int | None = None
    rate_limit: RateLimit | None = None
    requires: Mapping[str, str] = field(default_factory=dict)
    updated_at: datetime | None = None

    @property
    def limited(self) -> bool:
        """Whether the fetch must count anything for this type."""
        return self.concurrency_limit is not None or self.rate_limit is not None

    @property
    def empty(self) -> bool:
        return not self.limited and self.concurrency_key is None and not self.requires


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A queue's run-time controls and what it holds."""

    name: str
    paused: bool = False
    concurrency_limit: int | None = None
    pending: int = 0
    running: int = 0
    updated_at: datetime | None = None


@dataclass(slots=True)
class FlowStats:
    """Ready jobs held back by flow control, for ``conveyor status`` and metrics."""

    #: queue -> ready jobs in it while it is paused
    paused: dict[str, int] = field(default_factory=dict)
    #: job_type -> ready jobs whose key is at its concurrency limit
    concurrency: dict[str, int] = field(default_factory=dict)
    #: job_type -> ready jobs whose key used its rate window up
    rate: dict[str, int] = field(default_factory=dict)
    #: queue -> ready jobs held by the queue's concurrency limit
    queue_limit: dict[str, int] = field(default_factory=dict)
    #: (queue, job_type, requirements JSON) -> pending jobs with requirements
    requirements: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def held(self) -> dict[str, int]:
        """Totals by limit kind."""
        return {
            "paused_queue": sum(self.paused.values()),
            "concurrency_limit": sum(self.concurrency.values()),
            "rate_limit": sum(self.rate.values()),
            "queue_concurrency_limit": sum(self.queue_limit.values()),
        }


def _invalid(field_name: str, message: str) -> ValidationError:
    return ValidationError(f"{field_name} {message}", [FieldError(field_name, message)])
