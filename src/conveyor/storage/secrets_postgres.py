"""The secrets-vault methods of the PostgreSQL Store (a mixin of ``PostgresStore``).

Writers of one name take turns on a transaction advisory lock; a rotation
locks every row (``FOR UPDATE``) and re-wraps them in one transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.domain.auth import ApiKey
from conveyor.domain.errors import ApiKeyNotFound, StoreError, ValidationError
from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.storage.secrets import check_keep, revoked_key_error
from conveyor.storage.sql import load_queries

if TYPE_CHECKING:
    import asyncpg

SQ = load_queries("postgres", "secrets.sql")
KQ = load_queries("postgres", "keys.sql")


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

    async def rotate_api_key(
        self, key_id: str, new: ApiKey, old_until: datetime, now: datetime
    ) -> None:
        import asyncpg

        try:
            async with self._conn(tx=True) as conn:
                state = await conn.fetchrow(KQ["api_key_state"], key_id)
                if state is None:
                    raise ApiKeyNotFound(key_id)
                if state[0] is not None:
                    raise revoked_key_error(key_id)
                await conn.execute(
                    KQ["insert_rotated_api_key"],
                    new.id,
                    new.name,
                    new.scope.value,
                    new.key_hash,
                    new.prefix,
                    new.created_at,
                    new.expires_at,
                )
                if old_until <= now:
                    await conn.execute(KQ["revoke_rotated_api_key"], key_id, now)
                else:
                    await conn.execute(KQ["end_api_key"], key_id, old_until)
        except StoreError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ValidationError("An API key with this id or hash already exists") from exc
            raise

    async def move_webhook_secret(self, webhook_id: str, ref: str, secret: str) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(KQ["move_webhook_secret"], webhook_id, ref, secret)
        return bool(status != "UPDATE 0")

    async def prune_secret_versions(self, replaced_before: datetime) -> int:
        async with self._conn() as conn:
            status = await conn.execute(KQ["prune_replaced_secrets"], replaced_before)
        return int(status.split()[-1])
