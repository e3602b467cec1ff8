"""The ``conveyor`` command."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
import orjson
import prometheus_client
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from conveyor.app import Conveyor
from conveyor.auditing import acting_as, audited, cli_actor
from conveyor.cli.layout import dlq_table, jobs_table, printable
from conveyor.cli.loader import apply_app
from conveyor.cli.loop import run as run_loop
from conveyor.cli.schedules import scheduler as scheduler_command
from conveyor.cli.schedules import schedules as schedules_group
from conveyor.domain.errors import ConveyorError, ValidationError
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState, parse_states
from conveyor.observability.logging import configure_logging
from conveyor.presenters import job_dict, page_dict
from conveyor.runtime.status import collect_status
from conveyor.security.redact import redact, redact_url
from conveyor.settings import LOG_FORMATS, Settings

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class Ctx:
    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = overrides

    def settings(self, **more: Any) -> Settings:
        return Settings.from_env(**{**self.overrides, **more})

    def app(self, **more: Any) -> Conveyor:
        return Conveyor(settings=self.settings(**more))


def run(coro_fn: Callable[[Conveyor], Awaitable[T]], app: Conveyor) -> T:
    async def main() -> T:
        async with app:
            with acting_as(cli_actor()):  # the audit log's actor: cli:<os user>
                return await coro_fn(app)

    return run_loop(main(), app.settings.event_loop)


class ConveyorGroup(click.Group):
    """Turns ConveyorError into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConveyorError as exc:
            # Plain text: a message may hold brackets ("conveyor[postgres]") that rich
            # would take for markup, or a database URL whose password must not show.
            err.print(f"[bold red]Error:[/] {_plain(str(exc))}", highlight=False, soft_wrap=True)
            if isinstance(exc, ValidationError):
                for d in exc.details:
                    err.print(
                        f"  - {_plain(d.field)}: {_plain(d.message)}",
                        highlight=False,
                        soft_wrap=True,
                    )
            sys.exit(1)


def _plain(text: str) -> str:
    """``text`` safe to print with rich: secrets redacted, markup escaped, control
    characters visible."""
    return escape(printable(redact(text)))


