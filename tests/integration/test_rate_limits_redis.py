"""Rate limits shared through Redis: two API instances (as two processes would
be) count one address's failed authentications together."""

from __future__ import annotations

import secrets

import httpx

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.security.api_keys import new_api_key
from conveyor.settings import Settings
from redis_server import RedisServer


async def test_failures_are_counted_across_instances(redis_server: RedisServer) -> None:
    # A fresh address of our own: the Redis server is shared by the whole run.
    address = f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    settings = Settings(
        database_url="memory://", redis_url=redis_server.url, rate_limit_auth_failures="10/minute"
    )
    apps = [Conveyor(settings=settings), Conveyor(settings=settings)]
    codes: list[list[int]] = []
    try:
        for app in apps:
            await app.open()
            _, record = new_api_key("ops", "read", app.now())
            await app.store.create_api_key(record)  # keys exist: anonymous use is off
            transport = httpx.ASGITransport(app=create_app(app), client=(address, 4242))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as h:
                bad = {"Authorization": "Bearer cvk_0_nope"}
                codes.append(
                    [(await h.get("/api/jobs", headers=bad)).status_code for _ in range(6)]
                )
    finally:
        for app in apps:
            await app.close()
    assert codes[0] == [401] * 6
    assert codes[1] == [401] * 4 + [429] * 2  # the second instance saw the first's six
