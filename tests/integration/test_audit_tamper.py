"""The tamper suite: entries edited, deleted, inserted, reordered or truncated with
raw SQL on SQLite and PostgreSQL; ``verify`` fails and names the entry, every time.

The log: 10 entries, a signed anchor at 10 (and one at 5). Each tamper works
on the stored rows directly, as someone with write access to the database
would; the stronger ones recompute hashes the way an attacker who read
docs/security.md would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conveyor import Conveyor
from conveyor.domain.audit import AuditEntry, AuditQuery, canonical_json, chain, entry_hash
from conveyor.security.vault import MasterKey
from conveyor.settings import Settings
from conveyor.storage.audit import entry_from_row, entry_row

COLS = (
    "seq, at, actor, action, resource_type, resource_id, summary, request_id, model, prompt, "
    "response, ai_hashed, prev_hash, hash"
)


class Raw:
    """Raw SQL on the app's database (``?`` placeholders; ``{t}``/``{a}`` the tables)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith("postgresql")
        self.t = "conveyor.audit_log" if self.pg else "audit_log"
        self.a = "conveyor.audit_anchors" if self.pg else "audit_anchors"

    def _sql(self, sql: str) -> str:
        sql = sql.format(t=self.t, a=self.a)
        if self.pg:
            n = 0
            out = []
            for ch in sql:
                if ch == "?":
                    n += 1
                    out.append(f"${n}")
                else:
                    out.append(ch)
            sql = "".join(out)
        return sql

    async def run(self, sql: str, *args: Any) -> None:
        if self.pg:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(self._sql(sql), *args)
            finally:
                await conn.close()
        else:
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                conn.execute(self._sql(sql), args)
                conn.commit()
            finally:
                conn.close()

    async def rows(self) -> list[AuditEntry]:
        sql = self._sql(f"SELECT {COLS} FROM {{t}} ORDER BY seq")
        if self.pg:
            conn = await asyncpg.connect(self.url)
            try:
                return [entry_from_row(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()
        conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
        try:
            return [entry_from_row(r) for r in conn.execute(sql)]
        finally:
            conn.close()

    async def put(self, entry: AuditEntry) -> None:
        """Write ``entry`` at its seq (replacing any row there)."""
        await self.run("DELETE FROM {t} WHERE seq = ?", entry.seq)
        marks = ", ".join("?" for _ in range(14))
        await self.run(f"INSERT INTO {{t}} ({COLS}) VALUES ({marks})", *entry_row(entry))

    async def shift(self, first: int, by: int) -> None:
        """Renumber entries ``first``.. by ``by`` (through negatives: no key clash)."""
        await self.run("UPDATE {t} SET seq = -(seq + ?) WHERE seq >= ?", by, first)
        await self.run("UPDATE {t} SET seq = -seq WHERE seq < 0")


def rehashed(e: AuditEntry, **changes: Any) -> AuditEntry:
    fields = {**e.fields(), **changes}
    return AuditEntry(**fields, hash=entry_hash(fields))


async def edit(raw: Raw) -> None:
    await raw.run("UPDATE {t} SET summary = ? WHERE seq = 4", '{"reason":"nothing to see"}')


async def edit_actor(raw: Raw) -> None:
    await raw.run("UPDATE {t} SET actor = 'someone-else' WHERE seq = 4")


async def edit_and_rehash(raw: Raw) -> None:
    e = (await raw.rows())[3]
    await raw.put(rehashed(e, summary={"reason": "forged"}))


async def delete(raw: Raw) -> None:
    await raw.run("DELETE FROM {t} WHERE seq = 4")


async def delete_first(raw: Raw) -> None:
    await raw.run("DELETE FROM {t} WHERE seq = 1")


async def delete_and_renumber(raw: Raw) -> None:
    await raw.run("DELETE FROM {t} WHERE seq = 4")
    await raw.shift(5, -1)


async def insert_naive(raw: Raw) -> None:
    rows = await raw.rows()
    await raw.shift(5, 1)
    await raw.put(rehashed(rows[3], seq=5, summary={"forged": True}, prev_hash="0" * 64))


async def insert_chained(raw: Raw) -> None:
    """A forged entry correctly chained after 4; the later ones keep their hashes."""
    rows = await raw.rows()
    forged = chain(_draft_of(rows[3]), 5, rows[3].hash)
    await raw.shift(5, 1)
    await raw.put(forged)


async def insert_at_tail_before_anchor(raw: Raw) -> None:
    rows = await raw.rows()
    await raw.shift(8, 1)
    await raw.put(chain(_draft_of(rows[6]), 8, rows[6].hash))


async def reorder(raw: Raw) -> None:
    await raw.run("UPDATE {t} SET seq = -1 WHERE seq = 3")
    await raw.run("UPDATE {t} SET seq = 3 WHERE seq = 4")
    await raw.run("UPDATE {t} SET seq = 4 WHERE seq = -1")


async def reorder_and_rechain(raw: Raw) -> None:
    """Swap 3 and 4 and recompute every hash after them (the anchors catch it)."""
    rows = await raw.rows()
    order = [*rows[:2], rows[3], rows[2], *rows[4:]]
    prev = rows[1].hash
    for seq, e in enumerate(order[2:], start=3):
        new = rehashed(e, seq=seq, prev_hash=prev)
        await raw.put(new)
        prev = new.hash


async def truncate(raw: Raw) -> None:
    await raw.run("DELETE FROM {t} WHERE seq >= 8")


async def truncate_last(raw: Raw) -> None:
    await raw.run("DELETE FROM {t} WHERE seq = 10")


async def truncate_and_forge_anchor(raw: Raw) -> None:
    """Cut the tail and move the newest anchor onto the new last entry."""
    rows = await raw.rows()
    await raw.run("DELETE FROM {t} WHERE seq >= 8")
    await raw.run("UPDATE {a} SET seq = 7, hash = ? WHERE seq = 10", rows[6].hash)


async def rewrite_tail(raw: Raw) -> None:
    """Rewrite 9 and 10 with every hash recomputed: only the anchor at 10 knows."""
    rows = await raw.rows()
    prev = rows[7].hash
    for e in rows[8:]:
        new = rehashed(e, prev_hash=prev, summary={"rewritten": True})
        await raw.put(new)
        prev = new.hash


async def reformat_summary(raw: Raw) -> None:
    """The same JSON with a space: what SQL reads is the same, the hashed text not."""
    await raw.run("UPDATE {t} SET summary = ? WHERE seq = 4", '{"reason": "r3"}')


async def duplicate_key(raw: Raw) -> None:
    """Parsed, the last value wins (the hash still matches); SQL reads the first."""
    await raw.run("UPDATE {t} SET summary = ? WHERE seq = 4", '{"reason":"forged","reason":"r3"}')


async def _rewrite_from_3(raw: Raw) -> None:
    """Entry 3 rewritten and every later hash recomputed; the anchors then changed
    so that they no longer object (found by a review: each of these passed)."""
    rows = await raw.rows()
    prev = rows[1].hash
    for e in rows[2:]:
        new = rehashed(e, prev_hash=prev, summary={"laundered": True} if e.seq == 3 else e.summary)
        await raw.put(new)
        prev = new.hash
    await raw.run("UPDATE {a} SET hash = (SELECT hash FROM {t} WHERE {t}.seq = {a}.seq)")


async def launder_unsigned(raw: Raw) -> None:
    await _rewrite_from_3(raw)
    await raw.run("UPDATE {a} SET mac = NULL, key_id = NULL")


async def launder_unknown_key(raw: Raw) -> None:
    await _rewrite_from_3(raw)
    await raw.run("UPDATE {a} SET key_id = 'conveyor.audit_anchor_key:v999'")


async def launder_mac_without_key(raw: Raw) -> None:
    await _rewrite_from_3(raw)
    await raw.run("UPDATE {a} SET key_id = NULL")


async def launder_deleted_key(raw: Raw) -> None:
    await _rewrite_from_3(raw)
    secrets = "conveyor.secrets" if raw.pg else "secrets"
    await raw.run(f"DELETE FROM {secrets} WHERE name = 'conveyor.audit_anchor_key'")


def _draft_of(e: AuditEntry) -> Any:
    from conveyor.domain.audit import AuditDraft

    return AuditDraft(
        e.at, "intruder", "job.cancel", "job", "forged", {}, None, None, None, None, False
    )


# tamper -> the seq verify must name (and a word of its reason)
TAMPERS: dict[str, tuple[Callable[[Raw], Any], int, str]] = {
    "edit": (edit, 4, "edited"),
    "edit_actor": (edit_actor, 4, "edited"),
    "edit_and_rehash": (edit_and_rehash, 5, "prev_hash"),
    "delete": (delete, 5, "missing"),
    "delete_first": (delete_first, 2, "missing"),
    "delete_and_renumber": (delete_and_renumber, 4, "prev_hash"),
    "insert_naive": (insert_naive, 5, "prev_hash"),
    "insert_chained": (insert_chained, 6, "prev_hash"),
    "insert_at_tail_before_anchor": (insert_at_tail_before_anchor, 9, "prev_hash"),
    "reorder": (reorder, 3, "prev_hash"),
    "reorder_and_rechain": (reorder_and_rechain, 5, "anchor"),
    "truncate": (truncate, 10, "truncated"),
    "truncate_last": (truncate_last, 10, "truncated"),
    "truncate_and_forge_anchor": (truncate_and_forge_anchor, 7, "forged"),
    "rewrite_tail": (rewrite_tail, 10, "anchor"),
    "reformat_summary": (reformat_summary, 4, "edited"),
    "duplicate_key": (duplicate_key, 4, "edited"),
    "launder_unsigned": (launder_unsigned, 5, "unsigned"),
    "launder_unknown_key": (launder_unknown_key, 5, "does not have"),
    "launder_mac_without_key": (launder_mac_without_key, 5, "names no key"),
    "launder_deleted_key": (launder_deleted_key, 5, "does not have"),
}


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        yield request.getfixturevalue("postgres_dsn")


def make_app(url: str, key: str) -> Conveyor:
    return Conveyor(settings=Settings(database_url=url, master_key=key, audit_anchor_every=5))


async def build(url: str, key: str) -> None:
    app = make_app(url, key)
    async with app:
        for i in range(10):
            await app.audit.record("job.cancel", "job", f"job-{i}", {"reason": f"r{i}"})
        verdict = await app.audit.verify()
        assert verdict.ok, verdict.broken
        anchors = await app.store.list_audit_anchors()
        assert [a.seq for a in anchors] == [5, 10]
        assert all(a.mac for a in anchors)


@pytest.mark.parametrize("name", list(TAMPERS))
async def test_every_tamper_is_detected_and_named(url: str, name: str) -> None:
    key = MasterKey.generate().to_base64()
    await build(url, key)
    tamper, seq, word = TAMPERS[name]
    await tamper(Raw(url))
    app = make_app(url, key)
    async with app:
        verdict = await app.audit.verify()
    assert verdict.broken is not None, f"{name} went unnoticed"
    assert verdict.broken.seq == seq, (name, str(verdict.broken))
    assert word in verdict.broken.reason, (name, verdict.broken.reason)


async def test_untouched_log_verifies_and_export_round_trips(url: str) -> None:
    key = MasterKey.generate().to_base64()
    await build(url, key)
    rows = await Raw(url).rows()
    assert [canonical_json(e.to_dict()) for e in rows] == [
        canonical_json(AuditEntry.from_dict(e.to_dict()).to_dict()) for e in rows
    ]
    app = make_app(url, key)
    async with app:
        listed = await app.audit.list(AuditQuery(limit=1000))
    assert listed == rows
