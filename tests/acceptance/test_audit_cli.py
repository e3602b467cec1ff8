"""``conveyor audit`` as a user runs it (subprocesses on a real SQLite file): CLI
changes are recorded as ``cli:<user>``, verify/export/list, and a tampered row."""

from __future__ import annotations

import getpass
import json
import sqlite3
from pathlib import Path

from support import run_cli


def test_cli_changes_are_audited_verified_and_exported(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    key = run_cli(db, "secrets", "new-master-key").stdout.strip()
    env = {"CONVEYOR_MASTER_KEY": key}
    run_cli(db, "keys", "create", "--scope", "admin", "--name", "ops", **env)
    job_id = run_cli(db, "jobs", "submit", "test_job", "-p", "{}", **env).stdout.split()[0]
    run_cli(db, "queues", "pause", "mail", **env)
    run_cli(db, "jobs", "cancel", job_id, **env)

    listed = json.loads(run_cli(db, "audit", "list", "--json", **env).stdout)
    actor = f"cli:{getpass.getuser()}"
    assert [(e["action"], e["actor"]) for e in listed] == [
        ("api_key.create", actor),
        ("job.submit", actor),
        ("queue.pause", actor),
        ("job.cancel", actor),
    ]
    custody = json.loads(
        run_cli(db, "audit", "list", "--resource-id", job_id, "--json", **env).stdout
    )
    assert [e["action"] for e in custody] == ["job.submit", "job.cancel"]

    ok = run_cli(db, "audit", "verify", **env)
    assert "chain intact: 4 entries, last anchor seq 4" in ok.stdout
    assert "signed" in ok.stdout

    out = tmp_path / "audit.jsonl"
    run_cli(db, "audit", "export", "--output", str(out), **env)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3, 4]
    assert lines == listed

    bad = run_cli(db, "audit", "list", "--limit", "0", check=False, **env)
    assert bad.returncode == 2

    conn = sqlite3.connect(tmp_path / "c.db")
    conn.execute("UPDATE audit_log SET actor = 'nobody' WHERE seq = 2")
    conn.commit()
    conn.close()
    broken = run_cli(db, "audit", "verify", check=False, **env)
    assert broken.returncode == 1
    assert "chain broken at entry 2" in broken.stderr
    assert "edited" in broken.stderr


def test_without_a_master_key_anchors_are_unsigned_and_said_so(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    run_cli(db, "queues", "pause", "mail")
    first = run_cli(db, "audit", "verify")
    assert "chain intact: 1 entries, last anchor seq 1" in first.stdout
    assert "UNSIGNED" in first.stdout
    again = run_cli(db, "audit", "verify", "--no-anchor")
    assert "unsigned" in again.stderr
