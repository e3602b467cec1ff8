"""The scheduler loop: fires due cron schedules through the store.

Any number of processes may run one (``conveyor up`` does, ``conveyor
scheduler`` runs one alone): ``Store.fire_schedule`` fires each instant in one
transaction with a compare-and-set on the schedule's ``next_fire_at`` and a
unique ``(schedule, instant)`` record, so an instant fires once however many
schedulers see it due. The loop sleeps until the next due fire time, at most
``interval`` seconds, so new and changed schedules are seen within that long.

It takes its parts explicitly (store, clock, randomness, callbacks); it knows
nothing of the app object.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta

import structlog

from conveyor.domain.errors import ConveyorError, StoreUnavailable, ValidationError
from conveyor.domain.ids import new_job_id
from conveyor.domain.schedules import (
    Schedule,
    ScheduleNameTaken,
    job_for_fire,
    plan_fires,
)
from conveyor.runtime.observe import ScheduleFired
from conveyor.runtime.ports import Signals
from conveyor.storage.base import Store

log = structlog.get_logger("conveyor.scheduler")
#: Due schedules handled per pass.
BATCH = 100
MAX_UNREADABLE_SKIPPED = 10_000  #: unreadable due schedules a pass reads past
#: Seconds between deletions of old fire records (``keep_fires``).
PRUNE_EVERY = 600.0
#: Seconds between two ``schedule_invalid`` errors for one stored schedule this
#: process can't read (a zone its host lacks, an expression of other rules).
INVALID_LOG_EVERY = 60.0


async def sync_declared(
    store: Store,
    declared: Sequence[Schedule],
    now: datetime,
    *,
    owned_job_types: Collection[str] = (),
) -> list[Schedule]:
    """Upsert the schedules declared in code (``@app.cron``, ``app.schedule``).

    A new name is created; a changed one is updated (its next fire time is kept
    unless its expression or zone changed); one an operator paused stays paused;
    a disabled one is active again. A code-declared schedule missing from
    ``declared`` whose job type is in ``owned_job_types`` (this process has its
    handler, so it would have declared it) is disabled. Returns the schedules as
    stored. Safe to run from several processes at once."""
    names = {d.name for d in declared}
    stored = {s.name: s for s in await store.list_schedules()}
    out: list[Schedule] = []
    for d in declared:
        old = stored.get(d.name)
        if old is None:
            fresh = d.with_(
                id=new_job_id(), source="code", state="active", next_fire_at=_first(d, now)
            )
            try:
                out.append(await store.create_schedule(fresh, now))
                continue
            except ScheduleNameTaken:  # another process created it a moment ago
                old = next(s for s in await store.list_schedules() if s.name == d.name)
        same_time = old.cron == d.cron and old.timezone == d.timezone
        state = "paused" if old.state == "paused" else "active"
        next_fire_at = (
            old.next_fire_at
            if same_time and old.state == "active" and old.next_fire_at is not None
            else _first(d, now)
        )
        wanted = d.with_(id=old.id, source="code", state=state, next_fire_at=next_fire_at)
        if (
            old.same_definition(wanted)
            and old.state == wanted.state
            and old.source == "code"
            and old.next_fire_at == wanted.next_fire_at
        ):
            out.append(old)
        else:
            out.append(await store.update_schedule(wanted, now))
    for old in stored.values():
        if (
            old.source == "code"
            and old.name not in names
            and old.job_type in owned_job_types
            and old.state != "disabled"
        ):
            await store.update_schedule(old.with_(state="disabled"), now)
            log.info("schedule_disabled", schedule=old.name, reason="no longer declared in code")
    return out


def _first(schedule: Schedule, now: datetime) -> datetime | None:
    return schedule.spec().next_after(now)


class Scheduler:
    """Fires due schedules until stopped.

    ``clock``: aware UTC now; ``rand``: 0-1 for jitter; ``grace``: seconds a fire
    time may be late and still be on time (see ``plan_fires``); ``interval``:
    longest sleep; ``on_fired``: called (cheap, sync) after jobs were submitted,
    so this process's workers and outbox readers look at once; ``keep_fires``:
    seconds fire records are kept (deleted every ``PRUNE_EVERY`` seconds).
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime],
        rand: Callable[[], float] = random.random,
        grace: float = 60.0,
        interval: float = 1.0,
        on_fired: Callable[[], None] | None = None,
        declared: Sequence[Schedule] = (),
        owned_job_types: Collection[str] = (),
        keep_fires: float = 7 * 86_400.0,
        signals: Signals | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.rand = rand
        self.grace = grace
        self.interval = interval
        self.on_fired = on_fired
        self.declared = list(declared)
        self.owned_job_types = set(owned_job_types)
        self.fired = 0  # jobs this scheduler submitted
        self.keep_fires = keep_fires
        self.signals = signals  # metrics: schedule fires, misfires, refusals
        self._pruned_at = -PRUNE_EVERY  # monotonic seconds: prune at the first pass
        self._stop = asyncio.Event()
        # Stored schedules this process can't read (id -> updated_at, when it last
        # said so). They stay due, so the sleep must not count them.
        self._unreadable: dict[str, tuple[datetime | None, float]] = {}

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Sync the declared schedules, then fire due ones until ``request_stop``."""
        while not self._stop.is_set():
            try:
                await sync_declared(
                    self.store, self.declared, self.clock(), owned_job_types=self.owned_job_types
                )
                break
            except StoreUnavailable as exc:
                log.warning("scheduler_sync_failed", error=str(exc))
                await self._sleep(self.interval)
        while not self._stop.is_set():
            try:
                delay = await self.tick()
            except StoreUnavailable as exc:
                log.warning("scheduler_store_unavailable", error=str(exc))
                delay = self.interval
            except ConveyorError as exc:
                log.error("scheduler_pass_failed", error=str(exc))
                delay = self.interval
            except Exception:  # one bad pass must not stop `conveyor up`
                log.exception("scheduler_pass_crashed")
                delay = self.interval
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, seconds))

    async def tick(self) -> float:
        """One pass: fire every due schedule; returns seconds until the next pass
        (the next due fire time, at most ``interval``)."""
        now = self.clock()
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            await self.store.prune_schedule_fires(now - timedelta(seconds=self.keep_fires))
        fired = 0
        # Schedules this host can't read stay due (another host may): fetch past them,
        # or a hundred of them would hide every readable one for good.
        hidden = min(len(self._unreadable), MAX_UNREADABLE_SKIPPED)
        for schedule in await self.store.due_schedules(now, BATCH + hidden):
            fired += await self.fire_due(schedule, now)
        if fired and self.on_fired is not None:
            self.on_fired()
        now = self.clock()
        horizon = now + timedelta(seconds=self.interval)
        upcoming = [
            s
            for s in await self.store.due_schedules(horizon, len(self._unreadable) + 1)
            if s.id not in self._unreadable
        ]
        if upcoming and upcoming[0].next_fire_at is not None:
            return min(self.interval, max(0.0, (upcoming[0].next_fire_at - now).total_seconds()))
        return self.interval

    async def fire_due(self, schedule: Schedule, now: datetime) -> int:
        """Fire ``schedule``'s due instants per its misfire policy; the number of
        jobs submitted (0 when another scheduler got there first)."""
        try:
            spec = schedule.spec()
        except ValidationError as exc:  # stored by other rules, or a zone this host lacks
            # It stays due (another host may read it): say so now and then, not in a
            # loop, and leave it out of the sleep (see tick).
            seen = self._unreadable.get(schedule.id)
            if (
                seen is None
                or seen[0] != schedule.updated_at
                or (time.monotonic() - seen[1] >= INVALID_LOG_EVERY)
            ):
                log.error("schedule_invalid", schedule=schedule.name, error=str(exc))
                self._unreadable[schedule.id] = (schedule.updated_at, time.monotonic())
            return 0
        self._unreadable.pop(schedule.id, None)
        plan = plan_fires(schedule, spec, now, self.grace)
        current = schedule.next_fire_at
        if current is None or (not plan.fires and not plan.skipped):
            return 0  # nothing due (any more)
        if plan.skip_to is not None or not plan.fires:
            # Misfires dropped: move on to the first instant that fires (or past all).
            if not await self.store.advance_schedule(schedule.id, current, plan.skip_to, now):
                return 0
            if plan.skipped:
                log.warning(
                    "schedule_misfired",
                    schedule=schedule.name,
                    skipped=plan.skipped,
                    policy=schedule.misfire,
                )
        misfired = plan.skipped  # past the advance above: this process dropped them
        fired = refused = 0
        for fire_at, next_fire_at in plan.fires:
            job = job_for_fire(schedule, fire_at, self.rand())
            try:
                created = await self.store.fire_schedule(
                    schedule.id, fire_at, job, next_fire_at, now
                )
            except ValidationError as exc:
                # The job can't be submitted (a payload the store refuses): skip the
                # instant rather than retry it forever.
                log.error("schedule_fire_refused", schedule=schedule.name, error=str(exc))
                await self.store.advance_schedule(schedule.id, fire_at, next_fire_at, now)
                refused += 1
                continue
            if created is not None:
                fired += 1
                self.fired += 1
                log.debug(
                    "schedule_fired",
                    schedule=schedule.name,
                    fire_at=fire_at.isoformat(),
                    job_id=created.id,
                )
        if self.signals is not None and self.signals.observing:
            self.signals.observe(ScheduleFired(fired, misfired, refused))
        return fired
