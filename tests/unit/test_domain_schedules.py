"""Next-fire computation against the cron parser (cronsim), across the DST changes
of three zones, and the misfire plans (docs/schedules.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.domain.errors import ValidationError
from conveyor.domain.schedules import CronSpec, Schedule, job_for_fire, plan_fires

ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney")


def transitions(zone: ZoneInfo, year: int = 2026) -> list[datetime]:
    """The UTC instants ``zone`` changes offset in ``year`` (found by scanning hours)."""
    out = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    prev = t.astimezone(zone).utcoffset()
    while t.year == year:
        t2 = t + timedelta(hours=1)
        off = t2.astimezone(zone).utcoffset()
        if off != prev:
            out.append(t2)
            prev = off
        t = t2
    return out


CHANGES = {name: transitions(ZoneInfo(name)) for name in ZONES}


def test_each_zone_has_two_changes_in_2026() -> None:
    assert all(len(v) == 2 for v in CHANGES.values()), CHANGES


minute = st.one_of(
    st.just("*"),
    st.integers(0, 59).map(str),
    st.sampled_from(["*/5", "*/7", "*/15", "*/20", "0,30", "10-20", "45"]),
)
hour = st.one_of(
    st.just("*"), st.integers(0, 23).map(str), st.sampled_from(["1-3", "2", "*/2", "1,2,3"])
)
seconds = st.sampled_from(["0", "*/20", "30", "15,45"])
specific_minute = st.integers(0, 59).map(str)
specific_hour = st.sampled_from(["0", "1", "2", "3", "1,2", "2,3", "1-4", "23"])


@st.composite
def expressions(draw: st.DrawFn) -> str:
    fields = f"{draw(minute)} {draw(hour)} * * *"
    if draw(st.booleans()):
        fields = f"{draw(seconds)} {fields}"
    return fields


@st.composite
def near_a_change(draw: st.DrawFn) -> tuple[str, datetime]:
    zone = draw(st.sampled_from(ZONES))
    change = draw(st.sampled_from(CHANGES[zone]))
    offset = draw(st.integers(-2 * 86400, 2 * 86400))
    return zone, change + timedelta(seconds=offset)


def oracle_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """Independently of the code under test: the first UTC instant whose local wall
    time is ``wall`` or, for a wall time in a gap, the first after it (scanned by
    the minute; zones change on whole minutes)."""
    for fold in (0, 1):
        u = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if u.astimezone(zone).replace(tzinfo=None) == wall:
            candidates = [
                wall.replace(tzinfo=zone, fold=f).astimezone(UTC)
                for f in (0, 1)
                if wall.replace(tzinfo=zone, fold=f)
                .astimezone(UTC)
                .astimezone(zone)
                .replace(tzinfo=None)
                == wall
            ]
            return min(candidates)
    u = wall.replace(tzinfo=zone, fold=1).astimezone(UTC).replace(second=0)
    while u.astimezone(zone).replace(tzinfo=None) < wall:
        u += timedelta(minutes=1)
    # Back to the change itself (whole minute): the first instant after the gap.
    while (u - timedelta(minutes=1)).astimezone(zone).utcoffset() == u.astimezone(
        zone
    ).utcoffset() and (u - timedelta(minutes=1)).astimezone(zone).replace(tzinfo=None) > wall:
        u -= timedelta(minutes=1)
    return u


def oracle_next(fields: str, zone_name: str, after: datetime) -> datetime:
    """cronsim over naive wall times from a day before, each resolved by the oracle."""
    zone = ZoneInfo(zone_name)
    start = after.astimezone(zone).replace(tzinfo=None) - timedelta(days=1)
    for wall in CronSim(fields, start):
        instant = oracle_instant(wall, zone)
        if instant > after:
            return instant
    raise AssertionError("no fire time")


@settings(max_examples=300, deadline=None)
@given(expr=expressions(), where=near_a_change())
def test_next_fire_matches_the_parser_and_the_dst_rule(
    expr: str, where: tuple[str, datetime]
) -> None:
    zone, after = where
    spec = CronSpec.parse(expr, zone)
    got = spec.next_after(after)
    assert got is not None
    assert got == oracle_next(spec.fields, zone, after)


@settings(max_examples=200, deadline=None)
@given(expr=expressions(), where=near_a_change())
def test_fire_times_increase_and_no_wall_time_fires_twice(
    expr: str, where: tuple[str, datetime]
) -> None:
    zone, after = where
    spec = CronSpec.parse(expr, zone)
    times = spec.upcoming(after, 40)
    assert times == sorted(set(times)), "strictly increasing"
    assert all(t > after for t in times)
    walls = [t.astimezone(spec.zone).replace(tzinfo=None) for t in times]
    assert len(walls) == len(set(walls)), "a repeated wall time fired twice"
    for t, wall in zip(times, walls, strict=True):
        matches = next(CronSim(spec.fields, wall - timedelta(seconds=1))) == wall
        # Otherwise it is the first instant after a gap holding a matching wall time.
        gap_end = (
            t.astimezone(spec.zone).utcoffset()
            != (t - timedelta(seconds=1)).astimezone(spec.zone).utcoffset()
        )
        assert matches or gap_end, (expr, zone, t)


@settings(max_examples=200, deadline=None)
@given(m=specific_minute, h=specific_hour, where=near_a_change(), dow=st.sampled_from(["*", "0-6"]))
def test_fixed_times_agree_with_cronsim_in_the_zone(
    m: str, h: str, dow: str, where: tuple[str, datetime]
) -> None:
    """For a 5-field expression at fixed minutes and hours, cronsim applies the
    same DST rule itself (cronie's): its own zone-aware answer must be ours."""
    zone_name, after = where
    zone = ZoneInfo(zone_name)
    expr = f"{m} {h} * * {dow}"
    ours = CronSpec.parse(expr, zone_name).upcoming(after, 5)
    local = after.astimezone(zone)
    theirs = [t.astimezone(UTC) for t in _take(CronSim(expr, local), 5)]
    # Started inside the second pass of a repeated hour, cronsim may answer that
    # hour's first pass, which is before the start; we never go back in time.
    theirs = [t for t in theirs if t > after]
    assert ours[: len(theirs)] == theirs
    assert len(theirs) >= 4


def _take(it: CronSim, n: int) -> list[datetime]:
    return [next(it) for _ in range(n)]


@settings(max_examples=100, deadline=None)
@given(expr=expressions(), offset=st.integers(0, 365 * 86400))
def test_utc_is_cronsim_itself(expr: str, offset: int) -> None:
    after = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset, microseconds=7)
    spec = CronSpec.parse(expr, "UTC")
    assert spec.upcoming(after, 3) == _take(CronSim(spec.fields, after), 3)


