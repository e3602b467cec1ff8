"""A process that contends for a lock, or campaigns for a leader lease (test_locks_processes).

    python lock_proc.py contend DB_URL LOG SECONDS RESOURCE_DB [--expire-once]
    python lock_proc.py lead DB_URL LOG TTL

Every line of LOG is JSON, stamped with this process's own clock (time.time()).

contend: until SECONDS have passed, take the lock "contended" (ttl 5 s, wait 3 s),
log {pid, token, acquired_at, released_at}, and write the token to RESOURCE_DB
the fenced way (``UPDATE ... WHERE token < :token``). With --expire-once, one
holding (after 2 s) runs past its 0.5 s TTL instead: once a newer holder has
written, it tries the fence (app.locks.check) and the fenced write, and logs
whether each was refused.

lead: ``async with app.leader("singleton", ttl=TTL)``; once leader, log
{"event": "leader", pid, token} and then a {"event": "tick", pid, token} every
50 ms until killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import sys
import time

from conveyor import Conveyor
from conveyor.domain.errors import LockNotAcquired, StaleFencingToken

KEY = "contended"


def log_line(path: str, **fields: object) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def fenced_write(resource: str, token: int, writer: int) -> bool:
    """The resource's side of fencing: a write with a token lower than the last
    one it took is refused."""
    conn = sqlite3.connect(resource, timeout=30)
    try:
        with conn:
            cur = conn.execute(
                "UPDATE resource SET token = ?, writer = ? WHERE id = 1 AND token < ?",
                (token, writer, token),
            )
            return cur.rowcount == 1
    finally:
        conn.close()


def resource_token(resource: str) -> int:
    conn = sqlite3.connect(resource, timeout=30)
    try:
        return int(conn.execute("SELECT token FROM resource WHERE id = 1").fetchone()[0])
    finally:
        conn.close()


async def contend(db: str, log: str, seconds: float, resource: str, expire_once: bool) -> None:
    app = Conveyor(db)
    async with app:
        start = time.monotonic()
        expire_at = start + 2.0 if expire_once else None
        while time.monotonic() - start < seconds:
            if expire_at is not None and time.monotonic() >= expire_at:
                expire_at = None
                await hold_past_expiry(app, log, resource)
                continue
            try:
                lock = await app.locks.acquire(KEY, ttl=5, wait=3)
            except LockNotAcquired:
                continue
            acquired_at = time.time()
            await lock.check()
            wrote = fenced_write(resource, lock.token, os.getpid())
            await asyncio.sleep(0.01)  # wait-ok: the work done while holding the lock
            released_at = time.time()
            still_held = await lock.release()
            # Other work between holdings: without it the releaser would win the
            # next round over waiters in backoff (the lock promises no fairness).
            await asyncio.sleep(random.uniform(0.005, 0.03))  # wait-ok: think time
            log_line(
                log,
                event="held",
                token=lock.token,
                acquired_at=acquired_at,
                released_at=released_at,
                wrote=wrote,
                held_to_the_end=still_held,
            )


async def hold_past_expiry(app: Conveyor, log: str, resource: str) -> None:
    lock = await app.locks.acquire(KEY, ttl=0.5, wait=10)
    acquired_at = time.time()
    deadline = time.monotonic() + 20
    # Stall (as a GC pause or a frozen VM would) until a newer holder has written.
    while resource_token(resource) <= lock.token and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # wait-ok: polling the resource with a deadline
    try:
        await lock.check()
        check_refused = False
    except StaleFencingToken:
        check_refused = True
    write_refused = not fenced_write(resource, lock.token, os.getpid())
    log_line(
        log,
        event="expired",
        token=lock.token,
        acquired_at=acquired_at,
        check_refused=check_refused,
        write_refused=write_refused,
        released_cleanly=await lock.release(),
    )


async def lead(db: str, log: str, ttl: float) -> None:
    app = Conveyor(db)
    async with app, app.leader("singleton", ttl=ttl) as lease:
        log_line(log, event="leader", token=lease.token, at=time.time())
        while True:
            log_line(log, event="tick", token=lease.token, at=time.time())
            await asyncio.sleep(0.05)  # wait-ok: the singleton's periodic work


def main() -> None:
    mode, db, log = sys.argv[1:4]
    if mode == "contend":
        asyncio.run(contend(db, log, float(sys.argv[4]), sys.argv[5], "--expire-once" in sys.argv))
    else:
        asyncio.run(lead(db, log, float(sys.argv[4])))


if __name__ == "__main__":
    main()
