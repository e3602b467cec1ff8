"""Workflows keep the promises through kill -9: a worker killed in the middle of a
50-step workflow, on SQLite and on PostgreSQL; another worker finishes it, each
step's result is recorded once and the workflow ends exactly once.

Executions are counted from the lines the handlers append to a log file."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest

from conveyor import Conveyor, Settings
from conveyor.domain.workflow import WorkflowStatus
from support import exec_lines, start_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

LAYERS, WIDTH = 5, 10  # 50 steps; each depends on two steps of the layer before


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_dsn")
    return f"sqlite:///{tmp_path / 'wf.db'}"


def definition() -> dict:
    steps = []
    for layer in range(LAYERS):
        for i in range(WIDTH):
            deps = [f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % WIDTH}"] if layer else []
            steps.append(
                {
                    "name": f"L{layer}-{i}",
                    "job_type": "wf_step",
                    "depends_on": deps,
                    "payload": {"seconds": 0.05},
                }
            )
    return {"name": "kill-test", "steps": steps}


async def test_sigkill_mid_workflow_completes_with_each_result_once(db, tmp_path):
    log = tmp_path / "executions.log"
    settings = Settings(
        database_url=db,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        allow_unknown_job_types=True,
    )
    async with Conveyor(settings=settings) as app:
        run = await app.submit_workflow(definition())
        a = start_worker(db, tmp_path, log, "a")
        try:
            # Kill it once a third of the steps are done and others are running.
            wait_until(
                lambda: sum(1 for line in exec_lines(log) if line[3] == "done") >= 15,
                60,
                "15 steps done",
            )
            a.signal(signal.SIGKILL)
            a.proc.wait(10)
        finally:
            a.stop()
        at_kill = exec_lines(log)
        b = start_worker(db, tmp_path, log, "b")
        try:
            done = await app.workflows.wait(run.id, timeout=90)
        finally:
            b.stop()
        assert done.status is WorkflowStatus.COMPLETED
        assert (done.total_steps, done.completed_steps) == (50, 50)
        steps = {s.name: s for s in done.steps or []}
        for layer in range(LAYERS):
            for i in range(WIDTH):
                s = steps[f"L{layer}-{i}"]
                assert s.result is not None
                assert s.result["step"] == s.name
                expect = (
                    sorted({f"L{layer - 1}-{i}", f"L{layer - 1}-{(i + 1) % WIDTH}"})
                    if layer
                    else []
                )
                assert s.result["parents"] == expect
        dones = Counter(line[0] for line in exec_lines(log) if line[3] == "done")
        assert set(dones) == {s.job_id for s in steps.values()}
        # Only a step A had started and not finished when it died may run twice.
        a_started = {line[0] for line in at_kill if line[3] == "start"}
        twice = {j for j, n in dones.items() if n > 1}
        assert twice <= a_started
        assert max(dones.values()) <= 2
        events = await app.store.events_after(0, 100_000)
        ends = [e for e in events if e.type in ("workflow_completed", "workflow_failed")]
        assert [e.type for e in ends] == ["workflow_completed"]
        assert ends[0].data["success_count"] == 50
