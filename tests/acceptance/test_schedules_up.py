"""Exactly once per fire instant across a fleet: 3 ``conveyor up`` processes on
one database (a SQLite file, then PostgreSQL) run one schedule every second
(6-field cron, declared in code: tests/integration/cronapp.py).

Each run lasts 30 s (30 fire instants). Counted from the handlers' own log
files: every second of the window has exactly one job (one job id, however
often it ran), and no fire instant has two jobs. Then the same with one process killed (SIGKILL) and
restarted midway.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_up import Server

from support import wait_until

WINDOW = 30.0  # seconds: 30 fire instants per run


def read_logs(tmp_path: Path) -> dict[str, set[str]]:
    """fire instant -> the job ids that ran for it, from every process's log."""
    jobs: dict[str, set[str]] = defaultdict(set)
    for log in tmp_path.glob("cron-*.log"):
        for line in log.read_text().splitlines():
            fire_at, job_id, _pid = line.split()
            jobs[fire_at].add(job_id)
    return jobs


def seconds(start: datetime, end: datetime) -> list[str]:
    first = start.replace(microsecond=0) + timedelta(seconds=1)
    out = []
    t = first
    while t <= end:
        out.append(t.isoformat().replace("+00:00", "Z"))
        t += timedelta(seconds=1)
    return out


def launch(db: str, tmp_path: Path, n: int) -> Server:
    return Server(
        db,
        tmp_path / f"up-{n}.out",
        "--no-demo",
        "--app",
        "cronapp",
        env={"CRON_TEST_LOG": str(tmp_path / f"cron-{n}.log")},
    )


def run_fleet(db: str, tmp_path: Path, *, kill_one: bool) -> None:
    servers = [launch(db, tmp_path, n) for n in range(3)]
    try:
        for s in servers:
            s.wait_healthy()
        start = datetime.now(UTC)
        if kill_one:
            time.sleep(WINDOW / 3)  # wait-ok: the fleet runs unharmed for a third of the window
            servers[0].proc.kill()
            servers[0].kill()
            restarted = launch(db, tmp_path, 3)
            servers.append(restarted)
            restarted.wait_healthy()
        end = start + timedelta(seconds=WINDOW)
        remaining = (end - datetime.now(UTC)).total_seconds()
        time.sleep(max(0.0, remaining))  # wait-ok: the window under test
        expected = seconds(start, end)

        def all_ran() -> bool:
            logs = read_logs(tmp_path)
            return all(s in logs for s in expected)

        wait_until(all_ran, 30, "a job of every fire instant of the window to run")
        for s in servers[-3:] if kill_one else servers:
            assert s.terminate() == 0, s.output()
    finally:
        for s in servers:
            s.kill()
    logs = read_logs(tmp_path)
    doubled = {t: ids for t, ids in logs.items() if len(ids) > 1}
    assert not doubled, f"fire instants with more than one job: {doubled}"
    in_window = [t for t in expected if t in logs]
    assert in_window == expected  # exactly one job per second of the window
    assert len(expected) >= WINDOW - 1
    outputs = "".join(s.output() for s in servers)
    assert "scheduler: on (1 schedule(s) declared in code)" in outputs


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cron.db'}"


def test_three_processes_on_sqlite_fire_each_second_once(sqlite_db: str, tmp_path: Path) -> None:
    run_fleet(sqlite_db, tmp_path, kill_one=False)


def test_three_processes_on_sqlite_with_one_killed_and_restarted(
    sqlite_db: str, tmp_path: Path
) -> None:
    run_fleet(sqlite_db, tmp_path, kill_one=True)


def test_three_processes_on_postgres_fire_each_second_once(
    postgres_dsn: str, tmp_path: Path
) -> None:
    run_fleet(postgres_dsn, tmp_path, kill_one=False)


def test_three_processes_on_postgres_with_one_killed_and_restarted(
    postgres_dsn: str, tmp_path: Path
) -> None:
    run_fleet(postgres_dsn, tmp_path, kill_one=True)
