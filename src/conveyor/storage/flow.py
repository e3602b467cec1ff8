"""The limited fetch's choice, shared by the memory and SQLite stores (PostgreSQL
runs the same steps in ``conveyor.flow_pick``, see its 0009 migration).

The steps, inside the fetch's write transaction:

1. ready jobs of job types without limits (and keyless jobs of types whose key
   comes from a template): the ordinary fetch order, ``limit`` of them;
2. for each limited job type, its keys in round-robin order: starting after the key
   served last (``flow_limits.cursor_key``), wrapping around. A key may start
   ``min(concurrency_limit - running, rate_limit - started in this window)`` jobs:
   its next ones (priority, then FIFO) are candidates ranked 1, 2, ... within
   the key. The walk stops once ``limit`` keys gave a candidate;
3. candidates are ordered by rank within their key first (each key's first job
   before any key's second), then priority, then walk order, then FIFO;
4. queues with a concurrency limit take at most ``limit - running`` of them;
5. the first ``limit`` are leased; each limited type's cursor moves to the last
   key (in walk order) that got a job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.flow import (
    FlowLimits,
    FlowStats,
    KeyTemplate,
    QueueInfo,
    RateLimit,
    check_concurrency_limit,
)
from conveyor.domain.job import NewJob

#: Keyless jobs of a limited type count together under this key.
NO_KEY = ""


@dataclass(frozen=True, slots=True)
class Candidate:
    rank: int
    priority: int
    walk: int  # position of its key in the walk (0: unlimited types)
    run_at: float
    seq: int
    queue: str
    job_type: str
    key: str

    def order(self) -> tuple[int, int, int, float, int]:
        return (self.rank, -self.priority, self.walk, self.run_at, self.seq)


@dataclass(frozen=True, slots=True)
class TypeLimit:
    job_type: str
    concurrency_limit: int | None
    rate_limit: int | None
    rate_window: float | None
    cursor: str
    #: Its jobs get keys from a template: jobs without one (submitted before the
    #: template was registered) are not limited, and the fetch serves them as jobs
    #: of a type without limits (no scan for them).
    templated: bool = False


def allowed(limit: TypeLimit, running: int, started: int) -> int:
    """How many more jobs one key may start now (``started``: in the current window)."""
    room = 1 << 62
    if limit.concurrency_limit is not None:
        room = min(room, limit.concurrency_limit - running)
    if limit.rate_limit is not None:
        room = min(room, limit.rate_limit - started)
    return max(0, room)


def window_start(limit: TypeLimit, now_ts: float) -> float | None:
    if limit.rate_limit is None or not limit.rate_window:
        return None
    w = limit.rate_window
    return (now_ts // w) * w


def walk_keys(
    keys_after: Callable[[str], list[str]], cursor: str, keyless: bool = True
) -> Iterable[str]:
    """Every key with pending jobs, starting after ``cursor`` and wrapping around.
    ``keys_after(k)``: the next keys after ``k`` in order (a batch; empty at the end).
    ``keyless``: visit the type's keyless jobs first (one bucket, every time)."""
    if keyless:
        yield NO_KEY
    k = cursor
    while batch := keys_after(k):
        yield from batch
        k = batch[-1]
    if not cursor:
        return
    k = NO_KEY
    while batch := keys_after(k):
        for key in batch:
            if key > cursor:
                return
            yield key
        k = batch[-1]


def choose(
    candidates: list[Candidate],
    limit: int,
    queue_room: Mapping[str, int],
) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates to lease, and each limited type's new cursor key."""
    candidates.sort(key=Candidate.order)
    room = dict(queue_room)
    out: list[Candidate] = []
    last: dict[str, tuple[int, str]] = {}
    for c in candidates:
        if len(out) >= limit:
            break
        left = room.get(c.queue)
        if left is not None:
            if left <= 0:
                continue
            room[c.queue] = left - 1
        out.append(c)
        if c.walk and c.key != NO_KEY and (c.job_type not in last or last[c.job_type][0] < c.walk):
            last[c.job_type] = (c.walk, c.key)
    return out, {t: k for t, (_w, k) in last.items()}


