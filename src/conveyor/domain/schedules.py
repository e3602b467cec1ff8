"""Cron schedules as plain values, and their pure fire-time arithmetic.

The cron grammar is cronsim's (5 fields, or 6 with the seconds field first),
plus the macros of ``MACROS``. Fire times follow the schedule's wall clock in
its IANA time zone (``zoneinfo``), with one rule for daylight-saving changes
(``docs/schedules.md``):

- a wall time that does not exist (the hour skipped in spring) fires once, at
  the first instant after the gap (02:30 in Europe/Berlin on the spring change
  fires at 03:00 CEST); several such wall times (``*/5`` in the gap) fire once;
- a wall time that occurs twice (the hour repeated in autumn) fires once, at
  its first occurrence.

So every schedule fires at most once per distinct wall time, and never twice
at the same instant.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from conveyor.domain.errors import FieldError, NotFound, ValidationError
from conveyor.domain.job import NewJob
from conveyor.domain.limits import text_error

MACROS: Mapping[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MISFIRE_POLICIES = ("skip", "catch_up")
OVERLAP_POLICIES = ("allow", "skip_if_running")
#: ``active`` fires; ``paused`` was paused by an operator; ``disabled``: declared
#: in code once and no longer (see ``sync`` in runtime/scheduler.py).
SCHEDULE_STATES = ("active", "paused", "disabled")
SOURCES = ("api", "code")
MAX_CRON_LENGTH = 200
MAX_ZONE_LENGTH = 64
MAX_CATCH_UP = 1000
MAX_JITTER = 86_400.0
#: How many past fire times a catch-up looks through at most (an every-second
#: schedule down for longer loses the older ones).
CATCH_UP_LOOKBACK = 10_000
#: Zone file names that are host configuration, not zones (refused).
HOST_ZONE_ALIASES = frozenset({"localtime", "posixrules"})
DEFAULT_TIMEZONE = "UTC"
#: The ``schedule_fired`` event (written with the job it creates).
SCHEDULE_FIRED = "schedule_fired"


class ScheduleNotFound(NotFound):
    """No schedule has this id."""

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"Schedule {schedule_id!r} not found")
        self.schedule_id = schedule_id


class ScheduleNameTaken(ValidationError):
    """Another schedule has this name (names are unique)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"A schedule named {name!r} exists already: pick another name, or change "
            "that one (PATCH /api/schedules/{id})",
            [FieldError("name", "already taken")],
        )


# -- the expression ------------------------------------------------------------------
#: Each field's name and largest value, in order (a 6-field expression has
#: seconds first): a step (``*/N``, ``A-B/N``) is a whole number from 1 to it.
_STEP_FIELDS = (("minute", 59), ("hour", 23), ("day", 31), ("month", 12), ("weekday", 7))
_STEP = re.compile(r"[0-9]{1,2}")


_SAME_ENDS = re.compile(r"(?<![\w-])(\d+)-\1(?:/\d+)?(?![\w-])")


def _single_value_ranges(fields: str) -> str:
    """``5-5`` and ``5-5/1`` as ``5``: the cron library reads a one-value range with
    a step as every value of the field (``0-0/1`` fired every minute)."""
    return _SAME_ENDS.sub(r"\1", fields)


def _step_error(fields: str) -> str | None:
    """What is wrong with a step of the expression, else None. The cron library
    accepts steps beyond the field (``*/61``, ``*/99999999999999999999``) and
    says only "Bad minute" for ``*/1e20``: this names the field and the range."""
    parts = fields.split()
    names = (("second", 59), *_STEP_FIELDS) if len(parts) == 6 else _STEP_FIELDS
    for (name, largest), part in zip(names, parts, strict=False):
        for item in part.split(","):
            if "/" not in item:
                continue
            step = item.split("/", 1)[1]
            if not _STEP.fullmatch(step) or not 1 <= int(step) <= largest:
                shown = step if len(step) <= 20 else step[:20] + "..."
                return f"{name} step {shown!r} must be a whole number from 1 to {largest}"
    return None


