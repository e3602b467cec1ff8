"""The contract suite's adapters: every test taking ``store`` runs once per adapter.

``ADAPTERS`` is the one place to add a backend: a factory that opens a fresh,
empty store in ``tmp_path`` and closes it afterwards. The test id is its key.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conveyor.storage.base import Store
from conveyor.storage.memory import MemoryStore
from conveyor.storage.sqlite import SQLiteStore

StoreFactory = Callable[[Path], contextlib.AbstractAsyncContextManager[Store]]


@contextlib.asynccontextmanager
async def _memory(tmp_path: Path) -> AsyncIterator[Store]:
    async with MemoryStore() as store:
        yield store


@contextlib.asynccontextmanager
async def _sqlite(tmp_path: Path) -> AsyncIterator[Store]:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


ADAPTERS: dict[str, StoreFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
}


@pytest.fixture(params=list(ADAPTERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with ADAPTERS[request.param](tmp_path) as opened:
        yield opened


@pytest.fixture(scope="session")
def adapters() -> dict[str, StoreFactory]:
    """Every factory, for tests that open their own stores (the randomised model test)."""
    return ADAPTERS


@pytest.fixture
def adapter(request: pytest.FixtureRequest, store: Store) -> str:
    """The id of the adapter under test (``memory``, ``sqlite``, ...)."""
    return request.node.callspec.params["store"]


@pytest.fixture
def known_bug(request: pytest.FixtureRequest, adapter: str):
    """``known_bug({"memory"}, "bug: ...")`` marks this run strict-xfail on those adapters."""

    def mark(adapters: set[str], reason: str, raises: tuple[type[BaseException], ...] = ()) -> None:
        if adapter in adapters:
            # Only a failed assertion (or a missing expected exception, or what
            # ``raises`` names) counts as the known bug; any other error still fails.
            request.applymarker(
                pytest.mark.xfail(
                    reason=reason,
                    strict=True,
                    raises=(AssertionError, pytest.fail.Exception, *raises),
                )
            )

    return mark
