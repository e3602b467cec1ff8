"""Celery (Redis broker) for bench/peers/run.py; runs in bench/peers/.venvs/celery.

Worker: its CLI, ``celery -A celery_peer worker --pool threads --concurrency 10
--loglevel WARNING`` (PEERS.md); no result backend. ``$BENCH_REDIS_URL`` names
the broker. Bulk enqueue is ``group(...).apply_async()``, Celery's way of
sending many tasks at once (one message per task on Redis).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, group
from common import main, stamp

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.broker_connection_retry_on_startup = True


@app.task(name="noop")
def noop(i: int) -> None:
    stamp(i)


class Producer:
    async def open(self) -> None:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)

    async def close(self) -> None:
        app.close()

    async def enqueue(self, i: int) -> None:
        noop.delay(i)

    async def enqueue_many(self, ids: list[int]) -> None:
        group(noop.s(i) for i in ids).apply_async()


async def queued() -> dict[str, Any]:
    with app.connection_for_read() as conn:
        client = conn.default_channel.client
        return {"queued": int(client.llen("celery")), "done": None}


if __name__ == "__main__":
    main(Producer, queued)
