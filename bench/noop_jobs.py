"""A trivial handler for bench/isolation_worker_bench.py (importable by child processes)."""

from __future__ import annotations

from typing import Any


def noop(ctx: Any, n: int) -> int:
    return n
