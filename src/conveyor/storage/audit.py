"""Audit entries written in the same transaction as the change they record.

The caller of a change opens a scope holding the change's entries::

    with pending([draft]) as scope:
        await store.cancel(job_id, now)      # its write transaction appends them
    if not scope.written:                     # the change had no transaction of ours
        await store.append_audit(scope.drafts)

(``Conveyor.audited`` does this.) The scope lives in a context variable and
belongs to the task that opened it. The first write transaction that task
commits inside the scope appends the drafts before its COMMIT (SQLite: the
``BEGIN IMMEDIATE`` write lock; PostgreSQL: a transaction advisory lock), so
the entry exists exactly when the change does. Tasks started inside the scope
inherit the variable but are not its owner, so a background write never takes
the entries. SQLite runs its transactions on a thread: ``bind`` carries the
owner's scope there (``active`` reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

from conveyor.domain.audit import GENESIS as GENESIS
from conveyor.domain.audit import (
    Anchor,
    AuditDraft,
    AuditEntry,
    canonical_json,
    chain,
)

T = TypeVar("T")


class AuditScope:
    """The entries of one change, until a transaction (or the caller) writes them."""

    __slots__ = ("changes_before", "drafts", "owner", "written")

    def __init__(self, drafts: Sequence[AuditDraft]) -> None:
        self.drafts = list(drafts)
        self.owner = _current_task()
        #: The chained entries once written (by a transaction or ``append_audit``).
        self.written: list[AuditEntry] | None = None
        #: SQLite: the connection's change count when the transaction began.
        self.changes_before = -1


_SCOPE: ContextVar[AuditScope | None] = ContextVar("conveyor_audit_scope", default=None)
_THREAD = threading.local()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


@contextlib.contextmanager
def pending(drafts: Sequence[AuditDraft]) -> Iterator[AuditScope]:
    """Make ``drafts`` the entries of the next write transaction of this task."""
    scope = AuditScope(drafts)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def owned() -> AuditScope | None:
    """This task's unwritten scope, if any (for the event-loop side of a store)."""
    scope = _SCOPE.get()
    if scope is None or scope.written is not None or not scope.drafts:
        return None
    if scope.owner is not _current_task():
        return None
    return scope


def covered(action: str, resource_id: str) -> bool:
    """Whether this task's scope (written or not) already records ``action`` on
    ``resource_id`` (a hook need not record it again)."""
    scope = _SCOPE.get()
    return (
        scope is not None
        and scope.owner is _current_task()
        and any(d.action == action and d.resource_id == resource_id for d in scope.drafts)
    )


def bind(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` carrying this task's scope onto the thread that runs it (SQLite)."""
    scope = owned()
    if scope is None:
        return fn

    def run(*args: Any) -> T:
        _THREAD.scope = scope
        try:
            return fn(*args)
        finally:
            _THREAD.scope = None

    return run


def active() -> AuditScope | None:
    """The scope ``bind`` carried onto this thread, if unwritten."""
    scope: AuditScope | None = getattr(_THREAD, "scope", None)
    if scope is None or scope.written is not None:
        return None
    return scope


def chain_all(drafts: Sequence[AuditDraft], head: tuple[int, str] | None) -> list[AuditEntry]:
    """``drafts`` numbered and chained after ``head`` (``(seq, hash)``, None = empty log)."""
    seq, prev = head if head is not None else (0, GENESIS)
    out = []
    for draft in drafts:
        seq += 1
        entry = chain(draft, seq, prev)
        prev = entry.hash
        out.append(entry)
    return out


def entry_row(e: AuditEntry) -> tuple[Any, ...]:
    """The column values of ``e`` in the order of the ``insert_audit`` queries."""
    return (
        e.seq,
        e.at,
        e.actor,
        e.action,
        e.resource_type,
        e.resource_id,
        canonical_json(dict(e.summary)).decode(),
        e.request_id,
        e.model,
        e.prompt,
        e.response,
        e.ai_hashed,
        e.prev_hash,
        e.hash,
    )


def entry_from_row(r: Any) -> AuditEntry:
    """A stored row back as an entry. The stored text must be exactly what was
    hashed: a summary that no longer parses, or parses but is not in the
    canonical form (whitespace, escapes, a duplicate key whose first value SQL
    would read), becomes ``{"$unparsable": text}``, and a ``seq`` or
    ``ai_hashed`` of another type or value becomes one that cannot match, so
    ``verify`` reports the entry as edited."""
    text = r[6]
    try:
        # json, not orjson: it reads back any integer canonical_json wrote.
        summary = json.loads(text, object_pairs_hook=_no_duplicates)
        if not isinstance(summary, dict) or canonical_json(summary).decode() != text:
            summary = {"$unparsable": str(text)}
    except (ValueError, TypeError):
        summary = {"$unparsable": str(text)}
    seq, flag = r[0], r[11]
    if type(seq) is not int:  # stored as text or a float by hand
        seq = -1
    ai_hashed = flag is True or (type(flag) is int and flag == 1)
    if not (type(flag) is bool or flag in (0, 1)) or type(flag) is float:
        summary = {"$unparsable": f"ai_hashed={flag!r}", "summary": summary}
    return AuditEntry(
        seq,
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        summary,
        r[7],
        r[8],
        r[9],
        r[10],
        ai_hashed,
        r[12],
        r[13],
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def anchor_from_row(r: Any) -> Anchor:
    return Anchor(int(r[0]), r[1], r[2], r[3], r[4])


def anchor_row(a: Anchor) -> tuple[Any, ...]:
    return (a.seq, a.hash, a.at, a.key_id, a.mac)
