"""Events over a real Redis: the relay survives kill -9 without losing an event,
and the bus carries cancel signals to workers at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

import conveyor.demo
from conveyor.app import Conveyor
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from redis_server import RedisServer
from support import ROOT, async_wait_until, wait_until

RELAY = Path(__file__).with_name("relay_proc.py")


def relay_process(db_url: str, redis_url: str, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(RELAY), db_url, redis_url, prefix, "0.02"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.mark.slow
async def test_relay_killed_mid_batch_loses_no_event(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    db_url = f"sqlite:///{tmp_path}/relay.db"
    app = Conveyor(settings=Settings(database_url=db_url, allow_unknown_job_types=True))
    async with app:
        await app.submit_many([app.new_job("test_job", {"n": i}) for i in range(3000)])
        expected = []
        cursor = 0
        while batch := await app.store.events_after(cursor, 1000):
            expected.extend(e.id for e in batch)
            cursor = batch[-1].id
    assert len(expected) == 3000

    prefix = f"relay-{uuid.uuid4().hex}"
    stream = f"{prefix}:stream:events"
    r = redis.Redis.from_url(redis_server.url)
    log = tmp_path / "relay.log"
    first = relay_process(db_url, redis_server.url, prefix, log)
    try:
        wait_until(lambda: r.xlen(stream) >= 500, 30, "the first relay to publish 500 events")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = r.xlen(stream)
        assert at_kill < 3000, "the relay finished before it was killed"
        second = relay_process(db_url, redis_server.url, prefix, log)
        try:
            # The dead relay's lease (1 s) expires; the second carries on from its position.
            wait_until(
                lambda: len({_id(e) for e in r.xrange(stream)}) >= 3000,
                60,
                "every event on the stream",
            )
        finally:
            second.kill()
            second.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        r.close()
    r = redis.Redis.from_url(redis_server.url)
    entries = r.xrange(stream)
    r.close()
    ids = [_id(e) for e in entries]
    assert set(ids) == set(expected)  # nothing lost
    repeats = {i: n for i, n in Counter(ids).items() if n > 1}
    assert len(repeats) <= 50  # at most the batch in flight at the kill is sent again
    payloads: dict[int, bytes] = {}
    for entry_id, fields in entries:
        data = _data(fields)
        assert payloads.setdefault(_id((entry_id, fields)), data) == data  # same event, same id


def _data(fields: dict[bytes, bytes]) -> bytes:
    (value,) = fields.values()
    return value


def _id(entry: tuple[bytes, dict[bytes, bytes]]) -> int:
    import orjson

    return int(orjson.loads(_data(entry[1]))["id"])


async def test_cancel_reaches_a_running_job_over_redis_before_any_heartbeat(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/cancel.db",
        redis_url=redis_server.url,
        heartbeat_interval=30.0,  # the heartbeat would bring the cancel only after 30 s
        heartbeat_timeout=90.0,
        poll_interval=0.05,
    )
    app = Conveyor(settings=settings)
    conveyor.demo.register(app)
    async with app:
        assert app.bus.backend == "redis"
        worker = app.worker(concurrency=2)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.started.wait(), 10)
        try:
            job = await app.enqueue("sleep", {"seconds": 60})

            async def running() -> bool:
                return (await app.store.get(job.id)).state is JobState.RUNNING

            await async_wait_until(running, 10, "the job to start")
            await app.cancel(job.id)

            async def cancelled() -> bool:
                return (await app.store.get(job.id)).state is JobState.CANCELLED

            await async_wait_until(cancelled, 5, "the cancel to arrive over Redis")
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 15)
