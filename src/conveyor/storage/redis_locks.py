"""Distributed locks on Redis: the lock half of the Store port, in Lua scripts.

Used when ``CONVEYOR_LOCKS_BACKEND=redis`` (with ``CONVEYOR_REDIS_URL``). Each
call is one script (``storage/locks.lua``), so it is atomic on the Redis
server. Per key: a holder hash ``<prefix>:lock:<key>`` that expires with the
lock (Redis's own clock runs the TTL: the caller's clock only stamps
``acquired_at``), and a counter ``<prefix>:lock-token:<key>`` that never
expires: every acquisition INCRs it, so fencing tokens only grow, for as long as
Redis keeps its data (use AOF persistence; a Redis that loses its data starts
the counters again at 1).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from conveyor.domain.errors import StoreUnavailable
from conveyor.domain.locks import LockInfo
from conveyor.observability.redis_client import timed_client
from conveyor.security.redact import redact_url
from conveyor.storage.base import check_limit

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
#: Keys read per SCAN round trip and per ``describe`` script.
SCAN_COUNT = 500


def load_scripts() -> dict[str, str]:
    """The named blocks of ``locks.lua``."""
    text = resources.files(__package__).joinpath("locks.lua").read_text("utf-8")
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _ms(ttl: float) -> int:
    return max(1, round(ttl * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLocks:
    """Locks on the Redis at ``url`` (``redis://host:6379/0``), keys under ``prefix``.

    Connects on first use. Redis errors raise ``StoreUnavailable``."""

    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "conveyor") -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self.prefix = prefix
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    def _holder(self, key: str) -> str:
        return f"{self.prefix}:lock:{key}"

    def _counter(self, key: str) -> str:
        return f"{self.prefix}:lock-token:{key}"

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            client = timed_client(  # conveyor_redis_command_seconds{client="locks"}
                self._url,
                "locks",
                socket_connect_timeout=2.0,
                socket_timeout=5.0,
                decode_responses=False,
                protocol=2,
            )
            self._scripts = {
                name: client.register_script(body) for name, body in load_scripts().items()
            }
            for name, script in self._scripts.items():
                client.add_script_name(script.sha, name)  # op="acquire", not "evalsha"
            self._client = client
        return self._client

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        self._redis()
        try:
            return await self._scripts[script](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"Redis at {self._safe_url} failed a lock call: {exc}",
                reason="the lock server (Redis) cannot be reached",
            ) from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None:
        token = await self._call(
            "acquire",
            [self._holder(key), self._counter(key)],
            [owner, _ms(ttl), repr(now.timestamp())],
        )
        return None if token is None else int(token)

    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool:
        done = await self._call("extend", [self._holder(key)], [owner, str(token), _ms(ttl)])
        return bool(done)

    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool:
        return bool(await self._call("release", [self._holder(key)], [owner, str(token)]))

    async def check_lock(self, key: str, token: int, now: datetime) -> bool:
        return bool(await self._call("check", [self._holder(key)], [str(token)]))

    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]:
        """Key order, as the store lists them. Walks the key space with SCAN: meant
        for an operator's look, not a hot path."""
        check_limit(limit)
        # Every key ever locked has a counter; a held one also has a holder hash.
        pattern = self._counter("*") if include_free else self._holder("*")
        strip = len(pattern) - 1
        client = self._redis()
        names: list[str] = []
        try:
            async for raw in client.scan_iter(match=_escape_prefix(pattern), count=SCAN_COUNT):
                names.append(_text(raw)[strip:])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"Redis at {self._safe_url} failed a lock listing: {exc}",
                reason="the lock server (Redis) cannot be reached",
            ) from exc
        names.sort()
        out: list[LockInfo] = []
        for start in range(0, len(names), SCAN_COUNT):
            if len(out) >= limit:
                break
            chunk = names[start : start + SCAN_COUNT]
            rows = await self._call(
                "describe", [self._holder(k) for k in chunk], [self._counter(k) for k in chunk]
            )
            for key, (owner, token, acquired, pttl) in zip(chunk, rows, strict=True):
                if token is None:
                    continue  # released between the SCAN and this read, never counted
                held = owner is not None and int(pttl) != -2
                if not held and not include_free:
                    continue
                out.append(
                    LockInfo(
                        key=key,
                        owner=_text(owner) if held else None,
                        token=int(token),
                        acquired_at=(
                            datetime.fromtimestamp(float(acquired), UTC)
                            if held and acquired is not None
                            else None
                        ),
                        expires_at=now + timedelta(milliseconds=int(pttl))
                        if held and int(pttl) >= 0
                        else None,
                        held=held,
                    )
                )
        return out[:limit]


def _escape_prefix(pattern: str) -> str:
    """``pattern`` (a prefix ending in ``*``) with the prefix's glob characters escaped."""
    literal = re.sub(r"([\\*?\[\]])", r"\\\1", pattern[:-1])
    return literal + "*"
