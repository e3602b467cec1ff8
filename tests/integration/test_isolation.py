"""Process isolation (runtime/isolation.py) with real child processes.

Every fault a handler can cause (an exception, ``sys.exit``, ``os._exit``, a
segfault, a memory hog, a hang, garbage on the pipe) fails that attempt only:
the pool keeps working, and a child that is killed is dead (its pid gone)
before ``run()`` returns or raises.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from conveyor.domain.errors import ConfigurationError, Permanent, Retry
from conveyor.domain.limits import MAX_RETRY_DELAY_SECONDS
from conveyor.domain.retry import RetryPolicy, decide
from conveyor.domain.states import Action
from conveyor.runtime.isolation import (
    ERROR_TEXT_LIMIT,
    ChildCrashed,
    ChildJob,
    ChildOutcome,
    HandlerRef,
    PoolClosed,
    ProcessPool,
    safe_text,
)
from integration import isolation_handlers as h
from support import async_wait_until, wait_until

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., ProcessPool]


def make_job(fn: Any, job_id: str = "job-1", **payload: Any) -> ChildJob:
    inner = getattr(fn, "handler", fn)
    return ChildJob(
        job_id=job_id,
        job_type=inner.__name__,
        attempt=2,
        max_retries=5,
        queue="q1",
        worker_id="worker-a",
        metadata={"trace": "t-1"},
        payload=payload,
        handler=HandlerRef.of(fn),
        is_async=asyncio.iscoroutinefunction(inner),
    )


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie (an unreaped grandchild is dead too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # reaped before or while reading
        return False
    return state != "Z"


async def marker_pid(marker: Path) -> int:
    text = await async_wait_until(
        lambda: _read(marker), 20, f"the handler to write its pid to {marker}"
    )
    return int(text.split()[0])


async def _read(path: Path) -> str:
    return path.read_text() if path.exists() and path.stat().st_size else ""


@pytest.fixture
async def pools() -> AsyncIterator[Factory]:
    made: list[ProcessPool] = []

    def factory(size: int = 1, **kwargs: Any) -> ProcessPool:
        kwargs.setdefault("kill_grace", 0.5)
        pool = ProcessPool(size, **kwargs)
        made.append(pool)
        return pool

    yield factory
    for pool in made:
        await pool.close()
        assert pool.stats.alive == 0


async def healthy(pool: ProcessPool) -> int:
    """The pool still runs jobs; the pid of the child that ran this one."""
    outcome = await pool.run(make_job(h.pid, job_id="probe"), 20)
    assert outcome.ok, outcome
    assert isinstance(outcome.result, int)
    return outcome.result


# -- success ----------------------------------------------------------------------------


async def test_success_returns_the_json_result_and_ctx_in_another_process(
    pools: Factory,
) -> None:
    pool = pools()
    outcome = await pool.run(make_job(h.echo, n=1, items=[1, "two", None]), 20)
    assert outcome.ok
    assert outcome.result["payload"] == {"n": 1, "items": [1, "two", None]}
    assert outcome.result["ctx"] == {
        "job_id": "job-1",
        "job_type": "echo",
        "attempt": 2,
        "max_retries": 5,
        "queue": "q1",
        "worker_id": "worker-a",
        "metadata": {"trace": "t-1"},
        "is_cancelled": False,
    }
    assert outcome.result["pid"] == outcome.pid != os.getpid()
    assert outcome.peak_rss_kb
    assert outcome.peak_rss_kb > 0
    # The child is kept for the next job.
    assert await healthy(pool) == outcome.pid
    assert pool.stats.jobs == 2
    assert pool.stats.started == 1


async def test_async_handlers_and_job_definitions_run(pools: Factory) -> None:
    pool = pools()
    outcome = await pool.run(make_job(h.async_echo, n=3), 20)
    assert outcome.ok, outcome
    assert outcome.result["n"] == 3
    outcome = await pool.run(make_job(h.decorated, x=21), 20)
    assert outcome.ok, outcome
    assert outcome.result == 42


async def test_results_are_json_or_a_permanent_failure(pools: Factory) -> None:
    pool = pools()
    outcome = await pool.run(make_job(h.not_json), 20)
    assert not outcome.ok
    assert outcome.permanent
    assert "not JSON-serialisable" in (outcome.error or "")
    outcome = await pool.run(make_job(h.nan), 20)
    assert not outcome.ok
    assert outcome.permanent
    assert "non-finite" in (outcome.error or "")
    outcome = await pool.run(make_job(h.none_result), 20)
    assert outcome.ok
    assert outcome.result == {"x": None}
    # A payload that is not JSON never reaches a child.
    job = make_job(h.echo)
    bad = ChildJob(**{**job.__dict__, "payload": {"s": {1, 2}}})
    outcome = await pool.run(bad, 20)
    assert not outcome.ok
    assert outcome.permanent
    assert "payload cannot be sent" in (outcome.error or "")


# -- exceptions -------------------------------------------------------------------------


async def test_an_exception_fails_that_attempt_and_the_child_stays(pools: Factory) -> None:
    pool = pools()
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.fail, message="boom"), 20)
    assert not outcome.ok
    assert not outcome.crashed
    assert not outcome.permanent
    assert outcome.error_type == "ValueError"
    assert outcome.error == "ValueError: boom"
    assert "in fail" in (outcome.traceback or "")
    assert "raise ValueError" in (outcome.traceback or "")
    assert await healthy(pool) == first


async def test_permanent_retry_and_policy_errors_keep_their_meaning(pools: Factory) -> None:
    pool = pools()
    permanent = await pool.run(make_job(h.permanent), 20)
    assert permanent.permanent
    assert permanent.error == "Permanent: card declined"
    retry = await pool.run(make_job(h.retry, delay=1.5), 20)
    assert retry.retry_delay == 1.5
    assert not retry.permanent
    huge = await pool.run(make_job(h.retry, delay=1e13), 20)
    assert huge.retry_delay == MAX_RETRY_DELAY_SECONDS  # clamped in the child, as in a thread
    job = make_job(h.flaky)
    listed = ChildJob(
        **{**job.__dict__, "permanent_errors": ("integration.isolation_handlers:Flaky",)}
    )
    flaky = await pool.run(listed, 20)
    assert flaky.permanent
    assert flaky.error_type == "Flaky"
    unlisted = await pool.run(job, 20)
    assert not unlisted.permanent

    # Rebuilt in the parent, they steer the retry decision as the handler's own would.
    def decision(outcome: ChildOutcome) -> Any:
        return decide(outcome.as_exception(), attempt=1, max_retries=3, policy=RetryPolicy())

    assert decision(permanent).action is Action.FAIL
    assert decision(permanent).error == "Permanent: card declined"
    assert (decision(retry).action, decision(retry).delay) == (Action.RETRY, 1.5)
    assert decision(unlisted).error == "Flaky: listed as permanent by the policy"
    assert decision(unlisted).action is Action.RETRY
    assert isinstance(permanent.as_exception(), Permanent)
    assert isinstance(retry.as_exception(), Retry)


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (h.exit3, "SystemExit: 3"),
        (h.keyboard, "KeyboardInterrupt"),
        (h.cancelled_error, "CancelledError"),
        (h.generator_exit, "GeneratorExit"),
    ],
)
async def test_base_exceptions_are_that_attempts_failure(
    pools: Factory, handler: Any, error: str
) -> None:
    pool = pools()
    first = await healthy(pool)
    outcome = await pool.run(make_job(handler), 20)
    assert not outcome.ok
    assert not outcome.crashed
    assert outcome.error == error
    assert await healthy(pool) == first  # the same child goes on


async def test_unsafe_exception_texts_give_a_safe_outcome(pools: Factory) -> None:
    pool = pools()
    outcome = await pool.run(make_job(h.nasty_text), 20)
    error = outcome.error or ""
    assert error.startswith("FileNotFoundError: report-\ufffd.csv\\x00xxx")
    assert "\x00" not in error
    assert len(error.encode("utf-8")) <= ERROR_TEXT_LIMIT  # encodes: no lone surrogate
    assert error.endswith(" [... truncated: 100037 bytes in total]")
    (outcome.traceback or "").encode("utf-8")
    outcome = await pool.run(make_job(h.bad_str), 20)
    assert outcome.error == "BadStr: <str() of the exception raised RuntimeError>"
    await healthy(pool)


def test_safe_text_keeps_the_tail_of_a_traceback() -> None:
    text = "first line\n" + "y" * 50_000 + "\nLastError: the end"
    kept = safe_text(text, 1000, keep="tail")
    assert kept.endswith("LastError: the end")
    assert "first line" not in kept
    assert kept.startswith("[... 50030 bytes in total, the start was cut ...]")
    assert len(kept.encode()) <= 1000
    assert safe_text("\ud800ok\x00") == "\ufffdok\\x00"


# -- crashes ----------------------------------------------------------------------------


async def test_os_exit_is_a_crash_and_the_child_is_replaced(pools: Factory) -> None:
    pool = pools()
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.hard_exit), 20)
    assert outcome.crashed
    assert not outcome.ok
    assert outcome.exit_code == 7
    assert outcome.pid == first
    assert outcome.error == (
        f"ChildCrashed: child process {first} died while running the job (exit code 7)"
    )
    assert isinstance(outcome.as_exception(), ChildCrashed)
    assert not alive(first)
    assert await healthy(pool) != first
    assert pool.stats.crashed == 1


async def test_a_child_killed_while_idle_is_replaced_without_failing_a_job(
    pools: Factory,
) -> None:
    pool = pools()
    first = await healthy(pool)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not alive(first), 10, "the idle child to die")
    outcome = await pool.run(make_job(h.pid, job_id="probe"), 20)
    assert outcome.ok, outcome.error
    assert outcome.result != first
    assert pool.stats.crashed == 0


async def test_a_segfault_is_a_crash(pools: Factory) -> None:
    pool = pools()
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.segfault), 20)
    assert outcome.crashed
    assert outcome.exit_code == -signal.SIGSEGV
    assert "killed by signal SIGSEGV (11)" in (outcome.error or "")
    assert await healthy(pool) != first


@pytest.mark.parametrize("handler", [h.garbage, h.huge_header, h.half_message])
async def test_garbage_or_a_half_message_on_the_pipe_is_a_crash(
    pools: Factory, handler: Any
) -> None:
    pool = pools()
    first = await healthy(pool)
    outcome = await pool.run(make_job(handler), 20)
    assert outcome.crashed
    assert outcome.pid == first
    assert not alive(first)
    assert await healthy(pool) != first


async def test_a_memory_hog_fails_its_attempt_only(pools: Factory) -> None:
    pool = pools(max_memory_mb=200)
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.hog, mb=4000), 20)
    assert not outcome.ok
    assert not outcome.crashed
    assert outcome.error_type == "MemoryError"
    # A child that ran out of memory is replaced.
    assert await healthy(pool) != first
    assert pool.stats.recycled == 1


async def test_a_child_past_max_memory_is_recycled(pools: Factory) -> None:
    pool = pools(max_memory_mb=120)
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.touch, mb=100), 20)
    assert outcome.ok, outcome
    assert outcome.peak_rss_kb
    assert outcome.peak_rss_kb > 120 * 1024
    assert await healthy(pool) != first
    assert pool.stats.recycled == 1


async def test_recycling_after_max_jobs_per_child(pools: Factory) -> None:
    pool = pools(max_jobs_per_child=2)
    pids = [await healthy(pool) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert len(set(pids)) == 3
    assert pool.stats.recycled == 2
    await async_wait_until(
        _async(lambda: not alive(pids[0]) and not alive(pids[2])), 10, "retired children to exit"
    )


def _async(fn: Callable[[], Any]) -> Callable[[], Any]:
    async def check() -> Any:
        return fn()

    return check


async def test_threads_a_job_leaves_running_end_with_its_child(
    pools: Factory, tmp_path: Path
) -> None:
    pool = pools()
    outcome = await pool.run(make_job(h.leave_thread, marker=str(tmp_path / "pid")), 20)
    assert outcome.ok
    assert not alive(outcome.result)  # before run() returned
    assert await healthy(pool) != outcome.result


# -- timeouts, cancellation, shutdown -------------------------------------------------------


async def test_a_hang_past_its_timeout_kills_the_child(pools: Factory, tmp_path: Path) -> None:
    pool = pools()
    marker = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ran longer than 0\.5s"):
        await pool.run(make_job(h.hang, marker=str(marker)), 0.5)
    pid = int(marker.read_text())
    assert not alive(pid)  # dead when run() raised
    assert time.monotonic() - started < 10
    assert pool.stats.killed == 1
    assert await healthy(pool) != pid


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
    pools: Factory, tmp_path: Path
) -> None:
    pool = pools(kill_grace=0.3)
    marker = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        await pool.run(make_job(h.hang_ignoring_sigterm, marker=str(marker)), 0.5)
    assert not alive(int(marker.read_text()))
    await healthy(pool)


async def test_what_the_job_started_dies_with_its_child(pools: Factory, tmp_path: Path) -> None:
    pool = pools()
    marker = tmp_path / "pids"
    with pytest.raises(TimeoutError):
        await pool.run(make_job(h.grandchild, marker=str(marker)), 1.0)
    child, grandchild = (int(p) for p in marker.read_text().split())
    assert not alive(child)
    # The grandchild got SIGKILL with the group; its new parent reaps it.
    wait_until(lambda: not alive(grandchild), 10, "the grandchild to be killed")


async def test_cancelling_run_kills_the_child_before_cancelled_error(
    pools: Factory, tmp_path: Path
) -> None:
    pool = pools()
    marker = tmp_path / "pid"
    task = asyncio.create_task(pool.run(make_job(h.hang, marker=str(marker)), None))
    pid = await marker_pid(marker)
    assert alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)
    assert await healthy(pool) != pid


async def test_sigterm_sets_ctx_cancelled_and_cancels_async_handlers(
    pools: Factory, tmp_path: Path
) -> None:
    pool = pools(kill_grace=10)
    for handler in (h.wait_cancelled, h.async_hang):
        marker, done = tmp_path / f"{handler.__name__}.pid", tmp_path / f"{handler.__name__}.done"
        task = asyncio.create_task(
            pool.run(make_job(handler, marker=str(marker), done=str(done)), None)
        )
        pid = await marker_pid(marker)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # It stopped by itself on SIGTERM, well before the 10 s grace.
        assert time.monotonic() - started < 5
        assert not alive(pid)
        assert done.read_text() in ("cancelled", "cancelled True")


async def test_close_kills_running_and_idle_children(pools: Factory, tmp_path: Path) -> None:
    pool = pools(size=2)
    idle = await healthy(pool)
    marker = tmp_path / "pid"
    task = asyncio.create_task(pool.run(make_job(h.hang, marker=str(marker)), None))
    busy = await marker_pid(marker)
    await pool.close()
    assert not alive(idle)
    assert not alive(busy)
    with pytest.raises(PoolClosed):
        await task
    assert pool.stats.alive == 0
    await pool.close()  # idempotent
    with pytest.raises(PoolClosed):
        await pool.run(make_job(h.pid), 5)


async def test_a_killed_parent_takes_its_running_child_along(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("isolation_parent.py")), str(marker)],
        env=env,
    )
    try:
        pid = await marker_pid(marker)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait(10)
        # The orphan must not run on while the rescued job is rerun elsewhere.
        wait_until(lambda: not alive(pid), 10, "the orphaned child to kill itself")
    finally:
        parent.kill()
        parent.wait(10)


# -- concurrency ------------------------------------------------------------------------


async def test_size_jobs_run_at_once_and_no_more(pools: Factory, tmp_path: Path) -> None:
    pool = pools(size=3)
    jobs = [
        pool.run(make_job(h.barrier, job_id=f"b{i}", directory=str(tmp_path), n=3), 30)
        for i in range(3)
    ]
    outcomes = await asyncio.gather(*jobs)
    assert all(o.ok for o in outcomes), outcomes
    assert len({o.result for o in outcomes}) == 3  # three children met at the barrier

    small = pools(size=2)
    outcomes = await asyncio.gather(
        *(small.run(make_job(h.pid, job_id=f"p{i}"), 30) for i in range(6))
    )
    assert all(o.ok for o in outcomes)
    assert len({o.result for o in outcomes}) <= 2
    assert small.stats.started <= 2
    assert small.stats.jobs == 6


async def test_the_event_loop_runs_on_while_children_work(pools: Factory, tmp_path: Path) -> None:
    pool = pools(size=2)
    await pool.start()
    assert pool.stats.alive == 2
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)  # wait-ok: the ticker measures the loop's responsiveness
            ticks += 1

    ticking = asyncio.create_task(ticker())
    with pytest.raises(TimeoutError):
        await pool.run(make_job(h.hang, marker=str(tmp_path / "pid")), 1.0)
    stop.set()
    await ticking
    # A blocked loop would manage one tick, not dozens, in that second.
    assert ticks >= 20
    assert pool.stats.started == 2  # the started children were used, none added


async def test_spawn_start_method_works_too(pools: Factory) -> None:
    pool = pools(start_method="spawn")
    first = await healthy(pool)
    outcome = await pool.run(make_job(h.hard_exit), 30)
    assert outcome.crashed
    assert outcome.exit_code == 7
    assert await healthy(pool) != first


async def test_preloaded_modules_are_imported_when_a_child_starts(pools: Factory) -> None:
    # spawn: a fresh interpreter per child (the forkserver is shared by every
    # pool of the process, so whether it preloaded a module depends on test order).
    pool = pools(preload=["json.tool"], start_method="spawn")
    outcome = await pool.run(make_job(h.imported, name="json.tool"), 20)
    assert outcome.result is True
    plain = pools(start_method="spawn")
    outcome = await plain.run(make_job(h.imported, name="json.tool"), 20)
    assert outcome.result is False


async def test_a_child_that_never_starts_fails_the_attempt_and_is_killed(
    pools: Factory,
) -> None:
    pool = pools(preload=["integration.isolation_stuck_import"], start_timeout=1.0)
    outcome = await pool.run(make_job(h.pid), 20)
    assert outcome.crashed
    assert "did not start within 1.0s" in (outcome.error or "")
    assert pool.stats.alive == 0  # killed and reaped


async def test_cancelling_run_while_its_child_starts_ends_that_child(pools: Factory) -> None:
    pool = pools(preload=["integration.isolation_stuck_import"])
    task = asyncio.create_task(pool.run(make_job(h.pid), None))
    await async_wait_until(_async(lambda: pool.stats.alive == 1), 20, "a child to be started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats.alive == 0  # killed and reaped before CancelledError


# -- handler references -------------------------------------------------------------------


def test_handler_refs_must_be_importable_by_name() -> None:
    def nested(ctx: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="lambda or a function defined inside"):
        HandlerRef.of(lambda ctx: None)
    with pytest.raises(ConfigurationError, match="defined inside another"):
        HandlerRef.of(nested)
    with pytest.raises(ConfigurationError, match="no module and qualified name"):
        HandlerRef.of(object())
    assert HandlerRef.of(h.decorated) == HandlerRef("integration.isolation_handlers", "decorated")
    assert HandlerRef.of(h.decorated).resolve() is h.decorated.handler
    assert HandlerRef.of(h.echo).resolve() is h.echo


async def test_a_handler_that_cannot_be_imported_fails_permanently(pools: Factory) -> None:
    pool = pools()
    job = make_job(h.echo)
    missing = ChildJob(**{**job.__dict__, "handler": HandlerRef("no_such_module_x", "f")})
    outcome = await pool.run(missing, 20)
    assert not outcome.ok
    assert outcome.permanent
    assert "cannot import module 'no_such_module_x'" in (outcome.error or "")
    await healthy(pool)


def test_bad_pool_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        ProcessPool(0)
    with pytest.raises(ConfigurationError):
        ProcessPool(1, max_jobs_per_child=0)
    with pytest.raises(ConfigurationError, match="'fork' would copy"):
        ProcessPool(1, start_method="fork")
