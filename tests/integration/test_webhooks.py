"""Webhooks end to end on SQLite: a real HTTP receiver on loopback, signed
deliveries as jobs with retries, the delivery log, disabling, and the API."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import conveyor.demo
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.domain.events import WEBHOOK_DISABLED
from conveyor.domain.states import JobState
from conveyor.domain.webhooks import verify
from conveyor.settings import Settings
from support import async_wait_until, running_worker

SECRET = "an-endpoint-secret-0123456789"


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that fails its first ``fail_first`` requests
    (500), then verifies each signature and records the event."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False) -> None:
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.requests = 0
        self.received: list[dict[str, Any]] = []
        self.hosts: list[str] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    receiver.hosts.append(self.headers.get("Host", ""))
                    failing = receiver.always_fail or receiver.requests <= receiver.fail_first
                    if not failing:
                        signature = self.headers.get("X-Conveyor-Signature", "")
                        if verify(SECRET, signature, body, int(time.time())):
                            receiver.received.append(
                                {
                                    "event": orjson.loads(body),
                                    "delivery": self.headers.get("X-Conveyor-Delivery"),
                                    "type": self.headers.get("X-Conveyor-Event"),
                                }
                            )
                        else:
                            receiver.bad_signatures += 1
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    @contextlib.contextmanager
    def running(self) -> Iterator[Receiver]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def make_app(tmp_path: Path, **extra: Any) -> Conveyor:
    options: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/hooks.db",
        "poll_interval": 0.05,
        "heartbeat_interval": 0.2,
        "heartbeat_timeout": 1.0,
        "shutdown_grace": 2.0,
        "event_poll_interval": 0.02,
        "webhook_allow_private": True,  # the receiver is on loopback
        "webhook_retry_base": 0.01,
        "webhook_timeout": 5.0,
    }
    options.update(extra)
    app = Conveyor(settings=Settings(**options))
    conveyor.demo.register(app)
    return app


@pytest.fixture
async def cv(tmp_path: Path) -> AsyncIterator[Conveyor]:
    app = make_app(tmp_path)
    await app.open()
    try:
        yield app
    finally:
        await app.close()


def client(app: Conveyor) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(app))
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def test_every_event_is_delivered_signed_with_retries_logged(cv: Conveyor) -> None:
    with Receiver(fail_first=2).running() as receiver:
        async with client(cv) as http:
            resp = await http.post(
                "/api/webhooks",
                json={"url": receiver.url, "event_types": ["job_completed"], "secret": SECRET},
            )
            assert resp.status_code == 201, resp.text
            hook_id = resp.json()["webhook"]["id"]
            assert resp.json()["secret"] == SECRET
            async with running_worker(cv):
                jobs = [await cv.enqueue("test_job", {"n": i}) for i in range(10)]

                async def all_delivered() -> bool:
                    return len({r["event"]["job_id"] for r in receiver.received}) == 10

                await async_wait_until(all_delivered, 30, "10 deliveries")
            deliveries = (await http.get(f"/api/webhooks/{hook_id}/deliveries")).json()
    assert receiver.bad_signatures == 0
    assert {r["event"]["job_id"] for r in receiver.received} == {j.id for j in jobs}
    assert all(r["type"] == "job_completed" for r in receiver.received)
    assert all(r["event"]["type"] == "job_completed" for r in receiver.received)
    delivery_ids = [r["delivery"] for r in receiver.received]
    assert len(set(delivery_ids)) == len(delivery_ids) == 10  # no duplicate delivery
    log = deliveries["deliveries"]
    failed = [d for d in log if d["outcome"] == "failed"]
    assert len(failed) == 2
    assert all(d["status_code"] == 500 and d["error"] == "HTTP 500" for d in failed)
    assert all(d["attempt"] == 1 for d in failed)
    # The two failed deliveries succeeded on their second attempt, under the same delivery id.
    retried = {d["delivery_id"] for d in failed}
    second = [d for d in log if d["delivery_id"] in retried and d["outcome"] == "delivered"]
    assert sorted(d["attempt"] for d in second) == [2, 2]
    assert sum(1 for d in log if d["outcome"] == "delivered") == 10


async def create_hook(http: httpx.AsyncClient, url: str, types: list[str] | None = None) -> str:
    resp = await http.post(
        "/api/webhooks",
        json={"url": url, "event_types": types or ["job_completed"], "secret": SECRET},
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["webhook"]["id"])


async def test_an_endpoint_failing_long_enough_is_disabled(tmp_path: Path) -> None:
    app = make_app(
        tmp_path,
        webhook_disable_after=2,
        webhook_disable_after_seconds=0.3,
        webhook_max_retries=30,
    )
    async with app:
        with Receiver(always_fail=True).running() as receiver:
            async with client(app) as http:
                # One event, so one delivery job: its attempts come one after another.
                hook_id = await create_hook(http, receiver.url)
                async with running_worker(app):
                    await app.enqueue("test_job")

                    async def disabled() -> bool:
                        hook = (await http.get(f"/api/webhooks/{hook_id}")).json()["webhook"]
                        return hook["state"] == "disabled"

                    await async_wait_until(disabled, 30, "the webhook to be disabled")
                hook = (await http.get(f"/api/webhooks/{hook_id}")).json()["webhook"]
                events = (await http.get("/api/events", params={"types": WEBHOOK_DISABLED})).json()
    assert hook["disabled_reason"].startswith("no delivery succeeded for ")
    assert hook["failing_since"] is not None
    assert hook["consecutive_failures"] == receiver.requests >= 2
    assert [e["data"]["webhook_id"] for e in events["events"]] == [hook_id]


async def test_a_receiver_down_during_a_burst_is_not_disabled_and_gets_everything(
    tmp_path: Path,
) -> None:
    """Twelve failed attempts within a second, more than CONVEYOR_WEBHOOK_DISABLE_AFTER
    (3 here): the endpoint stays active and receives every event once it is back."""
    app = make_app(tmp_path, webhook_disable_after=3)
    async with app:
        with Receiver(fail_first=12).running() as receiver:
            async with client(app) as http:
                hook_id = await create_hook(http, receiver.url)
                async with running_worker(app):
                    jobs = [await app.enqueue("test_job", {"n": i}) for i in range(10)]

                    async def all_delivered() -> bool:
                        return len({r["event"]["job_id"] for r in receiver.received}) == 10

                    await async_wait_until(all_delivered, 30, "10 deliveries")
                hook = (await http.get(f"/api/webhooks/{hook_id}")).json()["webhook"]
    assert receiver.requests >= 12 + 10
    assert {r["event"]["job_id"] for r in receiver.received} == {j.id for j in jobs}
    assert hook["state"] == "active"
    assert hook["consecutive_failures"] == 0
    assert hook["last_delivered_at"] is not None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_re_enabling_delivers_the_events_missed_while_disabled(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    extra: dict[str, Any] = {}
    if backend == "postgres":
        extra["database_url"] = request.getfixturevalue("postgres_dsn")
    app = make_app(
        tmp_path,
        webhook_disable_after=2,
        webhook_disable_after_seconds=0.2,
        webhook_max_retries=30,
        **extra,
    )
    async with app:
        with Receiver(always_fail=True).running() as receiver:
            async with client(app) as http:
                hook_id = await create_hook(http, receiver.url)
                async with running_worker(app):
                    await app.enqueue("test_job", {"first": True})

                    async def state() -> str:
                        hook = (await http.get(f"/api/webhooks/{hook_id}")).json()["webhook"]
                        return str(hook["state"])

                    async def disabled() -> bool:
                        return await state() == "disabled"

                    await async_wait_until(disabled, 30, "the webhook to be disabled")
                    missed = {(await app.enqueue("test_job", {"n": i})).id for i in range(3)}

                    async def dispatched_past_them() -> bool:
                        latest = await app.store.latest_event_id()
                        counts = await app.store.count_by_state()
                        positions = await app.store.consumer_positions()
                        return counts[JobState.COMPLETED] >= 4 and positions["webhooks"] >= latest

                    await async_wait_until(dispatched_past_them, 30, "the dispatcher to pass")
                    assert receiver.received == []  # nothing reached it while disabled
                    receiver.always_fail = False
                    resp = await http.post(f"/api/webhooks/{hook_id}/enable")
                    assert resp.status_code == 200, resp.text
                    body = resp.json()
                    assert body["success"] is True
                    assert body["webhook"]["state"] == "active"
                    assert body["replayed"] == 3

                    async def missed_delivered() -> bool:
                        return {r["event"]["job_id"] for r in receiver.received} >= missed

                    await async_wait_until(missed_delivered, 30, "the missed events")
                    again = (await http.post(f"/api/webhooks/{hook_id}/enable")).json()
                unknown = await http.post("/api/webhooks/wh_nope/enable")
    assert {r["event"]["job_id"] for r in receiver.received} == missed
    assert all(r["type"] == "job_completed" for r in receiver.received)
    assert again["replayed"] == 0  # active already: nothing replayed twice
    assert unknown.status_code == 404
    assert unknown.json()["success"] is False


async def test_webhook_api_validates_and_never_shows_the_secret_again(tmp_path: Path) -> None:
    app = make_app(tmp_path, webhook_allow_private=False)
    async with app, client(app) as http:
        bad = await http.post("/api/webhooks", json={"url": "ftp://x", "event_types": ["job_*"]})
        assert bad.status_code == 400
        assert {d["field"] for d in bad.json()["details"]} == {"url"}
        typo = await http.post(
            "/api/webhooks", json={"url": "https://example.com/h", "event_types": ["job_done"]}
        )
        assert typo.status_code == 400
        assert "matches no event type" in typo.text
        loopback = await http.post(
            "/api/webhooks", json={"url": "http://127.0.0.1:9/h", "event_types": ["job_*"]}
        )
        assert loopback.status_code == 400
        assert "private or internal address" in loopback.text
        short = await http.post(
            "/api/webhooks",
            json={"url": "http://127.0.0.1:9/h", "event_types": ["job_*"], "secret": "short"},
        )
        assert short.status_code == 400
        assert await app.store.list_webhooks() == []  # nothing was created

    app2 = make_app(tmp_path / "ok")
    (tmp_path / "ok").mkdir()
    async with app2, client(app2) as http:
        created = await http.post(
            "/api/webhooks", json={"url": "http://127.0.0.1:9/h", "event_types": ["job_failed"]}
        )
        assert created.status_code == 201
        body = created.json()
        assert len(body["secret"]) >= 32  # generated
        hook_id = body["webhook"]["id"]
        listed = (await http.get("/api/webhooks")).json()["webhooks"]
        assert [w["id"] for w in listed] == [hook_id]
        assert "secret" not in listed[0]
        assert "secret" not in (await http.get(f"/api/webhooks/{hook_id}")).json()["webhook"]
        assert (await http.delete(f"/api/webhooks/{hook_id}")).status_code == 200
        assert (await http.get(f"/api/webhooks/{hook_id}")).status_code == 404
        assert (await http.delete(f"/api/webhooks/{hook_id}")).status_code == 404
        assert (await http.get(f"/api/webhooks/{hook_id}/deliveries")).status_code == 404


class FlippingResolver:
    """A DNS stand-in whose answer changes with every lookup (DNS rebinding):
    answer ``i`` for the ``i``-th lookup, the last one from then on."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]


