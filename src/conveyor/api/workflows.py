"""Workflows over HTTP: ``/api/workflows``. ``create_app`` wires it in.

Same conventions as the jobs API (``success``, ``error``, ``details``); the
validation is the one every entry point shares (``conveyor.workflows``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from conveyor.api.http import JSON, Auth
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.workflow import MAX_NAME_CHARS
from conveyor.presenters import workflow_dict
from conveyor.workflows import WorkflowIn


def workflow_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    read = [Depends(auth.require(KeyScope.READ))]
    write = [Depends(auth.require(KeyScope.WRITE))]
    service = conveyor.workflows

    @router.post(
        "/api/workflows",
        status_code=201,
        dependencies=write,
        tags=["workflows"],
        responses={
            200: {"description": "Duplicate idempotency key: the existing workflow"},
            400: {"description": "Invalid workflow (cycle, unknown step or job type...)"},
        },
    )
    async def submit_workflow(body: WorkflowIn, request: Request) -> Response:
        """Submit a DAG of steps; each step is a job that starts when its parents
        completed. Nothing is stored when anything is wrong."""
        key = getattr(request.state, "api_key", None)
        created_by = f"api:{key.name}" if key else "api"
        user = request.headers.get("x-user-id")
        if user and conveyor.settings.trust_user_header:
            created_by = user
        wf, duplicate = await service.submit(body, created_by=created_by)
        summary = {"name": wf.name, "duplicate": duplicate}
        await conveyor.audit.record("workflow.create", "workflow", wf.id, summary)
        full = await service.get(wf.id, results=False)
        steps = [{"name": s.name, "job_id": s.job_id, "status": s.status} for s in full.steps or []]
        content: dict[str, Any] = {
            "success": True,
            "workflow_id": wf.id,
            "status": full.status.value,
            "duplicate": duplicate,
            "steps": steps,
        }
        return JSON(content, status_code=200 if duplicate else 201)

    @router.get("/api/workflows", dependencies=read, tags=["workflows"])
    async def list_workflows(
        status: Annotated[
            Literal["running", "completed", "failed", "cancelled"] | None, Query()
        ] = None,
        name: Annotated[str | None, Query(max_length=MAX_NAME_CHARS)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> Response:
        """Newest first, with counts and progress (no step details)."""
        rows, total = await service.list(status=status, name=name, limit=limit, offset=offset)
        return JSON(
            {
                "success": True,
                "workflows": [workflow_dict(w) for w in rows],
                "total": total,
                "limit": limit,
                "offset": offset,
            }
        )

    @router.get(
        "/api/workflows/{workflow_id}",
        dependencies=read,
        tags=["workflows"],
        responses={404: {"description": "No such workflow"}},
    )
    async def get_workflow(workflow_id: str) -> Response:
        """The workflow, its counts, progress and every step with its result."""
        wf = await service.get(workflow_id)
        return JSON({"success": True, "workflow": workflow_dict(wf)})

    @router.delete(
        "/api/workflows/{workflow_id}",
        dependencies=write,
        tags=["workflows"],
        responses={404: {"description": "No such workflow"}},
    )
    async def cancel_workflow(workflow_id: str) -> Response:
        """Cancel every unfinished step (running ones are asked to stop)."""
        async with conveyor.audit.change("workflow.cancel", "workflow", workflow_id):
            wf = await service.cancel(workflow_id)
        return JSON({"success": True, "workflow": workflow_dict(wf)})

    @router.post(
        "/api/workflows/{workflow_id}/retry",
        dependencies=write,
        tags=["workflows"],
        responses={
            404: {"description": "No such workflow"},
            409: {"description": "The workflow is still running"},
        },
    )
    async def retry_workflow(workflow_id: str) -> Response:
        """Run the failed and cancelled steps again, and what depends on them;
        completed steps keep their results."""
        async with conveyor.audit.change("workflow.retry", "workflow", workflow_id):
            wf = await service.retry(workflow_id)
        return JSON({"success": True, "workflow": workflow_dict(wf)})

    return router
