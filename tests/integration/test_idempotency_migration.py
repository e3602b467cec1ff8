"""Migration 0004 on a database written by the previous version, where a key could
be reused once its job had finished: one job per key keeps it (the active one,
else the newest), the others lose only the key, and the key is then unique."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import conveyor.storage.postgres as pg_module
import conveyor.storage.sqlite as sqlite_module
from conveyor.domain.job import Finish, NewJob
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store
from conveyor.storage.postgres import PostgresStore
from conveyor.storage.sql import load_migrations
from conveyor.storage.sqlite import SQLiteStore

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


#: Later migrations adding columns that today's fetch and finish read or write: the old
#: history is written by today's code, so these are applied ahead (they touch
#: nothing 0004 changes).
WRITTEN_BY_TODAYS_CODE = {7, 8, 9, 11, 17, 18}


def only_up_to(version: int, backend: str) -> Callable[[str], list[Any]]:
    def load(name: str) -> list[Any]:
        assert name == backend
        return [
            m
            for m in load_migrations(name)
            if m.version <= version or m.version in WRITTEN_BY_TODAYS_CODE
        ]

    return load


async def old_history(store: Store, set_key: Callable[[str, str], Any]) -> dict[str, str]:
    """Jobs as the previous version could leave them: per key, finished jobs and at
    most one active one. Returns {name: job id}."""
    names = ["k_done_1", "k_done_2", "k_pending", "k2_done_1", "k2_done_2", "plain"]
    results = await store.enqueue_many([NewJob(n) for n in names], NOW)
    ids = {n: r.job.id for n, r in zip(names, results, strict=True)}
    finished = [n for n in names if "done" in n]
    for i, name in enumerate(finished):
        (job,) = await store.fetch("w", queues=(), job_types=(name,), limit=1, now=at(i))
        assert job.lease_token is not None
        finish = Finish(job.id, job.lease_token, Action.COMPLETE, result={"i": i})
        assert await store.finish_many([finish], at(i + 0.5)) == [True]
    for name in names:
        if name != "plain":
            await set_key(ids[name], name.split("_")[0])
    return ids


@asynccontextmanager
async def sqlite_at_0003(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    path = tmp_path / "old.db"
    monkeypatch.setattr(sqlite_module, "load_migrations", only_up_to(3, "sqlite"))
    store = SQLiteStore(str(path))
    await store.open()

    async def set_key(job_id: str, key: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE jobs SET idempotency_key = ? WHERE id = ?", (key, job_id))

    try:
        yield store, set_key, lambda: SQLiteStore(str(path))
    finally:
        await store.close()


@asynccontextmanager
async def postgres_at_0003(pg_server: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    name = f"old_{uuid.uuid4().hex[:12]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.dsn(name)
    monkeypatch.setattr(pg_module, "load_migrations", only_up_to(3, "postgres"))
    store = PostgresStore(dsn)
    await store.open()

    async def set_key(job_id: str, key: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "UPDATE conveyor.jobs SET idempotency_key = $1 WHERE id = $2", key, job_id
            )
        finally:
            await conn.close()

    try:
        yield store, set_key, lambda: PostgresStore(dsn)
    finally:
        await store.close()
        pg_server.drop_database(name)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_upgrade_keeps_one_job_per_key(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        old = sqlite_at_0003(tmp_path, monkeypatch)
    else:
        old = postgres_at_0003(request.getfixturevalue("pg_server"), monkeypatch)
    async with old as (store, set_key, reopen):
        ids = await old_history(store, set_key)
        await store.close()
        monkeypatch.undo()  # the real migrations again: 0004 and later
        upgraded: Store = reopen()
        await upgraded.open()
        try:
            keys = {n: (await upgraded.get(i)).idempotency_key for n, i in ids.items()}
            assert keys == {
                "k_done_1": None,
                "k_done_2": None,
                "k_pending": "k",  # the active job keeps its key
                "k2_done_1": None,
                "k2_done_2": "k2",  # no active one: the newest keeps it
                "plain": None,
            }
            assert (await upgraded.get(ids["k_done_1"])).result == {"i": 0}  # history kept
            (again,) = await upgraded.enqueue_many([NewJob("x", idempotency_key="k2")], at(9))
            assert (again.duplicate, again.job.id) == (True, ids["k2_done_2"])
            assert again.job.state is JobState.COMPLETED
        finally:
            await upgraded.close()