def _table(title: str, columns: Sequence[str]) -> Table:
    """A table whose first column (an id) is never cut or wrapped, so it can be
    copied from any terminal width: the other columns fold to make room."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        if i == 0:
            table.add_column(col, no_wrap=True, overflow="ignore", min_width=len(col))
        else:
            table.add_column(col, overflow="fold")
    return table


def _add_row(table: Table, *cells: str | None) -> None:
    """A table row of plain text (job errors, names and payloads are not markup)."""
    table.add_row(*(escape(printable(c or "")) for c in cells))


def emit_json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@click.group(cls=ConveyorGroup)
@click.option(
    "--database-url",
    envvar="CONVEYOR_DATABASE_URL",
    default=None,
    help=(
        "sqlite:///./conveyor.db (default), postgresql://user:pass@host:5432/db "
        "(needs the postgres extra) or memory://"
    ),
)
@click.option(
    "--log-level",
    envvar="CONVEYOR_LOG_LEVEL",
    # A typo ("LOUD", "WARN ") used to fall back to INFO without a word.
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="CONVEYOR_LOG_FORMAT",
    type=click.Choice(LOG_FORMATS),
    default="console",
    show_default=True,
    help="console: readable lines; json: one JSON object per line (docs/operations.md).",
)
@click.version_option(package_name="conveyor")
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, log_level: str, log_format: str) -> None:
    """Conveyor: durable jobs for Python."""
    configure_logging(log_level, fmt=log_format)
    # No `_created` series beside each counter and histogram: a fifth of the scrape
    # for a timestamp nobody queries (this process is ours; a library user decides).
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    ctx.obj = Ctx({"database_url": database_url, "log_level": log_level, "log_format": log_format})


# -- worker ------------------------------------------------------------------------
@cli.command()
@click.argument("apps", nargs=-1, required=True)
@click.option("--concurrency", "-c", type=int, envvar="CONVEYOR_CONCURRENCY", default=None)
@click.option("--queue", "-q", "queues", multiple=True, help="Queue to serve (repeatable).")
@click.option("--heartbeat-interval", type=float, envvar="CONVEYOR_HEARTBEAT_INTERVAL")
@click.option("--heartbeat-timeout", type=float, envvar="CONVEYOR_HEARTBEAT_TIMEOUT")
@click.option("--shutdown-grace", type=float, envvar="CONVEYOR_SHUTDOWN_GRACE")
@click.option("--worker-id", default=None, help="Stable id (default: host-pid-random).")
@click.option("--no-maintenance", is_flag=True, help="Do not run the rescuer/pruner here.")
@click.option(
    "--isolation",
    type=click.Choice(["thread", "process"]),
    envvar="CONVEYOR_ISOLATION",
    default=None,
    help="Where handlers run unless their job type says: threads, or child processes.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="CONVEYOR_METRICS_PORT",
    default=None,
    help="Serve /metrics, /health and /ready on this port (0 = off, the default).",
)
@click.option(
    "--metrics-host",
    envvar="CONVEYOR_METRICS_HOST",
    default=None,
    help="Address of the metrics port (default 127.0.0.1; 0.0.0.0 for a scraper elsewhere).",
)
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    help="NAME=VALUE this worker offers to jobs with requirements (repeatable), e.g. gpu=a100.",
)
@click.pass_obj
def worker(
    obj: Ctx,
    apps: tuple[str, ...],
    concurrency: int | None,
    queues: tuple[str, ...],
    heartbeat_interval: float | None,
    heartbeat_timeout: float | None,
    shutdown_grace: float | None,
    worker_id: str | None,
    no_maintenance: bool,
    isolation: str | None,
    metrics_port: int | None,
    metrics_host: str | None,
    capabilities: tuple[str, ...],
) -> None:
    """Run a worker for the job types of APPS (module or module:attr)."""
    app = obj.app(
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        capabilities=capabilities or None,
        concurrency=concurrency,
        queues=queues or None,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        shutdown_grace=shutdown_grace,
    )
    for spec in apps:
        apply_app(app, spec)
    run_loop(
        app.run_worker(worker_id=worker_id, maintenance=not no_maintenance, isolation=isolation),
        app.settings.event_loop,
    )


# -- up / api -------------------------------------------------------------------------
def _serve(
    obj: Ctx,
    apps: tuple[str, ...],
    host: str,
    port: int,
    with_worker: bool,
    demo: bool,
    max_body_bytes: int,
    **settings: Any,
) -> None:
    from conveyor.cli.serve import serve_forever

    app = obj.app(**settings)
    for spec in (("conveyor.demo",) if demo else ()) + apps:
        apply_app(app, spec)
    if with_worker and not app.registry:
        raise click.UsageError("No job types to run: give --app MODULE or drop --no-demo")
    run_loop(
        serve_forever(
            app,
            host=host,
            port=port,
            with_worker=with_worker,
            # JSON logs: stderr carries only JSON lines (the banner is `api_started`).
            console=Console(stderr=True, quiet=True) if app.settings.log_format == "json" else err,
            max_body_bytes=max_body_bytes,
        ),
        app.settings.event_loop,
    )


_serve_options = [
    click.option("--host", default="127.0.0.1", show_default=True, envvar="CONVEYOR_HOST"),
    click.option(
        "--port",
        type=click.IntRange(1, 65535),
        default=8000,
        show_default=True,
        envvar="CONVEYOR_PORT",
    ),
    click.option("--app", "apps", multiple=True, help="Module with job handlers (repeatable)."),
    click.option(
        "--max-body-bytes",
        type=click.IntRange(min=1024),
        default=1024 * 1024,
        show_default=True,
        envvar="CONVEYOR_MAX_BODY_BYTES",
    ),
]


def serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_serve_options):
        fn = option(fn)
    return fn


@cli.command()
@serve_options
@click.option("--concurrency", "-c", type=int, envvar="CONVEYOR_CONCURRENCY", default=None)
@click.option("--no-demo", is_flag=True, help="Do not register the demo job types.")
@click.option(
    "--capability",
    "capabilities",
    multiple=True,
    help="NAME=VALUE the worker offers to jobs with requirements (repeatable).",
)
@click.pass_obj
def up(
    obj: Ctx,
    host: str,
    port: int,
    apps: tuple[str, ...],
    max_body_bytes: int,
    concurrency: int | None,
    no_demo: bool,
    capabilities: tuple[str, ...],
) -> None:
    """Run everything: REST API, a worker, the rescuer and pruner, in one process."""
    _serve(
        obj,
        apps,
        host,
        port,
        True,
        not no_demo,
        max_body_bytes,
        concurrency=concurrency,
        capabilities=capabilities or None,
    )


@cli.command()
@serve_options
@click.pass_obj
def api(obj: Ctx, host: str, port: int, apps: tuple[str, ...], max_body_bytes: int) -> None:
    """Serve the REST API only (workers run elsewhere)."""
    _serve(obj, apps, host, port, False, True, max_body_bytes)


# -- keys -------------------------------------------------------------------------------
@cli.group(cls=ConveyorGroup)
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), required=True)
@click.option("--name", default="default", show_default=True)
@click.option(
    "--expires-in",
    default=None,
    help="Refuse the key after this long: 90d, 12h, 30m, 2w (default: never).",
)
@click.pass_obj
def keys_create(obj: Ctx, scope: str, name: str, expires_in: str | None) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    from conveyor.security.api_keys import new_api_key, parse_duration

    lifetime = None if expires_in is None else parse_duration(expires_in)

    async def go(app: Conveyor) -> str:
        key, record = new_api_key(name, scope, app.now(), lifetime)
        summary = {"name": name, "scope": scope, "expires_in": lifetime}
        async with app.audit.change("api_key.create", "api_key", record.id, summary):
            await app.store.create_api_key(record)
        return key

    key = run(go, obj.app())
    err.print(
        f"Created {scope} key {_plain(repr(name))}. Store it now: it is not shown again.",
        highlight=False,
    )
    click.echo(key)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_list(obj: Ctx, as_json: bool) -> None:
    """List API keys (never the keys themselves)."""
    from conveyor.presenters import iso

    found = run(lambda a: a.store.list_api_keys(), obj.app())
    rows = [
        {
            "id": k.id,
            "name": k.name,
            "scope": k.scope.value,
            "prefix": k.prefix,
            "created_at": iso(k.created_at),
            "revoked_at": iso(k.revoked_at),
            "expires_at": iso(k.expires_at),
            "last_used_at": iso(k.last_used_at),
        }
        for k in found
    ]
    if as_json:
        emit_json(rows)
        return
    table = _table(
        "API keys",
        ("id", "name", "scope", "prefix", "created", "revoked", "expires", "last used"),
    )
    for r in rows:
        _add_row(
            table,
            r["id"],
            r["name"],
            r["scope"],
            f"{r['prefix']}...",
            r["created_at"] or "",
            r["revoked_at"] or "",
            r["expires_at"] or "",
            r["last_used_at"] or "",
        )
    out.print(table)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(obj: Ctx, key_id: str) -> None:
    """Revoke a key by its id or a unique prefix of it (see `conveyor keys list`)."""
    from conveyor.cli.keys import revoke_key, warn_if_last

    key, remaining = run(lambda a: revoke_key(a, key_id), obj.app())
    out.print(f"Revoked key {key.id} ({_plain(key.name)})", highlight=False)
    warn_if_last(remaining)


# -- migrate ---------------------------------------------------------------------------
@cli.command()
@click.pass_obj
def migrate(obj: Ctx) -> None:
    """Create or upgrade the database schema."""
    app = obj.app()

    async def go(app: Conveyor) -> list[str]:
        migrate_fn = getattr(app.store, "migrate", None)
        return list(await migrate_fn()) if migrate_fn else []

    applied = run(go, app)  # open() applies migrations; migrate() reports anything left
    out.print(
        f"Database {_plain(redact_url(app.settings.database_url))} is up to date"
        + (f" (applied {', '.join(applied)})" if applied else ""),
        highlight=False,
    )


# -- jobs ------------------------------------------------------------------------------
@cli.group(cls=ConveyorGroup)
def jobs() -> None:
    """Submit, list, show and cancel jobs."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in JSON: send null or a string")


