"""Request rate limits against ``create_app`` (in-process client, every backend):
a burst of bad keys gets 429 with Retry-After; a keyed client is unaffected;
each key has its own budget."""

from __future__ import annotations

import asyncio

from appkit import api_client, app_on

from conveyor.security.api_keys import new_api_key
from conveyor.storage.base import Store


async def test_a_burst_of_bad_keys_gets_429_a_keyed_client_does_not(store: Store) -> None:
    async with app_on(store) as app:
        key, record = new_api_key("ops", "read", app.now())
        await app.store.create_api_key(record)
        good = {"Authorization": f"Bearer {key}"}
        async with api_client(app) as http:

            async def bad(i: int) -> tuple[int, str | None]:
                r = await http.get("/api/jobs", headers={"Authorization": f"Bearer cvk_x_{i}"})
                return r.status_code, r.headers.get("retry-after")

            async def normal() -> list[int]:
                codes = []
                for _ in range(50):
                    codes.append((await http.get("/api/jobs", headers=good)).status_code)
                return codes

            burst = asyncio.gather(*(bad(i) for i in range(1000)))
            results, normal_codes = await asyncio.gather(burst, normal())
    codes = [c for c, _ in results]
    assert set(codes) <= {401, 429}
    assert codes.count(401) <= 30  # the default: 30 failures a minute per address
    assert codes.count(429) >= 970
    assert all(int(ra) >= 1 for c, ra in results if c == 429 and ra is not None)
    assert all(ra is not None for c, ra in results if c == 429)
    assert normal_codes == [200] * 50


async def test_each_key_has_its_own_budget(store: Store) -> None:
    async with app_on(store, rate_limit="5/minute") as app:
        headers = []
        for name in ("a", "b"):
            key, record = new_api_key(name, "read", app.now())
            await app.store.create_api_key(record)
            headers.append({"Authorization": f"Bearer {key}"})
        async with api_client(app) as http:
            first = [
                (await http.get("/api/jobs", headers=headers[0])).status_code for _ in range(6)
            ]
            other = (await http.get("/api/jobs", headers=headers[1])).status_code
            limited = await http.get("/api/jobs", headers=headers[0])
    assert first == [200] * 5 + [429]
    assert other == 200
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["success"] is False
    assert "this API key allows 5 per 1 minute" in limited.json()["error"]


async def test_limits_off(store: Store) -> None:
    async with app_on(store, rate_limits=False, rate_limit="1/minute") as app:
        key, record = new_api_key("a", "read", app.now())
        await app.store.create_api_key(record)
        async with api_client(app) as http:
            codes = {
                (
                    await http.get("/api/jobs", headers={"Authorization": f"Bearer {key}"})
                ).status_code
                for _ in range(5)
            }
    assert codes == {200}