@dataclass(frozen=True)
class CronSpec:
    """A checked cron expression in a time zone. ``CronSpec.parse`` builds one."""

    expression: str
    timezone: str
    zone: ZoneInfo
    fields: str  # the expression with macros expanded

    @staticmethod
    def parse(
        expression: object, timezone: object = DEFAULT_TIMEZONE, *, check_steps: bool = True
    ) -> CronSpec:
        """Check ``expression`` and ``timezone``; ``ValidationError`` naming the field
        (``cron``, ``timezone``) with the reason otherwise. ``check_steps=False``
        (a stored schedule, checked when it was written) skips the step ranges,
        which older versions did not check."""
        errs: list[FieldError] = []
        fields_ = ""
        if not isinstance(expression, str) or not 1 <= len(expression) <= MAX_CRON_LENGTH:
            errs.append(FieldError("cron", f"must be text of 1-{MAX_CRON_LENGTH} characters"))
        elif text_error(expression) is not None:
            errs.append(FieldError("cron", str(text_error(expression))))
        else:
            fields_ = " ".join(expression.split())
            if fields_.startswith("@"):
                expanded = MACROS.get(fields_.lower())
                if expanded is None:
                    errs.append(
                        FieldError(
                            "cron",
                            f"unknown macro {fields_!r} (known: {', '.join(MACROS)})",
                        )
                    )
                fields_ = expanded or ""
            elif not fields_:
                errs.append(FieldError("cron", "is blank: give 5 or 6 fields, or a macro"))
            fields_ = _single_value_ranges(fields_)
            if fields_ and len(fields_.split()) not in (5, 6):
                errs.append(
                    FieldError(
                        "cron",
                        "must have 5 fields (minute hour day month weekday) or 6 (seconds "
                        f"first), got {len(fields_.split())}",
                    )
                )
            elif fields_ and check_steps and (step_error := _step_error(fields_)) is not None:
                errs.append(FieldError("cron", step_error))
            elif fields_:
                try:
                    probe = CronSim(fields_, datetime(2000, 1, 1))  # noqa: DTZ001 - wall time
                    next(probe)
                except CronSimError as exc:
                    errs.append(FieldError("cron", f"invalid expression: {exc}"))
                except (StopIteration, ValueError, TypeError, IndexError, KeyError) as exc:
                    errs.append(FieldError("cron", f"invalid expression ({type(exc).__name__})"))
        zone = _zone(timezone, errs)
        if errs:
            raise ValidationError(
                "Invalid schedule: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
            )
        assert zone is not None
        assert isinstance(expression, str)
        assert isinstance(timezone, str)
        return CronSpec(expression, timezone, zone, fields_)

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after ``after`` (aware), in UTC; ``None``
        when the expression never fires again (e.g. Feb 30)."""
        after = after.astimezone(UTC)
        wall = after.astimezone(self.zone).replace(tzinfo=None, microsecond=0)
        try:
            for candidate in CronSim(self.fields, wall - timedelta(seconds=1)):
                instant = resolve(candidate, self.zone)
                # resolve() never decreases as wall time grows, so the first
                # candidate past ``after`` is the answer (wall times of a repeated
                # hour read at their second occurrence resolve before ``after``).
                if instant > after:
                    return instant
        except StopIteration:  # cronsim gives up after 50 years without a match
            return None
        return None  # pragma: no cover - CronSim iterates until StopIteration

    def upcoming(self, after: datetime, count: int) -> list[datetime]:
        """The next ``count`` fire instants after ``after`` (fewer if it stops)."""
        out: list[datetime] = []
        current = after
        while len(out) < count:
            nxt = self.next_after(current)
            if nxt is None:
                break
            out.append(nxt)
            current = nxt
        return out

    def between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Fire instants ``t`` with ``start <= t <= end``, in order."""
        current = self.next_after(start - timedelta(microseconds=1))
        while current is not None and current <= end:
            yield current
            current = self.next_after(current)


def _zone(timezone: object, errs: list[FieldError]) -> ZoneInfo | None:
    if not isinstance(timezone, str) or not 1 <= len(timezone) <= MAX_ZONE_LENGTH:
        errs.append(FieldError("timezone", f"must be an IANA zone name of 1-{MAX_ZONE_LENGTH}"))
        return None
    if text_error(timezone) is not None or timezone.startswith(("/", ".")) or ".." in timezone:
        errs.append(FieldError("timezone", f"unknown time zone {timezone!r}"))
        return None
    if timezone.lower() in HOST_ZONE_ALIASES:
        # Links to whatever zone each host is configured with: two schedulers on
        # different hosts would read one schedule in two zones.
        errs.append(
            FieldError(
                "timezone",
                f"{timezone!r} means a different zone on each host: give an IANA name "
                "(e.g. Europe/Berlin)",
            )
        )
        return None
    try:
        return ZoneInfo(timezone)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError, OSError...
        errs.append(
            FieldError(
                "timezone", f"unknown time zone {timezone!r} (an IANA name, e.g. Europe/Berlin)"
            )
        )
        return None


