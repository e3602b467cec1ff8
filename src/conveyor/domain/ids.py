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


#: Fewest hex digits an id prefix may have (the CLI takes prefixes copied from a list).
MIN_ID_PREFIX = 6
_HEX_DIGITS = frozenset("0123456789abcdef")


def id_prefix_problem(key: str) -> str | None:
    """Why ``key`` (lowercased, stripped) can't name an id or a unique id prefix, or
    ``None`` when it can: 6 to 32 hexadecimal digits."""
    if not MIN_ID_PREFIX <= len(key) <= 32 or not set(key) <= _HEX_DIGITS:
        return f"must be {MIN_ID_PREFIX}-32 hexadecimal digits"
    return None


def ambiguous_prefix_message(what: str, text: str, found: list[str]) -> str:
    """The error for a prefix ``text`` that several ids of ``what`` share (``found``,
    sorted; the first 5 are named)."""
    shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
    return (
        f"{what} id prefix {text!r} is ambiguous: it matches {shown}. Give more digits "
        "(the first 12 are the creation time in ms, the rest tell them apart)"
    )
