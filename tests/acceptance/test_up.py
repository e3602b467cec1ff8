"""``conveyor up`` as a user runs it: a subprocess serving the API and a worker.

Checked with the shipped smoke test (scripts/smoke-test.sh), with and without
API keys, with the job-management seed's smoke flow (its route and field names),
and for a clean exit on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ROOT, conveyor_cmd, conveyor_env, run_cli, wait_until

FAST = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.2",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "1.0",
    "CONVEYOR_POLL_INTERVAL": "0.05",
}
SMOKE = ROOT / "scripts" / "smoke-test.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``conveyor up`` subprocess; its output goes to a file we can read."""

    def __init__(self, db: str, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            conveyor_cmd("up", "--port", str(self.port), *args),
            env=conveyor_env(db, **FAST, **(env or {})),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"conveyor up exited ({self.proc.returncode}) before answering:\n{self.output()}"
            )
        try:
            return httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_healthy(self) -> None:
        wait_until(self.healthy, 20, f"/health of conveyor up on port {self.port}")

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"conveyor up did not exit within {timeout}s of SIGTERM:\n{self.output()}"
            ) from None
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'up.db'}"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.kill()  # only if a test failed before stopping it


def start(servers: list[Server], db: str, tmp_path: Path, *args: str) -> Server:
    server = Server(db, tmp_path / f"up-{len(servers)}.log", *args)
    servers.append(server)
    server.wait_healthy()
    return server


def smoke(base: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SMOKE), base],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_passes_the_smoke_test_and_stops_on_sigterm(db, tmp_path, servers):
    # A fleet-wide default, as the job-management seed sets them: `fail` registers
    # no max_retries, so it takes this one.
    server = Server(db, tmp_path / "up.log", env={"CONVEYOR_JOB_MAX_RETRIES": "1"})
    servers.append(server)
    server.wait_healthy()
    out = server.output()
    assert "auth: off" in out
    assert f":{server.port}" in out
    assert "fail {} fails every attempt" in out  # the demo types and their payloads
    assert "a second Ctrl-C stops at once" in out

    result = smoke(server.base)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SMOKE TEST PASSED" in result.stdout
    seed_smoke_flow(server.base)

    assert server.terminate() == 0, server.output()
    assert "Traceback" not in server.output()  # a graceful stop, not a cancelled one
    assert "worker_stopped" in server.output()


