"""The web dashboard: server-rendered pages at ``/`` and ``/ui/*``.

Pages read the store through its bounded dashboard reads (no full counts on
big tables) and render Jinja2 templates; ``static/dashboard.js`` keeps them
live over ``/api/events/ws`` and sends the buttons' actions as JSON with the
session's CSRF token. See docs/dashboard.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from conveyor.api.http import Auth, sees_internal
from conveyor.app import Conveyor
from conveyor.auditing import AUDIT_REQUEST_ID, acting_as
from conveyor.dashboard.charts import layered_dag, minute_chart
from conveyor.dashboard.session import COOKIE, Sessions, Viewer
from conveyor.dashboard.snapshot import MinuteHistory, Shared
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.dashboard import Count, Cursor, RecentStats
from conveyor.domain.errors import (
    InvalidTransition,
    JobNotFound,
    NotFound,
    StoreUnavailable,
    ValidationError,
)
from conveyor.domain.job import Job, JobQuery, WorkerInfo, is_internal
from conveyor.domain.states import JobState
from conveyor.presenters import iso, job_dict, schedule_dict, webhook_dict, workflow_dict
from conveyor.runtime.status import is_alive
from conveyor.runtime.webhooks import enable_webhook as enable_and_replay
from conveyor.runtime.worker import Worker
from conveyor.scheduling import pause_schedule, resume_schedule

#: The summary of an audit entry for a dashboard action: where it came from.
DASHBOARD: dict[str, Any] = {"via": "dashboard"}

COUNT_CAP = 10_000  #: state counts stop here; larger ones are estimates
QUEUE_SCAN_CAP = 10_000  #: queue depths look at most this many unfinished jobs
WAIT_SAMPLE = 2_000  #: the wait p95 covers this many most recently finished jobs
#: Seconds the overview's reads are shared by every viewer (see dashboard/snapshot.py);
#: read when the router is built (bench/dashboard_bench.py sets 0 to time each read).
OVERVIEW_TTL = 1.0
PAGE_SIZE = 50
MAX_IDS = 500  #: jobs per bulk action
JOB_EVENTS_SHOWN = 200
CHILDREN_SHOWN = 100

_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class NavItem:
    key: str
    label: str
    href: str


#: The sidebar. A feature with its own page (schedules, say) includes its router
#: next to the dashboard's and passes ``nav=(*DEFAULT_NAV, NavItem(...))``.
DEFAULT_NAV: tuple[NavItem, ...] = (
    NavItem("overview", "Overview", "/"),
    NavItem("jobs", "Jobs", "/ui/jobs"),
    NavItem("queues", "Queues", "/ui/queues"),
    NavItem("workers", "Workers", "/ui/workers"),
    NavItem("dlq", "Dead letters", "/ui/dlq"),
    NavItem("workflows", "Workflows", "/ui/workflows"),
    NavItem("schedules", "Schedules", "/ui/schedules"),
    NavItem("webhooks", "Webhooks", "/ui/webhooks"),
    NavItem("locks", "Locks", "/ui/locks"),
)


#: How many upcoming fire times the Schedules page shows per active schedule.
UPCOMING_FIRES = 5


class ActionError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


# -- template helpers --------------------------------------------------------------------
def _ago(dt: datetime | None, now: datetime | None = None) -> str:
    if dt is None:
        return "—"
    seconds = ((now or datetime.now(dt.tzinfo)) - dt).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        text = "now"
        return text
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            text = f"{int(seconds // size)}{unit}"
            break
    return f"in {text}" if future else f"{text} ago"


def _duration(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 120_000:
        return f"{ms / 1000:.1f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def _count(c: Count | int) -> str:
    if isinstance(c, int):
        return f"{c:,}"
    if c.exact:
        return f"{c.value:,}"
    if c.value > COUNT_CAP:
        for size, unit in ((1_000_000, "M"), (1_000, "k")):
            if c.value >= size:
                return f"~{c.value / size:.1f}{unit}"
    return f"≥ {c.value:,}"


def _pretty(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return repr(value)


def _compact(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return repr(value)


def _iso(dt: datetime | None) -> str:
    return iso(dt) or ""


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("conveyor.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ago=_ago, duration=_duration, count=_count, pretty=_pretty, compact=_compact, iso=_iso
    )
    env.globals.update(urlencode=urlencode, quote=quote, queue_cap=QUEUE_SCAN_CAP)
    return env


def _cursor_text(job: Job) -> str:
    assert job.created_at is not None
    return f"{job.created_at.timestamp():.6f}~{job.id}"


def _parse_cursor(raw: str | None) -> Cursor | None:
    if not raw or len(raw) > 100 or "~" not in raw:
        return None
    stamp, _, job_id = raw.partition("~")
    try:
        at = datetime.fromtimestamp(float(stamp), tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None
    if not job_id.isalnum() or len(job_id) > 64:
        return None
    return Cursor(at, job_id)


def _clean(raw: str | None, limit: int = 200) -> str | None:
    """A filter value from the query string: stripped, bounded, no control chars."""
    if raw is None:
        return None
    value = raw.strip()[:limit]
    if not value or any(ord(ch) < 32 for ch in value):
        return None
    return value


# -- the router ----------------------------------------------------------------------------
def dashboard_router(
    conveyor: Conveyor,
    auth: Auth,
    workers: Sequence[Worker] = (),
    nav: Sequence[NavItem] = DEFAULT_NAV,
) -> APIRouter:
    """Pages at ``/`` and ``/ui/...``, actions at ``/ui/actions/...``.

    ``workers``: the workers of this process (their stuck handlers are shown live;
    other processes' workers as of their last heartbeat);
    ``nav``: the sidebar's pages. Sets ``auth.websocket_session`` so that the
    events WebSocket accepts a logged-in session's cookie."""
    router = APIRouter(include_in_schema=False)
    sessions = Sessions(auth, conveyor.settings.dashboard_secret)
    auth.websocket_session = sessions.websocket_key
    env = environment()
    store = conveyor.store
    static = resources.files("conveyor.dashboard").joinpath("static")

    def render(
        request: Request,
        viewer: Viewer | None,
        template: str,
        *,
        http_status: int = 200,
        fresh: Any = None,
        **context: Any,
    ) -> HTMLResponse:
        html = env.get_template(template).render(
            request=request,
            viewer=viewer,
            nav=nav,
            now=conveyor.now(),
            path=request.url.path,
            **context,
        )
        response = HTMLResponse(html, status_code=http_status, headers=dict(_SECURITY_HEADERS))
        if fresh is not None:
            sessions.set_cookie(response, request, fresh)
        return response

    Page = Callable[[Request, Viewer], Awaitable[Response]]

    def page(path: str) -> Callable[[Page], Page]:
        """A page: the viewer is resolved first (login when keys are required)."""

        def decorate(fn: Page) -> Page:
            async def endpoint(request: Request) -> Response:
                started = time.perf_counter()
                viewer, fresh = await sessions.viewer(request)
                if viewer is None:
                    target = "/ui/login?" + urlencode({"next": request.url.path})
                    response: Response = RedirectResponse(target, status_code=303)
                    if fresh is not None:
                        sessions.set_cookie(response, request, fresh)
                    return response
                try:
                    response = await fn(request, viewer)
                except NotFound as exc:
                    response = render(
                        request,
                        viewer,
                        "error.html",
                        http_status=404,
                        title="Not found",
                        message=str(exc),
                    )
                except StoreUnavailable as exc:
                    response = render(
                        request,
                        viewer,
                        "error.html",
                        http_status=503,
                        title="Store unavailable",
                        message=f"Storage unavailable ({exc.reason}); retry shortly",
                    )
                if fresh is not None:
                    sessions.set_cookie(response, request, fresh)
                # The page's whole server work (reads and rendering), for the
                # browser's devtools and bench/dashboard_bench.py.
                elapsed = (time.perf_counter() - started) * 1000
                response.headers["Server-Timing"] = f"page;dur={elapsed:.1f}"
                return response

            endpoint.__name__ = fn.__name__
            router.add_api_route(path, endpoint, methods=["GET"], response_class=HTMLResponse)
            return fn

        return decorate

    async def live_after() -> int:
        return await store.latest_event_id()

    # -- static ---------------------------------------------------------------------------
    @router.get("/ui/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in _STATIC:
            return Response("Not found", status_code=404, media_type="text/plain")
        body = static.joinpath(name).read_bytes()
        return Response(
            body,
            media_type=_STATIC[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    @router.get("/favicon.ico")
    async def favicon() -> Response:
        return await static_file("favicon.svg")

    # -- login ------------------------------------------------------------------------------
    @router.get("/ui/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> Response:
        viewer, fresh = await sessions.viewer(request)
        target = _safe_next(request.query_params.get("next"))
        if viewer is not None:  # logged in, or no key is needed
            return RedirectResponse(target, status_code=303)
        session = fresh or sessions.decode(request.cookies.get(COOKIE))
        assert session is not None
        response = render(
            request,
            None,
            "login.html",
            csrf=sessions.csrf_for(session.nonce),
            next=target,
        )
        if fresh is not None:
            sessions.set_cookie(response, request, fresh)
        return response

    @router.post("/ui/login")
    async def login(request: Request) -> Response:
        if not sessions.csrf_ok(request, request.headers.get("x-csrf-token")):
            return _json_error(403, "Missing or wrong CSRF token: reload the page")
        body = await _body(request)
        token = body.get("key")
        if not isinstance(token, str):
            return _json_error(400, "key must be an API key (text)")
        key, session = await sessions.login(token)
        if key is None or session is None:
            return _json_error(401, "Invalid or revoked API key")
        response = JSONResponse(
            {"success": True, "next": _safe_next(body.get("next")), "scope": key.scope.value}
        )
        sessions.set_cookie(response, request, session)
        return response

    @router.post("/ui/logout")
    async def logout(request: Request) -> Response:
        if not sessions.csrf_ok(request, request.headers.get("x-csrf-token")):
            return _json_error(403, "Missing or wrong CSRF token: reload the page")
        response = JSONResponse({"success": True, "next": "/ui/login"})
        sessions.set_cookie(response, request, sessions.new_session(None))
        return response

    # -- overview ---------------------------------------------------------------------------
    history = MinuteHistory()
    shared: Shared[_Overview] = Shared(OVERVIEW_TTL)

    async def read_overview() -> _Overview:
        now = conveyor.now()
        # First: the data read next is at least as new as this event id, which the
        # page hands to its WebSocket (resume) and its refresh (is it stale?).
        after = await live_after()
        # Independent reads: a pooled store (PostgreSQL) runs them side by side.
        counts, stats, fleet, (depths, complete) = await asyncio.gather(
            store.state_counts(COUNT_CAP),
            history.stats(store, now, timedelta(hours=1), WAIT_SAMPLE),
            store.list_workers(),
            store.queue_depths(
                (JobState.PENDING, JobState.RUNNING, JobState.BLOCKED), QUEUE_SCAN_CAP
            ),
        )
        return _Overview(now, after, counts, stats, fleet, depths, complete)

    @page("/")
    async def overview(request: Request, viewer: Viewer) -> Response:
        snap = await shared.get(read_overview)
        now, after, counts, stats, fleet = snap.now, snap.after, snap.counts, snap.stats, snap.fleet
        depths, complete = snap.depths, snap.complete
        done = sum(b.completed for b in stats.buckets)
        failed = sum(b.failed for b in stats.buckets)
        recent = [b for b in stats.buckets if b.minute >= now - timedelta(minutes=5)]
        queues = _queue_rows(depths)
        return render(
            request,
            viewer,
            "overview.html",
            active="overview",
            after=after,
            counts=counts,
            dlq=counts[JobState.FAILED],
            states=list(JobState),
            throughput=done / 60,
            throughput_5m=sum(b.completed for b in recent) / 5,
            failure_rate=(failed / (done + failed)) if done + failed else None,
            finished_hour=done + failed,
            wait_p95=stats.wait_p95_ms,
            oldest_pending=stats.oldest_pending,
            workers_alive=sum(1 for w in fleet if is_alive(w, conveyor.deps)),
            workers_total=sum(1 for w in fleet if w.state == "running"),
            queues=queues,
            queues_complete=complete,
            charts=[
                minute_chart("Finished per minute", stats.buckets, now, ("completed", "failed")),
                minute_chart("Submitted per minute", stats.buckets, now, ("submitted",)),
            ],
        )

    # -- jobs ---------------------------------------------------------------------------------
    @page("/ui/jobs")
    async def jobs(request: Request, viewer: Viewer) -> Response:
        params = request.query_params
        after = await live_after()
        state = params.get("state") or ""
        states = (JobState(state),) if state in {s.value for s in JobState} else ()
        filters = {
            "state": states[0].value if states else "",
            "job_type": _clean(params.get("job_type"), 100) or "",
            "queue": _clean(params.get("queue"), 100) or "",
            "created_by": _clean(params.get("created_by"), 200) or "",
            "q": _clean(params.get("q"), 64) or "",
        }
        internal = sees_internal(viewer.key)
        message = None
        before = _parse_cursor(params.get("before"))
        prefix = filters["q"].lower()
        query = JobQuery(
            states=states,
            job_type=filters["job_type"] or None,
            queue=filters["queue"] or None,
            created_by=filters["created_by"] or None,
            limit=PAGE_SIZE + 1,
            include_internal=internal,
        )
        counting = store.state_counts(COUNT_CAP)
        typing = store.list_job_types()
        rows: list[Job]
        if prefix and not all(ch in "0123456789abcdef" for ch in prefix):
            counts, types = await asyncio.gather(counting, typing)
            rows = []
            message = f"{filters['q']!r} is not a job id or id prefix (hex digits)"
        else:
            rows, counts, types = await asyncio.gather(
                store.browse_jobs(query, before, prefix or None), counting, typing
            )
            if prefix and not rows:
                message = f"No job id starts with {filters['q']!r} (with these filters)"
        more = _cursor_text(rows[PAGE_SIZE - 1]) if len(rows) > PAGE_SIZE else None
        rows = rows[:PAGE_SIZE]
        kept = {k: v for k, v in filters.items() if v}
        return render(
            request,
            viewer,
            "jobs.html",
            active="jobs",
            after=after,
            jobs=rows,
            filters=filters,
            states=list(JobState),
            counts=counts,
            next_url=("?" + urlencode({**kept, "before": more})) if more else None,
            first_url=("?" + urlencode(kept)) if before else None,
            job_types=[t.job_type for t in types],
            message=message,
        )

    @page("/ui/jobs/{job_id}")
    async def job_detail(request: Request, viewer: Viewer) -> Response:
        job_id = request.path_params["job_id"]
        after = await live_after()
        job = await store.get(job_id)
        if is_internal(job.job_type) and not sees_internal(viewer.key):
            raise _not_found(job_id)
        runs = await store.executions(job_id)
        assert job.created_at is not None
        until = (job.completed_at or conveyor.now()) + timedelta(seconds=5)
        events = await store.job_events(
            job_id, job.created_at - timedelta(seconds=1), until, JOB_EVENTS_SHOWN
        )
        children = await store.job_children(job_id, CHILDREN_SHOWN)
        return render(
            request,
            viewer,
            "job.html",
            active="jobs",
            after=after,
            job=job,
            data=job_dict(job),
            runs=runs,
            events=events,
            children=children,
            cancellable=job.state in (JobState.PENDING, JobState.BLOCKED, JobState.RUNNING),
            retryable=job.state is JobState.FAILED,
        )

    # -- queues and workers -------------------------------------------------------------------
    @page("/ui/queues")
    async def queues(request: Request, viewer: Viewer) -> Response:
        after = await live_after()
        # Settings only (queue_settings): list_queues would count every pending
        # job for numbers this page reads, bounded, from queue_depths.
        (depths, complete), everyone, settings = await asyncio.gather(
            store.queue_depths(
                (JobState.PENDING, JobState.RUNNING, JobState.BLOCKED),
                QUEUE_SCAN_CAP,
            ),
            store.list_workers(),
            store.queue_settings(),
        )
        fleet = [w for w in everyone if is_alive(w, conveyor.deps)]
        rows = _queue_rows(depths)
        served = {q for w in fleet for q in w.queues}
        names = sorted({r["queue"] for r in rows} | served | set(conveyor.settings.queues))
        controls = {q.name: q for q in settings}
        names = sorted(set(names) | set(controls))
        by_name = {r["queue"]: r for r in rows}
        table = []
        for name in names:
            row = by_name.get(name) or {"queue": name, "pending": 0, "running": 0, "blocked": 0}
            row["workers"] = [w.id for w in fleet if name in w.queues]
            control = controls.get(name)
            row["paused"] = bool(control and control.paused)
            row["concurrency_limit"] = control.concurrency_limit if control else None
            table.append(row)
        return render(
            request,
            viewer,
            "queues.html",
            active="queues",
            after=after,
            queues=table,
            complete=complete,
        )

    @page("/ui/workers")
    async def workers_page(request: Request, viewer: Viewer) -> Response:
        after = await live_after()
        now = conveyor.now()
        local = {w.id: w for w in workers}
        rows: list[dict[str, Any]] = []
        for w in await store.list_workers():
            here = local.get(w.id)
            rows.append(
                {
                    "info": w,
                    "alive": is_alive(w, conveyor.deps),
                    "heartbeat_age": None
                    if w.heartbeat_at is None
                    else (now - w.heartbeat_at).total_seconds(),
                    # Live for this process's workers, else as of their last heartbeat.
                    "stuck": here.stuck_jobs() if here is not None else w.stuck_jobs,
                }
            )
        rows.sort(key=lambda r: (not r["alive"], r["info"].id))
        return render(request, viewer, "workers.html", active="workers", after=after, workers=rows)

    # -- dead letters -------------------------------------------------------------------------
    @page("/ui/dlq")
    async def dlq(request: Request, viewer: Viewer) -> Response:
        params = request.query_params
        after = await live_after()
        job_type = _clean(params.get("job_type"), 100)
        before = _parse_cursor(params.get("before"))
        query = JobQuery(
            states=(JobState.FAILED,),
            job_type=job_type,
            limit=PAGE_SIZE + 1,
            include_internal=sees_internal(viewer.key),
        )
        rows, counts, types = await asyncio.gather(
            store.browse_jobs(query, before), store.state_counts(COUNT_CAP), store.list_job_types()
        )
        more = _cursor_text(rows[PAGE_SIZE - 1]) if len(rows) > PAGE_SIZE else None
        kept = {"job_type": job_type} if job_type else {}
        return render(
            request,
            viewer,
            "dlq.html",
            active="dlq",
            after=after,
            jobs=rows[:PAGE_SIZE],
            job_type=job_type or "",
            size=counts[JobState.FAILED],
            job_types=[t.job_type for t in types],
            next_url=("?" + urlencode({**kept, "before": more})) if more else None,
            first_url=("?" + urlencode(kept)) if before else None,
        )

    # -- webhooks --------------------------------------------------------------------------------
    @page("/ui/webhooks")
    async def webhooks(request: Request, viewer: Viewer) -> Response:
        after = await live_after()
        hooks = [webhook_dict(w) for w in await store.list_webhooks()] if viewer.can_admin else []
        return render(request, viewer, "webhooks.html", active="webhooks", after=after, hooks=hooks)

    @page("/ui/webhooks/{webhook_id}")
    async def webhook_detail(request: Request, viewer: Viewer) -> Response:
        webhook_id = request.path_params["webhook_id"]
        after = await live_after()
        if not viewer.can_admin:
            return render(
                request,
                viewer,
                "error.html",
                http_status=403,
                title="Admin key needed",
                message="Webhooks are managed with an admin API key.",
            )
        hook = webhook_dict(await store.get_webhook(webhook_id))
        deliveries = await store.list_deliveries(webhook_id, 100)
        return render(
            request,
            viewer,
            "webhook.html",
            active="webhooks",
            after=after,
            hook=hook,
            deliveries=deliveries,
        )

    # -- workflows ------------------------------------------------------------------------------
    @page("/ui/workflows")
    async def workflows(request: Request, viewer: Viewer) -> Response:
        params = request.query_params
        after = await live_after()
        status = params.get("status") or None
        if status not in (None, "running", "completed", "failed", "cancelled"):
            status = None
        name = _clean(params.get("name"), 100)
        try:
            offset = max(0, min(int(params.get("offset") or 0), 10_000_000))
        except ValueError:
            offset = 0
        rows, total = await conveyor.workflows.list(
            status=status, name=name, limit=PAGE_SIZE, offset=offset
        )
        kept = {k: v for k, v in (("status", status), ("name", name)) if v}
        return render(
            request,
            viewer,
            "workflows.html",
            active="workflows",
            after=after,
            workflows=[workflow_dict(w) for w in rows],
            total=total,
            status=status or "",
            name=name or "",
            offset=offset,
            next_url="?" + urlencode({**kept, "offset": offset + PAGE_SIZE})
            if offset + PAGE_SIZE < total
            else None,
            prev_url="?" + urlencode({**kept, "offset": max(0, offset - PAGE_SIZE)})
            if offset
            else None,
        )

    @page("/ui/workflows/{workflow_id}")
    async def workflow_detail(request: Request, viewer: Viewer) -> Response:
        workflow_id = request.path_params["workflow_id"]
        after = await live_after()
        wf = await conveyor.workflows.get(workflow_id, results=False)
        steps = wf.steps or []
        return render(
            request,
            viewer,
            "workflow.html",
            active="workflows",
            after=after,
            wf=workflow_dict(wf),
            steps=steps,
            dag=layered_dag(steps),
            step_jobs=[s.job_id for s in steps],
        )

    # -- locks --------------------------------------------------------------------------------
    @page("/ui/schedules")
    async def schedules(request: Request, viewer: Viewer) -> Response:
        after = await live_after()
        now = conveyor.now()
        rows = [
            schedule_dict(s, s.spec().upcoming(now, UPCOMING_FIRES) if s.state == "active" else [])
            for s in await store.list_schedules()
        ]
        return render(
            request, viewer, "schedules.html", active="schedules", after=after, schedules=rows
        )

    @page("/ui/locks")
    async def locks(request: Request, viewer: Viewer) -> Response:
        rows = (
            [r.to_dict() for r in await conveyor.list_locks(limit=500)]
            if viewer.can_admin
            else None
        )
        return render(request, viewer, "locks.html", active="locks", after=None, locks=rows)

    # -- actions (JSON, CSRF-checked) -------------------------------------------------------
    async def acting(request: Request, scope: KeyScope) -> dict[str, Any]:
        if not sessions.csrf_ok(request, request.headers.get("x-csrf-token")):
            raise ActionError(403, "Missing or wrong CSRF token: reload the page")
        viewer, _ = await sessions.viewer(request)
        if viewer is None:
            raise ActionError(401, "Log in first")
        if not viewer.allows(scope):
            raise ActionError(403, f"This needs an API key with scope '{scope.value}'")
        body = await _body(request)
        body["_internal"] = sees_internal(viewer.key)
        body["_actor"] = viewer.key.name if viewer.key is not None else "anonymous"
        return body

    def action(path: str, scope: KeyScope) -> Callable[[Any], Any]:
        def decorate(
            fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
        ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
            async def endpoint(request: Request) -> Response:
                try:
                    body = await acting(request, scope)
                    # Audited as the session's key (docs/security.md, "Audit log").
                    with acting_as(body["_actor"], AUDIT_REQUEST_ID.get()):
                        out = await fn(body)
                except ActionError as exc:
                    return _json_error(exc.status, exc.error)
                except ValidationError as exc:
                    return _json_error(400, exc.message)
                except NotFound as exc:
                    return _json_error(404, str(exc))
                except InvalidTransition as exc:
                    return _json_error(409, str(exc))
                except StoreUnavailable as exc:
                    return _json_error(503, f"Storage unavailable ({exc.reason}); retry shortly")
                return JSONResponse({"success": True, **out})

            endpoint.__name__ = "action_" + fn.__name__
            router.add_api_route(path, endpoint, methods=["POST"])
            return fn

        return decorate

    async def visible_ids(body: dict[str, Any]) -> list[str]:
        ids = body.get("ids")
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= MAX_IDS
            or not all(isinstance(i, str) and 1 <= len(i) <= 64 and i.isalnum() for i in ids)
        ):
            raise ActionError(400, f"ids must be a list of 1-{MAX_IDS} job ids")
        return list(dict.fromkeys(ids))

    async def each(
        body: dict[str, Any], audit_action: str, op: Callable[[str], Awaitable[str]]
    ) -> dict[str, Any]:
        done: dict[str, str] = {}
        errors: dict[str, str] = {}
        for job_id in await visible_ids(body):
            try:
                job = await store.get(job_id)
                if is_internal(job.job_type) and not body["_internal"]:
                    raise _not_found(job_id)
                async with conveyor.audit.change(audit_action, "job", job_id, DASHBOARD):
                    done[job_id] = await op(job_id)
            except (NotFound, InvalidTransition, ValidationError) as exc:
                errors[job_id] = str(exc)
        return {"done": done, "errors": errors}

    @action("/ui/actions/jobs/cancel", KeyScope.WRITE)
    async def cancel_jobs(body: dict[str, Any]) -> dict[str, Any]:
        async def op(job_id: str) -> str:
            return (await conveyor.cancel(job_id, "cancelled from the dashboard")).status

        return await each(body, "job.cancel", op)

    @action("/ui/actions/jobs/retry", KeyScope.WRITE)
    async def retry_jobs(body: dict[str, Any]) -> dict[str, Any]:
        async def op(job_id: str) -> str:
            (job,) = await store.retry_failed([job_id], conveyor.now())
            conveyor.notify_listeners()
            return job.status

        return await each(body, "job.retry", op)

    @action("/ui/actions/dlq/purge", KeyScope.ADMIN)
    async def purge_jobs(body: dict[str, Any]) -> dict[str, Any]:
        async def op(job_id: str) -> str:
            await store.purge_failed([job_id], conveyor.now())
            return "purged"

        return await each(body, "dlq.purge", op)

    def type_of(body: dict[str, Any]) -> str | None:
        job_type = body.get("job_type")
        if job_type in (None, ""):
            return None
        if not isinstance(job_type, str) or len(job_type) > 100:
            raise ActionError(400, "job_type must be a job type name (text)")
        return job_type

    def internal_asked(body: dict[str, Any], job_type: str | None) -> bool:
        """Conveyor's own dead letters (webhook deliveries) are in a bulk action
        only when an admin asks: ``include_internal: true`` or their type picked."""
        asked = body.get("include_internal") is True or (
            job_type is not None and is_internal(job_type)
        )
        if asked and not body["_internal"]:
            raise ActionError(403, "Conveyor's own jobs need an admin key")
        return asked

    @action("/ui/actions/dlq/retry-all", KeyScope.WRITE)
    async def retry_all(body: dict[str, Any]) -> dict[str, Any]:
        job_type = type_of(body)
        internal = internal_asked(body, job_type)
        retried = await conveyor.retry_dead_letters(job_type, include_internal=internal)
        summary = {**DASHBOARD, "job_type": job_type, "retried": retried}
        await conveyor.audit.record("dlq.retry_all", "dlq", job_type or "*", summary)
        return {"retried": retried}

    @action("/ui/actions/dlq/purge-all", KeyScope.ADMIN)
    async def purge_all(body: dict[str, Any]) -> dict[str, Any]:
        job_type = type_of(body)
        internal = internal_asked(body, job_type)
        purged = 0
        while True:
            batch = await store.browse_jobs(
                JobQuery(
                    states=(JobState.FAILED,),
                    job_type=job_type,
                    limit=500,
                    include_internal=internal,
                ),
                None,
            )
            if not batch:
                summary = {**DASHBOARD, "job_type": job_type, "purged": purged}
                await conveyor.audit.record("dlq.purge_all", "dlq", job_type or "*", summary)
                return {"purged": purged}
            purged += await store.purge_failed([j.id for j in batch], conveyor.now())

    def id_of(body: dict[str, Any]) -> str:
        value = body.get("id")
        # Webhook ids are "wh_<hex>": "_" and "-" besides ASCII letters and digits.
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= 64
            or not value.isascii()
            or not value.replace("_", "").replace("-", "").isalnum()
        ):
            raise ActionError(400, "id must be an id (letters, digits, '_' and '-')")
        return value

    @action("/ui/actions/webhooks/enable", KeyScope.ADMIN)
    async def enable_webhook(body: dict[str, Any]) -> dict[str, Any]:
        webhook_id = id_of(body)
        async with conveyor.audit.change("webhook.enable", "webhook", webhook_id, DASHBOARD):
            enabled = await enable_and_replay(conveyor.deps, webhook_id)
        return {"state": enabled.webhook.state.value, "replayed": enabled.replayed}

    def queue_of(body: dict[str, Any]) -> str:
        value = body.get("id")
        if not isinstance(value, str) or not 1 <= len(value) <= 100:
            raise ActionError(400, "id must be a queue name")
        return value

    @action("/ui/actions/queues/pause", KeyScope.WRITE)
    async def pause_queue(body: dict[str, Any]) -> dict[str, Any]:
        name = queue_of(body)
        async with conveyor.audit.change("queue.pause", "queue", name, DASHBOARD):
            return {"paused": (await store.set_queue(name, conveyor.now(), paused=True)).paused}

    @action("/ui/actions/queues/resume", KeyScope.WRITE)
    async def resume_queue(body: dict[str, Any]) -> dict[str, Any]:
        name = queue_of(body)
        async with conveyor.audit.change("queue.resume", "queue", name, DASHBOARD):
            q = await store.set_queue(name, conveyor.now(), paused=False)
        return {"paused": q.paused}

    @action("/ui/actions/schedules/pause", KeyScope.WRITE)
    async def pause_a_schedule(body: dict[str, Any]) -> dict[str, Any]:
        schedule_id = id_of(body)
        async with conveyor.audit.change("schedule.pause", "schedule", schedule_id, DASHBOARD):
            return {"state": (await pause_schedule(conveyor, schedule_id)).state}

    @action("/ui/actions/schedules/resume", KeyScope.WRITE)
    async def resume_a_schedule(body: dict[str, Any]) -> dict[str, Any]:
        schedule_id = id_of(body)
        async with conveyor.audit.change("schedule.resume", "schedule", schedule_id, DASHBOARD):
            return {"state": (await resume_schedule(conveyor, schedule_id)).state}

    @action("/ui/actions/workflows/cancel", KeyScope.WRITE)
    async def cancel_workflow(body: dict[str, Any]) -> dict[str, Any]:
        workflow_id = id_of(body)
        async with conveyor.audit.change("workflow.cancel", "workflow", workflow_id, DASHBOARD):
            wf = await conveyor.workflows.cancel(workflow_id)
        return {"status": wf.status.value}

    @action("/ui/actions/workflows/retry", KeyScope.WRITE)
    async def retry_workflow(body: dict[str, Any]) -> dict[str, Any]:
        workflow_id = id_of(body)
        async with conveyor.audit.change("workflow.retry", "workflow", workflow_id, DASHBOARD):
            wf = await conveyor.workflows.retry(workflow_id)
        return {"status": wf.status.value}

    return router


@dataclass(frozen=True, slots=True)
class _Overview:
    """The overview's reads, shared between viewers for ``OVERVIEW_TTL`` seconds."""

    now: datetime
    after: int
    counts: dict[JobState, Count]
    stats: RecentStats
    fleet: list[WorkerInfo]
    depths: dict[tuple[str, JobState], int]
    complete: bool


def _queue_rows(depths: dict[tuple[str, JobState], int]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for (queue, state), n in depths.items():
        row = rows.setdefault(queue, {"queue": queue, "pending": 0, "running": 0, "blocked": 0})
        row[state.value] = row.get(state.value, 0) + n
    return [rows[q] for q in sorted(rows)]


def _not_found(job_id: str) -> NotFound:
    return JobNotFound(job_id)


def _safe_next(raw: Any) -> str:
    """Only a local path: never an open redirect."""
    if not isinstance(raw, str) or not raw.startswith("/") or raw.startswith("//"):
        return "/"
    if "\\" in raw or any(ord(ch) < 32 for ch in raw) or len(raw) > 500:
        return "/"
    return raw


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise ActionError(400, "The body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ActionError(400, "The body must be a JSON object")
    return body


def _json_error(status: int, error: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": error}, status_code=status)


__all__ = ["DEFAULT_NAV", "NavItem", "dashboard_router"]
