"""The job state machine (DESIGN.md §2), as data.

Every persisted change names the state it leaves: adapters write
``... WHERE state = <expected>`` and the table below is the only place that
says which changes exist. ``docs/state_machine.md`` mirrors it.
"""

from __future__ import annotations

from enum import StrEnum

from conveyor.domain.errors import FieldError, InvalidTransition, ValidationError


class JobState(StrEnum):
    BLOCKED = "blocked"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.BLOCKED, JobState.PENDING, JobState.RUNNING})


class Action(StrEnum):
    """What happens to a job; with its current state it decides the next one."""

    UNBLOCK = "unblock"  # every parent completed
    PARENT_FAILED = "parent_failed"  # a parent failed or was cancelled
    CANCEL = "cancel"  # cancel of a job that is not running
    FETCH = "fetch"  # a worker leased the job
    COMPLETE = "complete"  # the handler returned
    RETRY = "retry"  # the handler failed, attempts left
    FAIL = "fail"  # permanent error or attempts exhausted -> DLQ
    CONFIRM_CANCEL = "confirm_cancel"  # the worker stopped a running job on request
    LOST = "lost"  # the worker died; the rescuer re-queues
    QUARANTINE = "quarantine"  # the worker died once too often -> DLQ
    RELEASE = "release"  # graceful shutdown hands the job back
    DLQ_RETRY = "dlq_retry"  # an operator re-queues a dead-lettered job


TRANSITIONS: dict[tuple[JobState, Action], JobState] = {
    (JobState.BLOCKED, Action.UNBLOCK): JobState.PENDING,
    (JobState.BLOCKED, Action.PARENT_FAILED): JobState.CANCELLED,
    (JobState.BLOCKED, Action.CANCEL): JobState.CANCELLED,
    (JobState.PENDING, Action.FETCH): JobState.RUNNING,
    (JobState.PENDING, Action.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, Action.COMPLETE): JobState.COMPLETED,
    (JobState.RUNNING, Action.RETRY): JobState.PENDING,
    (JobState.RUNNING, Action.FAIL): JobState.FAILED,
    (JobState.RUNNING, Action.CONFIRM_CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, Action.LOST): JobState.PENDING,
    (JobState.RUNNING, Action.QUARANTINE): JobState.FAILED,
    (JobState.RUNNING, Action.RELEASE): JobState.PENDING,
    (JobState.FAILED, Action.DLQ_RETRY): JobState.PENDING,
}


def next_state(state: JobState, action: Action) -> JobState:
    """The state ``action`` leads to from ``state``; raises if it is not allowed."""
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise InvalidTransition(state.value, action.value) from None


def sources(action: Action) -> frozenset[JobState]:
    """The states from which ``action`` is allowed."""
    return frozenset(s for (s, a) in TRANSITIONS if a is action)


class EventType(StrEnum):
    """Lifecycle events written to the outbox with each transition."""

    JOB_SUBMITTED = "job_submitted"
    JOB_STARTED = "job_started"
    JOB_STATUS_CHANGED = "job_status_changed"
    JOB_RETRYING = "job_retrying"
    JOB_COMPLETED = "job_completed"
    JOB_FAILED = "job_failed"
    JOB_DEAD_LETTERED = "job_dead_lettered"
    JOB_CANCELLED = "job_cancelled"
    WORKER_STATUS_CHANGED = "worker_status_changed"


EVENT_FOR_ACTION: dict[Action, EventType] = {
    Action.UNBLOCK: EventType.JOB_STATUS_CHANGED,
    Action.PARENT_FAILED: EventType.JOB_CANCELLED,
    Action.CANCEL: EventType.JOB_CANCELLED,
    Action.FETCH: EventType.JOB_STARTED,
    Action.COMPLETE: EventType.JOB_COMPLETED,
    Action.RETRY: EventType.JOB_RETRYING,
    Action.FAIL: EventType.JOB_DEAD_LETTERED,
    Action.CONFIRM_CANCEL: EventType.JOB_CANCELLED,
    Action.LOST: EventType.JOB_RETRYING,
    Action.QUARANTINE: EventType.JOB_DEAD_LETTERED,
    Action.RELEASE: EventType.JOB_STATUS_CHANGED,
    Action.DLQ_RETRY: EventType.JOB_STATUS_CHANGED,
}

EVENT_VERSION = 1


def finish_action(action: Action, cancel_requested: bool) -> Action:
    """The action a worker's outcome really takes.

    A job whose cancel was requested never goes back to ``pending``: if its
    worker hands it back (retry after an error, release on shutdown) before
    the cancel reached it, the job is cancelled instead of running again.
    """
    if cancel_requested and action in (Action.RETRY, Action.RELEASE):
        return Action.CONFIRM_CANCEL
    return action


def parse_states(raw: str | None) -> tuple[JobState, ...]:
    """States from a comma-separated filter (``"pending,running"``); ``cancelling``
    (what clients see of a running job with a cancel requested) means ``running``.
    Raises ``ValidationError`` naming the allowed values."""
    if not raw:
        return ()
    states = []
    for part in raw.split(","):
        part = part.strip()
        if part == "cancelling":
            part = "running"
        try:
            states.append(JobState(part))
        except ValueError:
            allowed = ", ".join(s.value for s in JobState)
            raise ValidationError(
                f"Unknown status {part!r}: use one of {allowed}",
                [FieldError("status", f"must be one of {allowed}")],
            ) from None
    return tuple(states)
