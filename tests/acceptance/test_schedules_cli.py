"""``conveyor schedules ...`` and ``conveyor scheduler`` as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from support import conveyor_cmd, conveyor_env, run_cli, wait_until


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_add_list_show_pause_resume_delete(db: str) -> None:
    added = run_cli(
        db,
        "schedules",
        "add",
        "nightly",
        "30 2 * * *",
        "sleep",
        "--tz",
        "Europe/Berlin",
        "--payload",
        '{"seconds": 0.5}',
        "--overlap",
        "skip_if_running",
        "--json",
    )
    s = json.loads(added.stdout)
    assert (s["name"], s["timezone"], s["overlap"]) == (
        "nightly",
        "Europe/Berlin",
        "skip_if_running",
    )
    assert s["payload"] == {"seconds": 0.5}
    assert len(s["next_fire_times"]) == 5

    listed = json.loads(run_cli(db, "schedules", "list", "--json").stdout)
    assert [x["id"] for x in listed] == [s["id"]]
    table = run_cli(db, "schedules", "list", COLUMNS="200").stdout
    assert s["id"] in table
    assert "nightly" in table

    shown = run_cli(db, "schedules", "show", "nightly").stdout
    assert "next fire times:" in shown
    assert shown.count("T00:30:00Z") + shown.count("T01:30:00Z") + shown.count("T01:00:00Z") == 5

    assert "paused" in run_cli(db, "schedules", "pause", s["id"]).stdout
    paused = json.loads(run_cli(db, "schedules", "show", "nightly", "--json").stdout)
    assert (paused["state"], paused["next_fire_times"]) == ("paused", [])
    assert "active" in run_cli(db, "schedules", "resume", "nightly").stdout
    assert "deleted" in run_cli(db, "schedules", "delete", "nightly").stdout
    assert json.loads(run_cli(db, "schedules", "list", "--json").stdout) == []
    gone = run_cli(db, "schedules", "show", "nightly", check=False)
    assert gone.returncode == 1
    assert "not found" in gone.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["n", "*/5 * * *", "test_job"], "cron"),
        (["n", "* * * * *", "test_job", "--tz", "Mars/Base"], "timezone"),
        (["n", "* * * * *", "sleep", "--payload", '{"seconds": "long"}'], "payload.seconds"),
        (["n", "* * * * *", "nobody_serves_this"], "job_type"),
        (["n", "* * * * *", "test_job", "--jitter", "nan"], "jitter"),
        (["bad name", "* * * * *", "test_job"], "name"),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(db: str, args: list[str], says: str) -> None:
    proc = run_cli(db, "schedules", "add", *args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert json.loads(run_cli(db, "schedules", "list", "--json").stdout) == []


def test_the_scheduler_runs_alone_and_stops_on_sigterm(db: str, tmp_path: Path) -> None:
    log = tmp_path / "scheduler.out"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            conveyor_cmd("scheduler", "cronapp"),
            env=conveyor_env(db, CRON_TEST_LOG=str(tmp_path / "unused.log")),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:

            def fired() -> bool:
                out = run_cli(db, "jobs", "list", "--type", "cron_tick", "--json", check=False)
                return out.returncode == 0 and len(json.loads(out.stdout)["jobs"]) >= 2

            wait_until(fired, 20, "the scheduler to submit two cron_tick jobs")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "1 schedule(s) declared in code" in log.read_text()
    shown = json.loads(run_cli(db, "schedules", "show", "every-second", "--json").stdout)
    assert shown["source"] == "code"
    assert shown["last_fired_at"] is not None
