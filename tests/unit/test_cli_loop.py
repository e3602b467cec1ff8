"""The command line's event loop: uvloop when installed, asyncio on request."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.cli.loop import loop_factory, run
from conveyor.domain.errors import ConfigurationError
from conveyor.settings import Settings


async def loop_kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_auto_and_uvloop_run_on_uvloop_when_installed() -> None:
    pytest.importorskip("uvloop")
    assert run(loop_kind()) == "uvloop"
    assert run(loop_kind(), "uvloop") == "uvloop"


def test_asyncio_on_request() -> None:
    assert loop_factory("asyncio") is None
    assert run(loop_kind(), "asyncio") == "asyncio"


def test_an_unknown_loop_is_refused_before_anything_runs() -> None:
    coro = loop_kind()
    with pytest.raises(ConfigurationError, match="event_loop must be one of"):
        run(coro, "trio")
    assert coro.cr_frame is None  # closed, not left "never awaited"
    with pytest.raises(ConfigurationError, match="event_loop must be one of auto, uvloop"):
        Settings(event_loop="trio")
    assert Settings.from_env({"CONVEYOR_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
