"""Durable steps survive kill -9, on SQLite and PostgreSQL, with real processes.

A worker process runs a job of three durable steps and is killed with SIGKILL
once step 2 is stored; a new worker takes the job over after the rescue, and
the job completes with steps 1 and 2 run exactly once. Executions are counted
from the lines the step functions append to a log file, not from the store.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, JobState, Settings
from support import FAST_WORKER_ENV, WorkerProcess, async_wait_until, exec_lines, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def app(db: str):
    settings = Settings(
        database_url=db,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        allow_unknown_job_types=True,  # a producer without the handlers
    )
    async with Conveyor(settings=settings) as conveyor:
        yield conveyor


def worker(db: str, tmp_path: Path, log: Path, name: str) -> WorkerProcess:
    env = {**FAST_WORKER_ENV, "CONVEYOR_TEST_LOG": str(log)}
    return WorkerProcess(db, tmp_path / f"{name}.out", "stepsapp", **env)


def gone(pid: int) -> bool:
    """Whether process ``pid`` ended (a zombie waiting to be reaped counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def events(log: Path) -> Counter[str]:
    return Counter(ev for _job, _attempt, _pid, ev in exec_lines(log))


@pytest.mark.parametrize(
    "job_type",
    ["three_steps", "three_steps_sync", "three_steps_process", "three_steps_sync_process"],
)
async def test_kill_9_after_step_2_resumes_at_step_3(app, db, tmp_path, job_type):
    log = tmp_path / "steps.log"
    job = await app.enqueue(job_type, {"hold": 60})
    a = worker(db, tmp_path, log, "a")
    try:
        wait_until(lambda: events(log)["stored2"] == 1, 30, "step 2 to be stored")
        a.signal(signal.SIGKILL)
        a.wait()
        b = worker(db, tmp_path, log, "b")
        try:

            async def terminal() -> Any:
                current = await app.store.get(job.id)
                return current if current.state.is_terminal else None

            done = await async_wait_until(terminal, 30, "rescue and completion")
        finally:
            b.signal(signal.SIGTERM)
            assert b.wait() == 0, b.output()
    finally:
        a.stop()
    assert done.state is JobState.COMPLETED, done.error
    assert done.lost_count == 1
    assert done.result["attempt"] == 2
    seen = events(log)
    # Steps 1 and 2 ran once (in the killed worker); step 3 once (in the new one).
    assert (seen["ran1"], seen["ran2"], seen["ran3"], seen["done"]) == (1, 1, 1, 1)
    by_attempt = Counter((attempt, ev) for _j, attempt, _p, ev in exec_lines(log))
    assert by_attempt[("1", "ran2")] == 1
    assert by_attempt[("2", "ran3")] == 1
    # The results of steps 1 and 2 came back from the store, as the killed one had them.
    steps = done.result["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["pid"] == steps[1]["pid"] != steps[2]["pid"]
    assert await app.store.job_steps(job.id) == {
        "one": steps[0],
        "two": steps[1],
        "three": steps[2],
    }
    history = [(e.attempt, e.outcome) for e in await app.store.executions(job.id)]
    assert history == [(1, "lost"), (2, "completed")]
    # What ran the killed attempt (the worker, or its child process) is gone: no
    # orphan goes on with the job while the new worker runs it.
    wait_until(lambda: gone(steps[1]["pid"]), 10, "the killed attempt's process to end")