async def deliver_once(app: Conveyor, url: str) -> dict[str, Any]:
    """Create an endpoint for ``url`` straight in the store (its host resolves only
    through the test's resolver), run one job, and return the delivery attempt."""
    from conveyor.domain.webhooks import Webhook

    hook = Webhook(
        id="wh_target",
        url=url,
        event_types=("job_completed",),
        secret=SECRET,
        created_at=app.now(),
    )
    await app.store.create_webhook(hook)
    async with running_worker(app):
        await app.enqueue("test_job")

        async def attempted() -> list[Any]:
            return await app.store.list_deliveries(hook.id, 10)

        attempts = await async_wait_until(attempted, 30, "a delivery attempt")
    a = attempts[0]
    return {"outcome": a.outcome.value, "error": a.error, "status": a.status_code}


async def test_a_rebound_name_never_reaches_the_internal_address(tmp_path: Path) -> None:
    """The check's lookup says public, any later lookup says 127.0.0.1, where a
    receiver listens: the delivery goes to the checked public address, never to
    the receiver (that address is unroutable from here or times out)."""
    app = make_app(
        tmp_path, webhook_allow_private=False, webhook_timeout=0.5, webhook_max_retries=0
    )
    resolver = FlippingResolver(["1.1.1.1"], ["127.0.0.1"])
    app.webhooks.resolver = resolver
    async with app:
        with Receiver().running() as receiver:
            attempt = await deliver_once(app, f"http://rebind.example.test:{receiver.port}/hook")
    assert receiver.requests == 0
    assert resolver.lookups == ["rebind.example.test"]  # one lookup: checked = connected
    assert attempt["outcome"] == "failed"
    assert attempt["status"] is None
    assert not attempt["error"].startswith("refused")  # the public answer passed the check


