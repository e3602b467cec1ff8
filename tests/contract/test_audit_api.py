"""``/api/audit`` and the entries the REST API writes, on every backend: actors
from the request's key, request ids, one entry per change, failed-auth bursts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from appkit import app_on

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.domain.audit import AuditQuery
from conveyor.security.api_keys import new_api_key
from conveyor.security.vault import MasterKey
from conveyor.storage.base import Store


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    settings = {"master_key": MasterKey.generate().to_base64(), "allow_unknown_job_types": True}
    async with app_on(store, **settings) as conveyor:
        yield conveyor


async def keys(app: Conveyor) -> dict[str, dict[str, str]]:
    found = {}
    for scope in ("read", "write", "admin"):
        key, record = new_api_key(f"{scope}-key", scope, app.now())
        await app.store.create_api_key(record)
        found[scope] = {"Authorization": f"Bearer {key}"}
    return found


def client(api: object) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def entries(app: Conveyor) -> list:
    return await app.store.list_audit(AuditQuery(limit=1000))


async def test_changes_are_audited_with_actor_and_request_id(app: Conveyor) -> None:
    h = await keys(app)
    async with client(create_app(app)) as http:
        r = await http.post(
            "/api/jobs",
            json={"job_type": "t", "payload": {"a": 1}},
            headers={**h["write"], "X-Request-Id": "req-123"},
        )
        assert r.status_code == 201, r.text
        assert r.headers["x-request-id"] == "req-123"
        job_id = r.json()["job_id"]
        r = await http.delete(f"/api/jobs/{job_id}", headers=h["write"])
        assert r.status_code == 200, r.text
        generated = r.headers["x-request-id"]
        assert len(generated) == 32
        # A refused change (already cancelled) writes nothing.
        assert (await http.delete(f"/api/jobs/{job_id}", headers=h["write"])).status_code == 409
        r = await http.post("/api/queues/mail/pause", headers=h["write"])
        assert r.status_code == 200
        bad = await http.post(
            "/api/jobs",
            json={"job_type": "t", "payload": {}},
            headers={**h["write"], "X-Request-Id": "a b"},
        )
        assert bad.status_code == 201, bad.text
        assert bad.headers["x-request-id"] != "a b"  # not an id we accept: a fresh one
    rows = await entries(app)
    got = [(e.action, e.resource_id, e.actor, e.request_id) for e in rows[:3]]
    assert got == [
        ("job.submit", job_id, "write-key", "req-123"),
        ("job.cancel", job_id, "write-key", generated),
        ("queue.pause", "mail", "write-key", rows[2].request_id),
    ]
    assert [e.action for e in rows] == ["job.submit", "job.cancel", "queue.pause", "job.submit"]
    assert rows[0].summary["job_type"] == "t"


async def test_list_filters_pages_and_admin_only(app: Conveyor) -> None:
    h = await keys(app)
    async with client(create_app(app)) as http:
        ids = []
        for _ in range(3):
            r = await http.post(
                "/api/jobs", json={"job_type": "t", "payload": {}}, headers=h["write"]
            )
            ids.append(r.json()["job_id"])
        await http.delete(f"/api/jobs/{ids[1]}", headers=h["admin"])
        for scope in ("read", "write"):
            r = await http.get("/api/audit", headers=h[scope])
            assert r.status_code == 403
        r = await http.get("/api/audit", params={"resource_id": ids[1]}, headers=h["admin"])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True
        assert body["next_after"] is None
        assert [(e["action"], e["actor"]) for e in body["entries"]] == [
            ("job.submit", "write-key"),
            ("job.cancel", "admin-key"),
        ]
        r = await http.get("/api/audit", params={"limit": 2}, headers=h["admin"])
        assert [e["seq"] for e in r.json()["entries"]] == [1, 2]
        assert r.json()["next_after"] == 2
        r = await http.get("/api/audit", params={"after": 2, "limit": 2}, headers=h["admin"])
        assert [e["seq"] for e in r.json()["entries"]] == [3, 4]
        r = await http.get("/api/audit", params={"action": "job.cancel"}, headers=h["admin"])
        assert [e["resource_id"] for e in r.json()["entries"]] == [ids[1]]
        r = await http.get("/api/audit", params={"actor": "admin-key"}, headers=h["admin"])
        assert len(r.json()["entries"]) == 1
        entry = r.json()["entries"][0]
        assert set(entry) >= {"seq", "at", "prev_hash", "hash", "summary", "request_id"}
        for bad in (
            {"limit": 0},
            {"limit": 1001},
            {"after": -1},
            {"after": "x"},
            {"after": "NaN"},
            {"actor": ""},
            {"resource_id": "r" * 501},
            {"after": str(2**63)},
        ):
            r = await http.get("/api/audit", params=bad, headers=h["admin"])
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["success"] is False
            assert r.json()["details"]


async def test_secret_changes_and_reads(app: Conveyor) -> None:
    h = await keys(app)
    async with client(create_app(app)) as http:
        r = await http.post(
            "/api/secrets", json={"name": "smtp", "value": "v1"}, headers=h["admin"]
        )
        assert r.status_code == 201
        await http.put("/api/secrets/smtp", json={"value": "v2"}, headers=h["admin"])
        assert await app.secrets.get("smtp") == "v2"
        await app.audit.drain()
        await http.delete("/api/secrets/smtp", headers=h["admin"])
    rows = await entries(app)
    assert [(e.action, e.actor) for e in rows] == [
        ("secret.set", "admin-key"),
        ("secret.set", "admin-key"),
        ("secret.read", "system"),
        ("secret.delete", "admin-key"),
    ]
    assert rows[2].summary == {"version": 2}
    assert all("v1" not in str(e.to_dict()) and "v2" not in str(e.summary) for e in rows)


async def test_conveyors_own_reads_of_its_secrets_are_not_entries(app: Conveyor) -> None:
    from conveyor.auditing import acting_as

    await app.secrets.set("conveyor.webhook.w1", "signing")  # a change: recorded
    for _ in range(3):  # a delivery each: Conveyor (system) reads its own secret
        assert await app.secrets.get("conveyor.webhook.w1") == "signing"
    with acting_as("cli:ops"):  # a person reading it is recorded
        await app.secrets.get("conveyor.webhook.w1")
    rows = await entries(app)
    assert [(e.action, e.actor) for e in rows] == [
        ("secret.set", "system"),
        ("secret.read", "cli:ops"),
    ]


async def test_auth_failures_become_one_entry_per_address_and_minute(app: Conveyor) -> None:
    await keys(app)
    api = create_app(app)
    async with client(api) as http:
        for _ in range(7):
            r = await http.get("/api/jobs", headers={"Authorization": "Bearer wrong"})
            assert r.status_code in (401, 429)
        assert await entries(app) == []  # the window is still open
        await api.state.failed_auth.close()
    (entry,) = await entries(app)
    assert entry.action == "auth.failed"
    assert entry.resource_type == "client"
    assert entry.summary["count"] == 7
    assert entry.summary["window_seconds"] == 60


async def test_failures_from_very_many_addresses_make_a_bounded_number_of_entries(
    app: Conveyor,
) -> None:
    # A spoofed X-Forwarded-For per request (or an IPv6 range) made one permanent
    # entry per request and grew the server's memory.
    from conveyor.api.audit import _MAX_ADDRESSES, AuthFailureBursts

    bursts = AuthFailureBursts(app, clock=lambda: 600.0)
    for i in range(_MAX_ADDRESSES + 500):
        bursts.hit(f"10.0.{i // 250}.{i % 250}")
    bursts.hit("10.0.0.0")  # a known one still counts on its own
    await bursts.close()
    await app.audit.drain()
    rows = await entries(app)
    assert len(rows) == _MAX_ADDRESSES + 1
    other = [e for e in rows if e.resource_id == "*"]
    assert [e.summary["count"] for e in other] == [500]
    first = next(e for e in rows if e.resource_id == "10.0.0.0")
    assert first.summary["count"] == 2
