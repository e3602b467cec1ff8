"""Workflows: a DAG of named steps, each step one Conveyor job.

Pure rules shared by every entry point (Python builder, REST, CLI, a step adding
steps) and every store: what a valid DAG is, which status a workflow has given
its steps' states, and the data of the workflow lifecycle events.

A step starts when all its parents completed (the job dependency machinery:
``blocked`` until then). ``on_failure`` decides what a step that failed for
good (dead-lettered) does to the rest:

- ``fail_fast``: every step not yet finished is cancelled, with a reason naming
  the failed step; running steps get a cancel request.
- ``continue``: only the failed step's descendants are cancelled; other
  branches run to the end.

The workflow is ``completed`` when every step completed, ``failed`` once no
step can run and one failed, ``cancelled`` when nothing failed but steps were
cancelled (an operator cancelled the workflow or one of its steps).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.limits import text_error
from conveyor.domain.states import JobState

#: At most this many steps in one workflow, counting steps added while it runs.
MAX_WORKFLOW_STEPS = 10_000
#: Step and workflow names: 1-200 characters, no control characters.
MAX_NAME_CHARS = 200
#: At most this many parents per step.
MAX_STEP_PARENTS = 1_000
#: At most this many dependency edges in one workflow: readiness is settled in the
#: transaction that finishes a parent, and a dense DAG would make those long.
MAX_WORKFLOW_EDGES = 50_000
#: How many offending steps an error lists before it says "and N more".
_SHOWN = 10

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class WorkflowStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self is not WorkflowStatus.RUNNING


class OnFailure(StrEnum):
    FAIL_FAST = "fail_fast"
    CONTINUE = "continue"


#: Workflow lifecycle event types (written through the outbox).
WORKFLOW_SUBMITTED = "workflow_submitted"
WORKFLOW_UPDATED = "workflow_updated"
WORKFLOW_COMPLETED = "workflow_completed"
WORKFLOW_FAILED = "workflow_failed"
WORKFLOW_CANCELLED = "workflow_cancelled"
WORKFLOW_EVENT_TYPES = (
    WORKFLOW_SUBMITTED,
    WORKFLOW_UPDATED,
    WORKFLOW_COMPLETED,
    WORKFLOW_FAILED,
    WORKFLOW_CANCELLED,
)
TERMINAL_EVENT = {
    WorkflowStatus.COMPLETED: WORKFLOW_COMPLETED,
    WorkflowStatus.FAILED: WORKFLOW_FAILED,
    WorkflowStatus.CANCELLED: WORKFLOW_CANCELLED,
}


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step as submitted: ``depends_on`` names other steps of the workflow.

    ``job_type`` .. ``queue`` are the step's job options (None: the job type's
    registered default)."""

    name: str
    job_type: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    priority: int | None = None
    max_retries: int | None = None
    timeout_ms: int | None = None
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class NewWorkflow:
    name: str
    on_failure: OnFailure = OnFailure.FAIL_FAST
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_by: str | None = None


@dataclass(slots=True)
class StepDetail:
    """A step as ``GET /api/workflows/{id}`` shows it."""

    name: str
    job_id: str
    job_type: str
    status: str
    attempt: int
    depends_on: list[str]
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: Any


@dataclass(slots=True)
class Workflow:
    id: str
    name: str
    status: WorkflowStatus
    on_failure: OnFailure
    total_steps: int
    completed_steps: int = 0
    failed_steps: int = 0
    cancelled_steps: int = 0
    running_steps: int = 0
    idempotency_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_by: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested_at: datetime | None = None
    steps: list[StepDetail] | None = None  # loaded by ``get_workflow`` only

    @property
    def progress(self) -> float:
        """Finished steps (any outcome) over all steps, 0.0-1.0."""
        if not self.total_steps:
            return 1.0
        done = self.completed_steps + self.failed_steps + self.cancelled_steps
        return round(done / self.total_steps, 4)


