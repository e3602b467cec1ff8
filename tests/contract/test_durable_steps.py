"""Durable steps, checkpoints and heal-before-retry, on every backend.

A step that completed is never run again by a later attempt of its job; a
checkpoint survives retries; an attempt that lost its lease can store neither;
a heal replaces the payload of the next attempt (bounded, and never in the way
of the retry), and the history shows which payload version each attempt ran.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from appkit import api_client, app_on, finished

from conveyor import Conveyor
from conveyor.domain.errors import LeaseLost, ValidationError
from conveyor.domain.job import Finish, NewJob
from conveyor.domain.retry import RetryPolicy
from conveyor.domain.states import Action, JobState
from conveyor.runtime.context import JobContext
from conveyor.runtime.steps import LocalSteps, Steps, check_step_name, child_calls
from conveyor.storage.base import Store
from integration import stepsapp
from support import async_wait_until, running_worker

NOW = datetime(2026, 1, 1, tzinfo=UTC)
QUICK = RetryPolicy(base=0, jitter=False)


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, heartbeat_timeout=2.0, shutdown_grace=0.5) as conveyor:
        yield conveyor


async def run_jobs(app: Conveyor, *submits: tuple[str, dict[str, Any]]) -> list[Any]:
    ids = [(await app.enqueue(t, p)).id for t, p in submits]
    async with running_worker(app, concurrency=4):
        jobs = await finished(app, ids)
    return [jobs[i] for i in ids]


# -- durable steps --------------------------------------------------------------------------


async def test_completed_steps_are_not_run_again_by_a_retry(app):
    runs: dict[str, int] = {}

    def count(name: str, value: Any) -> Any:
        runs[name] = runs.get(name, 0) + 1
        return value

    async def fetch_remote(n: int) -> dict[str, Any]:
        runs["remote"] = runs.get("remote", 0) + 1
        return {"n": n, "tuple": (1, 2)}

    @app.job("pay", max_retries=3, retry=QUICK)
    async def pay(ctx: JobContext, amount: int) -> Any:
        charged = await ctx.step("charge", count, "charge", amount * 100)
        remote = await ctx.step("remote", fetch_remote, n=amount)
        if ctx.attempt == 1:
            raise RuntimeError("network blip after the charge")
        mailed = await ctx.step("mail", count, "mail", "sent")
        return {"charged": charged, "remote": remote, "mailed": mailed}

    (job,) = await run_jobs(app, ("pay", {"amount": 7}))
    assert job.state is JobState.COMPLETED
    assert job.attempt == 2
    # As stored (JSON): the tuple comes back a list on every attempt.
    assert job.result == {"charged": 700, "remote": {"n": 7, "tuple": [1, 2]}, "mailed": "sent"}
    assert runs == {"charge": 1, "remote": 1, "mail": 1}
    assert await app.store.job_steps(job.id) == {
        "charge": 700,
        "remote": {"n": 7, "tuple": [1, 2]},
        "mail": "sent",
    }


async def test_sync_handlers_use_steps_without_await(app):
    runs: list[str] = []

    @app.job("sync_steps", max_retries=2, retry=QUICK)
    def sync_steps(ctx: JobContext) -> Any:
        first = ctx.step("first", lambda: runs.append("first") or 1)
        if ctx.last_checkpoint is None:
            ctx.checkpoint({"seen": first})
            raise RuntimeError("fail once")
        second = ctx.step("second", lambda: runs.append("second") or 2)
        return [first, second, ctx.last_checkpoint]

    (job,) = await run_jobs(app, ("sync_steps", {}))
    assert job.state is JobState.COMPLETED, job.error
    assert job.result == [1, 2, {"seen": 1}]
    assert runs == ["first", "second"]


async def test_concurrent_calls_with_one_name_run_the_step_once(app):
    # "Two calls with the same name in one job return the first stored result":
    # also when they overlap (asyncio.gather). Both used to run fn and each got its
    # own value back, while only the first was stored for later attempts.
    runs: list[int] = []

    async def charge() -> int:
        runs.append(1)
        n = len(runs)
        await asyncio.sleep(0.05)  # wait-ok: keeps the calls overlapping
        return n

    @app.job("gathered")
    async def gathered(ctx: JobContext) -> Any:
        return await asyncio.gather(*[ctx.step("charge", charge) for _ in range(5)])

    @app.job("threaded")
    def threaded(ctx: JobContext) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        def once() -> int:
            runs.append(1)
            time.sleep(0.05)  # wait-ok: keeps the calls overlapping
            return 7

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: ctx.step("charge", once), range(4)))

    job, tjob = await run_jobs(app, ("gathered", {}), ("threaded", {}))
    assert job.state is JobState.COMPLETED, job.error
    assert tjob.state is JobState.COMPLETED, tjob.error
    assert len(runs) == 2
    stored = (await app.store.job_steps(job.id))["charge"]
    assert job.result == [stored] * 5
    assert tjob.result == [7] * 4


async def test_a_step_name_keeps_no_lock_once_its_calls_returned() -> None:
    steps = Steps(None)
    for i in range(100):
        assert await steps.step(f"item-{i}", lambda i=i: i, (), {}) == i
    assert steps.step_sync("sync", lambda: 1, (), {}) == 1
    assert steps._running == {}
    assert steps._running_sync == {}


async def test_a_step_that_raises_is_not_stored_and_runs_again(app):
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("first call fails")
        return "ok"

    @app.job("flaky_step", max_retries=2, retry=QUICK)
    async def flaky_step(ctx: JobContext) -> Any:
        return await ctx.step("call", flaky)

    (job,) = await run_jobs(app, ("flaky_step", {}))
    assert job.state is JobState.COMPLETED
    assert job.result == "ok"
    assert len(calls) == 2
    assert "ConnectionError" in (await app.store.executions(job.id))[0].error


@pytest.mark.parametrize(
    "name", ["", "x" * 201, "bad\x00name", "tab\there", "c1\x85", "\ud800", 42]
)
async def test_bad_step_names_fail_the_job_permanently(app, name):
    @app.job("bad_name", max_retries=3)
    async def bad_name(ctx: JobContext) -> Any:
        return await ctx.step(name, lambda: 1)

    (job,) = await run_jobs(app, ("bad_name", {}))
    assert job.state is JobState.FAILED
    assert job.attempt == 1  # permanent: not retried
    assert "step name" in job.error
    with pytest.raises(ValidationError):
        check_step_name(name)


async def test_an_unstorable_step_result_fails_the_job_and_is_not_stored(app):
    @app.job("nan_step", max_retries=3)
    async def nan_step(ctx: JobContext) -> Any:
        return await ctx.step("nan", lambda: float("nan"))

    (job,) = await run_jobs(app, ("nan_step", {}))
    assert job.state is JobState.FAILED
    assert "finite" in job.error
    assert await app.store.job_steps(job.id) == {}


async def test_a_timed_out_job_ends_only_once_its_step_thread_returned(app):
    spans: list[tuple[float, float]] = []

    def slow_step() -> str:
        began = time.time()
        time.sleep(0.6)  # wait-ok: a step's blocking work that outlasts the job's timeout
        spans.append((began, time.time()))
        return "late"

    @app.job("slow_step", max_retries=0, timeout=0.2)
    async def slow_step_job(ctx: JobContext) -> Any:
        return await ctx.step("slow", slow_step)

    (job,) = await run_jobs(app, ("slow_step", {}))
    assert job.state is JobState.FAILED
    assert "timed out" in job.error
    ((_began, ended),) = spans
    (run,) = await app.store.executions(job.id)
    # The attempt's outcome was written after its step's code had stopped.
    assert run.finished_at.timestamp() >= ended
    assert await app.store.job_steps(job.id) == {}


# -- checkpoints ------------------------------------------------------------------------------


async def test_a_checkpoint_survives_retries(app):
    seen: list[Any] = []

    @app.job("loop", max_retries=3, retry=QUICK)
    async def loop(ctx: JobContext, items: int) -> int:
        seen.append(ctx.last_checkpoint)
        start = (ctx.last_checkpoint or {"next": 0})["next"]
        done = 0
        for i in range(start, items):
            done += 1
            await ctx.checkpoint({"next": i + 1})
            if ctx.attempt == 1 and i == 4:
                raise RuntimeError("crash in the middle of the loop")
        return done

    (job,) = await run_jobs(app, ("loop", {"items": 10}))
    assert job.state is JobState.COMPLETED
    assert seen == [None, {"next": 5}]
    assert job.result == 5  # the second attempt did only the rest
    assert job.checkpoint == {"next": 10}


async def test_a_checkpoint_that_is_not_json_is_refused(app):
    @app.job("bad_checkpoint", max_retries=0)
    async def bad_checkpoint(ctx: JobContext) -> Any:
        await ctx.checkpoint({"inf": float("inf")})

    (job,) = await run_jobs(app, ("bad_checkpoint", {}))
    assert job.state is JobState.FAILED
    assert "checkpoint.inf" in job.error
    assert job.checkpoint is None


# -- fencing ----------------------------------------------------------------------------------


async def leased(store: Store) -> Any:
    (job,) = [r.job for r in await store.enqueue_many([NewJob("t")], NOW)]
    (running,) = await store.fetch("w1", queues=[], job_types=[], limit=1, now=NOW)
    assert running.id == job.id
    return running


async def test_step_and_checkpoint_writes_are_fenced_by_the_lease(store):
    job = await leased(store)
    assert await store.save_step(job.id, job.lease_token, "a", {"v": 1}, NOW)
    assert await store.save_checkpoint(job.id, job.lease_token, [1, "x"], NOW)
    # A step stored already keeps its first result.
    assert await store.save_step(job.id, job.lease_token, "a", {"v": 2}, NOW)
    assert not await store.save_step(job.id, "not-the-token", "b", 1, NOW)
    assert not await store.save_checkpoint(job.id, "not-the-token", 2, NOW)
    assert not await store.save_step("no-such-job", job.lease_token, "b", 1, NOW)
    # The attempt ends (a retry): its lease is gone, and with it its writes.
    later = NOW + timedelta(seconds=1)
    retry = Finish(job.id, job.lease_token, Action.RETRY, error="x")
    assert await store.finish_many([retry], later) == [True]
    assert not await store.save_step(job.id, job.lease_token, "b", 1, later)
    assert not await store.save_checkpoint(job.id, job.lease_token, 3, later)
    assert await store.job_steps(job.id) == {"a": {"v": 1}}
    again = await store.get(job.id)
    assert again.checkpoint == [1, "x"]
    # The next attempt sees them, and has its own lease.
    (second,) = await store.fetch("w2", queues=[], job_types=[], limit=1, now=later)
    assert second.checkpoint == [1, "x"]
    assert await store.save_step(second.id, second.lease_token, "b", None, later)
    assert await store.job_steps(job.id) == {"a": {"v": 1}, "b": None}


async def test_a_zombie_attempt_that_lost_its_lease_gets_lease_lost(store):
    job = await leased(store)
    loop = asyncio.get_running_loop()
    steps = Steps(LocalSteps(store, job.id, job.lease_token, lambda: NOW, loop))
    assert await steps.step("one", lambda: 1, (), {}) == 1
    # Its worker is declared dead and the job rescued: a new attempt owns it.
    rescued = await store.rescue(heartbeat_timeout=0, max_lost=5, now=NOW + timedelta(hours=1))
    assert [r.job_id for r in rescued] == [job.id]
    ran: list[int] = []
    with pytest.raises(LeaseLost, match="no longer holds the job's lease"):
        await steps.step("two", lambda: ran.append(1) or 2, (), {})
    assert ran == [1]  # it ran (the zombie could not know), but nothing was stored
    with pytest.raises(LeaseLost):
        await steps.checkpoint({"i": 1})
    assert await store.job_steps(job.id) == {"one": 1}
    assert (await store.get(job.id)).checkpoint is None
    # A completed step still answers from memory without a write.
    assert await steps.step("one", lambda: 99, (), {}) == 1


async def test_the_store_keeps_nothing_for_values_json_cannot_hold(store):
    job = await leased(store)
    with pytest.raises(ValidationError):
        await store.save_step(job.id, job.lease_token, "n", {"s": "a\x00b"}, NOW)
    with pytest.raises(ValidationError):
        await store.save_checkpoint(job.id, job.lease_token, float("nan"), NOW)
    assert await store.job_steps(job.id) == {}


async def test_steps_are_deleted_with_their_job(store):
    done = await leased(store)
    assert await store.save_step(done.id, done.lease_token, "s", 1, NOW)
    assert await store.finish_many([Finish(done.id, done.lease_token, Action.COMPLETE)], NOW)
    failed = await leased(store)
    assert await store.save_step(failed.id, failed.lease_token, "s", 2, NOW)
    assert await store.finish_many([Finish(failed.id, failed.lease_token, Action.FAIL)], NOW)
    assert await store.prune(NOW + timedelta(seconds=1)) == 1
    assert await store.job_steps(done.id) == {}
    assert await store.job_steps(failed.id) == {"s": 2}
    assert await store.purge_failed([failed.id], NOW) == 1
    assert await store.job_steps(failed.id) == {}


# -- heal before retry ------------------------------------------------------------------------


async def test_a_heal_changes_the_payload_of_the_next_attempt(app):
    heals: list[tuple[Any, str, int]] = []

    def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> dict[str, Any]:
        heals.append((payload, f"{type(error).__name__}: {error}", attempt))
        return {**payload, "rows": payload["rows"][:2]}

    @app.job("ingest", max_retries=3, retry=QUICK, heal=heal)
    async def ingest(ctx: JobContext, rows: list[int]) -> int:
        if len(rows) > 2:
            raise ValueError(f"{len(rows)} rows is too many")
        return sum(rows)

    (job,) = await run_jobs(app, ("ingest", {"rows": [1, 2, 3, 4]}))
    assert job.state is JobState.COMPLETED
    assert job.result == 3
    assert job.payload == {"rows": [1, 2]}
    assert job.payload_version == 2
    assert heals == [({"rows": [1, 2, 3, 4]}, "ValueError: 4 rows is too many", 1)]
    runs = await app.store.executions(job.id)
    assert [(e.outcome, e.payload_version) for e in runs] == [("retry", 1), ("completed", 2)]
    events = [e for e in await app.store.events_after(0, 1000) if e.job_id == job.id]
    retrying = [e.data for e in events if e.type == "job_retrying"]
    assert len(retrying) == 1
    assert retrying[0]["healed"] is True
    assert retrying[0]["payload_version"] == 2
    async with api_client(app) as client:
        body = (await client.get(f"/api/jobs/{job.id}")).json()
    assert body["job"]["payload_version"] == 2
    assert [e["payload_version"] for e in body["job"]["executions"]] == [1, 2]


async def test_heals_are_bounded_by_max_heals(app):
    async def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> dict[str, Any]:
        return {"n": payload["n"] + 1}

    @app.job("stubborn", max_retries=3, retry=QUICK, heal=heal, max_heals=1)
    async def stubborn(ctx: JobContext, n: int) -> None:
        raise RuntimeError(f"still broken at {n}")

    (job,) = await run_jobs(app, ("stubborn", {"n": 0}))
    assert job.state is JobState.FAILED
    assert job.payload == {"n": 1}
    assert job.payload_version == 2
    runs = await app.store.executions(job.id)
    assert [e.payload_version for e in runs] == [1, 2, 2, 2]


def raising_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    raise KeyError("heal is broken")


def garbage_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    return "not a payload"


def invalid_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    return {"n": "not an int", "extra": 1}


def nan_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    return {"n": float("nan")}


async def slow_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    await asyncio.sleep(60)  # wait-ok: a heal that overruns its timeout
    return {"n": 5}


def stuck_heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
    time.sleep(3)  # wait-ok: a sync heal that overruns its timeout (in its own thread)
    return {"n": 5}


@pytest.mark.parametrize(
    "heal", [raising_heal, garbage_heal, invalid_heal, nan_heal, slow_heal, stuck_heal]
)
async def test_a_broken_heal_never_stops_the_retry(app, heal, monkeypatch):
    import conveyor.runtime.steps as steps

    monkeypatch.setattr(steps, "HEAL_TIMEOUT", 0.2)

    @app.job("once", max_retries=2, retry=QUICK, heal=heal)
    async def once(ctx: JobContext, n: int) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return n

    (job,) = await run_jobs(app, ("once", {"n": 3}))
    assert job.state is JobState.COMPLETED
    assert job.result == 3
    assert job.payload == {"n": 3}
    assert job.payload_version == 1
    assert [e.payload_version for e in await app.store.executions(job.id)] == [1, 1]


async def test_a_heal_returning_none_keeps_the_payload(app):
    calls: list[int] = []

    def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> None:
        calls.append(attempt)

    @app.job("keep", max_retries=1, retry=QUICK, heal=heal)
    async def keep(ctx: JobContext) -> None:
        raise RuntimeError("always")

    (job,) = await run_jobs(app, ("keep", {}))
    assert job.state is JobState.FAILED
    assert calls == [1]  # before the one retry; never after the last attempt
    assert job.payload_version == 1


def test_heal_options_are_checked_at_registration():
    from conveyor.domain.errors import ConfigurationError

    app = Conveyor("memory://")
    with pytest.raises(ConfigurationError, match="max_heals"):
        app.job("a", max_heals=-1)
    with pytest.raises(ConfigurationError, match="max_heals"):
        app.job("a", max_heals=True)
    with pytest.raises(ConfigurationError, match="heal"):
        app.job("a", heal="not callable")


# -- handlers in child processes (isolation="process") --------------------------------------


@pytest.mark.parametrize("handler", [stepsapp.counted_steps, stepsapp.counted_steps_async])
async def test_steps_and_checkpoints_work_in_a_child_process(app, tmp_path, handler):
    app.job("child_steps", isolation="process", max_retries=2, retry=QUICK)(handler)
    ran = tmp_path / "ran.txt"
    (job,) = await run_jobs(app, ("child_steps", {"path": str(ran)}))
    assert job.state is JobState.COMPLETED, job.error
    assert ran.read_text().splitlines() == ["first"]  # once, in the first attempt's child
    first = job.result["first"]
    assert first[0] == "first"
    assert job.result["checkpoint"] == {"after": "first"}
    assert job.result["attempt"] == 2
    assert await app.store.job_steps(job.id) == {"first": first}


async def test_a_child_whose_attempt_lost_its_lease_gets_lease_lost(app, tmp_path):
    app.job("zombie_steps", isolation="process", max_retries=2, timeout=30)(stepsapp.zombie_steps)
    flag, out = tmp_path / "flag", tmp_path / "out.txt"
    job = await app.enqueue("zombie_steps", {"flag": str(flag), "out": str(out)})
    async with running_worker(app, concurrency=2):

        async def stored_a() -> Any:
            return (await app.store.job_steps(job.id)) or None

        assert await async_wait_until(stored_a, 20, "step a") == {"a": "a"}
        running = await app.store.get(job.id)
        # Another party ends this attempt (as a rescue would): the lease is gone.
        later = app.now() + timedelta(hours=1)
        lost = Finish(job.id, running.lease_token, Action.RETRY, error="taken", retry_at=later)
        assert await app.store.finish_many([lost], app.now()) == [True]
        flag.write_text("go")

        async def reported() -> Any:
            return out.exists() and out.read_text().split()

        assert await async_wait_until(reported, 20, "the child's step b") == ["LeaseLost"]
    assert await app.store.job_steps(job.id) == {"a": "a"}
    after = await app.store.get(job.id)
    assert after.state is JobState.PENDING  # the zombie's own outcome was refused
    assert after.attempt == 1


async def test_calls_from_a_child_are_checked_like_any_input(store):
    job = await leased(store)
    ctx = JobContext(job.id, job.job_type, job.attempt, job.max_retries, job.queue, "w", {})
    loop = asyncio.get_running_loop()
    ctx._steps = Steps(LocalSteps(store, job.id, job.lease_token, lambda: NOW, loop))
    answer = child_calls(ctx)
    assert answer is not None
    for bad in [
        {"job_id": "other", "op": "load"},
        {"job_id": job.id, "op": "drop_tables"},
        {"job_id": job.id, "op": "save", "name": "", "value": 1},
        {"job_id": job.id, "op": "save", "name": ["x"], "value": 1},
        {"job_id": job.id, "op": "checkpoint", "value": float("nan")},
    ]:
        with pytest.raises(ValidationError):
            await answer(bad)
    assert await answer({"job_id": job.id, "op": "save", "name": "s", "value": "a\x00b"}) is None
    assert await answer({"job_id": job.id, "op": "load"}) == {"s": "a\ufffdb"}
    assert child_calls(JobContext("j", "t", 1, 0, "q", "w", {})) is None


async def test_a_handler_called_directly_keeps_its_steps_in_memory():
    runs: list[int] = []
    ctx = JobContext("j", "t", 1, 0, "default", "test", {})
    assert await ctx.step("a", lambda: runs.append(1) or 5) == 5
    assert await ctx.step("a", lambda: runs.append(1) or 6) == 5
    await ctx.checkpoint((1, 2))
    assert ctx.last_checkpoint == [1, 2]
    assert runs == [1]
    sync_ctx = JobContext("j", "t", 1, 0, "default", "test", {})
    assert await asyncio.to_thread(sync_ctx.step, "b", lambda: "in a thread") == "in a thread"
