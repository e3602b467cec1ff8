"""The audit-log methods of the PostgreSQL Store (a mixin of ``PostgresStore``).

Appenders take turns on one transaction advisory lock, held until their
COMMIT, so two never read the same head and fork the chain. ``_audit_flush``
is what the host's ``_conn(tx=True)`` calls before COMMIT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conveyor.domain.audit import Anchor, AuditDraft, AuditEntry, AuditQuery
from conveyor.storage.audit import (
    AuditScope,
    anchor_from_row,
    anchor_row,
    chain_all,
    entry_from_row,
    entry_row,
)
from conveyor.storage.sql import load_queries

if TYPE_CHECKING:
    import asyncpg

AQ = load_queries("postgres", "audit.sql")


async def append_in(conn: Any, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
    """Chain ``drafts`` after the newest entry, inside ``conn``'s transaction."""
    await conn.execute(AQ["audit_lock"])
    head = await conn.fetchrow(AQ["audit_head"])
    entries = chain_all(drafts, None if head is None else (int(head[0]), head[1]))
    for e in entries:
        await conn.execute(AQ["insert_audit"], *entry_row(e))
    return entries


class PostgresAudit:
    """Needs the host store's ``_conn``."""

    if TYPE_CHECKING:

        def _conn(
            self, tx: bool = False
        ) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]: ...

    @staticmethod
    async def _audit_flush(conn: Any, scope: AuditScope | None) -> list[AuditEntry] | None:
        """Append the entries of the change this transaction makes (if any)."""
        if scope is None or scope.written is not None:
            return None
        if await conn.fetchval(AQ["wrote_anything"]) is None:
            return None  # a read before the change: the entries wait for the write
        return await append_in(conn, scope.drafts)

    async def append_audit(self, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
        items = list(drafts)
        if not items:
            return []
        async with self._conn(tx=True) as conn:
            return await append_in(conn, items)

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        query.check()
        async with self._conn() as conn:
            rows = await conn.fetch(
                AQ["list_audit"],
                query.after,
                query.resource_id,
                query.actor,
                query.action,
                query.limit,
            )
        return [entry_from_row(r) for r in rows]

    async def add_audit_anchor(self, anchor: Anchor) -> None:
        async with self._conn() as conn:
            await conn.execute(AQ["insert_anchor"], *anchor_row(anchor))

    async def list_audit_anchors(self) -> list[Anchor]:
        async with self._conn() as conn:
            rows = await conn.fetch(AQ["list_anchors"])
        return [anchor_from_row(r) for r in rows]
