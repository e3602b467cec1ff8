"""A PostgreSQL row written before the value ranges were enforced (a ``run_at`` of
year 0 at +14:00, stored as a date BC) used to break every listing and the fetch
that leased it, leaving the ordinary jobs fetched with it ``running`` for good.
Migration 0016 clamps such rows into range and refuses them from then on."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

import conveyor.storage.postgres as pg_module
from conveyor import Conveyor
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from conveyor.storage.sql import load_migrations
from support import async_wait_until, running_worker

YEAR_ZERO = "0001-01-01 00:00:00+14"  # what the old submit path let through


async def _set_run_at(dsn: str, job_id: str, value: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE conveyor.jobs SET run_at = $1::text::timestamptz WHERE id = $2", value, job_id
        )
    finally:
        await conn.close()


def _app(dsn: str) -> Conveyor:
    app = Conveyor(settings=Settings(database_url=dsn, heartbeat_interval=0.2))

    @app.job("t")
    async def t(ctx: Any) -> str:
        return "ok"

    return app


async def test_an_old_row_out_of_range_is_clamped_and_runs_with_the_others(
    pg_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"old_{uuid.uuid4().hex[:12]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    dsn = pg_server.dsn(name)
    try:
        monkeypatch.setattr(
            pg_module,
            "load_migrations",
            lambda backend: [m for m in load_migrations(backend) if m.version < 16],
        )
        async with _app(dsn) as old_app:
            old = await old_app.enqueue("t")
            fine = await old_app.enqueue("t")
            await _set_run_at(dsn, old.id, YEAR_ZERO)
            with pytest.raises(OverflowError):  # the old failure: the row can't be read
                await old_app.store.list_jobs(JobQuery())
        monkeypatch.undo()

        app = _app(dsn)
        async with app:  # migration 0016 runs here
            page = await app.store.list_jobs(JobQuery())
            assert {j.id for j in page.jobs} == {old.id, fine.id}
            assert (await app.store.get(old.id)).run_at.year == 1970  # due at once

            async def both_done() -> bool:
                states = [(await app.store.get(i)).state for i in (old.id, fine.id)]
                return states == [JobState.COMPLETED] * 2

            async with running_worker(app):
                await async_wait_until(both_done, 10, "both jobs to complete")

            # From now on nobody can store such a value, whatever writes it.
            with pytest.raises(asyncpg.CheckViolationError):
                await _set_run_at(dsn, fine.id, YEAR_ZERO)
            with pytest.raises(asyncpg.CheckViolationError):
                await _set_run_at(dsn, fine.id, "10000-01-01 00:00:00+00")
    finally:
        pg_server.drop_database(name)
