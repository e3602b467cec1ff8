"""Workflow bookkeeping every store adapter shares: turning step transitions into
workflow events and statuses, and step rows into ``Workflow`` values.

A store calls its *settle* step at the end of each transaction in which steps
of a workflow finished (a worker's finish, a cascade of cancels, a rescue, an
operator's cancel). Settling applies ``fail_fast``, writes ``workflow_updated``
and, when no step can run any more, the status and the one terminal event,
all in that same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from conveyor.domain.errors import (
    FieldError,
    LeaseLost,
    ValidationError,
    WorkflowConflict,
    WorkflowNotFound,
)
from conveyor.domain.states import JobState
from conveyor.domain.workflow import (
    OnFailure,
    StepDetail,
    Workflow,
    WorkflowStatus,
    workflow_event,
)

#: A ``workflow_updated`` event lists at most this many moved steps.
MAX_MOVED_LISTED = 100


@dataclass(frozen=True, slots=True)
class Moved:
    """A step that reached a final state in the current transaction."""

    workflow_id: str
    step: str
    state: str


def group_moved(moved: Iterable[Moved]) -> dict[str, list[Moved]]:
    out: dict[str, list[Moved]] = {}
    for m in moved:
        out.setdefault(m.workflow_id, []).append(m)
    return out


def first_failed(moved: Sequence[Moved]) -> str | None:
    """The first step that failed for good (dead-lettered) among ``moved``."""
    return next((m.step for m in moved if m.state == JobState.FAILED.value), None)


def wants_fail_fast(on_failure: str, moved: Sequence[Moved]) -> str | None:
    """The failed step whose failure cancels the rest, if the policy says so."""
    if on_failure != OnFailure.FAIL_FAST.value:
        return None
    return first_failed(moved)


def updated_event(
    workflow_id: str, name: str, counts: Mapping[str, int], moved: Sequence[Moved]
) -> dict[str, Any]:
    """``workflow_updated``: the counts and the step that moved (the first one, with
    the others listed when a transaction moved several)."""
    extra: dict[str, Any] = {"step": moved[0].step, "step_status": moved[0].state}
    if len(moved) > 1:
        extra["moved"] = [{"step": m.step, "status": m.state} for m in moved[:MAX_MOVED_LISTED]]
        extra["moved_count"] = len(moved)
    return workflow_event(workflow_id, name, "running", counts, **extra)


def step_details(
    rows: Iterable[Any],
    edges: Iterable[tuple[str, str]],
    ts: Callable[[Any], datetime | None],
    *,
    results: bool,
    load: Callable[[Any], Any] = lambda v: v,
) -> list[StepDetail]:
    """``StepDetail`` per step row (columns of ``step_rows``); ``edges``: (child, parent)."""
    parents: dict[str, list[str]] = {}
    for child, parent in edges:
        parents.setdefault(child, []).append(parent)
    out = []
    for r in rows:
        state = r["state"]
        status = "cancelling" if state == "running" and r["cancel_requested_at"] else state
        result = r["result"] if results else None
        out.append(
            StepDetail(
                name=r["step_name"],
                job_id=r["id"],
                job_type=r["job_type"],
                status=status,
                attempt=r["attempt"],
                depends_on=sorted(parents.get(r["step_name"], ())),
                started_at=ts(r["started_at"]),
                finished_at=ts(r["completed_at"]),
                error=r["error"],
                result=None if result is None else load(result),
            )
        )
    return out


#: A terminal workflow event lists at most this many steps (the failed and
#: cancelled ones first); ``step_details_truncated`` says when it left some out.
MAX_EVENT_STEPS = 1_000


def event_steps(details: Sequence[StepDetail]) -> list[dict[str, Any]]:
    """``step_details`` as a terminal event carries them: no results (they stay on
    the jobs, where ``GET /api/workflows/{id}`` reads them), at most
    ``MAX_EVENT_STEPS`` of them, the ones that did not complete first."""
    if len(details) > MAX_EVENT_STEPS:
        details = sorted(details, key=lambda d: d.status == "completed")[:MAX_EVENT_STEPS]
    return [
        {
            "name": d.name,
            "job_id": d.job_id,
            "job_type": d.job_type,
            "status": d.status,
            "attempt": d.attempt,
            "depends_on": d.depends_on,
            "error": d.error,
        }
        for d in details
    ]


def workflow_from_row(
    row: Any,
    counts: Mapping[str, int],
    ts: Callable[[Any], datetime | None],
    steps: list[StepDetail] | None = None,
) -> Workflow:
    metadata = row["metadata"]
    if isinstance(metadata, str | bytes):
        metadata = orjson.loads(metadata)
    return Workflow(
        id=row["id"],
        name=row["name"],
        status=WorkflowStatus(row["status"]),
        on_failure=OnFailure(row["on_failure"]),
        total_steps=row["total_steps"],
        completed_steps=counts.get("completed", 0),
        failed_steps=counts.get("failed", 0),
        cancelled_steps=counts.get("cancelled", 0),
        running_steps=counts.get("running", 0),
        idempotency_key=row["idempotency_key"],
        metadata=dict(metadata),
        created_by=row["created_by"],
        created_at=ts(row["created_at"]),
        finished_at=ts(row["finished_at"]),
        cancel_requested_at=ts(row["cancel_requested_at"]),
        steps=steps,
    )


def retry_states(retried: Iterable[str], edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The state each retried step starts in: ``blocked`` when a parent is retried
    too, else ``pending`` (its parents all completed)."""
    again = set(retried)
    waiting = {child for child, parent in edges if child in again and parent in again}
    return {s: ("blocked" if s in waiting else "pending") for s in again}


