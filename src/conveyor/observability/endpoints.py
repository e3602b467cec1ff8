"""``/metrics``, ``/health`` and ``/ready`` of a ``conveyor worker`` process.

Started by ``Conveyor.run_worker`` when ``metrics_port`` (``--metrics-port``,
``CONVEYOR_METRICS_PORT``) is set; answers on ``metrics_host`` (loopback by
default). The worker's own counters come from its signals (finish listener and
observer); the fleet gauges from ``FleetExporter`` when this process holds the
``conveyor.metrics`` lease.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from conveyor.observability.fleet import FleetExporter
from conveyor.observability.metrics import Metrics
from conveyor.observability.server import PROMETHEUS_TEXT, EndpointServer, Reply

if TYPE_CHECKING:
    from conveyor.runtime.ports import RuntimeDeps
    from conveyor.runtime.worker import Worker

#: Seconds ``/ready`` waits for the store.
READY_TIMEOUT = 2.0


class WorkerEndpoints:
    def __init__(
        self,
        deps: RuntimeDeps,
        worker: Worker,
        *,
        host: str,
        port: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.deps, self.worker = deps, worker
        self.metrics = metrics or Metrics()
        deps.signals.on_finish(self.metrics.job_finished)
        deps.signals.on_observe(self.metrics.observe)
        self.exporter = FleetExporter(self.metrics, deps, workers=lambda: (worker,))
        self.server = EndpointServer(
            {"/metrics": self._metrics, "/health": self._health, "/ready": self._ready},
            host=host,
            port=port,
        )

    async def start(self) -> None:
        await self.server.start()

    async def close(self) -> None:
        await self.server.close()
        await self.exporter.close()

    async def _metrics(self) -> Reply:
        await self.exporter.refresh()
        return Reply(200, PROMETHEUS_TEXT, self.metrics.render())

    async def _health(self) -> Reply:
        return Reply.json(200, {"success": True, "status": "ok", "worker_id": self.worker.id})

    async def _ready(self) -> Reply:
        """200 once the worker runs and the store answers; 503 while starting,
        stopping, with its slots held by stuck handlers, or without the store."""
        w = self.worker
        body: dict[str, object] = {
            "worker_id": w.id,
            "jobs_running": w.jobs_running,
            "stuck_jobs": w.stuck_jobs(),
            "stopping": w.stopping,
        }
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.deps.store.latest_event_id()
            body["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported as not ready
            body["store"] = f"unavailable ({type(exc).__name__})"
            return Reply.json(503, {"success": False, "status": "not_ready", **body})
        limit = self.deps.settings.max_stuck_jobs or w.concurrency
        if not w.started.is_set() or w.stopping or w.stuck_jobs() >= limit:
            return Reply.json(503, {"success": False, "status": "not_ready", **body})
        return Reply.json(200, {"success": True, "status": "ready", **body})
