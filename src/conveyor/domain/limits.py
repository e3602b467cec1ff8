"""The one set of value ranges every entry point enforces (Python, CLI, REST, batch).

Each limit is named once here; ``docs/api.md`` ("Value ranges") lists them for
users. Outcomes a handler produces are never refused: ``safe_text`` makes any
text storable instead (see :mod:`conveyor.domain.retry` and the worker).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

#: Earliest and latest accepted ``run_at`` / ``scheduled_at`` (UTC, inclusive).
#: Both fit every backend's timestamp type and survive any UTC offset.
MIN_RUN_AT = datetime(1970, 1, 1, tzinfo=UTC)
MAX_RUN_AT = datetime(9999, 12, 30, tzinfo=UTC)
#: Longest ``delay`` of a submit, in seconds (100 years).
MAX_DELAY_SECONDS = 100 * 365 * 86_400
#: The same bound for REST's ``delay_ms``, in milliseconds.
MAX_DELAY_MS = MAX_DELAY_SECONDS * 1000
#: Longest wait a handler's ``Retry(delay=...)`` gets, in seconds (30 days); longer
#: delays are clamped to it, a NaN delay means "use the job type's backoff".
MAX_RETRY_DELAY_SECONDS = 30 * 86_400
#: Error texts (``jobs.error``, ``job_executions.error``, events) are cut to this
#: many characters with a visible marker.
MAX_ERROR_CHARS = 8_192
#: Integers accepted in payloads and results (the JSON encoder's 64-bit range);
#: larger ones must travel as strings.
MIN_JSON_INT = -(2**63)
MAX_JSON_INT = 2**64 - 1
TRUNCATION_MARKER = "... [truncated {n} characters]"


def run_at_error(value: datetime) -> str | None:
    """Why ``value`` can't be a job's ``run_at``, or ``None`` when it can.

    A naive datetime, or one outside ``MIN_RUN_AT..MAX_RUN_AT`` once converted to
    UTC (the conversion itself may overflow: year 1 at +14:00), is refused.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        return "must be a timezone-aware datetime"
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not MIN_RUN_AT <= utc <= MAX_RUN_AT:
        return f"must be between {MIN_RUN_AT.isoformat()} and {MAX_RUN_AT.isoformat()} (UTC)"
    return None


def delay_error(value: object) -> str | None:
    """Why ``value`` can't be a submit ``delay`` (seconds), or ``None`` when it can."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds"
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY_SECONDS:
        return f"must be a finite number of seconds from 0 to {MAX_DELAY_SECONDS}"
    return None


#: Longest handler timeout, in seconds (24 hours); the shortest is 1 ms.
MAX_TIMEOUT_SECONDS = 86_400


def timeout_error(value: object) -> str | None:
    """Why ``value`` can't be a timeout in seconds, or ``None`` when it can."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds"
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_SECONDS:
        return f"must be a finite number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS}"
    return None


def run_at_after(now: datetime, delay: float) -> datetime:
    """``now + delay`` for a delay that passed ``delay_error``."""
    return now + timedelta(seconds=float(delay))


def clamp_retry_delay(delay: float | None) -> float | None:
    """A handler's requested retry delay made safe to add to a timestamp.

    ``None`` or NaN: no request (the backoff policy decides). Negative: 0.
    Above ``MAX_RETRY_DELAY_SECONDS`` (infinity included): that maximum.
    """
    if delay is None:
        return None
    if isinstance(delay, int) and not isinstance(delay, bool) and delay > MAX_RETRY_DELAY_SECONDS:
        return float(MAX_RETRY_DELAY_SECONDS)  # 10**400 is a huge delay, not no delay
    if not isinstance(delay, int | float):
        return None  # only numbers: float() of an object would run its code
    try:
        value = float(delay)
    except (TypeError, ValueError, OverflowError):
        return None
    if math.isnan(value):
        return None
    return min(max(value, 0.0), float(MAX_RETRY_DELAY_SECONDS))


def text_error(value: str) -> str | None:
    """Why ``value`` can't be stored as a key or name (NUL, lone surrogates), or ``None``."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def safe_text(value: object, limit: int = MAX_ERROR_CHARS) -> str:
    """``str(value)`` that every store can hold, and that never raises.

    Lone surrogates (``os.fsdecode`` of undecodable bytes) and NUL characters
    become U+FFFD; text longer than ``limit`` characters keeps its head and
    ends with ``TRUNCATION_MARKER``. An object whose ``__str__`` raises is
    described by its type.
    """
    if type(value) is str:
        text = value
    else:
        try:
            text = str(value)
        except BaseException:  # noqa: BLE001 - a hostile __str__ must not escape
            try:
                text = f"<{type(value).__name__} whose str() failed>"
            except BaseException:  # noqa: BLE001
                text = "<unprintable>"
        if type(text) is not str:  # a str subclass may carry its own surprises
            text = str.__str__(text) if isinstance(text, str) else "<unprintable>"
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    if len(text) > limit:
        cut = len(text) - limit
        text = text[:limit] + TRUNCATION_MARKER.format(n=cut)
    return text