# -- the documented examples --------------------------------------------------------------
def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_skipped_wall_time_fires_once_at_the_end_of_the_gap() -> None:
    berlin = CronSpec.parse("30 2 * * *", "Europe/Berlin")
    assert berlin.upcoming(_utc(2026, 3, 28, 12), 2) == [
        _utc(2026, 3, 29, 1),
        _utc(2026, 3, 30, 0, 30),
    ]
    every5 = CronSpec.parse("*/5 2 * * *", "Europe/Berlin")
    # 02:00-02:55 do not exist on 29 March: one fire at 03:00 CEST for all twelve.
    assert every5.upcoming(_utc(2026, 3, 29, 0, 50), 2) == [
        _utc(2026, 3, 29, 1),
        _utc(2026, 3, 30, 0),
    ]


def test_a_repeated_wall_time_fires_once_at_its_first_occurrence() -> None:
    ny = CronSpec.parse("30 1 * * *", "America/New_York")
    # 01:30 happens twice on 1 November 2026 (EDT, then EST): fires at the first.
    assert ny.upcoming(_utc(2026, 11, 1, 0), 2) == [
        _utc(2026, 11, 1, 5, 30),
        _utc(2026, 11, 2, 6, 30),
    ]
    every20 = CronSpec.parse("*/20 * * * *", "America/New_York")
    walls = [
        t.astimezone(ZoneInfo("America/New_York")).strftime("%H:%M%z")
        for t in every20.upcoming(_utc(2026, 11, 1, 5, 0), 4)
    ]
    assert walls == ["01:20-0400", "01:40-0400", "02:00-0500", "02:20-0500"]


