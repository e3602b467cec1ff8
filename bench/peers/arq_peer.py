"""arq for bench/peers/run.py; runs in bench/peers/.venvs/arq (redis-py < 6).

Worker: its CLI, ``arq arq_peer.WorkerSettings --custom-log-dict
arq_peer.LOG_CONFIG`` (its defaults otherwise: max_jobs 10, poll_delay 0.5 s).
``$BENCH_REDIS_URL`` names the server. arq has no bulk enqueue API.
"""

from __future__ import annotations

import os
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import default_queue_name
from common import main, stamp

REDIS = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))

# arq's own default config, at WARNING instead of INFO (every job is logged at INFO).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"arq.standard": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["arq.standard"], "level": "WARNING"}},
}


async def noop(ctx: dict[str, Any], i: int) -> None:
    stamp(i)


class WorkerSettings:
    functions = [noop]  # arq reads class attributes
    redis_settings = REDIS


class Producer:
    redis: Any = None

    async def open(self) -> None:
        self.redis = await create_pool(REDIS)

    async def close(self) -> None:
        await self.redis.aclose()

    async def enqueue(self, i: int) -> None:
        await self.redis.enqueue_job("noop", i)


async def queued() -> dict[str, Any]:
    redis = await create_pool(REDIS)
    try:
        return {"queued": int(await redis.zcard(default_queue_name)), "done": None}
    finally:
        await redis.aclose()


if __name__ == "__main__":
    main(Producer, queued)
