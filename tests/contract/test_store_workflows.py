"""Store contract: workflows (a DAG of steps, each a job), on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from storekit import BASE, all_events, at, lease, register

from conveyor.domain.errors import LeaseLost, ValidationError, WorkflowConflict, WorkflowNotFound
from conveyor.domain.job import Finish, NewJob
from conveyor.domain.states import Action
from conveyor.domain.workflow import NewWorkflow, OnFailure, WorkflowQuery, WorkflowStatus
from conveyor.storage.base import Store


def steps(*spec: tuple[str, list[str]]) -> list[tuple[str, NewJob]]:
    return [(name, NewJob("task", {"step": name}, depends_on=deps)) for name, deps in spec]


DIAMOND = steps(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))


async def create(store: Store, spec=DIAMOND, **fields: Any):
    wf, dup = await store.create_workflow(NewWorkflow("etl", **fields), spec, BASE)
    assert not dup
    return wf


async def run_ready(store: Store, action=Action.COMPLETE, *, now=BASE, result=None, only=None):
    """Lease every ready step and finish them; returns their step names."""
    jobs = await lease(store, now=now, limit=100)
    done = []
    for j in jobs:
        act = Action.COMPLETE if only is not None and j.step_name not in only else action
        ok = await store.finish_many(
            [
                Finish(
                    j.id,
                    j.lease_token or "",
                    act,
                    result=result if result is not None else {"from": j.step_name},
                    error=None if act is Action.COMPLETE else f"{j.step_name} broke",
                )
            ],
            now,
        )
        assert ok == [True]
        done.append(j.step_name)
    return sorted(done)


async def test_diamond_runs_in_dependency_order_and_completes(store: Store):
    await register(store)
    wf = await create(store)
    assert wf.status is WorkflowStatus.RUNNING
    assert wf.total_steps == 4
    assert await run_ready(store) == ["a"]
    assert await run_ready(store) == ["b", "c"]
    got = await store.get_workflow(wf.id)
    assert (got.completed_steps, got.progress) == (3, 0.75)
    assert await run_ready(store) == ["d"]
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.COMPLETED
    assert got.finished_at is not None
    assert got.progress == 1.0
    detail = {s.name: s for s in got.steps or []}
    assert detail["d"].depends_on == ["b", "c"]
    assert detail["d"].result == {"from": "d"}
    assert detail["d"].status == "completed"
    job = await store.get(detail["b"].job_id)
    assert (job.workflow_id, job.step_name) == (wf.id, "b")
    types = [e.type for e in await all_events(store)]
    assert types.count("workflow_submitted") == 1
    assert types.count("workflow_updated") == 4  # one per finishing transaction
    assert types.count("workflow_completed") == 1
    (done,) = [e for e in await all_events(store) if e.type == "workflow_completed"]
    assert (done.data["total_steps"], done.data["success_count"]) == (4, 4)
    assert done.data["failed_count"] == done.data["cancelled_count"] == 0
    assert [s["name"] for s in done.data["step_details"]] == ["a", "b", "c", "d"]


async def test_parent_results_by_step_name(store: Store):
    await register(store)
    await create(store)
    await run_ready(store)
    await run_ready(store)
    (d,) = list(await lease(store, limit=10))
    assert (await store.parent_results([d.id]))[d.id] == {"b": {"from": "b"}, "c": {"from": "c"}}


async def test_fail_fast_cancels_the_rest_naming_the_failed_step(store: Store):
    await register(store)
    spec = steps(("a", []), ("b", []), ("c", ["a"]), ("d", ["b"]))
    wf = await create(store, spec, on_failure=OnFailure.FAIL_FAST)
    jobs = {j.step_name: j for j in await lease(store, limit=10)}
    assert set(jobs) == {"a", "b"}
    a = jobs["a"]
    await store.finish_many([Finish(a.id, a.lease_token or "", Action.FAIL, error="x")], BASE)
    got = await store.get_workflow(wf.id)
    status = {s.name: s.status for s in got.steps or []}
    assert status == {"a": "failed", "b": "cancelling", "c": "cancelled", "d": "cancelled"}
    d = next(s for s in got.steps or [] if s.name == "d")
    assert "step 'a' failed" in (d.error or "")
    assert got.status is WorkflowStatus.RUNNING  # b still runs
    b = jobs["b"]
    await store.finish_many([Finish(b.id, b.lease_token or "", Action.COMPLETE)], BASE)
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.FAILED
    # A step that finished its work despite the cancel request keeps its result.
    assert {s.name: s.status for s in got.steps or []}["b"] == "completed"
    ends = ("workflow_completed", "workflow_failed", "workflow_cancelled")
    terminal = [e for e in await all_events(store) if e.type in ends]
    assert [e.type for e in terminal] == ["workflow_failed"]
    assert terminal[0].data["failed_count"] == 1
    assert terminal[0].data["cancelled_count"] == 2


async def test_continue_runs_independent_branches(store: Store):
    await register(store)
    spec = steps(("a", []), ("b", []), ("c", ["a"]), ("d", ["b"]))
    wf = await create(store, spec, on_failure=OnFailure.CONTINUE)
    assert await run_ready(store, Action.FAIL, only={"a"}) == ["a", "b"]
    assert await run_ready(store) == ["d"]
    got = await store.get_workflow(wf.id)
    assert {s.name: s.status for s in got.steps or []} == {
        "a": "failed",
        "b": "completed",
        "c": "cancelled",
        "d": "completed",
    }
    assert got.status is WorkflowStatus.FAILED
    assert (got.completed_steps, got.failed_steps, got.cancelled_steps) == (2, 1, 1)


async def test_cancel_then_retry_reruns_only_unfinished_steps(store: Store):
    await register(store)
    wf = await create(store)
    assert await run_ready(store) == ["a"]
    got = await store.cancel_workflow(wf.id, at(1))
    assert got.status is WorkflowStatus.CANCELLED
    assert [e.type for e in await all_events(store)].count("workflow_cancelled") == 1
    again = await store.cancel_workflow(wf.id, at(2))  # idempotent
    assert again.status is WorkflowStatus.CANCELLED
    retried = await store.retry_workflow(wf.id, at(3))
    assert retried.status is WorkflowStatus.RUNNING
    assert retried.finished_at is None
    assert {s.name: s.status for s in retried.steps or []} == {
        "a": "completed",
        "b": "pending",
        "c": "pending",
        "d": "blocked",
    }
    a = next(s for s in retried.steps or [] if s.name == "a")
    assert a.result == {"from": "a"}
    with pytest.raises(WorkflowConflict):
        await store.retry_workflow(wf.id, at(4))
    assert await run_ready(store, now=at(5)) == ["b", "c"]
    assert await run_ready(store, now=at(5)) == ["d"]
    assert (await store.get_workflow(wf.id)).status is WorkflowStatus.COMPLETED


async def test_idempotency_key_returns_the_first_workflow(store: Store):
    first = await create(store, idempotency_key="nightly-1")
    again, dup = await store.create_workflow(
        NewWorkflow("etl", idempotency_key="nightly-1"), DIAMOND, at(1)
    )
    assert dup
    assert again.id == first.id
    page, total = await store.list_workflows(WorkflowQuery())
    assert total == 1
    assert len(page) == 1


async def test_list_filters_and_counts(store: Store):
    await register(store)
    a = await create(store, steps(("only", [])))
    await create(store, steps(("x", [])), metadata={"k": 1})
    await run_ready(store, only=None)
    page, total = await store.list_workflows(WorkflowQuery(status=WorkflowStatus.COMPLETED))
    assert total == 2
    page, total = await store.list_workflows(WorkflowQuery(limit=1))
    assert total == 2
    assert len(page) == 1
    with pytest.raises(WorkflowNotFound):
        await store.get_workflow("nope")
    got = await store.get_workflow(a.id)
    assert got.completed_steps == 1


async def test_a_running_step_adds_steps_and_a_fan_in(store: Store):
    await register(store)
    wf = await create(store, steps(("split", [])))
    (split,) = await lease(store, limit=10)
    assert split.lease_token is not None
    new = steps(("item-0", ["split"]), ("item-1", ["split"]), ("join", ["item-0", "item-1"]))
    added = await store.add_steps(wf.id, split.id, split.lease_token, new, BASE)
    assert [j.step_name for j in added] == ["item-0", "item-1", "join"]
    assert {j.state.value for j in added} == {"blocked"}
    with pytest.raises(ValidationError, match="duplicate"):
        await store.add_steps(wf.id, split.id, split.lease_token, steps(("join", [])), BASE)
    with pytest.raises(ValidationError, match="unknown"):
        await store.add_steps(wf.id, split.id, split.lease_token, steps(("z", ["nope"])), BASE)
    with pytest.raises(LeaseLost):
        await store.add_steps(wf.id, split.id, "stale", steps(("z", [])), BASE)
    await store.finish_many([Finish(split.id, split.lease_token, Action.COMPLETE)], BASE)
    assert await run_ready(store) == ["item-0", "item-1"]
    assert await run_ready(store) == ["join"]
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.COMPLETED
    assert got.total_steps == 4


async def test_rescued_step_that_is_quarantined_fails_the_workflow(store: Store):
    await register(store)
    wf = await create(store, steps(("a", []), ("b", ["a"])))
    await lease(store, limit=10)
    await store.rescue(heartbeat_timeout=1, max_lost=0, now=at(60))
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.FAILED
    assert {s.name: s.status for s in got.steps or []} == {"a": "failed", "b": "cancelled"}


async def test_a_step_retried_from_the_dlq_reopens_its_workflow(store: Store):
    await register(store)
    wf = await create(store, steps(("a", []), ("b", [])), on_failure=OnFailure.CONTINUE)
    assert await run_ready(store, Action.FAIL, only={"a"}) == ["a", "b"]
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.FAILED
    a = next(s for s in got.steps or [] if s.name == "a")
    await store.retry_failed([a.job_id], at(1))
    assert (await store.get_workflow(wf.id)).status is WorkflowStatus.RUNNING
    assert await run_ready(store, now=at(2)) == ["a"]
    got = await store.get_workflow(wf.id)
    assert got.status is WorkflowStatus.COMPLETED
    ends = [
        e.type
        for e in await all_events(store)
        if e.type.startswith("workflow_") and e.type != "workflow_updated"
    ]
    assert ends == ["workflow_submitted", "workflow_failed", "workflow_completed"]