@dataclass(frozen=True, slots=True)
class WorkflowQuery:
    status: WorkflowStatus | None = None
    name: str | None = None
    limit: int = 50
    offset: int = 0


def name_error(value: object, what: str = "name") -> str | None:
    """Why ``value`` is not a valid step or workflow name (None if it is)."""
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME_CHARS:
        return f"{what} must be 1-{MAX_NAME_CHARS} characters"
    if _CONTROL_RE.search(value):
        return f"{what} must not contain control characters"
    problem = text_error(value)
    return None if problem is None else f"{what} {problem}"


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_dag(
    steps: Sequence[StepSpec],
    *,
    existing: Mapping[str, Sequence[str]] | None = None,
    max_steps: int = MAX_WORKFLOW_STEPS,
    allow_empty: bool = False,
) -> list[str]:
    """Validate ``steps`` and return their names in an order where every parent
    comes before its children (Kahn's algorithm).

    ``existing``: steps already in the workflow (name -> parents), which new
    steps may depend on (a running step adding steps). Raises
    ``ValidationError`` naming the offending steps for: no steps, more than
    ``max_steps`` in all, bad or duplicate names, unknown parents, a step
    depending on itself, and cycles."""
    existing = existing or {}
    errs: list[FieldError] = []
    if not steps and not allow_empty:
        errs.append(FieldError("steps", "must list at least one step"))
    total = len(existing) + len(steps)
    if total > max_steps:
        errs.append(
            FieldError("steps", f"a workflow has at most {max_steps} steps (this one: {total})")
        )
    edges = sum(len(p) for p in existing.values()) + sum(
        len(s.depends_on) for s in steps if not isinstance(s.depends_on, str)
    )
    if edges > MAX_WORKFLOW_EDGES:
        errs.append(
            FieldError(
                "depends_on",
                f"a workflow has at most {MAX_WORKFLOW_EDGES} dependencies in all "
                f"(this one: {edges}); join through intermediate steps instead",
            )
        )
    if errs:
        raise ValidationError("Invalid workflow: " + errs[0].message, errs)
    bad = [i for i, s in enumerate(steps) if name_error(s.name) is not None]
    for i in bad[:_SHOWN]:
        errs.append(FieldError(f"steps[{i}].name", name_error(steps[i].name) or ""))
    seen: set[str] = set()
    dupes: list[str] = []
    for s in steps:
        if s.name in seen or s.name in existing:
            dupes.append(s.name)
        seen.add(s.name)
    if dupes:
        errs.append(FieldError("steps", f"duplicate step names: {_listed(dict.fromkeys(dupes))}"))
    known = seen | set(existing)
    unknown: dict[str, list[str]] = {}
    selfdep: list[str] = []
    toomany: list[str] = []
    for s in steps:
        if isinstance(s.depends_on, str) or not all(isinstance(d, str) for d in s.depends_on):
            errs.append(FieldError(f"steps.{s.name}.depends_on", "must be a list of step names"))
            continue
        if len(s.depends_on) > MAX_STEP_PARENTS:
            toomany.append(s.name)
        for d in s.depends_on:
            if d == s.name:
                selfdep.append(s.name)
            elif d not in known:
                unknown.setdefault(s.name, []).append(d)
    if unknown:
        detail = "; ".join(
            f"{name!r} depends on unknown {_listed(deps)}"
            for name, deps in list(unknown.items())[:_SHOWN]
        )
        errs.append(FieldError("depends_on", f"unknown steps: {detail}"))
    if selfdep:
        errs.append(FieldError("depends_on", f"steps depending on themselves: {_listed(selfdep)}"))
    if toomany:
        errs.append(
            FieldError(
                "depends_on", f"at most {MAX_STEP_PARENTS} parents per step: {_listed(toomany)}"
            )
        )
    if errs:
        raise ValidationError("Invalid workflow: " + errs[0].message, errs)
    order = _topological(steps)
    if len(order) < len(steps):
        placed = set(order)
        cyclic = [s.name for s in steps if s.name not in placed]
        raise ValidationError(
            f"Invalid workflow: the steps form a cycle: {_listed(cyclic)}",
            [FieldError("depends_on", f"cycle among steps {_listed(cyclic)}")],
        )
    return order


