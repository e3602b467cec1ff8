"""The REST API: ``create_app(conveyor)`` builds a FastAPI app (no module-level app).

Contract: ``docs/api.md``. Every response is JSON with ``success``; errors
carry ``error`` (a sentence a person can act on) and, for validation,
``details`` (``[{field, message}]``). Bad input never writes anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.audit import AuthFailureBursts, RequestId, audit_router
from conveyor.api.events import event_router
from conveyor.api.guard import (
    BrowserGuard,
    CatchAll,
    HostPolicy,
    internal_error_text,
    report_unexpected,
)
from conveyor.api.http import JSON, ApiError, Auth, fail, sees_internal
from conveyor.api.locks import lock_router
from conveyor.api.models import ErrorResponse, JobSubmit, submit_delay
from conveyor.api.queues import queue_router
from conveyor.api.ratelimit import RequestLimits
from conveyor.api.schedules import schedule_router
from conveyor.api.secrets import secrets_router
from conveyor.api.workflows import workflow_router
from conveyor.app import Conveyor
from conveyor.dashboard import dashboard_router
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import (
    ConveyorError,
    FieldError,
    InvalidTransition,
    JobNotFound,
    NotFound,
    StoreUnavailable,
    ValidationError,
)
from conveyor.domain.job import Job, JobQuery, is_internal
from conveyor.domain.states import JobState, parse_states
from conveyor.observability.fleet import FleetExporter
from conveyor.observability.metrics import Metrics
from conveyor.observability.tracing import TraceContextMiddleware
from conveyor.presenters import iso, job_dict, page_dict, worker_dict
from conveyor.runtime.flow import held_dict
from conveyor.runtime.hub import EventHub
from conveyor.runtime.status import is_alive
from conveyor.runtime.worker import Worker
from conveyor.security.redact import redact

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
RETRY_AFTER_SECONDS = 1  #: Retry-After of a 503 (store unavailable or full)
MAX_OFFSET = 2**31 - 1


# -- middleware (plain ASGI: cheap, and sees every request) ------------------------------
class NoNul:
    """400 for a URL with a NUL character (``%00``) in its path or query: no id,
    name or filter holds one, and PostgreSQL can't even compare against it, so
    every backend answers alike and at once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "")
            or b"%00" in scope.get("query_string", b"")
            or b"\x00" in scope.get("query_string", b"")
        ):
            response = fail(400, "URLs must not contain NUL characters (%00)")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        # No declared length (chunked): read the body here, so an oversize one
        # gets its 413 before the app starts parsing it.
        buffered: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = fail(413, f"Request body is larger than {self.limit} bytes")
        await response(scope, receive, send)


