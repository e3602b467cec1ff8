"""What a batch of finishes does to the store, decided in one pure function.

Adapters lock the running rows, call :func:`plan_finishes`, then write the plan
(job columns, execution rows, outbox events) in as few statements as they can.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.domain.job import Finish
from conveyor.domain.states import EVENT_FOR_ACTION, Action, JobState, finish_action, next_state
from conveyor.storage.base import event_data, result_fields
from conveyor.storage.workflows import Moved

OUTCOME = {
    Action.COMPLETE: "completed",
    Action.RETRY: "retry",
    Action.FAIL: "failed",
    Action.CONFIRM_CANCEL: "cancelled",
    Action.RELEASE: "released",
}
# Which query rescues a job of a dead worker, for each action ``lost_action`` picks.
RESCUE_QUERY = {
    Action.LOST: "rescue_lost",
    Action.QUARANTINE: "rescue_quarantine",
    Action.CONFIRM_CANCEL: "rescue_cancel",
}
TERMINAL_ACTIONS = frozenset({Action.COMPLETE, Action.FAIL, Action.CONFIRM_CANCEL})


@dataclass(frozen=True, slots=True)
class RunningRow:
    lease_token: str | None
    attempt: int
    started_at: datetime | None
    job_type: str
    queue: str
    has_children: bool
    cancel_requested: bool
    run_at: datetime | None = None
    error: str | None = None
    workflow_id: str | None = None
    step_name: str | None = None
    payload_version: int = 1


@dataclass(frozen=True, slots=True)
class JobUpdate:
    job_id: str
    action: Action
    state: str
    result: Any
    error: str | None
    run_at: datetime | None
    attempt: int
    keep_worker: bool
    completed_at: datetime | None
    #: A retry's healed payload (the adapter stores it and bumps payload_version).
    payload: dict[str, Any] | None = None


@dataclass(slots=True)
class FinishPlan:
    accepted: list[bool] = field(default_factory=list)
    updates: list[JobUpdate] = field(default_factory=list)
    #: (job id, attempt, outcome, error, traceback) per ended attempt.
    executions: list[tuple[str, int, str, str | None, str | None]] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    finished_parents: list[str] = field(default_factory=list)
    #: Workflow steps this batch finished (for the store's workflow settle step).
    moved: list[Moved] = field(default_factory=list)


def plan_finishes(
    finishes: Sequence[Finish], running: Mapping[str, RunningRow], now: datetime
) -> FinishPlan:
    """Fence each finish by its lease token and decide every write it makes."""
    plan = FinishPlan()
    done: set[str] = set()
    for f in finishes:
        row = running.get(f.job_id)
        if row is None or row.lease_token != f.lease_token or f.job_id in done:
            plan.accepted.append(False)  # stale lease, or a second finish of one lease
            continue
        done.add(f.job_id)
        plan.accepted.append(True)
        action = finish_action(f.action, row.cancel_requested)
        error = "cancelled" if action is not f.action else f.error
        attempt = row.attempt
        state = next_state(JobState.RUNNING, action).value
        run_at = row.run_at
        result = None
        payload = None
        if action is Action.COMPLETE:
            result = f.result
            error = None
            duration = (
                None
                if row.started_at is None
                else int((now - row.started_at).total_seconds() * 1000)
            )
            extra: dict[str, Any] = {**result_fields(f.result), "duration_ms": duration}
        elif action is Action.RETRY:
            run_at = f.retry_at or now
            extra = {"error": error, "run_at": run_at.isoformat()}
            if f.payload is not None:
                payload = f.payload
                extra["healed"] = True
                extra["payload_version"] = row.payload_version + 1
        elif action is Action.RELEASE:
            run_at = now
            attempt -= 1
            error = row.error
            extra = {"reason": "worker_shutdown"}
        else:
            if action is Action.CONFIRM_CANCEL:
                error = error or "cancelled"
            extra = {"error": error}
        plan.updates.append(
            JobUpdate(
                job_id=f.job_id,
                action=action,
                state=state,
                result=result,
                error=error,
                run_at=run_at,
                attempt=attempt,
                keep_worker=action is not Action.RELEASE,
                completed_at=now if action in TERMINAL_ACTIONS else None,
                payload=payload,
            )
        )
        exec_error = (
            None
            if action in (Action.COMPLETE, Action.RELEASE)
            else ("cancelled" if action is not f.action else f.error)
        )
        trace = f.traceback if action is f.action and exec_error is not None else None
        plan.executions.append((f.job_id, row.attempt, OUTCOME[action], exec_error, trace))
        data = event_data(f.job_id, row.job_type, row.queue, state, attempt, **extra)
        plan.events.append((EVENT_FOR_ACTION[action].value, f.job_id, data))
        if row.has_children and action in TERMINAL_ACTIONS:
            plan.finished_parents.append(f.job_id)
        if row.workflow_id is not None and action in TERMINAL_ACTIONS:
            plan.moved.append(Moved(row.workflow_id, row.step_name or f.job_id, state))
    return plan
