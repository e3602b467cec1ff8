"""Contract: the dashboard's bounded reads (state_counts, queue_depths,
browse_jobs, job_events, job_children, recent_stats) on every backend."""

from __future__ import annotations

from datetime import datetime, timedelta

from storekit import at, finish, lease_one, new, submit, submit_one

from conveyor.domain.dashboard import Count, Cursor, RecentStats
from conveyor.domain.job import JobQuery
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


async def test_state_counts_are_exact_below_the_cap_and_flagged_at_it(store: Store) -> None:
    await submit(store, *(new("task") for _ in range(5)))
    counts = await store.state_counts(cap=100)
    assert counts[JobState.PENDING] == Count(5, exact=True)
    assert counts[JobState.FAILED] == Count(0, exact=True)
    capped = await store.state_counts(cap=3)
    assert capped[JobState.PENDING].value >= 3
    # The memory store counts everything (exact); SQL stores stop at the cap.
    assert capped[JobState.PENDING].exact == (capped[JobState.PENDING].value == 5)


async def test_queue_depths_group_by_queue_and_state(store: Store) -> None:
    await submit(store, new("a", queue="q1"), new("a", queue="q1"), new("b", queue="q2"))
    depths, complete = await store.queue_depths((JobState.PENDING,), cap=100)
    assert complete
    assert depths == {("q1", JobState.PENDING): 2, ("q2", JobState.PENDING): 1}
    _, complete = await store.queue_depths((JobState.PENDING,), cap=2)
    assert not complete


async def test_browse_jobs_pages_newest_first_by_key_without_gaps(store: Store) -> None:
    ids = []
    for i in range(7):
        job = await submit_one(store, "email" if i % 2 else "sms", now=at(i // 2))
        ids.append(job.id)
    expected = [
        j.id
        for j in sorted(
            [await store.get(i) for i in ids], key=lambda j: (j.created_at, j.id), reverse=True
        )
    ]
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.browse_jobs(JobQuery(limit=3), cursor)
        seen += [j.id for j in page]
        if len(page) < 3:
            break
        cursor = Cursor(page[-1].created_at, page[-1].id)  # type: ignore[arg-type]
    assert seen == expected
    emails = await store.browse_jobs(JobQuery(job_type="email", limit=50), None)
    assert {j.job_type for j in emails} == {"email"}
    assert len(emails) == 3
    prefix = ids[3][:14]
    by_prefix = await store.browse_jobs(JobQuery(limit=50), None, prefix)
    assert ids[3] in {j.id for j in by_prefix}
    assert all(j.id.startswith(prefix) for j in by_prefix)
    assert await store.browse_jobs(JobQuery(limit=50), None, "ffffffff") == []
    none = await store.browse_jobs(JobQuery(states=(JobState.FAILED,), limit=50), None)
    assert none == []


async def test_job_events_and_children(store: Store) -> None:
    parent = await submit_one(store, now=at(0))
    (child,) = await submit(store, new("task", depends_on=[parent.id]), now=at(1))
    leased = await lease_one(store, now=at(2))
    assert leased.id == parent.id
    assert await finish(store, leased, Action.COMPLETE, now=at(3), result=1)
    events = await store.job_events(parent.id, at(0), at(10), 100)
    assert [e.type for e in events] == ["job_submitted", "job_started", "job_completed"]
    assert all(e.job_id == parent.id for e in events)
    assert await store.job_events(parent.id, at(5), at(10), 100) == []
    assert await store.job_children(parent.id, 10) == [child.id]
    assert await store.job_children(child.id, 10) == []


async def test_recent_stats_buckets_waits_and_oldest_pending(store: Store) -> None:
    await submit_one(store, now=at(0))
    first = await lease_one(store, now=at(30))
    assert await finish(store, first, Action.COMPLETE, now=at(61))
    await submit_one(store, now=at(62))
    stats = await store.recent_stats(at(0) - timedelta(hours=1), sample=100)
    assert sum(b.completed for b in stats.buckets) == 1
    assert sum(b.submitted for b in stats.buckets) == 2
    assert stats.wait_p95_ms is not None
    assert abs(stats.wait_p95_ms - 30_000) < 1
    assert stats.oldest_pending == at(62)
    later = await store.recent_stats(at(3600), sample=100)
    assert later.buckets == []
    assert later.wait_p95_ms is None


async def test_recent_stats_buckets_since_narrows_only_the_buckets(store: Store) -> None:
    await submit_one(store, now=at(0))
    first = await lease_one(store, now=at(30))
    assert await finish(store, first, Action.COMPLETE, now=at(61))
    await submit_one(store, now=at(125))
    since = at(0) - timedelta(hours=1)
    whole = await store.recent_stats(since, sample=100)
    narrow = await store.recent_stats(since, sample=100, buckets_since=at(120))
    assert [b.minute for b in narrow.buckets] == [at(120)]
    assert (narrow.buckets[0].submitted, narrow.buckets[0].completed) == (1, 0)
    # The wait p95 and the oldest pending job still cover the whole window.
    assert narrow.wait_p95_ms == whole.wait_p95_ms
    assert narrow.wait_p95_ms is not None
    assert narrow.oldest_pending == whole.oldest_pending == at(125)
    # An edge before ``since`` is ``since``.
    early = await store.recent_stats(since, sample=100, buckets_since=since - timedelta(days=1))
    assert early.buckets == whole.buckets


async def test_minute_history_reads_closed_minutes_once(store: Store) -> None:
    from conveyor.dashboard.snapshot import MinuteHistory

    await submit_one(store, now=at(0))
    first = await lease_one(store, now=at(30))
    assert await finish(store, first, Action.COMPLETE, now=at(61))
    history = MinuteHistory()
    hour = timedelta(hours=1)
    assert (await history.stats(store, at(200), hour, 100)).buckets == (
        await store.recent_stats(at(200) - hour, 100)
    ).buckets
    # A job written into a minute that was over at the last render (only a
    # back-dated write can) is not read again; one in a newer minute is.
    await submit_one(store, now=at(100))
    await submit_one(store, now=at(190))
    kept = await history.stats(store, at(230), hour, 100)
    direct = await store.recent_stats(at(230) - hour, 100)
    assert submitted(kept) == {at(0): 1, at(180): 1}
    assert submitted(direct) == {at(0): 1, at(60): 1, at(180): 1}
    assert {b.minute: b.completed for b in kept.buckets if b.completed} == {at(60): 1}
    # A clock that went back reads the whole window again.
    again = await history.stats(store, at(150), hour, 100)
    assert submitted(again) == submitted(direct)


def submitted(stats: RecentStats) -> dict[datetime, int]:
    return {b.minute: b.submitted for b in stats.buckets if b.submitted}


async def test_queue_settings_lists_settings_without_counting(store: Store) -> None:
    await submit(store, new("a", queue="busy"), new("a", queue="held"))
    assert await store.queue_settings() == []
    await store.set_queue("held", at(1), paused=True)
    await store.set_queue("capped", at(2), concurrency_limit=3)
    got = {q.name: q for q in await store.queue_settings()}
    assert sorted(got) == ["capped", "held"]  # "busy" has jobs but no settings
    assert got["held"].paused
    assert got["held"].concurrency_limit is None
    assert got["capped"].concurrency_limit == 3
    assert not got["capped"].paused
    assert got["held"].pending == got["held"].running == 0
