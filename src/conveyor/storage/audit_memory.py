"""The audit-log methods of the in-memory Store (a mixin of ``MemoryStore``).

An append is synchronous code between two awaits, so concurrent appenders of
one event loop never fork the chain. The memory store has no transactions:
a change's entries are appended right after it (``Conveyor.audited``).
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.domain.audit import Anchor, AuditDraft, AuditEntry, AuditQuery
from conveyor.storage.audit import chain_all


class MemoryAudit:
    """Keeps its tables on first use, so the host's ``__init__`` stays as it is."""

    @property
    def _audit_rows(self) -> list[AuditEntry]:
        rows: list[AuditEntry] | None = getattr(self, "_audit_table", None)
        if rows is None:
            rows = []
            self._audit_table = rows
        return rows

    @property
    def _anchor_rows(self) -> dict[int, Anchor]:
        rows: dict[int, Anchor] | None = getattr(self, "_anchor_table", None)
        if rows is None:
            rows = {}
            self._anchor_table = rows
        return rows

    async def append_audit(self, drafts: Sequence[AuditDraft]) -> list[AuditEntry]:
        rows = self._audit_rows
        head = (rows[-1].seq, rows[-1].hash) if rows else None
        entries = chain_all(list(drafts), head)
        rows.extend(entries)
        return entries

    async def list_audit(self, query: AuditQuery) -> list[AuditEntry]:
        query.check()
        rows = self._audit_rows
        # seq starts at 1 and has no gaps here: start the scan at `after`.
        start = max(0, min(query.after, len(rows)))
        out: list[AuditEntry] = []
        for entry in rows[start:]:
            if query.matches(entry):
                out.append(entry)
                if len(out) >= query.limit:
                    break
        return out

    async def add_audit_anchor(self, anchor: Anchor) -> None:
        self._anchor_rows.setdefault(anchor.seq, anchor)

    async def list_audit_anchors(self) -> list[Anchor]:
        return [self._anchor_rows[k] for k in sorted(self._anchor_rows)]
