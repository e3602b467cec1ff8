"""The key lifecycle as a user runs it: ``conveyor keys rotate`` and ``revoke``
against a running ``conveyor api`` (real processes, a real SQLite file), the
last-key rule on a non-loopback bind, and ``conveyor status`` about webhook
secrets left unencrypted."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conveyor.domain.webhooks import Webhook
from conveyor.storage.sqlite import SQLiteStore
from support import conveyor_cmd, conveyor_env, free_port, run_cli, wait_until

pytestmark = pytest.mark.timeout(120)
HOOK_SECRET = "status-hook-secret-7f6e5d4c3b2a"


def outside_address() -> str:
    """This machine's non-loopback IPv4 address (the source of its default route),
    else 127.0.0.1. A UDP connect sends nothing; it only picks the route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            address = str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"
    return "127.0.0.1" if address.startswith("127.") or address == "0.0.0.0" else address


class Api:
    """``conveyor api`` in a subprocess bound to ``host``; requests go to ``reach``."""

    def __init__(self, db: str, log: Path, host: str, reach: str) -> None:
        self.port = free_port()
        self.base = f"http://{reach}:{self.port}"
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            conveyor_cmd("api", "--host", host, "--port", str(self.port)),
            # Many refused requests on purpose: they must stay 401s, not turn into 429s.
            env=conveyor_env(db, CONVEYOR_RATE_LIMIT_AUTH_FAILURES="100000/minute"),
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

    def get(self, key: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.base}/api/jobs", headers=headers, timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    run_cli(url, "migrate")
    return url


@pytest.fixture
def apis() -> Iterator[list[Api]]:
    started: list[Api] = []
    yield started
    for api in started:
        api.stop()


def serve(apis: list[Api], db: str, tmp_path: Path, host: str, reach: str) -> Api:
    api = Api(db, tmp_path / f"api-{len(apis)}.log", host, reach)
    apis.append(api)
    wait_until(api.healthy, 30, f"conveyor api on {host}:{api.port}")
    return api


def create_key(db: str, scope: str, name: str) -> str:
    created = run_cli(db, "keys", "create", "--scope", scope, "--name", name)
    return created.stdout.strip().splitlines()[-1]


def listed(db: str) -> dict[str, dict[str, str]]:
    rows = json.loads(run_cli(db, "keys", "list", "--json").stdout)
    return {r["id"]: r for r in rows}


def key_id(key: str) -> str:
    return key.split("_")[1]  # cvk_<id>_<secret>


def test_rotate_keeps_both_keys_for_the_overlap_then_only_the_new_one(
    db: str, tmp_path: Path, apis: list[Api]
) -> None:
    create_key(db, "admin", "ops")
    old = create_key(db, "write", "ci")
    api = serve(apis, db, tmp_path, "127.0.0.1", "127.0.0.1")
    assert api.get(old).status_code == 200

    rotated = run_cli(db, "keys", "rotate", key_id(old)[:4], "--overlap", "1h")
    new = rotated.stdout.strip().splitlines()[-1]
    assert new.startswith("cvk_")
    assert new != old
    assert "stays valid until" in rotated.stderr
    assert "not shown again" in rotated.stderr
    assert api.get(old).status_code == 200  # the overlap: both work
    assert api.get(new).status_code == 200
    rows = listed(db)
    assert (rows[key_id(new)]["name"], rows[key_id(new)]["scope"]) == ("ci", "write")
    ends = datetime.fromisoformat(rows[key_id(old)]["expires_at"].replace("Z", "+00:00"))
    assert abs(ends - (datetime.now(UTC) + timedelta(hours=1))) < timedelta(minutes=1)

    # A short overlap ends on its own: the old key gets the "expired" 401.
    short = run_cli(db, "keys", "rotate", key_id(new), "--overlap", "2s")
    newest = short.stdout.strip().splitlines()[-1]

    def expired() -> bool:
        r = api.get(new)
        return r.status_code == 401 and "expired" in r.json()["error"]

    wait_until(expired, 20, "the rotated key to expire after its 2 s overlap")
    assert api.get(newest).status_code == 200

    # Overlap 0: the old key is refused at once.
    at_once = run_cli(db, "keys", "rotate", key_id(newest), "--overlap", "0")
    assert "was revoked" in at_once.stderr
    assert api.get(newest).status_code == 401
    assert api.get(at_once.stdout.strip().splitlines()[-1]).status_code == 200

    for bad in (["--overlap", "31d"], ["--overlap", "soon"], ["--expires-in", "1s"]):
        refused = run_cli(db, "keys", "rotate", key_id(old), *bad, check=False)
        assert refused.returncode == 1, refused.stdout
        assert "Traceback" not in refused.stderr
    assert "not found" in run_cli(db, "keys", "rotate", "ffffffff", check=False).stderr
    revoked = run_cli(db, "keys", "rotate", key_id(newest), check=False)
    assert "is revoked" in revoked.stderr


