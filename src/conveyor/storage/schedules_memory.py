"""The schedule methods of the in-memory Store (a mixin of ``MemoryStore``)."""

from __future__ import annotations

import asyncio
import copy
import itertools
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.domain.ids import new_job_id
from conveyor.domain.job import Event, Job, NewJob, validate_batch
from conveyor.domain.schedules import (
    SCHEDULE_FIRED,
    Schedule,
    ScheduleNameTaken,
    ScheduleNotFound,
    validate_schedule,
)
from conveyor.domain.states import EventType, JobState
from conveyor.storage.base import OVERLAP_STATES, schedule_fired_event
from conveyor.storage.codec import roundtrip


@dataclass
class _Tables:
    schedules: dict[str, Schedule] = field(default_factory=dict)
    #: (schedule_id, fire_at) -> the job submitted (None: skipped for overlap)
    fires: dict[tuple[str, datetime], str | None] = field(default_factory=dict)


class MemorySchedules:
    """Needs the host store's ``_lock``, ``_jobs``, ``_seq``, ``_counter``, ``_events``,
    ``_event_ids`` and ``_emit``."""

    _lock: asyncio.Lock
    _jobs: dict[str, Job]
    _seq: dict[str, int]
    _counter: itertools.count[int]

    _events: list[Event]
    _event_ids: itertools.count[int]

    if TYPE_CHECKING:

        def _emit(self, type_: str, job: Job | None, now: datetime, **data: Any) -> None: ...

    @property
    def _tables(self) -> _Tables:
        tables: _Tables | None = self.__dict__.get("_schedule_tables")
        if tables is None:
            tables = self.__dict__["_schedule_tables"] = _Tables()
        return tables

    def _schedule(self, schedule_id: str) -> Schedule:
        found = self._tables.schedules.get(schedule_id) if isinstance(schedule_id, str) else None
        if found is None:
            raise ScheduleNotFound(str(schedule_id))
        return found

    def _name_free(self, name: str, schedule_id: str) -> None:
        for s in self._tables.schedules.values():
            if s.name == name and s.id != schedule_id:
                raise ScheduleNameTaken(name)

    async def create_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        payload = roundtrip(dict(schedule.payload))
        async with self._lock:
            self._name_free(schedule.name, "")
            if schedule.id in self._tables.schedules:
                raise ScheduleNameTaken(schedule.name)
            stored = schedule.with_(
                payload=payload,
                created_at=now,
                updated_at=now,
                last_fired_at=None,
                last_job_id=None,
            )
            self._tables.schedules[stored.id] = stored
            return stored

    async def get_schedule(self, schedule_id: str) -> Schedule:
        return self._schedule(schedule_id)

    async def list_schedules(self) -> list[Schedule]:
        return sorted(self._tables.schedules.values(), key=lambda s: s.name)

    async def update_schedule(self, schedule: Schedule, now: datetime) -> Schedule:
        validate_schedule(schedule)
        payload = roundtrip(dict(schedule.payload))
        async with self._lock:
            old = self._schedule(schedule.id)
            self._name_free(schedule.name, schedule.id)
            stored = schedule.with_(
                payload=payload,
                created_at=old.created_at,
                updated_at=now,
                last_fired_at=old.last_fired_at,
                last_job_id=old.last_job_id,
            )
            self._tables.schedules[stored.id] = stored
            return stored

    async def delete_schedule(self, schedule_id: str) -> None:
        async with self._lock:
            self._schedule(schedule_id)
            del self._tables.schedules[schedule_id]
            for key in [k for k in self._tables.fires if k[0] == schedule_id]:
                del self._tables.fires[key]

    async def due_schedules(self, until: datetime, limit: int) -> list[Schedule]:
        due = [
            s
            for s in self._tables.schedules.values()
            if s.state == "active" and s.next_fire_at is not None and s.next_fire_at <= until
        ]
        due.sort(key=lambda s: (s.next_fire_at, s.id))
        return due[: max(0, limit)]

    async def advance_schedule(
        self, schedule_id: str, expected: datetime, next_fire_at: datetime | None, now: datetime
    ) -> bool:
        async with self._lock:
            s = self._tables.schedules.get(schedule_id)
            if s is None or s.state != "active" or s.next_fire_at != expected:
                return False
            self._tables.schedules[schedule_id] = s.with_(next_fire_at=next_fire_at, updated_at=now)
            return True

    async def fire_schedule(
        self,
        schedule_id: str,
        fire_at: datetime,
        job: NewJob,
        next_fire_at: datetime | None,
        now: datetime,
    ) -> Job | None:
        validate_batch([job])
        payload = roundtrip(dict(job.payload))
        metadata = roundtrip(dict(job.metadata), "metadata")
        async with self._lock:
            s = self._tables.schedules.get(schedule_id)
            if s is None or s.state != "active" or s.next_fire_at != fire_at:
                return None
            moved = s.with_(next_fire_at=next_fire_at, updated_at=now)
            self._tables.schedules[schedule_id] = moved
            key = (schedule_id, fire_at)
            if key in self._tables.fires:
                return None
            previous = self._jobs.get(s.last_job_id) if s.last_job_id else None
            if (
                s.overlap == "skip_if_running"
                and previous is not None
                and previous.state.value in OVERLAP_STATES
            ):
                self._tables.fires[key] = None
                return None
            created = Job(
                id=new_job_id(),
                job_type=job.job_type,
                state=JobState.PENDING,
                payload=payload,
                queue=job.queue,
                priority=job.priority,
                max_retries=job.max_retries,
                timeout_ms=job.timeout_ms,
                run_at=job.run_at or now,
                created_by=job.created_by,
                metadata=metadata,
                created_at=now,
                updated_at=now,
                schedule_id=schedule_id,
            )
            self._jobs[created.id] = created
            self._seq[created.id] = next(self._counter)
            self._emit(EventType.JOB_SUBMITTED.value, created, now, priority=created.priority)
            self._tables.fires[key] = created.id
            self._tables.schedules[schedule_id] = moved.with_(
                last_fired_at=fire_at, last_job_id=created.id
            )
            data = schedule_fired_event(s, fire_at, created)
            self._events.append(Event(next(self._event_ids), SCHEDULE_FIRED, created.id, data, now))
            return copy.deepcopy(created)

    async def prune_schedule_fires(self, older_than: datetime) -> int:
        async with self._lock:
            old = [k for k in self._tables.fires if k[1] < older_than]
            for key in old:
                del self._tables.fires[key]
            return len(old)
