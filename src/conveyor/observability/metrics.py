"""Prometheus metrics, in a registry owned by one process part (no process-wide default).

Every name is documented in docs/metrics.md. Two kinds:

- *process* metrics (counters, histograms): what this process did. Each replica
  counts its own, so summing over replicas is correct.
- *fleet* gauges, read from the database (queue depths, DLQ, oldest due job,
  workers alive, outbox lag, workflows): exported by one process at a time, the
  holder of the leader lease ``conveyor.metrics`` (see ``observability/fleet.py``);
  aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from conveyor.domain.job import Finish, WorkerInfo
from conveyor.domain.states import Action, JobState
from conveyor.domain.workflow import WorkflowStatus
from conveyor.observability.families import Counter, Family, Gauge, Histogram
from conveyor.observability.redis_metrics import REDIS_COMMANDS
from conveyor.runtime.observe import (
    JobsRescued,
    JobsStarted,
    Observation,
    ScheduleFired,
    WebhookAttempted,
    WorkflowSubmitted,
)
from conveyor.storage.base import STAT_STATES, QueueStat

_STATUSES = {
    Action.COMPLETE: "completed",
    Action.RETRY: "retried",
    Action.FAIL: "failed",
    Action.CONFIRM_CANCEL: "cancelled",
    Action.RELEASE: "released",
}
#: The ``state`` label of ``conveyor_queue_depth`` for each counted job state.
DEPTH_LABEL = {
    JobState.BLOCKED: "blocked",
    JobState.PENDING: "pending",
    JobState.RUNNING: "running",
    JobState.FAILED: "dlq",
}
#: Distinct ``error_type`` values kept per job type; later ones count as ``other``
#: (a handler that raises dynamically made classes must not grow the scrape).
MAX_ERROR_TYPES = 20
MAX_ERROR_TYPE_CHARS = 80
#: Distinct queues the wait histogram keeps (others count as ``other``).
MAX_QUEUES = 200

#: Seconds; cover 0.1-60 s finely and long jobs up to an hour.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
#: Seconds from due (``run_at``: submit, retry time or schedule) to start.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5)
WEBHOOK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The process's metrics. ``job_finished`` and ``observe`` are the runtime's
    listeners (``Signals.on_finish`` / ``Signals.on_observe``); ``set_fleet``
    and ``clear_fleet`` are driven by ``FleetExporter``."""

    def __init__(self, *, process_collector: bool = True) -> None:
        # prometheus_client only for the process collector and the fleet gauges
        # (a few dozen samples); Conveyor's own families render themselves.
        r = self.registry = CollectorRegistry(auto_describe=True)
        if process_collector:
            ProcessCollector(namespace="conveyor", registry=r)
        # -- process: jobs --------------------------------------------------------------
        self.jobs_processed = Counter(
            "conveyor_jobs_processed",
            "Job attempts finished by this process, by outcome (status: completed, "
            "retried, failed = dead-lettered, cancelled, released = handed back)",
            ["job_type", "status"],
        )
        self.jobs_failed = Counter(
            "conveyor_jobs_failed",
            "Job attempts that raised (retried or dead-lettered), by exception class",
            ["job_type", "error_type"],
        )
        self.job_retries = Counter(
            "conveyor_job_retries",
            "Failed attempts scheduled to run again",
            ["job_type"],
        )
        self.job_duration = Histogram(
            "conveyor_job_duration_seconds",
            "Handler run time of an attempt",
            ["job_type"],
            buckets=DURATION_BUCKETS,
        )
        self.job_wait = Histogram(
            "conveyor_job_wait_seconds",
            "Enqueue-to-start wait: from when a job was due (run_at) to when a worker "
            "of this process started it",
            ["queue"],
            buckets=WAIT_BUCKETS,
        )
        self.stale_writes = Counter(
            "conveyor_stale_lease_rejected",
            "Fenced completions: outcomes rejected because the attempt's lease was lost",
        )
        self.jobs_rescued = Counter(
            "conveyor_jobs_rescued",
            "Running jobs of dead workers taken back by this process's maintenance pass "
            "(action: lost = back to pending, quarantined = to the DLQ after max_lost)",
            ["action"],
        )
        self.stuck_jobs = Gauge(
            "conveyor_worker_stuck_jobs",
            "Handlers of this process asked to stop (timeout, cancel) or past their timeout "
            "that still run",
            ["worker_id"],
        )
        self.jobs_running = Gauge(
            "conveyor_worker_jobs_running",
            "Jobs running in this process's worker",
            ["worker_id"],
        )
        # -- process: webhooks, HTTP, database, workflows -------------------------------
        self.webhook_deliveries = Counter(
            "conveyor_webhook_deliveries",
            "Webhook POSTs by outcome (delivered, http_error, network_error, refused)",
            ["outcome"],
        )
        self.webhook_duration = Histogram(
            "conveyor_webhook_delivery_seconds",
            "Webhook POST latency",
            buckets=WEBHOOK_BUCKETS,
        )
        self.http_duration = Histogram(
            "conveyor_http_request_duration_seconds",
            "HTTP request duration by route template",
            ["method", "route", "status"],
            buckets=HTTP_BUCKETS,
        )
        self.db_pool_in_use = Gauge(
            "conveyor_db_pool_in_use",
            "Database connections of this process in use (PostgreSQL only)",
        )
        self.db_pool_size = Gauge(
            "conveyor_db_pool_size",
            "Database connection pool size limit of this process (PostgreSQL only)",
        )
        self.workflows_submitted = Counter(
            "conveyor_workflows_submitted",
            "Workflows stored by this process (duplicates of an idempotency key not counted)",
        )
        self.schedule_fires = Counter(
            "conveyor_schedule_fires",
            "Due cron instants handled by this process's scheduler, by outcome: fired (a "
            "job submitted), misfired (dropped by the misfire policy), refused (the store "
            "refused the job)",
            ["outcome"],
        )
        # -- fleet (one exporter at a time) ---------------------------------------------
        self.fleet_exporter = Gauge(
            "conveyor_fleet_exporter",
            "1 in the one process exporting the fleet gauges (leader lease "
            "conveyor.metrics), 0 elsewhere",
        )
        # Fleet-level too, set by the process exporting the fleet gauges (api /metrics).
        self.jobs_held = Gauge(
            "conveyor_jobs_held",
            "Ready jobs held back by flow control, by limit kind and the queue or job "
            "type it applies to (docs/flow_control.md); only in the fleet exporter",
            ["limit", "name"],
        )
        # Process-wide (the Redis clients are the process's): every registry shows it.
        self.redis_commands = REDIS_COMMANDS
        self.fleet = FleetCollector()
        r.register(self.fleet)
        self.families: list[Family] = [
            v for v in vars(self).values() if isinstance(v, Counter | Gauge | Histogram)
        ]
        self._error_types: dict[str, set[str]] = {}
        self._queues: set[str] = set()

    # -- runtime listeners (hot path: a few dict lookups and increments) ---------------
    def job_finished(self, finish: Finish, accepted: bool) -> None:
        if not accepted:
            self.stale_writes.inc()
            return
        job_type = finish.job_type or "unknown"
        action = finish.action
        self.jobs_processed.labels(job_type, _STATUSES[action]).inc()
        if action is Action.RETRY or action is Action.FAIL:
            self.jobs_failed.labels(job_type, self._error_type(job_type, finish.error_type)).inc()
            if action is Action.RETRY:
                self.job_retries.labels(job_type).inc()
        if finish.duration is not None:
            self.job_duration.labels(job_type).observe(finish.duration)

    def observe(self, event: Observation) -> None:
        if isinstance(event, JobsStarted):
            self.jobs_started(event.jobs, event.now)
        elif isinstance(event, JobsRescued):
            for r in event.rescued:
                action = "lost" if r.action is Action.LOST else "quarantined"
                self.jobs_rescued.labels(action).inc()
        elif isinstance(event, WebhookAttempted):
            self.webhook_deliveries.labels(event.outcome).inc()
            self.webhook_duration.observe(event.seconds)
        elif isinstance(event, WorkflowSubmitted):
            self.workflows_submitted.inc()
        elif isinstance(event, ScheduleFired):
            for outcome, n in (
                ("fired", event.fired),
                ("misfired", event.misfired),
                ("refused", event.refused),
            ):
                if n:
                    self.schedule_fires.labels(outcome).inc(n)

    def jobs_started(self, jobs: Sequence[object], now: datetime) -> None:
        for job in jobs:
            run_at = getattr(job, "run_at", None)
            if run_at is None:
                continue
            queue = getattr(job, "queue", "")
            if queue not in self._queues:
                if len(self._queues) >= MAX_QUEUES:
                    queue = "other"
                else:
                    self._queues.add(queue)
            self.job_wait.labels(queue).observe(max(0.0, (now - run_at).total_seconds()))

    def _error_type(self, job_type: str, name: str) -> str:
        name = name[:MAX_ERROR_TYPE_CHARS] if name else "unknown"
        seen = self._error_types.setdefault(job_type, set())
        if name in seen:
            return name
        if len(seen) >= MAX_ERROR_TYPES:
            return "other"
        seen.add(name)
        return name

    # -- per-process gauges read at scrape time ----------------------------------------
    def set_pool(self, stats: tuple[int, int] | None) -> None:
        if stats is not None:
            self.db_pool_in_use.set(stats[0])
            self.db_pool_size.set(stats[1])

    # -- fleet gauges --------------------------------------------------------------------
    def set_fleet(self, snapshot: FleetSnapshot) -> None:
        """Export ``snapshot`` as the fleet gauges (this process leads)."""
        self.fleet.snapshot = snapshot
        self.fleet_exporter.set(1)

    def clear_fleet(self) -> None:
        """Export no fleet gauge (another process does, or none could be read)."""
        self.fleet.snapshot = None
        self.fleet_exporter.set(0)

    def set_held(self, held: dict[str, dict[str, int]]) -> None:
        """``held``: limit kind -> queue or job type -> ready jobs held back."""
        self.jobs_held.clear()
        for kind, by_name in held.items():
            for name, n in by_name.items():
                self.jobs_held.labels(kind, name).set(n)

    def render(self) -> bytes:
        out: list[str] = []
        for family in self.families:
            family.render(out)
        out.append("")
        return "\n".join(out).encode() + generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """What the fleet gauges show, read from the store at ``now``."""

    stats: Sequence[QueueStat]
    workers: Sequence[tuple[WorkerInfo, bool]]  # (worker, heartbeat fresh)
    latest_event: int
    positions: Mapping[str, int]
    workflows: Mapping[WorkflowStatus, int]
    now: datetime


