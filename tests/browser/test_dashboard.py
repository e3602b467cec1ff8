"""The dashboard in a real browser: headless Chromium (Debian's, never a
downloaded one) driven by Playwright, against a real ``conveyor up`` process.

Screenshots of every page land in ``artifacts/screenshots/`` (gitignored);
docs/img holds copies of the main ones.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import ROOT, TESTS, conveyor_cmd, conveyor_env, run_cli, wait_until

playwright = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

CHROMIUM = os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "artifacts" / "screenshots"
FAST = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.2",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "1.0",
    "CONVEYOR_POLL_INTERVAL": "0.05",
    "CONVEYOR_WEBHOOK_ALLOW_PRIVATE": "true",
    "CONVEYOR_WEBHOOK_MAX_RETRIES": "0",
}
PERMANENT = {"permanent": True}  # the demo type `fail`: to the DLQ at once
WAIT = 15_000  # ms: the longest any expectation below polls

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
    pytest.mark.timeout(180),
]
expect.set_options(timeout=WAIT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    """A ``conveyor up --app dashapp`` subprocess; ``port`` to reuse one,
    ``extra``: more environment variables."""

    def __init__(self, db: str, log: Path, port: int | None = None, **extra: str) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._fh = log.open("a")
        self.log = log
        env = conveyor_env(db, **{**FAST, **extra})
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "browser"), env["PYTHONPATH"]])
        self.proc = subprocess.Popen(
            conveyor_cmd("up", "--port", str(self.port), "--app", "dashapp"),
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._healthy, 30, f"conveyor up on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"conveyor up exited:\n{self.log.read_text()}")
        try:
            return httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past 20 s; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()


def api(base: str, method: str, path: str, key: str | None = None, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.request(method, base + path, headers=headers, timeout=10, **kw)
    assert r.status_code < 400, r.text
    return r.json()


def submit(base: str, job_type: str, key: str | None = None, **fields: Any) -> str:
    fields.setdefault("payload", {})
    return str(api(base, "POST", "/api/jobs", key, json={"job_type": job_type, **fields})["job_id"])


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def servers() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for s in started:
        s.stop()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dash.db'}"


class Watched:
    """A page with its console errors collected."""

    def __init__(self, browser: Browser, **options: Any) -> None:
        self.context = browser.new_context(**options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())

    def open(self, url: str, *, live: bool = True) -> Page:
        self.page.goto(url)
        if live:
            expect(self.page.locator("#conn")).to_have_attribute("data-state", "live")
        return self.page

    def close(self) -> None:
        self.context.close()


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def count_of(page: Page, state: str) -> int:
    text = page.locator(f"[data-count={state}]").inner_text()
    return int(re.sub(r"[^0-9]", "", text) or 0)


# -- scenarios ------------------------------------------------------------------------------
def test_every_page_loads_without_console_errors(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    done = submit(up.base, "ok", payload={"n": 7})
    submit(up.base, "fail", payload=PERMANENT)
    parent = submit(up.base, "ok", payload={"n": 1}, scheduled_at=later(3600))
    submit(up.base, "ok", depends_on=[parent])
    wf = api(
        up.base,
        "POST",
        "/api/workflows",
        json={
            "name": "etl",
            "steps": [
                {"name": "extract", "job_type": "ok"},
                {"name": "clean", "job_type": "ok", "depends_on": ["extract"]},
                {
                    "name": "enrich",
                    "job_type": "fail",
                    "payload": PERMANENT,
                    "depends_on": ["extract"],
                },
                {"name": "load", "job_type": "ok", "depends_on": ["clean", "enrich"]},
            ],
        },
    )["workflow_id"]
    hook = api(
        up.base,
        "POST",
        "/api/webhooks",
        json={"url": f"http://127.0.0.1:{free_port()}/hook", "event_types": ["job_failed"]},
    )["webhook"]["id"]
    wait_until(
        lambda: api(up.base, "GET", f"/api/workflows/{wf}")["workflow"]["status"] == "failed",
        20,
        "the workflow to fail",
    )
    pages = {
        "overview": "/",
        "jobs": "/ui/jobs",
        "job": f"/ui/jobs/{done}",
        "job-blocked": f"/ui/jobs/{parent}",
        "queues": "/ui/queues",
        "workers": "/ui/workers",
        "dlq": "/ui/dlq",
        "workflows": "/ui/workflows",
        "workflow": f"/ui/workflows/{wf}",
        "webhooks": "/ui/webhooks",
        "webhook": f"/ui/webhooks/{hook}",
        "schedules": "/ui/schedules",
        "locks": "/ui/locks",
    }
    w = Watched(browser, viewport={"width": 1280, "height": 900})
    for name, path in pages.items():
        page = w.open(up.base + path, live=name != "locks")
        expect(page.locator("h1")).to_be_visible()
        assert page.locator("main h1").count() == 1
        shot(page, name)
    page = w.open(up.base + f"/ui/workflows/{wf}")
    expect(page.locator("svg rect.node")).to_have_count(4)
    expect(page.locator("svg rect.node.s-failed")).to_have_count(1)
    w.close()
    narrow = Watched(browser, viewport={"width": 390, "height": 800}, color_scheme="dark")
    shot(narrow.open(up.base + "/"), "overview-narrow-dark")
    shot(narrow.open(up.base + "/ui/jobs"), "jobs-narrow-dark")
    narrow.close()
    assert w.errors == []
    assert narrow.errors == []


def test_jobs_overview_and_dlq_update_live(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    jobs_view = Watched(browser)
    jobs = jobs_view.open(up.base + "/ui/jobs")
    overview_view = Watched(browser)
    overview = overview_view.open(up.base + "/")
    completed_before = count_of(overview, "completed")

    job_id = submit(up.base, "ok", payload={"n": 1}, scheduled_at=later(2))
    row = jobs.locator(f"tr[data-job='{job_id}'] [data-state]")
    expect(row).to_have_text("pending")  # appeared without a reload
    expect(row).to_have_text("completed")
    expect(overview.locator("[data-count=completed]")).to_have_text(str(completed_before + 1))

    dlq_view = Watched(browser)
    dlq = dlq_view.open(up.base + "/ui/dlq")
    failing = submit(up.base, "fail", payload=PERMANENT)
    retry = dlq.locator(f"tr[data-job='{failing}'] button", has_text="Retry")
    expect(retry).to_be_visible()  # reached the DLQ live
    shot(dlq, "dlq-live")
    retry.click()
    expect(dlq.locator("#flash")).to_contain_text("1 done")
    wait_until(
        lambda: len(api(up.base, "GET", f"/api/jobs/{failing}")["job"]["executions"]) == 2,
        20,
        "the retried job to run again",
    )
    for view in (jobs_view, overview_view, dlq_view):
        assert view.errors == []
        view.close()


def test_cancel_from_the_job_page(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    job_id = submit(up.base, "ok", scheduled_at=later(3600))
    view = Watched(browser)
    page = view.open(up.base + f"/ui/jobs/{job_id}")
    expect(page.locator("h1 .badge")).to_have_text("pending")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("h1 .badge")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    assert api(up.base, "GET", f"/api/jobs/{job_id}")["job"]["status"] == "cancelled"
    assert view.errors == []
    view.close()


def test_login_read_key_and_csrf(browser, servers, db, tmp_path):
    def key(scope: str) -> str:
        out = run_cli(db, "keys", "create", "--scope", scope, "--name", scope)
        return out.stdout.strip().splitlines()[-1]

    admin, read = key("admin"), key("read")
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    failed = submit(up.base, "fail", admin, payload=PERMANENT)
    wait_until(
        lambda: api(up.base, "GET", f"/api/jobs/{failed}", admin)["job"]["status"] == "failed",
        20,
        "the job to fail",
    )

    view = Watched(browser)
    page = view.page
    page.goto(up.base + "/ui/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login"))
    shot(page, "login")
    page.get_by_label("API key").fill("cvk_not_a_key")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("[data-login-error]")).to_contain_text("Invalid")
    assert [e for e in view.errors if "401" not in e] == []  # the refused login's own 401
    view.errors.clear()
    page.get_by_label("API key").fill(read)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs$"))
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")  # cookie on the WS
    expect(page.locator(f"tr[data-job='{failed}']")).to_be_visible()
    assert page.locator("button[data-bulk-action]").count() == 0
    assert page.locator("input[name=ids]").count() == 0
    page.goto(up.base + "/ui/dlq")
    expect(page.locator(f"tr[data-job='{failed}']")).to_be_visible()
    assert page.locator("button[data-action]").count() == 0
    shot(page, "dlq-read-key")
    cookie = next(c for c in view.context.cookies() if c["name"] == "conveyor_session")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert read not in cookie["value"]

    # A forged POST without the CSRF token, and a read key with it: both refused.
    url = up.base + "/ui/actions/jobs/retry"
    forged = page.request.post(url, data={"ids": [failed]})
    assert forged.status == 403
    assert "CSRF" in forged.json()["error"]
    token = page.locator("body").get_attribute("data-csrf")
    scoped = page.request.post(url, data={"ids": [failed]}, headers={"X-CSRF-Token": token})
    assert scoped.status == 403
    assert "scope" in scoped.json()["error"]
    assert api(up.base, "GET", f"/api/jobs/{failed}", admin)["job"]["status"] == "failed"

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/ui/login"))
    page.get_by_label("API key").fill(admin)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(up.base + "/")
    page.goto(up.base + "/ui/dlq")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    page.locator(f"tr[data-job='{failed}'] button", has_text="Retry").click()
    expect(page.locator("#flash")).to_contain_text("1 done")
    assert view.errors == [], view.errors
    view.close()


def test_websocket_reconnects_after_a_restart(browser, servers, db, tmp_path):
    first = Up(db, tmp_path / "up.log")
    servers.append(first)
    view = Watched(browser)
    page = view.open(first.base + "/")
    before = count_of(page, "completed")
    first.stop()
    expect(page.locator("#banner")).to_be_visible()
    shot(page, "connection-lost")
    second = Up(db, tmp_path / "up.log", port=first.port)
    servers.append(second)
    expect(page.locator("#banner")).to_be_hidden()
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    submit(second.base, "ok")
    expect(page.locator("[data-count=completed]")).to_have_text(str(before + 1))
    view.close()


# -- actions nobody else clicks -----------------------------------------------------------------
def job_of(base: str, job_id: str) -> dict[str, Any]:
    return dict(api(base, "GET", f"/api/jobs/{job_id}")["job"])


def runs(base: str, job_id: str) -> int:
    return len(job_of(base, job_id)["executions"])


def wait_status(base: str, ids: list[str], status: str) -> None:
    wait_until(
        lambda: all(job_of(base, i)["status"] == status for i in ids), 20, f"{ids} to be {status}"
    )


def gone(base: str, job_id: str) -> bool:
    return httpx.get(f"{base}/api/jobs/{job_id}", timeout=10).status_code == 404


def test_bulk_cancel_and_retry_of_selected_jobs(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    parked = [submit(up.base, "ok", scheduled_at=later(3600)) for _ in range(3)]
    failed = [submit(up.base, "fail", payload=PERMANENT) for _ in range(2)]
    done = submit(up.base, "ok")
    wait_status(up.base, failed, "failed")
    wait_status(up.base, [done], "completed")
    view = Watched(browser)
    page = view.open(up.base + "/ui/jobs")

    def row(job_id: str) -> Any:
        return page.locator(f"tr[data-job='{job_id}']")

    selected = page.locator("[data-selected-count]")
    page.get_by_label("Select every job on this page").check()
    expect(selected).to_have_text("6 selected")
    page.get_by_label("Select every job on this page").uncheck()
    expect(selected).to_have_text("0 selected")

    for job_id in parked[:2]:
        page.get_by_label(f"Select job {job_id}").check()
    expect(selected).to_have_text("2 selected")
    page.get_by_role("button", name="Cancel selected").click()  # confirm() accepted
    expect(page.locator("#flash")).to_have_text("2 done")
    for job_id in parked[:2]:
        expect(row(job_id).locator("[data-state]")).to_have_text("cancelled")
        assert job_of(up.base, job_id)["status"] == "cancelled"
    expect(row(parked[2]).locator("[data-state]")).to_have_text("pending")
    # The live refresh kept the selection: clear it before the next one.
    expect(selected).to_have_text("2 selected")
    for job_id in parked[:2]:
        page.get_by_label(f"Select job {job_id}").uncheck()

    for job_id in [*failed, done]:
        page.get_by_label(f"Select job {job_id}").check()
    expect(selected).to_have_text("3 selected")
    page.get_by_role("button", name="Retry selected (failed)").click()
    flash = page.locator("#flash")
    expect(flash).to_contain_text("2 done; 1 refused")  # the completed job is not retried
    expect(flash).to_have_attribute("data-kind", "error")
    wait_until(
        lambda: all(runs(up.base, i) == 2 for i in failed), 20, "the retried jobs to run again"
    )
    assert runs(up.base, done) == 1
    assert job_of(up.base, parked[2])["status"] == "pending"
    shot(page, "jobs-bulk")
    assert view.errors == []
    view.close()


def test_dead_letters_purge_one_retry_all_and_purge_all_by_type(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    fails = [submit(up.base, "fail", payload=PERMANENT) for _ in range(3)]
    broken = [submit(up.base, "broken") for _ in range(2)]
    wait_status(up.base, [*fails, *broken], "failed")
    view = Watched(browser)
    page = view.open(up.base + "/ui/dlq")
    flash = page.locator("#flash")
    expect(page.locator("[data-dlq-size]")).to_have_text("(5)")

    page.get_by_role("button", name=f"Purge job {fails[0]}").click()
    expect(flash).to_have_text("1 done")
    expect(page.locator(f"tr[data-job='{fails[0]}']")).to_have_count(0)
    assert gone(up.base, fails[0])
    expect(page.locator("[data-dlq-size]")).to_have_text("(4)")

    page.get_by_role("button", name="Retry all", exact=True).click()
    expect(flash).to_have_text("4 retried")
    left = [*fails[1:], *broken]
    wait_until(lambda: all(runs(up.base, i) == 2 for i in left), 20, "every dead letter re-run")
    wait_status(up.base, left, "failed")  # they fail again, for good

    page.get_by_label("Type").select_option("broken")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"/ui/dlq\?job_type=broken$"))
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("tbody tr[data-job]")).to_have_count(2)
    page.get_by_role("button", name="Retry all broken").click()
    expect(flash).to_have_text("2 retried")
    wait_until(lambda: all(runs(up.base, i) == 3 for i in broken), 20, "broken jobs re-run")
    wait_status(up.base, broken, "failed")
    assert all(runs(up.base, i) == 2 for i in fails[1:])  # the filter held

    page.get_by_role("button", name="Purge all broken").click()
    expect(flash).to_have_text("2 purged")
    expect(page.locator("tbody tr[data-job]")).to_have_count(0)
    assert all(gone(up.base, i) for i in broken)
    assert all(job_of(up.base, i)["status"] == "failed" for i in fails[1:])

    page.goto(up.base + "/ui/dlq")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(page.locator("tbody tr[data-job]")).to_have_count(2)
    page.get_by_role("button", name="Purge all", exact=True).click()
    expect(flash).to_have_text("2 purged")
    expect(page.get_by_text("The dead-letter queue is empty.")).to_be_visible()
    assert all(gone(up.base, i) for i in fails)
    shot(page, "dlq-purged")
    assert view.errors == []
    view.close()


class Receiver:
    """A webhook endpoint on 127.0.0.1 that answers 500 while ``refusing``."""

    def __init__(self) -> None:
        self.refusing = True
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not receiver.refusing:
                    receiver.bodies.append(body)
                self.send_response(500 if receiver.refusing else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_disabled_webhook_is_re_enabled_from_its_page(browser, servers, db, tmp_path):
    receiver = Receiver()
    try:
        # Disabled at its second failed delivery in a row (each failing at once).
        up = Up(
            db,
            tmp_path / "up.log",
            CONVEYOR_WEBHOOK_DISABLE_AFTER="2",
            CONVEYOR_WEBHOOK_DISABLE_AFTER_SECONDS="0.001",
        )
        servers.append(up)
        hook = api(
            up.base,
            "POST",
            "/api/webhooks",
            json={"url": receiver.url, "event_types": ["job_completed"]},
        )["webhook"]["id"]

        def endpoint() -> dict[str, Any]:
            return dict(api(up.base, "GET", f"/api/webhooks/{hook}")["webhook"])

        def state() -> str:
            return str(endpoint()["state"])

        # One after the other: two failures at the same instant would not be
        # failing for the 1 ms the policy asks.
        submit(up.base, "ok")
        wait_until(lambda: endpoint()["consecutive_failures"] == 1, 20, "a failed delivery")
        submit(up.base, "ok")
        wait_until(lambda: state() == "disabled", 20, "the endpoint to be disabled")
        missed = submit(up.base, "ok")  # completes while the endpoint is disabled
        wait_status(up.base, [missed], "completed")
        receiver.refusing = False

        view = Watched(browser)
        page = view.open(up.base + f"/ui/webhooks/{hook}")
        badge = page.locator("h1 .badge")
        expect(badge).to_have_text("disabled")
        expect(page.locator(".notice")).to_contain_text("failed attempts in a row")
        shot(page, "webhook-disabled")
        page.get_by_role("button", name="Re-enable and replay missed events").click()
        expect(page.locator("#flash")).to_have_text("1 replayed")
        expect(badge).to_have_text("active")
        expect(page.get_by_role("button", name="Re-enable and replay missed events")).to_have_count(
            0
        )
        assert state() == "active"
        wait_until(
            lambda: any(missed.encode() in b for b in receiver.bodies),
            20,
            "the missed event to be delivered",
        )
        assert view.errors == []
        view.close()
    finally:
        receiver.close()


def test_workflow_cancel_and_retry_from_its_page(browser, servers, db, tmp_path):
    up = Up(db, tmp_path / "up.log")
    servers.append(up)

    def workflow(name: str, steps: list[dict[str, Any]]) -> str:
        body = {"name": name, "steps": steps}
        return str(api(up.base, "POST", "/api/workflows", json=body)["workflow_id"])

    def status(wf: str) -> str:
        return str(api(up.base, "GET", f"/api/workflows/{wf}")["workflow"]["status"])

    # No worker serves the queue "parked": the workflow stays running.
    parked = workflow(
        "parked",
        [
            {"name": "a", "job_type": "ok", "queue": "parked"},
            {"name": "b", "job_type": "ok", "depends_on": ["a"]},
        ],
    )
    view = Watched(browser)
    page = view.open(up.base + f"/ui/workflows/{parked}")
    badge = page.locator("h1 .badge")
    expect(badge).to_have_text("running")
    page.get_by_role("button", name="Cancel workflow").click()  # confirm() accepted
    expect(page.locator("#flash")).to_have_text("now cancelled")
    expect(badge).to_have_text("cancelled")
    expect(page.locator("svg rect.node.s-cancelled")).to_have_count(2)
    expect(page.get_by_role("button", name="Cancel workflow")).to_have_count(0)
    assert status(parked) == "cancelled"

    # "flaky" fails until its file exists: the workflow fails; once the file is
    # there a retry from the page runs it again, and the rest follows live.
    marker = tmp_path / "ready"
    flaky = workflow(
        "flaky",
        [
            {"name": "flaky", "job_type": "needs_file", "payload": {"path": str(marker)}},
            {"name": "after", "job_type": "ok", "depends_on": ["flaky"]},
        ],
    )
    wait_until(lambda: status(flaky) == "failed", 20, "the workflow to fail")
    page = view.open(up.base + f"/ui/workflows/{flaky}")
    expect(badge).to_have_text("failed")
    expect(page.locator("svg rect.node.s-failed")).to_have_count(1)
    page.evaluate("window.notReloaded = true")
    marker.touch()
    page.get_by_role("button", name="Retry failed steps").click()
    expect(page.locator("#flash")).to_have_text("now running")
    expect(badge).to_have_text("completed")
    expect(page.locator("svg rect.node.s-completed")).to_have_count(2)
    expect(page.locator("tr[data-step='flaky'] .badge")).to_have_text("completed")
    assert page.evaluate("window.notReloaded") is True
    assert status(flaky) == "completed"
    shot(page, "workflow-retried")
    assert view.errors == []
    view.close()


def release(fifo: Path) -> None:
    """Let a ``gate`` job waiting on ``fifo`` finish, if one is (never blocks)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader (ENXIO): nothing waits
        return
    with os.fdopen(fd, "w") as f:
        f.write("go")