def test_macros_and_seconds() -> None:
    assert CronSpec.parse("@hourly").fields == "0 * * * *"
    assert CronSpec.parse("@DAILY").fields == "0 0 * * *"
    every = CronSpec.parse("*/15 * * * * *")
    assert every.upcoming(_utc(2026, 1, 1), 3) == [
        _utc(2026, 1, 1, 0, 0, 15),
        _utc(2026, 1, 1, 0, 0, 30),
        _utc(2026, 1, 1, 0, 0, 45),
    ]


@pytest.mark.parametrize(
    ("expr", "zone", "field"),
    [
        ("", "UTC", "cron"),
        ("x" * 201, "UTC", "cron"),
        ("* * * * * * *", "UTC", "cron"),
        ("*/0 * * * *", "UTC", "cron"),
        ("0 0 31 4 *", "UTC", "cron"),
        ("* * * * *\x00", "UTC", "cron"),
        ("@every_5m", "UTC", "cron"),
        ("* * * * *", "", "timezone"),
        ("* * * * *", "UTC\x00", "timezone"),
        ("* * * * *", "/etc/localtime", "timezone"),
        ("* * * * *", "Europe/../../etc/passwd", "timezone"),
        ("* * * * *", "A" * 65, "timezone"),
    ],
)
def test_bad_expressions_and_zones_say_why(expr: str, zone: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        CronSpec.parse(expr, zone)
    assert [d.field for d in info.value.details] == [field]
    assert info.value.details[0].message


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("*/1e20 * * * *", "minute step '1e20' must be a whole number from 1 to 59"),
        ("*/" + "9" * 30 + " * * * *", "minute step '99999999999999999999...'"),
        ("*/61 * * * *", "minute step '61' must be a whole number from 1 to 59"),
        ("0 */24 * * *", "hour step '24' must be a whole number from 1 to 23"),
        ("0 0 1-31/32 * *", "day step '32'"),
        ("0 0 1 */13 *", "month step '13'"),
        ("0 0 * * 1-5/8", "weekday step '8'"),
        ("*/60 * * * * *", "second step '60'"),
        ("*/+5 * * * *", "minute step '+5'"),
        ("*/2.5 * * * *", "minute step '2.5'"),
        ("0,*/-1 * * * *", "minute step '-1'"),
        ("*/ * * * *", "minute step ''"),
    ],
)
def test_steps_must_be_whole_numbers_within_their_field(expr: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        CronSpec.parse(expr)
    assert [d.field for d in info.value.details] == ["cron"]
    assert message in info.value.details[0].message


def test_steps_within_their_fields_parse_and_stored_ones_are_not_rechecked() -> None:
    for expr in ("*/59 */23 */31 */12 */7", "5/15 * * * *", "*/05 * * * *", "*/2 0 * * * *"):
        assert CronSpec.parse(expr).fields == expr
    # A schedule stored before steps were checked still computes its fire times.
    old = _schedule(cron="0 */24 * * *")
    assert old.spec().next_after(_utc(2026, 1, 1)) == _utc(2026, 1, 2)


def _schedule(**fields: object) -> Schedule:
    values: dict[str, object] = {
        "id": "s1",
        "name": "s",
        "cron": "* * * * *",
        "job_type": "t",
        "next_fire_at": _utc(2026, 1, 1),
    }
    values.update(fields)
    return Schedule(**values)  # type: ignore[arg-type]


def test_plans_skip_and_catch_up() -> None:
    s = _schedule()
    now = _utc(2026, 1, 1, 1, 0, 30)  # 61 instants due, an hour late at most
    skip = plan_fires(s, s.spec(), now, grace=90)
    assert [t for t, _ in skip.fires] == [_utc(2026, 1, 1, 0, 59), _utc(2026, 1, 1, 1, 0)]
    assert skip.skip_to == _utc(2026, 1, 1, 0, 59)
    assert skip.skipped == 59
    assert skip.fires[-1][1] == _utc(2026, 1, 1, 1, 1)
    c = s.with_(misfire="catch_up", catch_up_max=3)
    plan = plan_fires(c, c.spec(), now, grace=0)
    assert [t for t, _ in plan.fires] == [
        _utc(2026, 1, 1, 0, 58),
        _utc(2026, 1, 1, 0, 59),
        _utc(2026, 1, 1, 1, 0),
    ]
    assert plan.skipped == 58
    # Not due yet, or paused: nothing.
    assert plan_fires(s, s.spec(), _utc(2025, 12, 31), grace=60).fires == ()
    assert plan_fires(s.with_(state="paused"), s.spec(), now, grace=60).fires == ()


def test_a_catch_up_far_behind_stays_bounded() -> None:
    s = _schedule(cron="* * * * * *", misfire="catch_up", catch_up_max=5)
    now = _utc(2026, 1, 3)  # two days of every-second instants behind
    plan = plan_fires(s, s.spec(), now, grace=1)
    assert len(plan.fires) == 5 + 2  # the latest five misfires and the on-time ones
    assert plan.fires[-1][0] == now


@pytest.mark.parametrize("cron", ["* * * * * *", "*/7 * * * * *", "0 0 * * * *"])
def test_a_catch_up_far_behind_fires_the_most_recent_misfires(cron: str) -> None:
    # Past the 10,000-instant lookback, the plan used to fire instants from the start
    # of the outage (two days old here) instead of the latest ones before the grace.
    s = _schedule(cron=cron, misfire="catch_up", catch_up_max=5)
    now = _utc(2028, 1, 1)  # two years of hourly, two days of per-second instants behind
    if cron != "0 0 * * * *":
        now = _utc(2026, 1, 3)
    spec = s.spec()
    plan = plan_fires(s, spec, now, grace=1)
    late_before = now - timedelta(seconds=1)
    expected: list[datetime] = []
    t = spec.next_after(late_before - timedelta(days=1))
    while t is not None and t < late_before:
        expected = [*expected[-4:], t]
        t = spec.next_after(t)
    assert [f for f, _ in plan.fires][:5] == expected
    assert plan.skip_to == expected[0]


def test_jitter_delays_run_at_within_the_bound() -> None:
    s = _schedule(jitter=10.0)
    assert job_for_fire(s, _utc(2026, 1, 1), 0.0).run_at == _utc(2026, 1, 1)
    assert job_for_fire(s, _utc(2026, 1, 1), 1.0).run_at == _utc(2026, 1, 1, 0, 0, 10)
    assert job_for_fire(s, _utc(2026, 1, 1), 7.0).run_at == _utc(2026, 1, 1, 0, 0, 10)


def test_a_blank_expression_is_refused_not_a_crash() -> None:
    for blank in ("   ", "\t", " \n "):
        with pytest.raises(ValidationError, match="blank"):
            CronSpec.parse(blank, "UTC")


def test_a_one_value_range_with_a_step_fires_at_that_value_only() -> None:
    # The cron library read 0-0/1 as every minute.
    after = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    for expression in ("0-0/1 * * * *", "0-0 * * * *", "0 * * * *"):
        spec = CronSpec.parse(expression, "UTC")
        assert spec.next_after(after) == datetime(2026, 1, 1, 1, 0, tzinfo=UTC), expression
    spec = CronSpec.parse("5-5/2,30 * * * *", "UTC")
    assert spec.next_after(after) == datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert spec.next_after(spec.next_after(after)) == datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
