"""``conveyor secrets`` as a user runs it (subprocesses, a real SQLite file)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from support import conveyor_cmd, conveyor_env, run_cli

PLAIN = "cli-secret-9f8e7d6c5b4a"


def write_key(path: Path, mode: int) -> str:
    key = run_cli("sqlite:///unused.db", "secrets", "new-master-key").stdout.strip()
    path.write_text(key + "\n")
    path.chmod(mode)
    return key


def test_set_get_list_delete_rotate(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    key_file = tmp_path / "master.key"
    write_key(key_file, 0o644)
    env = {"CONVEYOR_MASTER_KEY_FILE": str(key_file)}
    run_cli(db, "migrate")

    refused = run_cli(db, "secrets", "get", "smtp", check=False, **env)
    assert refused.returncode == 1
    assert "mode 0644" in refused.stderr
    assert f"chmod 600 {key_file}" in refused.stderr
    key_file.chmod(0o600)

    piped = subprocess.run(
        conveyor_cmd("secrets", "set", "smtp"),
        input=PLAIN + "\n",
        env=conveyor_env(db, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "version 1" in piped.stdout
    value_file = tmp_path / "v.txt"
    value_file.write_text(PLAIN + "-2\n")
    assert (
        "version 2"
        in run_cli(db, "secrets", "set", "smtp", "--from-file", str(value_file), **env).stdout
    )
    assert run_cli(db, "secrets", "get", "smtp", **env).stdout == PLAIN + "-2\n"
    assert run_cli(db, "secrets", "get", "smtp", "--version", "1", **env).stdout == PLAIN + "\n"
    listed = run_cli(db, "secrets", "list", "--json", **env).stdout
    assert PLAIN not in listed
    (row,) = json.loads(listed)
    assert (row["name"], row["version"], row["versions"]) == ("smtp", 2, 2)

    new_file = tmp_path / "new.key"
    write_key(new_file, 0o600)
    rotated = run_cli(db, "secrets", "rotate-master", "--new-key-file", str(new_file), **env)
    assert "Re-wrapped 2 secret version(s)" in rotated.stdout
    stale = run_cli(db, "secrets", "get", "smtp", check=False, **env)
    assert stale.returncode == 1
    assert "is wrapped by master key" in stale.stderr
    new_env = {"CONVEYOR_MASTER_KEY_FILE": str(new_file)}
    assert run_cli(db, "secrets", "get", "smtp", "--version", "1", **new_env).stdout == PLAIN + "\n"

    for path in tmp_path.iterdir():
        if path.name.startswith("c.db"):
            assert PLAIN.encode() not in path.read_bytes()

    assert "Deleted smtp" in run_cli(db, "secrets", "delete", "smtp", **new_env).stdout
    gone = run_cli(db, "secrets", "get", "smtp", check=False, **new_env)
    assert gone.returncode == 1
    assert "not found" in gone.stderr
    assert os.stat(new_file).st_mode & 0o777 == 0o600


def test_keys_create_expires_in(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'k.db'}"
    run_cli(db, "migrate")
    run_cli(db, "keys", "create", "--scope", "read", "--name", "ci", "--expires-in", "90d")
    (row,) = json.loads(run_cli(db, "keys", "list", "--json").stdout)
    assert row["expires_at"] is not None
    assert row["last_used_at"] is None
    bad = run_cli(db, "keys", "create", "--scope", "read", "--expires-in", "5x", check=False)
    assert bad.returncode == 1
    assert "Invalid duration '5x'" in bad.stderr
    assert len(json.loads(run_cli(db, "keys", "list", "--json").stdout)) == 1
