"""A heal that fails is logged with its message: bounded, redacted, and never
at the mercy of a hostile ``__str__`` (pure: no store, no worker)."""

from __future__ import annotations

import threading
from typing import Any

from structlog.testing import capture_logs

from conveyor.runtime import steps
from conveyor.runtime.steps import HEAL_ERROR_CHARS, run_heal

KEY = "cvk_0a1b2c3d_Zx9-yW8_vU7tS6rQ5pO4nM3lK2jI1hG0fE9dC8bA7zY6"


async def heal_failure(heal: Any) -> dict[str, Any]:
    with capture_logs() as logs:
        out = await run_heal(heal, {"n": 1}, RuntimeError("x"), 1, lambda p: None, job_id="j1")
    assert out is None  # the retry goes ahead with the old payload
    (line,) = [e for e in logs if e["event"] == "job_heal_failed"]
    return line


class TableMissing(Exception):
    pass


async def test_a_failed_heal_logs_its_message_redacted_and_bounded() -> None:
    def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
        raise TableMissing(f"no table rows_v2 (Authorization: Bearer {KEY}) " + "y" * 5000)

    line = await heal_failure(heal)
    assert line["error_type"] == "TableMissing"
    assert line["error"].startswith("TableMissing: no table rows_v2")
    assert KEY not in line["error"]
    assert len(line["error"]) <= HEAL_ERROR_CHARS


async def test_a_builtin_error_is_described_in_place() -> None:
    def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
        return payload["missing"]

    line = await heal_failure(heal)
    assert line["error"] == "KeyError: 'missing'"


async def test_a_hostile_str_costs_at_most_the_describe_timeout(monkeypatch) -> None:
    monkeypatch.setattr(steps, "HEAL_DESCRIBE_TIMEOUT", 0.2)
    release = threading.Event()

    class Hostile(Exception):
        def __str__(self) -> str:
            release.wait(30)  # blocks its (daemon) thread until the test ends
            return "late"

    def heal(payload: dict[str, Any], error: BaseException, attempt: int) -> Any:
        raise Hostile

    try:
        line = await heal_failure(heal)
    finally:
        release.set()
    assert line["error_type"] == "Hostile"
    assert "did not come within 0.2 s" in line["error"]
