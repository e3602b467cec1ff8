"""PostgreSQL backends terminated under load: a connection that broke is never
handed to a caller (asyncpg's "another operation is in progress"), nothing
submitted is lost, and throughput comes back within seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import pytest
import structlog

from conveyor import Conveyor, JobState, Settings
from conveyor.demo import register
from conveyor.domain.errors import StoreError
from conveyor.domain.job import NewJob
from conveyor.storage.postgres import PostgresStore
from support import async_wait_until, running_worker

pytestmark = pytest.mark.usefixtures("pg_server")

SHARED = re.compile(r"another operation.*in progress")


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """Every structlog event and stdlib log record of the block, as text."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with structlog.testing.capture_logs() as events:
            yield lines
            lines.extend(repr(e) for e in events)
    finally:
        root.removeHandler(handler)


async def terminate_all(admin: asyncpg.Connection) -> int:
    """pg_terminate_backend of every other backend of this database."""
    return int(
        await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    )


async def gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


class HoldingProxy:
    """A TCP relay to PostgreSQL that, while ``hold`` is set, passes on what the
    server sends but not its hang-up: the client reads the server's last words
    (the FATAL error of a terminated backend) and its socket stays open. This is
    the moment, a few milliseconds long in production, when asyncpg's connection
    looks open but its protocol waits for a reply that never comes."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.dsn_template = dsn.replace(parts.netloc, f"{parts.username}@127.0.0.1:{{port}}")
        self.hold = False
        self.delivered = asyncio.Event()  # the server's last bytes reached a held client
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return self.dsn_template.format(port=port)

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            if down and self.hold:
                self.delivered.set()
                return  # keep the client's socket open: no FIN
            dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))


async def test_a_connection_whose_backend_ended_while_idle_is_never_handed_out(
    postgres_dsn: str,
) -> None:
    admin = await asyncpg.connect(postgres_dsn)
    proxy = HoldingProxy(postgres_dsn)
    try:
        async with proxy as dsn:
            store = PostgresStore(dsn, min_size=1, max_size=2)
            await store.open()
            try:
                async with store._conn() as conn:  # the kept connection
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                proxy.hold = True
                assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await asyncio.wait_for(proxy.delivered.wait(), 10)
                await async_wait_until(lambda: gone(admin, pid), 10, "the backend to exit")
                proxy.hold = False
                # The kept connection read FATAL, never a hang-up: it looks open.
                assert store._lane is not None
                assert not store._lane.is_closed()
                await store.enqueue_many([NewJob("idle")], datetime.now(UTC))
                async with store._conn(tx=True) as conn:
                    assert await conn.fetchval("SELECT pg_backend_pid()") != pid
                assert sum((await store.count_by_state()).values()) == 1
            finally:
                await store.close()
    finally:
        await admin.close()


@pytest.fixture
async def app(postgres_dsn: str) -> AsyncIterator[Conveyor]:
    app = Conveyor(
        settings=Settings(
            database_url=postgres_dsn,
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=5.0,
        )
    )
    register(app)
    async with app:
        yield app


async def test_backends_terminated_under_load_lose_nothing_and_share_nothing(
    app: Conveyor, postgres_dsn: str
) -> None:
    """Every backend of the database terminated 25 times, 0.1 s apart, while four
    submitters and a worker (fetches, finishes, heartbeats, relay) run."""
    submitted: set[str] = set()
    stop = asyncio.Event()
    failed_calls: list[str] = []

    async def submitter() -> None:
        while not stop.is_set():
            try:
                submitted.add((await app.enqueue("test_job", {"n": len(submitted)})).id)
            except StoreError as exc:  # its backend was just terminated: the caller retries
                failed_calls.append(str(exc))

    admin = await asyncpg.connect(postgres_dsn)
    try:
        with captured() as logs:
            async with running_worker(app, concurrency=8):
                tasks = [asyncio.create_task(submitter()) for _ in range(4)]
                try:
                    for _ in range(25):
                        await asyncio.sleep(0.1)  # wait-ok: load between two kills
                        await terminate_all(admin)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
                killed_at = time.monotonic()
                # Throughput is back: a fresh batch is submitted and run within seconds.
                fresh = {(await app.enqueue("test_job", {"after": i})).id for i in range(50)}

                async def fresh_done() -> bool:
                    return bool(
                        await admin.fetchval(
                            "SELECT count(*) = $2 FROM conveyor.jobs"
                            " WHERE id = ANY($1) AND state = 'completed'",
                            list(fresh),
                            len(fresh),
                        )
                    )

                await async_wait_until(fresh_done, 10, "jobs submitted after the kills to run")
                recovery = time.monotonic() - killed_at

                async def all_done() -> bool:
                    return bool(
                        await admin.fetchval(
                            "SELECT count(*) = $2 FROM conveyor.jobs"
                            " WHERE id = ANY($1) AND state = 'completed'",
                            list(submitted),
                            len(submitted),
                        )
                    )

                await async_wait_until(all_done, 30, "every submitted job to complete")
        text = "\n".join(logs + failed_calls)
        assert not SHARED.search(text), text[:4000]
        assert len(submitted) > 50  # the load was real
        assert recovery < 5, f"throughput took {recovery:.1f}s to come back"
        counts = await app.store.count_by_state()
        assert counts[JobState.RUNNING] == counts[JobState.PENDING] == 0
        assert counts[JobState.FAILED] == 0
    finally:
        await admin.close()
