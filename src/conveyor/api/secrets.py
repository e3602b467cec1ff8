"""``/api/secrets``: the vault over REST, for admin keys. Values are write-only:
``POST``/``PUT`` set one, ``GET`` lists names, versions and dates, ``DELETE``
removes a secret. No route ever answers with a value."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from conveyor.api.http import JSON, ApiError, Auth
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import ConfigurationError
from conveyor.domain.secrets import MAX_SECRET_BYTES, SecretVersion
from conveyor.security.vault import StoreSecrets

NOT_CONFIGURED = (
    "The secrets vault is not configured on this server: set CONVEYOR_MASTER_KEY or "
    "CONVEYOR_MASTER_KEY_FILE (docs/security.md)"
)
NameParam = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]


class SecretValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: StrictStr = Field(min_length=1, max_length=MAX_SECRET_BYTES)


class SecretCreate(SecretValue):
    name: StrictStr = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")


def _stored(row: SecretVersion) -> dict[str, Any]:
    return {"name": row.name, "version": row.version, "created_at": row.created_at.isoformat()}


def secrets_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    admin = [Depends(auth.require(KeyScope.ADMIN))]
    missing: dict[int | str, dict[str, Any]] = {404: {"description": "No such secret"}}

    def vault() -> StoreSecrets:
        try:
            return conveyor.secrets
        except ConfigurationError:
            raise ApiError(503, NOT_CONFIGURED) from None

    async def put(name: str, value: str) -> dict[str, Any]:
        v = vault()
        try:
            async with conveyor.audit.change("secret.set", "secret", name):
                row = await v.set(name, value)
        except ConfigurationError:
            raise ApiError(503, NOT_CONFIGURED) from None
        return _stored(row)

    @router.get("/api/secrets", dependencies=admin, tags=["secrets"])
    async def list_secrets() -> dict[str, Any]:
        """Every secret (admin): name, newest version, versions kept, created_at,
        updated_at. Never a value."""
        return {"success": True, "secrets": [i.to_dict() for i in await vault().list()]}

    @router.post("/api/secrets", status_code=201, dependencies=admin, tags=["secrets"])
    async def create_secret(body: SecretCreate) -> Response:
        """Store a value as the next version of ``name`` (1 for a new name). The
        answer names the version, never the value. 503 without a master key."""
        stored = await put(body.name, body.value)
        return JSON({"success": True, "secret": stored}, status_code=201)

    @router.put("/api/secrets/{name}", dependencies=admin, tags=["secrets"])
    async def set_secret(name: NameParam, body: SecretValue) -> dict[str, Any]:
        """Store a value as the next version of ``name`` (rotation)."""
        return {"success": True, "secret": await put(name, body.value)}

    @router.delete("/api/secrets/{name}", dependencies=admin, tags=["secrets"], responses=missing)
    async def delete_secret(name: NameParam) -> dict[str, Any]:
        """Delete every version of ``name``."""
        v = vault()
        async with conveyor.audit.change("secret.delete", "secret", name):
            await v.delete(name)
        return {"success": True, "deleted": name}

    return router
