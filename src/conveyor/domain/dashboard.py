"""Shapes of the dashboard's cheap reads (pure data; stores fill them).

Every figure here is bounded in cost on a table of millions of jobs: counts
stop at a cap (``Count.exact`` False: "at least", or an estimate from the
database's statistics), windows are the last hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Count:
    """A job count: ``exact`` False means ``value`` is an estimate or a lower bound."""

    value: int
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of the newest-first job list ends: its last (created_at, id)."""

    created_at: datetime
    job_id: str


@dataclass(slots=True)
class MinuteBucket:
    """Jobs per minute: submitted, completed and failed (dead-lettered)."""

    minute: datetime
    submitted: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(slots=True)
class RecentStats:
    """The last hour: per-minute buckets (oldest first), the p95 wait from
    enqueue (or its run_at) to start in milliseconds over the most recently
    finished jobs (None without any), and the oldest pending job's creation."""

    buckets: list[MinuteBucket] = field(default_factory=list)
    wait_p95_ms: float | None = None
    oldest_pending: datetime | None = None


def percentile(values: list[float], fraction: float) -> float | None:
    """Linear-interpolated percentile of ``values`` (None when empty), as
    PostgreSQL's ``percentile_cont`` computes it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
