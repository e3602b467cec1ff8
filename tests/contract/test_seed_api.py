"""The job-management seed's API names, beside Conveyor's, on every backend: a
client written for the seed (its smoke-test flow) works against Conveyor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from appkit import api_client, app_on

import conveyor.demo
from conveyor import Conveyor
from conveyor.storage.base import Store
from support import async_wait_until, running_worker


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, conveyor.demo.register) as conveyor_app:
        yield conveyor_app


client = api_client


async def test_the_seed_smoke_flow_submit_poll_metrics_cancel(app):
    async with client(app) as c:
        # Submit on the seed's path: 200 and a job id.
        resp = await c.post(
            "/api/jobs/submit", json={"job_type": "fail", "payload": {}, "max_retries": 1}
        )
        assert resp.status_code == 200, resp.text
        failing = resp.json()["job_id"]
        waiting = (
            await c.post(
                "/api/jobs/submit",
                json={
                    "job_type": "test_job",
                    "payload": {},
                    "scheduled_at": "2999-01-01T00:00:00Z",
                },
            )
        ).json()["job_id"]
        async with running_worker(app):

            async def dead() -> dict[str, Any] | None:
                job = (await c.get(f"/api/jobs/{failing}")).json()["job"]
                return job if job["status"] == "failed" else None

            job = await async_wait_until(dead, 20, "the failing job to be dead-lettered")
        # The seed's field names beside Conveyor's.
        assert job["retry_count"] == 2  # both attempts failed
        assert job["error_message"] == job["error"]
        assert job["error_message"].startswith("RuntimeError: failing on purpose")
        metrics = (await c.get("/api/jobs/metrics")).json()["metrics"]
        assert metrics["queue_depths"]["processing"] == metrics["queue_depths"]["running"]
        assert metrics["statistics"]["last_hour"]["failed"] == 1
        # Every terminal state is there, zero included, in both windows.
        for window in ("last_hour", "last_24h"):
            assert metrics["statistics"][window]["completed"] == 0
            assert metrics["statistics"][window]["cancelled"] == 0
        assert metrics["statistics"]["last_24h"]["submitted"] == 2
        # Cancel with a reason: kept in metadata, the error and the event.
        resp = await c.delete(f"/api/jobs/{waiting}", params={"reason": "customer asked"})
        assert resp.status_code == 200
        assert resp.json()["message"] == "Job cancelled"
        cancelled = (await c.get(f"/api/jobs/{waiting}")).json()["job"]
        assert cancelled["metadata"]["cancel_reason"] == "customer asked"
        assert cancelled["error_message"] == "cancelled: customer asked"
        events = (await c.get(f"/api/events?job_id={waiting}&types=job_cancelled")).json()
        assert events["events"][0]["data"]["reason"] == "customer asked"
        # A refused cancel also says why in `message`.
        again = await c.delete(f"/api/jobs/{waiting}")
        assert again.status_code == 409
        assert again.json()["message"] == again.json()["error"]
        bad = await c.delete(f"/api/jobs/{failing}", params={"reason": "x\x00"})
        assert bad.status_code in (400, 409)


async def test_created_by_comes_from_x_user_id_only_behind_a_trusted_proxy(app):
    body = {"job_type": "test_job", "payload": {}}
    async with client(app) as c:
        plain = (await c.post("/api/jobs", json=body, headers={"X-User-Id": "alice"})).json()
        assert (await app.store.get(plain["job_id"])).created_by == "api"
    app.settings = app.settings.with_(trust_user_header=True)
    async with client(app) as c:
        trusted = (await c.post("/api/jobs", json=body, headers={"X-User-Id": "alice"})).json()
        assert (await app.store.get(trusted["job_id"])).created_by == "alice"
        nul = await c.post("/api/jobs", json=body, headers={"X-User-Id": "a" * 300})
        assert nul.status_code == 400