def test_a_job_page_follows_its_running_job_live(browser, servers, db, tmp_path):
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    up = Up(db, tmp_path / "up.log")
    servers.append(up)
    try:
        job_id = submit(up.base, "gate", payload={"fifo": str(fifo)})
        view = Watched(browser)
        page = view.open(up.base + f"/ui/jobs/{job_id}")
        badge = page.locator("h1 .badge")
        expect(badge).to_have_text("running")
        expect(page.locator(".timeline li.o-running")).to_have_count(1)
        expect(page.get_by_role("button", name="Cancel job")).to_be_visible()
        shot(page, "job-running")
        page.evaluate("window.notReloaded = true")
        wait_until(lambda: runs(up.base, job_id) == 1, 20, "the handler to start")
        Path(fifo).write_text("go")  # blocks until the handler has the pipe open
        expect(badge).to_have_text("completed")
        expect(page.locator(".timeline li.o-completed")).to_have_count(1)
        expect(page.locator("#result-h + pre")).to_contain_text('"released": "go"')
        expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
        assert page.evaluate("window.notReloaded") is True
        assert int(page.locator("body").get_attribute("data-refreshed") or 0) >= 1
        assert view.errors == []
        view.close()
    finally:
        release(fifo)


# -- narrow screens, dark theme, keyboard, labels ---------------------------------------------
@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, dict[str, str]]]:
    """One server for the read-only checks below, with a row on every page."""
    tmp = tmp_path_factory.mktemp("filled")
    up = Up(f"sqlite:///{tmp / 'dash.db'}", tmp / "up.log")
    try:
        done = submit(up.base, "ok", payload={"n": 3})
        failed = submit(up.base, "fail", payload=PERMANENT)
        submit(up.base, "ok", scheduled_at=later(3600))
        wf = api(
            up.base,
            "POST",
            "/api/workflows",
            json={
                "name": "etl-with-a-rather-long-name-for-narrow-screens",
                "steps": [
                    {"name": "extract", "job_type": "ok"},
                    {"name": "load", "job_type": "ok", "depends_on": ["extract"]},
                    {"name": "report", "job_type": "ok", "depends_on": ["load"]},
                ],
            },
        )["workflow_id"]
        hook = api(
            up.base,
            "POST",
            "/api/webhooks",
            json={
                "url": f"http://127.0.0.1:{free_port()}/a/long/path/hook",
                "event_types": ["job_failed"],
            },
        )["webhook"]["id"]
        api(
            up.base,
            "POST",
            "/api/schedules",
            json={"name": "nightly", "cron": "0 3 * * *", "job_type": "ok"},
        )
        wait_status(up.base, [done], "completed")
        wait_status(up.base, [failed], "failed")
        pages = {
            "overview": "/",
            "jobs": "/ui/jobs",
            "job": f"/ui/jobs/{failed}",
            "queues": "/ui/queues",
            "workers": "/ui/workers",
            "dlq": "/ui/dlq",
            "workflows": "/ui/workflows",
            "workflow": f"/ui/workflows/{wf}",
            "schedules": "/ui/schedules",
            "webhooks": "/ui/webhooks",
            "webhook": f"/ui/webhooks/{hook}",
            "locks": "/ui/locks",
        }
        yield up, pages
    finally:
        up.stop()


