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

from conveyor.domain.auth import ApiKey
from conveyor.domain.errors import ApiKeyNotFound, ValidationError
from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.storage.secrets import check_keep, revoked_key_error
from conveyor.storage.sql import load_queries

T = TypeVar("T")
SQ = load_queries("sqlite", "secrets.sql")
KQ = load_queries("sqlite", "keys.sql")


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

    async def rotate_api_key(
        self, key_id: str, new: ApiKey, old_until: datetime, now: datetime
    ) -> None:
        expires = None if new.expires_at is None else new.expires_at.timestamp()
        params = (new.id, new.name, new.scope.value, new.key_hash, new.prefix)

        def _do() -> None:
            with self._tx() as conn:
                state = conn.execute(KQ["api_key_state"], (key_id,)).fetchone()
                if state is None:
                    raise ApiKeyNotFound(key_id)
                if state[0] is not None:
                    raise revoked_key_error(key_id)
                try:
                    conn.execute(
                        KQ["insert_rotated_api_key"],
                        (*params, new.created_at.timestamp(), expires),
                    )
                except sqlite3.IntegrityError as exc:
                    raise ValidationError("An API key with this id or hash already exists") from exc
                if old_until <= now:
                    conn.execute(KQ["revoke_rotated_api_key"], (now.timestamp(), key_id))
                else:
                    conn.execute(KQ["end_api_key"], {"until": old_until.timestamp(), "id": key_id})

        await self._run(_do)

    async def move_webhook_secret(self, webhook_id: str, ref: str, secret: str) -> bool:
        def _do() -> bool:
            conn = self._secrets_conn()
            # Zero the freed bytes of the old row, then fold the WAL into the file
            # and truncate it: the plaintext leaves both files.
            conn.execute("PRAGMA secure_delete = ON")
            try:
                with self._tx() as tx:
                    moved = tx.execute(
                        KQ["move_webhook_secret"],
                        {"ref": ref, "id": webhook_id, "secret": secret},
                    ).rowcount
            finally:
                conn.execute("PRAGMA secure_delete = OFF")
            if moved:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return bool(moved)

        return await self._run(_do)

    async def prune_secret_versions(self, replaced_before: datetime) -> int:
        def _do() -> int:
            with self._tx() as conn:
                cursor = conn.execute(
                    KQ["prune_replaced_secrets"], {"before": replaced_before.timestamp()}
                )
                return int(cursor.rowcount)

        return await self._run(_do)
