"""Unit tests of the dashboard's pure parts: cookie signing, the DAG layout,
the minute chart and the number formats."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.dashboard.charts import layered_dag, minute_chart
from conveyor.dashboard.router import _count, _duration, _parse_cursor, _safe_next
from conveyor.dashboard.session import Session, Sessions
from conveyor.domain.dashboard import Count, MinuteBucket, percentile
from conveyor.domain.errors import ConfigurationError
from conveyor.domain.workflow import StepDetail


class _Auth:  # Sessions only keeps it for lookups these tests do not make
    pass


def sessions(secret: str = "s" * 32) -> Sessions:
    return Sessions(_Auth(), secret)  # type: ignore[arg-type]


def test_cookies_round_trip_and_refuse_forgery_and_expiry() -> None:
    s = sessions()
    session = Session("hash", "nonce", time.time() + 60)
    raw = s.encode(session)
    assert s.decode(raw) == Session("hash", "nonce", float(int(session.expires)))
    body, _, sig = raw.rpartition(".")
    assert s.decode(body + "." + sig[::-1]) is None
    assert s.decode("x" + raw) is None
    assert sessions("t" * 32).decode(raw) is None  # another secret
    assert s.decode(s.encode(Session("hash", "n", time.time() - 1))) is None
    for junk in ("", ".", "a.b", "x" * 5000, "e30." + "0" * 64):
        assert s.decode(junk) is None


def test_csrf_tokens_are_per_nonce_and_secret() -> None:
    s = sessions()
    assert s.csrf_for("a") != s.csrf_for("b")
    assert s.csrf_for("a") != sessions("t" * 32).csrf_for("a")


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        sessions("short")
    assert sessions("").csrf_for("a") != sessions("").csrf_for("a")  # random per process


def step(name: str, *parents: str, status: str = "pending") -> StepDetail:
    return StepDetail(name, f"job-{name}", "t", status, 1, list(parents), None, None, None, None)


def test_dag_layers_follow_the_longest_path() -> None:
    dag = layered_dag([step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c", "a")])
    x = {n.step.name: n.x for n in dag.nodes}
    assert x["a"] < x["b"] == x["c"] < x["d"]
    assert len(dag.edges) == 5
    assert dag.width > x["d"]
    assert layered_dag([]).nodes == []


def test_minute_chart_stacks_series_and_places_the_last_minute_right() -> None:
    now = datetime(2026, 1, 1, 12, 30, 20, tzinfo=UTC)
    buckets = [
        MinuteBucket(now.replace(second=0), completed=3, failed=1),
        MinuteBucket(now.replace(second=0) - timedelta(minutes=90), completed=50),
    ]
    chart = minute_chart("t", buckets, now, ("completed", "failed"))
    assert chart.total == 4  # the bucket outside the hour is not drawn
    assert chart.peak == 4
    assert [b.css for b in chart.bars] == ["completed", "failed"]
    assert chart.bars[0].x > chart.width - 20


def test_formats() -> None:
    assert _count(Count(1234)) == "1,234"
    assert _count(Count(10_000, exact=False)) == "≥ 10,000"
    assert _count(Count(1_234_567, exact=False)) == "~1.2M"
    assert _duration(None) == "—"
    assert _duration(12) == "12 ms"
    assert _duration(90_000) == "90.0 s"
    assert percentile([], 0.95) is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0


def test_next_and_cursor_parsing_refuse_what_is_not_theirs() -> None:
    assert _safe_next("/ui/jobs?state=failed") == "/ui/jobs?state=failed"
    for bad in ("//evil.example", "https://evil.example", "/\\evil", None, 5, "/x\n"):
        assert _safe_next(bad) == "/"
    cursor = _parse_cursor("1767225600.5~abc123")
    assert cursor is not None
    assert cursor.job_id == "abc123"
    assert cursor.created_at == datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
    for bad in (None, "", "x~y", "1~a b", "inf~a", "1e999~a", "1", "1~" + "a" * 65):
        assert _parse_cursor(bad) is None


async def test_shared_reads_once_for_concurrent_callers_and_within_its_ttl() -> None:
    import asyncio

    from conveyor.dashboard.snapshot import Shared

    calls = 0
    gate = asyncio.Event()

    async def read() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    shared: Shared[int] = Shared(ttl=60)
    waiting = [asyncio.ensure_future(shared.get(read)) for _ in range(5)]
    gate.set()
    assert await asyncio.gather(*waiting) == [1] * 5
    assert await shared.get(read) == 1  # within the ttl
    assert calls == 1

    fresh: Shared[int] = Shared(ttl=0)
    assert await fresh.get(read) == 2
    assert await fresh.get(read) == 3  # ttl 0: every call reads

    async def broken() -> int:
        raise RuntimeError("store down")

    failing: Shared[int] = Shared(ttl=60)
    with pytest.raises(RuntimeError):
        await failing.get(broken)
    assert await failing.get(read) == 4  # a failure is not kept