def _parse_payload(text: str) -> Any:
    # The standard parser, as the REST API's: integers of any size stay integers (the
    # shared rules then refuse those past 64 bits), and NaN/Infinity are refused.
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--payload") from None
    if not isinstance(value, dict):
        raise click.BadParameter(
            'must be a JSON object, e.g. \'{"to": "a@b.c"}\'', param_hint="--payload"
        )
    return value


@jobs.command("submit")
@click.argument("job_type")
@click.option("--payload", "-p", default="{}", show_default=True, help="JSON object.")
@click.option("--priority", type=int, default=None)
@click.option("--delay", type=float, default=None, help="Seconds from now.")
@click.option("--max-retries", type=int, default=None)
@click.option("--timeout", type=float, default=None, help="Seconds.")
@click.option("--idempotency-key", default=None)
@click.option("--queue", default=None)
@click.option("--depends-on", multiple=True, help="Job id to wait for (repeatable).")
@click.option("--app", "apps", multiple=True, help="Module whose handlers validate the payload.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def jobs_submit(
    obj: Ctx,
    job_type: str,
    payload: str,
    priority: int | None,
    delay: float | None,
    max_retries: int | None,
    timeout: float | None,
    idempotency_key: str | None,
    queue: str | None,
    depends_on: tuple[str, ...],
    apps: tuple[str, ...],
    as_json: bool,
) -> None:
    """Submit a job of JOB_TYPE.

    The payload is checked against the handler's signature when the job type
    is known here: the demo types, and those of --app modules.
    """
    data = _parse_payload(payload)
    app = obj.app()
    for spec in ("conveyor.demo", *apps):
        apply_app(app, spec)

    async def go(a: Conveyor) -> Any:
        result = await a.submit(
            job_type,
            data,
            priority=priority,
            delay=delay,
            max_retries=max_retries,
            timeout=timeout,
            idempotency_key=idempotency_key,
            queue=queue,
            depends_on=depends_on,
            created_by="cli",
        )
        job = result.job
        summary = {"job_type": job.job_type, "queue": job.queue, "duplicate": result.duplicate}
        await a.audit.record("job.submit", "job", job.id, summary)  # its id: after the insert
        return result

    result = run(go, app)
    if as_json:
        emit_json({**job_dict(result.job), "duplicate": result.duplicate})
    else:
        note = " (duplicate: existing job returned)" if result.duplicate else ""
        out.print(f"{result.job.id} {result.job.status}{note}", highlight=False)


