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
