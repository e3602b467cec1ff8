"""Locks and leader leases across real processes, on one SQLite file and one PostgreSQL.

- 4 processes contend for one key for CONTEND_SECONDS (20 s: each process takes
  the lock dozens of times). From their own logs (their own clocks): never two holders at
  once (the holding intervals are disjoint), tokens strictly increase in
  acquisition order, every holder's fenced write went through, and a holder that
  ran past its TTL is refused by both the fence (``app.locks.check``) and the
  resource's own ``WHERE token < :token`` write.
- 3 processes campaign for a leader lease; the leader is killed with -9 and
  another leads within the lease TTL (+ the polling interval), with a greater
  token, and the two leaders' ticks never interleave.
"""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from support import conveyor_env, run_cli, wait_until

PROC = Path(__file__).with_name("lock_proc.py")
CONTEND_SECONDS = 20.0
LEADER_TTL = 1.5


def entries(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]


def spawn(db: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    """``lock_proc.py`` with its output appended to ``out`` (read on failure)."""
    with out.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, str(PROC), args[0], db, *args[1:]],
            env=conveyor_env(db),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_dsn"))
    url = f"sqlite:///{tmp_path / 'locks.db'}"
    run_cli(url, "migrate")
    return url


def test_four_processes_never_hold_one_lock_at_once(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "holders.jsonl"
    resource = tmp_path / "resource.db"
    out = tmp_path / "contenders.out"
    with sqlite3.connect(resource) as conn:
        conn.execute("CREATE TABLE resource (id INTEGER PRIMARY KEY, token INTEGER, writer INT)")
        conn.execute("INSERT INTO resource VALUES (1, 0, 0)")
    procs = [
        spawn(db_url, out, "contend", str(log), str(CONTEND_SECONDS), str(resource))
        for _ in range(3)
    ]
    procs.append(
        spawn(
            db_url, out, "contend", str(log), str(CONTEND_SECONDS), str(resource), "--expire-once"
        )
    )
    for p in procs:
        assert p.wait(CONTEND_SECONDS + 60) == 0, out.read_text()[-3000:]

    lines = entries(log)
    held = sorted((e for e in lines if e["event"] == "held"), key=lambda e: e["acquired_at"])
    expired = [e for e in lines if e["event"] == "expired"]
    assert len(held) >= 40, f"too little contention: {len(held)} holdings"
    assert len({e["pid"] for e in held}) == 4  # every process got the lock
    # Never two holders at once: each holding ends before the next one starts.
    for before, after in itertools.pairwise(held):
        assert before["released_at"] <= after["acquired_at"], (before, after)
    # Tokens strictly increase in acquisition order, and the holdings kept them all.
    tokens = [e["token"] for e in held]
    assert tokens == sorted(set(tokens))
    assert all(e["wrote"] and e["held_to_the_end"] for e in held)
    # The holder that ran past its TTL: superseded, refused by the fence and the resource.
    (stale,) = expired
    assert stale["check_refused"]
    assert stale["write_refused"]
    assert not stale["released_cleanly"]
    assert any(e["token"] > stale["token"] for e in held)
    assert sorted([*tokens, stale["token"]]) == list(range(1, len(tokens) + 2))
    listed = json.loads(run_cli(db_url, "locks", "list", "--all", "--json").stdout)
    assert listed == [
        {
            "key": "contended",
            "owner": None,
            "token": len(tokens) + 1,
            "acquired_at": listed[0]["acquired_at"],
            "expires_at": listed[0]["expires_at"],
            "held": False,
        }
    ]


def test_killing_the_leader_hands_the_lease_over_within_its_ttl(
    db_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "leader.jsonl"
    out = tmp_path / "leaders.out"
    procs = [spawn(db_url, out, "lead", str(log), str(LEADER_TTL)) for _ in range(3)]
    try:
        first = wait_until(
            lambda: [e for e in entries(log) if e["event"] == "leader"], 30, "a leader"
        )[0]
        # It leads for a while, alone.
        wait_until(lambda: sum(e["event"] == "tick" for e in entries(log)) >= 10, 10, "ticks")
        listed = json.loads(run_cli(db_url, "locks", "list", "--json").stdout)
        assert [(r["key"], r["token"]) for r in listed] == [("leader:singleton", first["token"])]
        (leader,) = [p for p in procs if p.pid == first["pid"]]
        leader.send_signal(signal.SIGKILL)
        killed_at = time.time()
        leader.wait(10)

        def successor() -> dict[str, Any] | None:
            new = [e for e in entries(log) if e["event"] == "leader" and e["pid"] != first["pid"]]
            return new[0] if new else None

        second = wait_until(successor, 30, "a new leader")
        took = second["at"] - killed_at
        # The lease runs out at most TTL after its last renewal; candidates try every TTL/3.
        assert took <= LEADER_TTL + LEADER_TTL / 3 + 1.0, took
        assert second["token"] > first["token"]
        wait_until(
            lambda: (
                sum(e["event"] == "tick" and e["pid"] == second["pid"] for e in entries(log)) >= 5
            ),
            10,
            "the new leader's ticks",
        )
        # Exactly one leader at a time: the ticks' pids change once, never back.
        ticks = [e["pid"] for e in entries(log) if e["event"] == "tick"]
        changes = [i for i in range(1, len(ticks)) if ticks[i] != ticks[i - 1]]
        assert len(changes) == 1
        assert ticks[0] == first["pid"]
        assert ticks[-1] == second["pid"]
        assert [e for e in entries(log) if e["event"] == "leader"] == [first, second]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


async def test_cli_lists_held_locks_and_refuses_a_bad_limit(tmp_path: Path) -> None:
    from conveyor import Conveyor

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    async with Conveyor(url) as app, app.lock("invoice:[42]", ttl=60) as lock:
        shown = run_cli(url, "locks", "list", COLUMNS="200").stdout
        assert "invoice:[42]" in shown  # printed as text, not markup
        assert lock.owner in shown
        listed = json.loads(run_cli(url, "locks", "list", "--json").stdout)
        assert [(r["key"], r["token"], r["held"]) for r in listed] == [("invoice:[42]", 1, True)]
        bad = run_cli(url, "locks", "list", "--limit", "0", check=False)
        assert bad.returncode == 2
        assert "--limit" in bad.stderr
    assert json.loads(run_cli(url, "locks", "list", "--json").stdout) == []
