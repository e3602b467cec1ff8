"""What a handler receives as ``ctx``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import structlog


@dataclass
class JobContext:
    """Per-attempt context handed to a handler as its first argument.

    ``cancelled`` is set when a cancel was requested (or the job timed out, or
    the worker is shutting down past its grace period). Async handlers are also
    cancelled with ``CancelledError``; sync handlers should check it.
    """

    job_id: str
    job_type: str
    attempt: int
    max_retries: int
    queue: str
    worker_id: str
    metadata: dict[str, Any]
    cancelled: threading.Event = field(default_factory=threading.Event)
    _logger: Any = None

    @property
    def logger(self) -> Any:
        if self._logger is None:
            self._logger = structlog.get_logger("conveyor.job").bind(
                job_id=self.job_id, job_type=self.job_type, attempt=self.attempt
            )
        return self._logger

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()
