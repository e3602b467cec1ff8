"""API keys and scopes (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Scope(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    def allows(self, needed: Scope) -> bool:
        """``admin`` can do everything ``write`` can, which can do everything ``read`` can."""
        return _RANK[self] >= _RANK[needed]


_RANK = {Scope.READ: 0, Scope.WRITE: 1, Scope.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    scope: Scope
    key_hash: str  # sha256 hex of the whole key; the key itself is never stored
    prefix: str  # first characters of the key, to recognise it in listings
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None  # refused from this instant on; None = never
    last_used_at: datetime | None = None  # recorded at most once a minute per process

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at
