"""API keys: created once, shown once, stored as a SHA-256 hash.

Keys are 256 random bits, so a plain SHA-256 is enough (no slow KDF needed:
nobody can brute-force 2**256). Format: ``cvk_<id>_<secret>``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime, timedelta

from conveyor.domain.auth import ApiKey, Scope
from conveyor.domain.errors import ApiKeyNotFound, FieldError, ValidationError

PREFIX = "cvk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


#: The longest lifetime ``expires_in`` may give a key (10 years), and the shortest.
MAX_KEY_LIFETIME = 10 * 365 * 86_400.0
MIN_KEY_LIFETIME = 60.0
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str, field: str = "expires_in") -> float:
    """``90d``, ``12h``, ``30m``, ``3600s``, ``2w`` (or plain seconds) in seconds.
    Raises ``ValidationError`` (on ``field``)."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValidationError(
            f"Invalid duration {text!r}",
            [FieldError(field, "a whole number with s, m, h, d or w, e.g. 90d")],
        )
    return float(int(m[1]) * _UNIT[m[2]])


def new_api_key(
    name: str, scope: Scope | str, now: datetime, expires_in: float | None = None
) -> tuple[str, ApiKey]:
    """A fresh key (to show once) and its record (to store). ``expires_in``:
    seconds until the key is refused (60 s to 10 years), None = never."""
    try:
        scope = Scope(scope)
    except ValueError:
        raise ValidationError(
            f"Unknown scope {scope!r}: use one of {', '.join(s.value for s in Scope)}"
        ) from None
    if not 1 <= len(name) <= 100:
        raise ValidationError("API key name must be 1-100 characters")
    expires_at = None
    if expires_in is not None:
        if not MIN_KEY_LIFETIME <= expires_in <= MAX_KEY_LIFETIME:
            raise ValidationError(
                "Invalid key lifetime",
                [FieldError("expires_in", "from 60 seconds to 10 years")],
            )
        expires_at = now + timedelta(seconds=expires_in)
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKey(
        id=key_id,
        name=name,
        scope=scope,
        key_hash=hash_key(key),
        prefix=key[:12],
        created_at=now,
        expires_at=expires_at,
    )


# -- rotation (docs/security.md, "Key lifecycle") ---------------------------------------
#: How long the old key of ``conveyor keys rotate`` stays valid by default, and at most.
DEFAULT_ROTATION_OVERLAP = 24 * 3600.0
MAX_ROTATION_OVERLAP = 30 * 86_400.0


def parse_overlap(text: str) -> float:
    """A rotation overlap (``1h``, ``24h``, ``0`` = end the old key at once) in
    seconds, 0 to 30 days. Raises ``ValidationError``."""
    seconds = parse_duration(text, "overlap")
    if seconds > MAX_ROTATION_OVERLAP:
        raise ValidationError("Invalid overlap", [FieldError("overlap", "at most 30 days (30d)")])
    return seconds


def rotated_key(
    old: ApiKey, now: datetime, overlap: float, expires_in: float | None = None
) -> tuple[str, ApiKey, datetime]:
    """The successor of ``old``: (the key to show once, its record, when ``old`` stops).

    Same name and scope. Its lifetime is ``expires_in`` seconds, else the old
    key's own lifetime (a 90-day key is followed by a 90-day key), else none.
    ``old`` stops at ``now + overlap`` (``now``: revoked at once). Raises
    ``ValidationError`` for a bad overlap or lifetime."""
    if not 0 <= overlap <= MAX_ROTATION_OVERLAP:
        raise ValidationError("Invalid overlap", [FieldError("overlap", "0 to 30 days")])
    if expires_in is None and old.expires_at is not None:
        lifetime = (old.expires_at - old.created_at).total_seconds()
        expires_in = min(max(lifetime, MIN_KEY_LIFETIME), MAX_KEY_LIFETIME)
    key, record = new_api_key(old.name, old.scope, now, expires_in)
    return key, record, now + timedelta(seconds=overlap)


def resolve_key_id(text: str, keys: list[ApiKey]) -> ApiKey:
    """The key ``text`` names among ``keys``: its full id or a unique prefix of it
    (at least 4 characters, as copied from ``conveyor keys list``). Raises
    ``ApiKeyNotFound``, or ``ValidationError`` for an ambiguous or bad prefix."""
    wanted = text.strip().lower() if isinstance(text, str) else ""
    exact = [k for k in keys if k.id == wanted]
    if exact:
        return exact[0]
    if not 4 <= len(wanted) <= 64 or not wanted.isalnum():
        raise ValidationError(
            f"{text!r} is not an API key id or id prefix",
            [FieldError("key_id", "at least 4 letters or digits of an id from `keys list`")],
        )
    found = [k for k in keys if k.id.startswith(wanted)]
    if not found:
        raise ApiKeyNotFound(text)
    if len(found) > 1:
        shown = ", ".join(k.id for k in found[:5])
        raise ValidationError(
            f"API key id prefix {text!r} is ambiguous: it matches {shown}. Give more characters",
            [FieldError("key_id", "ambiguous prefix")],
        )
    return found[0]
