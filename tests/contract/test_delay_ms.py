"""REST ``delay_ms`` on every backend: a relative start in milliseconds, with Python's
``delay`` range, and never together with ``scheduled_at``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.domain.errors import ValidationError
from conveyor.domain.job import JobQuery
from conveyor.domain.limits import MAX_DELAY_SECONDS
from conveyor.storage.base import Store


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async def noop(ctx) -> None: ...

    async with app_on(store, lambda a: a.job("noop")(noop)) as conveyor:
        yield conveyor


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/submit"])
async def test_delay_ms_schedules_the_job_that_many_milliseconds_from_now(app, path):
    async with api_client(app) as c:
        before = app.now()
        resp = await c.post(path, json={"job_type": "noop", "payload": {}, "delay_ms": 90_000})
        after = app.now()
        assert resp.status_code in (200, 201), resp.text
        body = resp.json()
        assert body["status"] == "pending"
        job = await app.store.get(body["job_id"])
        assert job.run_at is not None
        assert before + timedelta(seconds=90) <= job.run_at <= after + timedelta(seconds=90)
        shown = (await c.get(f"/api/jobs/{job.id}")).json()["job"]
        assert shown["scheduled_at"] is not None
        # 0 is "now": the job is due at once.
        now_job = await c.post(path, json={"job_type": "noop", "payload": {}, "delay_ms": 0})
        assert now_job.status_code in (200, 201), now_job.text


async def test_the_longest_delay_ms_is_pythons_longest_delay(app):
    longest = MAX_DELAY_SECONDS * 1000
    async with api_client(app) as c:
        ok = await c.post(
            "/api/jobs", json={"job_type": "noop", "payload": {}, "delay_ms": longest}
        )
        assert ok.status_code == 201, ok.text
        too_long = await c.post(
            "/api/jobs", json={"job_type": "noop", "payload": {}, "delay_ms": longest + 1}
        )
    assert too_long.status_code == 400
    assert [d["field"] for d in too_long.json()["details"]] == ["delay_ms"]
    # Python draws the line at the same place.
    await app.enqueue("noop", {}, delay=MAX_DELAY_SECONDS)
    with pytest.raises(ValidationError):
        await app.enqueue("noop", {}, delay=(longest + 1) / 1000)
    assert (await app.store.list_jobs(JobQuery())).total == 2


@pytest.mark.parametrize("value", [-1, 1.5e300, "5000", True, [1], {"ms": 1}, 2**70, 1.5])
async def test_a_delay_ms_that_is_not_a_whole_number_in_range_is_refused(app, value):
    async with api_client(app) as c:
        resp = await c.post(
            "/api/jobs", json={"job_type": "noop", "payload": {}, "delay_ms": value}
        )
    assert resp.status_code == 400, resp.text
    assert "delay_ms" in {d["field"] for d in resp.json()["details"]}
    assert (await app.store.list_jobs(JobQuery())).total == 0


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/submit"])
async def test_delay_ms_with_scheduled_at_is_refused_naming_both(app, path):
    body = {
        "job_type": "noop",
        "payload": {},
        "delay_ms": 1000,
        "scheduled_at": "2030-01-01T00:00:00Z",
    }
    async with api_client(app) as c:
        resp = await c.post(path, json=body)
    assert resp.status_code == 400, resp.text
    out = resp.json()
    assert {d["field"] for d in out["details"]} == {"delay_ms", "scheduled_at"}
    assert "delay_ms" in out["error"]
    assert "scheduled_at" in out["error"]
    assert (await app.store.list_jobs(JobQuery())).total == 0
