"""Contract: cron schedules are stored alike on every backend, and an instant
fires exactly once (docs/schedules.md)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from storekit import all_events, at, finish, lease_one, snapshot

from conveyor.domain.errors import ValidationError
from conveyor.domain.ids import new_job_id
from conveyor.domain.job import JobQuery, NewJob
from conveyor.domain.schedules import (
    CronSpec,
    Schedule,
    ScheduleNameTaken,
    ScheduleNotFound,
    job_for_fire,
)
from conveyor.domain.states import Action
from conveyor.runtime.scheduler import Scheduler
from conveyor.storage.base import Store

EVERY_MINUTE = "* * * * *"


def schedule(name: str = "nightly", cron: str = EVERY_MINUTE, **fields: object) -> Schedule:
    values: dict[str, object] = {
        "id": new_job_id(),
        "name": name,
        "cron": cron,
        "job_type": "report",
        "payload": {"n": 1},
        "next_fire_at": at(60),
    }
    values.update(fields)
    return Schedule(**values)  # type: ignore[arg-type]


async def fire(
    store: Store, s: Schedule, fire_at: datetime, *, now: datetime | None = None
) -> object:
    nxt = CronSpec.parse(s.cron, s.timezone).next_after(fire_at)
    return await store.fire_schedule(s.id, fire_at, job_for_fire(s, fire_at), nxt, now or fire_at)


async def test_create_read_update_delete(store: Store) -> None:
    created = await store.create_schedule(schedule(), at(0))
    assert created.created_at == at(0)
    assert created.payload == {"n": 1}
    assert created.state == "active"
    assert await store.get_schedule(created.id) == created
    assert [s.name for s in await store.list_schedules()] == ["nightly"]

    changed = await store.update_schedule(
        created.with_(cron="0 3 * * *", timezone="Europe/Berlin", state="paused"), at(5)
    )
    assert (changed.cron, changed.timezone, changed.state) == (
        "0 3 * * *",
        "Europe/Berlin",
        "paused",
    )
    assert changed.created_at == at(0)
    assert changed.updated_at == at(5)
    assert await store.get_schedule(created.id) == changed

    await store.delete_schedule(created.id)
    with pytest.raises(ScheduleNotFound):
        await store.get_schedule(created.id)
    with pytest.raises(ScheduleNotFound):
        await store.delete_schedule(created.id)
    with pytest.raises(ScheduleNotFound):
        await store.update_schedule(changed, at(6))
    assert await store.list_schedules() == []


async def test_names_are_unique(store: Store) -> None:
    first = await store.create_schedule(schedule("a"), at(0))
    await store.create_schedule(schedule("b"), at(0))
    with pytest.raises(ScheduleNameTaken):
        await store.create_schedule(schedule("a"), at(1))
    with pytest.raises(ScheduleNameTaken):
        await store.update_schedule(first.with_(name="b"), at(1))
    assert sorted(s.name for s in await store.list_schedules()) == ["a", "b"]


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"name": "has space"}, "name"),
        ({"misfire": "later"}, "misfire"),
        ({"jitter": float("nan")}, "jitter"),
        ({"priority": 1000}, "priority"),
        ({"payload": {"x": float("inf")}}, "payload.x"),
        ({"payload": {"x": "a\x00b"}}, "payload.x"),
    ],
)
async def test_an_invalid_schedule_stores_nothing(
    store: Store, fields: dict[str, object], bad: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await store.create_schedule(schedule(**fields), at(0))
    assert any(d.field == bad for d in info.value.details), info.value.details
    assert await store.list_schedules() == []


async def test_a_fire_submits_one_linked_job_with_its_events(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    job = await fire(store, s, at(60), now=at(60.2))
    assert job is not None
    assert job.schedule_id == s.id  # type: ignore[attr-defined]
    stored = await store.get(job.id)  # type: ignore[attr-defined]
    assert stored.schedule_id == s.id
    assert stored.payload == {"n": 1}
    assert stored.run_at == at(60)
    assert stored.created_by == "schedule:nightly"
    assert stored.metadata["fire_at"] == "2026-01-01T00:01:00Z"
    after = await store.get_schedule(s.id)
    assert after.last_fired_at == at(60)
    assert after.next_fire_at == at(120)
    assert after.last_job_id == stored.id
    events = [(e.type, e.job_id) for e in await all_events(store)]
    assert events == [("job_submitted", stored.id), ("schedule_fired", stored.id)]
    fired = (await all_events(store))[-1]
    assert fired.data["schedule_id"] == s.id
    assert fired.data["fire_at"] == "2026-01-01T00:01:00Z"
    assert fired.data["job_type"] == "report"


async def test_an_instant_fires_once(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    assert await fire(store, s, at(60)) is not None
    before = await snapshot(store)
    assert await fire(store, s, at(60)) is None  # next_fire_at moved on
    # Set back to a fired instant (a PATCH, an old scheduler): still not fired again,
    # but the schedule moves on.
    await store.update_schedule((await store.get_schedule(s.id)).with_(next_fire_at=at(60)), at(61))
    assert await fire(store, s, at(60)) is None
    assert (await store.get_schedule(s.id)).next_fire_at == at(120)
    assert await snapshot(store) == before


async def test_concurrent_callers_fire_an_instant_once(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    results = await asyncio.gather(*(fire(store, s, at(60)) for _ in range(8)))
    assert sum(r is not None for r in results) == 1
    page = await store.list_jobs(JobQuery(limit=100))
    assert [j.schedule_id for j in page.jobs] == [s.id]


async def test_concurrent_sqlite_processes_fire_an_instant_once(tmp_path) -> None:
    from conveyor.storage.sqlite import SQLiteStore

    stores = [SQLiteStore(tmp_path / "shared.db") for _ in range(4)]
    for st in stores:
        await st.open()
    try:
        s = await stores[0].create_schedule(schedule(), at(0))
        for minute in range(1, 6):
            t = at(60 * minute)
            results = await asyncio.gather(*(fire(st, s, t) for st in stores))
            assert sum(r is not None for r in results) == 1
        assert (await stores[1].list_jobs(JobQuery(limit=100))).total == 5
    finally:
        for st in stores:
            await st.close()


async def test_a_paused_schedule_does_not_fire(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    assert [d.id for d in await store.due_schedules(at(60), 10)] == [s.id]
    await store.update_schedule(s.with_(state="paused"), at(1))
    assert await store.due_schedules(at(3600), 10) == []
    assert await fire(store, s, at(60)) is None
    assert not await store.advance_schedule(s.id, at(60), at(120), at(60))
    assert (await store.list_jobs(JobQuery(limit=10))).total == 0


async def test_due_schedules_earliest_first(store: Store) -> None:
    late = await store.create_schedule(schedule("late", next_fire_at=at(300)), at(0))
    soon = await store.create_schedule(schedule("soon", next_fire_at=at(100)), at(0))
    await store.create_schedule(schedule("later", next_fire_at=at(900)), at(0))
    await store.create_schedule(schedule("never", next_fire_at=None), at(0))
    assert [d.id for d in await store.due_schedules(at(300), 10)] == [soon.id, late.id]
    assert [d.id for d in await store.due_schedules(at(300), 1)] == [soon.id]


async def test_advance_is_a_compare_and_set(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    assert not await store.advance_schedule(s.id, at(59), at(120), at(1))
    assert await store.advance_schedule(s.id, at(60), at(120), at(1))
    assert not await store.advance_schedule(s.id, at(60), at(180), at(1))
    assert (await store.get_schedule(s.id)).next_fire_at == at(120)


def _scheduler(store: Store, now: datetime, grace: float = 30.0) -> Scheduler:
    return Scheduler(store, clock=lambda: now, rand=lambda: 0.0, grace=grace)


async def _fired_at(store: Store) -> list[str]:
    page = await store.list_jobs(JobQuery(limit=1000, sort="created_at", descending=False))
    return sorted(j.metadata["fire_at"] for j in page.jobs)


async def test_misfire_skip_fires_only_the_on_time_instant(store: Store) -> None:
    s = await store.create_schedule(schedule(next_fire_at=at(0)), at(0))
    now = at(600.5)
    assert await _scheduler(store, now).fire_due(s, now) == 1
    assert await _fired_at(store) == ["2026-01-01T00:10:00Z"]
    assert (await store.get_schedule(s.id)).next_fire_at == at(660)


async def test_misfire_catch_up_fires_the_latest_missed_up_to_the_maximum(store: Store) -> None:
    s = await store.create_schedule(
        schedule(next_fire_at=at(0), misfire="catch_up", catch_up_max=3), at(0)
    )
    now = at(600.5)
    assert await _scheduler(store, now).fire_due(s, now) == 4
    assert await _fired_at(store) == [
        "2026-01-01T00:07:00Z",
        "2026-01-01T00:08:00Z",
        "2026-01-01T00:09:00Z",
        "2026-01-01T00:10:00Z",
    ]
    assert (await store.get_schedule(s.id)).next_fire_at == at(660)
    # A second scheduler seeing the same (stale) schedule fires nothing more.
    assert await _scheduler(store, now).fire_due(s, now) == 0
    assert len(await _fired_at(store)) == 4


async def test_overlap_skip_if_running_skips_while_the_last_job_is_unfinished(
    store: Store,
) -> None:
    s = await store.create_schedule(schedule(overlap="skip_if_running"), at(0))
    first = await fire(store, s, at(60))
    assert first is not None
    assert await fire(store, s, at(120)) is None  # pending
    running = await lease_one(store, now=at(121))
    assert await fire(store, s, at(180)) is None  # running
    assert (await store.get_schedule(s.id)).next_fire_at == at(240)
    assert await finish(store, running, Action.COMPLETE, now=at(200), result=None)
    assert await fire(store, s, at(240)) is not None
    assert len(await _fired_at(store)) == 2


async def test_overlap_allow_fires_while_the_last_job_runs(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    assert await fire(store, s, at(60)) is not None
    assert await fire(store, s, at(120)) is not None
    assert len(await _fired_at(store)) == 2


async def test_a_job_the_store_refuses_fires_nothing(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    bad = NewJob("report", {"x": float("nan")})
    with pytest.raises(ValidationError):
        await store.fire_schedule(s.id, at(60), bad, at(120), at(60))
    assert (await store.get_schedule(s.id)).next_fire_at == at(60)
    assert (await store.list_jobs(JobQuery(limit=10))).total == 0


async def test_jitter_delays_the_job_not_the_fire_record(store: Store) -> None:
    s = await store.create_schedule(schedule(jitter=30.0), at(0))
    job = job_for_fire(s, at(60), 0.5)
    created = await store.fire_schedule(s.id, at(60), job, at(120), at(60))
    assert created is not None
    assert (await store.get(created.id)).run_at == at(60) + timedelta(seconds=15)
    assert (await store.get_schedule(s.id)).last_fired_at == at(60)


async def test_old_fire_records_are_pruned(store: Store) -> None:
    s = await store.create_schedule(schedule(), at(0))
    for minute in (1, 2, 3):
        assert await fire(store, s, at(60 * minute)) is not None
    assert await store.prune_schedule_fires(at(150)) == 2
    assert await store.prune_schedule_fires(at(150)) == 0
    # The kept record still refuses its instant; the jobs stay.
    await store.update_schedule((await store.get_schedule(s.id)).with_(next_fire_at=at(180)), at(1))
    assert await fire(store, s, at(180)) is None
    assert (await store.list_jobs(JobQuery(limit=10))).total == 3


def _without_berlin(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host has no tzdata for Europe/Berlin (another host wrote the schedule)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from conveyor.domain import schedules as domain

    def no_tzdata(key: str) -> ZoneInfo:
        if key == "Europe/Berlin":
            raise ZoneInfoNotFoundError(key)
        return ZoneInfo(key)

    monkeypatch.setattr(domain, "ZoneInfo", no_tzdata)


async def test_a_stored_schedule_this_host_cannot_read_does_not_spin_the_loop(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A zone this host lacks (no tzdata here, another host wrote it): the schedule
    # stays due. The loop used to see it as due at every pass and sleep 0 s,
    # logging `schedule_invalid` thousands of times a second at full CPU.

    from structlog.testing import capture_logs

    s = await store.create_schedule(schedule(next_fire_at=at(0), timezone="Europe/Berlin"), at(0))

    _without_berlin(monkeypatch)
    now = at(600.5)
    scheduler = _scheduler(store, now)
    with capture_logs() as logs:
        waits = [await scheduler.tick() for _ in range(3)]
    assert waits == [scheduler.interval] * 3
    assert [e["event"] for e in logs].count("schedule_invalid") == 1
    assert await _fired_at(store) == []
    assert (await store.get_schedule(s.id)).next_fire_at == at(0)  # left for another host


async def test_unreadable_due_schedules_never_hide_a_readable_one(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More unreadable due schedules than one pass reads used to fill every batch:
    # the readable schedule behind them never fired.

    from conveyor.runtime.scheduler import BATCH

    for n in range(BATCH + 5):
        await store.create_schedule(
            schedule(f"foreign-{n}", next_fire_at=at(0), timezone="Europe/Berlin"), at(0)
        )
    ok = await store.create_schedule(schedule("mine", next_fire_at=at(30)), at(0))

    _without_berlin(monkeypatch)
    now = at(60.5)
    scheduler = _scheduler(store, now)
    for _ in range(2):
        await scheduler.tick()
    assert await _fired_at(store) == ["2026-01-01T00:01:00Z"]
    assert (await store.get_schedule(ok.id)).next_fire_at == at(120)


async def test_the_scheduler_reports_fires_and_misfires_to_observers(store: Store) -> None:
    from conveyor.observability.metrics import Metrics
    from conveyor.runtime.observe import ScheduleFired
    from conveyor.runtime.ports import Signals

    s = await store.create_schedule(schedule(next_fire_at=at(0)), at(0))
    signals = Signals()
    seen: list[object] = []
    signals.on_observe(seen.append)
    metrics = Metrics()
    signals.on_observe(metrics.observe)
    now = at(600.5)
    scheduler = Scheduler(store, clock=lambda: now, rand=lambda: 0.0, grace=30.0, signals=signals)
    assert await scheduler.fire_due(s, now) == 1
    # Eleven instants were due: 00:00 .. 00:09 late (dropped, policy skip), 00:10 fired.
    assert seen == [ScheduleFired(fired=1, misfired=10, refused=0)]
    text = metrics.render().decode()
    assert 'conveyor_schedule_fires_total{outcome="fired"} 1.0' in text
    assert 'conveyor_schedule_fires_total{outcome="misfired"} 10.0' in text
