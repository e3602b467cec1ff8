"""`conveyor worker --metrics-port`: /metrics, /health, /ready of a real worker process."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import metricsapp
import pytest

from conveyor import Conveyor
from conveyor.observability.server import MAX_CONNECTIONS
from support import FAST_WORKER_ENV, WorkerProcess, async_wait_until, free_port, run_cli


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in Prometheus text (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Conveyor]:
    cv = Conveyor(f"sqlite:///{tmp_path / 'm.db'}")
    metricsapp.register(cv)
    async with cv:
        yield cv


def start(tmp_path: Path, db_url: str, port: int, name: str = "w", **env: str) -> WorkerProcess:
    return WorkerProcess(
        db_url,
        tmp_path / f"{name}.out",
        "metricsapp",
        CONVEYOR_METRICS_PORT=str(port),
        **{**FAST_WORKER_ENV, **env},
    )


async def get(port: int, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as c:
        return await c.request(method, f"http://127.0.0.1:{port}{path}")


async def test_worker_serves_metrics_health_and_ready(app: Conveyor, tmp_path: Path) -> None:
    port = free_port()
    w = start(tmp_path, app.settings.database_url, port)
    try:

        async def ready() -> bool:
            assert w.proc.poll() is None, w.output()
            try:
                return (await get(port, "/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await async_wait_until(ready, 20, "the worker's /ready")
        for _ in range(5):
            await app.enqueue("ok")
        failing = await app.enqueue("boom")

        async def counted() -> str | None:
            text = (await get(port, "/metrics")).text
            done = sample(text, "conveyor_jobs_processed_total", job_type="ok", status="completed")
            dead = sample(text, "conveyor_jobs_processed_total", job_type="boom", status="failed")
            return text if done == 5 and dead == 1 else None

        text = await async_wait_until(counted, 20, "5 completed and 1 dead-lettered job")
        assert (await app.store.get(failing.id)).state.value == "failed"
        # Failures by exception class: both attempts of `boom` raised BoomError.
        assert (
            sample(text, "conveyor_jobs_failed_total", job_type="boom", error_type="BoomError") == 2
        )
        assert sample(text, "conveyor_job_retries_total", job_type="boom") == 1
        assert sample(text, "conveyor_jobs_processed_total", job_type="boom", status="retried") == 1
        assert sample(text, "conveyor_job_duration_seconds_count", job_type="ok") == 5
        # Every start waited: 5 + 2 attempts of boom.
        assert sample(text, "conveyor_job_wait_seconds_count", queue="default") == 7
        assert sample(text, "conveyor_stale_lease_rejected_total") == 0
        assert text.count("conveyor_process_resident_memory_bytes") >= 1

        # The fleet gauges: this worker is the only process scraped, so it exports them.
        async def fleet() -> str | None:
            text = (await get(port, "/metrics")).text
            dlq = sample(text, "conveyor_queue_depth", queue="default", state="dlq")
            return text if dlq == 1 else None

        text = await async_wait_until(fleet, 10, "the DLQ depth gauge")
        assert sample(text, "conveyor_fleet_exporter") == 1
        assert sample(text, "conveyor_queue_depth", queue="default", state="pending") == 0
        assert sample(text, "conveyor_live_workers") == 1
        (worker,) = [x for x in await app.store.list_workers() if x.state == "running"]
        assert sample(text, "conveyor_worker_alive", worker_id=worker.id) == 1
        assert sample(text, "conveyor_worker_jobs_running", worker_id=worker.id) == 0

        health = await get(port, "/health")
        assert health.status_code == 200
        assert health.json() == {"success": True, "status": "ok", "worker_id": worker.id}
        body = (await get(port, "/ready")).json()
        assert body["status"] == "ready"
        assert body["store"] == "ok"
        assert (await get(port, "/nope")).status_code == 404
        assert (await get(port, "/metrics", "POST")).status_code == 405
        head = await get(port, "/metrics", "HEAD")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) > 0
        # A request head over 8 KiB gets 431, and the worker keeps serving.
        async with httpx.AsyncClient(timeout=5.0) as c:
            big = await c.get(f"http://127.0.0.1:{port}/metrics", headers={"X-Big": "a" * 9000})
        assert big.status_code == 431
        assert (await get(port, "/health")).status_code == 200
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()
    with pytest.raises(httpx.TransportError):
        await get(port, "/health")


async def test_a_silent_client_does_not_block_the_endpoints(app: Conveyor, tmp_path: Path) -> None:
    port = free_port()
    w = start(tmp_path, app.settings.database_url, port)
    try:

        async def up() -> bool:
            assert w.proc.poll() is None, w.output()
            try:
                return (await get(port, "/health")).status_code == 200
            except httpx.TransportError:
                return False

        await async_wait_until(up, 20, "the worker's /health")
        # More connections that send nothing than the server has slots: the probes
        # still answer, at once (the oldest idle connections make room).
        idle = [
            await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS + 8)
        ]
        try:
            for path in ("/health", "/ready", "/health"):
                began = time.perf_counter()
                assert (await get(port, path)).status_code == 200, path
                assert time.perf_counter() - began < 2.0, path
            assert (await get(port, "/metrics")).status_code == 200
        finally:
            for _reader, writer in idle:
                writer.close()
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()


def test_a_metrics_port_in_use_stops_the_worker_with_a_clear_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'busy.db'}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(db, "worker", "metricsapp", "--metrics-port", str(port), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
    assert "--metrics-port" in proc.stderr


def test_a_bad_metrics_port_is_refused(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'bad.db'}"
    proc = run_cli(db, "worker", "metricsapp", "--metrics-port", "70000", check=False)
    assert proc.returncode == 2
    assert "70000" in proc.stderr
    proc = run_cli(db, "worker", "metricsapp", check=False, CONVEYOR_METRICS_PORT="x")
    assert proc.returncode == 2
    assert "metrics-port" in proc.stderr


async def test_malformed_requests_get_400_and_the_server_goes_on(
    app: Conveyor, tmp_path: Path
) -> None:
    port = free_port()
    w = start(tmp_path, app.settings.database_url, port)
    try:

        async def up() -> bool:
            assert w.proc.poll() is None, w.output()
            try:
                return (await get(port, "/health")).status_code == 200
            except httpx.TransportError:
                return False

        await async_wait_until(up, 20, "the worker's /health")
        for raw in (b"GARBAGE\r\n\r\n", b"GET /metrics\r\n\r\n", b"\x00\xff\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400 "), (raw, answer[:80])
        # A client that connects and leaves at once.
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        assert (await get(port, "/metrics")).status_code == 200
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()
