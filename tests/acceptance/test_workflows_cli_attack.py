"""``conveyor workflows`` as a user runs it, on the shapes that broke it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import run_cli

pytestmark = pytest.mark.timeout(120)


def test_show_renders_a_chain_of_2000_steps(tmp_path: Path):
    """``workflows show`` of a deep chain died with a RecursionError traceback (a
    10,000-step chain is allowed); past a few levels the chain now goes on flat."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    n = 2000
    steps = [{"name": "s0", "job_type": "later"}] + [
        {"name": f"s{i}", "job_type": "later", "depends_on": [f"s{i - 1}"]} for i in range(1, n)
    ]
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"name": "chain", "steps": steps}))
    env = {"CONVEYOR_ALLOW_UNKNOWN_JOB_TYPES": "true", "COLUMNS": "100"}
    wid = run_cli(db, "workflows", "submit", str(path), **env).stdout.split()[0]
    shown = run_cli(db, "workflows", "show", wid, check=False, **env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert len(lines) == n + 1  # the workflow's line, then one per step
    assert "s1999 " in lines[-1]
    assert "after s1998" in lines[-1]
    assert max(len(line) for line in lines) <= 100


def test_submit_list_show_cancel_retry_as_a_user_runs_them(tmp_path: Path):
    db = f"sqlite:///{tmp_path / 'w.db'}"
    env = {"CONVEYOR_ALLOW_UNKNOWN_JOB_TYPES": "true"}
    path = tmp_path / "etl.json"
    path.write_text(
        json.dumps(
            {
                "name": "etl",
                "steps": [
                    {"name": "extract", "job_type": "later"},
                    {"name": "load", "job_type": "later", "depends_on": ["extract"]},
                ],
            }
        )
    )
    wid = run_cli(db, "workflows", "submit", str(path), **env).stdout.split()[0]
    listed = json.loads(run_cli(db, "workflows", "list", "--json", **env).stdout)
    assert [(w["id"], w["name"], w["status"]) for w in listed["workflows"]] == [
        (wid, "etl", "running")
    ]
    shown = json.loads(run_cli(db, "workflows", "show", wid, "--json", **env).stdout)
    steps = {s["name"]: s["status"] for s in shown["step_details"]}
    assert steps == {"extract": "pending", "load": "blocked"}

    cancelled = run_cli(db, "workflows", "cancel", wid, **env)
    assert cancelled.stdout.split()[:2] == [wid, "cancelled"]
    shown = json.loads(run_cli(db, "workflows", "show", wid, "--json", **env).stdout)
    assert {s["status"] for s in shown["step_details"]} == {"cancelled"}
    assert shown["status"] == "cancelled"

    again = run_cli(db, "workflows", "retry", wid, **env)
    assert f"{wid} running: 2 step(s) to run again" in again.stdout
    shown = json.loads(run_cli(db, "workflows", "show", wid, "--json", **env).stdout)
    assert {s["name"]: s["status"] for s in shown["step_details"]} == steps
    filtered = json.loads(
        run_cli(db, "workflows", "list", "--status", "cancelled", "--json", **env).stdout
    )
    assert filtered["workflows"] == []
    bad = run_cli(db, "workflows", "list", "--status", "bogus", check=False, **env)
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
