"""A Conveyor app on the contract suite's store (every backend), and the waits and
API client the app-level contract tests share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from conveyor.storage.base import Store
from support import async_wait_until

FINAL = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@contextlib.asynccontextmanager
async def app_on(
    store: Store, register: Callable[[Conveyor], Any] | None = None, **settings: Any
) -> AsyncIterator[Conveyor]:
    """An opened app on ``store`` (short heartbeats; ``settings`` override). The store
    fixture closes the store; this closes the rest."""
    options: dict[str, Any] = {"database_url": "memory://", "heartbeat_interval": 0.2}
    app = Conveyor(settings=Settings(**{**options, **settings}), store=store)
    if register is not None:
        register(app)
    await app.open()
    try:
        yield app
    finally:
        await app.bus.close()


async def finished(app: Conveyor, ids: list[str], timeout: float = 20) -> dict[str, Any]:
    """The jobs ``ids`` once every one is in a final state (AssertionError past ``timeout``)."""

    async def done() -> dict[str, Any] | None:
        jobs = {i: await app.store.get(i) for i in ids}
        return jobs if all(j.state in FINAL for j in jobs.values()) else None

    return await async_wait_until(done, timeout, f"jobs {ids} to finish")


def api_client(app: Conveyor) -> httpx.AsyncClient:
    """An in-process HTTP client of ``create_app(app)`` (a 500 comes back as a response)."""
    transport = httpx.ASGITransport(app=create_app(app), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")
