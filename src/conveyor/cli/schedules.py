"""``conveyor schedules ...`` and ``conveyor scheduler`` (docs/schedules.md).

``cli/main.py`` adds these commands to the ``conveyor`` group, whose error
handling turns a ``ConveyorError`` into one line and exit status 1.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from conveyor.app import Conveyor
from conveyor.auditing import acting_as, audited, cli_actor
from conveyor.cli.loader import apply_app
from conveyor.cli.loop import run as run_loop
from conveyor.domain.schedules import MISFIRE_POLICIES, OVERLAP_POLICIES, Schedule
from conveyor.presenters import schedule_dict
from conveyor.scheduling import (
    create_schedule,
    pause_schedule,
    resolve_schedule_id,
    resume_schedule,
)
from conveyor.security.redact import redact

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
UPCOMING = 5


def _run(app: Conveyor, fn: Callable[[Conveyor], Awaitable[T]]) -> T:
    async def main() -> T:
        async with app:
            with acting_as(cli_actor()):  # the audit log's actor: cli:<os user>
                return await fn(app)

    return run_loop(main(), app.settings.event_loop)


def _app(obj: Any, apps: tuple[str, ...] = ()) -> Conveyor:
    app: Conveyor = obj.app()
    for spec in ("conveyor.demo", *apps):
        apply_app(app, spec)
    return app


def _payload(text: str) -> dict[str, Any]:
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number in JSON: send null or a string")

    try:
        value = json.loads(text, parse_constant=constant)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--payload") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--payload")
    return value


def _json(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _show(app: Conveyor, s: Schedule, as_json: bool) -> None:
    upcoming = s.spec().upcoming(app.now(), UPCOMING) if s.state == "active" else []
    data = schedule_dict(s, upcoming)
    if as_json:
        _json(data)
        return
    for key in ("id", "name", "state", "source", "cron", "timezone", "job_type", "queue"):
        out.print(f"{key}: {escape(redact(str(data[key])))}", highlight=False)
    out.print(f"payload: {escape(redact(orjson.dumps(data['payload']).decode()))}", highlight=False)
    out.print(
        f"misfire: {data['misfire']} (catch_up_max {data['catch_up_max']}), "
        f"overlap: {data['overlap']}, jitter: {data['jitter']:g} s",
        highlight=False,
    )
    out.print(f"last fired: {data['last_fired_at'] or '-'}", highlight=False)
    out.print("next fire times:" if upcoming else "next fire times: none", highlight=False)
    for t in data["next_fire_times"]:
        out.print(f"  {t}", highlight=False)


@click.group("schedules")
def schedules() -> None:
    """List, add, show, pause, resume and delete cron schedules."""


@schedules.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def schedules_list(obj: Any, as_json: bool) -> None:
    """Every schedule, by name."""
    app = obj.app()
    found = _run(app, lambda a: a.store.list_schedules())
    if as_json:
        _json([schedule_dict(s) for s in found])
        return
    table = Table(title="Schedules")
    table.add_column("id", no_wrap=True, overflow="ignore", min_width=2)
    for col in ("name", "state", "cron", "timezone", "job_type", "next fire", "last fired"):
        table.add_column(col, overflow="fold")
    for s in found:
        d = schedule_dict(s)
        table.add_row(
            *(
                escape(redact(str(c or "")))
                for c in (
                    d["id"],
                    d["name"],
                    d["state"],
                    d["cron"],
                    d["timezone"],
                    d["job_type"],
                    d["next_fire_at"],
                    d["last_fired_at"],
                )
            )
        )
    out.print(table)


@schedules.command("add")
@click.argument("name")
@click.argument("cron")
@click.argument("job_type")
@click.option("--payload", "-p", default="{}", show_default=True, help="JSON object.")
@click.option("--timezone", "--tz", "timezone", default="UTC", show_default=True)
@click.option("--queue", default=None)
@click.option("--priority", type=int, default=None)
@click.option("--max-retries", type=int, default=None)
@click.option("--timeout", type=float, default=None, help="Seconds.")
@click.option("--misfire", type=click.Choice(MISFIRE_POLICIES), default="skip", show_default=True)
@click.option("--catch-up-max", type=int, default=1, show_default=True)
@click.option("--jitter", type=float, default=0.0, show_default=True, help="Seconds.")
@click.option("--overlap", type=click.Choice(OVERLAP_POLICIES), default="allow", show_default=True)
@click.option("--app", "apps", multiple=True, help="Module whose handlers validate the payload.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def schedules_add(
    obj: Any,
    name: str,
    cron: str,
    job_type: str,
    payload: str,
    timezone: str,
    queue: str | None,
    priority: int | None,
    max_retries: int | None,
    timeout: float | None,
    misfire: str,
    catch_up_max: int,
    jitter: float,
    overlap: str,
    apps: tuple[str, ...],
    as_json: bool,
) -> None:
    """Add schedule NAME: submit JOB_TYPE at every fire time of CRON.

    CRON: 5 fields, 6 with seconds first, or a macro (@hourly, @daily...);
    quote it in the shell: conveyor schedules add nightly "0 3 * * *" report
    """
    data = _payload(payload)
    app = _app(obj, apps)
    created = _run(
        app,
        lambda a: create_schedule(
            a,
            name=name,
            cron=cron,
            job_type=job_type,
            payload=data,
            timezone=timezone,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            misfire=misfire,
            catch_up_max=catch_up_max,
            jitter=jitter,
            overlap=overlap,
        ),
    )
    summary = {"name": created.name, "job_type": created.job_type}
    _run(app, lambda a: a.audit.record("schedule.create", "schedule", created.id, summary))
    if as_json:
        _show(app, created, True)
    else:
        out.print(
            f"{created.id} {escape(created.name)} next: {schedule_dict(created)['next_fire_at']}",
            highlight=False,
        )


def _by_ref(obj: Any, ref: str, action: Callable[[Conveyor, str], Awaitable[Any]]) -> Any:
    app = obj.app()

    async def go(a: Conveyor) -> Any:
        return await action(a, await resolve_schedule_id(a, ref))

    return app, _run(app, go)


@schedules.command("show")
@click.argument("schedule")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def schedules_show(obj: Any, schedule: str, as_json: bool) -> None:
    """Show SCHEDULE (an id or a name) with its next 5 fire times."""
    app, found = _by_ref(obj, schedule, lambda a, i: a.store.get_schedule(i))
    _show(app, found, as_json)


@schedules.command("pause")
@click.argument("schedule")
@click.pass_obj
def schedules_pause(obj: Any, schedule: str) -> None:
    """Stop SCHEDULE firing (fire times passed while paused never fire)."""
    _, s = _by_ref(
        obj,
        schedule,
        lambda a, i: audited(a, "schedule.pause", "schedule", i, lambda: pause_schedule(a, i)),
    )
    out.print(f"{s.id} {escape(s.name)} paused", highlight=False)


@schedules.command("resume")
@click.argument("schedule")
@click.pass_obj
def schedules_resume(obj: Any, schedule: str) -> None:
    """Fire SCHEDULE again, from its next fire time after now."""
    _, s = _by_ref(
        obj,
        schedule,
        lambda a, i: audited(a, "schedule.resume", "schedule", i, lambda: resume_schedule(a, i)),
    )
    out.print(
        f"{s.id} {escape(s.name)} active, next: {schedule_dict(s)['next_fire_at']}",
        highlight=False,
    )


@schedules.command("delete")
@click.argument("schedule")
@click.pass_obj
def schedules_delete(obj: Any, schedule: str) -> None:
    """Delete SCHEDULE (its jobs stay). One declared in code comes back when a
    scheduler with that code starts: pause it instead."""

    async def delete(a: Conveyor, schedule_id: str) -> str:
        async with a.audit.change("schedule.delete", "schedule", schedule_id):
            await a.store.delete_schedule(schedule_id)
        return schedule_id

    _, deleted = _by_ref(obj, schedule, delete)
    out.print(f"{deleted} deleted", highlight=False)


@click.command("scheduler")
@click.argument("apps", nargs=-1)
@click.pass_obj
def scheduler(obj: Any, apps: tuple[str, ...]) -> None:
    """Run a scheduler alone: fire due cron schedules until SIGTERM/SIGINT.

    APPS (module or module:attr) declare schedules in code (@app.cron,
    app.schedule); they are stored when it starts. Any number of schedulers
    may run (``conveyor up`` runs one too): each fire time fires once.
    """
    app: Conveyor = obj.app()
    for spec in apps:
        apply_app(app, spec)
    err.print(
        f"Conveyor scheduler: {len(app.schedules)} schedule(s) declared in code; Ctrl-C stops it",
        highlight=False,
    )
    run_loop(app.run_scheduler(), app.settings.event_loop)
