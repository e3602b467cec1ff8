"""``GET /api/locks``: the distributed locks and leader leases (read-only, admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from conveyor.api.http import Auth
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope


def lock_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    admin = [Depends(auth.require(KeyScope.ADMIN))]

    @router.get("/api/locks", dependencies=admin, tags=["locks"])
    async def list_locks(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        include_free: Annotated[
            bool, Query(description="Also released and expired keys, with their last token")
        ] = False,
    ) -> dict[str, Any]:
        """The held locks and leader leases in key order (admin): key, owner, fencing
        token, acquired_at, expires_at, held. Read-only: locks are taken and freed
        from code (``app.lock``), never over HTTP."""
        rows = await conveyor.list_locks(limit=limit, include_free=include_free)
        return {"success": True, "locks": [r.to_dict() for r in rows]}

    return router