def _topological(steps: Sequence[StepSpec]) -> list[str]:
    """Kahn's algorithm over the new steps (parents outside them count as done),
    taking ready steps in the order they were given. Steps left out of the result
    are on, or downstream of, a cycle."""
    index = {s.name: i for i, s in enumerate(steps)}
    indegree = [0] * len(steps)
    children: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        for d in dict.fromkeys(s.depends_on):
            if d in index:
                indegree[i] += 1
                children.setdefault(index[d], []).append(i)
    ready = [i for i in range(len(steps)) if indegree[i] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(steps[i].name)
        for c in children.get(i, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    return order


def step_state(parent_states: Iterable[JobState]) -> JobState:
    """The state a new step starts in, from its parents' states."""
    states = set(parent_states)
    if states & {JobState.FAILED, JobState.CANCELLED}:
        return JobState.CANCELLED
    if states - {JobState.COMPLETED}:
        return JobState.BLOCKED
    return JobState.PENDING


def settled_status(counts: Mapping[str, int]) -> WorkflowStatus | None:
    """The terminal status once no step is blocked, pending or running (else None).

    ``counts``: number of steps per job state."""
    if any(counts.get(s.value, 0) for s in (JobState.BLOCKED, JobState.PENDING, JobState.RUNNING)):
        return None
    if counts.get(JobState.FAILED.value, 0):
        return WorkflowStatus.FAILED
    if counts.get(JobState.CANCELLED.value, 0):
        # Nothing failed: every cancel goes back to an operator's (of the workflow or
        # of one of its steps), and what depended on it.
        return WorkflowStatus.CANCELLED
    return WorkflowStatus.COMPLETED


def fail_fast_reason(failed_step: str | None) -> str:
    """The cancel reason of the steps a ``fail_fast`` workflow cancels (naming the
    failed step when known)."""
    if failed_step is None:
        return "workflow failed: an earlier step failed"
    return f"workflow failed: step {failed_step!r} failed"


#: The cancel reason of the steps of a workflow an operator cancelled.
WORKFLOW_CANCEL_REASON = "workflow cancelled"


def count_fields(counts: Mapping[str, int]) -> dict[str, int]:
    """The counts every workflow event carries."""
    total = sum(counts.values())
    return {
        "total_steps": total,
        "completed_steps": counts.get("completed", 0),
        "failed_steps": counts.get("failed", 0),
        "cancelled_steps": counts.get("cancelled", 0),
        "running_steps": counts.get("running", 0),
    }


def workflow_event(
    workflow_id: str, name: str, status: str, counts: Mapping[str, int], **extra: Any
) -> dict[str, Any]:
    """The data of a workflow event: ids, status, counts and the event's own fields."""
    return {
        "workflow_id": workflow_id,
        "workflow_name": name,
        "status": status,
        **count_fields(counts),
        **extra,
    }


def terminal_event(
    workflow_id: str,
    name: str,
    status: WorkflowStatus,
    counts: Mapping[str, int],
    step_details: list[dict[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """The single terminal event: type and data (``success_count`` .. and the
    steps without their results, which stay on the jobs)."""
    extra: dict[str, Any] = {}
    if len(step_details) < sum(counts.values()):
        extra["step_details_truncated"] = True
    return TERMINAL_EVENT[status], workflow_event(
        workflow_id,
        name,
        status.value,
        counts,
        success_count=counts.get("completed", 0),
        failed_count=counts.get("failed", 0),
        cancelled_count=counts.get("cancelled", 0),
        step_details=step_details,
        **extra,
    )
