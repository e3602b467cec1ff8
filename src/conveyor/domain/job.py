"""Jobs as plain values. Adapters convert rows to these at the edge."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.domain.errors import FieldError, InvalidTransition, ValidationError
from conveyor.domain.flow import check_requirements, key_error
from conveyor.domain.limits import run_at_error, text_error
from conveyor.domain.states import Action, JobState

DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 50
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT_MS = 300_000
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_RETRIES_LIMIT = 100
MAX_KEY_LENGTH = 255
MAX_ID_LENGTH = 64
MAX_DEPENDENCIES = 100
#: Job types under this prefix are Conveyor's own (webhook deliveries...): refused
#: from the API, the CLI and ``app.enqueue``, hidden from ordinary listings.
INTERNAL_JOB_PREFIX = "conveyor."
#: Idempotency keys Conveyor's own jobs use; refused from users.
RESERVED_KEY_PREFIXES = ("conveyor:", "webhook:")


def is_internal(job_type: str) -> bool:
    """Whether ``job_type`` is one of Conveyor's own (reserved) job types."""
    return job_type.startswith(INTERNAL_JOB_PREFIX)


_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")


@dataclass(slots=True)
class NewJob:
    """A job to submit. ``validate`` lists everything wrong with it at once.

    Not frozen: a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, which costs more than the rest of a bulk submit's
    Python work per job. Treat it as a value all the same.
    """

    job_type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_ms: int | None = DEFAULT_TIMEOUT_MS
    run_at: datetime | None = None
    idempotency_key: str | None = None
    depends_on: Sequence[str] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_by: str | None = None
    workflow_id: str | None = None
    #: Set only by Conveyor's own components: allows reserved job types and keys.
    internal: bool = False
    #: Flow control (docs/flow_control.md): the key the job type's limits count
    #: per, and what a worker must offer to run it (``{"gpu": "a100"}``).
    concurrency_key: str | None = None
    requires: Mapping[str, str] | None = None

    def errors(self) -> list[FieldError]:
        errs: list[FieldError] = []
        if not _is_name(self.job_type):
            errs.append(
                FieldError(
                    "job_type", "must be 1-100 characters of letters, digits, '_', '-', '.', ':'"
                )
            )
        if not _is_name(self.queue):
            errs.append(
                FieldError(
                    "queue", "must be 1-100 characters of letters, digits, '_', '-', '.', ':'"
                )
            )
        # dict first: isinstance against the Mapping ABC is slow, and bulk submits check
        # every job.
        if type(self.payload) is not dict and not isinstance(self.payload, Mapping):
            errs.append(FieldError("payload", "must be a JSON object"))
        if type(self.metadata) is not dict and not isinstance(self.metadata, Mapping):
            errs.append(FieldError("metadata", "must be a JSON object"))
        if not _is_int(self.priority) or not 0 <= self.priority <= 100:
            errs.append(FieldError("priority", "must be an integer from 0 to 100"))
        if not _is_int(self.max_retries) or not 0 <= self.max_retries <= MAX_RETRIES_LIMIT:
            errs.append(
                FieldError("max_retries", f"must be an integer from 0 to {MAX_RETRIES_LIMIT}")
            )
        if self.timeout_ms is not None and (
            not _is_int(self.timeout_ms) or not 1 <= self.timeout_ms <= MAX_TIMEOUT_MS
        ):
            errs.append(
                FieldError("timeout_ms", f"must be an integer from 1 to {MAX_TIMEOUT_MS} (or null)")
            )
        if self.run_at is not None:
            if not isinstance(self.run_at, datetime):
                errs.append(FieldError("run_at", "must be a timezone-aware datetime"))
            else:
                problem = run_at_error(self.run_at)
                if problem is not None:
                    errs.append(FieldError("run_at", problem))
        key = self.idempotency_key
        if key is not None:
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
                errs.append(FieldError("idempotency_key", f"must be 1-{MAX_KEY_LENGTH} characters"))
            else:
                problem = text_error(key)
                if problem is None and key.startswith(RESERVED_KEY_PREFIXES) and not self.internal:
                    problem = (
                        "must not start with "
                        + " or ".join(repr(p) for p in RESERVED_KEY_PREFIXES)
                        + ": those keys are reserved for Conveyor's own jobs"
                    )
                if problem is not None:
                    errs.append(FieldError("idempotency_key", problem))
        deps = self.depends_on
        if isinstance(deps, str) or (
            deps
            and not all(
                isinstance(d, str) and 1 <= len(d) <= MAX_ID_LENGTH and text_error(d) is None
                for d in deps
            )
        ):
            errs.append(FieldError("depends_on", "must be a list of job ids"))
        elif len(deps) > MAX_DEPENDENCIES:
            errs.append(FieldError("depends_on", f"must list at most {MAX_DEPENDENCIES} jobs"))
        if self.created_by is not None and (
            not isinstance(self.created_by, str)
            or len(self.created_by) > 200
            or text_error(self.created_by) is not None
        ):
            errs.append(FieldError("created_by", "must be text of at most 200 characters"))
        if not self.internal and type(self.job_type) is str and is_internal(self.job_type):
            errs.append(
                FieldError(
                    "job_type",
                    f"{INTERNAL_JOB_PREFIX!r} job types are reserved for Conveyor's own jobs",
                )
            )
        if self.concurrency_key is not None:
            problem = key_error(self.concurrency_key)
            if problem is not None:
                errs.append(FieldError("concurrency_key", problem))
        if self.requires is not None:
            try:
                check_requirements(self.requires)
            except ValidationError as exc:
                errs.extend(exc.details)
        return errs

    def with_payload(self, payload: Mapping[str, Any]) -> NewJob:
        """The same job with another payload (``replace`` costs ~3x more in bulk)."""
        return NewJob(  # positional, in field order
            self.job_type,
            payload,
            self.queue,
            self.priority,
            self.max_retries,
            self.timeout_ms,
            self.run_at,
            self.idempotency_key,
            self.depends_on,
            self.metadata,
            self.created_by,
            self.workflow_id,
            self.internal,
            self.concurrency_key,
            self.requires,
        )

    def validate(self) -> None:
        errs = self.errors()
        if errs:
            raise ValidationError(
                "Invalid job: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
            )


