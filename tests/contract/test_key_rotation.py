"""Contract: API key rotation with an overlap (every backend), through the store and
the API, on the app's clock; and no REST route creates a key (the CLI is the one
creation path)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from appkit import api_client
from storekit import at

from conveyor import Conveyor
from conveyor.domain.auth import ApiKey, Scope
from conveyor.domain.errors import ApiKeyNotFound, ValidationError
from conveyor.security.api_keys import (
    new_api_key,
    parse_overlap,
    resolve_key_id,
    rotated_key,
)
from conveyor.settings import Settings
from conveyor.storage.base import Store


class Clock:
    """The app's clock, moved by the test (no sleeping through an overlap)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@contextlib.asynccontextmanager
async def app_with_clock(store: Store, clock: Clock) -> AsyncIterator[Conveyor]:
    app = Conveyor(settings=Settings(database_url="memory://"), store=store, clock=clock)
    await app.open()
    try:
        yield app
    finally:
        await app.bus.close()


async def status(app: Conveyor, key: str) -> tuple[int, str]:
    async with api_client(app) as http:
        r = await http.get("/api/jobs", headers={"Authorization": f"Bearer {key}"})
    return r.status_code, r.json().get("error", "")


async def keys_by_id(store: Store) -> dict[str, ApiKey]:
    return {k.id: k for k in await store.list_api_keys()}


async def test_both_keys_work_during_the_overlap_and_the_old_one_expires(store: Store) -> None:
    clock = Clock()
    async with app_with_clock(store, clock) as app:
        old_text, old = new_api_key("ci", "write", clock())
        await store.create_api_key(old)
        assert await status(app, old_text) == (200, "")

        clock.advance(10)
        new_text, new, until = rotated_key(old, clock(), parse_overlap("1h"))
        await store.rotate_api_key(old.id, new, until, clock())
        keys = await keys_by_id(store)
        assert (keys[new.id].name, keys[new.id].scope) == ("ci", Scope.WRITE)
        assert keys[new.id].expires_at is None  # the old key had no lifetime
        assert keys[old.id].expires_at == clock() + timedelta(hours=1)
        assert keys[old.id].revoked_at is None

        clock.advance(3599)  # one second before the end of the overlap: both work
        assert await status(app, old_text) == (200, "")
        assert await status(app, new_text) == (200, "")

        clock.advance(1)
        code, error = await status(app, old_text)
        assert code == 401
        assert "This API key expired at" in error
        assert await status(app, new_text) == (200, "")


async def test_overlap_zero_revokes_the_old_key_at_once(store: Store) -> None:
    clock = Clock()
    async with app_with_clock(store, clock) as app:
        old_text, old = new_api_key("ops", "admin", clock())
        await store.create_api_key(old)
        new_text, new, until = rotated_key(old, clock(), parse_overlap("0"))
        await store.rotate_api_key(old.id, new, until, clock())
        assert (await keys_by_id(store))[old.id].revoked_at == clock()
        assert await status(app, old_text) == (401, "Invalid or revoked API key")
        assert await status(app, new_text) == (200, "")
        assert await store.count_api_keys() == 1


async def test_rotation_keeps_an_earlier_expiry_and_the_lifetime(store: Store) -> None:
    # A 90-day key with 10 minutes left: the new one gets 90 days, the old one
    # keeps its 10 minutes however long the overlap.
    _, old = new_api_key("ci", "read", at(0), expires_in=90 * 86_400)
    await store.create_api_key(old)
    now = at(90 * 86_400 - 600)
    _, new, until = rotated_key(old, now, parse_overlap("1d"))
    await store.rotate_api_key(old.id, new, until, now)
    keys = await keys_by_id(store)
    assert keys[old.id].expires_at == at(90 * 86_400)
    assert keys[new.id].expires_at == now + timedelta(days=90)
    assert keys[new.id].key_hash != old.key_hash
    # --expires-in wins over the inherited lifetime.
    _, newer, until = rotated_key(keys[new.id], now, 3600.0, expires_in=86_400)
    await store.rotate_api_key(new.id, newer, until, now)
    assert (await keys_by_id(store))[newer.id].expires_at == now + timedelta(days=1)