def refuse_all_interfaces(db: str, **env: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    proc = subprocess.run(
        conveyor_cmd("up", "--host", "0.0.0.0", "--port", str(free_port())),
        env=conveyor_env(db, **FAST, **env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0, proc.stderr
    assert time.monotonic() - started < 15
    return proc


def test_up_on_all_interfaces_without_a_key_refuses_to_start(db):
    proc = refuse_all_interfaces(db)
    message = " ".join(proc.stderr.split())
    assert "Refusing to listen on 0.0.0.0" in message, proc.stderr
    assert "conveyor keys create" in message, proc.stderr
    assert "Traceback" not in proc.stderr


def test_up_refusal_keeps_the_suggested_command_on_one_line(db):
    # rich hard-wraps at the terminal width (80 when stderr is a file) unless told not to.
    proc = refuse_all_interfaces(db, COLUMNS="80")
    assert "`conveyor keys create --scope admin --name ops`" in proc.stderr, proc.stderr


def test_up_requires_the_key_once_one_exists(db, tmp_path, servers):
    created = run_cli(db, "keys", "create", "--scope", "admin", "--name", "ops")
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("cvk_"), created.stdout
    assert "Store it now" in created.stderr

    server = start(servers, db, tmp_path)
    assert "auth: on" in server.output()

    anon = httpx.get(f"{server.base}/api/jobs", timeout=5)
    assert anon.status_code == 401
    assert anon.json()["success"] is False
    assert httpx.get(f"{server.base}/api/jobs?token=cvk_wrong", timeout=5).status_code == 401
    ok = httpx.get(f"{server.base}/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert ok.status_code == 200, ok.text
    assert ok.json()["success"] is True

    anonymous_smoke = smoke(server.base)
    assert anonymous_smoke.returncode != 0
    assert "SMOKE TEST PASSED" not in anonymous_smoke.stdout

    result = smoke(server.base, CONVEYOR_API_KEY=key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SMOKE TEST PASSED" in result.stdout

    assert server.terminate() == 0, server.output()


def seed_smoke_flow(base: str) -> None:
    """The job-management seed's smoke flow, by its own names, against a real
    server: submit on /api/jobs/submit, poll retry_count and error_message, read
    processing and the last hour's statistics, cancel with a reason."""
    with httpx.Client(base_url=base, timeout=10) as c:
        before = c.get("/api/jobs/metrics").json()["metrics"]["statistics"]
        resp = c.post("/api/jobs/submit", json={"job_type": "fail", "payload": {}})
        assert resp.status_code == 200, resp.text
        failing = resp.json()["job_id"]
        resp = c.post(
            "/api/jobs/submit", json={"job_type": "test_job", "payload": {}, "delay_ms": 3_600_000}
        )
        assert resp.status_code == 200, resp.text
        waiting = resp.json()["job_id"]

        def dead() -> dict | None:
            job = c.get(f"/api/jobs/{failing}").json()["job"]
            return job if job["status"] == "failed" else None

        wait_until(dead, 20, "the failing job to be dead-lettered")
        job = c.get(f"/api/jobs/{failing}").json()["job"]
        # CONVEYOR_JOB_MAX_RETRIES=1: two attempts, both failed.
        assert job["max_retries"] == 1
        assert job["retry_count"] == 2
        assert job["error_message"].startswith("RuntimeError: failing on purpose")
        assert job["error_message"] == job["error"]
        pending = c.get(f"/api/jobs/{waiting}").json()["job"]
        assert pending["status"] == "pending"  # an hour away
        assert pending["scheduled_at"] > pending["created_at"]

        metrics = c.get("/api/jobs/metrics").json()["metrics"]
        depths = metrics["queue_depths"]
        assert depths["processing"] == depths["running"]
        stats = metrics["statistics"]
        assert stats["last_hour"]["failed"] == before["last_hour"].get("failed", 0) + 1
        assert stats["last_hour"]["submitted"] == before["last_hour"]["submitted"] + 2
        assert stats["last_24h"]["submitted"] >= stats["last_hour"]["submitted"]

        resp = c.delete(f"/api/jobs/{waiting}", params={"reason": "customer asked"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["message"] == "Job cancelled"
        cancelled = c.get(f"/api/jobs/{waiting}").json()["job"]
        assert cancelled["status"] == "cancelled"
        assert cancelled["error_message"] == "cancelled: customer asked"
        refused = c.delete(f"/api/jobs/{waiting}")
        assert refused.status_code == 409
        assert refused.json()["message"] == refused.json()["error"]


def test_up_honours_x_forwarded_proto_only_from_forwarded_allow_ips(db, tmp_path, servers):
    """Behind a TLS-terminating proxy the dashboard's session cookie gets
    ``Secure`` from the proxy's ``X-Forwarded-Proto``, which uvicorn believes
    only from FORWARDED_ALLOW_IPS (default 127.0.0.1; docs/dashboard.md)."""

    def cookie(server: Server) -> str:
        r = httpx.get(server.base + "/ui/jobs", headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200, r.text[:300]
        return r.headers["set-cookie"].lower()

    trusted = start(servers, db, tmp_path)
    assert "; secure" in cookie(trusted)  # the test's requests come from 127.0.0.1
    assert trusted.terminate() == 0
    other = Server(db, tmp_path / "up-other.log", env={"FORWARDED_ALLOW_IPS": "10.0.0.7"})
    servers.append(other)
    other.wait_healthy()
    assert "secure" not in cookie(other)
    assert other.terminate() == 0