def test_revoking_the_last_key_never_reopens_a_non_loopback_api(
    db: str, tmp_path: Path, apis: list[Api]
) -> None:
    first = create_key(db, "admin", "ops")
    second = create_key(db, "read", "dash")
    api = serve(apis, db, tmp_path, "0.0.0.0", outside_address())
    assert api.get(first).status_code == 200
    assert api.get(None).status_code == 401

    some_left = run_cli(db, "keys", "revoke", key_id(second)[:5])
    assert "Revoked key" in some_left.stdout
    assert "no active API key" not in some_left.stderr  # one is left: no warning

    last = run_cli(db, "keys", "revoke", key_id(first))
    warning = " ".join(last.stderr.split())
    assert "no active API key is left" in warning, last.stderr
    assert "non-loopback" in warning

    # The server learns that no key exists within its 1 s cache; across that
    # window and after it, every request stays refused.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for key in (None, first, second):
            r = api.get(key)
            assert r.status_code == 401, (key, r.text)
        time.sleep(0.1)  # wait-ok: sampling the server across its key-count cache window
    assert "Missing API key" in api.get(None).json()["error"]

    api.stop()
    restarted = subprocess.run(
        conveyor_cmd("api", "--host", "0.0.0.0", "--port", str(free_port())),
        env=conveyor_env(db),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert restarted.returncode != 0
    assert "Refusing to listen on 0.0.0.0 without API keys" in " ".join(restarted.stderr.split()), (
        restarted.stderr
    )


def test_status_reports_unencrypted_webhook_secrets_until_a_master_key_moves_them(
    db: str, tmp_path: Path
) -> None:
    path = tmp_path / "keys.db"

    async def add_hook() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.create_webhook(
                Webhook(
                    id="wh_status",
                    url="https://example.com/hook",
                    event_types=("job_completed",),
                    secret=HOOK_SECRET,
                    created_at=datetime.now(UTC),
                )
            )
        finally:
            await store.close()

    asyncio.run(add_hook())
    plain = run_cli(db, "status")
    assert "1 endpoint(s) keep their signing secret unencrypted" in " ".join(plain.stdout.split())
    assert "CONVEYOR_MASTER_KEY" in plain.stdout
    assert json.loads(run_cli(db, "status", "--json").stdout)["webhook_secrets_unencrypted"] == 1
    assert HOOK_SECRET.encode() in path.read_bytes() + _wal(path)

    key = run_cli(db, "secrets", "new-master-key").stdout.strip()
    moved = run_cli(db, "status", "--json", CONVEYOR_MASTER_KEY=key)
    assert json.loads(moved.stdout)["webhook_secrets_unencrypted"] == 0
    assert "unencrypted" not in run_cli(db, "status", CONVEYOR_MASTER_KEY=key).stdout
    assert HOOK_SECRET.encode() not in path.read_bytes() + _wal(path)
    names = [s["name"] for s in json.loads(run_cli(db, "secrets", "list", "--json").stdout)]
    assert names == ["conveyor.webhook.wh_status"]
    assert run_cli(
        db, "secrets", "get", "conveyor.webhook.wh_status", CONVEYOR_MASTER_KEY=key
    ).stdout == (HOOK_SECRET + "\n")


def _wal(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def test_a_key_already_rotated_is_not_rotated_again(db: str) -> None:
    # A second rotation of the old key took its overlap for the successor's whole
    # lifetime: an admin key that expired within the hour.
    old = create_key(db, "admin", "ops")
    first = run_cli(db, "keys", "rotate", key_id(old), "--overlap", "1h")
    new = first.stdout.strip().splitlines()[-1]
    again = run_cli(db, "keys", "rotate", key_id(old), check=False)
    assert again.returncode == 1
    assert f"already replaced by {key_id(new)}" in again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert len(listed(db)) == 2  # nothing made
    assert run_cli(db, "keys", "rotate", key_id(new)).returncode == 0  # the successor can


def test_revoking_twice_says_so_and_expired_keys_count_as_none_left(db: str) -> None:
    import sqlite3

    expired = create_key(db, "read", "old")
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:  # expired an hour ago
        conn.execute(
            "UPDATE api_keys SET expires_at = ? WHERE id = ?",
            (time.time() - 3600, key_id(expired)),
        )
    admin = create_key(db, "admin", "ops")
    first = run_cli(db, "keys", "revoke", key_id(admin))
    assert "no active API key is left" in first.stderr  # the expired one opens nothing
    again = run_cli(db, "keys", "revoke", key_id(admin), check=False)
    assert again.returncode == 1
    assert "already revoked" in again.stdout + again.stderr
