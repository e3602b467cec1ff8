"""A redis-py asyncio client that times its commands into
``conveyor_redis_command_seconds`` (``observability/redis_metrics.py``).

``op`` is the command's name in lower case (``publish``, ``xadd``, ``xack``...), the
name a script was registered under for ``EVALSHA`` (``add_script_name``), and
``pipeline`` or ``multi`` for a pipeline sent as one round trip. Blocking reads
(``BLPOP`` and the like, ``XREAD``/``XREADGROUP`` with ``BLOCK``) are not timed:
their time is the wait for data, not Redis's. Pub/sub reads go through their own
connection and are not timed either. The cost is two clock reads and a bucket
increment per command (~1 us against a ~100 us round trip).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from conveyor.observability.redis_metrics import child

_BLOCKING = frozenset(
    {"BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT"}
)
_MAY_BLOCK = frozenset({"XREAD", "XREADGROUP"})
_BLOCK = (b"BLOCK", "BLOCK")
_execute: Any = aioredis.Redis.execute_command  # untyped in redis-py


class TimedRedis(aioredis.Redis):
    """``redis.asyncio.Redis`` timing each command, labelled ``client=metric_client``.
    Make one with ``timed_client``."""

    metric_client = "redis"
    #: Script SHA1 -> the ``op`` its ``EVALSHA`` counts as.
    script_names: Mapping[str, str] = MappingProxyType({})

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0] if args else ""
        if name in _BLOCKING or (name in _MAY_BLOCK and any(a in _BLOCK for a in args)):
            return await _execute(self, *args, **options)
        if name == "EVALSHA" and len(args) > 1:
            op = self.script_names.get(args[1], "evalsha")
        else:
            op = name.lower() if type(name) is str else "other"
        timer = child(self.metric_client, op)
        started = time.perf_counter()
        try:
            return await _execute(self, *args, **options)
        finally:
            timer.observe(time.perf_counter() - started)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _TimedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.metric_client = self.metric_client
        return pipe

    def add_script_name(self, sha: str, op: str) -> None:
        """Count ``EVALSHA sha`` as ``op``."""
        self.script_names = {**self.script_names, sha: op}


class _TimedPipeline(Pipeline):
    """A pipeline timed as one ``pipeline`` (or ``multi``: a transaction) op."""

    metric_client = "redis"

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self.command_stack and not self.watching:
            return await super().execute(raise_on_error)
        op = "multi" if self.is_transaction or self.explicit_transaction else "pipeline"
        timer = child(self.metric_client, op)
        started = time.perf_counter()
        try:
            return await super().execute(raise_on_error)
        finally:
            timer.observe(time.perf_counter() - started)


def timed_client(url: str, client: str, **options: Any) -> TimedRedis:
    """``TimedRedis.from_url(url, **options)`` counting its commands as ``client``."""
    redis: TimedRedis = TimedRedis.from_url(url, **options)  # type: ignore[assignment]  # it builds cls
    redis.metric_client = client
    return redis
