"""No log line, console output or response carries an API key or a password
(issue 10, kind 7), with ``conveyor api`` and the CLI run as a user runs them.

The scenario uses PostgreSQL with a password in its URL and drives the server
through successes, auth failures, refused requests, the WebSocket, and 500s
from a broken schema; then every byte the user or an operator could see is
searched for the key and the password.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from pg import PostgresServer
from support import conveyor_cmd, conveyor_env, free_port, run_cli, wait_until


@pytest.fixture
def secret_dsn(pg_server: PostgresServer, postgres_dsn: str) -> tuple[str, str]:
    """The test database reached as a role with a password: (dsn, password)."""
    role = f"leaky_{secrets.token_hex(4)}"
    password = f"Pw{secrets.token_hex(12)}"
    pg_server.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    return postgres_dsn.replace("postgres@", f"{role}:{password}@", 1), password


class ApiServer:
    """``conveyor api`` in a subprocess, its output in a file."""

    def __init__(self, dsn: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            conveyor_cmd("api", "--port", str(self.port)),
            env=conveyor_env(dsn),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"conveyor api exited:\n{self.log.read_text()}")
        try:
            return httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        self._fh.close()
        return self.log.read_text()


async def drive_websocket(port: int, key: str) -> list[str]:
    """Connect with ?token=, ping, then send a binary frame; the close reasons seen."""
    seen = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/api/events/ws?token={key}") as ws:
        await ws.send("ping")
        seen.append(str(await ws.recv()))
        await ws.send(b"\x00")
        try:
            async with asyncio.timeout(10):
                while True:
                    seen.append(str(await ws.recv()))
        except ConnectionClosed as exc:
            seen.append(f"{exc.rcvd}")
    async with websockets.connect(f"ws://127.0.0.1:{port}/api/events/ws?token={key}x") as ws:
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            seen.append(f"{exc.rcvd}")
    return seen


def exchange(resp: httpx.Response) -> str:
    return f"{resp.status_code} {dict(resp.headers)} {resp.text}"


def test_no_key_or_password_in_any_output(
    pg_server: PostgresServer, secret_dsn: tuple[str, str], postgres_dsn: str, tmp_path: Path
) -> None:
    dsn, password = secret_dsn
    seen: list[str] = []  # everything a person could read, but the key's own creation

    migrated = run_cli(dsn, "migrate")
    seen += [migrated.stdout, migrated.stderr]
    assert ":***@" in migrated.stdout  # the URL is shown, its password masked

    created = run_cli(dsn, "keys", "create", "--scope", "admin", "--name", "ops")
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("cvk_")
    seen.append(created.stderr)
    doomed = run_cli(dsn, "keys", "create", "--scope", "read", "--name", "doomed")
    doomed_key = doomed.stdout.strip().splitlines()[-1]
    listed = run_cli(dsn, "keys", "list", "--json")
    seen.append(listed.stdout)
    doomed_id = next(k["id"] for k in json.loads(listed.stdout) if k["name"] == "doomed")
    seen.append(run_cli(dsn, "keys", "revoke", doomed_id).stdout)

    server = ApiServer(dsn, tmp_path / "api.log")
    try:
        wait_until(server.healthy, 30, "conveyor api to answer")
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.base, timeout=10) as http:
            requests: list[tuple[str, str, dict[str, Any]]] = [
                ("GET", "/api/jobs", {"headers": auth}),
                (
                    "POST",
                    "/api/jobs",
                    {"headers": auth, "json": {"job_type": "test_job", "payload": {}}},
                ),
                ("POST", "/api/jobs", {"headers": auth, "json": {"job_type": 5}}),
                ("GET", "/api/jobs", {"headers": {"Authorization": f"Bearer {key}x"}}),
                ("GET", "/api/jobs", {"headers": {"Authorization": f"Bearer {doomed_key}"}}),
                ("GET", f"/api/jobs?token={key}", {}),
                ("GET", "/api/jobs", {}),
                ("POST", "/api/jobs", {"headers": {**auth, "content-type": "text/plain"}}),
                ("POST", "/api/jobs", {"headers": {**auth, "origin": "http://evil.example"}}),
                ("GET", "/api/jobs", {"headers": {**auth, "host": "evil.example"}}),
                ("PUT", "/api/jobs", {"headers": auth, "json": {}}),
                ("GET", "/ready", {}),
                ("GET", "/metrics", {}),
            ]
            for method, path, kwargs in requests:
                seen.append(exchange(http.request(method, path, **kwargs)))
            seen += asyncio.run(drive_websocket(server.port, key))

            # A schema that lost a table: every job read and write is a 500 now.
            pg_server.execute("ALTER TABLE conveyor.jobs RENAME TO jobs_moved", postgres_dsn)
            failures = [
                http.get("/api/jobs", headers=auth),
                http.get("/api/jobs/metrics", headers=auth),
                http.post("/api/jobs", headers=auth, json={"job_type": "test_job", "payload": {}}),
            ]
            for resp in failures:
                assert resp.status_code == 500, resp.text
                assert "reference" in resp.json()["error"]
                seen.append(exchange(resp))
    finally:
        log = server.stop()
    seen.append(log)
    assert ":***@" in log  # the banner shows the database, masked
    assert "api_error" in log or "api_unexpected_error" in log
    assert "jobs" in log  # the store's message went to the log, for the operator

    broken = run_cli(dsn, "jobs", "list", check=False)
    assert broken.returncode == 1
    seen += [broken.stdout, broken.stderr]
    unreachable = run_cli(
        f"postgresql://someone:{password}@127.0.0.1:{free_port()}/nowhere", "status", check=False
    )
    assert unreachable.returncode == 1
    assert "someone:***@127.0.0.1" in unreachable.stderr  # still says where it tried
    seen += [unreachable.stdout, unreachable.stderr]

    secret_part = key.split("_", 2)[2]
    for text in seen:
        assert password not in text, text
        assert key not in text, text
        assert secret_part not in text, text
        assert doomed_key.split("_", 2)[2] not in text, text


@pytest.mark.parametrize(
    ("module", "variable", "url", "hint"),
    [
        ("asyncpg", "CONVEYOR_DATABASE_URL", "postgresql://me:{pw}@127.0.0.1/db", "postgres"),
        ("redis", "CONVEYOR_REDIS_URL", "redis://:{pw}@127.0.0.1:6379/0", "redis"),
    ],
)
def test_install_hints_keep_their_brackets_and_hide_the_password(
    tmp_path: Path, module: str, variable: str, url: str, hint: str
) -> None:
    # The optional dependency missing, as on a plain `pip install conveyor`.
    blocked = tmp_path / "blocked" / module
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
    password = secrets.token_hex(8)
    env = conveyor_env(f"sqlite:///{tmp_path}/hint.db", **{variable: url.format(pw=password)})
    env["PYTHONPATH"] = f"{tmp_path / 'blocked'}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        conveyor_cmd("status"), env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"pip install 'conveyor[{hint}]'" in proc.stderr, proc.stderr
    assert password not in proc.stdout + proc.stderr
