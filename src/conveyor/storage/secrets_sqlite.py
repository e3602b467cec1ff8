"""The secrets-vault methods of the SQLite Store (a mixin of ``SQLiteStore``).

A write takes SQLite's one write lock (``BEGIN IMMEDIATE``), so two writers of
one name never pick the same version and a rotation re-wraps every row at once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.storage.secrets import check_keep
from conveyor.storage.sql import load_queries

T = TypeVar("T")
SQ = load_queries("sqlite", "secrets.sql")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _row(r: Any) -> SecretVersion:
    return SecretVersion(r[0], int(r[1]), r[2], bytes(r[3]), _dt(r[4]))


class SQLiteSecrets:
    """Needs the host store's ``_run``, ``_tx`` and ``_conn``."""

    _conn: sqlite3.Connection | None

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

        def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

    def _secrets_conn(self) -> sqlite3.Connection:
        assert self._conn is not None
        return self._conn

    async def put_secret(
        self, name: str, key_id: str, seal: Callable[[int], bytes], now: datetime, keep: int
    ) -> SecretVersion:
        check_keep(keep)

        def _do() -> SecretVersion:
            with self._tx() as conn:
                latest = conn.execute(SQ["latest_secret_version"], (name,)).fetchone()[0]
                version = int(latest or 0) + 1
                blob = bytes(seal(version))
                conn.execute(SQ["insert_secret"], (name, version, key_id, blob, now.timestamp()))
                conn.execute(SQ["prune_secret"], {"name": name, "newest": version, "keep": keep})
                return SecretVersion(name, version, key_id, blob, now)

        return await self._run(_do)

    async def get_secret(self, name: str, version: int | None = None) -> SecretVersion:
        def _do() -> SecretVersion:
            conn = self._secrets_conn()
            wanted = version
            if wanted is None:
                wanted = conn.execute(SQ["latest_secret_version"], (name,)).fetchone()[0]
                if wanted is None:
                    raise SecretNotFound(name)
            row = conn.execute(SQ["get_secret"], (name, wanted)).fetchone()
            if row is None:
                raise SecretNotFound(name, version)
            return _row(row)

        return await self._run(_do)

    async def secret_version(self, name: str) -> int | None:
        def _do() -> int | None:
            latest = self._secrets_conn().execute(SQ["latest_secret_version"], (name,))
            value = latest.fetchone()[0]
            return None if value is None else int(value)

        return await self._run(_do)

    async def list_secrets(self) -> list[SecretInfo]:
        def _do() -> list[SecretInfo]:
            rows = self._secrets_conn().execute(SQ["list_secrets"]).fetchall()
            return [SecretInfo(r[0], int(r[1]), int(r[2]), _dt(r[3]), _dt(r[4])) for r in rows]

        return await self._run(_do)

    async def delete_secret(self, name: str) -> None:
        def _do() -> None:
            with self._tx() as conn:
                if conn.execute(SQ["delete_secret"], (name,)).rowcount == 0:
                    raise SecretNotFound(name)

        await self._run(_do)

    async def rewrap_secrets(self, rewrap: Callable[[SecretVersion], tuple[str, bytes]]) -> int:
        def _do() -> int:
            with self._tx() as conn:
                rows = [_row(r) for r in conn.execute(SQ["all_secrets"]).fetchall()]
                for row in rows:
                    key_id, blob = rewrap(row)
                    conn.execute(SQ["rewrap_secret"], (key_id, blob, row.name, row.version))
                return len(rows)

        return await self._run(_do)

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        def _do() -> None:
            with self._tx() as conn:
                conn.execute(SQ["touch_api_key"], (now.timestamp(), key_id))

        await self._run(_do)
