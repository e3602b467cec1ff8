"""Contract, randomised: every adapter agrees with the in-memory reference.

Hypothesis drives all adapters with the same random sequence of operations and
a frozen clock. After every step each adapter must give the same answer as
``memory`` (mapped from its own job ids to submission indexes), every job
state change must be one of ``TRANSITIONS`` and must append exactly one
matching lifecycle event, and event ids must keep increasing.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storekit import BASE, worker_info

from conveyor.domain.errors import ConveyorError
from conveyor.domain.job import FINISH_ACTIONS, Finish, Job, JobQuery, NewJob
from conveyor.domain.states import EVENT_FOR_ACTION, TRANSITIONS, JobState
from conveyor.storage.base import Store

if TYPE_CHECKING:
    from conftest import StoreFactory

WORKERS = ("w1", "w2")
JOB_REF = st.integers(0, 7)  # taken modulo the number of jobs

ENQUEUE = st.tuples(
    st.just("enqueue"),
    st.sampled_from(["plain", "child", "delayed"]),
    JOB_REF,
    st.sampled_from([None, "k1", "k2"]),
    st.sampled_from([0, 50, 100]),
    st.integers(0, 2),
)
FETCH = st.tuples(st.just("fetch"), st.sampled_from(WORKERS), st.integers(1, 3))
FINISH = st.tuples(
    st.just("finish"),
    JOB_REF,
    st.sampled_from(sorted(FINISH_ACTIONS)),
    st.sampled_from([False, False, False, True]),  # True: a stale (zombie) lease token
)
# Repeats weight the draw towards operations that move jobs.
OPS = st.one_of(
    ENQUEUE,
    ENQUEUE,
    FETCH,
    FETCH,
    FINISH,
    FINISH,
    FINISH,
    st.tuples(st.just("cancel"), JOB_REF),
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKERS)),
    st.tuples(st.just("advance"), st.sampled_from([1, 10, 20])),
    st.tuples(st.just("rescue"), st.integers(1, 3)),
    st.tuples(st.just("retry_failed"), JOB_REF),
)

# (old state, new state) -> the lifecycle events such a change may append.
ALLOWED_EVENTS: dict[tuple[JobState, JobState], set[str]] = {}
for (_src, _action), _dst in TRANSITIONS.items():
    ALLOWED_EVENTS.setdefault((_src, _dst), set()).add(EVENT_FOR_ACTION[_action].value)


class Driver:
    """One adapter under test plus its view of job ids (by submission index)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.tokens: dict[int, list[str]] = {}
        self.last_event = 0

    def ref(self, job_id: str) -> int:
        return self.index[job_id]

    async def apply(self, op: tuple[Any, ...], now: Any) -> Any:
        """Run one operation; return an adapter-independent account of its answer."""
        try:
            return await self._apply(op, now)
        except ConveyorError as exc:
            return ("error", type(exc).__name__)

    async def _apply(self, op: tuple[Any, ...], now: Any) -> Any:
        kind = op[0]
        s = self.store
        if kind == "enqueue":
            _, shape, parent, key, priority, retries = op
            fields: dict[str, Any] = {
                "idempotency_key": key,
                "priority": priority,
                "max_retries": retries,
            }
            if shape == "child" and self.ids:
                fields["depends_on"] = [self.ids[parent % len(self.ids)]]
            if shape == "delayed":
                fields["run_at"] = now + timedelta(seconds=15)
            (result,) = await s.enqueue_many([NewJob("t", **fields)], now)
            if not result.duplicate:
                self.index[result.job.id] = len(self.ids)
                self.ids.append(result.job.id)
            return ("enqueued", self.ref(result.job.id), result.duplicate, result.job.state)
        if kind == "fetch":
            _, worker, limit = op
            jobs = await s.fetch(worker, queues=(), job_types=(), limit=limit, now=now)
            for j in jobs:
                assert j.lease_token
                self.tokens.setdefault(self.ref(j.id), []).append(j.lease_token)
            return [(self.ref(j.id), j.attempt, j.status) for j in jobs]
        if kind == "finish":
            _, ref, action, stale = op
            if not self.ids:
                return None
            ref %= len(self.ids)
            tokens = self.tokens.get(ref, [])
            if stale:
                token = tokens[-2] if len(tokens) > 1 else "stale"
            else:
                token = tokens[-1] if tokens else "none"
            finish = Finish(self.ids[ref], token, action, result={"r": ref}, error="e")
            return await s.finish_many([finish], now)
        if kind == "cancel":
            if not self.ids:
                return None
            ref = op[1] % len(self.ids)
            job = await s.cancel(self.ids[ref], now)
            return (job.state, job.status)
        if kind == "heartbeat":
            return sorted(self.ref(i) for i in await s.heartbeat(op[1], 0, now))
        if kind == "rescue":
            rescued = await s.rescue(heartbeat_timeout=15, max_lost=op[1], now=now)
            return sorted((self.ref(r.job_id), r.worker_id, r.action) for r in rescued)
        if kind == "retry_failed":
            if not self.ids:
                return None
            ref = op[1] % len(self.ids)
            return [(self.ref(j.id), j.state) for j in await s.retry_failed([self.ids[ref]], now)]
        raise AssertionError(f"unknown op {op!r}")

    async def jobs(self) -> dict[int, Job]:
        page = await self.store.list_jobs(JobQuery(limit=1000))
        return {self.ref(j.id): j for j in page.jobs}

    async def view(self, jobs: dict[int, Job]) -> dict[int, tuple[Any, ...]]:
        out = {}
        for ref, j in jobs.items():
            out[ref] = (
                j.state,
                j.status,
                j.attempt,
                j.lost_count,
                j.run_at,
                j.completed_at,
                j.worker_id,
                j.lease_token is None,
                j.result,
                len(await self.store.executions(j.id)),
            )
        return out

    async def new_events(self) -> list[tuple[int, str, int | None, str | None]]:
        events = await self.store.events_after(self.last_event, 10_000)
        if events:
            ids = [e.id for e in events]
            assert ids == sorted(set(ids)), "event ids must strictly increase"
            assert ids[0] > self.last_event
            self.last_event = ids[-1]
        return [
            (
                e.id,
                e.type,
                None if e.job_id is None else self.ref(e.job_id),
                e.data.get("worker_id") if e.job_id is None else None,
            )
            for e in events
        ]


