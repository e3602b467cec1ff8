"""The secrets-vault and key-lifecycle methods of the in-memory Store (a mixin of
``MemoryStore``)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from conveyor.domain.auth import ApiKey
from conveyor.domain.errors import ApiKeyNotFound, ValidationError
from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.domain.webhooks import Webhook
from conveyor.storage.secrets import check_keep, revoked_key_error


class MemorySecrets:
    """Keeps its table on first use, so the host's ``__init__`` stays as it is."""

    _lock: asyncio.Lock
    _keys: dict[str, ApiKey]
    _webhooks: dict[str, Webhook]

    @property
    def _secrets(self) -> dict[str, dict[int, SecretVersion]]:
        table: dict[str, dict[int, SecretVersion]] | None = getattr(self, "_secret_rows", None)
        if table is None:
            table = {}
            self._secret_rows = table
        return table

    async def put_secret(
        self, name: str, key_id: str, seal: Callable[[int], bytes], now: datetime, keep: int
    ) -> SecretVersion:
        check_keep(keep)
        async with self._lock:
            versions = self._secrets.setdefault(name, {})
            version = max(versions, default=0) + 1
            row = SecretVersion(name, version, key_id, bytes(seal(version)), now)
            versions[version] = row
            for old in [v for v in versions if v <= version - keep]:
                del versions[old]
            return row

    async def get_secret(self, name: str, version: int | None = None) -> SecretVersion:
        versions = self._secrets.get(name) or {}
        if not versions:
            raise SecretNotFound(name)
        found = versions.get(max(versions) if version is None else version)
        if found is None:
            raise SecretNotFound(name, version)
        return found

    async def secret_version(self, name: str) -> int | None:
        versions = self._secrets.get(name)
        return max(versions) if versions else None

    async def list_secrets(self) -> list[SecretInfo]:
        out = []
        for name in sorted(self._secrets):
            rows = sorted(self._secrets[name].values(), key=lambda r: r.version)
            if rows:
                out.append(
                    SecretInfo(
                        name, rows[-1].version, len(rows), rows[0].created_at, rows[-1].created_at
                    )
                )
        return out

    async def delete_secret(self, name: str) -> None:
        async with self._lock:
            if not self._secrets.pop(name, None):
                raise SecretNotFound(name)

    async def rewrap_secrets(self, rewrap: Callable[[SecretVersion], tuple[str, bytes]]) -> int:
        async with self._lock:
            # All or none: compute every new row first, then swap them in.
            new = {
                (row.name, row.version): rewrap(row)
                for versions in self._secrets.values()
                for row in versions.values()
            }
            for (name, version), (key_id, blob) in new.items():
                row = self._secrets[name][version]
                self._secrets[name][version] = replace(row, key_id=key_id, ciphertext=blob)
            return len(new)

    async def touch_api_key(self, key_id: str, now: datetime) -> None:
        keys = self._keys
        key = keys.get(key_id)
        if key is not None and (key.last_used_at is None or key.last_used_at < now):
            keys[key_id] = replace(key, last_used_at=now)

    async def rotate_api_key(
        self, key_id: str, new: ApiKey, old_until: datetime, now: datetime
    ) -> None:
        async with self._lock:
            old = self._keys.get(key_id)
            if old is None:
                raise ApiKeyNotFound(key_id)
            if not old.active:
                raise revoked_key_error(key_id)
            if any(k.key_hash == new.key_hash or k.id == new.id for k in self._keys.values()):
                raise ValidationError("An API key with this id or hash already exists")
            self._keys[new.id] = new
            if old_until <= now:
                self._keys[key_id] = replace(old, revoked_at=now)
            elif old.expires_at is None or old.expires_at > old_until:
                self._keys[key_id] = replace(old, expires_at=old_until)

    async def move_webhook_secret(self, webhook_id: str, ref: str, secret: str) -> bool:
        async with self._lock:
            hook = self._webhooks.get(webhook_id)
            if hook is None or hook.secret != secret or hook.secret_ref is not None:
                return False
            self._webhooks[webhook_id] = replace(hook, secret="", secret_ref=ref)
            return True

    async def prune_secret_versions(self, replaced_before: datetime) -> int:
        async with self._lock:
            pruned = 0
            for versions in self._secrets.values():
                ordered = sorted(versions)
                for older, newer in itertools.pairwise(ordered):
                    if versions[newer].created_at <= replaced_before:
                        del versions[older]
                        pruned += 1
            return pruned
