"""``/api/queues``: list queues, pause and resume them, set their concurrency limit.

A pause takes effect at every worker's next fetch (the store's fetch filters
paused queues); running jobs finish. See docs/flow_control.md.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from conveyor.api.http import Auth
from conveyor.api.models import NAME_PATTERN, QueueChange
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.flow import check_concurrency_limit
from conveyor.presenters import queue_dict
from conveyor.storage.flow import KEEP_LIMIT

#: A queue name in the path: the job ``queue`` rules (400 with details otherwise).
QueueName = Annotated[str, Path(pattern=NAME_PATTERN)]


def queue_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    read = [Depends(auth.require(KeyScope.READ))]
    write = [Depends(auth.require(KeyScope.WRITE))]

    @router.get("/api/queues", dependencies=read, tags=["queues"])
    async def list_queues() -> dict[str, Any]:
        """Queues with jobs or settings: paused, concurrency limit, pending, running."""
        queues = await conveyor.store.list_queues()
        return {"success": True, "queues": [queue_dict(q) for q in queues]}

    @router.post(
        "/api/queues/{name}/pause",
        dependencies=write,
        tags=["queues"],
        responses={400: {"description": "Invalid queue name"}},
    )
    async def pause(name: QueueName) -> dict[str, Any]:
        """Stop fetching this queue's jobs (fleet-wide, at once); running jobs finish."""
        async with conveyor.audit.change("queue.pause", "queue", name):
            q = await conveyor.store.set_queue(name, conveyor.now(), paused=True)
        return {"success": True, "queue": queue_dict(q)}

    @router.post(
        "/api/queues/{name}/resume",
        dependencies=write,
        tags=["queues"],
        responses={400: {"description": "Invalid queue name"}},
    )
    async def resume(name: QueueName) -> dict[str, Any]:
        """Fetch this queue's jobs again."""
        async with conveyor.audit.change("queue.resume", "queue", name):
            q = await conveyor.store.set_queue(name, conveyor.now(), paused=False)
        conveyor.notify_listeners()
        return {"success": True, "queue": queue_dict(q)}

    @router.patch(
        "/api/queues/{name}",
        dependencies=write,
        tags=["queues"],
        responses={400: {"description": "Invalid change"}},
    )
    async def change(name: QueueName, body: QueueChange) -> dict[str, Any]:
        """Pause/resume and set (or, with ``null``, remove) the queue's concurrency
        limit: the most of its jobs running at once across all workers."""
        sent = body.model_fields_set
        if not sent:
            raise ValidationError(
                "Nothing to change: give paused and/or concurrency_limit",
                [FieldError("body", "give paused and/or concurrency_limit")],
            )
        limit = body.concurrency_limit if "concurrency_limit" in sent else KEEP_LIMIT
        if "concurrency_limit" in sent and limit is not None:
            check_concurrency_limit(limit)  # -1 would mean "keep" to the store
        summary = {
            "paused": body.paused,
            "concurrency_limit": limit if limit != KEEP_LIMIT else "keep",
        }
        async with conveyor.audit.change("queue.change", "queue", name, summary):
            q = await conveyor.store.set_queue(
                name, conveyor.now(), paused=body.paused, concurrency_limit=limit
            )
        conveyor.notify_listeners()
        return {"success": True, "queue": queue_dict(q)}

    return router