class Timing:
    """HTTP request duration histogram, labelled by route template (not raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.metrics.http_duration.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)
            ).observe(time.perf_counter() - start)


def _details_from_pydantic(errors: Any) -> list[FieldError]:
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        message = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            field, message = "body", "Malformed JSON: " + str(err.get("ctx", {}).get("error", ""))
        elif err.get("type") == "extra_forbidden":
            message = "Unknown field"
        out.append(FieldError(field, message))
    return out


# -- the app -------------------------------------------------------------------------------
def create_app(
    conveyor: Conveyor,
    *,
    allow_anonymous: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: Metrics | None = None,
    workers: Sequence[Worker] = (),
) -> FastAPI:
    """Build the API for ``conveyor``. The caller owns the Conveyor (and its workers).

    ``workers``: the workers running in this process (``conveyor up``); ``/ready``
    and ``/metrics`` report their stuck handlers, and ``/ready`` answers 503 once
    one of them has reached ``max_stuck_jobs`` (it is about to exit)."""
    metrics = metrics or Metrics()
    exporter = FleetExporter(metrics, conveyor.deps, workers=lambda: workers)
    auth = Auth(conveyor, allow_anonymous=allow_anonymous)
    auth.limits = RequestLimits.from_settings(conveyor.settings)
    failed_auth = AuthFailureBursts(conveyor)
    auth.on_failure = failed_auth.hit
    hub = EventHub(
        conveyor.store,
        poll_interval=conveyor.settings.event_poll_interval,
        queue_size=conveyor.settings.ws_queue_size,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await conveyor.open()
        conveyor.on_events_written(hub.wake)
        try:
            yield
        finally:
            conveyor.remove_events_listener(hub.wake)
            await failed_auth.close()
            await hub.close()
            await exporter.close()

    # /docs and /redoc with their scripts served from the package: servers often
    # have no internet, and a CDN-loaded page is blank there.
    api: FastAPI = FastAPIOffline(
        title="Conveyor",
        version="0.1.0",
        description="Durable jobs, workflows and events. Contract: docs/api.md.",
        lifespan=lifespan,
        default_response_class=JSON,
    )
    api.state.conveyor = conveyor
    api.state.hub = hub
    api.state.metrics = metrics
    api.state.failed_auth = failed_auth
    read = [Depends(auth.require(KeyScope.READ))]
    write = [Depends(auth.require(KeyScope.WRITE))]
    admin = [Depends(auth.require(KeyScope.ADMIN))]

    # -- errors: one envelope everywhere --------------------------------------------------
    @api.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return fail(exc.status, exc.error, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        details = _details_from_pydantic(exc.errors())
        summary = "; ".join(f"{d.field}: {d.message}" for d in details[:5])
        return fail(400, f"Invalid request: {summary}", details)

    @api.exception_handler(ValidationError)
    async def _domain_validation(_: Request, exc: ValidationError) -> Response:
        return fail(400, exc.message, list(exc.details))

    @api.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> Response:
        return fail(404, str(exc))

    @api.exception_handler(InvalidTransition)
    async def _conflict(_: Request, exc: InvalidTransition) -> Response:
        return fail(409, str(exc))

    @api.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, exc: StoreUnavailable) -> Response:
        return store_unavailable(exc)

    @api.exception_handler(ConveyorError)
    async def _conveyor_error(request: Request, exc: ConveyorError) -> Response:
        # The message may name a file or server: it goes to the log, not the caller.
        reference = report_unexpected(exc, request.method, request.url.path)
        return fail(500, internal_error_text(reference))

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            allowed = allowed_methods(api, request.scope)
            headers["Allow"] = ", ".join(allowed)
            message = f"Method {request.method} not allowed on this URL; use {headers['Allow']}"
        else:
            message = {404: "Not found: check the URL (see /docs)"}.get(
                exc.status_code, str(exc.detail)
            )
        return fail(exc.status_code, message, headers=headers or None)

    # Unexpected exceptions: CatchAll (below) answers 500 and logs once, cheaply.

    # -- service endpoints ------------------------------------------------------------------
    @api.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"success": True, "status": "ok"}

    @api.get("/ready", tags=["service"], responses={503: {"description": "Not ready"}})
    async def ready() -> Response:
        """Readiness: the store answers. The bus is reported; jobs run without it."""
        try:
            await conveyor.store.count_by_state()
        except StoreUnavailable as exc:
            return store_unavailable(exc)
        except ConveyorError as exc:
            reference = report_unexpected(exc, "GET", "/ready")
            return fail(503, f"Store not ready ({internal_error_text(reference)})")
        try:
            health = await asyncio.wait_for(conveyor.bus.health(), 2.0)
            bus = {"backend": health.backend, "ok": health.ok, **dict(health.detail)}
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            bus = {"backend": conveyor.bus.backend, "ok": False, "error": redact(str(exc))}
        local = [
            {
                "worker_id": w.id,
                "jobs_running": w.jobs_running,
                "stuck_jobs": w.stuck_jobs(),
                "stopping": w.stopping,
            }
            for w in workers
        ]
        body: dict[str, Any] = {"success": True, "status": "ready", "store": "ok", "bus": bus}
        if local:
            body["workers"] = local
        limit = conveyor.settings.max_stuck_jobs
        if any(w.stopping or w.stuck_jobs() >= (limit or w.concurrency) for w in workers):
            return JSON(
                {**body, "success": False, "status": "not_ready", "error": _STUCK_ERROR},
                status_code=503,
            )
        return JSON(body)

    @api.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        await exporter.refresh()
        if metrics.fleet.snapshot is not None:  # this process exports the fleet gauges
            held = held_dict(await conveyor.store.flow_stats(conveyor.now()))
            metrics.set_held({k: v for k, v in held.items() if k != "total"})
        else:
            metrics.set_held({})
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def visible(job_id: str, request: Request) -> Job:
        """The job, or 404 for one the caller may not see: Conveyor's own jobs are
        for admin keys (or keyless loopback use) only, whatever the route."""
        job = await conveyor.store.get(job_id)
        if is_internal(job.job_type) and not _sees_internal(request):
            raise JobNotFound(job_id)
        return job

    # -- jobs ---------------------------------------------------------------------------------
    @api.post(
        "/api/jobs",
        status_code=201,
        dependencies=write,
        tags=["jobs"],
        responses={
            200: {"description": "Duplicate idempotency key: existing job"},
            400: {"description": "Invalid job"},
        },
    )
    async def submit_job(body: JobSubmit, request: Request) -> Response:
        """Submit a job."""
        return await submit(body, request, created=201)

    @api.post(
        "/api/jobs/submit",
        status_code=200,
        dependencies=write,
        tags=["jobs"],
        responses={400: {"description": "Invalid job"}},
    )
    async def submit_job_seed_route(body: JobSubmit, request: Request) -> Response:
        """Submit a job: ``POST /api/jobs`` under the job-management seed's path,
        answering 200 (as its clients expect) for a new job too."""
        return await submit(body, request, created=200)

    async def submit(body: JobSubmit, request: Request, *, created: int) -> Response:
        key = getattr(request.state, "api_key", None)
        created_by = f"api:{key.name}" if key else "api"
        user = request.headers.get("x-user-id")
        if user and conveyor.settings.trust_user_header:
            created_by = user  # checked like any created_by (length, NUL) below
        delay = submit_delay(body.delay_ms, body.scheduled_at)
        result = await conveyor.submit(
            body.job_type,
            body.payload,
            priority=body.priority,
            max_retries=body.max_retries,
            timeout_ms=body.timeout_ms,
            run_at=body.scheduled_at,
            delay=delay,
            queue=body.queue,
            idempotency_key=body.idempotency_key,
            depends_on=body.depends_on or (),
            metadata=body.metadata,
            created_by=created_by,
            concurrency_key=body.concurrency_key,
            requires=body.requires,
        )
        job = result.job
        summary = {"job_type": job.job_type, "queue": job.queue, "duplicate": result.duplicate}
        await conveyor.audit.record("job.submit", "job", job.id, summary)
        content = {
            "success": True,
            "job_id": job.id,
            "status": job.status,
            "created_at": iso(job.created_at),
            "duplicate": result.duplicate,
        }
        return JSON(content, status_code=200 if result.duplicate else created)

    @api.get("/api/jobs/metrics", dependencies=read, tags=["jobs"])
    async def job_metrics() -> dict[str, Any]:
        """Queue depths, worker health, 24 h statistics, throughput, error rates."""
        now = conveyor.now()
        counts = await conveyor.store.count_by_state()
        workers = await conveyor.store.list_workers()
        day = await conveyor.store.activity(now - timedelta(hours=24))
        hour = await conveyor.store.activity(now - timedelta(hours=1))
        depths: dict[str, int] = {s.value: n for s, n in counts.items()}
        depths["dlq"] = counts[JobState.FAILED]
        depths["processing"] = counts[JobState.RUNNING]  # the seed's name for running

        def completed(a: Any) -> int:
            return sum(n for (_t, s), n in a.finished.items() if s is JobState.COMPLETED)

        return {
            "success": True,
            "metrics": {
                "queue_depths": depths,
                "worker_health": [
                    worker_dict(w, alive=is_alive(w, conveyor.deps))
                    for w in workers
                    if w.state == "running"
                ],
                "statistics": {
                    "submitted": day.submitted,
                    **day.by_state(),
                    # Both windows by name (the job-management seed's shape).
                    "last_24h": {"submitted": day.submitted, **day.by_state()},
                    "last_hour": {"submitted": hour.submitted, **hour.by_state()},
                },
                "throughput": {
                    "last_hour": round(completed(hour) / 60, 3),
                    "last_24h": round(completed(day) / 1440, 3),
                },
                "error_rates": day.error_rates(),
                "flow_control": held_dict(await conveyor.store.flow_stats(now)),
                "timestamp": iso(now),
            },
        }

    @api.get("/api/jobs", dependencies=read, tags=["jobs"])
    async def list_jobs(
        request: Request,
        status: Annotated[
            str | None,
            # parse_states names the allowed values; a pattern's message shows a regex.
            Query(
                description="Comma-separated states",
                min_length=1,
                max_length=200,
                json_schema_extra={"pattern": _STATUS_PATTERN},
            ),
        ] = None,
        job_type: Annotated[str | None, Query(max_length=100)] = None,
        queue: Annotated[str | None, Query(max_length=100)] = None,
        created_by: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        sort: Annotated[
            Literal["created_at", "updated_at", "priority", "run_at", "completed_at", "job_type"],
            Query(),
        ] = "created_at",
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        include_internal: Annotated[
            bool, Query(description="Also Conveyor's own jobs (admin keys only).")
        ] = False,
    ) -> dict[str, Any]:
        """List jobs with filters and pagination."""
        states = parse_states(status)
        internal = _internal_asked(request, include_internal)
        page = await conveyor.store.list_jobs(
            JobQuery(
                states=states,
                job_type=job_type,
                queue=queue,
                created_by=created_by,
                limit=limit,
                offset=offset,
                sort=sort,
                descending=order == "desc",
                include_internal=internal,
            )
        )
        return {
            "success": True,
            "jobs": [job_dict(j) for j in page.jobs],
            "pagination": page_dict(page),
        }

    @api.get(
        "/api/jobs/{job_id}",
        dependencies=read,
        tags=["jobs"],
        responses={404: {"description": "Unknown job"}},
    )
    async def get_job(job_id: str, request: Request) -> dict[str, Any]:
        """One job with its executions (Conveyor's own jobs: admin keys only)."""
        job = await visible(job_id, request)
        return {"success": True, "job": job_dict(job, await conveyor.store.executions(job_id))}

    @api.delete(
        "/api/jobs/{job_id}",
        dependencies=write,
        tags=["jobs"],
        responses={
            202: {"description": "Running: cancelling"},
            404: {"description": "Unknown job"},
            409: {"description": "Already finished"},
        },
    )
    async def cancel_job(
        job_id: str,
        request: Request,
        reason: Annotated[
            str | None,
            Query(
                max_length=500,
                description="Why: kept in metadata.cancel_reason, the error and the event.",
            ),
        ] = None,
    ) -> Response:
        """Cancel a job: pending/blocked at once (200), running once its worker confirms (202)."""
        await visible(job_id, request)
        try:
            async with conveyor.audit.change("job.cancel", "job", job_id, {"reason": reason}):
                job = await conveyor.cancel(job_id, reason or None)
        except InvalidTransition as exc:  # the seed's clients read `message`
            return JSON(
                {"success": False, "error": str(exc), "message": str(exc), "job_id": job_id},
                status_code=409,
            )
        running = job.status == "cancelling"
        message = (
            "Cancel requested: the job is cancelling until its worker confirms"
            if running
            else "Job cancelled"
        )
        return JSON(
            {"success": True, "job_id": job.id, "status": job.status, "message": message},
            status_code=202 if running else 200,
        )

    @api.post(
        "/api/jobs/{job_id}/retry",
        dependencies=write,
        tags=["jobs"],
        responses={404: {"description": "Unknown job"}, 409: {"description": "Not failed"}},
    )
    async def retry_job(job_id: str, request: Request) -> dict[str, Any]:
        """Re-queue a failed (dead-lettered) job."""
        await visible(job_id, request)
        async with conveyor.audit.change("job.retry", "job", job_id):
            (job,) = await conveyor.store.retry_failed([job_id], conveyor.now())
        conveyor.notify_listeners()
        return {"success": True, "job_id": job.id, "status": job.status}

    # -- dead-letter queue ------------------------------------------------------------------
    @api.get("/api/dlq", dependencies=read, tags=["dlq"])
    async def list_dlq(
        request: Request,
        job_type: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        include_internal: Annotated[
            bool, Query(description="Also Conveyor's own jobs (admin keys only).")
        ] = False,
    ) -> dict[str, Any]:
        """Dead-lettered jobs, most recent first."""
        page = await conveyor.store.list_jobs(
            JobQuery(
                states=(JobState.FAILED,),
                job_type=job_type,
                limit=limit,
                offset=offset,
                sort="updated_at",
                include_internal=_internal_asked(request, include_internal),
            )
        )
        return {
            "success": True,
            "jobs": [job_dict(j) for j in page.jobs],
            "pagination": page_dict(page),
        }

    @api.post("/api/dlq/retry-all", dependencies=write, tags=["dlq"])
    async def retry_all(
        request: Request,
        job_type: Annotated[str | None, Query(max_length=100)] = None,
        include_internal: Annotated[
            bool, Query(description="Also Conveyor's own jobs (admin keys only).")
        ] = False,
    ) -> dict[str, Any]:
        """Re-queue every dead-lettered job (optionally of one type). Conveyor's own
        (webhook deliveries) only for an admin key asking, by
        ``include_internal=true`` or by naming their type."""
        named = job_type is not None and is_internal(job_type)
        internal = _internal_asked(request, include_internal or named)
        retried = await conveyor.retry_dead_letters(job_type, include_internal=internal)
        # 1,000 jobs per transaction: one entry after them all, with the count.
        summary = {"job_type": job_type, "retried": retried, "include_internal": internal}
        await conveyor.audit.record("dlq.retry_all", "dlq", job_type or "*", summary)
        return {"success": True, "retried": retried}

    @api.post(
        "/api/dlq/{job_id}/retry",
        dependencies=write,
        tags=["dlq"],
        responses={404: {"description": "Unknown job"}, 409: {"description": "Not failed"}},
    )
    async def retry_dlq(job_id: str, request: Request) -> dict[str, Any]:
        """Re-queue one dead-lettered job."""
        return await retry_job(job_id, request)

    @api.delete(
        "/api/dlq/{job_id}",
        dependencies=admin,
        tags=["dlq"],
        responses={404: {"description": "Unknown job"}, 409: {"description": "Not failed"}},
    )
    async def purge_dlq(job_id: str) -> dict[str, Any]:
        """Delete one dead-lettered job for good (admin)."""
        async with conveyor.audit.change("dlq.purge", "job", job_id):
            n = await conveyor.store.purge_failed([job_id], conveyor.now())
        return {"success": True, "purged": n}

    api.include_router(event_router(conveyor, auth, hub))
    api.include_router(workflow_router(conveyor, auth))
    api.include_router(lock_router(conveyor, auth))
    api.include_router(schedule_router(conveyor, auth))
    api.include_router(secrets_router(conveyor, auth))
    api.include_router(dashboard_router(conveyor, auth, workers))
    api.include_router(queue_router(conveyor, auth))
    api.include_router(audit_router(conveyor, auth))
    document_errors(api)
    api.add_middleware(BodyLimit, limit=max_body_bytes)
    api.add_middleware(NoNul)
    allowed_hosts = conveyor.settings.allowed_hosts
    policy = HostPolicy(allowed_hosts, enforce=allow_anonymous or bool(allowed_hosts))
    api.add_middleware(BrowserGuard, policy=policy)
    api.add_middleware(TraceContextMiddleware)  # W3C traceparent header: the parent
    api.add_middleware(Timing, metrics=metrics)
    api.add_middleware(RequestId)  # the audit entries' request id (api/audit.py)
    api.add_middleware(CatchAll)  # outermost: sees every exception the app let through
    return api


def store_unavailable(exc: StoreUnavailable) -> Response:
    """503 with ``Retry-After``; the reason names no file, server or credential."""
    return fail(
        503,
        f"Storage unavailable ({exc.reason}); retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        # FastAPI keeps an included router as one entry (its routes are mounted
        # without a prefix here, so their own paths are the request paths).
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat_routes(inner.routes)
        else:
            yield route


def allowed_methods(api: FastAPI, scope: Scope) -> list[str]:
    """The methods of the resource at this request's path, for ``Allow``: every
    route with the path template of the first route matching it (Starlette's
    own 405 names the methods of that one route only)."""
    template = None
    methods: set[str] = set()
    for route in _flat_routes(api.router.routes):
        path = getattr(route, "path", None)
        if template is None:
            match, _ = route.matches(scope)
            if match is Match.NONE:
                continue
            template = path
        if path == template:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


_STUCK_ERROR = (
    "A worker of this process is stopping or its slots are held by stuck handlers; "
    "see the log (worker_stuck_handlers)"
)
_STATES = "(blocked|pending|running|cancelling|completed|failed|cancelled)"
_STATUS_PATTERN = f"^{_STATES}(,{_STATES})*$"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERROR_TEXT = {
    "400": "Invalid input (details name each field)",
    "401": "Missing, invalid or revoked API key",
    "403": "The API key's scope is too low, or a cross-origin request",
    "404": "Unknown id",
    "409": "The job is not in a state that allows this",
    "413": "Request body too large",
    "415": "The body must be JSON with Content-Type: application/json",
    "421": "The Host header is not allowed (CONVEYOR_ALLOWED_HOSTS)",
    "429": "Rate limit: too many requests or failed authentications (see Retry-After)",
    "503": "Store unavailable",
}


def document_errors(api: FastAPI) -> None:
    """Declare the error envelope in the OpenAPI schema, in place of FastAPI's 422."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema:
            return api.openapi_schema
        schema = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        defs = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(defs.pop("$defs", {}))
        schemas["ErrorResponse"] = defs
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                codes = {"400", "421"}
                if path.startswith("/api/"):
                    codes |= {"401", "403", "429", "503"}
                    # Optional when the API allows anonymous loopback use.
                    op["security"] = [{"bearer": []}, {}]
                if "{job_id}" in path:
                    codes |= {"404", "409"} if method in ("delete", "post") else {"404"}
                if "requestBody" in op:
                    codes.add("413")
                if method in ("post", "put", "patch", "delete"):
                    codes.add("415")
                for code in codes:
                    entry = responses.setdefault(code, {"description": _ERROR_TEXT[code]})
                    entry["content"] = {"application/json": {"schema": _ERROR_REF}}
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def _sees_internal(request: Request) -> bool:
    return sees_internal(getattr(request.state, "api_key", None))


def _internal_asked(request: Request, include_internal: bool) -> bool:
    """``include_internal=true`` from a caller allowed it; 403 for anyone else."""
    if include_internal and not _sees_internal(request):
        raise ApiError(403, "include_internal=true needs an admin API key")
    return include_internal
