"""Workflows end to end on every backend: the builder, REST, a real worker, fan-in
through ``ctx.parent_results``, dynamic fan-out with ``ctx.add_steps``, events."""

from __future__ import annotations

from typing import Any

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.domain.errors import ValidationError
from conveyor.domain.workflow import WorkflowStatus
from conveyor.storage.base import Store
from support import running_worker

pytestmark = pytest.mark.timeout(60)


def register(app: Conveyor) -> None:
    @app.job("extract")
    async def extract(ctx: Any, n: int) -> dict[str, Any]:
        return {"rows": list(range(n))}

    @app.job("double")
    async def double(ctx: Any) -> dict[str, Any]:
        rows = ctx.parent_results["extract"]["rows"]
        return {"rows": [r * 2 for r in rows]}

    @app.job("total")
    async def total(ctx: Any) -> dict[str, Any]:
        return {
            "sum": sum(sum(r["rows"]) for r in ctx.parent_results.values()),
            "parents": sorted(ctx.parent_results),
        }

    @app.job("boom", max_retries=0)
    async def boom(ctx: Any) -> None:
        raise RuntimeError("step exploded")

    @app.job("split")
    async def split(ctx: Any, items: list[int]) -> dict[str, Any]:
        names = [f"item-{i}" for i in items]
        await ctx.add_steps(
            [
                {
                    "name": n,
                    "job_type": "square",
                    "payload": {"x": i},
                    "depends_on": [ctx.step_name],
                }
                for n, i in zip(names, items, strict=True)
            ]
            + [{"name": "join", "job_type": "total", "depends_on": names}]
        )
        return {"fanned_out": len(names)}

    @app.job("square")
    async def square(ctx: Any, x: int) -> dict[str, Any]:
        return {"rows": [x * x]}


async def test_builder_runs_a_dag_and_passes_results(store: Store):
    async with app_on(store, register) as app, running_worker(app):
        wf = app.workflow("etl")
        a = wf.step("extract", "extract", n=4)
        b = wf.step("left", "double", after=[a])
        c = wf.step("right", "double", after=[a])
        b2 = wf.step("extract2", "extract", n=2)
        wf.step("total", "total", after=[b, c, b2])
        run = await wf.submit()
        done = await run.wait(timeout=30)
        assert done.status is WorkflowStatus.COMPLETED
        steps = {s.name: s for s in done.steps or []}
        # left and right hold "extract"'s rows doubled; extract2 holds [0, 1]
        assert steps["total"].result == {
            "sum": 12 + 12 + 1,
            "parents": ["extract2", "left", "right"],
        }
        assert done.progress == 1.0
        assert done.completed_steps == 5


