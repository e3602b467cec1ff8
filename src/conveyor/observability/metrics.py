"""Prometheus metrics, in a registry owned by one app (no process-wide default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from conveyor.domain.job import Finish
from conveyor.domain.states import Action, JobState

_OUTCOMES = {
    Action.COMPLETE: "completed",
    Action.RETRY: "retried",
    Action.FAIL: "failed",
    Action.CONFIRM_CANCEL: "cancelled",
    Action.RELEASE: "released",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_processed = Counter(
            "conveyor_jobs_processed",
            "Job attempts finished by this process",
            ["job_type", "outcome"],
            registry=self.registry,
        )
        self.jobs_failed = Counter(
            "conveyor_jobs_failed",
            "Job attempts that raised (retried or dead-lettered)",
            ["job_type"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "conveyor_job_duration_seconds",
            "Handler run time",
            ["job_type"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.stale_writes = Counter(
            "conveyor_stale_lease_rejected",
            "Results rejected because the lease was lost",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "conveyor_queue_depth", "Jobs by state", ["state"], registry=self.registry
        )
        self.live_workers = Gauge(
            "conveyor_live_workers", "Workers with a fresh heartbeat", registry=self.registry
        )
        self.outbox_lag = Gauge(
            "conveyor_outbox_lag_events",
            "Events an outbox consumer has not handled yet (newest id minus its position)",
            ["consumer"],
            registry=self.registry,
        )
        self.stuck_jobs = Gauge(
            "conveyor_worker_stuck_jobs",
            "Handlers of this process asked to stop (timeout, cancel) or past their timeout "
            "that still run",
            ["worker_id"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "conveyor_http_request_duration_seconds",
            "HTTP request duration",
            ["method", "route", "status"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )

        self.jobs_held = Gauge(
            "conveyor_jobs_held",
            "Ready jobs held back by flow control, by limit kind and the queue or job "
            "type it applies to (docs/flow_control.md)",
            ["limit", "name"],
            registry=self.registry,
        )

    def job_finished(self, finish: Finish, accepted: bool) -> None:
        if not accepted:
            self.stale_writes.inc()
            return
        job_type = finish.job_type or "unknown"
        self.jobs_processed.labels(job_type, _OUTCOMES[finish.action]).inc()
        if finish.action in (Action.RETRY, Action.FAIL):
            self.jobs_failed.labels(job_type).inc()
        if finish.duration is not None:
            self.job_duration.labels(job_type).observe(finish.duration)

    def set_depths(self, counts: dict[JobState, int], live_workers: int) -> None:
        for state, n in counts.items():
            self.queue_depth.labels(state.value).set(n)
        self.live_workers.set(live_workers)

    def set_outbox(self, latest: int, positions: dict[str, int]) -> None:
        for name, position in positions.items():
            self.outbox_lag.labels(name).set(max(0, latest - position))

    def set_held(self, held: dict[str, dict[str, int]]) -> None:
        """``held``: limit kind -> queue or job type -> ready jobs held back."""
        self.jobs_held.clear()
        for kind, by_name in held.items():
            for name, n in by_name.items():
                self.jobs_held.labels(kind, name).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
