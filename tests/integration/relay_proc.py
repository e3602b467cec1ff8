"""A process that runs only the outbox relay (SQLite outbox -> Redis bus) until killed.

    python relay_proc.py DATABASE_URL REDIS_URL PREFIX BATCH_DELAY

``BATCH_DELAY`` seconds of simulated network time per batch make a kill -9
land mid-run. Used by test_events_redis.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from conveyor.app import Conveyor
from conveyor.bus.redis import RedisBus
from conveyor.domain.job import Event
from conveyor.runtime.relay import OutboxConsumer, bus_relay
from conveyor.settings import Settings


async def main(db_url: str, redis_url: str, prefix: str, delay: float) -> None:
    bus = RedisBus(redis_url, prefix=prefix)
    app = Conveyor(settings=Settings(database_url=db_url), bus=bus)
    await app.open()
    relay = bus_relay(bus, stream_maxlen=1_000_000)

    async def slow_relay(events: Sequence[Event]) -> None:
        await relay(events)
        await asyncio.sleep(delay)  # wait-ok: simulated slow network per batch

    consumer = OutboxConsumer(
        app.store, "relay", slow_relay, clock=app.now, batch=50, lease_ttl=1.0
    )
    print("relay started", flush=True)
    await consumer.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
