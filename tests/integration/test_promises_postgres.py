"""DESIGN.md §1 promises on PostgreSQL, broken on purpose: many worker processes,
kill -9, a server restart under load, and transactional enqueue.

Executions are counted from the lines handlers append to a log file.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import asyncpg
import pytest

from conveyor import ConfigurationError, Conveyor, JobNotFound, JobState, Settings
from conveyor.demo import register
from support import (
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
async def app(postgres_dsn: str):
    app = Conveyor(
        settings=Settings(
            database_url=postgres_dsn,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            allow_unknown_job_types=True,  # a producer without the handlers, before any worker
        )
    )
    async with app:
        yield app


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "executions.log"


async def _all_completed(app: Conveyor, n: int) -> bool:
    try:
        return (await app.store.count_by_state())[JobState.COMPLETED] == n
    except Exception:  # the server may be restarting: poll again
        return False


async def _submit(app: Conveyor, job_type: str, n: int, payload: dict) -> set[str]:
    ids: set[str] = set()
    for start in range(0, n, 2000):
        batch = [app.new_job(job_type, payload) for _ in range(start, min(n, start + 2000))]
        ids |= {r.job.id for r in await app.submit_many(batch)}
    return ids


async def _completed_once(app: Conveyor, ids: set[str]) -> None:
    for job_id in ids:
        outcomes = [e.outcome for e in await app.store.executions(job_id)]
        assert outcomes.count("completed") == 1, (job_id, outcomes)


async def test_four_worker_processes_run_20000_jobs_exactly_once(app, postgres_dsn, log, tmp_path):
    n = 20_000
    ids = await _submit(app, "record", n, {"n": 1})
    workers = [
        start_worker(postgres_dsn, tmp_path, log, f"w{i}", CONVEYOR_CONCURRENCY="100")
        for i in range(4)
    ]
    try:
        await async_wait_until(lambda: _all_completed(app, n), 120, "20,000 jobs")
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    assert codes == [0, 0, 0, 0], [w.output()[-2000:] for w in workers]
    done = done_counts(log)
    assert set(done) == ids, "a job was never run"
    assert sum(done.values()) == n, "a job ran twice"
    assert len({pid for _j, _a, pid, _e in exec_lines(log)}) == 4
    counts = await app.store.count_by_state()
    assert counts[JobState.COMPLETED] == n
    assert counts[JobState.PENDING] == counts[JobState.RUNNING] == 0


async def test_sigkill_mid_job_keeps_the_lost_attempt_in_the_history(
    app, postgres_dsn, log, tmp_path
):
    done, history, a_pid, b_pid = await sigkill_mid_job_and_restart(
        app, postgres_dsn, tmp_path, log
    )
    assert done.state is JobState.COMPLETED
    assert done.result == {"pid": b_pid, "attempt": 2}
    assert done.lost_count == 1
    assert done_counts(log) == {done.id: 1}
    assert [(e.attempt, e.outcome, e.error) for e in history] == [
        (1, "lost", "worker_lost"),
        (2, "completed", None),
    ]
    assert [worker_pid(e.worker_id) for e in history] == [a_pid, b_pid]
    assert history[0].started_at is not None
    assert history[0].finished_at is not None


async def test_sigkill_then_restart_under_the_same_worker_id(app, postgres_dsn, log, tmp_path):
    done, history, _a, b_pid = await sigkill_mid_job_and_restart(
        app, postgres_dsn, tmp_path, log, "--worker-id", "stable-1"
    )
    assert done.state is JobState.COMPLETED
    assert done.result == {"pid": b_pid, "attempt": 2}
    assert done_counts(log) == {done.id: 1}
    assert [(e.attempt, e.worker_id, e.outcome) for e in history] == [
        (1, "stable-1", "lost"),
        (2, "stable-1", "completed"),
    ]


async def test_sigkill_under_load_loses_nothing(app, postgres_dsn, log, tmp_path):
    n = 600
    ids = await _submit(app, "slow", n, {"seconds": 0.3})
    a = start_worker(postgres_dsn, tmp_path, log, "a", CONVEYOR_CONCURRENCY="40")
    b = start_worker(postgres_dsn, tmp_path, log, "b", CONVEYOR_CONCURRENCY="40")

    def a_mid_jobs() -> bool:
        # Killed while it runs some (a slow start under load could leave it none).
        lines = exec_lines(log)
        started = {j for j, _at, pid, ev in lines if ev == "start" and pid == str(a.proc.pid)}
        finished = {j for j, _at, _pid, ev in lines if ev == "done"}
        return len(finished) >= 100 and bool(started - finished)

    try:
        wait_until(a_mid_jobs, 60, "worker a to run jobs after some completed")
        a.signal(signal.SIGKILL)
        a.wait()
        await async_wait_until(lambda: _all_completed(app, n), 60, "all jobs")
    finally:
        a.stop()
        b.signal(signal.SIGTERM)
        b.wait()
    assert set(done_counts(log)) == ids
    await _completed_once(app, ids)
    rescued = [j for j in ids if (await app.store.get(j)).lost_count]
    assert rescued, "the killed worker's running jobs should have been rescued"


async def test_server_restart_under_load_loses_nothing(app, pg_server, postgres_dsn, log, tmp_path):
    n = 2_000
    ids = await _submit(app, "slow", n, {"seconds": 0.01})
    workers = [
        start_worker(
            postgres_dsn,
            tmp_path,
            log,
            f"w{i}",
            CONVEYOR_CONCURRENCY="20",
            CONVEYOR_HEARTBEAT_TIMEOUT="5.0",
        )
        for i in range(2)
    ]
    try:
        # Both started (a slow start must not meet the restart: that is another test).
        wait_until(lambda: all("worker_started" in w.output() for w in workers), 60, "both workers")
        wait_until(lambda: len(done_counts(log)) >= 300, 60, "some jobs to complete")
        pg_server.restart()
        try:
            await async_wait_until(lambda: _all_completed(app, n), 60, "all jobs after restart")
        except AssertionError:
            for w in workers:
                print(w.output()[-4000:])
            print(await app.store.count_by_state())
            raise
    finally:
        for w in workers:
            w.signal(signal.SIGTERM)
        codes = [w.wait(30) for w in workers]
    outputs = "".join(w.output() for w in workers)
    assert codes == [0, 0], outputs[-3000:]
    assert "fetch_failed" in outputs or "finish_failed" in outputs, "restart not noticed"
    assert set(done_counts(log)) == ids
    await _completed_once(app, ids)


async def test_transactional_enqueue_follows_the_callers_transaction(app, postgres_dsn):
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            kept = await app.enqueue("test_job", {"x": 1}, connection=conn)
        with pytest.raises(RuntimeError, match="rolled back"):  # noqa: PT012
            async with conn.transaction():
                dropped = await app.enqueue("test_job", {"x": 2}, connection=conn)
                raise RuntimeError("rolled back")
    finally:
        await conn.close()
    assert (await app.store.get(kept.id)).state is JobState.PENDING
    with pytest.raises(JobNotFound):
        await app.store.get(dropped.id)
    # The committed job really runs.
    register(app)
    worker = app.worker(concurrency=2, job_types=["test_job"])
    task = asyncio.create_task(worker.run())
    try:
        done = await async_wait_until(
            lambda: _terminal(app, kept.id), 20, "the committed job to run"
        )
    finally:
        worker.request_stop()
        await task
    assert done.state is JobState.COMPLETED
    assert done.result == {"x": 1}


async def _terminal(app: Conveyor, job_id: str):
    job = await app.store.get(job_id)
    return job if job.state.is_terminal else None


async def test_transactional_enqueue_needs_postgres(tmp_path):
    async with Conveyor(f"sqlite:///{tmp_path}/x.db") as app:
        app.job("test_job")(_noop)
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            await app.enqueue("test_job", {}, connection=object())


async def _noop(ctx) -> None:
    return None