def check_step(
    op: tuple[Any, ...],
    before: dict[int, Job],
    after: dict[int, Job],
    events: list[tuple[int, str, int | None, str | None]],
) -> None:
    """Each state change follows TRANSITIONS and appends exactly its event."""
    per_job = Counter(ref for _, _, ref, _ in events if ref is not None)
    types = {(ref, t) for _, t, ref, _ in events if ref is not None}
    for ref, job in after.items():
        if ref not in before:
            assert per_job[ref] == 1, (op, ref)
            assert (ref, "job_submitted") in types, (op, ref)
            continue
        old, new = before[ref].state, job.state
        if old is new:
            cancel_asked = (
                op[0] == "cancel"
                and new is JobState.RUNNING
                and before[ref].cancel_requested_at is None
                and job.cancel_requested_at is not None
            )
            assert per_job[ref] == (1 if cancel_asked else 0), (op, ref, events)
            continue
        assert (old, new) in ALLOWED_EVENTS, f"{op}: job {ref} moved {old} -> {new}"
        assert per_job[ref] == 1, (op, ref, events)
        (event_type,) = [t for r, t in types if r == ref]
        assert event_type in ALLOWED_EVENTS[(old, new)], (op, ref, old, new, event_type)
    assert set(before) <= set(after), "no job disappears"


async def scenario(
    adapters: dict[str, StoreFactory], ops: list[tuple[Any, ...]], folder: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        drivers: dict[str, Driver] = {}
        for name, factory in adapters.items():
            path = folder / name
            path.mkdir()
            drivers[name] = Driver(await stack.enter_async_context(factory(path)))
        now = BASE
        for d in drivers.values():
            for w in WORKERS:
                await d.store.register_worker(worker_info(w), now)
            await d.new_events()
        states = {name: await d.jobs() for name, d in drivers.items()}
        for step, op in enumerate(ops):
            if op[0] == "advance":
                now += timedelta(seconds=op[1])
                continue
            answers, views, logs = {}, {}, {}
            for name, d in drivers.items():
                answers[name] = await d.apply(op, now)
                after = await d.jobs()
                events = await d.new_events()
                check_step(op, states[name], after, events)
                states[name] = after
                views[name] = await d.view(after)
                logs[name] = sorted(Counter((t, ref, w) for _, t, ref, w in events).items())
            reference = "memory"
            for name in drivers:
                context = f"step {step} {op}: {name} disagrees with {reference}"
                assert answers[name] == answers[reference], context
                assert views[name] == views[reference], context
                assert logs[name] == logs[reference], context


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    ops=st.tuples(
        st.lists(ENQUEUE, min_size=1, max_size=4), st.lists(OPS, min_size=20, max_size=50)
    )
)
def test_every_adapter_behaves_like_the_reference(
    adapters: dict[str, StoreFactory],
    ops: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]],
) -> None:
    # tmpfs when there is one: SQLite's fsync per commit costs nothing there.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as folder:
        asyncio.run(scenario(adapters, [*ops[0], *ops[1]], Path(folder)))
