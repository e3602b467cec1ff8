"""Workflows attacked as a user would: retry of a finished workflow, hostile step
fields over REST, a fanning-out step whose attempt is retried, hostile YAML files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.domain.errors import ValidationError
from conveyor.domain.workflow import WorkflowStatus
from conveyor.storage.base import Store
from conveyor.workflows import load_definition
from support import async_wait_until, running_worker

pytestmark = pytest.mark.timeout(60)


def register(app: Conveyor) -> None:
    @app.job("extract")
    async def extract(ctx: Any, n: int = 1) -> dict[str, Any]:
        return {"rows": list(range(n))}

    @app.job("free")
    async def free(ctx: Any, **payload: Any) -> dict[str, Any]:
        return payload

    @app.job("split_then_crash", max_retries=1)
    async def split_then_crash(ctx: Any) -> dict[str, Any]:
        # the documented fan-out, on a step whose first attempt dies after adding
        # its steps (a crash, a lost lease, a timeout): the retry adds them again
        await ctx.add_steps(
            [
                {"name": f"item-{i}", "job_type": "extract", "depends_on": [ctx.step_name]}
                for i in range(3)
            ]
        )
        if ctx.attempt == 1:
            raise RuntimeError("crashed after fanning out")
        return {"fanned_out": 3}


async def test_retry_of_a_completed_workflow_changes_nothing(store: Store):
    """Before the fix the workflow went back to ``running`` with no step to run, and
    stayed there for ever (progress 1.0, finished_at null, no terminal event)."""
    async with app_on(store, register) as app, running_worker(app), api_client(app) as http:
        r = await http.post(
            "/api/workflows",
            json={"name": "done", "steps": [{"name": "a", "job_type": "extract"}]},
        )
        assert r.status_code == 201, r.text
        wid = r.json()["workflow_id"]

        async def completed() -> dict[str, Any] | None:
            w = (await http.get(f"/api/workflows/{wid}")).json()["workflow"]
            return w if w["status"] == "completed" else None

        before = await async_wait_until(completed, 20, "the workflow to complete")
        r = await http.post(f"/api/workflows/{wid}/retry")
        assert r.status_code in (200, 409), r.text
        after = (await http.get(f"/api/workflows/{wid}")).json()["workflow"]
        assert after["status"] == "completed"
        assert after["finished_at"] == before["finished_at"]
        listed = (await http.get("/api/workflows?status=running")).json()
        assert listed["total"] == 0


@pytest.mark.parametrize(
    ("step", "field"),
    [
        ({"priority": True}, "priority"),
        ({"max_retries": False}, "max_retries"),
        ({"timeout_ms": True}, "timeout_ms"),
    ],
)
async def test_rest_refuses_booleans_as_step_integers(
    store: Store, step: dict[str, Any], field: str
):
    """POST /api/jobs refuses ``"priority": true``; a workflow step took it as 1."""
    async with app_on(store, register) as app, api_client(app) as http:
        body = {"name": "w", "steps": [{"name": "a", "job_type": "extract", **step}]}
        r = await http.post("/api/workflows", json=body)
        assert r.status_code == 400, r.text
        assert field in str(r.json()["details"])
        assert (await http.get("/api/workflows")).json()["total"] == 0


@pytest.mark.parametrize(
    "payload",
    [{"x": "nul\x00"}, {"x": 2**70}, {"ok": 1, "x": {"deep": "a\x00"}}],
)
async def test_a_bad_payload_error_names_the_step(store: Store, payload: dict[str, Any]):
    """In a 10,000-step workflow, ``payload.x contains a NUL`` does not say where: the
    error must name the step (``steps[1].payload.x``, ``step 'second'``) as every
    other step error does."""
    async with app_on(store, register) as app, api_client(app) as http:
        body = {
            "name": "w",
            "steps": [
                {"name": "first", "job_type": "free", "payload": {"ok": 1}},
                {"name": "second", "job_type": "free", "payload": payload},
            ],
        }
        r = await http.post("/api/workflows", json=body)
        assert r.status_code == 400, r.text
        details = r.json()["details"]
        assert details[0]["field"].startswith("steps[1].payload"), details
        assert "second" in details[0]["message"], details
        assert (await http.get("/api/workflows")).json()["total"] == 0


async def test_a_retried_fan_out_step_can_add_its_steps_again(store: Store):
    async with app_on(store, register) as app, running_worker(app):
        wf = app.workflow("fan")
        wf.step("split", "split_then_crash")
        run = await wf.submit()
        done = await run.wait(timeout=30)
        steps = {s.name: s for s in done.steps or []}
        assert done.status is WorkflowStatus.COMPLETED, [
            (s.name, s.status, s.error) for s in done.steps or []
        ]
        assert sorted(steps) == ["item-0", "item-1", "item-2", "split"]


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path):
    """Nine levels of nine aliases expand to 387 million strings: the CLI took 5 GB and
    23 s, then died with a traceback. Aliases have no use in a workflow file."""
    lines = ["name: w", "steps:", "  - name: a", "    job_type: free", "    payload:"]
    lines.append("      a0: &a0 [x]")
    for i in range(1, 10):
        lines.append(f"      a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationError) as exc:
        load_definition(path)
    assert "alias" in exc.value.message.lower()


def register_more(app: Conveyor) -> None:
    register(app)
    flag: dict[str, bool] = {"ok": False}
    app.flaky_flag = flag  # type: ignore[attr-defined]

    @app.job("flaky", max_retries=0)
    async def flaky(ctx: Any) -> dict[str, Any]:
        if not flag["ok"]:
            raise RuntimeError("not yet")
        return {"ok": True}

    @app.job("slow")
    async def slow(ctx: Any, seconds: float) -> dict[str, Any]:
        import asyncio

        await asyncio.sleep(seconds)  # wait-ok: the step must be running when cancelled
        return {"slept": seconds}


async def _wf(http: Any, wid: str) -> dict[str, Any]:
    return (await http.get(f"/api/workflows/{wid}")).json()["workflow"]


async def _finished(http: Any, wid: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        w = await _wf(http, wid)
        return w if w["status"] != "running" else None

    return await async_wait_until(done, 20, f"workflow {wid} to finish")


async def test_job_retry_of_a_step_keeps_the_workflow_consistent(store: Store):
    async with app_on(store, register_more) as app, running_worker(app), api_client(app) as http:
        body = {
            "name": "w",
            "on_failure": "continue",
            "steps": [
                {"name": "a", "job_type": "flaky"},
                {"name": "b", "job_type": "extract", "depends_on": ["a"]},
            ],
        }
        wid = (await http.post("/api/workflows", json=body)).json()["workflow_id"]
        w = await _finished(http, wid)
        assert w["status"] == "failed"
        step_a = w["step_details"][0]["job_id"]
        app.flaky_flag["ok"] = True  # type: ignore[attr-defined]
        r = await http.post(f"/api/jobs/{step_a}/retry")
        if r.status_code == 409:  # refused, pointing at the workflow's retry: fine
            assert "workflow" in r.json()["error"].lower()
            return

        async def step_done() -> bool:
            return (await app.store.get(step_a)).state.value == "completed"

        await async_wait_until(step_done, 20, "the retried step to complete")
        w = await _finished(http, wid)
        # a workflow reported failed must have a failed step; its child must not stay
        # cancelled "because a parent failed" when that parent completed
        assert w["status"] != "failed" or w["failed_steps"] > 0, w
        assert w["status"] == "completed", [(s["name"], s["status"]) for s in w["step_details"]]


async def test_operator_cancel_of_one_step_ends_the_workflow_cancelled(store: Store):
    async with app_on(store, register_more) as app, running_worker(app), api_client(app) as http:
        body = {
            "name": "w",
            "steps": [
                {"name": "a", "job_type": "slow", "payload": {"seconds": 5}},
                {"name": "b", "job_type": "extract", "depends_on": ["a"]},
                {"name": "c", "job_type": "extract"},
            ],
        }
        out = (await http.post("/api/workflows", json=body)).json()
        wid, step_a = out["workflow_id"], out["steps"][0]["job_id"]

        async def running() -> bool:
            return (await app.store.get(step_a)).state.value == "running"

        await async_wait_until(running, 20, "step a to run")
        r = await http.delete(f"/api/jobs/{step_a}")
        assert r.status_code in (200, 202), r.text
        w = await _finished(http, wid)
        assert w["failed_steps"] == 0
        assert w["status"] == "cancelled", [(s["name"], s["status"]) for s in w["step_details"]]


def register_fan(app: Conveyor) -> None:
    register(app)

    @app.job("join")
    async def join(ctx: Any) -> dict[str, Any]:
        return {"parents": len(ctx.parent_results)}

    @app.job("split", isolation="thread")
    async def split(ctx: Any, n: int) -> dict[str, Any]:
        names = [f"item-{i}" for i in range(n)]
        await ctx.add_steps(
            [{"name": x, "job_type": "extract", "depends_on": [ctx.step_name]} for x in names]
            + [{"name": "join", "job_type": "join", "depends_on": names}]
        )
        return {"fanned_out": n}


async def test_a_step_may_have_1000_parents_as_documented(store: Store):
    """The store applied the plain job's limit (100 job ids) to a step's parents: 101
    parents answered ``jobs[101].depends_on must list at most 100 jobs``."""
    async with app_on(store, register_fan) as app, running_worker(app), api_client(app) as http:
        names = [f"p{i}" for i in range(1000)]
        steps = [{"name": x, "job_type": "extract"} for x in names]
        steps.append({"name": "join", "job_type": "join", "depends_on": names})
        r = await http.post("/api/workflows", json={"name": "wide", "steps": steps})
        assert r.status_code == 201, r.text
        w = await _finished(http, r.json()["workflow_id"])
        assert w["status"] == "completed"
        assert w["step_details"][-1]["result"] == {"parents": 1000}
        steps.append({"name": "over", "job_type": "join", "depends_on": [*names, "join"]})
        r = await http.post("/api/workflows", json={"name": "wider", "steps": steps})
        assert r.status_code == 400
        assert "over" in r.json()["error"]


async def test_the_documented_fan_out_joins_150_items(store: Store):
    async with app_on(store, register_fan) as app, running_worker(app):
        wf = app.workflow("fan")
        wf.step("split", "split", n=150)
        done = await (await wf.submit()).wait(timeout=50)
        steps = {s.name: s for s in done.steps or []}
        assert done.status is WorkflowStatus.COMPLETED, steps["split"].error
        assert steps["join"].result == {"parents": 150}


async def test_a_parent_name_of_200_characters(store: Store):
    """Step names may have 200 characters, but a child of one was refused: ``depends_on
    must be a list of job ids`` (job ids have at most 64)."""
    async with app_on(store, register_fan) as app, api_client(app) as http:
        long = "p" * 200
        body = {
            "name": "long",
            "steps": [
                {"name": long, "job_type": "extract"},
                {"name": "child", "job_type": "join", "depends_on": [long]},
            ],
        }
        r = await http.post("/api/workflows", json=body)
        assert r.status_code == 201, r.text


async def test_builder_refuses_a_plain_function_and_takes_one_parent_by_name(store: Store):
    from conveyor.domain.errors import ConfigurationError

    async with app_on(store, register) as app:
        wf = app.workflow("b")

        async def not_registered(ctx: Any) -> None:
            return None

        # was: AttributeError: 'function' object has no attribute 'job_type'
        with pytest.raises(ConfigurationError, match="registered"):
            wf.step("a", not_registered)  # type: ignore[arg-type]
        wf.step("extract", "extract")
        # was: after="extract" read as the parents 'e', 'x', 't', 'r', 'a', 'c'
        wf.step("b", "extract", after="extract")  # type: ignore[arg-type]
        run = await wf.submit()
        done = await app.workflows.get(run.id)
        assert [s.depends_on for s in done.steps or []] == [[], ["extract"]]
