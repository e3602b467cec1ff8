"""pgqueuer for bench/peers/run.py; runs in bench/peers/.venvs/pgqueuer.

Worker: its CLI, ``pgq run pgqueuer_peer:create`` (batch size 10, uvloop: its
defaults), after ``pgq install``. pgqueuer 1.6.0 wants the factory to be an
async context manager (PEERS.md). ``$BENCH_PG_DSN`` names the database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from common import main, stamp
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries


@asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    conn = await asyncpg.connect(os.environ["BENCH_PG_DSN"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        stamp(int(job.payload or b"0"))

    try:
        yield pgq
    finally:
        await conn.close()


class Producer:
    conn: Any = None

    async def open(self) -> None:
        self.conn = await asyncpg.connect(os.environ["BENCH_PG_DSN"])
        self.queries = Queries(AsyncpgDriver(self.conn))

    async def close(self) -> None:
        await self.conn.close()

    async def enqueue(self, i: int) -> None:
        await self.queries.enqueue("noop", str(i).encode())

    async def enqueue_many(self, ids: list[int]) -> None:
        await self.queries.enqueue(
            ["noop"] * len(ids), [str(i).encode() for i in ids], [0] * len(ids)
        )


async def queued() -> dict[str, Any]:
    conn = await asyncpg.connect(os.environ["BENCH_PG_DSN"])
    try:
        rows = await conn.fetch("SELECT status::text, count(*) FROM pgqueuer GROUP BY 1")
    finally:
        await conn.close()
    counts = {r[0]: r[1] for r in rows}
    return {"queued": counts.get("queued", 0), "done": None, **counts}


if __name__ == "__main__":
    main(Producer, queued)
