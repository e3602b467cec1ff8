"""The audit-log methods of the SQLite Store (a mixin of ``SQLiteStore``).

Entries are appended inside a ``BEGIN IMMEDIATE`` transaction: SQLite's one
write lock orders every appender, in this process or another, so the chain
never forks. ``_audit_flush`` is what the host's ``_tx`` calls before COMMIT.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.domain.audit import Anchor, AuditDraft, AuditEntry, AuditQuery
from conveyor.storage.audit import (
    AuditScope,
    active,
    anchor_from_row,
    anchor_row,
    chain_all,
    entry_from_row,
    entry_row,
)
from conveyor.storage.sql import load_queries

T = TypeVar("T")
AQ = load_queries("sqlite", "audit.sql")


def append_in(conn: sqlite3.Connection, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
    """Chain ``drafts`` after the newest entry; ``conn`` holds the write lock."""
    head = conn.execute(AQ["audit_head"]).fetchone()
    entries = chain_all(drafts, None if head is None else (int(head[0]), head[1]))
    conn.executemany(AQ["insert_audit"], [entry_row(e) for e in entries])
    return entries


class SQLiteAudit:
    """Needs the host store's ``_run``, ``_tx`` and ``_conn``."""

    _conn: sqlite3.Connection | None

    def _audit_conn(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

        def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

    @staticmethod
    def _audit_flush(conn: sqlite3.Connection) -> tuple[AuditScope, list[AuditEntry]] | None:
        """Append the entries of the change this transaction makes (if any)."""
        scope = active()
        if scope is None or conn.total_changes == scope.changes_before:
            return None  # nothing written (yet): the entries wait for the change
        return scope, append_in(conn, scope.drafts)

    @staticmethod
    def _audit_begin(conn: sqlite3.Connection) -> None:
        scope = active()
        if scope is not None:
            scope.changes_before = conn.total_changes

    async def append_audit(self, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
        items = list(drafts)
        if not items:
            return []

        def _do() -> list[AuditEntry]:
            with self._tx() as conn:
                return append_in(conn, items)

        return await self._run(_do)

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        query.check()
        params = {
            "after": query.after,
            "resource_id": query.resource_id,
            "actor": query.actor,
            "action": query.action,
            "limit": query.limit,
        }

        def _do() -> list[AuditEntry]:
            rows = self._audit_conn().execute(AQ["list_audit"], params).fetchall()
            return [entry_from_row(r) for r in rows]

        return await self._run(_do)

    async def add_audit_anchor(self, anchor: Anchor) -> None:
        def _do() -> None:
            with self._tx() as conn:
                conn.execute(AQ["insert_anchor"], anchor_row(anchor))

        await self._run(_do)

    async def list_audit_anchors(self) -> list[Anchor]:
        def _do() -> list[Anchor]:
            rows = self._audit_conn().execute(AQ["list_anchors"]).fetchall()
            return [anchor_from_row(r) for r in rows]

        return await self._run(_do)
