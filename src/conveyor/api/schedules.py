"""Cron schedules over HTTP: ``/api/schedules`` (docs/api.md, docs/schedules.md).
``create_app`` includes ``schedule_router``.

Scopes as for jobs: reading needs ``read``; creating, changing, pausing,
resuming and deleting need ``write``. Every answer carries ``success``; a bad
expression, zone, payload or policy is a 400 naming each field in
``details``, and stores nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr

from conveyor.api.http import JSON, Auth
from conveyor.api.models import NAME_PATTERN
from conveyor.app import Conveyor
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.job import MAX_RETRIES_LIMIT, MAX_TIMEOUT_MS
from conveyor.domain.schedules import (
    MAX_CATCH_UP,
    MAX_CRON_LENGTH,
    MAX_JITTER,
    MAX_ZONE_LENGTH,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
)
from conveyor.presenters import schedule_dict
from conveyor.scheduling import (
    create_schedule,
    pause_schedule,
    resume_schedule,
    update_schedule,
)

#: How many upcoming fire times ``GET /api/schedules/{id}`` lists.
UPCOMING = 5

_Cron = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=MAX_CRON_LENGTH,
        examples=["*/5 * * * *"],
        description=(
            "5 fields (minute hour day-of-month month day-of-week), 6 with a seconds "
            "field first, or a macro: @yearly @annually @monthly @weekly @daily @midnight "
            "@hourly."
        ),
    ),
]
_Zone = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=MAX_ZONE_LENGTH,
        examples=["Europe/Berlin"],
        description="IANA time zone the expression is read in (DST rules: docs/schedules.md).",
    ),
]


def _json_integer(value: Any) -> Any:
    # JSON Schema's "integer" admits 97.0 but not "97" or true (as for jobs).
    if isinstance(value, str | bool):
        raise ValueError("must be an integer")
    return value


def _ranged(low: int, high: int) -> Any:
    """A JSON integer from ``low`` to ``high`` (bounds first, so that the OpenAPI
    schema shows them)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_json_integer)]


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payload: dict[str, Any] | None = Field(None, examples=[{"report": "daily"}])
    queue: StrictStr | None = Field(None, pattern=NAME_PATTERN)
    priority: _ranged(0, 100) | None = None  # type: ignore[valid-type]
    max_retries: _ranged(0, MAX_RETRIES_LIMIT) | None = None  # type: ignore[valid-type]
    timeout_ms: _ranged(1, MAX_TIMEOUT_MS) | None = None  # type: ignore[valid-type]
    misfire: StrictStr | None = Field(
        None,
        json_schema_extra={"enum": list(MISFIRE_POLICIES)},
        description="skip (default): missed fire times are dropped; catch_up: the latest "
        "catch_up_max of them fire.",
    )
    catch_up_max: _ranged(1, MAX_CATCH_UP) | None = None  # type: ignore[valid-type]
    jitter: Annotated[float, Field(strict=True, ge=0, le=MAX_JITTER)] | None = Field(
        None, description="Seconds: each job runs up to this much later."
    )
    overlap: StrictStr | None = Field(
        None,
        json_schema_extra={"enum": list(OVERLAP_POLICIES)},
        description="allow (default), or skip_if_running: skip a fire time while the "
        "previous job of this schedule is pending or running.",
    )


class ScheduleCreate(_Fields):
    """``POST /api/schedules``."""

    name: StrictStr = Field(pattern=NAME_PATTERN, examples=["nightly-report"])
    cron: _Cron
    job_type: StrictStr = Field(pattern=NAME_PATTERN, examples=["test_job"])
    timezone: _Zone = "UTC"


class ScheduleChange(_Fields):
    """``PATCH /api/schedules/{id}``: only the fields given change."""

    name: StrictStr | None = Field(None, pattern=NAME_PATTERN)
    cron: _Cron | None = None
    job_type: StrictStr | None = Field(None, pattern=NAME_PATTERN)
    timezone: _Zone | None = None


