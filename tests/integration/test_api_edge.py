"""The API's edge against hostile or broken input (issue 10, kinds 7 and 8).

Errors are cheap, small and carry no secret; a full or locked store answers 503
without paths; a web page cannot drive a keyless local server (Host allow-list,
Origin check, JSON-only bodies); WebSocket keys are re-checked and binary
frames closed with 1003; a 405 names every allowed method. Real SQLite files,
real uvicorn servers and real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import structlog
import websockets
from fastapi import FastAPI, Request
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

import conveyor.demo
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.domain.job import Finish
from conveyor.domain.states import Action, JobState
from conveyor.observability.logging import configure_logging
from conveyor.security.api_keys import new_api_key
from conveyor.settings import Settings
from pg import PostgresServer
from support import ServedApi, async_wait_until


def settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path}/edge.db",
        poll_interval=0.05,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        shutdown_grace=2.0,
        event_poll_interval=0.02,
        **extra,
    )


@pytest.fixture
async def cv(tmp_path: Path) -> AsyncIterator[Conveyor]:
    app = Conveyor(settings=settings(tmp_path))
    conveyor.demo.register(app)
    await app.open()
    try:
        yield app
    finally:
        await app.close()


def client(api: FastAPI, host: str = "localhost") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=f"http://{host}")


async def add_key(cv: Conveyor, scope: str) -> tuple[str, str]:
    key, record = new_api_key(f"{scope}-key", scope, cv.now())
    await cv.store.create_api_key(record)
    return key, record.id


async def failed_job(cv: Conveyor) -> str:
    queue = f"q{secrets.token_hex(4)}"  # its own queue: the fetch below leases this job
    job = await cv.enqueue("test_job", {}, queue=queue)
    (leased,) = await cv.store.fetch("w1", queues=[queue], job_types=[], limit=1, now=cv.now())
    assert leased.id == job.id
    assert leased.lease_token is not None
    (ok,) = await cv.store.finish_many(
        [Finish(job.id, leased.lease_token, Action.FAIL, error="boom", job_type="test_job")],
        cv.now(),
    )
    assert ok
    return job.id


# -- kind 7: errors are cheap, small and never carry secrets ----------------------------------
SECRET_LOCAL = "local-value-" + "z" * 200  # a local variable no log may show


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Conveyor's logging (as `conveyor up` sets it) into a buffer; restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def with_failing_route(api: FastAPI) -> FastAPI:
    """A route that fails the way a bug would: with the request (and its key) and a
    large value among its local variables."""

    @api.get("/api/boom")
    async def boom(request: Request) -> None:
        headers = dict(request.headers)  # holds the Authorization header
        big = {f"k{i}": SECRET_LOCAL for i in range(500)}
        raise RuntimeError(f"unexpected: {len(headers)} headers, {len(big)} entries")

    return api


async def test_unexpected_errors_cost_milliseconds_and_log_a_small_plain_traceback(
    cv: Conveyor, log_stream: io.StringIO
) -> None:
    key, _ = await add_key(cv, "admin")
    api = with_failing_route(create_app(cv))
    async with ServedApi(api) as served, httpx.AsyncClient(base_url=served.url) as http:
        headers = {"Authorization": f"Bearer {key}"}
        start = time.perf_counter()
        errors = asyncio.gather(*(http.get("/api/boom", headers=headers) for _ in range(10)))
        health = await http.get("/health")  # the event loop stays free meanwhile
        health_latency = time.perf_counter() - start
        responses = await errors
        total = time.perf_counter() - start
    assert health.status_code == 200
    for resp in responses:
        assert resp.status_code == 500
        body = resp.json()
        assert body["success"] is False
        assert "reference" in body["error"]
        assert key not in resp.text
    assert total < 2.0, f"ten 500s took {total:.2f}s"
    assert health_latency < 1.0, f"/health took {health_latency:.2f}s during ten 500s"
    log = log_stream.getvalue()
    assert log.count("api_unexpected_error") == 10  # once each, not again by uvicorn
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: unexpected" in log
    assert key not in log
    assert SECRET_LOCAL not in log  # no local variables
    assert len(log) < 10 * 10_000, f"{len(log)} characters of log for ten errors"


async def test_an_application_logging_setup_cannot_make_a_500_render_locals(
    cv: Conveyor, capsys: pytest.CaptureFixture[str]
) -> None:
    # structlog's defaults (rich tracebacks with locals) when the embedding
    # application did not configure logging: the API formats its traceback itself.
    structlog.reset_defaults()
    key, _ = await add_key(cv, "read")
    async with client(with_failing_route(create_app(cv))) as c:
        start = time.perf_counter()
        resp = await c.get("/api/boom", headers={"Authorization": f"Bearer {key}"})
        elapsed = time.perf_counter() - start
    assert resp.status_code == 500
    out = capsys.readouterr()
    log = out.out + out.err
    assert "api_unexpected_error" in log
    assert key not in log
    assert SECRET_LOCAL not in log
    assert elapsed < 0.5, f"one 500 took {elapsed:.2f}s"


async def test_a_full_database_answers_503_with_retry_after_and_no_path(
    cv: Conveyor, tmp_path: Path
) -> None:
    store: Any = cv.store

    def limit_pages(extra: int | None) -> None:
        # SQLite's own page limit: the same SQLITE_FULL a full disk gives.
        count = store._conn.execute("PRAGMA page_count").fetchone()[0]
        limit = 1_073_741_823 if extra is None else count + extra
        store._conn.execute(f"PRAGMA max_page_count = {limit}")

    async with client(create_app(cv)) as c:
        await store._run(limit_pages, 0)
        payload = {"blob": "x" * 200_000}
        resp = await c.post("/api/jobs", json={"job_type": "test_job", "payload": payload})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"].isdigit()
        body = resp.json()
        assert body["success"] is False
        assert "full" in body["error"]
        assert str(tmp_path) not in resp.text
        assert "edge.db" not in resp.text
        # Space again: the next write succeeds (the failed commit left no open transaction).
        await store._run(limit_pages, None)
        resp = await c.post("/api/jobs", json={"job_type": "test_job", "payload": payload})
        assert resp.status_code == 201, resp.text


async def test_a_locked_database_answers_503_and_a_store_bug_500_without_path(
    tmp_path: Path,
) -> None:
    from conveyor.storage.sqlite import SQLiteStore

    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout_ms=50)
    app = Conveyor(settings=settings(tmp_path), store=store)
    conveyor.demo.register(app)
    await app.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        async with client(create_app(app)) as c:
            other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
            resp = await c.post("/api/jobs", json={"job_type": "test_job", "payload": {}})
            other.execute("ROLLBACK")
            assert resp.status_code == 503, resp.text
            assert "retry-after" in resp.headers
            assert str(tmp_path) not in resp.text

            other.execute("DROP TABLE api_keys")  # a broken schema: a bug, not an outage
            resp = await c.get("/api/jobs", headers={"Authorization": "Bearer cvk_00_x"})
            assert resp.status_code == 500, resp.text
            assert "reference" in resp.json()["error"]
            assert str(tmp_path) not in resp.text
            assert "api_keys" not in resp.text  # the store's message stays in the log
    finally:
        other.close()
        await app.close()


# -- kind 8: a browser cannot drive a keyless local server --------------------------------------
@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "127.0.0.2"]
)
async def test_loopback_hosts_are_served(cv: Conveyor, host: str) -> None:
    async with client(create_app(cv), host) as c:
        resp = await c.get("/api/jobs")
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example"])
async def test_a_foreign_host_is_refused_in_keyless_loopback_mode(cv: Conveyor, host: str) -> None:
    job = await cv.enqueue("test_job", {})
    async with client(create_app(cv), host) as c:
        for resp in (
            await c.get("/api/jobs"),
            await c.get("/health"),
            await c.delete(f"/api/jobs/{job.id}"),
        ):
            assert resp.status_code == 421, resp.text
            assert "CONVEYOR_ALLOWED_HOSTS" in resp.json()["error"]
    assert (await cv.store.get(job.id)).status == "pending"


async def test_configured_host_names_are_served(tmp_path: Path) -> None:
    app = Conveyor(
        settings=settings(tmp_path, allowed_hosts=("conveyor.internal", ".corp.example"))
    )
    await app.open()
    try:
        api = create_app(app)
        for host, status in [
            ("conveyor.internal:8000", 200),
            ("api.corp.example", 200),
            ("corp.example.evil", 421),
            ("evil.example", 421),
        ]:
            async with client(api, host) as c:
                assert (await c.get("/api/jobs")).status_code == status, host
    finally:
        await app.close()


def test_allowed_hosts_is_read_from_the_environment() -> None:
    s = Settings.from_env({"CONVEYOR_ALLOWED_HOSTS": "a.example, .b.example"})
    assert s.allowed_hosts == ("a.example", ".b.example")


async def test_a_keyed_server_on_a_public_address_does_not_check_the_host(cv: Conveyor) -> None:
    # allow_anonymous=False is how `conveyor up --host 0.0.0.0` builds the API: keys
    # protect it, and a proxy may reach it under any name.
    key, _ = await add_key(cv, "read")
    async with client(create_app(cv, allow_anonymous=False), "jobs.example.com") as c:
        assert (await c.get("/api/jobs")).status_code == 401
        resp = await c.get("/api/jobs", headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200


async def test_a_cross_site_form_or_text_post_cannot_retry_the_dlq(cv: Conveyor) -> None:
    job_id = await failed_job(cv)
    async with client(create_app(cv)) as c:
        for headers in (
            {"content-type": "text/plain"},
            {"content-type": "application/x-www-form-urlencoded"},
            {"content-type": "multipart/form-data; boundary=x"},
        ):
            resp = await c.post("/api/dlq/retry-all", content=b"x=1", headers=headers)
            assert resp.status_code == 415, resp.text
            assert "Content-Type: application/json" in resp.json()["error"]
        # A body without any Content-Type is refused too.
        resp = await c.post(f"/api/dlq/{job_id}/retry", content=b"{}")
        assert resp.status_code == 415, resp.text
        # A JSON request from another site's page: its Origin gives it away.
        resp = await c.post(
            "/api/dlq/retry-all",
            json={},
            headers={"origin": "http://evil.example"},
        )
        assert resp.status_code == 403, resp.text
        assert "evil.example" in resp.json()["error"]
        resp = await c.delete(f"/api/jobs/{job_id}", headers={"origin": "null"})
        assert resp.status_code == 403, resp.text
        assert (await cv.store.get(job_id)).status == JobState.FAILED.value

        # What a CLI or script sends still works: no body, or JSON; from the API's own
        # origin (its /docs page) or a local one.
        resp = await c.post(f"/api/jobs/{job_id}/retry")
        assert resp.status_code == 200, resp.text
        job_id = await failed_job(cv)
        resp = await c.post(
            "/api/dlq/retry-all",
            headers={"content-type": "application/json", "origin": "http://localhost"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["retried"] == 1
        resp = await c.post(
            "/api/jobs",
            json={"job_type": "test_job", "payload": {}},
            headers={"origin": "http://127.0.0.1:3000"},
        )
        assert resp.status_code == 201, resp.text
        resp = await c.post(
            "/api/jobs",
            content=b'{"job_type": "test_job", "payload": {}}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert resp.status_code == 201, resp.text
        # Reads are not state-changing: an Origin does not matter to them.
        resp = await c.get("/api/jobs", headers={"origin": "http://evil.example"})
        assert resp.status_code == 200


async def test_405_lists_every_allowed_method(cv: Conveyor) -> None:
    async with client(create_app(cv)) as c:
        for method, path, allowed in [
            ("PUT", "/api/jobs", "GET, POST"),
            ("PATCH", "/api/jobs/j_1", "DELETE, GET"),
            ("PUT", "/api/jobs/metrics", "GET"),
            ("GET", "/api/dlq/retry-all", "POST"),
            ("PUT", "/api/webhooks/wh_1", "DELETE, GET"),
        ]:
            resp = await c.request(method, path, json={} if method != "GET" else None)
            assert resp.status_code == 405, (method, path, resp.text)
            assert resp.headers["allow"] == allowed, (method, path)
            assert allowed in resp.json()["error"]


# -- the WebSocket -------------------------------------------------------------------------------
async def test_the_websocket_refuses_a_foreign_origin_or_host(cv: Conveyor) -> None:
    async with ServedApi(create_app(cv)) as served:
        url = f"{served.ws_url}/api/events/ws"
        rebound = f"ws://evil.example:{served.port}/api/events/ws"  # DNS rebinding
        for target, kwargs in (
            (url, {"origin": "http://evil.example"}),
            (url, {"origin": "null"}),
            (url, {"origin": "http://localhost.evil.example"}),
            (rebound, {"host": "127.0.0.1", "port": served.port}),
            (url, {"additional_headers": {"Host": "evil.example"}}),  # a second Host header
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(target, **kwargs):
                    pass
            assert refused.value.response.status_code == 403, kwargs
        for origin in ("http://localhost:3000", f"http://127.0.0.1:{served.port}"):
            async with websockets.connect(url, origin=Origin(origin)) as ws:
                await ws.send("ping")
                assert orjson.loads(await ws.recv()) == {"type": "pong"}


async def test_a_binary_frame_closes_the_websocket_with_1003(cv: Conveyor) -> None:
    async with ServedApi(create_app(cv)) as served:
        async with websockets.connect(f"{served.ws_url}/api/events/ws") as ws:
            await ws.send(b"\x00\x01")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1003
        assert "binary" in closed.value.rcvd.reason


async def read_until_closed(ws: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            await ws.recv()


async def test_a_revoked_keys_websocket_is_closed(cv: Conveyor) -> None:
    key, key_id = await add_key(cv, "read")
    other, _ = await add_key(cv, "read")
    async with ServedApi(create_app(cv)) as served:
        url = f"{served.ws_url}/api/events/ws"
        revoked_ws = await websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {key}"}
        )
        kept_ws = await websockets.connect(f"{url}?token={other}")
        try:
            for ws in (revoked_ws, kept_ws):
                await ws.send("ping")
                assert orjson.loads(await ws.recv()) == {"type": "pong"}
            # Revoked the way `conveyor keys revoke` does it: in the store, from outside.
            await cv.store.revoke_api_key(key_id, cv.now())
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                await read_until_closed(revoked_ws, 15)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4401
            assert "revoked" in closed.value.rcvd.reason
            assert time.monotonic() - started < 10
            # The other key's socket still streams.
            await cv.enqueue("test_job", {})
            frame = orjson.loads(await asyncio.wait_for(kept_ws.recv(), 10))
            assert frame[0]["type"] == "job_submitted"
        finally:
            await revoked_ws.close()
            await kept_ws.close()


async def test_the_query_token_is_for_the_websocket_only(cv: Conveyor) -> None:
    key, _ = await add_key(cv, "admin")
    async with ServedApi(create_app(cv)) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            resp = await http.get(f"/api/jobs?token={key}")
            assert resp.status_code == 401
            assert "Authorization: Bearer" in resp.json()["error"]
        async with websockets.connect(f"{served.ws_url}/api/events/ws?token={key}") as ws:
            await ws.send("ping")
            assert orjson.loads(await ws.recv()) == {"type": "pong"}


async def test_a_read_only_postgresql_answers_503_and_recovers(
    pg_server: PostgresServer, postgres_dsn: str
) -> None:
    # A database that refuses writes (a standby, or one an operator set read-only to
    # stop a disk from filling): "retry later", not a bug, and never the DSN.
    app = Conveyor(settings=Settings(database_url=postgres_dsn))
    conveyor.demo.register(app)
    await app.open()
    db = postgres_dsn.rsplit("/", 1)[1]

    def reconnect_all() -> None:
        pg_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{db}' AND pid <> pg_backend_pid()"
        )

    async def submit(c: httpx.AsyncClient) -> httpx.Response:
        return await c.post("/api/jobs", json={"job_type": "test_job", "payload": {}})

    answers: list[httpx.Response] = []
    try:
        async with client(create_app(app)) as c:
            pg_server.execute(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
            reconnect_all()

            async def refused_read_only() -> bool:
                resp = await submit(c)
                answers.append(resp)
                return resp.status_code == 503 and "read-only" in resp.json()["error"]

            await async_wait_until(refused_read_only, 20, "a read-only 503")
            for resp in answers:
                assert resp.status_code in (201, 503), resp.text
                if resp.status_code == 503:
                    assert resp.headers["retry-after"].isdigit()
                    assert "postgresql://" not in resp.text
                    assert db not in resp.text

            pg_server.execute(f"ALTER DATABASE {db} RESET default_transaction_read_only")
            reconnect_all()

            async def accepted() -> bool:
                return (await submit(c)).status_code == 201

            await async_wait_until(accepted, 20, "writes to be accepted again")
    finally:
        pg_server.execute(f"ALTER DATABASE {db} RESET default_transaction_read_only")
        await app.close()


async def test_the_docs_pages_load_their_assets_from_the_server_not_a_cdn(tmp_path):
    app = Conveyor(settings=Settings(database_url=f"sqlite:///{tmp_path}/d.db"))
    transport = httpx.ASGITransport(app=create_app(app), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        for page in ("/docs", "/redoc"):
            html = (await c.get(page)).text
            assert "cdn" not in html.lower(), page
            assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
            assert assets, page
            for asset in assets:
                resp = await c.get(asset)
                assert resp.status_code == 200, asset
                assert len(resp.content) > 1000, asset
    await app.close()
