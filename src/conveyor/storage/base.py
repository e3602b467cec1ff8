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
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from conveyor.domain.auth import ApiKey
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
from conveyor.domain.states import JobState
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
    Webhook,
    WebhookState,
)


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
    async def heartbeat(self, worker_id: str, jobs_running: int, now: datetime) -> set[str]:
        """Refresh the worker's heartbeat; return ids of its running jobs whose
        cancel was requested. A worker declared dead is marked running again (its
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

    # -- helpers shared by adapters ----------------------------------------
    @staticmethod
    def event_data(job: Job, **extra: Any) -> dict[str, Any]:
        return event_data(job.id, job.job_type, job.queue, job.status, job.attempt, **extra)

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

    @abc.abstractmethod
    async def flow_stats(self, now: datetime) -> FlowStats:
        """Ready jobs held back now by each limit (paused queue, concurrency, rate,
        queue concurrency) and pending jobs with requirements."""


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
