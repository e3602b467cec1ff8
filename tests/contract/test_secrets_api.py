"""``/api/secrets`` on every backend: admin only, values write-only, one validation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.security.api_keys import new_api_key
from conveyor.security.vault import MasterKey
from conveyor.storage.base import Store

VALUE = "s3cr3t-value-never-returned"


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, master_key=MasterKey.generate().to_base64()) as conveyor:
        yield conveyor


async def keys(app: Conveyor) -> dict[str, dict[str, str]]:
    found = {}
    for scope in ("read", "write", "admin"):
        key, record = new_api_key(scope, scope, app.now())
        await app.store.create_api_key(record)
        found[scope] = {"Authorization": f"Bearer {key}"}
    return found


async def test_values_are_write_only(app: Conveyor) -> None:
    h = await keys(app)
    async with api_client(app) as http:
        r = await http.post(
            "/api/secrets", json={"name": "smtp", "value": VALUE}, headers=h["admin"]
        )
        assert r.status_code == 201, r.text
        assert r.json()["secret"]["version"] == 1
        r2 = await http.put("/api/secrets/smtp", json={"value": VALUE + "2"}, headers=h["admin"])
        assert r2.json()["secret"]["version"] == 2
        listing = await http.get("/api/secrets", headers=h["admin"])
        assert listing.json()["secrets"][0]["name"] == "smtp"
        assert listing.json()["secrets"][0]["versions"] == 2
        for resp in (r, r2, listing):
            assert VALUE not in resp.text
        assert (await http.get("/api/secrets/smtp", headers=h["admin"])).status_code in (404, 405)
        assert await app.secrets.get("smtp") == VALUE + "2"
        r = await http.delete("/api/secrets/smtp", headers=h["admin"])
        assert r.status_code == 200
        r = await http.delete("/api/secrets/smtp", headers=h["admin"])
        assert r.status_code == 404
        assert r.json()["success"] is False


async def test_only_admin_keys(app: Conveyor) -> None:
    h = await keys(app)
    async with api_client(app) as http:
        for scope in ("read", "write"):
            r = await http.get("/api/secrets", headers=h[scope])
            assert r.status_code == 403
            r = await http.post("/api/secrets", json={"name": "a", "value": "b"}, headers=h[scope])
            assert r.status_code == 403
        assert (await http.get("/api/secrets")).status_code == 401
    assert await app.secrets.list() == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "a b", "value": "x"},
        {"name": "", "value": "x"},
        {"name": "x" * 101, "value": "x"},
        {"name": "ok", "value": ""},
        {"name": "ok", "value": 7},
        {"name": "ok", "value": None},
        {"name": "ok", "value": "x" * (64 * 1024 + 1)},
        {"name": "ok", "value": "x", "extra": 1},
        {"name": ["ok"], "value": "x"},
    ],
)
async def test_hostile_bodies_get_400_and_change_nothing(app: Conveyor, body: object) -> None:
    h = await keys(app)
    async with api_client(app) as http:
        r = await http.post("/api/secrets", json=body, headers=h["admin"])
        assert r.status_code == 400, r.text
        assert r.json()["details"]
        r = await http.put("/api/secrets/bad%20name", json={"value": "x"}, headers=h["admin"])
        assert r.status_code == 400
    assert await app.secrets.list() == []


async def test_without_a_master_key_503(store: Store) -> None:
    async with app_on(store) as app, api_client(app) as http:
        r = await http.post("/api/secrets", json={"name": "a", "value": "b"})
        assert r.status_code == 503
        assert "CONVEYOR_MASTER_KEY" in r.json()["error"]
        assert (await http.get("/api/secrets")).json()["secrets"] == []


async def test_bad_key_in_settings_503_not_500(store: Store) -> None:
    async with app_on(store, master_key="not base64!") as app, api_client(app) as http:
        r = await http.post("/api/secrets", json={"name": "a", "value": "b"})
        assert r.status_code == 503
        assert "not base64" not in r.text  # the key's problem goes to the operator only
