"""The secrets-vault methods of the PostgreSQL Store (a mixin of ``PostgresStore``).

Writers of one name take turns on a transaction advisory lock; a rotation
locks every row (``FOR UPDATE``) and re-wraps them in one transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.storage.secrets import check_keep
from conveyor.storage.sql import load_queries

if TYPE_CHECKING:
    import asyncpg

SQ = load_queries("postgres", "secrets.sql")


def _row(r: Any) -> SecretVersion:
    return SecretVersion(r[0], int(r[1]), r[2], bytes(r[3]), r[4])


class PostgresSecrets:
    """Needs the host store's ``_conn``."""

    if TYPE_CHECKING:

        def _conn(
            self, tx: bool = False
        ) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]: ...

    async def put_secret(
        self, name: str, key_id: str, seal: Callable[[int], bytes], now: datetime, keep: int
    ) -> SecretVersion:
        check_keep(keep)
        async with self._conn(tx=True) as conn:
            await conn.execute(SQ["lock_secret_name"], name)
            version = int(await conn.fetchval(SQ["latest_secret_version"], name) or 0) + 1
            blob = bytes(seal(version))
            await conn.execute(SQ["insert_secret"], name, version, key_id, blob, now)
            await conn.execute(SQ["prune_secret"], name, version, keep)
        return SecretVersion(name, version, key_id, blob, now)

    async def get_secret(self, name: str, version: int | None = None) -> SecretVersion:
        async with self._conn() as conn:
            wanted = version
            if wanted is None:
                wanted = await conn.fetchval(SQ["latest_secret_version"], name)
                if wanted is None:
                    raise SecretNotFound(name)
            if not -(2**31) <= wanted < 2**31:
                raise SecretNotFound(name, version)
            row = await conn.fetchrow(SQ["get_secret"], name, wanted)
        if row is None:
            raise SecretNotFound(name, version)
        return _row(row)

    async def secret_version(self, name: str) -> int | None:
        async with self._conn() as conn:
            value = await conn.fetchval(SQ["latest_secret_version"], name)
        return None if value is None else int(value)

    async def list_secrets(self) -> list[SecretInfo]:
        async with self._conn() as conn:
            rows = await conn.fetch(SQ["list_secrets"])
        return [SecretInfo(r[0], int(r[1]), int(r[2]), r[3], r[4]) for r in rows]

    async def delete_secret(self, name: str) -> None:
        async with self._conn() as conn:
            status = await conn.execute(SQ["delete_secret"], name)
        if status == "DELETE 0":
            raise SecretNotFound(name)

    async def rewrap_secrets(self, rewrap: Callable[[SecretVersion], tuple[str, bytes]]) -> int:
        async with self._conn(tx=True) as conn:
            rows = [_row(r) for r in await conn.fetch(SQ["all_secrets"])]
            for row in rows:
                key_id, blob = rewrap(row)
                await conn.execute(SQ["rewrap_secret"], key_id, blob, row.name, row.version)
        return len(rows)

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        async with self._conn() as conn:
            await conn.execute(SQ["touch_api_key"], now, key_id)
