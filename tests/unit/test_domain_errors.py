"""The exception tree and identifiers."""

from __future__ import annotations

import re
import time

import pytest

from conveyor.domain import errors
from conveyor.domain.errors import (
    ConfigurationError,
    ConveyorError,
    HandlerError,
    InvalidTransition,
    JobNotCancellable,
    JobNotFound,
    LeaseLost,
    Permanent,
    Retry,
    StoreError,
    StoreUnavailable,
    ValidationError,
)
from conveyor.domain.ids import new_job_id, new_token


@pytest.mark.parametrize(
    ("cls", "parents"),
    [
        (ConfigurationError, (ConveyorError,)),
        (ValidationError, (ConveyorError, ValueError)),
        (JobNotFound, (ConveyorError, LookupError)),
        (InvalidTransition, (ConveyorError,)),
        (JobNotCancellable, (InvalidTransition,)),
        (LeaseLost, (ConveyorError,)),
        (StoreError, (ConveyorError,)),
        (StoreUnavailable, (StoreError,)),
        (HandlerError, (ConveyorError,)),
        (Permanent, (HandlerError,)),
        (Retry, (HandlerError,)),
    ],
)
def test_the_tree(cls: type[Exception], parents: tuple[type[Exception], ...]) -> None:
    assert all(issubclass(cls, p) for p in parents)
    assert cls.__name__ in (errors.__doc__ or "")


def test_every_public_exception_derives_from_conveyor_error() -> None:
    public = [
        v
        for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == errors.__name__
    ]
    assert len(public) >= 12
    assert all(issubclass(c, ConveyorError) for c in public)


def test_messages() -> None:
    assert str(JobNotFound("j1")) == "Job 'j1' not found"
    assert str(JobNotCancellable("j1", "completed")) == "Cannot cancel job in completed status"
    assert str(InvalidTransition("pending", "complete")) == (
        "Cannot complete a job in pending status"
    )
    e = ValidationError("bad", [errors.FieldError("f", "m")])
    assert (e.message, e.details) == ("bad", (errors.FieldError("f", "m"),))
    assert ValidationError("bad").details == ()


def test_retry_keeps_its_delay() -> None:
    assert Retry().delay is None
    assert Retry("later", delay=2.5).delay == 2.5
    assert str(Retry()) == "retry requested"


def test_job_ids_are_32_hex_digits_ordered_by_time() -> None:
    before = int(time.time() * 1000)
    ids = [new_job_id() for _ in range(200)]
    after = int(time.time() * 1000)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 200
    assert all(before <= int(i[:12], 16) <= after for i in ids)


def test_tokens_are_random_hex() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    assert all(re.fullmatch(r"[0-9a-f]{24}", t) for t in tokens)