NO_PAGE_SCROLL = """() => {
  const doc = document.documentElement;
  return { page: doc.scrollWidth, body: document.body.scrollWidth, view: doc.clientWidth };
}"""


def test_narrow_screens_scroll_no_page_sideways_and_keep_the_nav(browser, filled):
    up, pages = filled
    view = Watched(browser, viewport={"width": 375, "height": 740})
    for name, path in pages.items():
        page = view.open(up.base + path, live=name != "locks")
        widths = page.evaluate(NO_PAGE_SCROLL)
        # Wide tables scroll inside their own box; the page itself never sideways.
        assert widths["page"] <= widths["view"], (name, widths)
        assert widths["body"] <= widths["view"], (name, widths)
        nav = page.get_by_role("navigation", name="Sections")
        expect(nav).to_be_in_viewport()
        box = nav.bounding_box()
        assert box is not None, name
        assert box["width"] <= 375, (name, box)
        shot(page, f"{name}-narrow")
    # The last section is reachable: the tab row scrolls, its link is clicked.
    page = view.open(up.base + "/ui/jobs")
    last = page.get_by_role("navigation", name="Sections").get_by_role("link", name="Locks")
    last.scroll_into_view_if_needed()
    expect(last).to_be_in_viewport()
    last.click()
    expect(page).to_have_url(up.base + "/ui/locks")
    assert view.errors == []
    view.close()


