"""Operational status: queue depths, workers, job types nobody serves, outbox lag."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from conveyor.domain.job import WorkerInfo
from conveyor.presenters import worker_dict
from conveyor.runtime.flow import flow_status

if TYPE_CHECKING:
    from conveyor.runtime.ports import RuntimeDeps


def is_alive(w: WorkerInfo, deps: RuntimeDeps) -> bool:
    cutoff = deps.now() - timedelta(seconds=deps.settings.heartbeat_timeout)
    return w.state == "running" and w.heartbeat_at is not None and w.heartbeat_at >= cutoff


async def collect_status(deps: RuntimeDeps) -> dict[str, Any]:
    """Queue depths, workers (alive or not) and job types nobody serves."""
    counts = await deps.store.count_by_state()
    workers = await deps.store.list_workers()
    pending = await deps.store.pending_by_type()
    alive = [w for w in workers if is_alive(w, deps)]
    served = {(q, t) for w in alive for q in w.queues for t in w.job_types}
    unserved = [
        {"queue": q, "job_type": t, "pending": n}
        for (q, t), n in sorted(pending.items())
        if (q, t) not in served
    ]
    latest = await deps.store.latest_event_id()
    positions = await deps.store.consumer_positions()
    return {
        "queue_depths": {s.value: n for s, n in counts.items()},
        "outbox": {
            "latest_event_id": latest,
            "consumers": [
                {"name": name, "position": p, "lag": max(0, latest - p)}
                for name, p in positions.items()
            ],
        },
        "workers": [
            worker_dict(w, alive=w in alive) for w in workers if w.state == "running" or w in alive
        ],
        "live_workers": len(alive),
        "unserved_job_types": unserved,
        **await flow_status(deps.store, deps.now(), alive),
        # Endpoints whose signing secret sits unencrypted in the database (no master
        # key when they were made): docs/security.md, "Webhook secrets".
        "webhook_secrets_unencrypted": sum(
            1 for w in await deps.store.list_webhooks() if w.secret_ref is None
        ),
    }