@jobs.command("list")
@click.option(
    "--status",
    multiple=True,
    help="State(s), repeatable or comma-separated as in the API: pending,running",
)
@click.option(
    "--include-internal", is_flag=True, help="Also Conveyor's own jobs (webhook deliveries)."
)
@click.option("--type", "job_type", default=None)
@click.option("--queue", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def jobs_list(
    obj: Ctx,
    status: tuple[str, ...],
    job_type: str | None,
    queue: str | None,
    limit: int,
    offset: int,
    as_json: bool,
    include_internal: bool,
) -> None:
    """List jobs, newest first."""
    try:
        states = parse_states(",".join(status))
    except ValidationError as exc:
        raise click.BadParameter(exc.message, param_hint="--status") from None
    query = JobQuery(
        states=states,
        job_type=job_type,
        queue=queue,
        limit=limit,
        offset=offset,
        include_internal=include_internal,
    )
    page = run(lambda a: a.store.list_jobs(query), obj.app())
    if as_json:
        emit_json(
            {
                "jobs": [job_dict(j) for j in page.jobs],
                "pagination": page_dict(page),
            }
        )
        return
    # Narrow terminals drop the less important columns rather than fold them all.
    out.print(jobs_table(f"Jobs ({page.total} total)", page.jobs, out.width))


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def jobs_show(obj: Ctx, job_id: str, as_json: bool) -> None:
    """Show one job with its executions."""

    async def go(app: Conveyor) -> dict[str, Any]:
        job = await app.store.get(await app.resolve_job_id(job_id))
        return job_dict(job, await app.store.executions(job.id))

    data = run(go, obj.app())
    if as_json:
        emit_json(data)
        return
    table = Table(show_header=False, title=f"Job {data['id']}")
    for key, value in data.items():
        if key in ("executions", "id"):
            continue
        _add_row(table, key, value if isinstance(value, str) else orjson.dumps(value).decode())
    out.print(table)
    ex = Table(title="Executions")
    for col in ("attempt", "worker", "started", "finished", "outcome", "error", "payload v."):
        ex.add_column(col)
    for e in data["executions"]:
        _add_row(
            ex,
            str(e["attempt"]),
            e["worker_id"] or "",
            e["started_at"] or "",
            e["finished_at"] or "",
            e["outcome"] or "",
            e["error"] or "",
            str(e["payload_version"]),
        )
    out.print(ex)
    last = next((e for e in reversed(data["executions"]) if e.get("traceback")), None)
    if last is not None:  # the newest one: where to look first
        out.print(f"Traceback of attempt {last['attempt']}:", highlight=False)
        out.print(printable(last["traceback"]), markup=False, highlight=False, soft_wrap=True)


@jobs.command("cancel")
@click.argument("job_id")
@click.option("--reason", default=None, help="Why (kept in metadata.cancel_reason and events).")
@click.pass_obj
def jobs_cancel(obj: Ctx, job_id: str, reason: str | None) -> None:
    """Cancel a job (a running job is cancelled once its worker confirms)."""

    async def go(app: Conveyor) -> Any:
        found = await app.resolve_job_id(job_id)
        async with app.audit.change("job.cancel", "job", found, {"reason": reason}):
            return await app.cancel(found, reason)

    job = run(go, obj.app())
    out.print(f"{job.id} {job.status}", highlight=False)


# -- dead-letter queue --------------------------------------------------------------------
@cli.group(cls=ConveyorGroup)
def dlq() -> None:
    """Inspect, retry and purge dead-lettered (failed) jobs."""


@dlq.command("list")
@click.option("--type", "job_type", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def dlq_list(obj: Ctx, job_type: str | None, limit: int, as_json: bool) -> None:
    """List dead-lettered jobs."""
    query = JobQuery(states=(JobState.FAILED,), job_type=job_type, limit=limit, sort="updated_at")
    page = run(lambda a: a.store.list_jobs(query), obj.app())
    if as_json:
        emit_json({"jobs": [job_dict(j) for j in page.jobs], "total": page.total})
        return
    out.print(dlq_table(f"Dead-letter queue ({page.total})", page.jobs, out.width))


def _ids_or_all(ids: tuple[str, ...], all_: bool) -> None:
    if bool(ids) == all_:
        raise click.UsageError("Give job ids or --all (not both)")


@dlq.command("retry")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Retry every dead-lettered job.")
@click.option("--type", "job_type", default=None, help="With --all: only this job type.")
@click.pass_obj
def dlq_retry(obj: Ctx, job_ids: tuple[str, ...], all_: bool, job_type: str | None) -> None:
    """Re-queue dead-lettered jobs."""
    _ids_or_all(job_ids, all_)

    async def go(app: Conveyor) -> int:
        if all_:
            retried = await app.retry_dead_letters(job_type)
            summary = {"job_type": job_type, "retried": retried}
            await app.audit.record("dlq.retry_all", "dlq", job_type or "*", summary)
            return retried
        ids = [await app.resolve_job_id(i) for i in job_ids]
        target = ids[0] if len(ids) == 1 else "*"
        async with app.audit.change("dlq.retry", "job", target, {"job_ids": ids[:100]}):
            await app.store.retry_failed(ids, app.now())
        app.notify_listeners()
        return len(set(ids))

    n = run(go, obj.app())
    out.print(f"Re-queued {n} job(s)")


@dlq.command("purge")
@click.argument("job_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Delete every dead-lettered job.")
@click.pass_obj
def dlq_purge(obj: Ctx, job_ids: tuple[str, ...], all_: bool) -> None:
    """Delete dead-lettered jobs for good."""
    _ids_or_all(job_ids, all_)

    async def go(app: Conveyor) -> int:
        ids = None if all_ else [await app.resolve_job_id(i) for i in job_ids]
        target = ids[0] if ids is not None and len(ids) == 1 else "*"
        summary = {"job_ids": None if ids is None else ids[:100], "all": all_}
        async with app.audit.change("dlq.purge", "job", target, summary):
            return await app.store.purge_failed(ids, app.now())

    n = run(go, obj.app())
    out.print(f"Purged {n} job(s)")


# -- webhooks -------------------------------------------------------------------------------
@cli.group(cls=ConveyorGroup)
def webhooks() -> None:
    """List webhook endpoints and re-enable disabled ones."""


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def webhooks_list(obj: Ctx, as_json: bool) -> None:
    """List webhook endpoints, their state and failures (never their secrets)."""
    from conveyor.presenters import webhook_dict

    rows = [webhook_dict(w) for w in run(lambda a: a.store.list_webhooks(), obj.app())]
    if as_json:
        emit_json(rows)
        return
    table = _table("Webhooks", ("id", "state", "url", "event types", "failing since", "reason"))
    for r in rows:
        table.add_row(
            r["id"],
            r["state"],
            r["url"],
            ", ".join(r["event_types"]),
            r["failing_since"] or "",
            r["disabled_reason"] or "",
        )
    out.print(table)


@webhooks.command("enable")
@click.argument("webhook_id")
@click.pass_obj
def webhooks_enable(obj: Ctx, webhook_id: str) -> None:
    """Re-enable a disabled endpoint and deliver the events it missed meanwhile."""
    from conveyor.runtime.webhooks import enable_webhook

    enabled = run(
        lambda a: audited(
            a, "webhook.enable", "webhook", webhook_id, lambda: enable_webhook(a.deps, webhook_id)
        ),
        obj.app(),
    )
    out.print(
        f"Webhook {enabled.webhook.id} is {enabled.webhook.state.value}; "
        f"{enabled.replayed} missed event(s) queued for delivery",
        highlight=False,
    )


# -- locks ----------------------------------------------------------------------------------
@cli.group(cls=ConveyorGroup)
def locks() -> None:
    """Look at distributed locks and leader leases (taken and freed from code)."""


@locks.command("list")
@click.option("--all", "include_free", is_flag=True, help="Also free keys, with their last token.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def locks_list(obj: Ctx, include_free: bool, limit: int, as_json: bool) -> None:
    """List the held locks and leader leases (key, fencing token, owner, expiry)."""
    rows = [
        r.to_dict()
        for r in run(lambda a: a.list_locks(limit=limit, include_free=include_free), obj.app())
    ]
    if as_json:
        emit_json(rows)
        return
    table = _table("Locks", ("key", "token", "held", "owner", "acquired at", "expires at"))
    for r in rows:
        _add_row(
            table,
            r["key"],
            str(r["token"]),
            "yes" if r["held"] else "no",
            r["owner"],
            r["acquired_at"],
            r["expires_at"],
        )
    out.print(table)


# -- status ---------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """Queue depths, live workers, job types no live worker handles, outbox lag."""
    data = run(lambda a: collect_status(a.deps), obj.app())
    if as_json:
        emit_json(data)
        return
    depths = Table(title="Jobs by status")
    depths.add_column("status")
    depths.add_column("count", justify="right")
    for state, n in data["queue_depths"].items():
        _add_row(depths, state, str(n))
    out.print(depths)
    workers = _table(
        f"Workers ({data['live_workers']} alive)",
        ("id", "alive", "job types", "queues", "running", "stuck", "last heartbeat"),
    )
    for w in data["workers"]:
        _add_row(
            workers,
            w["worker_id"],
            "yes" if w["alive"] else "NO",
            ", ".join(w["job_types"]),
            ", ".join(w["queues"]),
            str(w["jobs_running"]),
            str(w.get("stuck_jobs", 0)),
            w["last_heartbeat"] or "",
        )
    out.print(workers)
    consumers = data["outbox"]["consumers"]
    if consumers:
        outbox = Table(title=f"Outbox (newest event {data['outbox']['latest_event_id']})")
        for col in ("consumer", "position", "behind"):
            outbox.add_column(col, justify="left" if col == "consumer" else "right")
        for c in consumers:
            _add_row(outbox, c["name"], str(c["position"]), str(c["lag"]))
        out.print(outbox)
    _print_flow(data)
    if data["unserved_job_types"]:
        out.print("[bold yellow]Waiting for a worker:[/]")
        for u in data["unserved_job_types"]:
            out.print(
                f"  {u['pending']} pending job(s) of type {_plain(repr(u['job_type']))} on queue "
                f"{_plain(repr(u['queue']))}: no live worker handles it",
                highlight=False,
            )
    if data.get("webhook_secrets_unencrypted"):
        out.print(
            f"[bold yellow]Webhook secrets:[/] {data['webhook_secrets_unencrypted']} "
            "endpoint(s) keep their signing secret unencrypted in the database. Set "
            "CONVEYOR_MASTER_KEY (or CONVEYOR_MASTER_KEY_FILE) and restart: they move "
            "into the vault at the next start (docs/security.md)",
            highlight=False,
        )


# Command groups in modules of their own register themselves on ``cli`` when imported.
from conveyor.cli import keys as _keys  # noqa: E402, F401 - keys rotate
from conveyor.cli import secrets as _secrets  # noqa: E402, F401
from conveyor.cli import workflows as _workflows  # noqa: E402, F401

# -- cron schedules (cli/schedules.py) --------------------------------------------------
cli.add_command(schedules_group)
cli.add_command(scheduler_command)


def _print_flow(data: dict[str, Any]) -> None:
    """``conveyor status``: paused or limited queues, held jobs, unroutable jobs."""
    shown = [q for q in data.get("queues", []) if q["paused"] or q["concurrency_limit"]]
    if shown:
        table = _table("Queue controls", ("queue", "paused", "limit", "pending", "running"))
        for q in shown:
            _add_row(
                table,
                q["name"],
                "PAUSED" if q["paused"] else "no",
                str(q["concurrency_limit"] or "-"),
                str(q["pending"]),
                str(q["running"]),
            )
        out.print(table)
    limits = data.get("flow_limits", [])
    if limits:
        table = _table("Flow limits", ("job type", "key", "concurrency", "rate", "requires"))
        for lim in limits:
            _add_row(
                table,
                lim["job_type"],
                lim["concurrency_key"] or "-",
                str(lim["concurrency_limit"] or "-"),
                lim["rate_limit"] or "-",
                ", ".join(f"{k}={v}" for k, v in lim["requires"].items()) or "-",
            )
        out.print(table)
    held = data.get("held", {})
    if any(held.get("total", {}).values()):
        out.print("[bold yellow]Ready jobs held by flow control:[/]")
        for kind in ("paused_queue", "concurrency_limit", "rate_limit", "queue_concurrency_limit"):
            for name, n in held.get(kind, {}).items():
                what = kind.replace("_", " ")
                out.print(f"  {n} held by {what} ({_plain(name)})", highlight=False)
    for u in data.get("unroutable_jobs", []):
        needs = ", ".join(f"{k}={v}" for k, v in u["requires"].items())
        out.print(
            f"[bold yellow]No live worker can run[/] {u['pending']} pending job(s) of type "
            f"{_plain(repr(u['job_type']))} on queue {_plain(repr(u['queue']))} needing "
            f"{_plain(needs)}: {_plain(u['reason'])}",
            highlight=False,
        )


def main() -> None:
    # A long-running worker allocates many short-lived objects per job; moving the
    # start-up heap out of the collector's way and collecting young objects less
    # often cuts its CPU per job by ~15% (bench/README.md).
    gc.set_threshold(10_000, 50, 100)
    cli(prog_name="conveyor")


from conveyor.cli.queues import queues as _queues  # noqa: E402 - it imports this module

cli.add_command(_queues)

from conveyor.cli.audit import audit as _audit  # noqa: E402 - it imports this module

cli.add_command(_audit)

if __name__ == "__main__":
    # Run as ``python -m conveyor.cli.main`` this module is ``__main__``, a second copy:
    # the command groups of other modules (``workflows``) register on the ``cli`` of
    # ``conveyor.cli.main``, so run that one.
    from conveyor.cli.main import main as _package_main

    _package_main()
