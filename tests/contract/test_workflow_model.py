"""Property tests: random DAGs and random failing steps, run on a real store, against
a pure model of readiness and failure propagation."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storekit import BASE, all_events, lease, register

from conftest import StoreFactory
from conveyor.domain.errors import ValidationError
from conveyor.domain.job import Finish, NewJob
from conveyor.domain.states import Action
from conveyor.domain.workflow import NewWorkflow, OnFailure, StepSpec, WorkflowStatus, check_dag
from conveyor.storage.base import Store

pytestmark = pytest.mark.timeout(120)


@st.composite
def dags(draw, max_steps: int = 12):
    """(parents per step, failing steps): step i may depend on steps before it."""
    n = draw(st.integers(1, max_steps))
    parents = [
        sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else [] for i in range(n)
    ]
    failing = draw(st.sets(st.integers(0, n - 1), max_size=3))
    return parents, failing


def model_continue(parents: list[list[int]], failing: set[int]) -> list[str]:
    """``continue``: a step runs iff all its parents completed."""
    out: list[str] = []
    for i, ps in enumerate(parents):
        if any(out[p] != "completed" for p in ps):
            out.append("cancelled")
        else:
            out.append("failed" if i in failing else "completed")
    return out


async def run(store: Store, parents, failing, policy: OnFailure) -> tuple[list[str], list[int]]:
    """Submit, then repeatedly lease everything ready and finish it (failing the
    steps in ``failing``); returns final states and the order steps started."""
    spec = [
        (f"s{i}", NewJob("task", {"i": i}, depends_on=[f"s{p}" for p in ps]))
        for i, ps in enumerate(parents)
    ]
    wf, _ = await store.create_workflow(NewWorkflow("p", on_failure=policy), spec, BASE)
    started: list[int] = []
    for _ in range(len(parents) + 1):
        jobs = await lease(store, limit=100)
        if not jobs:
            break
        for j in jobs:
            i = int((j.step_name or "s-1")[1:])
            started.append(i)
            action = Action.FAIL if i in failing else Action.COMPLETE
            await store.finish_many([Finish(j.id, j.lease_token or "", action, error="x")], BASE)
    got = await store.get_workflow(wf.id)
    assert got.status.is_terminal, got
    by_name = {s.name: s.status for s in got.steps or []}
    states = [by_name[f"s{i}"] for i in range(len(parents))]
    expected = (
        WorkflowStatus.COMPLETED if all(s == "completed" for s in states) else WorkflowStatus.FAILED
    )
    assert got.status is expected
    ends = [
        e for e in await all_events(store) if e.type in ("workflow_completed", "workflow_failed")
    ]
    assert len(ends) == 1
    assert ends[0].data["total_steps"] == len(parents)
    return states, started


def on_every_adapter(adapters: dict[str, StoreFactory], folder: Path, check) -> None:
    async def go() -> None:
        for name, factory in adapters.items():
            (folder / name).mkdir()
            async with factory(folder / name) as store:
                await register(store)
                await check(store)

    asyncio.run(go())


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=dags())
def test_continue_matches_the_model(adapters, tmp_path_factory, case):
    parents, failing = case

    async def check(store: Store) -> None:
        states, started = await run(store, parents, failing, OnFailure.CONTINUE)
        assert states == model_continue(parents, failing)
        for i in started:  # a step starts only after all its parents completed
            assert all(states[p] == "completed" for p in parents[i])

    on_every_adapter(adapters, tmp_path_factory.mktemp("m"), check)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=dags())
def test_fail_fast_starts_nothing_after_a_failure(adapters, tmp_path_factory, case):
    parents, failing = case

    async def check(store: Store) -> None:
        states, started = await run(store, parents, failing, OnFailure.FAIL_FAST)
        if not any(i in failing for i in started):
            assert states == ["completed"] * len(parents)
            return
        assert "failed" in states
        # Steps leased with the failed one may still finish; none starts after it.
        for i, s in enumerate(states):
            if i not in started:
                assert s == "cancelled"

    on_every_adapter(adapters, tmp_path_factory.mktemp("m"), check)


@given(st.integers(2, 30), st.randoms(use_true_random=False))
def test_check_dag_orders_parents_first_and_finds_every_cycle(n, rnd: random.Random):
    parents = [sorted(rnd.sample(range(i), min(i, rnd.randint(0, 3)))) for i in range(n)]
    specs = [
        StepSpec(f"s{i}", "t", depends_on=tuple(f"s{p}" for p in ps))
        for i, ps in enumerate(parents)
    ]
    order = check_dag(specs)
    pos = {name: k for k, name in enumerate(order)}
    assert sorted(order) == sorted(s.name for s in specs)
    for s in specs:
        assert all(pos[d] < pos[s.name] for d in s.depends_on)
    # A back edge from an ancestor to a descendant closes a cycle.
    child = next((i for i in range(n) if parents[i]), None)
    if child is not None:
        p = parents[child][0]
        broken = list(specs)
        broken[p] = StepSpec(f"s{p}", "t", depends_on=(*specs[p].depends_on, f"s{child}"))
        with pytest.raises(ValidationError, match="cycle"):
            check_dag(broken)
