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
from conveyor.domain.errors import FieldError, ValidationError

PREFIX = "cvk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


#: The longest lifetime ``expires_in`` may give a key (10 years), and the shortest.
MAX_KEY_LIFETIME = 10 * 365 * 86_400.0
MIN_KEY_LIFETIME = 60.0
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``3600s``, ``2w`` (or plain seconds) in seconds.
    Raises ``ValidationError``."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValidationError(
            f"Invalid duration {text!r}",
            [FieldError("expires_in", "a whole number with s, m, h, d or w, e.g. 90d")],
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