async def test_fail_fast_over_rest_then_retry(store: Store):
    async with app_on(store, register) as app, api_client(app) as http:
        body = {
            "name": "risky",
            "steps": [
                {"name": "a", "job_type": "extract", "payload": {"n": 1}},
                {"name": "bad", "job_type": "boom", "depends_on": ["a"]},
                {"name": "after", "job_type": "total", "depends_on": ["bad"]},
            ],
        }
        r = await http.post("/api/workflows", json=body)
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["success"]
        assert out["status"] == "running"
        assert [s["name"] for s in out["steps"]] == ["a", "bad", "after"]
        wf_id = out["workflow_id"]
        job = (await http.get(f"/api/jobs/{out['steps'][1]['job_id']}")).json()["job"]
        assert (job["workflow_id"], job["step_name"]) == (wf_id, "bad")
        async with running_worker(app):
            done = await app.workflows.wait(wf_id, timeout=30)
        assert done.status is WorkflowStatus.FAILED
        got = (await http.get(f"/api/workflows/{wf_id}")).json()["workflow"]
        assert got["status"] == "failed"
        assert [s["status"] for s in got["step_details"]] == ["completed", "failed", "cancelled"]
        assert "step exploded" in got["step_details"][1]["error"]
        listed = (await http.get("/api/workflows", params={"status": "failed"})).json()
        assert listed["total"] == 1
        assert listed["workflows"][0]["id"] == wf_id
        r = await http.post(f"/api/workflows/{wf_id}/retry")
        assert r.status_code == 200
        steps = r.json()["workflow"]["step_details"]
        assert [s["status"] for s in steps] == ["completed", "pending", "blocked"]
        assert steps[0]["result"] == {"rows": [0]}
        events = (await http.get("/api/events", params={"types": "workflow_*"})).json()
        kinds = [e["type"] for e in events["events"]]
        assert kinds[0] == "workflow_submitted"
        assert "workflow_failed" in kinds


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ([], "at least 1"),
        ([{"name": "a", "job_type": "extract", "depends_on": ["a"]}], "themselves"),
        (
            [
                {"name": "a", "job_type": "extract", "depends_on": ["b"]},
                {"name": "b", "job_type": "extract", "depends_on": ["a"]},
            ],
            "cycle",
        ),
        ([{"name": "a", "job_type": "extract", "depends_on": ["ghost"]}], "ghost"),
        ([{"name": "a", "job_type": "extract"}, {"name": "a", "job_type": "extract"}], "duplicate"),
        ([{"name": "a", "job_type": "nobody_serves_this"}], "nobody_serves_this"),
        ([{"name": "a\x00", "job_type": "extract"}], "control"),
        (
            [{"name": "a", "job_type": "extract", "payload": {"n": 1}, "priority": 1000}],
            "steps[0].priority",
        ),
        ([{"name": "a", "job_type": "extract", "payload": {"n": "four"}}], "steps[0]"),
    ],
)
async def test_bad_workflows_are_refused_and_store_nothing(store: Store, steps, needle):
    async with app_on(store, register) as app, api_client(app) as http:
        r = await http.post("/api/workflows", json={"name": "bad", "steps": steps})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["success"] is False
        assert needle in body["error"] + str(body.get("details"))
        assert (await http.get("/api/workflows")).json()["total"] == 0
        assert (await app.store.count_by_state()) == dict.fromkeys(
            await app.store.count_by_state(), 0
        )
        with pytest.raises(ValidationError):
            await app.submit_workflow({"name": "bad", "steps": steps})


async def test_oversized_workflow_is_refused(store: Store):
    async with app_on(store, register) as app:
        steps = [{"name": f"s{i}", "job_type": "extract"} for i in range(10_001)]
        with pytest.raises(ValidationError, match="10000"):
            await app.submit_workflow({"name": "big", "steps": steps})
        assert (await app.workflows.list())[1] == 0


async def test_a_step_fans_out_and_a_join_waits_for_all(store: Store):
    async with app_on(store, register) as app, running_worker(app):
        wf = app.workflow("fan")
        wf.step("split", "split", items=[1, 2, 3])
        run = await wf.submit()
        done = await run.wait(timeout=30)
        assert done.status is WorkflowStatus.COMPLETED, done
        steps = {s.name: s for s in done.steps or []}
        assert set(steps) == {"split", "item-1", "item-2", "item-3", "join"}
        assert steps["join"].result == {"sum": 14, "parents": ["item-1", "item-2", "item-3"]}
        assert steps["join"].depends_on == ["item-1", "item-2", "item-3"]
        assert done.total_steps == 5


async def test_cancel_a_running_workflow(store: Store):
    async with app_on(store, register) as app, api_client(app) as http:
        run = await app.submit_workflow(
            {
                "name": "c",
                "steps": [
                    {"name": "a", "job_type": "extract", "payload": {"n": 1}},
                    {"name": "b", "job_type": "double", "depends_on": ["a"]},
                ],
            }
        )
        r = await http.delete(f"/api/workflows/{run.id}")
        assert r.status_code == 200
        got = r.json()["workflow"]
        assert got["status"] == "cancelled"
        assert [s["status"] for s in got["step_details"]] == ["cancelled", "cancelled"]
        assert "workflow cancelled" in got["step_details"][0]["error"]
        assert (await http.get("/api/workflows/nope")).status_code == 404
