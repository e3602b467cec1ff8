"""Helpers the adapters share for the locks table (see ``Store.acquire_lock``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from conveyor.domain.locks import LockInfo


def lock_from_row(row: Any, ts: Callable[[Any], datetime | None], now: datetime) -> LockInfo:
    """A ``locks`` row (key, owner, token, acquired_at, expires_at) as read at ``now``."""
    expires_at = ts(row[4])
    owner = row[1]
    held = owner is not None and expires_at is not None and expires_at > now
    return LockInfo(
        key=row[0],
        owner=owner,
        token=int(row[2]),
        acquired_at=ts(row[3]),
        expires_at=expires_at,
        held=held,
    )
