"""Plain-JSON views of domain objects, shared by the CLI and the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from conveyor.domain.flow import QueueInfo
from conveyor.domain.job import Execution, Job, Page, WorkerInfo
from conveyor.domain.schedules import Schedule
from conveyor.domain.states import JobState
from conveyor.domain.webhooks import DeliveryAttempt, Webhook
from conveyor.domain.workflow import StepDetail, Workflow


def iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


def failed_attempts(job: Job) -> int:
    """Attempts that ended in failure (the seed's ``retry_count``): every attempt of
    a job waiting for its next one or dead-lettered, all but the current or last
    one otherwise (a release at shutdown does not count: it takes its attempt back)."""
    if job.state in (JobState.PENDING, JobState.BLOCKED, JobState.FAILED):
        return job.attempt
    return max(0, job.attempt - 1)


def job_dict(job: Job, executions: list[Execution] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": job.id,
        "id": job.id,
        "job_type": job.job_type,
        "status": job.status,
        "queue": job.queue,
        "priority": job.priority,
        "payload": job.payload,
        "result": job.result,
        "error": job.error,
        "error_message": job.error,  # the job-management seed's name for `error`
        "attempt": job.attempt,
        "retry_count": failed_attempts(job),  # the seed's name: attempts that failed
        "max_retries": job.max_retries,
        "timeout_ms": job.timeout_ms,
        "scheduled_at": iso(job.run_at),
        "worker_id": job.worker_id,
        "idempotency_key": job.idempotency_key,
        "workflow_id": job.workflow_id,
        "step_name": job.step_name,
        "depends_on": job.depends_on,
        "lost_count": job.lost_count,
        "cancel_requested_at": iso(job.cancel_requested_at),
        "created_by": job.created_by,
        "metadata": job.metadata,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "updated_at": iso(job.updated_at),
        "schedule_id": job.schedule_id,
        "payload_version": job.payload_version,
        "concurrency_key": job.concurrency_key,
        "requires": job.requires,
    }
    if executions is not None:
        out["executions"] = [execution_dict(e) for e in executions]
    return out


def execution_dict(e: Execution) -> dict[str, Any]:
    return {
        "attempt": e.attempt,
        "worker_id": e.worker_id,
        "started_at": iso(e.started_at),
        "finished_at": iso(e.finished_at),
        "outcome": e.outcome,
        "error": e.error,
        "payload_version": e.payload_version,
        "traceback": e.traceback,
    }


def worker_dict(w: WorkerInfo, *, alive: bool) -> dict[str, Any]:
    return {
        "worker_id": w.id,
        "host": w.host,
        "pid": w.pid,
        "state": w.state,
        "alive": alive,
        "queues": list(w.queues),
        "job_types": list(w.job_types),
        "concurrency": w.concurrency,
        "jobs_running": w.jobs_running,
        "stuck_jobs": w.stuck_jobs,
        "started_at": iso(w.started_at),
        "last_heartbeat": iso(w.heartbeat_at),
        "capabilities": dict(w.capabilities),
    }


def page_dict(page: Page) -> dict[str, Any]:
    return {
        "limit": page.limit,
        "offset": page.offset,
        "total": page.total,
        "has_more": page.has_more,
    }


def webhook_dict(w: Webhook) -> dict[str, Any]:
    """A webhook endpoint, without its secret."""
    return {
        "id": w.id,
        "url": w.url,
        "event_types": list(w.event_types),
        "state": w.state.value,
        "consecutive_failures": w.consecutive_failures,
        "created_at": iso(w.created_at),
        "failing_since": iso(w.failing_since),
        "last_delivered_at": iso(w.last_delivered_at),
        "disabled_at": iso(w.disabled_at),
        "disabled_reason": w.disabled_reason,
        # Where its signing secret is kept: "vault" (encrypted) or "database" (as given).
        "secret_storage": "database" if w.secret_ref is None else "vault",
    }


def delivery_dict(d: DeliveryAttempt) -> dict[str, Any]:
    return {
        "delivery_id": d.delivery_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "job_id": d.job_id,
        "attempt": d.attempt,
        "outcome": d.outcome.value,
        "status_code": d.status_code,
        "error": d.error,
        "duration_ms": d.duration_ms,
        "created_at": iso(d.created_at),
    }


def step_dict(d: StepDetail) -> dict[str, Any]:
    return {
        "name": d.name,
        "job_id": d.job_id,
        "job_type": d.job_type,
        "status": d.status,
        "attempt": d.attempt,
        "depends_on": d.depends_on,
        "started_at": iso(d.started_at),
        "finished_at": iso(d.finished_at),
        "error": d.error,
        "result": d.result,
    }


def workflow_dict(wf: Workflow) -> dict[str, Any]:
    """A workflow as ``GET /api/workflows/{id}`` shows it (``step_details`` only
    when the steps were loaded)."""
    out: dict[str, Any] = {
        "id": wf.id,
        "name": wf.name,
        "status": wf.status.value,
        "on_failure": wf.on_failure.value,
        "total_steps": wf.total_steps,
        "completed_steps": wf.completed_steps,
        "failed_steps": wf.failed_steps,
        "cancelled_steps": wf.cancelled_steps,
        "running_steps": wf.running_steps,
        "progress": wf.progress,
        "created_at": iso(wf.created_at),
        "finished_at": iso(wf.finished_at),
        "cancel_requested_at": iso(wf.cancel_requested_at),
        "idempotency_key": wf.idempotency_key,
        "created_by": wf.created_by,
        "metadata": wf.metadata,
    }
    if wf.steps is not None:
        out["step_details"] = [step_dict(d) for d in wf.steps]
    return out


def schedule_dict(s: Schedule, upcoming: list[datetime] | None = None) -> dict[str, Any]:
    """A cron schedule; ``next_fire_times`` when ``upcoming`` is given."""
    out: dict[str, Any] = {
        "id": s.id,
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "job_type": s.job_type,
        "payload": dict(s.payload),
        "queue": s.queue,
        "priority": s.priority,
        "max_retries": s.max_retries,
        "timeout_ms": s.timeout_ms,
        "misfire": s.misfire,
        "catch_up_max": s.catch_up_max,
        "jitter": s.jitter,
        "overlap": s.overlap,
        "state": s.state,
        "source": s.source,
        "next_fire_at": iso(s.next_fire_at) if s.state == "active" else None,
        "last_fired_at": iso(s.last_fired_at),
        "last_job_id": s.last_job_id,
        "created_at": iso(s.created_at),
        "updated_at": iso(s.updated_at),
    }
    if upcoming is not None:
        out["next_fire_times"] = [iso(t) for t in upcoming]
    return out


def queue_dict(q: QueueInfo) -> dict[str, Any]:
    return {
        "name": q.name,
        "paused": q.paused,
        "concurrency_limit": q.concurrency_limit,
        "pending": q.pending,
        "running": q.running,
        "updated_at": iso(q.updated_at),
    }
