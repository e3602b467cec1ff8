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
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from conveyor.domain.errors import ConfigurationError
from conveyor.observability import tracing
from conveyor.security.redact import MASK, redact

MAX_FRAMES = 30  #: innermost frames kept in a logged traceback
MAX_TRACEBACK_CHARS = 8_000  #: a logged traceback is cut to this many characters
MAX_VALUE_CHARS = 2_000  #: any other logged string is cut to this many characters
# Field names whose values are never logged.
_SECRET_FIELD = re.compile(
    r"(authorization|password|passwd|secret|token|api_key|apikey|cookie)", re.IGNORECASE
)
# Fields that hold fencing tokens (locks, leader leases, job leases): integers
# that order holders, logged as they are when they are integers.
FENCING_FIELDS = frozenset({"token", "fencing_token", "lease_token"})


def _masked(key: Any, value: Any) -> bool:
    """Whether a field's value is withheld: a secret-named key, unless it is a
    fencing token's name with an integer value."""
    if not isinstance(key, str) or not _SECRET_FIELD.search(key):
        return False
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return not (is_int and key.lower() in FENCING_FIELDS)


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
        return {k: MASK if _masked(k, v) else _scrub(v, depth + 1) for k, v in value.items()}
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
        if key != "event" and _masked(key, value):
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


class JsonFormatter(logging.Formatter):
    """A standard-library record (uvicorn, asyncio, libraries) as one JSON object:
    ``event`` is the record's own ``event`` (``extra={"event": ...}``, as Conveyor's
    few standard-library lines give) or else the logger's name (stable; the text
    varies), ``message`` the redacted text, ``exception`` a bounded traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "event": str(getattr(record, "event", None) or record.name),
            "message": cut(redact(record.getMessage()), MAX_VALUE_CHARS),
        }
        ids = tracing.current_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info and record.exc_info[1] is not None:
            line["exception"] = format_exception(record.exc_info[1])
        return _json(line)


def add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: ``trace_id`` and ``span_id`` of the current span (while
    tracing is on and a span is current, e.g. in a job's handler)."""
    if "trace_id" not in event_dict:
        ids = tracing.current_ids()
        if ids is not None:
            event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict


def _json(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=repr).decode()


#: Values of ``CONVEYOR_LOG_FORMAT``.
LOG_FORMATS = ("console", "json")  # as conveyor.settings.LOG_FORMATS


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, fmt: str = "console"
) -> None:
    """Log at ``level`` (DEBUG, INFO, WARNING, ERROR) to ``stream`` (default stderr),
    through ``scrub_event``. ``fmt``: ``console`` (one readable line per event plus
    its traceback) or ``json`` (one JSON object per line: ``timestamp`` (ISO 8601,
    UTC), ``level``, ``event`` (a stable key such as ``job_dead_lettered``), the
    event's fields (``job_id``, ``worker_id``...), ``trace_id``/``span_id`` while a
    span is current, ``exception`` as one string). ``ConfigurationError`` for
    another ``fmt``."""
    if fmt not in LOG_FORMATS:
        choices = ", ".join(LOG_FORMATS)
        raise ConfigurationError(f"log format must be one of {choices} (got {fmt!r})")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # uvicorn's own logging config (an in-process server started before) gives its
    # loggers handlers of their own: lines would skip this format and the redaction.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    renderer: Any
    if fmt == "json":
        stamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
        renderer = structlog.processors.JSONRenderer(serializer=_json)
    else:
        stamper = structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False)
        # The exception is a string by now: the renderer prints it as it is,
        # never with rich's locals.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamper,
            add_trace_ids,
            scrub_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
