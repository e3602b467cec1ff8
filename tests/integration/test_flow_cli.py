"""``conveyor queues`` and ``conveyor status`` for flow control, as real processes."""

from __future__ import annotations

import json
from pathlib import Path

from support import run_cli


def test_queues_pause_limit_resume_and_status(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    out = run_cli(db, "queues", "pause", "emails").stdout
    assert "Queue emails paused" in out
    run_cli(db, "queues", "limit", "emails", "3")
    (q,) = json.loads(run_cli(db, "queues", "list", "--json").stdout)
    assert (q["name"], q["paused"], q["concurrency_limit"]) == ("emails", True, 3)
    status = json.loads(run_cli(db, "status", "--json").stdout)
    assert [s["name"] for s in status["queues"]] == ["emails"]
    assert "Queue controls" in run_cli(db, "status").stdout
    run_cli(db, "queues", "resume", "emails")
    run_cli(db, "queues", "limit", "emails", "--clear")
    (q,) = json.loads(run_cli(db, "queues", "list", "--json").stdout)
    assert (q["paused"], q["concurrency_limit"]) == (False, None)


def test_bad_values_are_refused_with_details(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    bad = run_cli(db, "queues", "limit", "emails", "0", check=False)
    assert bad.returncode == 1
    assert "concurrency_limit" in bad.stderr
    bad = run_cli(db, "queues", "pause", "bad name", check=False)
    assert bad.returncode == 1
    assert "queue" in bad.stderr
    assert json.loads(run_cli(db, "queues", "list", "--json").stdout) == []
    bad = run_cli(db, "worker", "jobapp", "--capability", "gpu", check=False)
    assert bad.returncode == 1
    assert "capabilit" in bad.stderr
