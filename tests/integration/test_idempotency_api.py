"""A client retrying its POST after the first job finished gets that job back:
the work never runs twice while the job is kept (REST, on SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conveyor import Conveyor, JobContext, Settings
from conveyor.api.app import create_app
from support import async_wait_until, running_worker


@pytest.fixture
async def cv(tmp_path: Path) -> AsyncIterator[Conveyor]:
    app = Conveyor(
        settings=Settings(
            database_url=f"sqlite:///{tmp_path}/idem.db",
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            shutdown_grace=2.0,
        )
    )
    await app.open()
    try:
        yield app
    finally:
        await app.close()


async def test_a_post_retried_after_completion_returns_the_completed_job(cv: Conveyor) -> None:
    charged: list[int] = []

    @cv.job("charge_card")
    async def charge_card(ctx: JobContext, cents: int) -> dict[str, int]:
        charged.append(cents)
        return {"charged": cents}

    transport = httpx.ASGITransport(app=create_app(cv), raise_app_exceptions=False)
    body = {"job_type": "charge_card", "payload": {"cents": 500}, "idempotency_key": "order-7"}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        first = await client.post("/api/jobs", json=body)
        assert first.status_code == 201, first.text
        job_id = first.json()["job_id"]

        async def completed() -> bool:
            r = await client.get(f"/api/jobs/{job_id}")
            return bool(r.json()["job"]["status"] == "completed")

        async with running_worker(cv, 2):
            await async_wait_until(completed, 15, "the first charge to complete")
            again = await client.post("/api/jobs", json=body)  # the client's retry
            assert again.status_code == 200, again.text
            dup = again.json()
            assert (dup["duplicate"], dup["job_id"], dup["status"]) == (True, job_id, "completed")
            listed = (await client.get("/api/jobs", params={"job_type": "charge_card"})).json()
            assert listed["pagination"]["total"] == 1
        job = (await client.get(f"/api/jobs/{job_id}")).json()["job"]
        assert job["result"] == {"charged": 500}
    assert charged == [500]  # the card was charged once
