"""Contract: API key expiry and ``last_used_at`` (every backend), through the store
and through the API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from appkit import api_client, app_on
from storekit import at

from conveyor.domain.errors import ValidationError
from conveyor.security.api_keys import new_api_key, parse_duration
from conveyor.storage.base import Store


async def test_expiry_and_last_used_round_trip(store: Store) -> None:
    _, record = new_api_key("ci", "write", at(0), expires_in=90 * 86_400)
    await store.create_api_key(record)
    found = await store.find_api_key(record.key_hash)
    assert found is not None
    assert found.expires_at == at(90 * 86_400)
    assert found.last_used_at is None
    assert not found.expired(at(90 * 86_400 - 1))
    assert found.expired(at(90 * 86_400))
    await store.touch_api_key(record.id, at(10))
    await store.touch_api_key(record.id, at(5))  # never moves back
    (listed,) = await store.list_api_keys()
    assert listed.last_used_at == at(10)
    await store.touch_api_key("nope", at(10))  # an unknown key: nothing to do


def test_durations_and_bad_lifetimes() -> None:
    assert parse_duration("90d") == 90 * 86_400
    assert parse_duration("12h") == 43_200
    assert parse_duration("2w") == 14 * 86_400
    assert parse_duration("3600") == 3600
    for bad in ("", "abc", "-1d", "1.5d", "9y", "1e9", "\x00", "9" * 20):
        with pytest.raises(ValidationError):
            parse_duration(bad)
    for seconds in (0, 59, 11 * 365 * 86_400, float("nan")):
        with pytest.raises(ValidationError):
            new_api_key("k", "read", at(0), expires_in=seconds)


async def test_an_expired_key_gets_a_clear_401(store: Store) -> None:
    async with app_on(store) as app:
        old, expired = new_api_key("old", "read", app.now() - timedelta(days=2), 86_400)
        fresh, live = new_api_key("new", "read", app.now(), 86_400)
        await app.store.create_api_key(expired)
        await app.store.create_api_key(live)
        async with api_client(app) as http:
            r = await http.get("/api/jobs", headers={"Authorization": f"Bearer {old}"})
            assert r.status_code == 401
            assert "This API key expired at" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
            ok = await http.get("/api/jobs", headers={"Authorization": f"Bearer {fresh}"})
            assert ok.status_code == 200
        used = {k.name: k.last_used_at for k in await app.store.list_api_keys()}
        assert used["new"] is not None
        assert used["old"] is None
