"""Master key configuration and the new settings: clear errors for bad input."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from conveyor.domain.errors import ConfigurationError
from conveyor.security.vault import MasterKey, load_keyring, read_key_file
from conveyor.settings import Settings


def test_keyring_from_env_value_file_and_previous(tmp_path: Path) -> None:
    key, prev = MasterKey.generate(), MasterKey.generate()
    assert load_keyring(Settings()) == []
    ring = load_keyring(Settings(master_key=key.to_base64(), master_key_previous=prev.to_base64()))
    assert [k.key_id for k in ring] == [key.key_id, prev.key_id]
    path = tmp_path / "k"
    path.write_text(key.to_base64() + "\n")
    os.chmod(path, 0o600)
    assert read_key_file(str(path)).key == key.key
    assert key.to_base64() not in repr(Settings(master_key=key.to_base64()))
    assert key.to_base64() not in repr(key)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"master_key": "not base64!"}, "is not base64"),
        ({"master_key": base64.b64encode(b"short").decode()}, "decodes to 5 bytes"),
        ({"master_key": MasterKey.generate().to_base64(), "master_key_file": "/x"}, "not both"),
        ({"master_key_previous": MasterKey.generate().to_base64()}, "needs a current"),
        ({"master_key_file": "/nonexistent/master.key"}, "Cannot read the master key file"),
    ],
)
def test_bad_key_configuration(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_keyring(Settings(**settings))


def test_key_file_mode_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text(MasterKey.generate().to_base64())
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(path, mode)
        with pytest.raises(ConfigurationError, match=f"mode {mode:04o}.*chmod 600"):
            read_key_file(str(path))
    with pytest.raises(ConfigurationError, match="not a regular file"):
        read_key_file(str(tmp_path))


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_limit": "lots"},
        {"rate_limit": "10/minute;5/second"},
        {"rate_limit_auth_failures": ""},
        {"secrets_keep_versions": 0},
        {"secrets_cache_ttl": -1.0},
        {"secrets_cache_ttl": float("nan")},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Settings(**bad)  # type: ignore[arg-type]


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "CONVEYOR_RATE_LIMIT": "10/second",
            "CONVEYOR_RATE_LIMITS": "false",
            "CONVEYOR_SECRETS_CACHE_TTL": "0",
            "CONVEYOR_SECRETS_KEEP_VERSIONS": "2",
        }
    )
    assert (s.rate_limit, s.rate_limits, s.secrets_cache_ttl, s.secrets_keep_versions) == (
        "10/second",
        False,
        0.0,
        2,
    )