async def test_a_revoked_or_unknown_key_is_not_rotated(store: Store) -> None:
    _, old = new_api_key("ci", "read", at(0))
    await store.create_api_key(old)
    await store.revoke_api_key(old.id, at(1))
    _, new, until = rotated_key(old, at(2), 3600.0)
    with pytest.raises(ValidationError, match="is revoked"):
        await store.rotate_api_key(old.id, new, until, at(2))
    with pytest.raises(ApiKeyNotFound):
        await store.rotate_api_key("00000000", new, until, at(2))
    assert [k.id for k in await store.list_api_keys()] == [old.id]  # nothing was added


async def test_a_rotation_that_would_reuse_a_key_changes_nothing(store: Store) -> None:
    _, old = new_api_key("ci", "read", at(0))
    _, other = new_api_key("other", "read", at(0))
    await store.create_api_key(old)
    await store.create_api_key(other)
    with pytest.raises(ValidationError, match="already exists"):
        await store.rotate_api_key(old.id, other, at(3600), at(1))
    keys = await keys_by_id(store)
    assert keys[old.id].expires_at is None
    assert keys[old.id].revoked_at is None


def test_overlaps_and_id_prefixes() -> None:
    assert parse_overlap("0") == 0
    assert parse_overlap("1h") == 3600
    assert parse_overlap("30d") == 30 * 86_400
    for bad in ("31d", "-1h", "1.5h", "", "\x00", "9" * 20):
        with pytest.raises(ValidationError) as info:
            parse_overlap(bad)
        assert info.value.details[0].field == "overlap"
    _, old = new_api_key("k", "read", at(0))
    for bad in (-1.0, float("nan"), 31 * 86_400.0):
        with pytest.raises(ValidationError):
            rotated_key(old, at(0), bad)

    _, a = new_api_key("a", "read", at(0))
    _, b = new_api_key("b", "read", at(0))
    a = ApiKey(**{**_fields(a), "id": "abcd1234"})
    b = ApiKey(**{**_fields(b), "id": "abce5678"})
    assert resolve_key_id("abcd1234", [a, b]) is a
    assert resolve_key_id("ABCD", [a, b]) is a
    with pytest.raises(ValidationError, match="not an API key id"):
        resolve_key_id("abc", [a, b])  # shorter than 4 characters
    with pytest.raises(ValidationError, match="ambiguous"):
        resolve_key_id("abcd", [a, b, ApiKey(**{**_fields(a), "id": "abcd9999"})])
    with pytest.raises(ApiKeyNotFound):
        resolve_key_id("ffff", [a, b])
    for bad in ("", "ab", "ab\x00c", "../..", "a" * 65):
        with pytest.raises(ValidationError):
            resolve_key_id(bad, [a, b])


def _fields(key: ApiKey) -> dict[str, object]:
    return {f: getattr(key, f) for f in key.__slots__}


async def test_no_rest_route_creates_a_key(store: Store) -> None:
    """Keys are made by the CLI only: no route under /api takes a POST, PUT or
    PATCH about keys, and trying one with an admin key adds none."""
    from conveyor.api.app import create_app

    async with app_with_clock(store, Clock()) as app:
        api = create_app(app)
        writes = {
            (route.path, method)
            for route in api.routes
            for method in getattr(route, "methods", set()) or set()
            if method in ("POST", "PUT", "PATCH")
        }
        assert not [w for w in writes if "key" in w[0].lower()], writes
        admin_text, admin = new_api_key("ops", "admin", app.now())
        await store.create_api_key(admin)
        headers = {"Authorization": f"Bearer {admin_text}"}
        async with api_client(app) as http:
            for path in ("/api/keys", "/api/api-keys", "/api/keys/rotate", "/api/auth/keys"):
                for method in ("POST", "PUT", "PATCH"):
                    r = await http.request(
                        method, path, headers=headers, json={"scope": "admin", "name": "x"}
                    )
                    assert r.status_code in (404, 405), (method, path, r.status_code)
        assert [k.id for k in await store.list_api_keys()] == [admin.id]
