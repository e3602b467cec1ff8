"""The worker's endpoint server keeps /health and /ready answerable: idle and slow
connections can't take every slot, and a full server answers 503 at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from conveyor.observability import server as srv
from conveyor.observability.server import EndpointServer, Reply

#: Seconds a probe may take to be answered in these tests (it takes ~1 ms).
DEADLINE = 1.0


class Routes:
    """/health, /ready and /metrics; /metrics (and /ready while ``ready_gate`` is
    set) wait for their gate, as a scrape stuck on a slow store would."""

    def __init__(self) -> None:
        self.metrics_gate = asyncio.Event()
        self.ready_gate: asyncio.Event | None = None
        self.metrics_waiting = 0
        self.ready_waiting = 0

    async def health(self) -> Reply:
        return Reply.json(200, {"status": "ok"})

    async def ready(self) -> Reply:
        if self.ready_gate is not None:
            self.ready_waiting += 1
            await self.ready_gate.wait()
        return Reply.json(200, {"status": "ready"})

    async def metrics(self) -> Reply:
        self.metrics_waiting += 1
        await self.metrics_gate.wait()
        return Reply(200, srv.PROMETHEUS_TEXT, b"conveyor_up 1\n")


@pytest.fixture
async def served() -> AsyncIterator[tuple[EndpointServer, Routes]]:
    routes = Routes()
    server = EndpointServer(
        {"/metrics": routes.metrics, "/health": routes.health, "/ready": routes.ready},
        host="127.0.0.1",
        port=0,
    )
    await server.start()
    try:
        yield server, routes
    finally:
        routes.metrics_gate.set()
        if routes.ready_gate is not None:
            routes.ready_gate.set()
        await server.close()


async def send(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    try:
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer.split(b" ", 2)[1])


async def get(port: int, path: str) -> int:
    """Status of GET ``path``, answered within ``DEADLINE``."""
    began = time.perf_counter()
    status = await status_of(*await send(port, path))
    assert time.perf_counter() - began < DEADLINE, path
    return status


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)  # wait-ok: polls the server's own counters


async def test_probes_answer_with_more_idle_connections_than_slots(
    served: tuple[EndpointServer, Routes],
) -> None:
    server, _ = served
    port = server.bound_port
    idle = [
        await asyncio.open_connection("127.0.0.1", port) for _ in range(srv.MAX_CONNECTIONS + 8)
    ]
    try:
        await until(lambda: server.connections == srv.MAX_CONNECTIONS, "the slots filled")
        for path in ("/health", "/ready", "/health"):
            assert (await get(port, path), path) == (200, path)
        # The newcomers pushed the oldest idle connections out: they read end of file.
        assert await asyncio.wait_for(idle[0][0].read(), DEADLINE) == b""
        assert server.connections <= srv.MAX_CONNECTIONS
    finally:
        for _, writer in idle:
            writer.close()


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    served: tuple[EndpointServer, Routes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(srv, "IDLE_TIMEOUT", 0.2)
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    try:
        began = time.perf_counter()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.15 < time.perf_counter() - began < 2.0
        await until(lambda: server.connections == 0, "the slot freed")
    finally:
        writer.close()


async def test_slow_scrapes_leave_the_probe_slots_free_and_the_next_gets_503(
    served: tuple[EndpointServer, Routes],
) -> None:
    server, routes = served
    port = server.bound_port
    scrape_slots = srv.MAX_CONNECTIONS - srv.PROBE_SLOTS
    scrapes = [await send(port, "/metrics") for _ in range(scrape_slots)]
    await until(lambda: routes.metrics_waiting == scrape_slots, "the scrapes in their handler")
    assert await get(port, "/metrics") == 503  # answered at once, not queued
    for path in ("/health", "/ready"):
        assert await get(port, path) == 200
    routes.metrics_gate.set()
    assert [await status_of(*s) for s in scrapes] == [200] * scrape_slots
    assert await get(port, "/metrics") == 200


async def test_with_every_slot_busy_health_still_answers_and_others_get_503(
    served: tuple[EndpointServer, Routes],
) -> None:
    server, routes = served
    port = server.bound_port
    routes.ready_gate = asyncio.Event()
    scrape_slots = srv.MAX_CONNECTIONS - srv.PROBE_SLOTS
    held = [await send(port, "/metrics") for _ in range(scrape_slots)]
    held += [await send(port, "/ready") for _ in range(srv.PROBE_SLOTS)]
    await until(
        lambda: routes.metrics_waiting == scrape_slots and routes.ready_waiting == srv.PROBE_SLOTS,
        "every slot answering",
    )
    assert server.connections == srv.MAX_CONNECTIONS
    assert await get(port, "/health") == 200  # liveness: the process is alive
    for path in ("/ready", "/metrics"):
        assert await get(port, path) == 503
    routes.metrics_gate.set()
    routes.ready_gate.set()
    assert [await status_of(*h) for h in held] == [200] * srv.MAX_CONNECTIONS
    await until(lambda: server.connections == 0, "every slot freed")
