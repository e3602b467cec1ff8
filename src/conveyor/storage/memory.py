"""In-memory Store: product code for tests, demos and ``memory://``.

Same semantics and errors as the SQL adapters; nothing survives the process.
One asyncio lock serialises writers, like SQLite's single writer.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import orjson

from conveyor.domain.auth import ApiKey
from conveyor.domain.errors import (
    ApiKeyNotFound,
    FieldError,
    InvalidTransition,
    JobNotCancellable,
    JobNotFound,
    ValidationError,
    WorkflowNotFound,
)
from conveyor.domain.events import WEBHOOK_DISABLED
from conveyor.domain.flow import MAX_RATE_WINDOW_SECONDS, FlowLimits, FlowStats, QueueInfo, unmet
from conveyor.domain.ids import new_job_id, new_token
from conveyor.domain.job import (
    FINISH_ACTIONS,
    PARENT_FAILED_ERROR,
    Activity,
    EnqueueResult,
    Event,
    Execution,
    Finish,
    Job,
    JobQuery,
    JobTypeInfo,
    NewJob,
    Page,
    Rescued,
    WorkerInfo,
    is_internal,
    lost_action,
    require_failed,
    validate_batch,
    validate_steps,
)
from conveyor.domain.locks import LockInfo
from conveyor.domain.states import (
    EVENT_FOR_ACTION,
    Action,
    EventType,
    JobState,
    finish_action,
    next_state,
)
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
    Webhook,
    WebhookNotFound,
    WebhookState,
)
from conveyor.domain.workflow import (
    WORKFLOW_CANCEL_REASON,
    WORKFLOW_SUBMITTED,
    WORKFLOW_UPDATED,
    NewWorkflow,
    StepDetail,
    StepSpec,
    Workflow,
    WorkflowQuery,
    check_dag,
    fail_fast_reason,
    settled_status,
    step_state,
    terminal_event,
    workflow_event,
)
from conveyor.storage.audit_memory import MemoryAudit
from conveyor.storage.base import (
    STAT_STATES,
    QueueStat,
    Store,
    check_limit,
    disabled_event,
    no_external_connection,
    result_fields,
)
from conveyor.storage.codec import roundtrip
from conveyor.storage.flow import (
    KEEP_LIMIT,
    NO_KEY,
    Candidate,
    FlowRow,
    TypeLimit,
    allowed,
    check_queue_change,
    choose,
    flow_stats,
    walk_keys,
    window_start,
)
from conveyor.storage.locks import lock_from_row
from conveyor.storage.schedules_memory import MemorySchedules
from conveyor.storage.secrets_memory import MemorySecrets
from conveyor.storage.workflows import (
    MAX_MOVED_LISTED,
    Moved,
    check_can_add,
    check_retryable,
    descendants,
    event_steps,
    group_moved,
    retry_states,
    split_added,
    step_details,
    updated_event,
    wants_fail_fast,
    workflow_from_row,
)


class MemoryStore(MemorySchedules, MemorySecrets, MemoryAudit, Store):
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()
        self._executions: dict[str, list[Execution]] = {}
        self._children: dict[str, set[str]] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._job_types: dict[str, JobTypeInfo] = {}
        self._events: list[Event] = []
        self._event_ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._keys: dict[str, ApiKey] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._webhooks: dict[str, Webhook] = {}
        self._deliveries: dict[str, list[DeliveryAttempt]] = {}
        self._workflows: dict[str, dict[str, Any]] = {}
        self._wf_steps: dict[str, list[str]] = {}
        self._moved: list[Moved] = []
        self._locks: dict[str, _LockRow] = {}
        self._steps: dict[str, dict[str, Any]] = {}
        self._flow_limits: dict[str, FlowLimits] = {}
        self._flow_cursors: dict[str, str] = {}
        self._flow_windows: dict[tuple[str, str], tuple[float, int]] = {}
        self._queue_settings: dict[str, QueueInfo] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- internals ----------------------------------------------------------
    def _emit(self, type_: str, job: Job | None, now: datetime, **data: Any) -> None:
        payload = self.event_data(job, **data) if job is not None else data
        self._events.append(
            Event(next(self._event_ids), type_, job.id if job else None, payload, now)
        )

    def _move(self, job: Job, action: Action, now: datetime, **data: Any) -> None:
        job.state = next_state(job.state, action)
        job.updated_at = now
        if job.state.is_terminal:
            job.completed_at = now
            if job.workflow_id is not None:
                self._moved.append(Moved(job.workflow_id, job.step_name or job.id, job.state.value))
        self._emit(EVENT_FOR_ACTION[action].value, job, now, **data)

    def _end_execution(
        self,
        job: Job,
        now: datetime,
        outcome: str,
        error: str | None,
        traceback: str | None = None,
    ) -> None:
        runs = self._executions.get(job.id, [])
        for i in range(len(runs) - 1, -1, -1):
            if runs[i].attempt == job.attempt and runs[i].finished_at is None:
                runs[i] = replace(
                    runs[i], finished_at=now, outcome=outcome, error=error, traceback=traceback
                )
                break

    def _after_terminal(self, job: Job, now: datetime) -> None:
        """Unblock or cancel the children of a job that just finished."""
        todo = [job]
        while todo:
            parent = todo.pop()
            for child_id in sorted(self._children.get(parent.id, ())):
                child = self._jobs.get(child_id)
                if child is None or child.state is not JobState.BLOCKED:
                    continue
                if parent.state is JobState.COMPLETED:
                    if all(
                        self._jobs[p].state is JobState.COMPLETED
                        for p in child.depends_on
                        if p in self._jobs
                    ):
                        child.run_at = now
                        self._move(child, Action.UNBLOCK, now)
                else:
                    child.error = PARENT_FAILED_ERROR
                    self._move(child, Action.PARENT_FAILED, now)
                    todo.append(child)

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    # -- submit -------------------------------------------------------------
    async def enqueue_many(
        self, jobs: Sequence[NewJob], now: datetime, *, connection: Any = None
    ) -> list[EnqueueResult]:
        no_external_connection(connection, "memory://")
        validate_batch(jobs)
        encoded = [
            (roundtrip(dict(new.payload)), roundtrip(dict(new.metadata), "metadata"))
            for new in jobs
        ]
        async with self._lock:
            # A key names its job for as long as the job is kept, whatever its state.
            by_key = {
                j.idempotency_key: j for j in self._jobs.values() if j.idempotency_key is not None
            }
            for new in jobs:
                for dep in new.depends_on:
                    if dep not in self._jobs:
                        raise ValidationError(
                            f"depends_on: job {dep!r} does not exist",
                            [FieldError("depends_on", f"job {dep!r} does not exist")],
                        )
            results: list[EnqueueResult] = []
            for new, (payload, metadata) in zip(jobs, encoded, strict=True):
                if new.idempotency_key is not None and new.idempotency_key in by_key:
                    results.append(EnqueueResult(copy.deepcopy(by_key[new.idempotency_key]), True))
                    continue
                parents = [self._jobs[d] for d in dict.fromkeys(new.depends_on)]
                state = JobState.PENDING
                error = None
                if any(p.state in (JobState.FAILED, JobState.CANCELLED) for p in parents):
                    state, error = JobState.CANCELLED, PARENT_FAILED_ERROR
                elif any(p.state is not JobState.COMPLETED for p in parents):
                    state = JobState.BLOCKED
                job = Job(
                    id=new_job_id(),
                    job_type=new.job_type,
                    state=state,
                    payload=payload,
                    queue=new.queue,
                    priority=new.priority,
                    max_retries=new.max_retries,
                    timeout_ms=new.timeout_ms,
                    run_at=new.run_at or now,
                    error=error,
                    idempotency_key=new.idempotency_key,
                    workflow_id=new.workflow_id,
                    created_by=new.created_by,
                    metadata=metadata,
                    created_at=now,
                    updated_at=now,
                    completed_at=now if state is JobState.CANCELLED else None,
                    depends_on=[p.id for p in parents],
                    concurrency_key=new.concurrency_key,
                    requires=dict(sorted(new.requires.items())) if new.requires else None,
                )
                self._jobs[job.id] = job
                self._seq[job.id] = next(self._counter)
                for p in parents:
                    self._children.setdefault(p.id, set()).add(job.id)
                if job.idempotency_key is not None:
                    by_key[job.idempotency_key] = job
                self._emit(EventType.JOB_SUBMITTED.value, job, now, priority=job.priority)
                results.append(EnqueueResult(copy.deepcopy(job), False))
            return results

    # -- worker hot path ------------------------------------------------------
    async def fetch(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        job_types: Sequence[str],
        limit: int,
        now: datetime,
        capabilities: Mapping[str, str] | None = None,
    ) -> list[Job]:
        check_limit(limit)
        caps = capabilities or {}
        async with self._lock:
            paused = {q for q, s in self._queue_settings.items() if s.paused}
            ready = [
                j
                for j in self._jobs.values()
                if j.state is JobState.PENDING
                and j.run_at is not None
                and j.run_at <= now
                and (not queues or j.queue in queues)
                and (not job_types or j.job_type in job_types)
                and j.queue not in paused
                and (not j.requires or not unmet(j.requires, caps))
            ]
            ready.sort(key=lambda j: (-j.priority, j.run_at, self._seq[j.id]))
            chosen = self._flow_choose(ready, limit, now)
            out = []
            for job in chosen if chosen is not None else ready[:limit]:
                job.attempt += 1
                job.lease_token = new_token()
                job.worker_id = worker_id
                job.started_at = now
                self._move(job, Action.FETCH, now, worker_id=worker_id)
                self._executions.setdefault(job.id, []).append(
                    Execution(
                        job.id, job.attempt, worker_id, now, None, None, None, job.payload_version
                    )
                )
                out.append(copy.deepcopy(job))
            return out

    async def finish_many(self, finishes: Sequence[Finish], now: datetime) -> list[bool]:
        for f in finishes:
            if f.action not in FINISH_ACTIONS:
                raise InvalidTransition("running", f.action.value)
        finishes = [
            replace(f, result=roundtrip(f.result, "result")) if f.action is Action.COMPLETE else f
            for f in finishes
        ]
        finishes = [
            replace(f, payload=roundtrip(f.payload))
            if f.action is Action.RETRY and f.payload is not None
            else f
            for f in finishes
        ]
        async with self._lock:
            out = []
            for f in finishes:
                job = self._jobs.get(f.job_id)
                if (
                    job is None
                    or job.state is not JobState.RUNNING
                    or job.lease_token != f.lease_token
                ):
                    out.append(False)
                    continue
                self._apply_finish(job, f, now)
                out.append(True)
            self._settle_workflows(now)
            return out

    def _apply_finish(self, job: Job, f: Finish, now: datetime) -> None:
        action = finish_action(f.action, job.cancel_requested_at is not None)
        if action is not f.action:
            f = replace(f, action=action, error="cancelled")
        started = job.started_at
        duration_ms = int((now - started).total_seconds() * 1000) if started else None
        job.lease_token = None
        if f.action is Action.COMPLETE:
            job.result = f.result
            job.error = None
            self._end_execution(job, now, "completed", None)
            self._move(job, f.action, now, **result_fields(f.result), duration_ms=duration_ms)
            self._after_terminal(job, now)
        elif f.action is Action.RETRY:
            job.error = f.error
            job.run_at = f.retry_at or now
            self._end_execution(job, now, "retry", f.error, f.traceback)
            healed: dict[str, Any] = {}
            if f.payload is not None:
                job.payload = f.payload
                job.payload_version += 1
                healed = {"healed": True, "payload_version": job.payload_version}
            self._move(job, f.action, now, error=f.error, run_at=job.run_at.isoformat(), **healed)
        elif f.action is Action.FAIL:
            job.error = f.error
            self._end_execution(job, now, "failed", f.error, f.traceback)
            self._move(job, f.action, now, error=f.error)
            self._after_terminal(job, now)
        elif f.action is Action.CONFIRM_CANCEL:
            job.error = f.error or "cancelled"
            self._end_execution(job, now, "cancelled", f.error)
            self._move(job, f.action, now, error=job.error)
            self._after_terminal(job, now)
        else:  # RELEASE: the attempt did not really happen
            self._end_execution(job, now, "released", None)
            job.attempt = max(0, job.attempt - 1)
            job.run_at = now
            job.worker_id = None
            self._move(job, f.action, now, reason="worker_shutdown")

    async def register_worker(self, worker: WorkerInfo, now: datetime) -> None:
        async with self._lock:
            self._workers[worker.id] = replace(
                worker, started_at=now, heartbeat_at=now, state="running"
            )
            self._emit(
                EventType.WORKER_STATUS_CHANGED.value,
                None,
                now,
                worker_id=worker.id,
                status="running",
            )

    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        return sorted(i for i in self._jobs if i.startswith(prefix))[:limit]

    async def record_job_types(self, types: Sequence[JobTypeInfo], now: datetime) -> None:
        async with self._lock:
            for t in types:
                self._job_types[t.job_type] = replace(t, updated_at=now)

    async def list_job_types(self) -> list[JobTypeInfo]:
        async with self._lock:
            return [self._job_types[k] for k in sorted(self._job_types)]

    async def heartbeat(
        self, worker_id: str, jobs_running: int, now: datetime, stuck_jobs: int = 0
    ) -> set[str]:
        async with self._lock:
            w = self._workers.get(worker_id)
            if w is not None:
                w.heartbeat_at = now
                w.jobs_running = jobs_running
                w.stuck_jobs = stuck_jobs
                w.state = "running"
            return {
                j.id
                for j in self._jobs.values()
                if j.state is JobState.RUNNING
                and j.worker_id == worker_id
                and j.cancel_requested_at is not None
            }

    async def deregister_worker(self, worker_id: str, now: datetime) -> None:
        async with self._lock:
            w = self._workers.get(worker_id)
            if w is not None and w.state != "stopped":
                w.state = "stopped"
                w.heartbeat_at = now
                w.jobs_running = 0
                self._emit(
                    EventType.WORKER_STATUS_CHANGED.value,
                    None,
                    now,
                    worker_id=worker_id,
                    status="stopped",
                )

    async def rescue(
        self, *, heartbeat_timeout: float, max_lost: int, now: datetime
    ) -> list[Rescued]:
        cutoff = now - timedelta(seconds=heartbeat_timeout)
        async with self._lock:
            for w in self._workers.values():
                if w.state == "running" and w.heartbeat_at is not None and w.heartbeat_at < cutoff:
                    w.state = "dead"
                    self._emit(
                        EventType.WORKER_STATUS_CHANGED.value,
                        None,
                        now,
                        worker_id=w.id,
                        status="dead",
                    )
            # A worker registered again (restarted under its id) after a job started
            # is a new process: the job belonged to the one that is gone.
            live = {w.id: w.started_at for w in self._workers.values() if w.state == "running"}
            out = []
            for job in self._jobs.values():
                if job.state is not JobState.RUNNING:
                    continue
                since = live.get(job.worker_id) if job.worker_id is not None else None
                if since is not None and job.started_at is not None and since <= job.started_at:
                    continue
                action = lost_action(job, max_lost)
                job.lost_count += 1
                job.lease_token = None
                job.error = "cancelled" if action is Action.CONFIRM_CANCEL else "worker_lost"
                self._end_execution(job, now, "lost", "worker_lost")
                if action is Action.LOST:
                    job.run_at = now
                self._move(job, action, now, error="worker_lost", worker_id=job.worker_id)
                if job.state.is_terminal:
                    self._after_terminal(job, now)
                out.append(Rescued(job.id, job.worker_id, action))
            self._settle_workflows(now)
            return out

    # -- operator actions ------------------------------------------------------
    async def cancel(self, job_id: str, now: datetime, reason: str | None = None) -> Job:
        async with self._lock:
            job = self._get(job_id)
            if job.state.is_terminal:
                raise JobNotCancellable(job_id, job.state.value)
            extra = {} if reason is None else {"reason": reason}
            if job.state is JobState.RUNNING:
                if job.cancel_requested_at is None:
                    job.cancel_requested_at = now
                    job.updated_at = now
                    if reason is not None:
                        job.metadata = {**job.metadata, "cancel_reason": reason}
                    self._emit(EventType.JOB_STATUS_CHANGED.value, job, now, **extra)
            else:
                job.error = "cancelled" if reason is None else f"cancelled: {reason}"
                if reason is not None:
                    job.metadata = {**job.metadata, "cancel_reason": reason}
                self._move(job, Action.CANCEL, now, **extra)
                self._after_terminal(job, now)
                self._settle_workflows(now)
            return copy.deepcopy(job)

    async def retry_failed(self, job_ids: Sequence[str], now: datetime) -> list[Job]:
        async with self._lock:
            jobs = [self._get(i) for i in dict.fromkeys(job_ids)]
            for job in jobs:
                require_failed(job.id, job.state.value, "retry")
            # A failed job still holds its own key (no other job can): nothing to check.
            for job in jobs:
                job.attempt = 0
                job.lost_count = 0
                job.run_at = now
                job.completed_at = None
                job.cancel_requested_at = None
                job.worker_id = None
                self._move(job, Action.DLQ_RETRY, now, reason="dlq_retry")
                wf = self._workflows.get(job.workflow_id or "")
                if wf is not None:  # its workflow runs again
                    if wf["status"] != "running":
                        wf.update(status="running", finished_at=None, updated_at=now)
                    self._unblock_descendants(wf["id"], job.step_name or job.id, now)
            return [copy.deepcopy(j) for j in jobs]

    def _unblock_descendants(self, wf_id: str, name: str, now: datetime) -> None:
        """A step retried from the dead-letter queue: the steps below it that were
        cancelled because of it wait for it again (``blocked``)."""
        steps = [self._jobs[i] for i in self._wf_steps.get(wf_id, ()) if i in self._jobs]
        edges = [
            (j.step_name or j.id, self._jobs[p].step_name or p)
            for j in steps
            for p in j.depends_on
            if p in self._jobs
        ]
        below = descendants([name], edges)
        for job in steps:
            if job.step_name in below and job.state is JobState.CANCELLED:
                job.state = JobState.BLOCKED
                job.attempt = 0
                job.error = None
                job.completed_at = None
                job.cancel_requested_at = None
                job.updated_at = now
                job.metadata = {k: v for k, v in job.metadata.items() if k != "cancel_reason"}
                self._emit(
                    EventType.JOB_STATUS_CHANGED.value, job, now, reason="dlq_retry_of_parent"
                )

    async def purge_failed(self, job_ids: Sequence[str] | None, now: datetime) -> int:
        async with self._lock:
            if job_ids is None:
                ids = [j.id for j in self._jobs.values() if j.state is JobState.FAILED]
            else:
                ids = list(dict.fromkeys(job_ids))
                for i in ids:
                    job = self._get(i)
                    require_failed(i, job.state.value, "purge")
            self._delete(ids)
            return len(ids)

    def _delete(self, ids: Sequence[str]) -> None:
        for i in ids:
            self._jobs.pop(i, None)
            self._seq.pop(i, None)
            self._executions.pop(i, None)
            self._children.pop(i, None)
            self._steps.pop(i, None)

    async def prune(self, older_than: datetime) -> int:
        async with self._lock:
            ids = [
                j.id
                for j in self._jobs.values()
                if j.state in (JobState.COMPLETED, JobState.CANCELLED)
                and j.completed_at is not None
                and j.completed_at < older_than
            ]
            self._delete(ids)
            self._events = [e for e in self._events if e.created_at >= older_than]
            for wf_id, wf in list(self._workflows.items()):
                steps = self._wf_steps.get(wf_id, [])
                steps[:] = [i for i in steps if i in self._jobs]
                if not steps and wf["finished_at"] is not None and wf["finished_at"] < older_than:
                    del self._workflows[wf_id]
                    self._wf_steps.pop(wf_id, None)
            return len(ids)

    # -- reads --------------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        return copy.deepcopy(self._get(job_id))

    async def executions(self, job_id: str) -> list[Execution]:
        self._get(job_id)
        return list(self._executions.get(job_id, []))

    async def list_jobs(self, query: JobQuery) -> Page:
        query.validate()
        jobs = [
            j
            for j in self._jobs.values()
            if (not query.states or j.state in query.states)
            and (query.job_type is None or j.job_type == query.job_type)
            and (query.queue is None or j.queue == query.queue)
            and (query.created_by is None or j.created_by == query.created_by)
            and (query.include_internal or not is_internal(j.job_type))
        ]

        def key(j: Job) -> tuple[bool, Any, int]:
            value = getattr(j, query.sort)
            return (value is not None, value if value is not None else 0, self._seq[j.id])

        jobs.sort(key=key, reverse=query.descending)
        window = jobs[query.offset : query.offset + query.limit]
        return Page([copy.deepcopy(j) for j in window], len(jobs), query.limit, query.offset)

    async def count_by_state(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for j in self._jobs.values():
            counts[j.state] += 1
        return counts

    async def pending_by_type(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for j in self._jobs.values():
            if j.state is JobState.PENDING:
                out[(j.queue, j.job_type)] = out.get((j.queue, j.job_type), 0) + 1
        return out

    async def list_workers(self) -> list[WorkerInfo]:
        return [replace(w) for w in self._workers.values()]

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        return [e for e in self._events if e.id > after_id][:limit]

    async def activity(self, since: datetime) -> Activity:
        finished: dict[tuple[str, JobState], int] = {}
        submitted = 0
        for j in self._jobs.values():
            if j.created_at is not None and j.created_at >= since:
                submitted += 1
            if j.state.is_terminal and j.completed_at is not None and j.completed_at >= since:
                finished[(j.job_type, j.state)] = finished.get((j.job_type, j.state), 0) + 1
        return Activity(since, submitted, finished)

    # -- API keys ---------------------------------------------------------------------
    async def create_api_key(self, key: ApiKey) -> None:
        async with self._lock:
            if any(k.key_hash == key.key_hash or k.id == key.id for k in self._keys.values()):
                raise ValidationError("An API key with this id or hash already exists")
            self._keys[key.id] = key

    async def list_api_keys(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        for k in self._keys.values():
            if k.key_hash == key_hash and k.active:
                return k
        return None

    async def revoke_api_key(self, key_id: str, now: datetime) -> ApiKey:
        async with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                raise ApiKeyNotFound(key_id)
            if key.active:
                key = self._keys[key_id] = replace(key, revoked_at=now)
            return key

    async def count_api_keys(self) -> int:
        return sum(1 for k in self._keys.values() if k.active)

    async def latest_event_id(self) -> int:
        return self._events[-1].id if self._events else 0

    # -- outbox consumers -------------------------------------------------------------
    async def claim_consumer(self, name: str, owner: str, ttl: float, now: datetime) -> int | None:
        async with self._lock:
            c = self._consumers.setdefault(name, _Consumer())
            if c.owner not in (None, owner) and c.expires is not None and c.expires >= now:
                return None
            c.owner, c.expires = owner, now + timedelta(seconds=ttl)
            return c.position

    async def advance_consumer(self, name: str, owner: str, position: int, now: datetime) -> bool:
        async with self._lock:
            c = self._consumers.get(name)
            if c is None or c.owner != owner:
                return False
            c.position = position
            return True

    async def consumer_positions(self) -> dict[str, int]:
        return {name: c.position for name, c in sorted(self._consumers.items())}

    async def release_consumer(self, name: str, owner: str, now: datetime) -> None:
        async with self._lock:
            c = self._consumers.get(name)
            if c is not None and c.owner == owner:
                c.owner = c.expires = None

    # -- webhooks ---------------------------------------------------------------------
    async def create_webhook(self, webhook: Webhook) -> None:
        async with self._lock:
            if webhook.id in self._webhooks:
                raise ValidationError(f"A webhook with id {webhook.id!r} already exists")
            self._webhooks[webhook.id] = webhook
            self._deliveries[webhook.id] = []

    async def list_webhooks(self) -> list[Webhook]:
        return sorted(self._webhooks.values(), key=lambda w: (w.created_at, w.id))

    async def get_webhook(self, webhook_id: str) -> Webhook:
        try:
            return self._webhooks[webhook_id]
        except KeyError:
            raise WebhookNotFound(webhook_id) from None

    async def delete_webhook(self, webhook_id: str) -> None:
        async with self._lock:
            if self._webhooks.pop(webhook_id, None) is None:
                raise WebhookNotFound(webhook_id)
            self._deliveries.pop(webhook_id, None)

    async def record_delivery(self, attempt: DeliveryAttempt, policy: DisablePolicy) -> Webhook:
        at = attempt.created_at
        async with self._lock:
            hook = await self.get_webhook(attempt.webhook_id)
            self._deliveries[hook.id].append(attempt)
            if attempt.outcome is DeliveryOutcome.DELIVERED:
                hook = replace(
                    hook, consecutive_failures=0, failing_since=None, last_delivered_at=at
                )
            else:
                hook = replace(
                    hook,
                    consecutive_failures=hook.consecutive_failures + 1,
                    failing_since=hook.failing_since or at,
                )
                if hook.state is WebhookState.ACTIVE and policy.should_disable(hook, at):
                    reason = policy.reason(hook, at)
                    self._emit(WEBHOOK_DISABLED, None, at, **disabled_event(hook, reason))
                    hook = replace(
                        hook,
                        state=WebhookState.DISABLED,
                        disabled_at=at,
                        disabled_reason=reason,
                        replay_after=self._events[-1].id,
                    )
            self._webhooks[hook.id] = hook
            return hook

    async def enable_webhook(self, webhook_id: str) -> tuple[Webhook, int | None]:
        async with self._lock:
            hook = await self.get_webhook(webhook_id)
            if hook.state is not WebhookState.DISABLED:
                return hook, None
            enabled = replace(
                hook,
                state=WebhookState.ACTIVE,
                consecutive_failures=0,
                failing_since=None,
                disabled_at=None,
                disabled_reason=None,
                replay_after=None,
            )
            self._webhooks[hook.id] = enabled
            return enabled, hook.replay_after

    async def list_deliveries(self, webhook_id: str, limit: int) -> list[DeliveryAttempt]:
        await self.get_webhook(webhook_id)
        return list(reversed(self._deliveries[webhook_id]))[:limit]

    # -- workflows ---------------------------------------------------------------------
    def _settle_workflows(self, now: datetime) -> None:
        """Apply ``fail_fast``, write ``workflow_updated`` and, once no step can run,
        the status and terminal event, for the workflows whose steps moved."""
        while self._moved:
            batch, self._moved = self._moved, []
            for wf_id, steps in group_moved(batch).items():
                wf = self._workflows.get(wf_id)
                if wf is None or wf["status"] != "running":
                    continue
                failed = wants_fail_fast(wf["on_failure"], steps)
                if failed is not None:
                    self._cancel_steps(wf_id, fail_fast_reason(failed), now)
                    steps = steps + [m for m in self._moved if m.workflow_id == wf_id]
                    self._moved = [m for m in self._moved if m.workflow_id != wf_id]
                counts = self._step_counts(wf_id)
                self._emit(
                    WORKFLOW_UPDATED, None, now, **updated_event(wf_id, wf["name"], counts, steps)
                )
                status = settled_status(counts)
                if status is not None:
                    wf.update(status=status.value, finished_at=now, updated_at=now)
                    details = event_steps(self._step_details(wf_id, results=False))
                    type_, data = terminal_event(wf_id, wf["name"], status, counts, details)
                    self._emit(type_, None, now, **data)

    def _cancel_steps(self, wf_id: str, reason: str, now: datetime) -> None:
        for job_id in self._wf_steps.get(wf_id, ()):
            job = self._jobs.get(job_id)
            if job is None:
                continue
            if job.state in (JobState.PENDING, JobState.BLOCKED):
                job.error = f"cancelled: {reason}"
                job.metadata = {**job.metadata, "cancel_reason": reason}
                self._move(job, Action.CANCEL, now, error=job.error, reason=reason)
                self._after_terminal(job, now)
            elif job.state is JobState.RUNNING and job.cancel_requested_at is None:
                job.cancel_requested_at = now
                job.updated_at = now
                job.metadata = {**job.metadata, "cancel_reason": reason}
                self._emit(EventType.JOB_STATUS_CHANGED.value, job, now, reason=reason)

    def _step_counts(self, wf_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job_id in self._wf_steps.get(wf_id, ()):
            job = self._jobs.get(job_id)
            if job is not None:
                counts[job.state.value] = counts.get(job.state.value, 0) + 1
        return counts

    def _step_details(self, wf_id: str, *, results: bool) -> list[StepDetail]:
        jobs = [self._jobs[i] for i in self._wf_steps.get(wf_id, ()) if i in self._jobs]
        rows = [
            {
                "id": j.id,
                "step_name": j.step_name,
                "job_type": j.job_type,
                "state": j.state.value,
                "cancel_requested_at": j.cancel_requested_at,
                "attempt": j.attempt,
                "started_at": j.started_at,
                "completed_at": j.completed_at,
                "error": j.error,
                "result": copy.deepcopy(j.result),
            }
            for j in jobs
        ]
        edges = [
            (j.step_name or j.id, self._jobs[p].step_name or p)
            for j in jobs
            for p in j.depends_on
            if p in self._jobs
        ]
        return step_details(rows, edges, lambda v: v, results=results)

    def _workflow(self, wf_id: str, *, steps: bool, results: bool = True) -> Workflow:
        wf = self._workflows.get(wf_id)
        if wf is None:
            raise WorkflowNotFound(wf_id)
        details = self._step_details(wf_id, results=results) if steps else None
        return workflow_from_row(
            {**wf, "metadata": copy.deepcopy(wf["metadata"])},
            self._step_counts(wf_id),
            lambda v: v,
            details,
        )

    def _insert_steps(
        self, wf_id: str, steps: Sequence[tuple[str, NewJob]], known: dict[str, Job], now: datetime
    ) -> list[Job]:
        out = []
        for name, new in steps:
            parents = [known[d] for d in dict.fromkeys(new.depends_on)]
            state = step_state(p.state for p in parents)
            job = Job(
                id=new_job_id(),
                job_type=new.job_type,
                state=state,
                payload=roundtrip(dict(new.payload)),
                queue=new.queue,
                priority=new.priority,
                max_retries=new.max_retries,
                timeout_ms=new.timeout_ms,
                run_at=new.run_at or now,
                error=PARENT_FAILED_ERROR if state is JobState.CANCELLED else None,
                workflow_id=wf_id,
                step_name=name,
                created_by=new.created_by,
                metadata=roundtrip(dict(new.metadata), "metadata"),
                created_at=now,
                updated_at=now,
                completed_at=now if state is JobState.CANCELLED else None,
                depends_on=[p.id for p in parents],
            )
            self._jobs[job.id] = job
            self._seq[job.id] = next(self._counter)
            self._wf_steps.setdefault(wf_id, []).append(job.id)
            for p in parents:
                self._children.setdefault(p.id, set()).add(job.id)
            known[name] = job
            self._emit(EventType.JOB_SUBMITTED.value, job, now, priority=job.priority)
            out.append(copy.deepcopy(job))
        return out

    async def create_workflow(
        self, workflow: NewWorkflow, steps: Sequence[tuple[str, NewJob]], now: datetime
    ) -> tuple[Workflow, bool]:
        validate_steps(steps)
        for _, new in steps:  # refuse what the SQL stores refuse, before any write
            roundtrip(dict(new.payload))
            roundtrip(dict(new.metadata), "metadata")
        metadata = roundtrip(dict(workflow.metadata), "metadata")
        async with self._lock:
            key = workflow.idempotency_key
            if key is not None:
                held = next(
                    (w for w in self._workflows.values() if w["idempotency_key"] == key), None
                )
                if held is not None:
                    return self._workflow(held["id"], steps=False), True
            wf_id = new_job_id()
            self._workflows[wf_id] = {
                "id": wf_id,
                "name": workflow.name,
                "status": "running",
                "on_failure": workflow.on_failure.value,
                "total_steps": len(steps),
                "idempotency_key": key,
                "metadata": metadata,
                "created_by": workflow.created_by,
                "cancel_requested_at": None,
                "created_at": now,
                "finished_at": None,
                "updated_at": now,
            }
            self._insert_steps(wf_id, steps, {}, now)
            counts = self._step_counts(wf_id)
            self._emit(
                WORKFLOW_SUBMITTED,
                None,
                now,
                **workflow_event(
                    wf_id, workflow.name, "running", counts, on_failure=workflow.on_failure.value
                ),
            )
            return self._workflow(wf_id, steps=False), False

    async def get_workflow(self, workflow_id: str, *, results: bool = True) -> Workflow:
        return self._workflow(workflow_id, steps=True, results=results)

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[Workflow], int]:
        rows = [
            w
            for w in self._workflows.values()
            if (query.status is None or w["status"] == query.status.value)
            and (query.name is None or w["name"] == query.name)
        ]
        rows.sort(key=lambda w: (w["created_at"], w["id"]), reverse=True)
        page = rows[query.offset : query.offset + query.limit]
        return [self._workflow(w["id"], steps=False) for w in page], len(rows)

    async def cancel_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        async with self._lock:
            wf = self._workflows.get(workflow_id)
            if wf is None:
                raise WorkflowNotFound(workflow_id)
            if wf["status"] == "running":
                wf.update(cancel_requested_at=now, updated_at=now)
                self._cancel_steps(workflow_id, WORKFLOW_CANCEL_REASON, now)
                if not any(m.workflow_id == workflow_id for m in self._moved):
                    self._moved.append(Moved(workflow_id, "", "cancelled"))
                self._settle_workflows(now)
            return self._workflow(workflow_id, steps=True)

    async def retry_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        async with self._lock:
            wf = self._workflows.get(workflow_id)
            check_retryable(workflow_id, wf)
            assert wf is not None
            jobs = [self._jobs[i] for i in self._wf_steps.get(workflow_id, ()) if i in self._jobs]
            again = [j for j in jobs if j.state in (JobState.FAILED, JobState.CANCELLED)]
            if not again:  # nothing would run: reopening would leave it running for ever
                return self._workflow(workflow_id, steps=True)
            edges = [
                (j.step_name or j.id, self._jobs[p].step_name or p)
                for j in jobs
                for p in j.depends_on
                if p in self._jobs
            ]
            states = retry_states((j.step_name or j.id for j in again), edges)
            wf.update(status="running", finished_at=None, cancel_requested_at=None, updated_at=now)
            for job in again:
                state = JobState(states[job.step_name or job.id])
                job.state = state
                job.attempt = 0
                job.error = None
                job.result = None
                job.lease_token = None
                job.worker_id = None
                job.cancel_requested_at = None
                job.lost_count = 0
                job.started_at = None
                job.completed_at = None
                job.run_at = now
                job.updated_at = now
                job.metadata = {k: v for k, v in job.metadata.items() if k != "cancel_reason"}
                self._emit(EventType.JOB_STATUS_CHANGED.value, job, now, reason="workflow_retry")
            counts = self._step_counts(workflow_id)
            self._emit(
                WORKFLOW_UPDATED,
                None,
                now,
                **workflow_event(
                    workflow_id,
                    wf["name"],
                    "running",
                    counts,
                    retried_steps=[j.step_name for j in again][:MAX_MOVED_LISTED],
                ),
            )
            return self._workflow(workflow_id, steps=True)

    async def add_steps(
        self,
        workflow_id: str,
        job_id: str,
        lease_token: str,
        steps: Sequence[tuple[str, NewJob]],
        now: datetime,
    ) -> list[Job]:
        validate_steps(steps)
        for _, new in steps:
            roundtrip(dict(new.payload))
            roundtrip(dict(new.metadata), "metadata")
        async with self._lock:
            caller = self._jobs.get(job_id)
            wf = self._workflows.get(workflow_id)
            check_can_add(
                workflow_id,
                job_id,
                lease_token,
                None
                if caller is None
                else (caller.state.value, caller.lease_token, caller.workflow_id),
                wf,
            )
            assert wf is not None
            existing = self._step_details(workflow_id, results=False)
            fresh, already = split_added(steps, existing)
            check_dag(
                [StepSpec(n, new.job_type, depends_on=tuple(new.depends_on)) for n, new in fresh],
                existing={d.name: d.depends_on for d in existing},
                allow_empty=True,
            )
            known = {d.name: self._jobs[d.job_id] for d in existing}
            jobs: dict[str | None, Job] = {
                j.step_name: j for j in self._insert_steps(workflow_id, fresh, known, now)
            }
            for name, held in already.items():
                jobs[name] = copy.deepcopy(self._jobs[held])
            wf["total_steps"] += len(fresh)
            wf["updated_at"] = now
            return [jobs[n] for n, _ in steps]

    async def parent_results(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None:
                continue
            for p in job.depends_on:
                parent = self._jobs.get(p)
                if parent is not None and parent.state is JobState.COMPLETED:
                    out.setdefault(job_id, {})[parent.step_name or parent.id] = copy.deepcopy(
                        parent.result
                    )
        return out

    # -- distributed locks -------------------------------------------------------------
    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None:
        async with self._lock:
            row = self._locks.get(key)
            if row is not None and row.owner is not None and row.expires_at > now:
                return None
            token = 1 if row is None else row.token + 1
            self._locks[key] = _LockRow(owner, token, now, now + timedelta(seconds=ttl))
            return token

    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool:
        async with self._lock:
            row = self._locks.get(key)
            if row is None or (row.owner, row.token) != (owner, token) or row.expires_at <= now:
                return False
            row.expires_at = now + timedelta(seconds=ttl)
            return True

    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool:
        async with self._lock:
            row = self._locks.get(key)
            if row is None or (row.owner, row.token) != (owner, token):
                return False
            row.owner = None
            return row.expires_at > now

    async def check_lock(self, key: str, token: int, now: datetime) -> bool:
        row = self._locks.get(key)
        return (
            row is not None
            and row.token == token
            and row.owner is not None
            and (row.expires_at > now)
        )

    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]:
        check_limit(limit)
        out = []
        for key in sorted(self._locks):
            r = self._locks[key]
            info = lock_from_row((key, r.owner, r.token, r.acquired_at, r.expires_at), _same, now)
            if include_free or info.held:
                out.append(info)
            if len(out) >= limit:
                break
        return out

    # -- durable steps and checkpoints ------------------------------------------------
    def _leased(self, job_id: str, lease_token: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING or job.lease_token != lease_token:
            return None
        return job

    async def save_step(
        self, job_id: str, lease_token: str, name: str, result: Any, now: datetime
    ) -> bool:
        value = roundtrip(result, "result")
        async with self._lock:
            job = self._leased(job_id, lease_token)
            if job is None:
                return False
            self._steps.setdefault(job_id, {}).setdefault(name, value)
            return True

    async def job_steps(self, job_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._steps.get(job_id, {}))

    async def save_checkpoint(
        self, job_id: str, lease_token: str, state: Any, now: datetime
    ) -> bool:
        value = roundtrip(state, "checkpoint")
        async with self._lock:
            job = self._leased(job_id, lease_token)
            if job is None:
                return False
            job.checkpoint = value
            return True

    # -- metrics ----------------------------------------------------------------------
    async def queue_stats(self, now: datetime) -> list[QueueStat]:
        counts: dict[tuple[str, JobState], int] = {}
        oldest: dict[str, datetime] = {}
        for j in self._jobs.values():
            if j.state not in STAT_STATES:
                continue
            key = (j.queue, j.state)
            counts[key] = counts.get(key, 0) + 1
            if j.state is JobState.PENDING and j.run_at is not None and j.run_at <= now:
                seen = oldest.get(j.queue)
                if seen is None or j.run_at < seen:
                    oldest[j.queue] = j.run_at
        return [
            QueueStat(q, s, n, oldest.get(q) if s is JobState.PENDING else None)
            for (q, s), n in sorted(counts.items())
        ]

    # -- dashboard reads --------------------------------------------------------------------
    async def job_children(self, job_id: str, limit: int) -> list[str]:
        check_limit(limit)
        return sorted(self._children.get(job_id, ()))[:limit]

    # -- flow control ------------------------------------------------------------------
    def _flow_choose(self, ready: list[Job], limit: int, now: datetime) -> list[Job] | None:
        """The jobs to lease under the limits (see storage/flow.py), or None when no
        limit applies (the ordinary order)."""
        limited = {t: lim for t, lim in self._flow_limits.items() if lim.limited}
        caps = {q: s.concurrency_limit for q, s in self._queue_settings.items()}
        caps = {q: n for q, n in caps.items() if n is not None}
        if not (limited or caps) or limit == 0:
            return None
        running_key: dict[tuple[str, str], int] = {}
        running_queue: dict[str, int] = {}
        for j in self._jobs.values():
            if j.state is JobState.RUNNING:
                k = (j.job_type, j.concurrency_key or NO_KEY)
                running_key[k] = running_key.get(k, 0) + 1
                running_queue[j.queue] = running_queue.get(j.queue, 0) + 1
        ts = now.timestamp()
        limited_templated = {t: lim.concurrency_key is not None for t, lim in limited.items()}
        by_key: dict[tuple[str, str], list[Job]] = {}
        candidates: list[Candidate] = []
        jobs_by_seq: dict[int, Job] = {}
        for j in ready:
            seq = self._seq[j.id]
            jobs_by_seq[seq] = j
            keyless_free = j.concurrency_key is None and limited_templated.get(j.job_type, False)
            if j.job_type in limited and not keyless_free:
                by_key.setdefault((j.job_type, j.concurrency_key or NO_KEY), []).append(j)
            elif len(candidates) < limit:
                candidates.append(self._candidate(j, 1, 0, NO_KEY))
        for t in sorted(limited):
            lim = limited[t]
            tl = TypeLimit(
                t,
                lim.concurrency_limit,
                lim.rate_limit.limit if lim.rate_limit else None,
                lim.rate_limit.window if lim.rate_limit else None,
                self._flow_cursors.get(t, NO_KEY),
                limited_templated[t],
            )
            keys = sorted({k for (jt, k) in by_key if jt == t and k != NO_KEY})

            def after(k: str, keys: list[str] = keys) -> list[str]:
                i = bisect.bisect_right(keys, k)
                return keys[i : i + 64]

            ws = window_start(tl, ts)
            gave = 0
            for walk, key in enumerate(walk_keys(after, tl.cursor, not tl.templated), start=1):
                jobs = by_key.get((t, key))
                if not jobs:
                    continue
                started = 0
                if ws is not None:
                    w = self._flow_windows.get((t, key))
                    if w is not None and w[0] > ws:  # a stale clock never reopens a window
                        continue
                    started = w[1] if w is not None and w[0] == ws else 0
                room = allowed(tl, running_key.get((t, key), 0), started)
                taken = jobs[: min(room, limit)]
                for rank, j in enumerate(taken, start=1):
                    candidates.append(self._candidate(j, rank, walk, key))
                if taken:
                    gave += 1
                    if gave >= limit:
                        break
        room_q = {q: n - running_queue.get(q, 0) for q, n in caps.items() if n is not None}
        chosen, cursors = choose(candidates, limit, room_q)
        self._flow_cursors.update(cursors)
        for c in chosen:
            counted = limited.get(c.job_type)
            if counted is not None and counted.rate_limit is not None:
                start = counted.rate_limit.window_start(ts)
                w = self._flow_windows.get((c.job_type, c.key))
                if w is not None and w[0] > start:
                    continue
                n = w[1] if w is not None and w[0] == start else 0
                self._flow_windows[(c.job_type, c.key)] = (start, n + 1)
        return [jobs_by_seq[c.seq] for c in chosen]

    def _candidate(self, j: Job, rank: int, walk: int, key: str) -> Candidate:
        assert j.run_at is not None
        return Candidate(
            rank, j.priority, walk, j.run_at.timestamp(), self._seq[j.id], j.queue, j.job_type, key
        )

    async def record_flow_limits(self, limits: Sequence[FlowLimits], now: datetime) -> None:
        async with self._lock:
            for lim in limits:
                if lim.empty:
                    self._flow_limits.pop(lim.job_type, None)
                else:
                    self._flow_limits[lim.job_type] = replace(lim, updated_at=now)

    async def list_flow_limits(self) -> list[FlowLimits]:
        return [self._flow_limits[k] for k in sorted(self._flow_limits)]

    async def set_queue(
        self,
        queue: str,
        now: datetime,
        *,
        paused: bool | None = None,
        concurrency_limit: int | None = KEEP_LIMIT,
    ) -> QueueInfo:
        check_queue_change(queue, paused, concurrency_limit)
        async with self._lock:
            old = self._queue_settings.get(queue, QueueInfo(queue))
            self._queue_settings[queue] = replace(
                old,
                paused=old.paused if paused is None else paused,
                concurrency_limit=(
                    old.concurrency_limit if concurrency_limit == KEEP_LIMIT else concurrency_limit
                ),
                updated_at=now,
            )
        return next(q for q in await self.list_queues() if q.name == queue)

    async def list_queues(self) -> list[QueueInfo]:
        counts: dict[str, list[int]] = {}
        for j in self._jobs.values():
            if j.state in (JobState.PENDING, JobState.RUNNING):
                c = counts.setdefault(j.queue, [0, 0])
                c[0 if j.state is JobState.PENDING else 1] += 1
        names = sorted(set(counts) | set(self._queue_settings))
        out = []
        for name in names:
            s = self._queue_settings.get(name, QueueInfo(name))
            pending, running = counts.get(name, [0, 0])
            out.append(replace(s, pending=pending, running=running))
        return out

    async def prune_flow_windows(self, now: datetime) -> int:
        horizon = now.timestamp() - 60
        old = []
        for (job_type, key), (start, _) in self._flow_windows.items():
            lim = self._flow_limits.get(job_type)
            window = (
                lim.rate_limit.window
                if lim is not None and lim.rate_limit is not None
                else MAX_RATE_WINDOW_SECONDS
            )
            if start < horizon - 2 * window:
                old.append((job_type, key))
        for k in old:
            del self._flow_windows[k]
        return len(old)

    async def flow_stats(self, now: datetime) -> FlowStats:
        rows = [
            FlowRow(
                j.queue,
                j.job_type,
                j.concurrency_key or NO_KEY,
                j.state.value,
                j.run_at is not None and j.run_at <= now,
                orjson.dumps(j.requires).decode() if j.requires else None,
            )
            for j in self._jobs.values()
            if j.state in (JobState.PENDING, JobState.RUNNING)
        ]
        counted: dict[FlowRow, int] = {}
        for r in rows:
            counted[r] = counted.get(r, 0) + 1
        windows = dict(self._flow_windows)
        return flow_stats(
            counted,
            list(self._flow_limits.values()),
            list(self._queue_settings.values()),
            windows,
            now.timestamp(),
        )

    async def workflow_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        return sorted(i for i in self._workflows if i.startswith(prefix))[:limit]


@dataclass(slots=True)
class _Consumer:
    position: int = 0
    owner: str | None = None
    expires: datetime | None = None


@dataclass(slots=True)
class _LockRow:
    owner: str | None
    token: int
    acquired_at: datetime
    expires_at: datetime


def _same(value: datetime | None) -> datetime | None:
    return value
