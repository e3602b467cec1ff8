"""Request rate limits: per API key, and failed authentications per client address.

A caller over its limit gets ``429`` with ``Retry-After`` (whole seconds). The
counters live in this process, or in Redis when ``redis_url`` is set, so every
API process of a fleet shares them. The ``limits`` library keeps sliding-window
counters. Failed authentications are counted per address only after the key
lookup, so a valid key from an address that is also sending bad keys (one NAT,
one proxy) is unaffected; keys are 256 random bits, so the limit is about load
and noise, not guessing.

If Redis cannot be reached the request is let through (and a warning logged):
the limiter never takes the API down with it.
"""

from __future__ import annotations

import math
import time

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from conveyor.api.http import ApiError
from conveyor.observability.redis_metrics import observe as observe_redis
from conveyor.settings import Settings

log = structlog.get_logger("conveyor.api")

REDIS_PREFIX = "conveyor:limits"


def _storage(redis_url: str) -> Storage:
    if not redis_url:
        return MemoryStorage()
    scheme, _, rest = redis_url.partition("://")
    scheme = {"redis": "redis", "rediss": "rediss", "unix": "redis+unix"}[scheme]
    return RedisStorage(
        f"async+{scheme}://{rest}", implementation="redispy", key_prefix=REDIS_PREFIX
    )


class RequestLimits:
    """``per_key``: requests a key may make (e.g. ``1200/minute``); ``auth_failures``:
    failed authentications an address may make before it gets 429s."""

    def __init__(self, per_key: str, auth_failures: str, redis_url: str = "") -> None:
        self.per_key: RateLimitItem = parse(per_key)
        self.auth_failures: RateLimitItem = parse(auth_failures)
        self.storage = _storage(redis_url)
        self.shared = bool(redis_url)
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self._warned = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits | None:
        """None when ``rate_limits`` is off."""
        if not settings.rate_limits:
            return None
        return cls(settings.rate_limit, settings.rate_limit_auth_failures, settings.redis_url)

    async def _hit(self, item: RateLimitItem, *ids: str) -> None:
        started = time.perf_counter()
        try:
            if await self.limiter.hit(item, *ids):
                return
            stats = await self.limiter.get_window_stats(item, *ids)
        except Exception as exc:  # noqa: BLE001 - a limiter outage must not fail requests
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("rate_limit_unavailable", error=str(exc), kind=type(exc).__name__)
            return
        finally:
            if self.shared:  # the limits library's own Redis client: timed per check
                observe_redis("ratelimit", "hit", time.perf_counter() - started)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise ApiError(
            429,
            f"Too many requests: {what(ids[0])} allows {item}; retry in {retry_after} s",
            {"Retry-After": str(retry_after)},
        )

    async def key_used(self, key_id: str) -> None:
        """Count one request of API key ``key_id``; ``ApiError`` 429 past its limit."""
        await self._hit(self.per_key, "key", key_id)

    async def auth_failed(self, address: str) -> None:
        """Count one failed authentication from ``address``; ``ApiError`` 429 past
        the limit (instead of the 401 the caller would get)."""
        await self._hit(self.auth_failures, "auth-failure", address)


def what(kind: str) -> str:
    return "this API key" if kind == "key" else "failed authentication from this address"