#: ``set_queue(concurrency_limit=KEEP_LIMIT)``: leave the queue's limit as it is.
KEEP_LIMIT = -1


def check_queue_change(queue: str, paused: bool | None, concurrency_limit: int | None) -> None:
    """One validation for ``set_queue`` on every backend (``ValidationError``)."""
    probe = NewJob("probe", queue=queue)
    errs = [e for e in probe.errors() if e.field == "queue"]
    if paused is not None and not isinstance(paused, bool):
        errs.append(FieldError("paused", "must be true or false"))
    if concurrency_limit is not None and concurrency_limit != KEEP_LIMIT:
        try:
            check_concurrency_limit(concurrency_limit)
        except ValidationError as exc:
            errs.extend(exc.details)
    if errs:
        raise ValidationError(
            "Invalid queue change: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
        )


class FlowRow(NamedTuple):
    """Pending or running jobs grouped for ``flow_stats``."""

    queue: str
    job_type: str
    key: str
    state: str
    ready: bool
    requires: str | None  # JSON object text


def flow_stats(
    rows: Mapping[FlowRow, int],
    limits: Iterable[FlowLimits],
    queues: Iterable[QueueInfo],
    windows: Mapping[tuple[str, str], tuple[float, int]],
    now_ts: float,
) -> FlowStats:
    """Ready jobs held by each limit, from grouped counts (every backend)."""
    by_type = {lim.job_type: lim for lim in limits if lim.limited}
    settings = {q.name: q for q in queues}
    running_key: dict[tuple[str, str], int] = {}
    running_queue: dict[str, int] = {}
    for r, n in rows.items():
        if r.state == "running":
            running_key[(r.job_type, r.key)] = running_key.get((r.job_type, r.key), 0) + n
            running_queue[r.queue] = running_queue.get(r.queue, 0) + n
    stats = FlowStats()
    for r, n in rows.items():
        if r.state != "pending":
            continue
        if r.requires:
            k = (r.queue, r.job_type, r.requires)
            stats.requirements[k] = stats.requirements.get(k, 0) + n
        if not r.ready:
            continue
        q = settings.get(r.queue)
        if q is not None and q.paused:
            stats.paused[r.queue] = stats.paused.get(r.queue, 0) + n
            continue
        lim = by_type.get(r.job_type)
        if lim is not None:
            running = running_key.get((r.job_type, r.key), 0)
            conc_room = lim.concurrency_limit - running if lim.concurrency_limit is not None else n
            rate_room = n
            if lim.rate_limit is not None:
                w = windows.get((r.job_type, r.key))
                ws = lim.rate_limit.window_start(now_ts)
                started = w[1] if w is not None and w[0] == ws else 0
                rate_room = lim.rate_limit.limit - started
            room = max(0, min(conc_room, rate_room))
            if n > room:
                target = stats.concurrency if conc_room <= rate_room else stats.rate
                target[r.job_type] = target.get(r.job_type, 0) + n - room
                n = room
        if (
            n
            and q is not None
            and q.concurrency_limit is not None
            and running_queue.get(r.queue, 0) >= q.concurrency_limit
        ):
            stats.queue_limit[r.queue] = stats.queue_limit.get(r.queue, 0) + n
    return stats


def limits_from_row(r: Any, ts: Callable[[Any], datetime | None]) -> FlowLimits:
    """A ``flow_limits`` row (SQLite or PostgreSQL; ``ts`` converts its timestamp)."""
    requires = r["requires"]
    if isinstance(requires, str):
        requires = orjson.loads(requires)
    return FlowLimits(
        job_type=r["job_type"],
        concurrency_key=KeyTemplate.parse(r["concurrency_key"]) if r["concurrency_key"] else None,
        concurrency_limit=r["concurrency_limit"],
        rate_limit=RateLimit(r["rate_limit"], r["rate_window"]) if r["rate_limit"] else None,
        requires=requires or {},
        updated_at=ts(r["updated_at"]),
    )
