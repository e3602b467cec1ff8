"""The fleet gauges of /metrics: read from the store by one process at a time.

Every process that serves ``/metrics`` (``conveyor up``/``api``, ``conveyor worker
--metrics-port``) contends, *when it is scraped*, for the leader lease
``conveyor.metrics``; the holder reads the store (one grouped query over the
unfinished jobs, the workers, the outbox positions, workflow counts) and exports
the fleet gauges, the others export none of them. So the fleet costs one set of
reads per scrape interval whatever the number of replicas, and a process no
Prometheus scrapes never becomes the exporter.

A graceful stop resigns the lease (the next scraped process takes over at its
next scrape, or within ``RETRY_EVERY`` seconds if it lost the contest
moments before). A crashed exporter leaves a gap of up to ``FLEET_TTL`` +
``RETRY_EVERY`` seconds plus one scrape interval. During a hand-over two
processes may export for one scrape: aggregate the fleet gauges with ``max``,
never ``sum`` (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from conveyor.domain.workflow import WorkflowQuery, WorkflowStatus
from conveyor.observability.metrics import FleetSnapshot, Metrics
from conveyor.runtime.locks import Leadership
from conveyor.runtime.status import is_alive

if TYPE_CHECKING:
    from conveyor.runtime.ports import RuntimeDeps
    from conveyor.runtime.worker import Worker

log = structlog.get_logger("conveyor.metrics")

FLEET_LEADER = "conveyor.metrics"
#: Seconds the exporter's lease lasts without a scrape renewing it.
FLEET_TTL = 30.0
#: A snapshot younger than this is served again (several Prometheus servers, or
#: a scrape and a curl, cost one set of reads).
MIN_REFRESH = 1.0
#: Seconds a process that lost the contest waits before trying again (it takes
#: over from a crashed exporter within FLEET_TTL + RETRY_EVERY + a scrape interval).
RETRY_EVERY = 5.0
#: Seconds the store reads may take before this scrape serves the last snapshot.
READ_TIMEOUT = 5.0
#: A worker silent for longer than this is left out of ``conveyor_worker_alive``
#: (its 0 has been visible for an hour; a restarted worker has a new id).
DOWN_VISIBLE = timedelta(hours=1)


class FleetExporter:
    """Refreshes ``metrics``' fleet gauges (when this process leads) and the
    process gauges read at scrape time (stuck handlers, pool use)."""

    def __init__(
        self,
        metrics: Metrics,
        deps: RuntimeDeps,
        *,
        workers: Callable[[], Sequence[Worker]] = lambda: (),
        ttl: float = FLEET_TTL,
    ) -> None:
        self.metrics = metrics
        self.deps = deps
        self.workers = workers
        self.lease = Leadership(deps.store, FLEET_LEADER, ttl=ttl, clock=deps.now)
        self._lock = asyncio.Lock()
        self._at = -1e9
        self._next_try = 0.0

    async def refresh(self) -> None:
        """Bring every gauge up to date for a scrape; never raises (a store error
        leaves the fleet gauges out of this scrape and is logged)."""
        m = self.metrics
        for w in self.workers():
            m.stuck_jobs.labels(w.id).set(w.stuck_jobs())
            m.jobs_running.labels(w.id).set(w.jobs_running)
        m.set_pool(self.deps.store.pool_stats())
        async with self._lock:
            if time.monotonic() - self._at < MIN_REFRESH:
                return
            self._at = time.monotonic()
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    if not await self._leads():
                        m.clear_fleet()
                        return
                    m.set_fleet(await self.snapshot())
            except Exception as exc:  # noqa: BLE001 - a scrape never fails for the fleet
                log.warning("fleet_metrics_failed", error=str(exc), kind=type(exc).__name__)
                m.clear_fleet()

    async def _leads(self) -> bool:
        """Whether this process exports, writing to the store only when needed: the
        lease is renewed once less than half of it is left, and a process that
        lost the contest tries again after ``RETRY_EVERY`` seconds."""
        lease, now = self.lease, time.monotonic()
        if lease.is_leader and lease.remaining > lease.ttl / 2:
            return True
        if not lease.is_leader and now < self._next_try:
            return False
        if await lease.hold():
            return True
        self._next_try = now + RETRY_EVERY
        return False

    async def snapshot(self) -> FleetSnapshot:
        store, deps = self.deps.store, self.deps
        now = deps.now()
        stats = await store.queue_stats(now)
        shown: list[Any] = []
        for w in await store.list_workers():
            fresh = is_alive(w, deps)
            if fresh or (
                w.state in ("running", "dead")
                and w.heartbeat_at is not None
                and now - w.heartbeat_at < DOWN_VISIBLE
            ):
                shown.append((w, fresh))
        latest = await store.latest_event_id()
        positions = await store.consumer_positions()
        workflows: dict[WorkflowStatus, int] = {}
        for status in WorkflowStatus:
            _, total = await store.list_workflows(WorkflowQuery(status=status, limit=1))
            workflows[status] = total
        return FleetSnapshot(stats, shown, latest, positions, workflows, now)

    async def close(self) -> None:
        """Give the lease up, so the next scraped process exports at once."""
        with contextlib.suppress(Exception):
            await self.lease.resign_quietly()
