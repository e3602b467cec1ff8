"""The dashboard over HTTP, in-process: sessions, CSRF, scopes, hostile URLs.

The browser scenarios are in tests/browser; these check the server's side of
the same rules without a browser, on the in-memory store.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from conveyor import Conveyor, Settings
from conveyor.api.app import create_app
from conveyor.dashboard.session import COOKIE
from conveyor.runtime.scheduler import sync_declared
from conveyor.security.api_keys import new_api_key


@pytest.fixture
async def app() -> AsyncIterator[Conveyor]:
    conveyor = Conveyor(settings=Settings(database_url="memory://"))

    @conveyor.job("ok")
    async def ok(ctx: object) -> None:
        return None

    await conveyor.open()
    try:
        yield conveyor
    finally:
        await conveyor.close()


def client(app: Conveyor) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(app), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def key(app: Conveyor, scope: str) -> str:
    token, record = new_api_key(scope, scope, app.now())
    await app.store.create_api_key(record)
    return token


def csrf_of(html: str) -> str:
    match = re.search(r'data-csrf="([0-9a-f]+)"', html)
    assert match, html[:500]
    return match[1]


async def test_keyless_pages_set_a_strict_cookie_and_actions_need_its_csrf(app):
    job = (await app.submit("ok", {}, run_at=app.now().replace(year=2100))).job
    async with client(app) as c:
        page = await c.get("/ui/jobs")
        assert page.status_code == 200
        assert "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie
        assert "samesite=strict" in cookie
        assert "secure" not in cookie  # plain http on loopback
        assert job.id in page.text
        csrf = csrf_of(page.text)

        url = "/ui/actions/jobs/cancel"
        forged = await c.post(url, json={"ids": [job.id]})
        assert forged.status_code == 403
        assert (await app.store.get(job.id)).status == "pending"
        wrong = await c.post(url, json={"ids": [job.id]}, headers={"X-CSRF-Token": "0" * 64})
        assert wrong.status_code == 403
        form = await c.post(url, data={"ids": job.id}, headers={"X-CSRF-Token": csrf})
        assert form.status_code == 415  # the API's guard: JSON bodies only
        done = await c.post(url, json={"ids": [job.id]}, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert done.json()["done"] == {job.id: "cancelled"}
        assert (await app.store.get(job.id)).status == "cancelled"
        login = await c.get("/ui/login?next=/ui/dlq")
        assert login.status_code == 303  # no key needed: straight through
        assert login.headers["location"] == "/ui/dlq"


async def test_a_tampered_cookie_is_no_session(app):
    async with client(app) as c:
        page = await c.get("/")
        csrf = csrf_of(page.text)
        raw = c.cookies[COOKIE]
        body, _, sig = raw.rpartition(".")
        c.cookies.set(COOKIE, body + "." + ("0" if sig[0] != "0" else "1") + sig[1:])
        refused = await c.post("/ui/actions/dlq/retry-all", json={}, headers={"X-CSRF-Token": csrf})
        assert refused.status_code == 403


async def test_keys_required_login_read_scope_and_redirects(app):
    read = await key(app, "read")
    write = await key(app, "write")
    job = (await app.submit("ok", {}, run_at=app.now().replace(year=2100))).job
    async with client(app) as c:
        first = await c.get("/ui/jobs")
        assert first.status_code == 303
        assert first.headers["location"] == "/ui/login?next=%2Fui%2Fjobs"
        login = await c.get("/ui/login?next=/ui/jobs")
        csrf = csrf_of(login.text)
        no_csrf = await c.post("/ui/login", json={"key": read})
        assert no_csrf.status_code == 403
        bad = await c.post("/ui/login", json={"key": "cvk_nope"}, headers={"X-CSRF-Token": csrf})
        assert bad.status_code == 401
        ok = await c.post(
            "/ui/login",
            json={"key": read, "next": "//evil.example/x"},
            headers={"X-CSRF-Token": csrf},
        )
        assert ok.status_code == 200
        assert ok.json()["next"] == "/"  # never an open redirect
        assert read not in c.cookies[COOKIE]
        page = await c.get("/ui/jobs")
        assert page.status_code == 200
        assert job.id in page.text
        assert "data-bulk-action" not in page.text
        assert "data-select-all" not in page.text
        session_csrf = csrf_of(page.text)
        assert session_csrf != csrf  # a new session at login
        refused = await c.post(
            "/ui/actions/jobs/cancel",
            json={"ids": [job.id]},
            headers={"X-CSRF-Token": session_csrf},
        )
        assert refused.status_code == 403
        assert "scope" in refused.json()["error"]
        locks = await c.get("/ui/locks")
        assert "admin API key" in locks.text

        logout = await c.post("/ui/logout", json={}, headers={"X-CSRF-Token": session_csrf})
        assert logout.status_code == 200
        assert (await c.get("/ui/jobs")).status_code == 303

        csrf = csrf_of((await c.get("/ui/login")).text)
        await c.post("/ui/login", json={"key": write}, headers={"X-CSRF-Token": csrf})
        page = await c.get(f"/ui/jobs/{job.id}")
        assert "Cancel job" in page.text
        csrf = csrf_of(page.text)
        done = await c.post(
            "/ui/actions/jobs/cancel", json={"ids": [job.id]}, headers={"X-CSRF-Token": csrf}
        )
        assert done.json()["done"] == {job.id: "cancelled"}
        purge = await c.post(
            "/ui/actions/dlq/purge", json={"ids": [job.id]}, headers={"X-CSRF-Token": csrf}
        )
        assert purge.status_code == 403  # purging needs admin
    # The dashboard's actions are audited as the session's key; a refused one is not.
    from conveyor.domain.audit import AuditQuery

    entries = await app.audit.list(AuditQuery(resource_id=job.id))
    assert [(e.action, e.actor, e.summary) for e in entries] == [
        ("job.cancel", "write", {"via": "dashboard"})
    ]
    assert entries[0].request_id


@pytest.mark.parametrize(
    "path",
    [
        "/ui/jobs?before=9e999~abc",
        "/ui/jobs?before=nan~abc",
        "/ui/jobs?before=1.5~" + "a" * 5000,
        "/ui/jobs?state=bogus&job_type=" + "x" * 5000,
        "/ui/jobs?q=zz%22%3E%3Cscript%3E",
        "/ui/jobs?created_by=%E2%80%AE",
        "/ui/dlq?before=-1~x",
        "/ui/workflows?offset=99999999999999999999&status=nope",
    ],
)
async def test_hostile_query_strings_render_a_page(app, path):
    async with client(app) as c:
        page = await c.get(path)
        assert page.status_code == 200, page.text[:300]
        assert "<script>" not in page.text


async def test_unknown_ids_are_html_404s_and_bad_action_bodies_400(app):
    async with client(app) as c:
        assert (await c.get("/ui/jobs/0123456789abcdef")).status_code == 404
        assert (await c.get("/ui/workflows/nope")).status_code == 404
        assert (await c.get("/ui/jobs/x%00y")).status_code == 400
        csrf = csrf_of((await c.get("/")).text)
        headers = {"X-CSRF-Token": csrf}
        for body in ({"ids": "x"}, {"ids": []}, {"ids": ["a b"]}, {"ids": ["x"] * 501}, [1]):
            r = await c.post("/ui/actions/jobs/retry", json=body, headers=headers)
            assert r.status_code == 400, (body, r.text)
        unknown = await c.post("/ui/actions/jobs/retry", json={"ids": ["abc"]}, headers=headers)
        assert unknown.status_code == 200
        assert "abc" in unknown.json()["errors"]


async def test_schedules_page_lists_next_fires_and_pauses_with_csrf(app):
    app.schedule("nightly", "0 3 * * *", "ok", {}, timezone="Europe/Berlin")
    await sync_declared(app.store, list(app.schedules.values()), app.now())
    (schedule,) = await app.store.list_schedules()
    async with client(app) as c:
        page = await c.get("/ui/schedules")
        assert page.status_code == 200, page.text
        assert "nightly" in page.text
        assert page.text.count("T01:00:00") + page.text.count("T02:00:00") == 5  # 03:00 Berlin
        csrf = csrf_of(page.text)
        url = "/ui/actions/schedules/pause"
        assert (await c.post(url, json={"id": schedule.id})).status_code == 403
        done = await c.post(url, json={"id": schedule.id}, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert (await app.store.get_schedule(schedule.id)).state == "paused"
        again = await c.get("/ui/schedules")
        assert "/ui/actions/schedules/resume" in again.text
        back = await c.post(
            "/ui/actions/schedules/resume", json={"id": schedule.id}, headers={"X-CSRF-Token": csrf}
        )
        assert back.status_code == 200, back.text
        assert (await app.store.get_schedule(schedule.id)).state == "active"


async def test_queues_page_pauses_and_resumes_with_csrf(app):
    await app.submit("ok", {}, queue="mail")
    async with client(app) as c:
        page = await c.get("/ui/queues")
        assert page.status_code == 200, page.text
        assert "/ui/actions/queues/pause" in page.text
        csrf = csrf_of(page.text)
        url = "/ui/actions/queues/pause"
        assert (await c.post(url, json={"id": "mail"})).status_code == 403
        done = await c.post(url, json={"id": "mail"}, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert [q.paused for q in await app.store.list_queues() if q.name == "mail"] == [True]
        again = await c.get("/ui/queues")
        assert "/ui/actions/queues/resume" in again.text
        back = await c.post(
            "/ui/actions/queues/resume", json={"id": "mail"}, headers={"X-CSRF-Token": csrf}
        )
        assert back.status_code == 200, back.text
        assert [q.paused for q in await app.store.list_queues() if q.name == "mail"] == [False]
        bad = await c.post(url, json={"id": ""}, headers={"X-CSRF-Token": csrf})
        assert bad.status_code == 400


async def test_workers_page_shows_capabilities_and_stuck_handlers(app):
    from conveyor.domain.job import WorkerInfo

    now = app.now()
    await app.store.register_worker(
        WorkerInfo(
            "w-gpu",
            "host-a",
            11,
            ("default",),
            (),
            4,
            started_at=now,
            heartbeat_at=now,
            capabilities={"region": "eu<x>", "gpu": "a100"},
        ),
        now,
    )
    await app.store.register_worker(
        WorkerInfo("w-plain", "host-b", 12, ("default",), (), 2, started_at=now, heartbeat_at=now),
        now,
    )
    await app.store.heartbeat("w-plain", 2, now, stuck_jobs=2)  # another process's worker
    async with client(app) as c:
        page = await c.get("/ui/workers")
    assert page.status_code == 200, page.text[:300]
    assert '<th scope="col">Capabilities</th>' in page.text
    gpu_row = page.text[page.text.index("w-gpu") :].split("</tr>")[0]
    # Sorted by name, escaped: a capability value is the operator's text.
    assert (
        '<code class="cap">gpu=a100</code> <code class="cap">region=eu&lt;x&gt;</code>' in gpu_row
    )
    plain_row = page.text[page.text.index("w-plain") :].split("</tr>")[0]
    assert "none" in plain_row
    # Stuck handlers of another process's worker: as its last heartbeat recorded them.
    assert '<td class="num">2</td>' in plain_row


async def test_dlq_retry_all_leaves_conveyors_own_dead_letters_unless_an_admin_asks(app):
    from conveyor.domain.job import Finish, NewJob
    from conveyor.domain.states import Action, JobState

    (hook,) = await app.store.enqueue_many(
        [NewJob("conveyor.webhook", {"n": 1}, internal=True)], app.now()
    )
    (user,) = await app.store.enqueue_many([NewJob("ok", {})], app.now())
    for job in await app.store.fetch(
        "w1", queues=["default"], job_types=[], limit=2, now=app.now()
    ):
        await app.store.finish_many(
            [Finish(job.id, job.lease_token, Action.FAIL, error="boom", job_type=job.job_type)],
            app.now(),
        )
    assert (await app.store.get(hook.job.id)).state is JobState.FAILED
    write = await key(app, "write")
    admin = await key(app, "admin")
    url = "/ui/actions/dlq/retry-all"
    async with client(app) as c:
        csrf = csrf_of((await c.get("/ui/login")).text)
        await c.post("/ui/login", json={"key": write}, headers={"X-CSRF-Token": csrf})
        csrf = csrf_of((await c.get("/ui/dlq")).text)
        headers = {"X-CSRF-Token": csrf}
        done = await c.post(url, json={}, headers=headers)
        assert done.json()["retried"] == 1, done.text
        assert (await app.store.get(user.job.id)).state is JobState.PENDING
        assert (await app.store.get(hook.job.id)).state is JobState.FAILED
        for body in ({"include_internal": True}, {"job_type": "conveyor.webhook"}):
            refused = await c.post(url, json=body, headers=headers)
            assert refused.status_code == 403, refused.text
        assert (await app.store.get(hook.job.id)).state is JobState.FAILED

        await c.post("/ui/logout", headers=headers)
        csrf = csrf_of((await c.get("/ui/login")).text)
        await c.post("/ui/login", json={"key": admin}, headers={"X-CSRF-Token": csrf})
        csrf = csrf_of((await c.get("/ui/dlq")).text)
        headers = {"X-CSRF-Token": csrf}
        assert (await c.post(url, json={}, headers=headers)).json()["retried"] == 0
        picked = await c.post(url, json={"job_type": "conveyor.webhook"}, headers=headers)
        assert picked.json()["retried"] == 1, picked.text
        assert (await app.store.get(hook.job.id)).state is JobState.PENDING


def session_cookie(response: httpx.Response) -> str:
    (cookie,) = [c for c in response.headers.get_list("set-cookie") if c.startswith(COOKIE + "=")]
    return cookie.lower()


async def test_the_session_cookie_is_secure_over_https_only(app):
    api = create_app(app)
    secure = httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="https://localhost")
    async with secure as c:
        assert "; secure" in session_cookie(await c.get("/ui/jobs"))
    async with client(app) as c:
        assert "secure" not in session_cookie(await c.get("/ui/jobs"))


@pytest.mark.parametrize(
    ("peer", "proto", "secure"),
    [
        ("127.0.0.1", "https", True),  # the proxy on this host, trusted by default
        ("127.0.0.1", None, False),
        ("10.0.0.7", "https", False),  # anyone else cannot claim HTTPS
    ],
)
async def test_behind_a_tls_proxy_x_forwarded_proto_counts_from_trusted_peers(
    app, peer, proto, secure
):
    """``conveyor up``/``api`` leave uvicorn's proxy headers on: uvicorn wraps the
    app in ProxyHeadersMiddleware trusting FORWARDED_ALLOW_IPS (127.0.0.1 and ::1
    by default), which is what these requests pass through."""
    api = ProxyHeadersMiddleware(create_app(app), trusted_hosts="127.0.0.1,::1")
    transport = httpx.ASGITransport(app=api, client=(peer, 40123))
    headers = {"X-Forwarded-Proto": proto} if proto else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        cookie = session_cookie(await c.get("/ui/jobs", headers=headers))
    assert ("; secure" in cookie) is secure, cookie


async def test_webhook_ids_are_ids_to_the_enable_action(app):
    async with client(app) as c:
        csrf = csrf_of((await c.get("/")).text)
        headers = {"X-CSRF-Token": csrf}
        url = "/ui/actions/webhooks/enable"
        unknown = await c.post(url, json={"id": "wh_0123abcd"}, headers=headers)
        assert unknown.status_code == 404, unknown.text  # an id, just not a known one
        for bad in ("", "wh 1", "wh_\u0661", "x" * 65, "a/b", 7):
            refused = await c.post(url, json={"id": bad}, headers=headers)
            assert refused.status_code == 400, (bad, refused.text)
