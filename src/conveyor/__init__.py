"""Conveyor: durable jobs, workflows and events for Python."""

from conveyor.app import Conveyor
from conveyor.domain.errors import (
    ConfigurationError,
    ConveyorError,
    FieldError,
    InvalidTransition,
    JobNotCancellable,
    JobNotFound,
    LeaseLost,
    Permanent,
    Retry,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from conveyor.domain.job import EnqueueResult, Job, NewJob
from conveyor.domain.retry import RetryPolicy
from conveyor.domain.states import JobState
from conveyor.runtime.context import JobContext
from conveyor.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Conveyor",
    "ConveyorError",
    "EnqueueResult",
    "FieldError",
    "InvalidTransition",
    "Job",
    "JobContext",
    "JobNotCancellable",
    "JobNotFound",
    "JobState",
    "LeaseLost",
    "NewJob",
    "Permanent",
    "Retry",
    "RetryPolicy",
    "Settings",
    "StoreError",
    "StoreUnavailable",
    "ValidationError",
    "__version__",
]
