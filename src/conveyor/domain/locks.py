"""Distributed locks and leader leases: the values and the one validation.

A lock is a row per key: who holds it (``owner``), until when (``expires_at``)
and its fencing ``token``. Each acquisition of a key gets a token greater than
every token that key was ever given (the row is never deleted, the counter never
goes back), so a resource that remembers the highest token it has seen can
refuse a write from a holder whose lock expired meanwhile.

A leader lease is a lock under the key ``leader:<name>`` (see ``leader_key``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError

#: Longest lock key, in characters.
MAX_LOCK_KEY_CHARS = 200
#: Shortest and longest lock TTL, in seconds.
MIN_LOCK_TTL = 0.01
MAX_LOCK_TTL = 30 * 86_400.0
#: Longest ``wait`` for a held lock, in seconds (one day).
MAX_LOCK_WAIT = 86_400.0
#: Longest owner label, in characters.
MAX_OWNER_CHARS = 200
#: The key prefix of leader leases.
LEADER_PREFIX = "leader:"


@dataclass(frozen=True, slots=True)
class LockInfo:
    """One key of the locks table.

    ``owner``/``expires_at`` are ``None`` once released; ``token`` is the last
    token handed out for the key (never reset). ``held`` is whether the lock was
    held at the ``now`` it was read with.
    """

    key: str
    owner: str | None
    token: int
    acquired_at: datetime | None
    expires_at: datetime | None
    held: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "owner": self.owner,
            "token": self.token,
            "acquired_at": None if self.acquired_at is None else self.acquired_at.isoformat(),
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "held": self.held,
        }


def leader_key(name: str) -> str:
    """The lock key of the leader lease ``name``."""
    return LEADER_PREFIX + name


def _text_error(value: object, limit: int) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > limit:
        return f"must be at most {limit} characters (got {len(value)})"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "must not contain control characters (NUL, newline, ...) or lone surrogates"
    return None


def _seconds_error(value: object, low: float, high: float, *, low_inclusive: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number of seconds, not {type(value).__name__}"
    if not math.isfinite(value):
        return "must be a finite number of seconds"
    if value < low or (value == low and not low_inclusive) or value > high:
        return f"must be between {low:g} and {high:g} seconds (got {value!r})"
    return None


def check_lock_args(
    key: object,
    *,
    ttl: object = None,
    wait: object = None,
    token: object = None,
    renew_every: object = None,
    field: str = "key",
) -> None:
    """Raise ``ValidationError`` (with ``details``) when any given argument is bad:
    ``key`` a 1..200 character string without control characters; ``ttl``
    ``MIN_LOCK_TTL..MAX_LOCK_TTL`` seconds; ``wait`` ``0..MAX_LOCK_WAIT`` seconds;
    ``token`` a positive 63-bit integer; ``renew_every`` above 0 and at most
    ``MAX_LOCK_TTL`` seconds. ``None`` skips that argument."""
    problems = []
    if (why := _text_error(key, MAX_LOCK_KEY_CHARS)) is not None:
        problems.append(FieldError(field, why))
    if ttl is not None and (
        why := _seconds_error(ttl, MIN_LOCK_TTL, MAX_LOCK_TTL, low_inclusive=True)
    ):
        problems.append(FieldError("ttl", why))
    if wait is not None and (why := _seconds_error(wait, 0.0, MAX_LOCK_WAIT, low_inclusive=True)):
        problems.append(FieldError("wait", why))
    if renew_every is not None and (
        why := _seconds_error(renew_every, 0.0, MAX_LOCK_TTL, low_inclusive=False)
    ):
        problems.append(FieldError("renew_every", why))
    if token is not None and (
        isinstance(token, bool) or not isinstance(token, int) or not 1 <= token < 2**63
    ):
        problems.append(FieldError("token", "must be a positive integer fencing token"))
    if problems:
        raise ValidationError(
            "Invalid lock arguments: " + "; ".join(f"{p.field} {p.message}" for p in problems),
            problems,
        )


def check_owner(owner: object) -> None:
    """Raise ``ValidationError`` when ``owner`` is not a usable owner label."""
    if (why := _text_error(owner, MAX_OWNER_CHARS)) is not None:
        raise ValidationError(f"Invalid lock owner: {why}", [FieldError("owner", why)])
