"""Handlers of the secret-reference tests (importable by a child process)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conveyor import JobContext


def use_secret(ctx: JobContext, password: str, out: str) -> dict[str, int]:
    """Proves it saw the plaintext without returning it: writes its SHA-256."""
    ctx.logger.info("using_password", length=len(password))
    Path(out).write_text(hashlib.sha256(password.encode()).hexdigest())
    return {"length": len(password)}


def leak_secret(ctx: JobContext, password: str, out: str) -> None:
    """A careless handler: the secret ends up in its exception text (three forms)."""
    raise RuntimeError(f"login refused for password {password} ({password!r}, {[password]})")


def leak_at_the_cut(ctx: JobContext, password: str, pad: int, after: int = 0) -> None:
    """The secret straddles the 8 KiB cut of the stored error text (``pad`` before
    it) or, from the end, the cut of the kept traceback (``after`` behind it)."""
    raise ValueError("C" * pad + password + "B" * (after or pad))


def echo(ctx: JobContext, password: str) -> dict[str, object]:
    """A handler that hands back what it got (the demo test_job does)."""
    return {"got": password, "nested": [f"pw={password}"], password: "as a key"}