def _is_name(value: object) -> bool:
    return type(value) is str and _name_matches(value)


@functools.lru_cache(maxsize=1024)
def _name_matches(value: str) -> bool:
    """Bulk submits check the same few job types and queues thousands of times."""
    return _NAME_RE.match(value) is not None


def _is_int(value: object) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


@dataclass(slots=True)
class Job:
    id: str
    job_type: str
    state: JobState
    payload: dict[str, Any]
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    attempt: int = 0
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_ms: int | None = DEFAULT_TIMEOUT_MS
    run_at: datetime | None = None
    result: Any = None
    error: str | None = None
    lease_token: str | None = None
    worker_id: str | None = None
    idempotency_key: str | None = None
    workflow_id: str | None = None
    cancel_requested_at: datetime | None = None
    lost_count: int = 0
    created_by: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    depends_on: list[str] = field(default_factory=list)
    #: The job's step name in its workflow (``workflow_id``), else None.
    step_name: str | None = None
    #: The schedule whose fire submitted this job (docs/schedules.md), else None.
    schedule_id: str | None = None
    #: 1 as submitted, +1 each time a heal before a retry replaced the payload.
    payload_version: int = 1
    #: The last state a handler stored with ``ctx.checkpoint`` (None: none).
    checkpoint: Any = None
    concurrency_key: str | None = None
    requires: dict[str, str] | None = None

    @property
    def status(self) -> str:
        """What clients see: the state, or ``cancelling`` while a cancel is unconfirmed."""
        if self.state is JobState.RUNNING and self.cancel_requested_at is not None:
            return "cancelling"
        return self.state.value

    @property
    def attempts_left(self) -> int:
        return max(0, self.max_retries + 1 - self.attempt)


@dataclass(frozen=True, slots=True)
class JobTypeInfo:
    """A job type as its registration declares it; workers record these in the store
    so that any process (an API without handlers) submits with the same defaults."""

    job_type: str
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_ms: int | None = DEFAULT_TIMEOUT_MS
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    job: Job
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Execution:
    job_id: str
    attempt: int
    worker_id: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    error: str | None
    #: The version of the job's payload this attempt ran with.
    payload_version: int = 1
    #: The attempt's traceback as Python prints it (its last 8,192 characters), if
    #: it raised; None otherwise. ``error`` stays the one-line ``"Type: message"``.
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """A fenced terminal (or retry) write for one running attempt."""

    job_id: str
    lease_token: str
    action: Action
    result: Any = None
    error: str | None = None
    retry_at: datetime | None = None  # for Action.RETRY
    job_type: str = ""  # not persisted: for metrics and logs
    duration: float | None = None  # seconds the handler ran; not persisted
    #: For Action.RETRY: the healed payload the next attempt runs with (its
    #: payload_version goes up by one); None keeps the payload.
    payload: dict[str, Any] | None = None
    error_type: str = ""  # the exception's class name (RETRY/FAIL); for metrics, not persisted
    #: The raised exception's traceback (bounded, storable): kept in the attempt's
    #: history row (``Execution.traceback``), not on the job.
    traceback: str | None = None


FINISH_ACTIONS = frozenset(
    {Action.COMPLETE, Action.RETRY, Action.FAIL, Action.CONFIRM_CANCEL, Action.RELEASE}
)


@dataclass(frozen=True, slots=True)
class Rescued:
    job_id: str
    worker_id: str | None
    action: Action  # LOST (back to pending) or QUARANTINE (to the DLQ)


