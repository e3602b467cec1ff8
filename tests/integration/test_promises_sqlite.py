"""DESIGN.md §1 promises on SQLite, broken on purpose with real processes.

Workers are real ``conveyor worker`` subprocesses; executions are counted from
the lines handlers append to a log file, not from the store or the logs.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from conveyor import Conveyor, JobState, Settings
from support import (
    WorkerProcess,
    async_wait_until,
    done_counts,
    exec_lines,
    sigkill_mid_job_and_restart,
    start_worker,
    wait_until,
    worker_pid,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'promises.db'}"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "executions.log"


@pytest.fixture
async def app(db: str):
    app = Conveyor(
        settings=Settings(
            database_url=db,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            allow_unknown_job_types=True,  # a producer without the handlers, before any worker
        )
    )
    async with app:
        yield app


lines = exec_lines


def worker(db: str, tmp_path: Path, log: Path, name: str, **env: str) -> WorkerProcess:
    return start_worker(db, tmp_path, log, name, **env)


async def test_sigkill_mid_job_is_rescued_and_completes_once(app, db, log, tmp_path):
    done, history, a_pid, b_pid = await sigkill_mid_job_and_restart(app, db, tmp_path, log)
    assert done.state is JobState.COMPLETED
    assert done.result["attempt"] == 2
    assert done.result["pid"] == b_pid
    assert done.lost_count == 1
    assert done_counts(log) == {done.id: 1}
    # The attempt lost with its process is in the history, as the rescuer saw it.
    assert [(e.attempt, e.outcome, e.error) for e in history] == [
        (1, "lost", "worker_lost"),
        (2, "completed", None),
    ]
    assert [worker_pid(e.worker_id) for e in history] == [a_pid, b_pid]
    assert all(e.finished_at is not None for e in history)


async def test_sigkill_then_restart_under_the_same_worker_id(app, db, log, tmp_path):
    # A supervisor restarts the worker at once with its stable --worker-id: the id's
    # heartbeat never lapses, yet the old process's job is rescued and its attempt
    # recorded as lost.
    done, history, _a, b_pid = await sigkill_mid_job_and_restart(
        app, db, tmp_path, log, "--worker-id", "stable-1"
    )
    assert done.state is JobState.COMPLETED
    assert done.result == {"pid": b_pid, "attempt": 2}
    assert done.lost_count == 1
    assert done_counts(log) == {done.id: 1}
    assert [(e.attempt, e.worker_id, e.outcome) for e in history] == [
        (1, "stable-1", "lost"),
        (2, "stable-1", "completed"),
    ]


async def _terminal(app: Conveyor, job_id: str):
    job = await app.store.get(job_id)
    return job if job.state.is_terminal else None


async def test_zombie_late_completion_is_rejected(app, db, log, tmp_path):
    # A sync handler blocks its thread 3 s on attempt 1; we freeze worker A with
    # SIGSTOP so its heartbeat stops, B rescues and completes the job, then A
    # wakes up and tries to complete the same job with its stale lease.
    job = await app.enqueue("blocking_first", {"seconds": 3.0})
    a = worker(db, tmp_path, log, "a")
    b = None
    try:
        wait_until(lambda: any(ev == "start" for *_x, ev in lines(log)), 20, "attempt 1")
        a.signal(signal.SIGSTOP)
        b = worker(db, tmp_path, log, "b")
        done = await async_wait_until(lambda: _terminal(app, job.id), 15, "B to complete")
        assert done.state is JobState.COMPLETED
        assert done.result == {"pid": b.pid, "attempt": 2}
        a.signal(signal.SIGCONT)
        wait_until(lambda: "stale_lease_rejected" in a.output(), 15, "A's rejected write")
        # A's handler did finish (its 'done' line), but its result was not applied.
        wait_until(lambda: done_counts(log)[job.id] == 2, 10, "both attempts to return")
        after = await app.store.get(job.id)
        assert after.state is JobState.COMPLETED
        assert after.result == {"pid": b.pid, "attempt": 2}
        outcomes = [e.outcome for e in await app.store.executions(job.id)]
        assert outcomes.count("completed") == 1
    finally:
        a.signal(signal.SIGCONT)
        a.signal(signal.SIGTERM)
        a.wait()
        if b is not None:
            b.signal(signal.SIGTERM)
            b.wait()


def running_now(log) -> int:
    """Attempts that logged 'start' but not yet 'done'."""
    events = Counter(ev for *_x, ev in exec_lines(log))
    return events["start"] - events["done"]


async def test_sigterm_under_load_loses_nothing(app, db, log, tmp_path):
    n = 300
    # Jobs of 0.6 s: the poll below may notice a running batch up to 0.2 s late, and the
    # batch must still be running when the 0.05 s grace period ends.
    jobs = await app.submit_many([app.new_job("slow", {"seconds": 0.6}) for _ in range(n)])
    ids = {r.job.id for r in jobs}
    a = worker(db, tmp_path, log, "a", CONVEYOR_CONCURRENCY="50", CONVEYOR_SHUTDOWN_GRACE="0.05")
    # SIGTERM while many jobs are mid-flight (started, not done), not in the gap
    # between one batch finishing and the next starting.
    wait_until(
        lambda: len(done_counts(log)) >= 60 and running_now(log) >= 20,
        30,
        "some jobs to complete and others to be running",
    )
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0, a.output()
    assert "worker_releasing_jobs" in a.output()  # the grace period ran out: jobs released
    counts = await app.store.count_by_state()
    assert counts[JobState.RUNNING] == 0
    assert counts[JobState.COMPLETED] + counts[JobState.PENDING] == n
    # Everything A did not finish is picked up by the next worker.
    b = worker(db, tmp_path, log, "b", CONVEYOR_CONCURRENCY="100")
    try:
        await async_wait_until(
            lambda: _count(app, JobState.COMPLETED, n), 60, "all jobs to complete"
        )
    finally:
        b.signal(signal.SIGTERM)
        assert b.wait() == 0
    done = done_counts(log)
    assert set(done) == ids
    assert all(c == 1 for c in done.values()), "a job completed twice"


async def _count(app: Conveyor, state: JobState, n: int) -> bool:
    return (await app.store.count_by_state())[state] == n


async def test_two_worker_processes_run_each_job_exactly_once(app, db, log, tmp_path):
    n = 5_000
    ids: set[str] = set()
    for start in range(0, n, 1000):
        batch = [app.new_job("record", {"n": i}) for i in range(start, start + 1000)]
        ids |= {r.job.id for r in await app.submit_many(batch)}
    workers = [worker(db, tmp_path, log, f"w{i}", CONVEYOR_CONCURRENCY="50") for i in range(2)]
    try:
        await async_wait_until(lambda: _count(app, JobState.COMPLETED, n), 90, "5,000 jobs")
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = [w.wait() for w in workers]
    assert codes == [0, 0]
    done = done_counts(log)
    assert set(done) == ids
    assert sum(done.values()) == n, "some job ran twice"
    pids = {pid for _j, _a, pid, _e in lines(log)}
    assert len(pids) == 2, "both worker processes should have taken jobs"
    counts = await app.store.count_by_state()
    assert counts[JobState.COMPLETED] == n


async def test_sigkill_under_load_completes_every_job_once(app, db, log, tmp_path):
    n = 300
    jobs = await app.submit_many([app.new_job("slow", {"seconds": 0.1}) for _ in range(n)])
    ids = {r.job.id for r in jobs}
    a = worker(db, tmp_path, log, "a", CONVEYOR_CONCURRENCY="40")
    b = worker(db, tmp_path, log, "b", CONVEYOR_CONCURRENCY="40")
    try:
        wait_until(lambda: len(done_counts(log)) >= 50, 30, "some jobs to complete")
        a.signal(signal.SIGKILL)
        a.wait()
        await async_wait_until(lambda: _count(app, JobState.COMPLETED, n), 60, "all jobs")
    finally:
        a.stop()
        b.signal(signal.SIGTERM)
        b.wait()
    done = done_counts(log)
    assert set(done) == ids
    # At-least-once execution, exactly-once completion: a handler may have
    # finished in A just before the kill without its result being recorded,
    # so it ran again in B; but the store recorded exactly one completion.
    for job_id in ids:
        outcomes = [e.outcome for e in await app.store.executions(job_id)]
        assert outcomes.count("completed") == 1, (job_id, outcomes)
