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
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
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
    """A ``conveyor up --app dashapp`` subprocess; ``port`` to reuse one."""

    def __init__(self, db: str, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._fh = log.open("a")
        self.log = log
        env = conveyor_env(db, **FAST)
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
