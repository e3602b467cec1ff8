"""procrastinate for bench/peers/run.py; runs in bench/peers/.venvs/procrastinate.

Worker: its CLI, ``procrastinate --app=procrastinate_peer.app worker
--concurrency 10``, after ``procrastinate --app=... schema --apply``.
``$BENCH_PG_DSN`` names the database (psycopg 3 with its binary package).
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from common import main, stamp
from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PG_DSN", "")))


@app.task(name="noop")
async def noop(i: int) -> None:
    stamp(i)


class Producer:
    async def open(self) -> None:
        await app.open_async()

    async def close(self) -> None:
        await app.close_async()

    async def enqueue(self, i: int) -> None:
        await noop.defer_async(i=i)

    async def enqueue_many(self, ids: list[int]) -> None:
        await noop.batch_defer_async(*({"i": i} for i in ids))


async def queued() -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(os.environ["BENCH_PG_DSN"]) as conn:
        cur = await conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1")
        counts = dict(await cur.fetchall())
    return {"queued": counts.get("todo", 0), "done": counts.get("succeeded", 0), **counts}


if __name__ == "__main__":
    main(Producer, queued)
