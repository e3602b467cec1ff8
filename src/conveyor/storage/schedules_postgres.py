"""The schedule methods of the PostgreSQL Store (a mixin of ``PostgresStore``).

Firing is one transaction: a compare-and-set ``UPDATE`` on ``next_fire_at``
(a second scheduler waits for the first one's row lock, then finds the value
changed and updates nothing), the unique ``schedule_fires`` row, the job with
its ``job_submitted`` event and NOTIFY, and the ``schedule_fired`` event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from conveyor.domain.errors import StoreError
from conveyor.domain.ids import new_job_id
from conveyor.domain.job import Job, NewJob, validate_batch
from conveyor.domain.schedules import (
    SCHEDULE_FIRED,
    Schedule,
    ScheduleNameTaken,
    ScheduleNotFound,
    validate_schedule,
)
from conveyor.storage.base import OVERLAP_STATES, schedule_fired_event
from conveyor.storage.codec import dumps_object
from conveyor.storage.sql import load_queries

if TYPE_CHECKING:
    import asyncpg

S = load_queries("postgres", "schedules.sql")


def schedule_from_record(r: Any) -> Schedule:
    return Schedule(
        id=r["id"],
        name=r["name"],
        cron=r["cron"],
        timezone=r["timezone"],
        job_type=r["job_type"],
        payload=r["payload"],
        queue=r["queue"],
        priority=r["priority"],
        max_retries=r["max_retries"],
        timeout_ms=r["timeout_ms"],
        misfire=r["misfire"],
        catch_up_max=r["catch_up_max"],
        jitter=r["jitter"],
        overlap=r["overlap"],
        state=r["state"],
        source=r["source"],
        next_fire_at=r["next_fire_at"],
        last_fired_at=r["last_fired_at"],
        last_job_id=r["last_job_id"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def _args(s: Schedule, now: datetime) -> tuple[Any, ...]:
    return (
        s.id,
        s.name,
        s.cron,
        s.timezone,
        s.job_type,
        dumps_object(s.payload),
        s.queue,
        s.priority,
        s.max_retries,
        s.timeout_ms,
        s.misfire,
        s.catch_up_max,
        float(s.jitter),
        s.overlap,
        s.state,
        s.source,
        s.next_fire_at,
        now,
    )


def _name_taken(exc: StoreError) -> bool:
    import asyncpg

    return isinstance(exc.__cause__, asyncpg.UniqueViolationError)


class PostgresSchedules:
    """Needs the host store's ``_conn``."""

    if TYPE_CHECKING:

        def _conn(
            self, tx: bool = False
        ) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]: ...

    async def create_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        args = _args(schedule, now)
        async with self._conn() as conn:
            row = await conn.fetchrow(S["insert_schedule"], *args)
        if row is None:
            raise ScheduleNameTaken(schedule.name)
        return schedule_from_record(row)

    async def get_schedule(self, schedule_id: str) -> Schedule:
        async with self._conn() as conn:
            row = await conn.fetchrow(S["schedule_by_id"], schedule_id)
        if row is None:
            raise ScheduleNotFound(schedule_id)
        return schedule_from_record(row)

    async def list_schedules(self) -> list[Schedule]:
        async with self._conn() as conn:
            return [schedule_from_record(r) for r in await conn.fetch(S["list_schedules"])]

    async def update_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        args = _args(schedule, now)
        try:
            async with self._conn() as conn:
                row = await conn.fetchrow(S["update_schedule"], *args)
        except StoreError as exc:
            if _name_taken(exc):
                raise ScheduleNameTaken(schedule.name) from None
            raise
        if row is None:
            raise ScheduleNotFound(schedule.id)
        return schedule_from_record(row)

    async def delete_schedule(self, schedule_id: str) -> None:
        async with self._conn() as conn:
            row = await conn.fetchrow(S["delete_schedule"], schedule_id)
        if row is None:
            raise ScheduleNotFound(schedule_id)

    async def due_schedules(self, until: datetime, limit: int) -> list[Schedule]:
        async with self._conn() as conn:
            rows = await conn.fetch(S["due_schedules"], until, max(0, limit))
        return [schedule_from_record(r) for r in rows]

    async def advance_schedule(
        self, schedule_id: str, expected: datetime, next_fire_at: datetime | None, now: datetime
    ) -> bool:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                S["advance_schedule"], schedule_id, expected, next_fire_at, now
            )
        return row is not None

    async def fire_schedule(
        self,
        schedule_id: str,
        fire_at: datetime,
        job: NewJob,
        next_fire_at: datetime | None,
        now: datetime,
    ) -> Job | None:
        from conveyor.storage import postgres as adapter  # the adapter imports this module

        validate_batch([job])
        payload = dumps_object(job.payload)
        meta = dumps_object(job.metadata, "metadata")
        created = adapter._new_job(
            job, new_job_id(), "pending", None, job.run_at or now, payload, meta, now
        )
        async with self._fire_tx() as conn:
            row = await conn.fetchrow(
                S["advance_schedule"], schedule_id, fire_at, next_fire_at, now
            )
            if row is None:
                return None  # not due at fire_at any more: another scheduler fired it
            if await conn.fetchrow(S["insert_fire"], schedule_id, fire_at, now) is None:
                return None  # fired already (next_fire_at was set back)
            last = row["last_job_id"]
            if row["overlap"] == "skip_if_running" and last is not None:
                state = await conn.fetchval(S["job_state"], last)
                if state in OVERLAP_STATES:
                    return None  # recorded as skipped: the previous run is not done
            await conn.fetch(
                adapter.Q["insert_job"], *adapter._insert_job_args(created, payload, meta)
            )
            await conn.execute(S["link_job"], schedule_id, created.id)
            await conn.execute(S["fire_done"], created.id, schedule_id, fire_at)
            await conn.execute(S["schedule_fired"], fire_at, created.id, schedule_id)
            created.schedule_id = schedule_id
            await conn.execute(
                S["insert_schedule_event"],
                SCHEDULE_FIRED,
                created.id,
                orjson.dumps(schedule_fired_event(row, fire_at, created)).decode(),
                now,
            )
            return created

    async def prune_schedule_fires(self, older_than: datetime) -> int:
        async with self._conn() as conn:
            status = await conn.execute(S["prune_fires"], older_than)
        return int(status.split()[-1])

    @contextlib.asynccontextmanager
    async def _fire_tx(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._conn(tx=True) as conn:
            yield conn
