"""Identifiers: time-ordered job ids and random lease tokens."""

from __future__ import annotations

import os
import time


def new_job_id() -> str:
    """A 32-hex-digit id whose first 12 digits are the creation time in ms.

    Ids sort roughly by creation time (useful in logs and listings) and carry
    80 random bits, like a UUIDv7 without the version nibbles.
    """
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


def new_job_ids(n: int) -> list[str]:
    """``n`` ids as ``new_job_id`` makes them, with one clock read and one
    ``urandom`` call for the lot (bulk submits)."""
    prefix = f"{int(time.time() * 1000):012x}"
    noise = os.urandom(10 * n).hex()
    return [prefix + noise[20 * i : 20 * i + 20] for i in range(n)]


def new_token() -> str:
    return os.urandom(12).hex()
