"""The event loop the command line runs on: uvloop when installed (it comes with
``uvicorn[standard]``, as for the API server), else asyncio's own.

``CONVEYOR_EVENT_LOOP`` = ``auto`` (default), ``uvloop`` or ``asyncio``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from conveyor.domain.errors import ConfigurationError
from conveyor.settings import EVENT_LOOPS

T = TypeVar("T")


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A new-loop function for ``asyncio.Runner``; None means asyncio's default."""
    if choice not in EVENT_LOOPS:
        raise ConfigurationError(
            f"event_loop must be one of {', '.join(EVENT_LOOPS)} (got {choice!r})"
        )
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                "CONVEYOR_EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop (Ctrl-C cancels ``main``)."""
    try:
        factory = loop_factory(event_loop)
    except BaseException:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
