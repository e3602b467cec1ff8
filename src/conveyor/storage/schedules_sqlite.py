"""The schedule methods of the SQLite Store (a mixin of ``SQLiteStore``).

Firing takes SQLite's one write lock (``BEGIN IMMEDIATE``) for the whole
compare-and-set, fire record, job and events, so two processes firing the
same instant queue up and the second finds it fired.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from conveyor.domain.job import Job, NewJob, validate_batch
from conveyor.domain.schedules import (
    SCHEDULE_FIRED,
    Schedule,
    ScheduleNameTaken,
    ScheduleNotFound,
    validate_schedule,
)
from conveyor.domain.states import JobState
from conveyor.storage.base import OVERLAP_STATES, schedule_fired_event
from conveyor.storage.codec import dumps_object
from conveyor.storage.sql import load_queries

T = TypeVar("T")
S = load_queries("sqlite", "schedules.sql")


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def schedule_from_row(row: sqlite3.Row) -> Schedule:
    return Schedule(
        id=row["id"],
        name=row["name"],
        cron=row["cron"],
        timezone=row["timezone"],
        job_type=row["job_type"],
        payload=orjson.loads(row["payload"]),
        queue=row["queue"],
        priority=row["priority"],
        max_retries=row["max_retries"],
        timeout_ms=row["timeout_ms"],
        misfire=row["misfire"],
        catch_up_max=row["catch_up_max"],
        jitter=row["jitter"],
        overlap=row["overlap"],
        state=row["state"],
        source=row["source"],
        next_fire_at=_dt(row["next_fire_at"]),
        last_fired_at=_dt(row["last_fired_at"]),
        last_job_id=row["last_job_id"],
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
    )


def _params(s: Schedule, now: datetime) -> dict[str, Any]:
    return {
        "id": s.id,
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "job_type": s.job_type,
        "payload": dumps_object(s.payload),
        "queue": s.queue,
        "priority": s.priority,
        "max_retries": s.max_retries,
        "timeout_ms": s.timeout_ms,
        "misfire": s.misfire,
        "catch_up_max": s.catch_up_max,
        "jitter": float(s.jitter),
        "overlap": s.overlap,
        "state": s.state,
        "source": s.source,
        "next_fire_at": _ts(s.next_fire_at),
        "now": now.timestamp(),
    }


class SQLiteSchedules:
    """Needs the host store's ``_run``, ``_tx`` and ``_conn``."""

    _conn: sqlite3.Connection | None

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

        def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

    def _read(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def create_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        params = _params(schedule, now)

        def _do() -> Schedule:
            with self._tx() as conn:
                if conn.execute(S["schedule_id_by_name"], (schedule.name,)).fetchone():
                    raise ScheduleNameTaken(schedule.name)
                conn.execute(S["insert_schedule"], params)
                return schedule_from_row(
                    conn.execute(S["schedule_by_id"], (schedule.id,)).fetchone()
                )

        return await self._run(_do)

    async def get_schedule(self, schedule_id: str) -> Schedule:
        def _do() -> Schedule:
            row = self._read().execute(S["schedule_by_id"], (schedule_id,)).fetchone()
            if row is None:
                raise ScheduleNotFound(schedule_id)
            return schedule_from_row(row)

        return await self._run(_do)

    async def list_schedules(self) -> list[Schedule]:
        def _do() -> list[Schedule]:
            return [schedule_from_row(r) for r in self._read().execute(S["list_schedules"])]

        return await self._run(_do)

    async def update_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        params = _params(schedule, now)

        def _do() -> Schedule:
            with self._tx() as conn:
                if conn.execute(S["schedule_by_id"], (schedule.id,)).fetchone() is None:
                    raise ScheduleNotFound(schedule.id)
                holder = conn.execute(S["schedule_id_by_name"], (schedule.name,)).fetchone()
                if holder is not None and holder[0] != schedule.id:
                    raise ScheduleNameTaken(schedule.name)
                conn.execute(S["update_schedule"], params)
                return schedule_from_row(
                    conn.execute(S["schedule_by_id"], (schedule.id,)).fetchone()
                )

        return await self._run(_do)

    async def delete_schedule(self, schedule_id: str) -> None:
        def _do() -> None:
            with self._tx() as conn:
                if conn.execute(S["delete_schedule"], (schedule_id,)).rowcount == 0:
                    raise ScheduleNotFound(schedule_id)
                conn.execute(S["delete_schedule_fires"], (schedule_id,))

        await self._run(_do)

    async def due_schedules(self, until: datetime, limit: int) -> list[Schedule]:
        params = (until.timestamp(), max(0, limit))

        def _do() -> list[Schedule]:
            return [schedule_from_row(r) for r in self._read().execute(S["due_schedules"], params)]

        return await self._run(_do)

    async def advance_schedule(
        self, schedule_id: str, expected: datetime, next_fire_at: datetime | None, now: datetime
    ) -> bool:
        params = {
            "id": schedule_id,
            "expected": expected.timestamp(),
            "next": _ts(next_fire_at),
            "now": now.timestamp(),
        }

        def _do() -> bool:
            with self._tx() as conn:
                return conn.execute(S["advance_schedule"], params).fetchone() is not None

        return await self._run(_do)

    async def fire_schedule(
        self,
        schedule_id: str,
        fire_at: datetime,
        job: NewJob,
        next_fire_at: datetime | None,
        now: datetime,
    ) -> Job | None:
        validate_batch([job])
        fire_ts = fire_at.timestamp()
        cas = {
            "id": schedule_id,
            "expected": fire_ts,
            "next": _ts(next_fire_at),
            "now": now.timestamp(),
        }

        def _do() -> Job | None:
            with self._tx() as conn:
                row = conn.execute(S["advance_schedule"], cas).fetchone()
                if row is None:
                    return None  # not due at fire_at any more: another scheduler fired it
                if conn.execute(S["insert_fire"], (schedule_id, fire_ts, cas["now"])).rowcount == 0:
                    return None  # fired already (next_fire_at was set back)
                last = row["last_job_id"]
                if row["overlap"] == "skip_if_running" and last is not None:
                    state = conn.execute(S["job_state"], (last,)).fetchone()
                    if state is not None and state[0] in OVERLAP_STATES:
                        return None  # recorded as skipped: the previous run is not done
                created = _insert_job(conn, job, now)
                conn.execute(S["link_job"], (schedule_id, created.id))
                conn.execute(S["fire_done"], (created.id, schedule_id, fire_ts))
                conn.execute(S["schedule_fired"], (fire_ts, created.id, schedule_id))
                created.schedule_id = schedule_id
                conn.execute(
                    S["insert_event"],
                    (
                        SCHEDULE_FIRED,
                        created.id,
                        orjson.dumps(schedule_fired_event(row, fire_at, created)),
                        cas["now"],
                    ),
                )
                assert created.state is JobState.PENDING
                return created

        return await self._run(_do)

    async def prune_schedule_fires(self, older_than: datetime) -> int:
        def _do() -> int:
            with self._tx() as conn:
                return conn.execute(S["prune_fires"], (older_than.timestamp(),)).rowcount

        return await self._run(_do)


def _insert_job(conn: sqlite3.Connection, job: NewJob, now: datetime) -> Job:
    """Insert one pending job and its ``job_submitted`` event, as ``enqueue_many``
    does (its statements, so the two never drift apart)."""
    from conveyor.storage import sqlite as adapter  # the adapter imports this module

    row = adapter._job_params(job, now)
    last_seq = conn.execute(adapter.Q["max_seq"]).fetchone()[0]
    conn.execute(adapter.Q["insert_job"], row)
    conn.execute(adapter.Q["insert_submitted_events"], (now.timestamp(), last_seq))
    return adapter._job_from_params(row, job, now)
