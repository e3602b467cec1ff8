"""Logging that is cheap, bounded and never carries a secret.

``configure_logging`` sets up structlog and the standard library (uvicorn logs
through it) for the ``conveyor`` command; an application embedding Conveyor may
call it too. Tracebacks are plain text without local variables, cut to
``MAX_FRAMES`` frames and ``MAX_TRACEBACK_CHARS`` characters, and every line
passes through ``redact``: passwords in URLs, bearer tokens, Conveyor API keys
and values of secret-named fields are replaced by ``***``.

Why: a traceback rendered with its locals shows the request's headers (the
caller's API key), costs about a second of CPU in the event loop and half a
megabyte of log per error.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from conveyor.security.redact import MASK, redact

MAX_FRAMES = 30  #: innermost frames kept in a logged traceback
MAX_TRACEBACK_CHARS = 8_000  #: a logged traceback is cut to this many characters
MAX_VALUE_CHARS = 2_000  #: any other logged string is cut to this many characters
# Field names whose values are never logged.
_SECRET_FIELD = re.compile(
    r"(authorization|password|passwd|secret|token|api_key|apikey|cookie)", re.IGNORECASE
)


def cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail around a
    visible marker (a traceback's last lines name the error: keep them)."""
    if len(text) <= limit:
        return text
    keep = max(limit - 60, 20)
    head, tail = keep // 3, keep - keep // 3
    return f"{text[:head]}\n... [{len(text) - head - tail} characters cut] ...\n{text[-tail:]}"


def format_exception(exc: BaseException) -> str:
    """A plain traceback of ``exc``: no local variables, the innermost ``MAX_FRAMES``
    frames of each chained exception, at most ``MAX_TRACEBACK_CHARS`` characters,
    secrets redacted. Costs well under a millisecond for a typical error."""
    try:
        text = "".join(traceback.format_exception(exc, limit=-MAX_FRAMES))
    except Exception:  # noqa: BLE001 - an exception whose str() raises must still be logged
        text = f"{type(exc).__qualname__} (its description raised an error)"
    return cut(redact(text), MAX_TRACEBACK_CHARS)


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return cut(redact(value), MAX_VALUE_CHARS)
    if depth < 3 and isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and _SECRET_FIELD.search(k) else _scrub(v, depth + 1)
            for k, v in value.items()
        }
    if depth < 3 and isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def scrub_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: plain bounded tracebacks, secrets redacted in every field."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1]
        if exc is not None:
            event_dict["exception"] = format_exception(exc)
    for key, value in list(event_dict.items()):
        if key == "exception":
            continue  # already redacted and bounded
        if _SECRET_FIELD.search(key) and key != "event":
            event_dict[key] = MASK
        else:
            event_dict[key] = _scrub(value)
    return event_dict


class SafeFormatter(logging.Formatter):
    """Standard-library formatter with the same rules (uvicorn, asyncio, libraries)."""

    def formatException(self, ei: Any) -> str:
        exc = ei[1] if ei else None
        return format_exception(exc) if exc is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        return cut(redact(super().format(record)), MAX_TRACEBACK_CHARS + MAX_VALUE_CHARS)


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Log at ``level`` (DEBUG, INFO, WARNING, ERROR) to ``stream`` (default stderr),
    one line per event (plus its traceback), through ``scrub_event``."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            scrub_event,
            # The exception is a string by now: the renderer prints it as it is,
            # never with rich's locals.
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