@dataclass(slots=True)
class WorkerInfo:
    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    job_types: tuple[str, ...]
    concurrency: int
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    state: str = "running"
    jobs_running: int = 0
    #: What the worker offers to jobs with requirements (``--capability gpu=a100``).
    capabilities: dict[str, str] = field(default_factory=dict)
    #: Handlers asked to stop (timeout, cancel) whose code still runs, at the last heartbeat.
    stuck_jobs: int = 0


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Filters and paging for listing jobs."""

    states: tuple[JobState, ...] = ()
    job_type: str | None = None
    queue: str | None = None
    created_by: str | None = None
    limit: int = 50
    offset: int = 0
    sort: str = "created_at"
    descending: bool = True
    #: Conveyor's own jobs (``conveyor.`` types, e.g. webhook deliveries) too; the
    #: API shows them only to admin keys that ask (``include_internal=true``).
    include_internal: bool = True

    SORT_FIELDS = ("created_at", "updated_at", "priority", "run_at", "completed_at", "job_type")

    def validate(self) -> None:
        errs: list[FieldError] = []
        if not 1 <= self.limit <= 1000:
            errs.append(FieldError("limit", "must be from 1 to 1000"))
        if self.offset < 0:
            errs.append(FieldError("offset", "must be >= 0"))
        if self.sort not in self.SORT_FIELDS:
            errs.append(FieldError("sort", f"must be one of {', '.join(self.SORT_FIELDS)}"))
        if errs:
            raise ValidationError(
                "Invalid query: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
            )


@dataclass(frozen=True, slots=True)
class Page:
    jobs: list[Job]
    total: int
    limit: int
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.jobs) < self.total


@dataclass(frozen=True, slots=True)
class Event:
    """One outbox entry."""

    id: int
    type: str
    job_id: str | None
    data: dict[str, Any]
    created_at: datetime


def validate_batch(jobs: Sequence[NewJob]) -> None:
    """Validate every job of a batch; one error names all problems."""
    details: list[FieldError] = []
    for i, new in enumerate(jobs):
        errs = new.errors()
        if errs:
            prefix = f"jobs[{i}]." if len(jobs) > 1 else ""
            details.extend(FieldError(prefix + e.field, e.message) for e in errs)
    if details:
        raise ValidationError(
            "Invalid job: " + "; ".join(f"{d.field} {d.message}" for d in details), details
        )


def lost_action(job: Job, max_lost: int) -> Action:
    """LOST (retry) or QUARANTINE (DLQ) for a running job whose worker died."""
    if job.cancel_requested_at is not None:
        return Action.CONFIRM_CANCEL
    if job.lost_count + 1 >= max_lost or job.attempt > job.max_retries:
        return Action.QUARANTINE
    return Action.LOST


@dataclass(frozen=True, slots=True)
class Activity:
    """What happened since a point in time: for dashboards and metrics."""

    since: datetime
    submitted: int
    finished: dict[tuple[str, JobState], int]  # (job_type, terminal state) -> count

    def by_state(self) -> dict[str, int]:
        """Jobs finished in the window per terminal state; every terminal state is
        present (0 when none), so a client can read ``failed`` before any failure."""
        out: dict[str, int] = {
            s.value: 0 for s in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
        }
        for (_t, state), n in self.finished.items():
            out[state.value] = out.get(state.value, 0) + n
        return out

    def error_rates(self) -> dict[str, float]:
        totals: dict[str, list[int]] = {}
        for (job_type, state), n in self.finished.items():
            if state in (JobState.COMPLETED, JobState.FAILED):
                t = totals.setdefault(job_type, [0, 0])
                t[0] += n
                if state is JobState.FAILED:
                    t[1] += n
        return {k: (f / n if n else 0.0) for k, (n, f) in sorted(totals.items())}


PARENT_FAILED_ERROR = "a parent job failed or was cancelled"


_PAST = {"retry": "retried", "purge": "purged"}


def require_failed(job_id: str, state: str, action: str) -> None:
    """Only dead-lettered jobs can be retried from (or purged out of) the DLQ."""
    if state != "failed":
        raise InvalidTransition(
            state,
            action,
            f"Cannot {action} job {job_id} in {state} status; "
            f"only failed (dead-lettered) jobs can be {_PAST.get(action, action)}",
        )


MAX_STEP_DEPENDENCIES = 1_000  # domain.workflow.MAX_STEP_PARENTS: a step's parents


def validate_steps(steps: Sequence[tuple[str, NewJob]]) -> None:
    """``validate_batch`` for workflow steps ``(name, job)``: a step's ``depends_on``
    holds step names (1-200 characters, at most 1,000, resolved with the DAG), not
    job ids (at most 100), so only its shape and count are checked here. One
    ``ValidationError`` names every bad step."""
    details: list[FieldError] = []
    for i, (name, new) in enumerate(steps):
        errs = [e for e in new.errors() if e.field != "depends_on"]
        deps = new.depends_on
        if isinstance(deps, str) or not all(isinstance(d, str) for d in deps):
            errs.append(FieldError("depends_on", "must be a list of step names"))
        elif len(deps) > MAX_STEP_DEPENDENCIES:
            errs.append(
                FieldError("depends_on", f"must list at most {MAX_STEP_DEPENDENCIES} steps")
            )
        details.extend(
            FieldError(f"steps[{i}].{e.field}", f"(step {name!r}) {e.message}") for e in errs
        )
    if details:
        raise ValidationError(
            "Invalid workflow: " + "; ".join(f"{d.field} {d.message}" for d in details[:20]),
            details,
        )
