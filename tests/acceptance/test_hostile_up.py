"""``conveyor up`` against hostile handlers: a handler's ``sys.exit`` fails its job,
not the server; SIGTERM never hands back a job whose code still runs."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
from test_up import Server

from support import run_cli, wait_until


def job(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/api/jobs/{job_id}", timeout=5).json()["job"]


def submit(base: str, job_type: str, payload: dict) -> str:
    resp = httpx.post(
        f"{base}/api/jobs", json={"job_type": job_type, "payload": payload}, timeout=5
    )
    assert resp.status_code == 201, resp.text
    return resp.json()["job_id"]


def test_sys_exit_in_a_handler_fails_the_job_and_up_serves_every_queue(tmp_path: Path):
    server = Server(f"sqlite:///{tmp_path}/h.db", tmp_path / "up.log", "--app", "hostileapp")
    try:
        server.wait_healthy()
        exits = submit(server.base, "exit_now", {"code": 3})
        charge = submit(server.base, "charge", {"order_id": "o-1"})  # queue "payments"
        wait_until(lambda: job(server.base, exits)["status"] == "failed", 20, "the exit job")
        wait_until(lambda: job(server.base, charge)["status"] == "completed", 20, "charge")
        assert job(server.base, exits)["error"] == "SystemExit: 3"
        assert server.healthy()  # the API lives on
        unknown = httpx.post(
            f"{server.base}/api/jobs", json={"job_type": "chrage", "payload": {}}, timeout=5
        )
        assert unknown.status_code == 400
        assert "charge" in unknown.json()["error"]
        assert server.terminate() == 0
    finally:
        server.kill()


def test_sigterm_past_the_grace_exits_and_the_blocked_job_is_rescued_not_overlapped(
    tmp_path: Path,
):
    db = f"sqlite:///{tmp_path}/b.db"
    log = tmp_path / "runs.log"
    log.touch()
    env = {"CONVEYOR_SHUTDOWN_GRACE": "0.5", "CONVEYOR_TEST_LOG": str(log)}
    first = Server(db, tmp_path / "up1.log", "--app", "hostileapp", env=env)
    try:
        first.wait_healthy()
        job_id = submit(first.base, "block_first", {})
        wait_until(lambda: "start" in log.read_text(), 20, "attempt 1 to start")
        started = time.monotonic()
        code = first.terminate(timeout=20)
        assert "Stopping: waiting up to 0.5 s for 1 running job(s)" in first.output()
        assert code == 75, first.output()  # EX_TEMPFAIL: a handler was left running
        assert time.monotonic() - started < 10
        assert "worker_abandoned_jobs" in first.output()
    finally:
        first.kill()
    second = Server(db, tmp_path / "up2.log", "--app", "hostileapp", env=env)
    try:
        second.wait_healthy()
        # Never handed back to pending while attempt 1's thread ran: rescued after the
        # dead process's heartbeat timed out, run again as attempt 2.
        wait_until(lambda: job(second.base, job_id)["status"] == "completed", 30, "rescue")
        done = job(second.base, job_id)
        assert done["result"] == {"attempt": 2}
        starts = [line.split() for line in log.read_text().splitlines()]
        assert [int(s[1]) for s in starts] == [1, 2]
        assert second.terminate() == 0
    finally:
        second.kill()


def test_a_second_ctrl_c_stops_at_once_and_leaves_running_code_to_the_rescuer(tmp_path: Path):
    db = f"sqlite:///{tmp_path}/c.db"
    log = tmp_path / "runs.log"
    log.touch()
    env = {"CONVEYOR_SHUTDOWN_GRACE": "60", "CONVEYOR_TEST_LOG": str(log)}
    server = Server(db, tmp_path / "up.log", "--app", "hostileapp", env=env)
    try:
        server.wait_healthy()
        job_id = submit(server.base, "block_first", {})
        wait_until(lambda: "start" in log.read_text(), 20, "attempt 1 to start")
        server.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "Stopping: waiting up to 60 s" in server.output(), 10, "1st Ctrl-C")
        first = " ".join(server.output().split())
        assert "Ctrl-C again to stop at once" in first
        assert "code that keeps running is not handed back" in first
        assert "and runs it again as a new attempt" in first
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        code = server.proc.wait(20)
        assert time.monotonic() - started < 15  # not the 60 s grace
        assert code == 75, server.output()  # EX_TEMPFAIL: a handler was left running
        assert "Stopping now." in server.output()
        # Its thread still ran: never handed back to pending, left for the rescuer.
        shown = json.loads(run_cli(db, "jobs", "show", job_id, "--json").stdout)
        assert shown["status"] == "running"
        assert shown["attempt"] == 1
    finally:
        server.kill()