def _imaginary(wall: datetime, zone: ZoneInfo) -> bool:
    """Whether the naive ``wall`` time does not exist in ``zone`` (a DST gap)."""
    there = wall.replace(tzinfo=zone)
    back = there.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
    return back != wall


def resolve(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant a naive wall time fires at (see the module docstring): its
    first occurrence, or for a wall time inside a gap the first instant after it."""
    if not _imaginary(wall, zone):
        return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    # Inside a gap: fold=1 reads the wall time with the offset after the change and
    # fold=0 with the one before, so the change lies between the two readings.
    lo = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    hi = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if hi < lo:
        lo, hi = hi, lo
    after = hi.astimezone(zone).utcoffset()
    # The first whole second at or after which the zone has the new offset.
    low, high = math.floor(lo.timestamp()), math.ceil(hi.timestamp())
    while low < high:
        mid = (low + high) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == after:
            high = mid
        else:
            low = mid + 1
    return datetime.fromtimestamp(low, UTC)


# -- the stored schedule -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Schedule:
    """A stored schedule: when (``cron`` in ``timezone``), what (a job of
    ``job_type`` with ``payload`` and resolved job options), and how it fires.

    ``jitter`` in seconds (each job's ``run_at`` is its fire time plus up to that);
    ``catch_up_max`` bounds ``misfire="catch_up"``; ``next_fire_at`` is the next
    instant to fire (UTC; ``None`` when the expression never fires again).
    """

    id: str
    name: str
    cron: str
    job_type: str
    timezone: str = DEFAULT_TIMEZONE
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 50
    max_retries: int = 3
    timeout_ms: int | None = 300_000
    misfire: str = "skip"
    catch_up_max: int = 1
    jitter: float = 0.0
    overlap: str = "allow"
    state: str = "active"
    source: str = "api"
    next_fire_at: datetime | None = None
    last_fired_at: datetime | None = None
    last_job_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def spec(self) -> CronSpec:
        return CronSpec.parse(self.cron, self.timezone, check_steps=False)

    def with_(self, **changes: Any) -> Schedule:
        return replace(self, **changes)

    def same_definition(self, other: Schedule) -> bool:
        """Whether ``other`` declares the same schedule (state and times aside)."""
        keys = [
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
        ]
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def policy_errors(
    *, misfire: object, catch_up_max: object, jitter: object, overlap: object
) -> list[FieldError]:
    """What is wrong with a schedule's policies (empty when nothing)."""
    errs: list[FieldError] = []
    if misfire not in MISFIRE_POLICIES:
        errs.append(FieldError("misfire", f"must be one of {', '.join(MISFIRE_POLICIES)}"))
    if (
        type(catch_up_max) is not int
        or isinstance(catch_up_max, bool)
        or not 1 <= catch_up_max <= MAX_CATCH_UP
    ):
        errs.append(FieldError("catch_up_max", f"must be an integer from 1 to {MAX_CATCH_UP}"))
    if (
        isinstance(jitter, bool)
        or not isinstance(jitter, int | float)
        or not math.isfinite(jitter)
        or not 0 <= jitter <= MAX_JITTER
    ):
        errs.append(FieldError("jitter", f"must be a number of seconds from 0 to {MAX_JITTER:g}"))
    if overlap not in OVERLAP_POLICIES:
        errs.append(FieldError("overlap", f"must be one of {', '.join(OVERLAP_POLICIES)}"))
    return errs


_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")


def name_error(name: object) -> str | None:
    """Why ``name`` is not a schedule name (``None`` when it is one): the form of a
    job type name."""
    if not isinstance(name, str) or _NAME_RE.match(name) is None:
        return "must be 1-100 characters of letters, digits, '_', '-', '.', ':'"
    return None


def validate_schedule(schedule: Schedule) -> None:
    """Check every field at once (``ValidationError`` listing all problems). The
    job options must already be what ``app.new_job`` resolved and checked."""
    errs: list[FieldError] = []
    problem = name_error(schedule.name)
    if problem is not None:
        errs.append(FieldError("name", problem))
    try:
        CronSpec.parse(schedule.cron, schedule.timezone)
    except ValidationError as exc:
        errs.extend(exc.details)
    errs.extend(
        policy_errors(
            misfire=schedule.misfire,
            catch_up_max=schedule.catch_up_max,
            jitter=schedule.jitter,
            overlap=schedule.overlap,
        )
    )
    errs.extend(template_job(schedule).errors())
    if schedule.state not in SCHEDULE_STATES:
        errs.append(FieldError("state", f"must be one of {', '.join(SCHEDULE_STATES)}"))
    if errs:
        raise ValidationError(
            "Invalid schedule: " + "; ".join(f"{e.field} {e.message}" for e in errs), errs
        )


# -- firing ----------------------------------------------------------------------------------
def template_job(schedule: Schedule) -> NewJob:
    """The job each fire submits, without its fire-specific parts."""
    return NewJob(
        schedule.job_type,
        schedule.payload,
        schedule.queue,
        schedule.priority,
        schedule.max_retries,
        schedule.timeout_ms,
        None,
        None,
        (),
        {},
        f"schedule:{schedule.name}",
    )


def job_for_fire(schedule: Schedule, fire_at: datetime, jitter_fraction: float = 0.0) -> NewJob:
    """The job the fire at ``fire_at`` submits: due at ``fire_at`` plus
    ``jitter_fraction`` (0-1) of the schedule's jitter; its metadata names the
    schedule and the fire time."""
    job = template_job(schedule)
    delay = schedule.jitter * min(max(jitter_fraction, 0.0), 1.0)
    job.run_at = fire_at + timedelta(seconds=delay) if delay > 0 else fire_at
    job.metadata = {"schedule": schedule.name, "fire_at": iso_utc(fire_at)}
    return job


def iso_utc(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What a scheduler does with a due schedule now.

    ``skip_to``: move ``next_fire_at`` there first without firing (the misfired
    instants dropped), or ``None``; ``fires``: ``(fire_at, next_fire_at)`` pairs
    to fire in order, each moving ``next_fire_at`` to its second element.
    """

    skip_to: datetime | None
    fires: Sequence[tuple[datetime, datetime | None]]
    skipped: int = 0


def plan_fires(schedule: Schedule, spec: CronSpec, now: datetime, grace: float) -> FirePlan:
    """Which of the due instants (``next_fire_at`` up to ``now``) fire.

    An instant more than ``grace`` seconds old is a misfire (the schedulers were
    all down or busy): ``skip`` drops every misfire, ``catch_up`` fires the most
    recent ``catch_up_max`` of them (among the last ``CATCH_UP_LOOKBACK``).
    Instants within ``grace`` always fire.
    """
    first = schedule.next_fire_at
    if first is None or first > now or schedule.state != "active":
        return FirePlan(None, ())
    late_before = now - timedelta(seconds=grace)
    keep = schedule.catch_up_max if schedule.misfire == "catch_up" else 0
    missed: deque[datetime] = deque(maxlen=keep or 1)
    on_time: list[datetime] = []
    missed_count = 0
    current: datetime | None = first
    looked = 0
    window_start = first
    while current is not None and current <= now:
        if current < late_before:
            missed_count += 1
            looked += 1
            if keep:
                missed.append(current)
            if looked >= CATCH_UP_LOOKBACK:
                # Far behind: jump instead of walking every instant. ``skip`` jumps to the
                # recent past; ``catch_up`` must still see the most recent misfires, so it
                # jumps to about one walked window (as long as the last one) before them.
                span = current - window_start
                target = late_before - span if keep else late_before
                looked = 0
                if target > current:
                    missed.clear()  # older than every instant still ahead
                    current = spec.next_after(target - timedelta(microseconds=1))
                    if current is not None:
                        window_start = current
                    continue
                window_start = current
        else:
            on_time.append(current)
        current = spec.next_after(current)
    after_all = current  # the first instant after now (None: never again)
    to_fire = (list(missed) if keep else []) + on_time
    if not to_fire:
        return FirePlan(after_all, (), missed_count)
    pairs = [
        (t, to_fire[i + 1] if i + 1 < len(to_fire) else after_all) for i, t in enumerate(to_fire)
    ]
    skip_to = to_fire[0] if to_fire[0] != first else None
    return FirePlan(skip_to, pairs, missed_count - (len(missed) if keep else 0))