async def test_every_address_of_the_name_is_checked(tmp_path: Path) -> None:
    app = make_app(tmp_path, webhook_allow_private=False, webhook_max_retries=0)
    app.webhooks.resolver = FlippingResolver(["1.1.1.1", "127.0.0.1"])
    async with app:
        with Receiver().running() as receiver:
            attempt = await deliver_once(app, f"http://mixed.example.test:{receiver.port}/hook")
    assert receiver.requests == 0
    assert attempt["outcome"] == "failed"
    assert attempt["error"].startswith("refused: 'mixed.example.test' resolves to 127.0.0.1")


async def test_the_connection_goes_to_the_resolved_address_under_the_name(
    tmp_path: Path,
) -> None:
    """With private addresses allowed, the name resolved by the sender's resolver
    is where the request lands, and the receiver still sees the name as Host."""
    app = make_app(tmp_path, webhook_allow_private=True)
    resolver = FlippingResolver(["127.0.0.1"])
    app.webhooks.resolver = resolver
    async with app:
        with Receiver().running() as receiver:
            attempt = await deliver_once(app, f"http://hooks.example.test:{receiver.port}/hook")
    assert attempt["outcome"] == "delivered"
    assert receiver.hosts == [f"hooks.example.test:{receiver.port}"]
    assert resolver.lookups == ["hooks.example.test"]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``hooks.example.test`` and its key."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=hooks.example.test",
         "-addext", "subjectAltName=DNS:hooks.example.test"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(
    ("name", "delivered"), [("hooks.example.test", True), ("other.example.test", False)]
)
async def test_https_verifies_the_name_on_the_pinned_address(
    tmp_path: Path, tls_files: tuple[Path, Path], name: str, delivered: bool
) -> None:
    """Connected to the resolved address, TLS still speaks to the name: SNI carries
    it and the certificate must match it (one for another name is refused)."""
    import ssl

    cert, key = tls_files
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    server_names: list[str | None] = []

    def record_sni(_sock: object, sni: str | None, _ctx: object) -> None:
        server_names.append(sni)

    server_side.sni_callback = record_sni  # type: ignore[assignment]
    app = make_app(tmp_path, webhook_allow_private=True, webhook_max_retries=0)
    app.webhooks.resolver = FlippingResolver(["127.0.0.1"])
    app.webhooks.ssl_context = ssl.create_default_context(cafile=str(cert))
    async with app:
        receiver = Receiver()
        receiver.server.socket = server_side.wrap_socket(receiver.server.socket, server_side=True)
        with receiver.running():
            attempt = await deliver_once(app, f"https://{name}:{receiver.port}/hook")
    assert server_names == [name]
    if delivered:
        assert attempt["outcome"] == "delivered"
        assert receiver.hosts == [f"{name}:{receiver.port}"]
    else:
        assert attempt["outcome"] == "failed"
        assert "certificate" in attempt["error"].lower()
        assert receiver.requests == 0
