"""The contract suite's adapters: every test taking ``store`` runs once per adapter.

``ADAPTERS`` is the one place to add a backend: a factory that opens a fresh,
empty store in ``tmp_path`` and closes it afterwards. The test id is its key.

``postgres`` opens each store on its own database cloned from the session's
migrated template (``pg_template`` in tests/conftest.py), so the server only
starts when a postgres test runs. It skips while ``conveyor.storage.postgres``
does not exist; without PostgreSQL binaries it skips locally and fails in CI.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conveyor.storage.base import Store
from conveyor.storage.memory import MemoryStore
from conveyor.storage.sqlite import SQLiteStore
from pg import TemplateDatabase

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


class _Postgres:
    """A store on a fresh clone of the template; ``bind`` it to the session first."""

    template: TemplateDatabase | None = None

    def bind(self, request: pytest.FixtureRequest) -> None:
        if importlib.util.find_spec("conveyor.storage.postgres") is None:
            pytest.skip("conveyor.storage.postgres does not exist yet")
        self.template = request.getfixturevalue("pg_template")

    @contextlib.asynccontextmanager
    async def __call__(self, tmp_path: Path) -> AsyncIterator[Store]:
        from conveyor.storage.postgres import PostgresStore

        if self.template is None:
            raise RuntimeError("the postgres adapter is used before bind(request)")
        with self.template.database() as dsn:
            store = PostgresStore(dsn)
            await store.open()
            try:
                yield store
            finally:
                await store.close()


_postgres = _Postgres()

ADAPTERS: dict[str, StoreFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=list(ADAPTERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "postgres":
        _postgres.bind(request)
    async with ADAPTERS[request.param](tmp_path) as opened:
        yield opened


@pytest.fixture(scope="session")
def adapters(request: pytest.FixtureRequest) -> dict[str, StoreFactory]:
    """Every factory, for tests that open their own stores (the randomised model test).

    Without postgres (adapter not written yet, or no server binaries outside CI)
    the others still run; the ``store[postgres]`` skips say why.
    """
    try:
        _postgres.bind(request)
    except pytest.skip.Exception:
        return {name: f for name, f in ADAPTERS.items() if name != "postgres"}
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
