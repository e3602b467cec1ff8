"""A row written before the value ranges were enforced (year 0 at +14:00) never
breaks a listing and never stops the ordinary jobs fetched with it (SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conveyor import Conveyor
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from support import async_wait_until, running_worker


async def test_a_row_with_an_unrepresentable_timestamp_is_read_and_runs(tmp_path: Path):
    db = tmp_path / "old.db"
    app = Conveyor(settings=Settings(database_url=f"sqlite:///{db}", heartbeat_interval=0.2))

    @app.job("t")
    async def t(ctx) -> str:
        return "ok"

    async with app:
        old = await app.enqueue("t")
        fine = await app.enqueue("t")
        with sqlite3.connect(db) as conn:  # as an older version could have stored it
            conn.execute("UPDATE jobs SET run_at = ? WHERE id = ?", (-62135647200.0, old.id))
        page = await app.store.list_jobs(JobQuery())
        assert {j.id for j in page.jobs} == {old.id, fine.id}

        async def both_done() -> bool:
            states = [(await app.store.get(i)).state for i in (old.id, fine.id)]
            return states == [JobState.COMPLETED] * 2

        async with running_worker(app):
            await async_wait_until(both_done, 10, "both jobs to complete")
