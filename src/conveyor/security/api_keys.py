"""API keys: created once, shown once, stored as a SHA-256 hash.

Keys are 256 random bits, so a plain SHA-256 is enough (no slow KDF needed:
nobody can brute-force 2**256). Format: ``cvk_<id>_<secret>``.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from conveyor.domain.auth import ApiKey, Scope
from conveyor.domain.errors import ValidationError

PREFIX = "cvk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(name: str, scope: Scope | str, now: datetime) -> tuple[str, ApiKey]:
    """A fresh key (to show once) and its record (to store)."""
    try:
        scope = Scope(scope)
    except ValueError:
        raise ValidationError(
            f"Unknown scope {scope!r}: use one of {', '.join(s.value for s in Scope)}"
        ) from None
    if not 1 <= len(name) <= 100:
        raise ValidationError("API key name must be 1-100 characters")
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, ApiKey(
        id=key_id,
        name=name,
        scope=scope,
        key_hash=hash_key(key),
        prefix=key[:12],
        created_at=now,
    )
