"""Conveyor's exception tree.

Every error Conveyor raises derives from :class:`ConveyorError`::

    ConveyorError
    ├── ConfigurationError          bad setting / database URL / app import path
    ├── ValidationError (ValueError) bad input: payload, priority, cron, ...
    ├── NotFound (LookupError)       no such object
    │   ├── JobNotFound              no job with that id
    │   ├── ApiKeyNotFound           no API key with that id
    │   └── WorkflowNotFound         no workflow with that id
    ├── InvalidTransition            a state change the state machine forbids
    │   ├── JobNotCancellable        cancelling a finished job
    │   └── WorkflowConflict         a workflow action its status forbids
    ├── LeaseLost                    a fenced write whose lease is no longer held
    ├── LockError                    distributed locks and leader leases
    │   ├── LockNotAcquired          held by someone else (past the ``wait``)
    │   ├── LockLost                 a held lock or lease expired or was taken over
    │   └── StaleFencingToken        a fenced write with a token that no longer holds
    ├── StoreError                   the store failed (cause kept in __cause__)
    │   └── StoreUnavailable         the store cannot be reached or is full (retry later)
    └── HandlerError                 base of the signals a handler may raise
        ├── Permanent                do not retry this job
        └── Retry                    retry, after a specific delay

Messages say what went wrong and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ConveyorError(Exception):
    """Root of every error raised by Conveyor."""


class ConfigurationError(ConveyorError):
    """A setting, URL or import path is wrong."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field: where it is and what is wrong with it."""

    field: str
    message: str


class ValidationError(ConveyorError, ValueError):
    """Input was rejected before anything was written."""

    def __init__(self, message: str, details: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[FieldError, ...] = tuple(details)


class NotFound(ConveyorError, LookupError):
    """The object asked for does not exist."""


class JobNotFound(NotFound):
    """No job with the given id exists."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id!r} not found")
        self.job_id = job_id


class ApiKeyNotFound(NotFound):
    """No API key with the given id exists."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key {key_id!r} not found")
        self.key_id = key_id


class WorkflowNotFound(NotFound):
    """No workflow with the given id exists."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"Workflow {workflow_id!r} not found")
        self.workflow_id = workflow_id


class InvalidTransition(ConveyorError):
    """The state machine does not allow this change."""

    def __init__(self, state: str, action: str, message: str | None = None) -> None:
        super().__init__(message or f"Cannot {action} a job in {state} status")
        self.state = state
        self.action = action


class JobNotCancellable(InvalidTransition):
    """The job is already finished."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(state, "cancel", f"Cannot cancel job in {state} status")
        self.job_id = job_id


class WorkflowConflict(InvalidTransition):
    """The workflow's status forbids the action (retrying a running workflow,
    adding steps to a finished one)."""

    def __init__(self, workflow_id: str, status: str, action: str, message: str) -> None:
        super().__init__(status, action, message)
        self.workflow_id = workflow_id


class LeaseLost(ConveyorError):
    """A fenced write was refused: another attempt owns (or finished) the job."""


class StoreError(ConveyorError):
    """The store failed to carry out an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or cannot take writes now (disk full, locked,
    connection lost): retry later.

    ``reason`` is a short phrase without paths, addresses or credentials, fit to
    show a remote caller (the REST API answers 503 with it); the message may
    name the file or server for the operator.
    """

    def __init__(self, message: str, *, reason: str = "the store cannot be reached") -> None:
        super().__init__(message)
        self.reason = reason


class HandlerError(ConveyorError):
    """Base of the exceptions a job handler raises to steer retries."""


class Permanent(HandlerError):
    """Raised by a handler: the job failed and must not be retried.

    ``raise Permanent("card declined") from exc`` sends the job to the
    dead-letter queue at once, whatever retries remain.
    """


class Retry(HandlerError):
    """Raised by a handler: retry this job after ``delay`` seconds.

    Counts as an attempt; when no retries remain the job is dead-lettered.
    """

    def __init__(self, message: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(message)
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must be >= 0 seconds")
        self.delay = delay


class LockError(ConveyorError):
    """Base of the errors of distributed locks and leader leases."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class LockNotAcquired(LockError):
    """Someone else holds the lock, and kept it for the whole ``wait``."""


class LockLost(LockError):
    """A lock (or leader lease) this process held expired or was taken over: work
    done under it from now on is not protected. Its ``token`` is the lost one."""

    def __init__(self, message: str, *, key: str, token: int) -> None:
        super().__init__(message, key=key)
        self.token = token


class StaleFencingToken(LockError):
    """A fenced write was refused: ``token`` no longer holds ``key`` (it expired, was
    released, or a newer holder has the key)."""

    def __init__(self, key: str, token: int) -> None:
        super().__init__(
            f"Fencing token {token} no longer holds lock {key!r}: the lock expired, was "
            "released or another holder took it; refusing the write",
            key=key,
        )
        self.token = token
