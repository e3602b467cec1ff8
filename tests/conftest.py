"""Fixtures shared by every suite: a real PostgreSQL server, started only when asked for.

``pg_server`` is one private cluster for the whole run (see ``pg.py``), started
the first time a test needs it. ``pg_template`` is database ``conveyor_template``
with Conveyor's migrations applied once; ``postgres_dsn`` hands each test its
own clone of it (``CREATE DATABASE test_<n> TEMPLATE conveyor_template``),
dropped afterwards. Without PostgreSQL binaries the tests that need them skip,
or fail when ``$CI`` is set: CI must not go green by skipping the database.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from pg import PostgresServer, PostgresUnavailable, TemplateDatabase
from redis_server import RedisServer, RedisUnavailable

TEMPLATE = "conveyor_template"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def postgres_store_exists() -> bool:
    return importlib.util.find_spec("conveyor.storage.postgres") is not None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        if in_ci():
            pytest.fail(f"{exc}. CI must run the PostgreSQL tests: install it.", pytrace=False)
        pytest.skip(
            f"{exc}. Install it with `apt-get install -y postgresql` (scripts/test.sh does "
            "this when run as root) or point $CONVEYOR_PG_BIN at its bin directory."
        )
    try:
        yield server
    finally:
        server.stop()


def prepare_template(dsn: str) -> None:
    """Bring the template to the current schema: what every test database starts with."""
    if not postgres_store_exists():
        return  # the adapter is not written yet: the template stays an empty database
    # An import error inside an existing module must fail, not skip.
    from conveyor.storage.postgres import PostgresStore

    async def migrate() -> None:
        store = PostgresStore(dsn)
        await store.open()  # applies the migrations
        await store.close()

    _run_in_own_loop(migrate)


def _run_in_own_loop(make_coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``asyncio.run`` in a thread: never touches the event loop pytest-asyncio manages."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(make_coro())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="pg-template")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def pg_template(pg_server: PostgresServer) -> TemplateDatabase:
    return pg_server.create_template(TEMPLATE, prepare_template)


@pytest.fixture
def postgres_dsn(pg_template: TemplateDatabase) -> Iterator[str]:
    """A fresh, migrated, otherwise empty database for this test only."""
    with pg_template.database() as dsn:
        yield dsn


# -- Redis -------------------------------------------------------------------------------
REDIS_HINT = (
    "Install it with `apt-get install -y redis-server` (scripts/test.sh does this when "
    "run as root) or point $CONVEYOR_REDIS_BIN at a redis-server binary."
)


def start_redis() -> RedisServer:
    try:
        return RedisServer().start()
    except RedisUnavailable as exc:
        if in_ci():
            pytest.fail(f"{exc}. CI must run the Redis tests: install it.", pytrace=False)
        pytest.skip(f"{exc}. {REDIS_HINT}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server (own port and dir, AOF fsync always) for the whole run."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    server = start_redis()
    try:
        yield server
    finally:
        server.close()
