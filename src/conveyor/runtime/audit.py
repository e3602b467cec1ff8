"""``ctx.audit``: a handler records an AI decision (or any decision) in the audit log.

The runtime never imports the application: the worker gets the recorder as a
port (``RuntimeDeps.audit``, an ``async (fields, job) -> entry dict``). A
process-isolated handler asks its worker over the child's socket (``{"kind":
"call", "op": "audit"}``), like durable steps do; the worker checks the fields
as any input (they are another process's word) before recording them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError

#: The fields ``ctx.audit`` sends (and a child may send): nothing else is accepted.
FIELDS = (
    "action",
    "resource_type",
    "resource_id",
    "summary",
    "model",
    "prompt",
    "response",
    "hash_ai_fields",
)
Recorder = Callable[[dict[str, Any], Mapping[str, Any]], Awaitable[dict[str, Any]]]


def checked_fields(message: Mapping[str, Any]) -> dict[str, Any]:
    """The audit fields of ``message`` (a child's call); ``ValidationError`` for
    unknown ones. The values are checked by the recorder (``AuditDraft.make``)."""
    extra = sorted(k for k in message if k not in FIELDS and k not in ("kind", "job_id", "op"))
    if extra:
        raise ValidationError(
            f"Unknown audit field {extra[0]!r}",
            [FieldError(k, "unknown audit field") for k in extra[:20]],
        )
    return {k: message[k] for k in FIELDS if k in message}


def attach_audit(ctx: Any, job: Any, recorder: Recorder | None) -> None:
    """Give ``ctx`` (the ``JobContext`` of a fetched ``job``) its ``ctx.audit``
    recorder, run on this event loop (sync handlers reach it from their thread)."""
    if recorder is None:
        return
    about = {"job_id": job.id, "job_type": job.job_type, "attempt": job.attempt}
    loop = asyncio.get_running_loop()

    async def record(fields: dict[str, Any]) -> dict[str, Any]:
        return await recorder(checked_fields(fields), about)

    ctx._audit = record
    ctx._audit_loop = loop


def audit_call(ctx: Any, fields: dict[str, Any]) -> Any:
    """What ``ctx.audit`` returns: an awaitable in an async handler, the entry in a
    sync one (see ``JobContext.audit``)."""
    child = getattr(ctx, "_audit_sync", None)
    in_loop = _in_loop()
    if child is not None:  # a process-isolated handler: the worker records it
        if in_loop:
            return _ready(child(fields))
        return child(fields)
    record = getattr(ctx, "_audit", None)
    if record is None:
        raise ConfigurationError(
            "ctx.audit has no audit log here: run the handler in a worker (a context "
            "made by hand has none)"
        )
    if in_loop:
        return record(fields)
    loop = ctx._audit_loop
    return asyncio.run_coroutine_threadsafe(record(fields), loop).result()


async def _ready(value: Any) -> Any:
    return value


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