def schedule_router(conveyor: Conveyor, auth: Auth) -> APIRouter:
    router = APIRouter()
    read = [Depends(auth.require(KeyScope.READ))]
    write = [Depends(auth.require(KeyScope.WRITE))]
    missing: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown schedule"}}

    def view(schedule: Any, *, upcoming: bool = False) -> dict[str, Any]:
        times = None
        if upcoming:
            times = (
                schedule.spec().upcoming(conveyor.now(), UPCOMING)
                if schedule.state == "active"
                else []
            )
        return schedule_dict(schedule, times)

    @router.post(
        "/api/schedules",
        status_code=201,
        dependencies=write,
        tags=["schedules"],
        responses={400: {"description": "Invalid schedule (nothing stored)"}},
    )
    async def create(body: ScheduleCreate) -> Response:
        """Create a schedule; it fires from its next fire time after now."""
        given = body.model_dump(exclude_none=True)
        schedule = await create_schedule(conveyor, **given)
        summary = {"name": schedule.name, "job_type": schedule.job_type}
        await conveyor.audit.record("schedule.create", "schedule", schedule.id, summary)
        return JSON({"success": True, "schedule": view(schedule, upcoming=True)}, status_code=201)

    @router.get("/api/schedules", dependencies=read, tags=["schedules"])
    async def list_all() -> dict[str, Any]:
        """Every schedule, by name."""
        schedules = await conveyor.store.list_schedules()
        return {"success": True, "schedules": [view(s) for s in schedules]}

    @router.get(
        "/api/schedules/{schedule_id}", dependencies=read, tags=["schedules"], responses=missing
    )
    async def get_one(schedule_id: str) -> dict[str, Any]:
        """One schedule with its next 5 fire times (none while paused or disabled)."""
        schedule = await conveyor.store.get_schedule(schedule_id)
        return {"success": True, "schedule": view(schedule, upcoming=True)}

    @router.patch(
        "/api/schedules/{schedule_id}",
        dependencies=write,
        tags=["schedules"],
        responses={**missing, 400: {"description": "Invalid change (nothing changed)"}},
    )
    async def change(schedule_id: str, body: ScheduleChange) -> dict[str, Any]:
        """Change some fields (null or absent: unchanged); a new expression or zone
        counts from now."""
        changes = body.model_dump(exclude_unset=True, exclude_none=True)
        async with conveyor.audit.change(
            "schedule.update", "schedule", schedule_id, {"fields": sorted(changes)}
        ):
            schedule = await update_schedule(conveyor, schedule_id, changes)
        return {"success": True, "schedule": view(schedule, upcoming=True)}

    @router.delete(
        "/api/schedules/{schedule_id}", dependencies=write, tags=["schedules"], responses=missing
    )
    async def delete(schedule_id: str) -> dict[str, Any]:
        """Delete a schedule (the jobs it submitted stay). A schedule declared in
        code comes back when a scheduler with that code starts: pause it instead."""
        async with conveyor.audit.change("schedule.delete", "schedule", schedule_id):
            await conveyor.store.delete_schedule(schedule_id)
        return {"success": True, "deleted": schedule_id}

    @router.post(
        "/api/schedules/{schedule_id}/pause",
        dependencies=write,
        tags=["schedules"],
        responses=missing,
    )
    async def pause(schedule_id: str) -> dict[str, Any]:
        """Stop firing (idempotent); fire times passed while paused never fire."""
        async with conveyor.audit.change("schedule.pause", "schedule", schedule_id):
            schedule = await pause_schedule(conveyor, schedule_id)
        return {"success": True, "schedule": view(schedule)}

    @router.post(
        "/api/schedules/{schedule_id}/resume",
        dependencies=write,
        tags=["schedules"],
        responses=missing,
    )
    async def resume(schedule_id: str) -> dict[str, Any]:
        """Fire again from the next fire time after now (idempotent)."""
        async with conveyor.audit.change("schedule.resume", "schedule", schedule_id):
            schedule = await resume_schedule(conveyor, schedule_id)
        return {"success": True, "schedule": view(schedule, upcoming=True)}

    return router
