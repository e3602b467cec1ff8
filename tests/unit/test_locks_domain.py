"""Lock errors, argument validation and the locks_backend setting."""

from __future__ import annotations

import math

import pytest

from conveyor.domain.errors import (
    ConfigurationError,
    ConveyorError,
    LockError,
    LockLost,
    LockNotAcquired,
    StaleFencingToken,
    ValidationError,
)
from conveyor.domain.locks import LEADER_PREFIX, check_lock_args, check_owner, leader_key
from conveyor.settings import Settings


def test_the_lock_errors_tree_and_fields() -> None:
    for cls in (LockNotAcquired, LockLost, StaleFencingToken):
        assert issubclass(cls, LockError)
    assert issubclass(LockError, ConveyorError)
    stale = StaleFencingToken("invoice:42", 7)
    assert (stale.key, stale.token) == ("invoice:42", 7)
    assert "7" in str(stale)
    assert "invoice:42" in str(stale)
    lost = LockLost("gone", key="k", token=3)
    assert (lost.key, lost.token) == ("k", 3)


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        ({"key": "\ud800"}, ["key"]),
        ({"key": "a\nb"}, ["key"]),
        ({"key": None}, ["key"]),
        ({"key": "k", "ttl": -math.inf, "wait": math.inf}, ["ttl", "wait"]),
        ({"key": "k", "ttl": 0.009}, ["ttl"]),
        ({"key": "k", "wait": 86_400.1}, ["wait"]),
        ({"key": "k", "token": 0}, ["token"]),
        ({"key": "k", "token": 2**63}, ["token"]),
        ({"key": "k", "token": True}, ["token"]),
        ({"key": "k", "token": 1.0}, ["token"]),
    ],
)
def test_every_bad_argument_is_named(kwargs: dict, fields: list[str]) -> None:
    with pytest.raises(ValidationError) as bad:
        check_lock_args(**kwargs)
    assert [d.field for d in bad.value.details] == fields


def test_good_arguments_pass() -> None:
    check_lock_args("x" * 200, ttl=0.01, wait=0, token=2**63 - 1)
    check_lock_args("invoice:42", ttl=30 * 86_400, wait=86_400)
    check_owner("host-1-abc/def")
    assert leader_key("reports") == LEADER_PREFIX + "reports"
    with pytest.raises(ValidationError):
        check_owner("")


def test_locks_backend_setting() -> None:
    assert Settings().locks_backend == "store"
    env = {"CONVEYOR_LOCKS_BACKEND": "redis", "CONVEYOR_REDIS_URL": "redis://127.0.0.1:1/0"}
    assert Settings.from_env(env).locks_backend == "redis"
    with pytest.raises(ConfigurationError, match="locks_backend=redis needs redis_url"):
        Settings(locks_backend="redis")
    with pytest.raises(ConfigurationError, match="locks_backend must be one of store, redis"):
        Settings.from_env({"CONVEYOR_LOCKS_BACKEND": "zookeeper"})
