"""The REST API of ``create_app``, in process over ASGI, against a real SQLite store.

Every route, its success and error paths, the error envelope, auth scopes, and
one end-to-end run with an in-process worker. Contract: ``shared/API.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import conveyor.demo
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.domain.job import Finish
from conveyor.domain.states import Action, JobState
from conveyor.security.api_keys import new_api_key
from conveyor.settings import Settings
from support import async_wait_until

MAX_BODY = 2048
JSON_HEADERS = {"content-type": "application/json"}


@pytest.fixture
async def cv(tmp_path: Path) -> AsyncIterator[Conveyor]:
    app = Conveyor(
        settings=Settings(
            database_url=f"sqlite:///{tmp_path}/api.db",
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            shutdown_grace=2.0,
        )
    )
    conveyor.demo.register(app)
    await app.open()
    try:
        yield app
    finally:
        await app.close()


def client_for(cv: Conveyor, **options: Any) -> httpx.AsyncClient:
    api = create_app(cv, **options)
    # A 500 comes back as a response (with its envelope) instead of an exception.
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


@pytest.fixture
async def client(cv: Conveyor) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(cv, max_body_bytes=MAX_BODY) as c:
        yield c


# -- helpers ---------------------------------------------------------------------------------------
def assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["success"] is False
    assert isinstance(body["error"], str)
    assert body["error"].strip()
    return body


def detail_fields(body: dict[str, Any]) -> set[str]:
    details = body["details"]
    assert details, body
    for d in details:
        assert set(d) == {"field", "message"}
        assert d["message"]
    return {d["field"] for d in details}


async def total(c: httpx.AsyncClient) -> int:
    resp = await c.get("/api/jobs")
    assert resp.status_code == 200, resp.text
    return resp.json()["pagination"]["total"]


async def submit(c: httpx.AsyncClient, job_type: str = "test_job", **body: Any) -> str:
    body.setdefault("payload", {})
    resp = await c.post("/api/jobs", json={"job_type": job_type, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()["job_id"]


async def get_job(c: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    resp = await c.get(f"/api/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()["job"]


async def make_running(cv: Conveyor, job_id: str) -> Any:
    (job,) = await cv.store.fetch("w1", queues=["default"], job_types=[], limit=1, now=cv.now())
    assert job.id == job_id
    return job


async def make_failed(cv: Conveyor, job_id: str) -> None:
    job = await make_running(cv, job_id)
    (ok,) = await cv.store.finish_many(
        [Finish(job.id, job.lease_token, Action.FAIL, error="boom", job_type=job.job_type)],
        cv.now(),
    )
    assert ok


# -- POST /api/jobs --------------------------------------------------------------------------------
async def test_submit_returns_201_with_the_contract_shape(client):
    resp = await client.post(
        "/api/jobs",
        json={
            "job_type": "test_job",
            "payload": {"to": "a@b.c"},
            "priority": 70,
            "max_retries": 5,
            "timeout_ms": 30_000,
            "queue": "default",
            "metadata": {"source": "test"},
        },
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["success"] is True
    assert body["status"] == "pending"
    assert body["job_id"]
    assert body["duplicate"] is False
    created = datetime.fromisoformat(body["created_at"])
    assert created.tzinfo is not None
    assert abs(datetime.now(UTC) - created) < timedelta(minutes=1)

    job = await get_job(client, body["job_id"])
    assert job["job_id"] == job["id"] == body["job_id"]
    assert job["payload"] == {"to": "a@b.c"}
    assert (job["priority"], job["max_retries"], job["timeout_ms"]) == (70, 5, 30_000)
    assert job["metadata"] == {"source": "test"}
    assert job["created_by"] == "api"
    assert job["status"] == "pending"
    assert job["attempt"] == 0
    assert job["executions"] == []


async def test_submit_defaults_and_scheduled_at(client):
    later = datetime.now(UTC) + timedelta(hours=1)
    job_id = await submit(client, scheduled_at=later.isoformat())
    job = await get_job(client, job_id)
    assert (job["priority"], job["max_retries"], job["timeout_ms"]) == (50, 3, 300_000)
    assert job["queue"] == "default"
    assert abs(datetime.fromisoformat(job["scheduled_at"]) - later) < timedelta(seconds=1)


async def test_repeated_idempotency_key_returns_the_first_job(client):
    body = {"job_type": "test_job", "payload": {"n": 1}, "idempotency_key": "order-42"}
    first = await client.post("/api/jobs", json=body)
    assert first.status_code == 201, first.text
    again = await client.post("/api/jobs", json={**body, "payload": {"n": 2}})
    assert again.status_code == 200, again.text
    dup = again.json()
    assert dup["success"] is True
    assert dup["duplicate"] is True
    assert dup["job_id"] == first.json()["job_id"]
    assert dup["status"] == "pending"
    assert await total(client) == 1
    assert (await get_job(client, dup["job_id"]))["payload"] == {"n": 1}


async def test_depends_on_a_known_job_blocks_until_it_completes(client):
    parent = await submit(client)
    child = await submit(client, depends_on=[parent])
    job = await get_job(client, child)
    assert job["status"] == "blocked"
    assert job["depends_on"] == [parent]


BAD_BODIES: list[tuple[str, Any, set[str]]] = [
    ("missing job_type", {"payload": {}}, {"job_type"}),
    ("missing payload", {"job_type": "test_job"}, {"payload"}),
    ("priority as string", {"job_type": "test_job", "payload": {}, "priority": "5"}, {"priority"}),
    ("priority as bool", {"job_type": "test_job", "payload": {}, "priority": True}, {"priority"}),
    ("priority 101", {"job_type": "test_job", "payload": {}, "priority": 101}, {"priority"}),
    ("priority -1", {"job_type": "test_job", "payload": {}, "priority": -1}, {"priority"}),
    (
        "max_retries 101",
        {"job_type": "test_job", "payload": {}, "max_retries": 101},
        {"max_retries"},
    ),
    ("timeout_ms 0", {"job_type": "test_job", "payload": {}, "timeout_ms": 0}, {"timeout_ms"}),
    (
        "scheduled_at without zone",
        {"job_type": "test_job", "payload": {}, "scheduled_at": "2030-01-01T10:00:00"},
        {"scheduled_at"},
    ),
    (
        "scheduled_at not a date",
        {"job_type": "test_job", "payload": {}, "scheduled_at": "tomorrow"},
        {"scheduled_at"},
    ),
    ("unknown field", {"job_type": "test_job", "payload": {}, "colour": "red"}, {"colour"}),
    ("payload a list", {"job_type": "test_job", "payload": [1, 2]}, {"payload"}),
    ("payload a string", {"job_type": "test_job", "payload": "hi"}, {"payload"}),
    ("metadata a list", {"job_type": "test_job", "payload": {}, "metadata": []}, {"metadata"}),
    ("empty job_type", {"job_type": "", "payload": {}}, {"job_type"}),
    ("job_type with spaces", {"job_type": "send email", "payload": {}}, {"job_type"}),
    ("job_type too long", {"job_type": "x" * 101, "payload": {}}, {"job_type"}),
    (
        "payload does not fit the handler",
        {"job_type": "sleep", "payload": {"seconds": "x"}},
        {"payload.seconds"},
    ),
    (
        "depends_on not a list",
        {"job_type": "test_job", "payload": {}, "depends_on": "abc"},
        {"depends_on"},
    ),
    (
        "unknown depends_on id",
        {"job_type": "test_job", "payload": {}, "depends_on": ["no-such-job"]},
        {"depends_on"},
    ),
    ("body not an object", [{"job_type": "test_job", "payload": {}}], {"body"}),
    (
        "payload int beyond 64 bits",
        {"job_type": "test_job", "payload": {"n": 2**70}},
        {"payload.n"},
    ),
    (
        "idempotency_key too long",
        {"job_type": "test_job", "payload": {}, "idempotency_key": "k" * 256},
        {"idempotency_key"},
    ),
]


@pytest.mark.parametrize(
    ("body", "fields"), [(b, f) for _, b, f in BAD_BODIES], ids=[n for n, _, _ in BAD_BODIES]
)
async def test_invalid_submission_is_400_with_details_and_writes_nothing(client, body, fields):
    await submit(client)  # something already there, so "unchanged" means something
    before = await total(client)
    resp = await client.post("/api/jobs", json=body)
    err = assert_error(resp, 400)
    assert fields <= detail_fields(err), err
    assert await total(client) == before


async def test_scheduled_at_as_a_number_is_rejected(client):
    resp = await client.post(
        "/api/jobs", json={"job_type": "test_job", "payload": {}, "scheduled_at": 0}
    )
    assert await total(client) == 0
    assert "scheduled_at" in detail_fields(assert_error(resp, 400))


async def test_bad_metadata_value_names_metadata(client):
    resp = await client.post(
        "/api/jobs", json={"job_type": "test_job", "payload": {}, "metadata": {"n": 2**70}}
    )
    err = assert_error(resp, 400)
    assert await total(client) == 0
    assert detail_fields(err) == {"metadata.n"}


async def test_malformed_json_is_400_and_writes_nothing(client):
    before = await total(client)
    resp = await client.post(
        "/api/jobs", content=b'{"job_type": "test_job", "payload": {', headers=JSON_HEADERS
    )
    err = assert_error(resp, 400)
    assert "body" in detail_fields(err)
    assert "json" in err["error"].lower()
    assert await total(client) == before


async def test_empty_body_is_400(client):
    resp = await client.post("/api/jobs", content=b"", headers=JSON_HEADERS)
    assert_error(resp, 400)
    assert await total(client) == 0


def big_body() -> bytes:
    return b'{"job_type": "test_job", "payload": {"blob": "' + b"a" * (MAX_BODY + 100) + b'"}}'


async def test_body_over_max_body_bytes_is_413_and_writes_nothing(client):
    resp = await client.post("/api/jobs", content=big_body(), headers=JSON_HEADERS)
    err = assert_error(resp, 413)
    assert str(MAX_BODY) in err["error"]
    assert await total(client) == 0
    # Just under the limit is fine.
    ok = await client.post(
        "/api/jobs", json={"job_type": "test_job", "payload": {"blob": "a" * (MAX_BODY - 200)}}
    )
    assert ok.status_code == 201, ok.text


async def test_streamed_body_over_max_body_bytes_is_413(client):
    async def chunks() -> AsyncIterator[bytes]:
        body = big_body()
        for i in range(0, len(body), 256):
            yield body[i : i + 256]

    resp = await client.post("/api/jobs", content=chunks(), headers=JSON_HEADERS)
    assert await total(client) == 0
    assert_error(resp, 413)


# -- GET /api/jobs/{id} ----------------------------------------------------------------------------
async def test_get_job_lists_executions(cv, client):
    job_id = await submit(client, max_retries=0)
    await make_failed(cv, job_id)
    job = await get_job(client, job_id)
    assert job["status"] == "failed"
    assert job["attempt"] == 1
    assert job["error"] == "boom"
    (ex,) = job["executions"]
    assert set(ex) == {
        "attempt",
        "worker_id",
        "started_at",
        "finished_at",
        "outcome",
        "error",
        "payload_version",
        "traceback",
    }
    assert ex["traceback"] is None  # failed through the store, not by a raising handler
    assert ex["payload_version"] == job["payload_version"] == 1
    assert ex["attempt"] == 1
    assert ex["worker_id"] == "w1"
    assert ex["started_at"]
    assert ex["finished_at"]
    assert ex["error"] == "boom"
    assert ex["outcome"]


async def test_get_unknown_job_is_404(client):
    err = assert_error(await client.get("/api/jobs/no-such-job"), 404)
    assert "no-such-job" in err["error"]


# -- GET /api/jobs ---------------------------------------------------------------------------------
async def test_list_filters_paginates_and_sorts(cv, client):
    ids = [await submit(client, priority=p) for p in (10, 90, 50)]
    other = await submit(client, "sleep", payload={"seconds": 1}, queue="slow")

    resp = await client.get("/api/jobs")
    assert resp.status_code == 200
    body = resp.json()
    assert body["success"] is True
    assert body["pagination"] == {"limit": 50, "offset": 0, "total": 4, "has_more": False}
    assert [j["job_id"] for j in body["jobs"]] == [other, *reversed(ids)]  # newest first

    asc = (await client.get("/api/jobs?order=asc")).json()
    assert [j["job_id"] for j in asc["jobs"]] == [*ids, other]

    by_prio = (await client.get("/api/jobs?sort=priority&order=desc&job_type=test_job")).json()
    assert [j["priority"] for j in by_prio["jobs"]] == [90, 50, 10]

    page = (await client.get("/api/jobs?limit=2&offset=1&order=asc")).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[1:3]
    assert page["pagination"] == {"limit": 2, "offset": 1, "total": 4, "has_more": True}
    last = (await client.get("/api/jobs?limit=2&offset=2&order=asc")).json()
    assert last["pagination"]["has_more"] is False

    assert [j["job_id"] for j in (await client.get("/api/jobs?queue=slow")).json()["jobs"]] == [
        other
    ]
    by_type = (await client.get("/api/jobs?job_type=sleep")).json()
    assert by_type["pagination"]["total"] == 1

    await make_running(cv, ids[1])  # priority 90 is fetched first
    running = (await client.get("/api/jobs?status=running")).json()
    assert [j["job_id"] for j in running["jobs"]] == [ids[1]]
    both = (await client.get("/api/jobs?status=running,pending")).json()
    assert both["pagination"]["total"] == 4
    assert (await client.get("/api/jobs?status=completed")).json()["pagination"]["total"] == 0

    assert (await client.get("/api/jobs?created_by=api")).json()["pagination"]["total"] == 4
    assert (await client.get("/api/jobs?created_by=cli")).json()["pagination"]["total"] == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=bogus", "status"),
        ("status=pending,nope", "status"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("sort=bogus", "sort"),
        ("order=up", "order"),
    ],
)
async def test_list_rejects_bad_filters(client, query, field):
    err = assert_error(await client.get(f"/api/jobs?{query}"), 400)
    assert field in detail_fields(err)


@pytest.mark.parametrize(
    ("query", "unknown", "allowed"),
    [
        ("/api/jobs?state=bogus", "state", "status"),
        ("/api/jobs?status=failed&jobtype=email", "jobtype", "job_type"),
        ("/api/dlq?type=email", "type", "job_type"),
        ("/api/workflows?state=failed", "state", "status"),
        ("/api/schedules?state=paused", "state", "none"),
        ("/api/events?after=0&type=job_*", "type", "types"),
        ("/api/locks?all=true", "all", "include_free"),
        ("/api/webhooks?x=1", "x", "none"),
    ],
)
async def test_list_routes_refuse_unknown_params_naming_the_allowed_ones(
    client, query, unknown, allowed
):
    err = assert_error(await client.get(query), 400)
    assert detail_fields(err) == {unknown}
    assert allowed in err["error"]
    assert unknown in err["error"]


@pytest.mark.parametrize(
    ("query", "values"),
    [
        ("/api/jobs?status=bogus", "blocked, pending, running, completed, failed, cancelled"),
        ("/api/workflows?status=nope", "'running', 'completed', 'failed' or 'cancelled'"),
    ],
)
async def test_enum_filters_name_their_values(client, query, values):
    err = assert_error(await client.get(query), 400)
    assert values in err["error"]
    assert detail_fields(err) == {"status"}


async def test_every_route_refuses_unknown_and_repeated_params(cv, client):
    job_id = await submit(client, max_retries=0)
    await make_failed(cv, job_id)
    # Not only the lists: a state-changing route with a misspelled filter changed
    # everything (retry-all?job-type=x retried every dead letter).
    err = assert_error(await client.post("/api/dlq/retry-all?job-type=x"), 400)
    assert detail_fields(err) == {"job-type"}
    assert "job_type" in err["error"]  # names what it takes
    assert (await cv.store.get(job_id)).status == "failed"  # nothing retried
    err = assert_error(await client.delete(f"/api/jobs/{job_id}?force=1"), 400)
    assert detail_fields(err) == {"force"}
    err = assert_error(await client.get("/api/jobs?status=pending&status=failed"), 400)
    assert detail_fields(err) == {"status"}
    assert "more than once" in err["error"]
    assert (await client.get("/api/jobs?status=failed")).status_code == 200


@pytest.mark.parametrize("path", ["/api/jobs", "/api/dlq"])
async def test_huge_offset_is_400_not_500(client, path):
    assert (await client.get(f"{path}?offset={2**31 - 1}")).status_code == 200
    for offset in (2**31, 2**63):
        err = assert_error(await client.get(f"{path}?offset={offset}"), 400)
        assert "offset" in detail_fields(err)


# -- DELETE /api/jobs/{id} -------------------------------------------------------------------------
async def test_cancel_pending_job(client):
    job_id = await submit(client)
    resp = await client.delete(f"/api/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "success": True,
        "job_id": job_id,
        "status": "cancelled",
        "message": "Job cancelled",
    }
    assert (await get_job(client, job_id))["status"] == "cancelled"
    again = assert_error(await client.delete(f"/api/jobs/{job_id}"), 409)
    assert again["error"] == "Cannot cancel job in cancelled status"


async def test_cancel_blocked_job(client):
    parent = await submit(client)
    child = await submit(client, depends_on=[parent])
    resp = await client.delete(f"/api/jobs/{child}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"


async def test_cancel_running_job_is_202_cancelling(cv, client):
    job_id = await submit(client)
    await make_running(cv, job_id)
    resp = await client.delete(f"/api/jobs/{job_id}")
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "cancelling"
    assert resp.json()["message"].startswith("Cancel requested")
    job = await get_job(client, job_id)
    assert job["status"] == "cancelling"
    assert job["cancel_requested_at"]
    # Still cancelling until the worker confirms; asking again is not an error.
    again = await client.delete(f"/api/jobs/{job_id}")
    assert again.status_code == 202, again.text


async def test_cancel_completed_job_is_409(cv, client):
    job_id = await submit(client)
    job = await make_running(cv, job_id)
    (ok,) = await cv.store.finish_many(
        [Finish(job.id, job.lease_token, Action.COMPLETE, result={"ok": 1})], cv.now()
    )
    assert ok
    err = assert_error(await client.delete(f"/api/jobs/{job_id}"), 409)
    assert err["error"] == "Cannot cancel job in completed status"
    assert (await get_job(client, job_id))["status"] == "completed"


async def test_cancel_unknown_job_is_404(client):
    assert_error(await client.delete("/api/jobs/no-such-job"), 404)


# -- POST /api/jobs/{id}/retry ---------------------------------------------------------------------
async def test_retry_failed_job(cv, client):
    job_id = await submit(client, max_retries=0)
    await make_failed(cv, job_id)
    resp = await client.post(f"/api/jobs/{job_id}/retry")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "job_id": job_id, "status": "pending"}
    job = await get_job(client, job_id)
    assert job["status"] == "pending"
    # Pending now: retrying again is a conflict.
    err = assert_error(await client.post(f"/api/jobs/{job_id}/retry"), 409)
    assert "pending" in err["error"]


async def test_retry_pending_job_is_409_and_unknown_404(client):
    job_id = await submit(client)
    assert_error(await client.post(f"/api/jobs/{job_id}/retry"), 409)
    assert (await get_job(client, job_id))["status"] == "pending"
    assert_error(await client.post("/api/jobs/no-such-job/retry"), 404)


# -- dead-letter queue -----------------------------------------------------------------------------
async def test_dlq_list_retry_purge(cv, client):
    a = await submit(client, "fail", payload={"times": 1})
    b = await submit(client, "test_job")
    c = await submit(client, "fail", payload={"times": 2})
    live = await submit(client, "test_job")
    for job_id in (a, b, c):
        await make_failed(cv, job_id)

    resp = await client.get("/api/dlq")
    assert resp.status_code == 200, resp.text
    dlq = resp.json()
    assert dlq["success"] is True
    assert {j["job_id"] for j in dlq["jobs"]} == {a, b, c}
    assert all(j["status"] == "failed" for j in dlq["jobs"])
    assert dlq["pagination"]["total"] == 3
    assert (await client.get("/api/dlq?job_type=fail")).json()["pagination"]["total"] == 2
    page = (await client.get("/api/dlq?limit=1&offset=1")).json()
    assert len(page["jobs"]) == 1
    assert page["pagination"]["has_more"] is True
    assert_error(await client.get("/api/dlq?limit=0"), 400)

    # Retry one.
    resp = await client.post(f"/api/dlq/{a}/retry")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "pending"
    assert_error(await client.post(f"/api/dlq/{live}/retry"), 409)
    assert_error(await client.post("/api/dlq/no-such-job/retry"), 404)

    # Purge one (admin; anonymous on loopback is allowed while no key exists).
    resp = await client.delete(f"/api/dlq/{b}")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "purged": 1}
    assert_error(await client.get(f"/api/jobs/{b}"), 404)
    err = assert_error(await client.delete(f"/api/dlq/{live}"), 409)
    assert "pending" in err["error"]
    assert (await get_job(client, live))["status"] == "pending"
    assert_error(await client.delete("/api/dlq/no-such-job"), 404)

    assert {j["job_id"] for j in (await client.get("/api/dlq")).json()["jobs"]} == {c}


async def test_dlq_retry_all_by_job_type(cv, client):
    fails = [await submit(client, "fail", payload={"times": 1}) for _ in range(3)]
    other = await submit(client, "test_job")
    for job_id in (*fails, other):
        await make_failed(cv, job_id)

    resp = await client.post("/api/dlq/retry-all?job_type=fail")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "retried": 3}
    for job_id in fails:
        assert (await get_job(client, job_id))["status"] == "pending"
    assert (await get_job(client, other))["status"] == "failed"

    resp = await client.post("/api/dlq/retry-all")
    assert resp.json() == {"success": True, "retried": 1}
    assert (await client.get("/api/dlq")).json()["pagination"]["total"] == 0
    assert (await client.post("/api/dlq/retry-all")).json()["retried"] == 0


async def test_dlq_retry_all_leaves_internal_dead_letters_unless_asked(cv, client):
    from conveyor.domain.job import NewJob

    (hook,) = await cv.store.enqueue_many(
        [NewJob("conveyor.webhook", {"n": 1}, internal=True)], cv.now()
    )
    user = await submit(client, "fail", payload={"times": 1})
    for job_id in (hook.job.id, user):
        await make_failed(cv, job_id)
    assert (await client.post("/api/dlq/retry-all")).json()["retried"] == 1
    assert (await get_job(client, user))["status"] == "pending"
    assert (await cv.store.get(hook.job.id)).state is JobState.FAILED
    # Keyless loopback use is admin: asking by flag or by type includes them.
    asked = await client.post("/api/dlq/retry-all?include_internal=true")
    assert asked.json()["retried"] == 1
    assert (await cv.store.get(hook.job.id)).state is JobState.PENDING

    token, record = new_api_key("writer", "write", cv.now())
    await cv.store.create_api_key(record)
    headers = {"Authorization": f"Bearer {token}"}
    for query in ("?include_internal=true", "?job_type=conveyor.webhook"):
        refused = await client.post(f"/api/dlq/retry-all{query}", headers=headers)
        assert refused.status_code == 403, refused.text


# -- metrics ---------------------------------------------------------------------------------------
async def test_job_metrics_shape(cv, client):
    await submit(client)
    await submit(client)
    await submit(client, "fail", payload={"times": 1})
    await make_failed(cv, await submit(client, "test_job", priority=100))
    resp = await client.get("/api/jobs/metrics")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["success"] is True
    m = body["metrics"]
    assert set(m) >= {
        "queue_depths",
        "worker_health",
        "statistics",
        "throughput",
        "error_rates",
        "timestamp",
    }
    depths = m["queue_depths"]
    assert type(depths["pending"]) is int
    assert depths["pending"] == 3
    assert depths["running"] == 0
    assert depths["failed"] == depths["dlq"] == 1
    assert m["worker_health"] == []
    assert m["statistics"]["submitted"] == 4
    assert m["statistics"]["failed"] == 1
    assert set(m["throughput"]) == {"last_hour", "last_24h"}
    assert all(isinstance(v, int | float) for v in m["throughput"].values())
    assert m["error_rates"] == {"test_job": 1.0}
    ts = datetime.fromisoformat(m["timestamp"])
    assert abs(datetime.now(UTC) - ts) < timedelta(minutes=1)


# -- service endpoints -----------------------------------------------------------------------------
async def test_health_ready_docs_openapi(client):
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"success": True, "status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["success"] is True
    assert ready.json()["status"] == "ready"

    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path, method in [
        ("/api/jobs", "post"),
        ("/api/jobs", "get"),
        ("/api/jobs/{job_id}", "get"),
        ("/api/jobs/{job_id}", "delete"),
        ("/api/jobs/{job_id}/retry", "post"),
        ("/api/jobs/metrics", "get"),
        ("/api/dlq", "get"),
        ("/api/dlq/retry-all", "post"),
        ("/api/dlq/{job_id}/retry", "post"),
        ("/api/dlq/{job_id}", "delete"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)

    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text


async def test_prometheus_metrics(client):
    job_id = await submit(client)
    await client.get(f"/api/jobs/{job_id}")
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert 'conveyor_queue_depth{queue="default",state="pending"} 1.0' in text
    assert "conveyor_http_request_duration_seconds" in text
    # Labelled by route template, not by raw path (bounded cardinality).
    assert 'route="/api/jobs/{job_id}"' in text
    assert job_id not in text


async def test_prometheus_reports_outbox_lag(cv, client):
    await submit(client)
    await submit(client)
    latest = await cv.store.latest_event_id()
    await cv.store.claim_consumer("relay", "test", 10, cv.now())
    assert await cv.store.advance_consumer("relay", "test", latest - 1, cv.now())
    text = (await client.get("/metrics")).text
    assert 'conveyor_outbox_lag_events{consumer="relay"} 1.0' in text


async def test_unknown_url_and_method(client):
    err = assert_error(await client.get("/api/nope"), 404)
    assert "/docs" in err["error"]
    assert_error(await client.get("/no/such/page"), 404)
    assert_error(await client.put("/api/jobs"), 405)


# -- auth ------------------------------------------------------------------------------------------
async def add_key(cv: Conveyor, scope: str, name: str | None = None) -> str:
    key, record = new_api_key(name or f"{scope}-key", scope, cv.now())
    await cv.store.create_api_key(record)
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_anonymous_allowed_while_no_key_exists(client):
    assert (await client.get("/api/jobs")).status_code == 200
    assert (
        await client.post("/api/jobs", json={"job_type": "test_job", "payload": {}})
    ).status_code == 201


async def test_scopes(cv):
    read, write, admin = [await add_key(cv, s) for s in ("read", "write", "admin")]
    async with client_for(cv, allow_anonymous=True) as c:
        anon = await c.get("/api/jobs")
        err = assert_error(anon, 401)
        assert "conveyor keys create" in err["error"]
        assert anon.headers["www-authenticate"] == "Bearer"
        assert_error(await c.post("/api/jobs", json={"job_type": "test_job", "payload": {}}), 401)
        assert_error(await c.get("/api/jobs/metrics"), 401)
        assert_error(await c.get("/api/dlq"), 401)

        assert_error(await c.get("/api/jobs", headers=bearer("cvk_bogus_key")), 401)
        assert_error(await c.get("/api/jobs", headers={"Authorization": read}), 401)  # no Bearer

        # Service endpoints stay open.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200

        # read: GET only.
        assert (await c.get("/api/jobs", headers=bearer(read))).status_code == 200
        assert (await c.get("/api/jobs/metrics", headers=bearer(read))).status_code == 200
        denied = await c.post(
            "/api/jobs", json={"job_type": "test_job", "payload": {}}, headers=bearer(read)
        )
        err = assert_error(denied, 403)
        assert "read" in err["error"]
        assert "write" in err["error"]

        # write: submit, cancel, retry; not purge.
        resp = await c.post(
            "/api/jobs", json={"job_type": "test_job", "payload": {}}, headers=bearer(write)
        )
        assert resp.status_code == 201, resp.text
        job_id = resp.json()["job_id"]
        job = (await c.get(f"/api/jobs/{job_id}", headers=bearer(write))).json()["job"]
        assert job["created_by"] == "api:write-key"
        await make_failed(cv, job_id)
        err = assert_error(await c.delete(f"/api/dlq/{job_id}", headers=bearer(write)), 403)
        assert "admin" in err["error"]
        assert (await c.get(f"/api/jobs/{job_id}", headers=bearer(read))).status_code == 200

        # admin can.
        resp = await c.delete(f"/api/dlq/{job_id}", headers=bearer(admin))
        assert resp.status_code == 200, resp.text
        assert resp.json()["purged"] == 1

        # ?token= is for the WebSocket only: a REST request with a key in its URL
        # is refused, even a valid one (keys in URLs end up in logs).
        err = assert_error(await c.get(f"/api/jobs?token={read}"), 401)
        assert "only on the WebSocket" in err["error"]
        assert_error(
            await c.post(f"/api/jobs?token={admin}", json={"job_type": "test_job", "payload": {}}),
            401,
        )


async def test_revoked_key_is_rejected(cv):
    keep = await add_key(cv, "read", "keep")
    gone_key, gone = new_api_key("gone", "admin", cv.now())
    await cv.store.create_api_key(gone)
    async with client_for(cv) as c:
        assert (await c.get("/api/jobs", headers=bearer(gone_key))).status_code == 200
        await cv.store.revoke_api_key(gone.id, cv.now())
        assert_error(await c.get("/api/jobs", headers=bearer(gone_key)), 401)
        assert (await c.get("/api/jobs", headers=bearer(keep))).status_code == 200


async def test_anonymous_not_allowed_means_401_even_without_keys(cv):
    async with client_for(cv, allow_anonymous=False) as c:
        assert_error(await c.get("/api/jobs"), 401)
        assert_error(await c.post("/api/jobs", json={"job_type": "test_job", "payload": {}}), 401)
        assert (await c.get("/health")).status_code == 200
        assert (await cv.store.count_by_state())[JobState.PENDING] == 0


# -- end to end, with a real in-process worker -----------------------------------------------------
async def test_submit_and_run_with_an_in_process_worker(cv, client):
    worker = cv.worker(concurrency=4)
    task = asyncio.create_task(worker.run())
    try:
        ok = await submit(client, payload={"message": "hello"})
        doomed = await submit(client, "fail", payload={"times": 5, "permanent": True})

        async def status_of(job_id: str, wanted: str) -> dict[str, Any] | None:
            job = await get_job(client, job_id)
            return job if job["status"] == wanted else None

        done = await async_wait_until(lambda: status_of(ok, "completed"), 15, "completed")
        assert done["result"] == {"message": "hello"}
        assert done["attempt"] == 1
        assert [e["outcome"] for e in done["executions"]] == ["completed"]

        dead = await async_wait_until(lambda: status_of(doomed, "failed"), 15, "dead letter")
        assert "failing on purpose" in dead["error"]
        assert [j["job_id"] for j in (await client.get("/api/dlq")).json()["jobs"]] == [doomed]

        m = (await client.get("/api/jobs/metrics")).json()["metrics"]
        assert m["queue_depths"]["completed"] == 1
        (w,) = m["worker_health"]
        assert w["alive"] is True
        assert w["last_heartbeat"]
        assert done["executions"][0]["worker_id"] == w["worker_id"]
        assert m["error_rates"] == {"fail": 1.0, "test_job": 0.0}
        assert m["throughput"]["last_hour"] > 0
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None
