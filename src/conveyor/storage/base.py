"""The Store port: every persistence operation the runtime needs, batch-first.

Adapters (``memory``, ``sqlite``, later ``postgres``) implement this class and
pass the same contract suite (``tests/contract``). They raise the errors of
``conveyor.domain.errors`` and nothing else.

Rules every adapter keeps:
- a state change names the state it leaves (``WHERE state = ...``);
- terminal writes are fenced by the attempt's lease token;
- each transition appends its lifecycle event to the outbox atomically.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from conveyor.domain.audit import Anchor, AuditDraft, AuditEntry, AuditQuery
from conveyor.domain.auth import ApiKey
from conveyor.domain.dashboard import Count, Cursor, MinuteBucket, RecentStats, percentile
from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError
from conveyor.domain.flow import FlowLimits, FlowStats, QueueInfo
from conveyor.domain.job import (
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
)
from conveyor.domain.locks import LockInfo
from conveyor.domain.schedules import Schedule
from conveyor.domain.secrets import SecretInfo, SecretVersion
from conveyor.domain.states import JobState
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
    Webhook,
    WebhookState,
)
from conveyor.domain.workflow import NewWorkflow, Workflow, WorkflowQuery


class Store(abc.ABC):
    """Persistence port. All methods are coroutines; ``now`` is the caller's clock."""

    # -- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- submit ------------------------------------------------------------
    @abc.abstractmethod
    async def enqueue_many(
        self, jobs: Sequence[NewJob], now: datetime, *, connection: Any = None
    ) -> list[EnqueueResult]:
        """Insert jobs atomically (all or none); a job whose idempotency key a kept
        job already holds (any state, until that job is pruned or purged) is not
        inserted: that job comes back flagged ``duplicate``. Unknown
        ``depends_on`` ids raise ``ValidationError`` and insert nothing.
        ``connection``: a driver connection inside the caller's own transaction
        (PostgreSQL only): the jobs exist only if that transaction commits."""

    # -- worker hot path ---------------------------------------------------
    @abc.abstractmethod
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
        """Lease up to ``limit`` ready jobs (priority desc, then FIFO); each gets
        ``attempt + 1``, an execution row and a lease token that no earlier attempt
        had (one fetch may share a token across its jobs: fencing matches id and token).

        Flow control (docs/flow_control.md), in the same transaction: jobs of paused
        queues and jobs whose ``requires`` ``capabilities`` does not meet are left
        alone; with limits recorded (``record_flow_limits``, ``set_queue``) no key,
        job type or queue goes over its concurrency or rate limit across all
        fetchers, and keys are served round-robin."""

    @abc.abstractmethod
    async def finish_many(self, finishes: Sequence[Finish], now: datetime) -> list[bool]:
        """Apply fenced outcomes; ``False`` where the lease was no longer held."""

    @abc.abstractmethod
    async def register_worker(self, worker: WorkerInfo, now: datetime) -> None:
        """Record a worker process started at ``now``. An id registered again is a
        new process (a restart under the same id): its row describes the new one,
        and the jobs the old one had started become the rescuer's (see ``rescue``)."""

    @abc.abstractmethod
    async def heartbeat(
        self, worker_id: str, jobs_running: int, now: datetime, stuck_jobs: int = 0
    ) -> set[str]:
        """Refresh the worker's heartbeat (with its running and stuck handler counts:
        ``stuck_jobs`` are handlers asked to stop that have not); return ids of its
        running jobs whose cancel was requested. A worker declared dead is marked running again (its
        jobs were rescued already; its late results are fenced off)."""

    @abc.abstractmethod
    async def deregister_worker(self, worker_id: str, now: datetime) -> None: ...

    @abc.abstractmethod
    async def rescue(
        self, *, heartbeat_timeout: float, max_lost: int, now: datetime
    ) -> list[Rescued]:
        """Re-queue (or quarantine) the running jobs whose process is gone, and mark
        workers whose heartbeat is older than ``heartbeat_timeout`` seconds dead.
        A job's process is gone when its worker is not running, or was registered
        again after the job started. Each such attempt ends with an execution row
        of outcome ``lost`` (error ``worker_lost``)."""

    # -- operator actions -------------------------------------------------
    @abc.abstractmethod
    async def cancel(self, job_id: str, now: datetime, reason: str | None = None) -> Job:
        """Cancel now if not running; flag a running job for its worker.
        ``reason`` (optional text) goes to ``metadata.cancel_reason``, the error
        text of a job cancelled at once (``cancelled: <reason>``) and the event.
        Raises ``JobNotFound`` or ``JobNotCancellable``."""

    @abc.abstractmethod
    async def retry_failed(self, job_ids: Sequence[str], now: datetime) -> list[Job]:
        """Move dead-lettered jobs back to pending with a fresh attempt budget."""

    @abc.abstractmethod
    async def purge_failed(self, job_ids: Sequence[str] | None, now: datetime) -> int:
        """Delete dead-lettered jobs (all of them when ``job_ids`` is None)."""

    @abc.abstractmethod
    async def prune(self, older_than: datetime) -> int:
        """Delete completed and cancelled jobs finished before ``older_than``."""

    # -- reads --------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, job_id: str) -> Job: ...

    @abc.abstractmethod
    async def executions(self, job_id: str) -> list[Execution]: ...

    @abc.abstractmethod
    async def list_jobs(self, query: JobQuery) -> Page: ...

    @abc.abstractmethod
    async def count_by_state(self) -> dict[JobState, int]: ...

    @abc.abstractmethod
    async def pending_by_type(self) -> dict[tuple[str, str], int]:
        """Ready-or-waiting (pending) job counts by (queue, job_type)."""

    @abc.abstractmethod
    async def list_workers(self) -> list[WorkerInfo]: ...

    @abc.abstractmethod
    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` job ids starting with ``prefix`` (lowercase hex), sorted."""

    @abc.abstractmethod
    async def record_job_types(self, types: Sequence[JobTypeInfo], now: datetime) -> None:
        """Insert or update job types and their registered defaults (a worker at start)."""

    @abc.abstractmethod
    async def list_job_types(self) -> list[JobTypeInfo]:
        """Every job type some worker recorded, by name."""

    @abc.abstractmethod
    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        """Up to ``limit`` committed events after event ``after_id`` (0 = from the
        start) in delivery order. Delivery order never changes once an event is
        returned: an event committed later never sorts before one already read
        (PostgreSQL holds back events of transactions still running)."""

    @abc.abstractmethod
    async def latest_event_id(self) -> int:
        """The id of the last event ``events_after`` can return now (0 if none)."""

    @abc.abstractmethod
    async def activity(self, since: datetime) -> Activity:
        """Jobs submitted since ``since`` and jobs finished since, by type and state."""

    # -- API keys ------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_api_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    async def list_api_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        """The active key with this hash, if any."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: str, now: datetime) -> ApiKey:
        """Revoke a key (idempotent). Raises ``ApiKeyNotFound``."""

    @abc.abstractmethod
    async def count_api_keys(self) -> int:
        """Number of active keys."""

    # -- outbox consumers (relay, webhook dispatcher) -----------------------------------
    @abc.abstractmethod
    async def claim_consumer(self, name: str, owner: str, ttl: float, now: datetime) -> int | None:
        """Take or renew consumer ``name``'s lease for ``ttl`` seconds. Returns the
        id of the last event it handled, or None while another owner holds it."""

    @abc.abstractmethod
    async def advance_consumer(self, name: str, owner: str, position: int, now: datetime) -> bool:
        """Record that ``owner`` handled events up to ``position``; False if it lost
        the lease (another owner took over and carries on from the stored position)."""

    @abc.abstractmethod
    async def consumer_positions(self) -> dict[str, int]:
        """Every outbox consumer's position (the id of the last event it handled)."""

    @abc.abstractmethod
    async def release_consumer(self, name: str, owner: str, now: datetime) -> None:
        """Give the lease up (shutdown) so another owner takes over at once."""

    # -- webhooks --------------------------------------------------------------------
    @abc.abstractmethod
    async def create_webhook(self, webhook: Webhook) -> None: ...

    @abc.abstractmethod
    async def list_webhooks(self) -> list[Webhook]: ...

    @abc.abstractmethod
    async def get_webhook(self, webhook_id: str) -> Webhook:
        """Raises ``WebhookNotFound``."""

    @abc.abstractmethod
    async def delete_webhook(self, webhook_id: str) -> None:
        """Delete an endpoint and its delivery log. Raises ``WebhookNotFound``."""

    @abc.abstractmethod
    async def record_delivery(self, attempt: DeliveryAttempt, policy: DisablePolicy) -> Webhook:
        """Log one attempt. A delivered one clears the failure streak
        (``consecutive_failures``, ``failing_since``) and sets ``last_delivered_at``;
        a failed one extends it, and the failure that makes ``policy`` due disables
        the endpoint and writes a ``webhook_disabled`` event whose id becomes
        ``replay_after``, all in one transaction. Raises ``WebhookNotFound``."""

    @abc.abstractmethod
    async def enable_webhook(self, webhook_id: str) -> tuple[Webhook, int | None]:
        """Re-activate a disabled endpoint with a clean failure streak. Returns it and
        the event id its missed events come after (its ``webhook_disabled`` event),
        or None when it was active already (nothing changes). Raises
        ``WebhookNotFound``."""

    @abc.abstractmethod
    async def list_deliveries(self, webhook_id: str, limit: int) -> list[DeliveryAttempt]:
        """Newest first. Raises ``WebhookNotFound``."""

    # -- cross-process wake-up ---------------------------------------------------------
    async def subscribe_wakeups(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when another process makes jobs ready (if the backend can)."""
        return None

    def unsubscribe_wakeups(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback``."""
        return None

    #: Seconds between ``changed()`` checks while a worker idles; None = not supported.
    change_check_interval: float | None = None

    async def changed(self) -> bool:
        """Whether another process committed since the last call (cheap; may be fuzzy)."""
        return False

    # -- workflows ---------------------------------------------------------------------
    @abc.abstractmethod
    async def create_workflow(
        self, workflow: NewWorkflow, steps: Sequence[tuple[str, NewJob]], now: datetime
    ) -> tuple[Workflow, bool]:
        """Insert a workflow and its steps atomically. ``steps``: (step name, job) in
        an order where parents come first (``check_dag``), each job's ``depends_on``
        naming parent *steps*. Roots start ``pending``, the others ``blocked``;
        writes ``job_submitted`` per step and one ``workflow_submitted``. A
        workflow whose ``idempotency_key`` a kept workflow holds is not inserted:
        that one comes back with ``True``. Returns the workflow without step
        details."""

    @abc.abstractmethod
    async def get_workflow(self, workflow_id: str, *, results: bool = True) -> Workflow:
        """The workflow with its counts and ``steps`` (each step's result when
        ``results``). Raises ``WorkflowNotFound``."""

    @abc.abstractmethod
    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[Workflow], int]:
        """Newest first, with counts but no step details; and the total matching."""

    @abc.abstractmethod
    async def cancel_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        """Cancel every step not yet finished (running ones get a cancel request);
        the workflow ends ``cancelled`` once no step runs. Idempotent on a finished
        workflow (returns it unchanged). Raises ``WorkflowNotFound``."""

    @abc.abstractmethod
    async def retry_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        """Run the failed and cancelled steps again (fresh attempts), and through
        them what depends on them; completed steps keep their results. A finished
        workflow with no failed or cancelled step is returned unchanged. Raises
        ``WorkflowNotFound``, and ``WorkflowConflict`` while it is running."""

    @abc.abstractmethod
    async def add_steps(
        self,
        workflow_id: str,
        job_id: str,
        lease_token: str,
        steps: Sequence[tuple[str, NewJob]],
        now: datetime,
    ) -> list[Job]:
        """A running step (``job_id`` holding ``lease_token``) adds steps to its own
        workflow; they may depend on any step of it, and on each other (validated
        by ``check_dag`` against the steps already there). Raises ``LeaseLost``,
        ``WorkflowConflict`` (the workflow finished), ``ValidationError``."""

    @abc.abstractmethod
    async def parent_results(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """For each job: its completed parents' results, by step name (by parent job
        id for a parent that is not a workflow step). Jobs without parents are
        left out."""

    # -- schedules (docs/schedules.md) -------------------------------------------------
    async def create_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        """Store a new schedule (validated first). Raises ``ValidationError``, or
        ``ScheduleNameTaken`` when another schedule has its name."""
        raise NotImplementedError

    async def get_schedule(self, schedule_id: str) -> Schedule:
        """Raises ``ScheduleNotFound``."""
        raise NotImplementedError

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, by name."""
        raise NotImplementedError

    async def update_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        """Replace the stored schedule of ``schedule.id`` with it (every field but
        ``id``, ``created_at``, ``last_fired_at`` and ``last_job_id``; validated
        first). Raises ``ScheduleNotFound``, ``ScheduleNameTaken``, ``ValidationError``."""
        raise NotImplementedError

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule and its fire records (its jobs stay). Raises
        ``ScheduleNotFound``."""
        raise NotImplementedError

    async def due_schedules(self, until: datetime, limit: int) -> list[Schedule]:
        """Up to ``limit`` active schedules whose ``next_fire_at`` is at or before
        ``until``, earliest first."""
        raise NotImplementedError

    async def advance_schedule(
        self, schedule_id: str, expected: datetime, next_fire_at: datetime | None, now: datetime
    ) -> bool:
        """Move an active schedule's ``next_fire_at`` from ``expected`` to
        ``next_fire_at`` without firing (misfires skipped); False when it no longer
        is ``expected`` (another scheduler moved it, or it was changed or paused)."""
        raise NotImplementedError

    async def fire_schedule(
        self,
        schedule_id: str,
        fire_at: datetime,
        job: NewJob,
        next_fire_at: datetime | None,
        now: datetime,
    ) -> Job | None:
        """Fire an active schedule's instant ``fire_at`` (its ``next_fire_at``), all
        in one transaction: record ``(schedule_id, fire_at)`` (unique), submit
        ``job`` linked to the schedule (``Job.schedule_id``) with its
        ``job_submitted`` event, set ``last_fired_at``/``last_job_id``, write the
        ``schedule_fired`` event and move ``next_fire_at`` on to ``next_fire_at``.

        Returns the job, or ``None`` when nothing was submitted: the schedule is not
        active or its ``next_fire_at`` is not ``fire_at`` (another scheduler fired
        it: nothing changes), the instant was fired already, or ``overlap`` is
        ``skip_if_running`` and the schedule's previous job is pending, blocked or
        running (then the instant is recorded as skipped and ``next_fire_at``
        moves on). Raises ``ValidationError`` for an invalid ``job``."""
        raise NotImplementedError

    async def prune_schedule_fires(self, older_than: datetime) -> int:
        """Delete fire records of instants before ``older_than`` (kept only to refuse
        a second fire of the same instant; ``next_fire_at`` has long moved on)."""
        raise NotImplementedError

    # -- helpers shared by adapters ----------------------------------------
    @staticmethod
    def event_data(job: Job, **extra: Any) -> dict[str, Any]:
        return event_data(job.id, job.job_type, job.queue, job.status, job.attempt, **extra)

    # -- distributed locks and leader leases (one row per key, never deleted) ---------
    @abc.abstractmethod
    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None:
        """Take ``key`` for ``ttl`` seconds from ``now`` when it is free (never held,
        released, or its holder's ``expires_at <= now``), in one statement. Returns
        the new fencing token, greater than every token ``key`` was given before
        (1 for a new key), or ``None`` when someone holds it (its owner included:
        not re-entrant)."""

    @abc.abstractmethod
    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool:
        """Move the expiry of ``key`` to ``now + ttl`` when ``owner``/``token`` still
        hold it at ``now``; ``False`` (nothing changed) when it expired or was
        released or taken over."""

    @abc.abstractmethod
    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool:
        """Free ``key`` when ``owner``/``token`` is its holder (an expired one too,
        as long as no one took it since); the token is kept. Returns whether the
        lock was still held at ``now``; anyone else's call changes nothing."""

    @abc.abstractmethod
    async def check_lock(self, key: str, token: int, now: datetime) -> bool:
        """Whether ``token`` is the holder of ``key`` at ``now`` (not expired, not
        released, not superseded): the fencing check."""

    @abc.abstractmethod
    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]:
        """Keys in key order: the held ones, or every key ever locked with
        ``include_free`` (each with its last token), at most ``limit``."""

    # -- durable steps and checkpoints (ctx.step, ctx.checkpoint) ------------------------
    @abc.abstractmethod
    async def save_step(
        self, job_id: str, lease_token: str, name: str, result: Any, now: datetime
    ) -> bool:
        """Store the result (a JSON value, already ``storable_result``) of durable step
        ``name`` of a running job, fenced by the attempt's ``lease_token``. ``False``
        (nothing stored) when that attempt no longer holds the lease. A step stored
        already keeps its first result (``True``). Kept until the job is deleted."""

    @abc.abstractmethod
    async def job_steps(self, job_id: str) -> dict[str, Any]:
        """Every stored step result of a job, by step name (``{}`` if none or no job)."""

    @abc.abstractmethod
    async def save_checkpoint(
        self, job_id: str, lease_token: str, state: Any, now: datetime
    ) -> bool:
        """Replace the job's checkpoint (a JSON value; ``Job.checkpoint``), fenced by
        ``lease_token`` like ``save_step``. ``False`` when the lease is not held.
        Raises ``ValidationError`` for a value JSON can't hold."""

    # -- metrics (docs/metrics.md) -------------------------------------------------------
    async def queue_stats(self, now: datetime) -> list[QueueStat]:
        """Jobs by (queue, state) for the states that are work to do or to look at
        (``blocked``, ``pending``, ``running``, ``failed``: the DLQ); finished ones
        are not counted (their number grows with retention, not with load). Each
        ``pending`` row carries its queue's oldest ``run_at`` that is due by
        ``now`` (None when nothing is due). One query; no row per job comes back."""
        counts = await self.count_by_state()
        by_queue = await self.pending_by_type()
        out = [QueueStat("", s, counts.get(s, 0), None) for s in STAT_STATES]
        pending: dict[str, int] = {}
        for (queue, _type), n in by_queue.items():
            pending[queue] = pending.get(queue, 0) + n
        return [o for o in out if o.state is not JobState.PENDING] + [
            QueueStat(q, JobState.PENDING, n, None) for q, n in sorted(pending.items())
        ]

    def pool_stats(self) -> tuple[int, int] | None:
        """Database connections ``(in use, pool size limit)``; None without a pool."""
        return None

    # -- dashboard reads: bounded on big tables. These defaults page through the
    # reads above (fine for the memory store); SQL stores override them.
    async def state_counts(self, cap: int) -> dict[JobState, Count]:
        """Jobs per state. A store may stop counting a state at ``cap`` jobs and
        give an estimate or ``cap`` itself instead (``Count.exact`` False)."""
        return {s: Count(n) for s, n in (await self.count_by_state()).items()}

    async def queue_depths(
        self, states: Sequence[JobState], cap: int
    ) -> tuple[dict[tuple[str, JobState], int], bool]:
        """Jobs in ``states`` by (queue, state), counted over at most ``cap``
        jobs of each state; and whether that covered them all (False: some
        counts are lower bounds)."""
        out: dict[tuple[str, JobState], int] = {}
        complete = True
        for state in states:
            seen = 0
            async for job in self._all_jobs(JobQuery(states=(state,), sort="created_at")):
                if seen == cap:
                    complete = False
                    break
                seen += 1
                out[(job.queue, state)] = out.get((job.queue, state), 0) + 1
        return out, complete

    async def browse_jobs(
        self, query: JobQuery, before: Cursor | None, id_prefix: str | None = None
    ) -> list[Job]:
        """Up to ``query.limit`` jobs matching ``query``'s filters (and whose id
        starts with ``id_prefix``, lowercase hex), newest first by (created_at,
        id), strictly after ``before`` in that order. No total is counted: ask
        for one more than a page to know whether another follows."""
        rows = [
            j
            async for j in self._all_jobs(replace(query, sort="created_at"))
            if not id_prefix or j.id.startswith(id_prefix)
        ]
        rows.sort(key=_newest_key, reverse=True)
        if before is not None:
            rows = [j for j in rows if _newest_key(j) < (before.created_at, before.job_id)]
        return rows[: query.limit]

    async def job_events(
        self, job_id: str, since: datetime, until: datetime, limit: int
    ) -> list[Event]:
        """Up to ``limit`` events of one job created from ``since`` to ``until``
        (its lifetime: the time range keeps the read cheap), oldest first."""
        out: list[Event] = []
        after = 0
        while len(out) < limit:
            batch = await self.events_after(after, 1000)
            out.extend(e for e in batch if e.job_id == job_id and since <= e.created_at <= until)
            if len(batch) < 1000:
                break
            after = batch[-1].id
        return out[:limit]

    async def job_children(self, job_id: str, limit: int) -> list[str]:
        """Up to ``limit`` ids of the jobs that depend on ``job_id``, sorted."""
        out = []
        async for job in self._all_jobs(JobQuery()):
            if job_id in job.depends_on:
                out.append(job.id)
        return sorted(out)[:limit]

    async def recent_stats(
        self, since: datetime, sample: int, *, buckets_since: datetime | None = None
    ) -> RecentStats:
        """Per-minute activity since ``since``, the enqueue-to-start wait p95 over
        the last ``sample`` jobs finished since then, and the oldest pending job.
        ``buckets_since`` (later than ``since``) narrows the per-minute buckets to
        the jobs finished or created from then on: a caller that kept the older,
        closed minutes reads only the newest ones."""
        buckets: dict[datetime, MinuteBucket] = {}
        edge = since if buckets_since is None else max(since, buckets_since)

        def bucket(at: datetime) -> MinuteBucket:
            minute = at.replace(second=0, microsecond=0)
            return buckets.setdefault(minute, MinuteBucket(minute))

        waits: list[float] = []
        async for job in self._all_jobs(JobQuery(sort="completed_at")):
            if job.completed_at is None:
                continue
            if job.completed_at < since:
                break
            if job.completed_at < edge:
                pass
            elif job.state is JobState.COMPLETED:
                bucket(job.completed_at).completed += 1
            elif job.state is JobState.FAILED:
                bucket(job.completed_at).failed += 1
            if job.started_at is not None and job.created_at is not None and len(waits) < sample:
                start = max(job.created_at, job.run_at or job.created_at)
                waits.append((job.started_at - start).total_seconds() * 1000)
        async for job in self._all_jobs(JobQuery(sort="created_at")):
            if job.created_at is None:
                continue
            if job.created_at < edge:
                break
            bucket(job.created_at).submitted += 1
        oldest = await self.list_jobs(
            JobQuery(states=(JobState.PENDING,), limit=1, descending=False)
        )
        return RecentStats(
            sorted(buckets.values(), key=lambda b: b.minute),
            percentile(waits, 0.95),
            oldest.jobs[0].created_at if oldest.jobs else None,
        )

    async def _all_jobs(self, query: JobQuery) -> AsyncIterator[Job]:
        offset = 0
        while True:
            page = await self.list_jobs(replace(query, limit=1000, offset=offset))
            for job in page.jobs:
                yield job
            if not page.has_more or not page.jobs:
                return
            offset += len(page.jobs)

    # -- flow control (docs/flow_control.md) ------------------------------------------
    @abc.abstractmethod
    async def record_flow_limits(self, limits: Sequence[FlowLimits], now: datetime) -> None:
        """Insert or replace these job types' limits (a worker at start); a type
        whose ``FlowLimits`` is ``empty`` loses its row. The last writer wins."""

    @abc.abstractmethod
    async def list_flow_limits(self) -> list[FlowLimits]:
        """Every recorded job type limit, by job type."""

    @abc.abstractmethod
    async def set_queue(
        self,
        queue: str,
        now: datetime,
        *,
        paused: bool | None = None,
        concurrency_limit: int | None = -1,
    ) -> QueueInfo:
        """Pause (``paused=True``) or resume a queue, and/or set its concurrency limit
        (``None`` removes it; ``-1``, the default, keeps it). Fetches from then on
        leave a paused queue's jobs pending; running ones finish. Raises
        ``ValidationError`` for a bad name or limit (nothing changes)."""

    @abc.abstractmethod
    async def list_queues(self) -> list[QueueInfo]:
        """Queues with pending or running jobs or settings, by name, with counts."""

    async def queue_settings(self) -> list[QueueInfo]:
        """Queues with a settings row (paused, concurrency limit), by name, without
        counts (``pending``/``running`` are 0): what the dashboard needs, without
        ``list_queues``' count of every pending job (a scan on a big backlog)."""
        return [
            replace(q, pending=0, running=0)
            for q in await self.list_queues()
            if q.updated_at is not None or q.paused or q.concurrency_limit is not None
        ]

    @abc.abstractmethod
    async def prune_flow_windows(self, now: datetime) -> int:
        """Delete rate-limit windows that are long over: older than two of their
        job type's windows plus a minute (``MAX_RATE_WINDOW_SECONDS`` for a type
        without a recorded rate). One row per (job type, key) would otherwise
        stay forever for every key ever seen. Returns how many were deleted."""

    @abc.abstractmethod
    async def flow_stats(self, now: datetime) -> FlowStats:
        """Ready jobs held back now by each limit (paused queue, concurrency, rate,
        queue concurrency) and pending jobs with requirements."""

    # -- the secrets vault (docs/security.md): ciphertexts only ---------------------------
    async def put_secret(
        self, name: str, key_id: str, seal: Callable[[int], bytes], now: datetime, keep: int
    ) -> SecretVersion:
        """Add the next version of secret ``name`` (1 for a new name), sealed by
        ``seal(version)`` inside the write, and drop all but its newest ``keep``
        versions. Returns the stored version. Raises ``ValidationError`` (keep)."""
        raise NotImplementedError

    async def get_secret(self, name: str, version: int | None = None) -> SecretVersion:
        """One version (the newest when ``version`` is None). Raises ``SecretNotFound``."""
        raise NotImplementedError

    async def secret_version(self, name: str) -> int | None:
        """The newest version of ``name``, None when there is no such secret (a cheap
        check, so caches see a change)."""
        raise NotImplementedError

    async def list_secrets(self) -> list[SecretInfo]:
        """Every secret, by name: versions and dates, never a value."""
        raise NotImplementedError

    async def delete_secret(self, name: str) -> None:
        """Delete every version of ``name``. Raises ``SecretNotFound``."""
        raise NotImplementedError

    async def rewrap_secrets(self, rewrap: Callable[[SecretVersion], tuple[str, bytes]]) -> int:
        """Replace every row's ``(key_id, ciphertext)`` by ``rewrap(row)``, all in one
        transaction (an exception from ``rewrap`` changes nothing). Returns the count."""
        raise NotImplementedError

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        """Record that key ``key_id`` authenticated at ``now`` (``last_used_at``; an
        older ``now`` than the stored one changes nothing)."""
        raise NotImplementedError

    # -- key rotation, webhook secrets in the vault, secret retention (docs/security.md) --
    async def rotate_api_key(
        self, key_id: str, new: ApiKey, old_until: datetime, now: datetime
    ) -> None:
        """In one transaction: store ``new`` and end key ``key_id``: revoked at ``now``
        when ``old_until <= now``, else expiring at ``old_until`` (an earlier expiry
        stays). Raises ``ApiKeyNotFound``, ``ValidationError`` (the old key is revoked,
        or ``new``'s id or hash exists)."""
        raise NotImplementedError

    async def move_webhook_secret(self, webhook_id: str, ref: str, secret: str) -> bool:
        """Replace endpoint ``webhook_id``'s stored secret by the vault reference
        ``ref``, if it still holds ``secret`` and no reference; True if it did. The
        plaintext is overwritten in the database file too (SQLite: secure delete
        and a WAL checkpoint)."""
        raise NotImplementedError

    async def prune_secret_versions(self, replaced_before: datetime) -> int:
        """Delete every secret version replaced by a newer one created at or before
        ``replaced_before`` (the newest version of a secret always stays). Returns
        how many went."""
        raise NotImplementedError

    async def workflow_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` workflow ids starting with ``prefix`` (lowercase hex), sorted."""
        raise NotImplementedError

    # -- the hash-chained audit log (docs/security.md, storage/audit.py) -------------------
    async def append_audit(self, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
        """Number and chain ``drafts`` after the newest entry, in one transaction of
        their own (a change's own entries go in through ``storage.audit.pending``).
        Concurrent appenders (threads, processes) never fork the chain."""
        raise NotImplementedError

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        """Entries matching ``query``, ``seq`` ascending, at most ``query.limit``.
        Raises ``ValidationError``."""
        raise NotImplementedError

    async def add_audit_anchor(self, anchor: Anchor) -> None:
        """Record an anchor (a second one for the same ``seq`` is ignored)."""
        raise NotImplementedError

    async def list_audit_anchors(self) -> list[Anchor]:
        """Every anchor, ``seq`` ascending."""
        raise NotImplementedError


#: The states ``queue_stats`` counts.
STAT_STATES = (JobState.BLOCKED, JobState.PENDING, JobState.RUNNING, JobState.FAILED)


@dataclass(frozen=True, slots=True)
class QueueStat:
    """``count`` jobs of ``queue`` in ``state``; ``oldest_due``: the earliest
    ``run_at`` already due among them (pending rows only, else None)."""

    queue: str
    state: JobState
    count: int
    oldest_due: datetime | None


def _newest_key(job: Job) -> tuple[datetime, str]:
    return (job.created_at or datetime.min.replace(tzinfo=UTC), job.id)


def event_data(
    job_id: str, job_type: str, queue: str, status: str, attempt: int, **extra: Any
) -> dict[str, Any]:
    """The common fields of every job lifecycle event, plus the transition's own."""
    return {
        "job_id": job_id,
        "job_type": job_type,
        "queue": queue,
        "status": status,
        "attempt": attempt,
        **extra,
    }


#: A result larger than this (bytes of JSON) is not copied into the ``job_completed``
#: event: the outbox, the bus, the WebSocket and webhook bodies carry
#: ``"result": null, "result_truncated": true, "result_size": N`` instead, and the
#: result itself stays on the job (``GET /api/jobs/{id}``). 64 KiB.
EVENT_RESULT_MAX_BYTES = 64 * 1024


def result_fields(result: Any) -> dict[str, Any]:
    """The ``result`` fields of a ``job_completed`` event's data (see
    ``EVENT_RESULT_MAX_BYTES``)."""
    try:
        size = len(orjson.dumps(result))
    except TypeError:  # not JSON: the store refuses it before any event is written
        return {"result": result}
    if size <= EVENT_RESULT_MAX_BYTES:
        return {"result": result}
    return {"result": None, "result_truncated": True, "result_size": size}


def row_event(row: Any, status: str, attempt: int, **extra: Any) -> dict[str, Any]:
    """``event_data`` from a database row with ``id``, ``job_type`` and ``queue``."""
    return event_data(row["id"], row["job_type"], row["queue"], status, attempt, **extra)


def disabled_event(webhook: Webhook, reason: str) -> dict[str, Any]:
    """The data of the ``webhook_disabled`` event."""
    return {
        "webhook_id": webhook.id,
        "url": webhook.url,
        "reason": reason,
        "consecutive_failures": webhook.consecutive_failures,
        "failing_since": webhook.failing_since.isoformat() if webhook.failing_since else None,
    }


def check_limit(limit: int) -> None:
    if not isinstance(limit, int) or limit < 0:
        raise ValidationError(
            f"fetch limit must be an integer >= 0 (got {limit!r})",
            [FieldError("limit", "must be >= 0")],
        )


def no_external_connection(connection: Any, backend: str) -> None:
    if connection is not None:
        raise ConfigurationError(
            f"Transactional enqueue (connection=...) needs the PostgreSQL store; "
            f"this app uses {backend}"
        )


def webhook_from_row(row: Any, ts: Callable[[Any], datetime | None]) -> Webhook:
    """A ``webhooks`` row (SQLite or PostgreSQL; ``ts`` converts timestamps)."""
    types = row["event_types"]
    return Webhook(
        id=row["id"],
        url=row["url"],
        event_types=tuple(orjson.loads(types) if isinstance(types, str | bytes) else types),
        secret=row["secret"],
        created_at=ts(row["created_at"]),  # type: ignore[arg-type]
        state=WebhookState(row["state"]),
        consecutive_failures=row["consecutive_failures"],
        disabled_at=ts(row["disabled_at"]),
        disabled_reason=row["disabled_reason"],
        failing_since=ts(row["failing_since"]),
        last_delivered_at=ts(row["last_delivered_at"]),
        replay_after=row["replay_after"],
        secret_ref=row["secret_ref"],
    )


def delivery_from_row(row: Any, ts: Callable[[Any], datetime | None]) -> DeliveryAttempt:
    return DeliveryAttempt(
        webhook_id=row["webhook_id"],
        delivery_id=row["delivery_id"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        job_id=row["job_id"],
        attempt=row["attempt"],
        outcome=DeliveryOutcome(row["outcome"]),
        status_code=row["status_code"],
        error=row["error"],
        duration_ms=row["duration_ms"],
        created_at=ts(row["created_at"]),  # type: ignore[arg-type]
    )


def delivery_params(a: DeliveryAttempt, created_at: Any) -> tuple[Any, ...]:
    return (
        a.webhook_id,
        a.delivery_id,
        a.event_id,
        a.event_type,
        a.job_id,
        a.attempt,
        a.outcome.value,
        a.status_code,
        a.error,
        a.duration_ms,
        created_at,
    )


def prefix_upper_bound(prefix: str) -> str:
    """The smallest string above every string starting with ``prefix`` (a hex
    prefix: its last character is below ``"f"`` + 1)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def schedule_fired_event(schedule: Any, fire_at: datetime, job: Job) -> dict[str, Any]:
    """The data of the ``schedule_fired`` event (``schedule`` is a row or a Schedule
    with ``id`` and ``name``)."""
    sid = schedule["id"] if not isinstance(schedule, Schedule) else schedule.id
    name = schedule["name"] if not isinstance(schedule, Schedule) else schedule.name
    return {
        "job_id": job.id,
        "job_type": job.job_type,
        "queue": job.queue,
        "schedule_id": sid,
        "name": name,
        "fire_at": fire_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "run_at": None if job.run_at is None else job.run_at.isoformat(),
    }


#: Job states that count as "still running" for ``overlap="skip_if_running"``.
OVERLAP_STATES = ("pending", "blocked", "running")
