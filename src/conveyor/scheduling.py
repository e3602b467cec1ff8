"""Cron schedules at the application level: one validation path for code
(``@app.cron``, ``app.schedule``), the REST API and the CLI
(``docs/schedules.md``).

A schedule's job options are resolved and checked exactly as a submit's are
(``app.new_job``: the job type's registered defaults, payload against the
handler's signature, the documented ranges), once, when the schedule is
declared, created or changed; every fire then submits that job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError
from conveyor.domain.ids import new_job_id
from conveyor.domain.job import JobTypeInfo
from conveyor.domain.schedules import (
    DEFAULT_TIMEZONE,
    CronSpec,
    Schedule,
    name_error,
    policy_errors,
    template_job,
)

if TYPE_CHECKING:
    from conveyor.app import Conveyor

#: The fields a schedule is declared with (and ``PATCH`` may change).
FIELDS = (
    "name",
    "cron",
    "timezone",
    "job_type",
    "payload",
    "queue",
    "priority",
    "max_retries",
    "timeout_ms",
    "misfire",
    "catch_up_max",
    "jitter",
    "overlap",
)


def build_schedule(
    app: Conveyor,
    *,
    name: Any,
    cron: Any,
    job_type: Any,
    payload: Any = None,
    timezone: Any = DEFAULT_TIMEZONE,
    queue: Any = None,
    priority: Any = None,
    max_retries: Any = None,
    timeout: Any = None,
    timeout_ms: Any = None,
    misfire: Any = "skip",
    catch_up_max: Any = 1,
    jitter: Any = 0.0,
    overlap: Any = "allow",
    defaults: JobTypeInfo | None = None,
    schedule_id: str | None = None,
    source: str = "api",
) -> Schedule:
    """A checked ``Schedule`` (not stored); ``ValidationError`` listing every problem
    at once. Job options left out take the job type's defaults (its registration
    here, else ``defaults``, else the global ones), as a submit does."""
    errs: list[FieldError] = []
    problem = name_error(name)
    if problem is not None:
        errs.append(FieldError("name", problem))
    spec: CronSpec | None = None
    try:
        spec = CronSpec.parse(cron, timezone)
    except ValidationError as exc:
        errs.extend(exc.details)
    errs.extend(
        policy_errors(misfire=misfire, catch_up_max=catch_up_max, jitter=jitter, overlap=overlap)
    )
    new = None
    if payload is not None and not isinstance(payload, Mapping):
        errs.append(FieldError("payload", "must be a JSON object"))
    else:
        try:
            new = app.new_job(
                job_type,
                payload,
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                timeout=timeout,
                timeout_ms=timeout_ms,
                defaults=defaults,
            )
        except (ValidationError, ConfigurationError) as exc:
            details = getattr(exc, "details", ()) or [FieldError("job", str(exc))]
            errs.extend(details)
    if new is not None:
        errs.extend(e for e in new.errors() if e not in errs)
    if errs:
        raise ValidationError(
            "Invalid schedule: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
        )
    assert new is not None
    assert spec is not None
    return Schedule(
        id=schedule_id or new_job_id(),
        name=name,
        cron=cron,
        timezone=timezone,
        job_type=new.job_type,
        payload=dict(new.payload),
        queue=new.queue,
        priority=new.priority,
        max_retries=new.max_retries,
        timeout_ms=new.timeout_ms,
        misfire=misfire,
        catch_up_max=catch_up_max,
        jitter=float(jitter),
        overlap=overlap,
        source=source,
        next_fire_at=spec.next_after(app.now()),
    )


async def create_schedule(app: Conveyor, **fields: Any) -> Schedule:
    """Check and store a new schedule (runtime, ``source="api"``); it fires from
    its next fire time on. Raises ``ValidationError`` (``ScheduleNameTaken``), and
    refuses a job type no worker serves as a submit does."""
    await app.open()
    job_type = fields.get("job_type")
    defaults = None
    if isinstance(job_type, str) and job_type not in app.registry:
        defaults = await app.recorded_job_type(job_type)
    schedule = build_schedule(app, defaults=defaults, **fields)
    await app._check_known_types([template_job(schedule)])
    return await app.store.create_schedule(schedule, app.now())


async def update_schedule(app: Conveyor, schedule_id: str, changes: Mapping[str, Any]) -> Schedule:
    """Change some fields of a schedule (``FIELDS``); the rest stay. A changed
    expression or zone restarts it from its next fire time after now. A change
    that changes nothing (no fields, or the values it has) writes nothing and
    returns the schedule as it is (``updated_at`` kept)."""
    await app.open()
    old = await app.store.get_schedule(schedule_id)
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise ValidationError(
            f"Unknown schedule field(s): {', '.join(unknown)}",
            [FieldError(u, "unknown field") for u in unknown],
        )
    values: dict[str, Any] = {f: getattr(old, f) for f in FIELDS}
    values.update(changes)
    job_type = values["job_type"]
    defaults = None
    if isinstance(job_type, str) and job_type not in app.registry:
        defaults = await app.recorded_job_type(job_type)
    built = build_schedule(app, defaults=defaults, schedule_id=old.id, source=old.source, **values)
    if built.job_type != old.job_type:
        await app._check_known_types([template_job(built)])
    same_time = built.cron == old.cron and built.timezone == old.timezone
    merged = built.with_(
        state=old.state,
        next_fire_at=old.next_fire_at
        if same_time and old.state == "active"
        else built.next_fire_at,
    )
    if merged.same_definition(old) and merged.name == old.name:
        return old  # cron and zone included: its fire times stay as they are
    return await app.store.update_schedule(merged, app.now())


async def pause_schedule(app: Conveyor, schedule_id: str) -> Schedule:
    """Stop firing (idempotent). Instants passed while paused never fire."""
    await app.open()
    old = await app.store.get_schedule(schedule_id)
    if old.state == "paused":
        return old
    return await app.store.update_schedule(old.with_(state="paused"), app.now())


async def resume_schedule(app: Conveyor, schedule_id: str) -> Schedule:
    """Fire again from the next fire time after now (also re-enables a schedule
    disabled because its code declaration went away)."""
    await app.open()
    old = await app.store.get_schedule(schedule_id)
    if old.state == "active":
        return old
    nxt = old.spec().next_after(app.now())
    return await app.store.update_schedule(old.with_(state="active", next_fire_at=nxt), app.now())


async def resolve_schedule_id(app: Conveyor, text: str) -> str:
    """A schedule's id from its id or its name (the CLI takes either)."""
    await app.open()
    for s in await app.store.list_schedules():
        if s.id == text or s.name == text:
            return s.id
    return text  # the store's ScheduleNotFound names it
