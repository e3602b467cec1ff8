"""An attempt that raised keeps its traceback in the job's history (every backend):
the job's ``error`` stays the one line ``"Type: message"``; the history row has
the frames, bounded, cleaned like every stored text, and never a resolved secret."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from appkit import api_client, app_on, finished

from conveyor import Conveyor
from conveyor.domain.retry import MAX_TRACEBACK_CHARS
from conveyor.domain.states import JobState
from conveyor.storage.base import Store
from support import running_worker


def _parse(rows: str) -> int:
    raise ValueError(f"bad row count {rows!r}")


class Hostile(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def _huge() -> None:
    raise ValueError("y" * 20_000 + " end\x00\udcff")


def register(app: Conveyor) -> None:
    @app.job("parse", max_retries=1)
    def parse(ctx: object, rows: str) -> int:
        try:
            return _parse(rows)
        except ValueError as exc:
            raise RuntimeError("parsing failed") from exc

    @app.job("hostile", max_retries=0)
    async def hostile(ctx: object) -> None:
        raise Hostile

    @app.job("deep", max_retries=0)
    def deep(ctx: object) -> None:
        _huge()

    @app.job("ok")
    async def ok(ctx: object) -> str:
        return "fine"


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, register) as conveyor:
        yield conveyor


async def test_each_failed_attempt_keeps_its_traceback(app: Conveyor) -> None:
    ids = {
        name: (await app.enqueue(name, payload)).id
        for name, payload in (("parse", {"rows": "x"}), ("hostile", {}), ("deep", {}), ("ok", {}))
    }
    async with running_worker(app):
        jobs = await finished(app, list(ids.values()), timeout=30)

    parse = jobs[ids["parse"]]
    assert parse.state is JobState.FAILED
    assert parse.error == "RuntimeError: parsing failed"  # the job's error: one line
    runs = await app.store.executions(parse.id)
    assert [r.outcome for r in runs] == ["retry", "failed"]
    for run in runs:
        assert run.error == "RuntimeError: parsing failed"
        assert run.traceback is not None
        assert run.traceback.startswith("Traceback (most recent call last):")
        assert "in _parse" in run.traceback  # the frame that raised
        assert "ValueError: bad row count 'x'" in run.traceback  # the chained cause
        assert run.traceback.rstrip().endswith("RuntimeError: parsing failed")

    hostile = (await app.store.executions(ids["hostile"]))[-1]
    assert hostile.traceback is not None
    assert "<exception str() failed>" in hostile.traceback

    deep = (await app.store.executions(ids["deep"]))[-1]
    assert deep.traceback is not None
    assert deep.traceback.startswith("... [")  # cut at the head, the raise is kept
    assert len(deep.traceback) <= MAX_TRACEBACK_CHARS + 40
    assert "\x00" not in deep.traceback
    assert deep.traceback.rstrip().endswith("end\ufffd\ufffd")
    deep.traceback.encode("utf-8")  # storable text: no lone surrogate left

    assert [r.traceback for r in await app.store.executions(ids["ok"])] == [None]

    async with api_client(app) as c:
        body = (await c.get(f"/api/jobs/{parse.id}")).json()
    history = body.get("executions") or body["job"]["executions"]
    assert "in _parse" in history[-1]["traceback"]
