"""Cron schedules through the app, on every backend: REST ``/api/schedules``,
``@app.cron``/``app.schedule`` upserted at start, one validation path, and the
scheduler firing jobs linked to their schedule (docs/schedules.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.domain.errors import ConfigurationError, ValidationError
from conveyor.domain.job import JobQuery
from conveyor.runtime.scheduler import sync_declared
from conveyor.storage.base import Store
from support import async_wait_until

T0 = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)


async def report(ctx: Any, day: str = "today", n: int = 1) -> dict[str, Any]:
    return {"day": day}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
async def app(store: Store, clock: Clock) -> AsyncIterator[Conveyor]:
    async with app_on(store, lambda a: a.job("report")(report)) as conveyor:
        conveyor._clock = clock
        yield conveyor


async def test_rest_lifecycle(app: Conveyor) -> None:
    async with api_client(app) as http:
        r = await http.post(
            "/api/schedules",
            json={
                "name": "nightly",
                "cron": "30 2 * * *",
                "timezone": "Europe/Berlin",
                "job_type": "report",
                "payload": {"day": "yesterday"},
                "overlap": "skip_if_running",
            },
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["success"] is True
        s = body["schedule"]
        sid = s["id"]
        # 2026-03-29 is the spring change in Berlin: 02:30 does not exist that night
        # and fires once at 03:00 CEST (01:00Z).
        assert s["next_fire_times"][:3] == [
            "2026-03-29T01:00:00Z",
            "2026-03-30T00:30:00Z",
            "2026-03-31T00:30:00Z",
        ]
        assert len(s["next_fire_times"]) == 5
        assert s["next_fire_at"] == "2026-03-29T01:00:00Z"
        assert (s["queue"], s["max_retries"], s["source"]) == ("default", 3, "api")

        r = await http.get(f"/api/schedules/{sid}")
        assert r.status_code == 200
        assert r.json()["schedule"]["next_fire_times"] == s["next_fire_times"]
        listed = (await http.get("/api/schedules")).json()
        assert [x["name"] for x in listed["schedules"]] == ["nightly"]

        r = await http.patch(f"/api/schedules/{sid}", json={"cron": "0 * * * *", "priority": 90})
        assert r.status_code == 200, r.text
        changed = r.json()["schedule"]
        assert (changed["cron"], changed["priority"]) == ("0 * * * *", 90)
        assert changed["next_fire_at"] == "2026-03-29T00:00:00Z"
        assert changed["payload"] == {"day": "yesterday"}

        r = await http.post(f"/api/schedules/{sid}/pause")
        assert r.json()["schedule"]["state"] == "paused"
        assert (await http.get(f"/api/schedules/{sid}")).json()["schedule"]["next_fire_times"] == []
        r = await http.post(f"/api/schedules/{sid}/resume")
        assert r.json()["schedule"]["state"] == "active"

        assert (await http.delete(f"/api/schedules/{sid}")).json() == {
            "success": True,
            "deleted": sid,
        }
        for method, path in [
            ("GET", f"/api/schedules/{sid}"),
            ("PATCH", f"/api/schedules/{sid}"),
            ("DELETE", f"/api/schedules/{sid}"),
            ("POST", f"/api/schedules/{sid}/pause"),
            ("POST", f"/api/schedules/{sid}/resume"),
        ]:
            r = await http.request(method, path, json={} if method == "PATCH" else None)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["success"] is False


GOOD = {"name": "n1", "cron": "*/5 * * * *", "job_type": "report"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "*/5 * * *"}, "cron"),
        ({"cron": "0 25 * * *"}, "cron"),
        ({"cron": "*/1e20 * * * *"}, "cron"),
        ({"cron": "0 */24 * * *"}, "cron"),
        ({"cron": "@reboot"}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),
        ({"timezone": "Europe/Atlantis"}, "timezone"),
        ({"timezone": "../../etc/passwd"}, "timezone"),
        # Host configuration, not zones: each scheduler's host would read its own.
        ({"timezone": "localtime"}, "timezone"),
        ({"timezone": "posixrules"}, "timezone"),
        ({"name": "bad name"}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"payload": {"n": "not a number"}}, "payload.n"),
        ({"payload": {"unknown": 1}}, "payload.unknown"),
        ({"job_type": "nobody_serves_this"}, "job_type"),
        ({"job_type": "conveyor.webhook"}, "job_type"),
        ({"misfire": "whenever"}, "misfire"),
        ({"catch_up_max": 0}, "catch_up_max"),
        ({"jitter": 1e12}, "jitter"),
        ({"overlap": "maybe"}, "overlap"),
        ({"priority": 101}, "priority"),
        ({"cron": 5}, "cron"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_rest_refuses_bad_schedules_and_stores_nothing(
    app: Conveyor, change: dict[str, Any], field: str
) -> None:
    async with api_client(app) as http:
        r = await http.post("/api/schedules", json={**GOOD, **change})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["success"] is False
        assert body["error"]
        assert any(d["field"] == field for d in body["details"]), body
        # A change to an existing schedule is refused the same way.
        ok = await http.post("/api/schedules", json=GOOD)
        assert ok.status_code == 201
        before = (await http.get("/api/schedules")).json()
        sid = ok.json()["schedule"]["id"]
        patch = {k: v for k, v in change.items() if k not in ("name",)} or change
        r = await http.patch(f"/api/schedules/{sid}", json=patch)
        assert r.status_code == 400, r.text
        assert (await http.get("/api/schedules")).json() == before
    assert [s.name for s in await app.store.list_schedules()] == ["n1"]


async def test_a_name_is_taken_once(app: Conveyor) -> None:
    async with api_client(app) as http:
        assert (await http.post("/api/schedules", json=GOOD)).status_code == 201
        r = await http.post("/api/schedules", json=GOOD)
        assert r.status_code == 400
        assert r.json()["details"] == [{"field": "name", "message": "already taken"}]


async def test_fired_jobs_link_to_their_schedule(app: Conveyor, clock: Clock) -> None:
    async with api_client(app) as http:
        r = await http.post(
            "/api/schedules",
            json={**GOOD, "cron": "*/10 * * * * *", "payload": {"day": "x"}},
        )
        sid = r.json()["schedule"]["id"]
        scheduler = app.scheduler()
        clock.now = T0 + timedelta(seconds=10)
        await scheduler.tick()
        clock.now = T0 + timedelta(seconds=20.5)
        await scheduler.tick()
        await scheduler.tick()  # nothing more is due
        page = await app.store.list_jobs(JobQuery(limit=10, sort="created_at", descending=False))
        assert [j.schedule_id for j in page.jobs] == [sid, sid]
        job = (await http.get(f"/api/jobs/{page.jobs[0].id}")).json()["job"]
        assert job["schedule_id"] == sid
        assert job["payload"] == {"day": "x"}
        assert job["scheduled_at"] == "2026-03-28T23:00:10Z"
        s = (await http.get(f"/api/schedules/{sid}")).json()["schedule"]
        assert s["last_fired_at"] == "2026-03-28T23:00:20Z"
        assert s["last_job_id"] == page.jobs[1].id
        assert s["next_fire_at"] == "2026-03-28T23:00:30Z"
        events = (await http.get("/api/events", params={"types": "schedule_fired"})).json()
        fired = [e for e in events["events"] if e["type"] == "schedule_fired"]
        assert [e["job_id"] for e in fired] == [j.id for j in page.jobs]
        assert fired[0]["data"]["schedule_id"] == sid


async def test_code_schedules_are_upserted_and_disabled_when_removed(
    app: Conveyor, clock: Clock
) -> None:
    app.cron("0 * * * *", timezone="America/New_York", payload={"day": "d"})(app.registry["report"])
    app.schedule("weekly", "@weekly", "report", {"n": 2}, jitter=5)
    stored = await sync_declared(app.store, list(app.schedules.values()), clock.now)
    by_name = {s.name: s for s in stored}
    assert set(by_name) == {"report", "weekly"}
    assert by_name["report"].source == "code"
    assert by_name["report"].next_fire_at == datetime(2026, 3, 29, 0, 0, tzinfo=UTC)
    # A second process starting with the same code changes nothing.
    again = await sync_declared(app.store, list(app.schedules.values()), clock.now)
    assert {s.id for s in again} == {s.id for s in stored}
    assert again == await app.store.list_schedules()

    # An operator pauses one; a restart keeps it paused.
    from conveyor.scheduling import pause_schedule

    await pause_schedule(app, by_name["weekly"].id)
    await sync_declared(app.store, list(app.schedules.values()), clock.now)
    assert (await app.store.get_schedule(by_name["weekly"].id)).state == "paused"

    # Removed from the code of a process that has the job type: disabled, not deleted.
    del app.schedules["report"]
    await sync_declared(
        app.store, list(app.schedules.values()), clock.now, owned_job_types=["report"]
    )
    assert (await app.store.get_schedule(by_name["report"].id)).state == "disabled"
    assert await app.store.due_schedules(clock.now + timedelta(days=30), 10) == []
    # Declared again: active again.
    app.cron("0 * * * *", timezone="America/New_York", payload={"day": "d"})(app.registry["report"])
    await sync_declared(app.store, list(app.schedules.values()), clock.now)
    assert (await app.store.get_schedule(by_name["report"].id)).state == "active"


async def test_declaring_in_code_validates_at_once(app: Conveyor) -> None:
    with pytest.raises(ValidationError) as info:
        app.schedule("x", "* * * * * * *", "report", timezone="Nowhere/City")
    assert {d.field for d in info.value.details} == {"cron", "timezone"}
    with pytest.raises(ValidationError) as info:
        app.schedule("x", "@daily", "report", {"n": "many"})
    assert [d.field for d in info.value.details] == ["payload.n"]
    with pytest.raises(ConfigurationError):
        app.cron("@daily")(report)  # type: ignore[arg-type]  # not a registered job
    app.schedule("x", "@daily", "report")
    with pytest.raises(ConfigurationError):
        app.schedule("x", "@hourly", "report")
    assert list(app.schedules) == ["x"]


async def test_the_loop_picks_up_a_new_schedule_and_stops_on_request(store: Store) -> None:
    async with app_on(store, lambda a: a.job("report")(report)) as app:
        scheduler = app.scheduler(interval=0.2)
        task = asyncio.create_task(scheduler.run())
        try:
            async with api_client(app) as http:
                r = await http.post("/api/schedules", json={**GOOD, "cron": "* * * * * *"})
                sid = r.json()["schedule"]["id"]

            async def two_jobs() -> bool:
                page = await app.store.list_jobs(JobQuery(limit=10))
                return page.total >= 2 and all(j.schedule_id == sid for j in page.jobs)

            await async_wait_until(two_jobs, 10, "the loop to fire a schedule created after it")
        finally:
            scheduler.request_stop()
            await asyncio.wait_for(task, 5)
        assert scheduler.fired >= 2


async def test_a_patch_that_changes_nothing_writes_nothing(app: Conveyor, clock: Clock) -> None:
    async with api_client(app) as http:
        created = (await http.post("/api/schedules", json=GOOD)).json()["schedule"]
        sid = created["id"]
        clock.now += timedelta(minutes=1)
        for patch in ({}, {"cron": GOOD["cron"], "name": "n1"}, {"priority": None}):
            r = await http.patch(f"/api/schedules/{sid}", json=patch)
            assert r.status_code == 200, r.text
            assert r.json()["schedule"]["updated_at"] == created["updated_at"], patch
        assert (await app.store.get_schedule(sid)).updated_at == T0
        changed = await http.patch(f"/api/schedules/{sid}", json={"priority": 7})
        assert changed.json()["schedule"]["updated_at"] != created["updated_at"]
        # Unknown fields are still refused, nothing written.
        assert (await http.patch(f"/api/schedules/{sid}", json={"prio": 1})).status_code == 400
