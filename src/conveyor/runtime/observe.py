"""What the runtime tells observers (metrics, later traces) besides finished jobs.

The runtime emits these through ``Signals.observe`` only when an observer is
registered (``Signals.observing``), so a process without metrics pays one
attribute check per batch. Observers are cheap and synchronous; they must not
raise (an observer's error is logged and dropped, the job path goes on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from conveyor.domain.job import Job, Rescued


@dataclass(frozen=True, slots=True)
class JobsStarted:
    """A worker leased ``jobs`` at ``now`` (aware UTC): each waited ``now - run_at``."""

    jobs: Sequence[Job]
    now: datetime


@dataclass(frozen=True, slots=True)
class JobsRescued:
    """The maintenance pass took these jobs back from dead workers."""

    rescued: Sequence[Rescued]


@dataclass(frozen=True, slots=True)
class WebhookAttempted:
    """One webhook POST: ``outcome`` is ``delivered``, ``http_error`` (no 2xx),
    ``network_error`` or ``refused`` (a forbidden address); ``seconds`` it took."""

    outcome: str
    seconds: float


@dataclass(frozen=True, slots=True)
class WorkflowSubmitted:
    """This process stored a new workflow of ``steps`` steps (not a duplicate key)."""

    steps: int


@dataclass(frozen=True, slots=True)
class ScheduleFired:
    """One schedule's due instants were handled by this process's scheduler:
    ``fired`` jobs submitted, ``misfired`` instants dropped by its misfire policy
    (a lower bound after a jump over a long outage), ``refused`` instants skipped
    because the store refused their job."""

    fired: int
    misfired: int
    refused: int


Observation = JobsStarted | JobsRescued | WebhookAttempted | WorkflowSubmitted | ScheduleFired