def descendants(roots: Iterable[str], edges: Iterable[tuple[str, str]]) -> set[str]:
    """Every step downstream of ``roots`` (not the roots); ``edges``: (child, parent)."""
    children: dict[str, list[str]] = {}
    for child, parent in edges:
        children.setdefault(parent, []).append(child)
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def split_added(
    steps: Sequence[tuple[str, Any]], existing: Sequence[StepDetail]
) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """A running step's ``add_steps`` again after a retry: the steps it asks for that
    are already there with the same job type and parents were added by an earlier
    attempt: they are not added twice (their job ids come back), so a fan-out
    step can be retried. A name that exists with another definition is a
    duplicate. Returns (steps to insert, name -> job id of those already there)."""
    by_name = {d.name: d for d in existing}
    new: list[tuple[str, Any]] = []
    already: dict[str, str] = {}
    clash: list[str] = []
    for name, job in steps:
        d = by_name.get(name)
        if d is None:
            new.append((name, job))
        elif d.job_type == job.job_type and sorted(d.depends_on) == sorted(
            dict.fromkeys(job.depends_on)
        ):
            already[name] = d.job_id
        else:
            clash.append(name)
    if clash:
        shown = ", ".join(repr(n) for n in clash[:10])
        raise ValidationError(
            f"Invalid workflow: duplicate step names: {shown} (already in the workflow "
            "with another job type or parents)",
            [FieldError("steps", f"duplicate step names: {shown}")],
        )
    return new, already


def check_retryable(workflow_id: str, workflow: Any | None) -> None:
    """Raises ``WorkflowNotFound`` (no row) or ``WorkflowConflict`` while the
    workflow runs. ``workflow``: its row (a mapping with ``status``)."""
    if workflow is None:
        raise WorkflowNotFound(workflow_id)
    if workflow["status"] == "running":
        raise WorkflowConflict(
            workflow_id,
            "running",
            "retry",
            "Cannot retry a running workflow: wait for it to finish or cancel it",
        )


def check_can_add(
    workflow_id: str,
    job_id: str,
    lease_token: str,
    caller: tuple[str, str | None, str | None] | None,
    workflow: Any | None,
) -> None:
    """May ``job_id`` (holding ``lease_token``) add steps to ``workflow_id``?
    ``caller``: the job's (state, lease token, workflow id), None if it is gone;
    ``workflow``: the workflow's row (``status``, ``cancel_requested_at``).
    Raises ``LeaseLost``, ``WorkflowNotFound`` or ``WorkflowConflict``."""
    if caller is None or caller != ("running", lease_token, workflow_id):
        raise LeaseLost(
            f"Job {job_id!r} no longer holds its lease in workflow {workflow_id!r}: "
            "it cannot add steps"
        )
    if workflow is None:
        raise WorkflowNotFound(workflow_id)
    status, cancelling = workflow["status"], workflow["cancel_requested_at"] is not None
    if status != "running" or cancelling:
        raise WorkflowConflict(
            workflow_id,
            status,
            "add steps",
            f"Cannot add steps to workflow {workflow_id!r}: it is {status}"
            + (" (cancelling)" if cancelling else ""),
        )
