"""Flow control at registration and submit: turn ``@app.job(...)`` options into
``FlowLimits`` and give each new job its concurrency key and requirements.

The store enforces the limits in its fetch (docs/flow_control.md); this module
only computes what a job carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from conveyor.domain.errors import ConfigurationError, ValidationError
from conveyor.domain.flow import (
    FlowLimits,
    FlowStats,
    KeyTemplate,
    check_concurrency_limit,
    check_requirements,
    parse_capability,
    parse_rate_limit,
    unmet,
)
from conveyor.domain.job import WorkerInfo
from conveyor.presenters import queue_dict

if TYPE_CHECKING:
    from conveyor.runtime.registry import JobDefinition
    from conveyor.storage.base import Store


def flow_limits(
    job_type: str,
    concurrency_key: str | None,
    concurrency_limit: int | None,
    rate_limit: str | None,
    requires: Mapping[str, str] | None,
) -> FlowLimits:
    """The registered limits of ``job_type``. Raises ``ConfigurationError``
    naming the bad option."""
    try:
        return FlowLimits(
            job_type,
            concurrency_key=None if concurrency_key is None else KeyTemplate.parse(concurrency_key),
            concurrency_limit=None
            if concurrency_limit is None
            else check_concurrency_limit(concurrency_limit),
            rate_limit=None if rate_limit is None else parse_rate_limit(rate_limit),
            requires=check_requirements(requires) if requires else {},
        )
    except ValidationError as exc:
        raise ConfigurationError(f"Job type {job_type!r}: {exc.message}") from None


def job_flow(
    flow: FlowLimits | None,
    payload: Any,
    concurrency_key: str | None,
    requires: Mapping[str, str] | None,
) -> tuple[str | None, Mapping[str, str] | None]:
    """A new job's ``(concurrency_key, requires)``: the explicit values, else the
    job type's (its key template rendered over ``payload``). Raises
    ``ValidationError`` for a payload the template can't use."""
    key = concurrency_key
    template = flow.concurrency_key if flow is not None else None
    if key is None and template is not None and isinstance(payload, Mapping):
        key = template.render(payload)
    if requires is None and flow is not None and flow.requires:
        requires = flow.requires
    return key, requires


def per_payload_key(
    definition: JobDefinition | None, options: Mapping[str, Any]
) -> KeyTemplate | None:
    """The key template each payload of a bulk submit renders (None: one key for
    all, or none)."""
    if options.get("concurrency_key") is not None:
        return None
    flow = definition.flow if definition is not None else options.get("flow")
    return flow.concurrency_key if flow is not None else None


def worker_capabilities(
    explicit: Mapping[str, str] | None, configured: tuple[str, ...]
) -> dict[str, str]:
    """A worker's capabilities: ``explicit`` (Python), else the ``capabilities``
    setting (``gpu=a100`` items, CLI ``--capability``). Raises ``ValidationError``."""
    if explicit is not None:
        return check_requirements(explicit, "capabilities")
    pairs = [parse_capability(item) for item in configured]
    return check_requirements(dict(pairs), "capabilities")


def registered_limits(
    registry: Mapping[str, JobDefinition], job_types: Sequence[str]
) -> list[FlowLimits]:
    """What a worker records at start: each type's registered limits (an empty one
    removes limits a former registration recorded)."""
    return [registry[t].flow or FlowLimits(t) for t in job_types]


def next_window_in(
    registry: Mapping[str, JobDefinition], job_types: Sequence[str], now_ts: float
) -> float | None:
    """Seconds until the soonest rate window of these types starts again (a worker
    held by a rate limit looks again then, not a whole poll interval later)."""
    waits = [
        rate.window - (now_ts % rate.window)
        for t in job_types
        if (flow := registry[t].flow) is not None and (rate := flow.rate_limit) is not None
    ]
    return min(waits) if waits else None


async def flow_status(store: Store, now: datetime, alive: Sequence[WorkerInfo]) -> dict[str, Any]:
    """``conveyor status``'s flow control part: queues (paused, limits), ready jobs
    held by each limit, and pending jobs with requirements no live worker meets
    (with the reason)."""
    stats = await store.flow_stats(now)
    queues = await store.list_queues()
    limits = await store.list_flow_limits()
    unroutable = []
    for (queue, job_type, requires_json), n in stats.requirements.items():
        requires = orjson.loads(requires_json)
        serving = [w for w in alive if queue in w.queues and job_type in w.job_types]
        if any(not unmet(requires, w.capabilities) for w in serving):
            continue
        if not serving:
            reason = f"no live worker serves {job_type!r} on queue {queue!r}"
        else:
            missing = sorted(
                {f"{k}={v}" for w in serving for k, v in unmet(requires, w.capabilities).items()}
            )
            reason = "no live worker offers " + ", ".join(missing)
        unroutable.append(
            {
                "queue": queue,
                "job_type": job_type,
                "requires": requires,
                "pending": n,
                "reason": reason,
            }
        )
    return {
        "queues": [queue_dict(q) for q in queues],
        "flow_limits": [
            {
                "job_type": lim.job_type,
                "concurrency_key": lim.concurrency_key.text if lim.concurrency_key else None,
                "concurrency_limit": lim.concurrency_limit,
                "rate_limit": str(lim.rate_limit) if lim.rate_limit else None,
                "requires": dict(lim.requires),
            }
            for lim in limits
        ],
        "held": held_dict(stats),
        "unroutable_jobs": unroutable,
    }


def held_dict(stats: FlowStats) -> dict[str, Any]:
    """Ready jobs held back, in total per limit kind and by queue or job type."""
    return {
        "total": stats.held(),
        "paused_queue": dict(stats.paused),
        "concurrency_limit": dict(stats.concurrency),
        "rate_limit": dict(stats.rate),
        "queue_concurrency_limit": dict(stats.queue_limit),
    }
