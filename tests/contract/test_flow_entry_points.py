"""Flow control from Python, REST and a worker, on every backend: limits registered
in code reach the store, keys are computed from payloads (one validation for
every entry point), queues pause and resume over REST, and status, metrics and
Prometheus show what is held and what no worker can run."""

from __future__ import annotations

from typing import Any

import pytest
from appkit import api_client, app_on, finished

from conveyor import Conveyor
from conveyor.domain.errors import ConfigurationError, ValidationError
from conveyor.domain.flow import KeyTemplate, RateLimit
from conveyor.runtime.status import collect_status
from conveyor.storage.base import Store
from support import running_worker


def register(app: Conveyor) -> None:
    @app.job(
        "tenant_task",
        concurrency_key="tenant:{tenant_id}",
        concurrency_limit=2,
        rate_limit="100/60s",
    )
    async def tenant_task(ctx: Any, tenant_id: int, n: int = 0) -> int:
        return n

    @app.job("gpu_task", requires={"gpu": "a100"})
    async def gpu_task(ctx: Any) -> str:
        return "ok"


async def test_a_worker_records_registered_limits(store: Store) -> None:
    async with app_on(store, register) as app, running_worker(app):
        limits = {lim.job_type: lim for lim in await store.list_flow_limits()}
    t = limits["tenant_task"]
    assert t.concurrency_key == KeyTemplate.parse("tenant:{tenant_id}")
    assert (t.concurrency_limit, t.rate_limit) == (2, RateLimit(100, 60.0))
    assert dict(limits["gpu_task"].requires) == {"gpu": "a100"}


async def test_keys_come_from_each_payload(store: Store) -> None:
    async with app_on(store, register) as app:
        one = await app.enqueue("tenant_task", {"tenant_id": 7})
        many = await app.enqueue_many("tenant_task", [{"tenant_id": 1}, {"tenant_id": 2}])
        explicit = await app.enqueue("tenant_task", {"tenant_id": 7}, concurrency_key="vip")
        gpu = await app.enqueue("gpu_task")
    assert one.concurrency_key == "tenant:7"
    assert [j.concurrency_key for j in many] == ["tenant:1", "tenant:2"]
    assert explicit.concurrency_key == "vip"
    assert (await store.get(gpu.id)).requires == {"gpu": "a100"}


async def test_a_payload_without_the_key_field_is_refused(store: Store) -> None:
    async with app_on(store, register) as app:
        with pytest.raises(ValidationError) as err:
            await app.enqueue_many("tenant_task", [{"tenant_id": 1}, {"n": 2}])
        assert err.value.details[0].field.startswith("payloads[1]")
        with pytest.raises(ValidationError):
            await app.enqueue("tenant_task", {"n": 1}, concurrency_key="x" * 300)


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"rate_limit": "fast"}, "rate_limit"),
        ({"rate_limit": "0/s"}, "rate_limit"),
        ({"concurrency_limit": 0}, "concurrency_limit"),
        ({"concurrency_key": "{a.b}"}, "concurrency_key"),
        ({"requires": {"gpu": 1}}, "requires"),
    ],
)
async def test_bad_registrations_are_refused(store: Store, options: dict, word: str) -> None:
    async with app_on(store) as app:
        with pytest.raises(ConfigurationError, match=word):
            app.job("bad", **options)


async def test_rest_submit_with_key_and_requirements(store: Store) -> None:
    async with app_on(store, register) as app, running_worker(app), api_client(app) as client:
        r = await client.post(
            "/api/jobs",
            json={"job_type": "tenant_task", "payload": {"tenant_id": 3}, "concurrency_key": "k"},
        )
        assert r.status_code == 201, r.text
        job = (await client.get(f"/api/jobs/{r.json()['job_id']}")).json()["job"]
        assert job["concurrency_key"] == "k"
        bad = await client.post(
            "/api/jobs",
            json={"job_type": "tenant_task", "payload": {"tenant_id": 3}, "requires": {"gpu": 5}},
        )
        assert bad.status_code == 400
        assert bad.json()["details"][0]["field"] == "requires.gpu"
        missing = await client.post("/api/jobs", json={"job_type": "tenant_task", "payload": {}})
        assert missing.status_code == 400
        assert missing.json()["details"][0]["field"] == "payload.tenant_id"


async def test_rest_pause_and_resume(store: Store) -> None:
    async with app_on(store, register) as app, api_client(app) as client:
        r = await client.post("/api/queues/default/pause")
        assert r.status_code == 200
        assert r.json()["queue"]["paused"] is True
        job = await app.enqueue("tenant_task", {"tenant_id": 1})
        async with running_worker(app):
            listed = (await client.get("/api/queues")).json()["queues"]
            assert [q["name"] for q in listed if q["paused"]] == ["default"]
            held = (await client.get("/api/jobs/metrics")).json()["metrics"]["flow_control"]
            assert held["paused_queue"] == {"default": 1}
            prom = (await client.get("/metrics")).text
            assert 'conveyor_jobs_held{limit="paused_queue",name="default"} 1.0' in prom
            assert (await store.get(job.id)).state.value == "pending"
            r = await client.post("/api/queues/default/resume")
            assert r.json()["queue"]["paused"] is False
            await finished(app, [job.id])
        r = await client.patch("/api/queues/default", json={"concurrency_limit": 3})
        assert r.json()["queue"]["concurrency_limit"] == 3
        for body in ({"concurrency_limit": -1}, {"concurrency_limit": 0}, {"paused": "x"}, {}):
            bad = await client.patch("/api/queues/default", json=body)
            assert bad.status_code == 400, body
        assert (await client.post("/api/queues/bad%00name/pause")).status_code == 400
        r = await client.patch("/api/queues/default", json={"concurrency_limit": None})
        assert r.json()["queue"]["concurrency_limit"] is None


async def test_status_names_jobs_no_live_worker_can_run(store: Store) -> None:
    async with app_on(store, register) as app:
        await app.enqueue("gpu_task")
        async with running_worker(app):
            status = await collect_status(app)
    (u,) = status["unroutable_jobs"]
    assert (u["job_type"], u["requires"], u["pending"]) == ("gpu_task", {"gpu": "a100"}, 1)
    assert u["reason"] == "no live worker offers gpu=a100"


async def test_a_capable_worker_runs_jobs_with_requirements(store: Store) -> None:
    async with app_on(store, register, capabilities=("gpu=a100",)) as app:
        job = await app.enqueue("gpu_task")
        async with running_worker(app):
            done = await finished(app, [job.id])
            status = await collect_status(app)
    assert done[job.id].result == "ok"
    assert status["unroutable_jobs"] == []


async def test_a_process_without_the_handlers_computes_the_same_keys(store: Store) -> None:
    # api_only is like `conveyor api`: no handlers, the limits come from the store.
    async with (
        app_on(store, register) as worker_app,
        running_worker(worker_app),
        app_on(store) as api_only,
    ):
        job = await api_only.enqueue("tenant_task", {"tenant_id": 5})
        gpu = await api_only.enqueue("gpu_task")
        with pytest.raises(ValidationError):
            await api_only.enqueue("tenant_task", {"n": 1})
    assert job.concurrency_key == "tenant:5"
    assert (await store.get(gpu.id)).requires == {"gpu": "a100"}