def test_the_dark_theme_follows_the_system(browser, filled):
    up, pages = filled
    colours = {}
    for scheme in ("light", "dark"):
        view = Watched(browser, color_scheme=scheme)
        page = view.open(up.base + pages["jobs"])
        colours[scheme] = page.evaluate(
            """() => {
              const css = (el) => getComputedStyle(el);
              const table = document.querySelector("table");
              return { bg: css(document.body).backgroundColor, text: css(document.body).color,
                       table: css(table).backgroundColor };
            }"""
        )
        shot(page, f"jobs-{scheme}")
        assert view.errors == []
        view.close()
    light, dark = colours["light"], colours["dark"]
    assert light["bg"] == "rgb(247, 248, 250)", light
    assert dark["bg"] == "rgb(15, 18, 22)", dark
    assert light["text"] != dark["text"]
    assert light["table"] != dark["table"]


FOCUSED = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const css = getComputedStyle(el);
  return {
    tag: el.tagName.toLowerCase(), name: el.getAttribute("name"), type: el.type || null,
    text: (el.innerText || el.value || el.getAttribute("aria-label") || "").trim().slice(0, 40),
    visible: el.matches(":focus-visible"), outline: css.outlineStyle,
    width: parseFloat(css.outlineWidth), left: el.getBoundingClientRect().left,
  };
}"""


def test_keyboard_reaches_filters_and_buttons_with_a_visible_focus(browser, filled):
    up, pages = filled
    view = Watched(browser, viewport={"width": 1280, "height": 900})
    page = view.open(up.base + pages["jobs"])
    reached = []
    for _ in range(100):  # every stop of the page, then focus leaves it
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        if focused is None:
            break
        reached.append(focused)
        # Every stop shows where it is: the focus ring of :focus-visible.
        assert focused["visible"], focused
        assert focused["outline"] != "none", focused
        assert focused["width"] >= 2, focused
    assert reached[0]["text"] == "Skip to content"
    assert reached[0]["left"] >= 0  # the skip link comes on screen when focused
    names = {r["name"] for r in reached}
    assert {"state", "job_type", "queue", "created_by", "q", "ids"} <= names, names
    texts = {r["text"] for r in reached if r["tag"] == "button"}
    assert {"Filter", "Cancel selected", "Retry selected (failed)"} <= texts, texts
    # And the filters work from the keyboard alone.
    page.get_by_label("Type").focus()
    page.keyboard.type("fail")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/ui/jobs\?.*job_type=fail"))
    expect(page.locator("tbody tr[data-job]")).to_have_count(1)
    assert view.errors == []
    view.close()


CONTROLS = {"textbox", "combobox", "searchbox", "checkbox", "button", "radio", "spinbutton"}


def test_every_control_has_an_accessible_name(browser, filled):
    up, pages = filled
    view = Watched(browser)
    counted = {}
    for name, path in pages.items():
        page = view.open(up.base + path, live=name != "locks")
        cdp = view.context.new_cdp_session(page)
        tree = cdp.send("Accessibility.getFullAXTree")["nodes"]
        cdp.detach()
        controls = [
            n for n in tree if not n.get("ignored") and n.get("role", {}).get("value") in CONTROLS
        ]
        counted[name] = len(controls)
        nameless = [
            n["role"]["value"]
            for n in controls
            if not str(n.get("name", {}).get("value", "")).strip()
        ]
        assert nameless == [], (name, nameless)
    # The pages with forms and buttons were looked at, not only empty ones.
    assert counted["jobs"] >= 12, counted
    assert counted["dlq"] >= 4, counted
    assert counted["schedules"] >= 1, counted
    assert view.errors == []
    view.close()