class FleetCollector(Collector):
    """The fleet gauges, present only while ``snapshot`` is set: a process that
    does not export them shows no series (rather than zeros that would read as
    an empty queue or a dead fleet)."""

    def __init__(self) -> None:
        self.snapshot: FleetSnapshot | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: the families come and go with the lease

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        depth = GaugeMetricFamily(
            "conveyor_queue_depth",
            "Jobs by queue and state (blocked, pending, running, dlq = failed)",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_pending_seconds",
            "Age of the queue's oldest due pending job (0: none is due)",
            labels=["queue"],
        )
        counts: dict[tuple[str, str], int] = {}
        ages: dict[str, float] = {}
        for st in snap.stats:
            counts[(st.queue, DEPTH_LABEL[st.state])] = st.count
            ages.setdefault(st.queue, 0.0)
            if st.state is JobState.PENDING and st.oldest_due is not None:
                ages[st.queue] = max(0.0, (snap.now - st.oldest_due).total_seconds())
        for queue in sorted(ages):  # every state of a seen queue: 0 is a value, not a gap
            for state in STAT_STATES:
                label = DEPTH_LABEL[state]
                depth.add_metric([queue, label], counts.get((queue, label), 0))
            oldest.add_metric([queue], ages[queue])
        yield depth
        yield oldest
        alive = GaugeMetricFamily(
            "conveyor_worker_alive",
            "1: the worker's heartbeat is fresh; 0: registered but silent (crashed, hung "
            "or cut off) for less than an hour",
            labels=["worker_id"],
        )
        live = 0
        for w, fresh in snap.workers:
            alive.add_metric([w.id], 1 if fresh else 0)
            live += fresh
        yield alive
        yield GaugeMetricFamily(
            "conveyor_live_workers", "Workers with a fresh heartbeat", value=live
        )
        lag = GaugeMetricFamily(
            "conveyor_outbox_lag_events",
            "Events an outbox consumer has not handled yet (newest id minus its position)",
            labels=["consumer"],
        )
        for name, position in sorted(snap.positions.items()):
            lag.add_metric([name], max(0, snap.latest_event - position))
        yield lag
        workflows = GaugeMetricFamily(
            "conveyor_workflows", "Workflows kept in the store by status", labels=["status"]
        )
        for status in WorkflowStatus:
            workflows.add_metric([status.value], snap.workflows.get(status, 0))
        yield workflows
