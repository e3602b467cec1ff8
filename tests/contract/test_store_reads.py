"""Contract: get, executions, list_jobs, count_by_state, pending_by_type."""

from __future__ import annotations

import pytest
from storekit import at, finish, lease, lease_one, new, run_to, submit, submit_one

from conveyor.domain.errors import JobNotFound, ValidationError
from conveyor.domain.job import Job, JobQuery
from conveyor.domain.states import Action, JobState
from conveyor.storage.base import Store


async def test_get_of_an_unknown_job_is_not_found(store: Store) -> None:
    with pytest.raises(JobNotFound) as info:
        await store.get("no-such-job")
    assert info.value.job_id == "no-such-job"
    assert "no-such-job" in str(info.value)


async def test_executions_of_an_unknown_job_is_not_found(store: Store) -> None:
    with pytest.raises(JobNotFound):
        await store.executions("no-such-job")


async def test_executions_of_a_new_job_is_empty(store: Store) -> None:
    job = await submit_one(store)
    assert await store.executions(job.id) == []


async def test_executions_list_every_attempt_in_order(store: Store) -> None:
    job = await submit_one(store)
    first = await lease_one(store, "w1", now=at(1))
    assert await finish(store, first, Action.RETRY, now=at(2), error="e1")
    second = await lease_one(store, "w2", now=at(3))
    assert await finish(store, second, Action.COMPLETE, now=at(4), result="ok")

    runs = await store.executions(job.id)
    assert [
        (r.attempt, r.worker_id, r.started_at, r.finished_at, r.outcome, r.error) for r in runs
    ] == [
        (1, "w1", at(1), at(2), "retry", "e1"),
        (2, "w2", at(3), at(4), "completed", None),
    ]
    assert all(r.job_id == job.id for r in runs)


async def populate(store: Store) -> dict[str, Job]:
    """Seven jobs over two queues, three types, two owners, four states."""
    jobs = {}
    spec = [
        ("a1", "email", "q1", "alice", 10),
        ("a2", "email", "q1", "bob", 20),
        ("a3", "sms", "q1", "alice", 30),
        ("a4", "sms", "q2", "alice", 40),
        ("a5", "push", "q2", "bob", 50),
        ("a6", "push", "q2", "bob", 60),
        ("a7", "email", "q2", None, 70),
    ]
    for i, (name, job_type, queue, owner, priority) in enumerate(spec):
        jobs[name] = await submit_one(
            store,
            job_type,
            queue=queue,
            created_by=owner,
            priority=priority,
            payload={"name": name},
            now=at(i),
        )
    await store.cancel(jobs["a2"].id, at(10))  # cancelled
    (running,) = await lease(store, job_types=("push",), limit=1, now=at(11))  # a6: running
    assert running.id == jobs["a6"].id
    (done,) = await lease(store, job_types=("push",), limit=1, now=at(12))  # a5: completed
    assert await finish(store, done, Action.COMPLETE, now=at(13))
    return jobs


def names(jobs: list[Job]) -> list[str]:
    return [j.payload["name"] for j in jobs]


async def test_list_jobs_defaults_to_newest_first(store: Store) -> None:
    await populate(store)
    page = await store.list_jobs(JobQuery())
    assert names(page.jobs) == ["a7", "a6", "a5", "a4", "a3", "a2", "a1"]
    assert (page.total, page.limit, page.offset, page.has_more) == (7, 50, 0, False)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (JobQuery(states=(JobState.PENDING,)), ["a7", "a4", "a3", "a1"]),
        (JobQuery(states=(JobState.CANCELLED, JobState.COMPLETED)), ["a5", "a2"]),
        (JobQuery(states=(JobState.FAILED,)), []),
        (JobQuery(job_type="email"), ["a7", "a2", "a1"]),
        (JobQuery(queue="q2"), ["a7", "a6", "a5", "a4"]),
        (JobQuery(created_by="alice"), ["a4", "a3", "a1"]),
        (JobQuery(job_type="sms", queue="q1"), ["a3"]),
        (JobQuery(states=(JobState.PENDING,), queue="q1", created_by="alice"), ["a3", "a1"]),
        (JobQuery(job_type="nope"), []),
    ],
    ids=[
        "pending",
        "cancelled-or-completed",
        "failed",
        "job_type",
        "queue",
        "created_by",
        "type-and-queue",
        "three-filters",
        "no-match",
    ],
)
async def test_list_jobs_filters(store: Store, query: JobQuery, expected: list[str]) -> None:
    await populate(store)
    page = await store.list_jobs(query)
    assert names(page.jobs) == expected
    assert page.total == len(expected)


@pytest.mark.parametrize(
    ("sort", "descending", "expected"),
    [
        ("created_at", False, ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]),
        ("priority", True, ["a7", "a6", "a5", "a4", "a3", "a2", "a1"]),
        ("priority", False, ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]),
        # Ties keep submission order (reversed when descending).
        ("job_type", False, ["a1", "a2", "a7", "a5", "a6", "a3", "a4"]),
        ("job_type", True, ["a4", "a3", "a6", "a5", "a7", "a2", "a1"]),
        ("updated_at", True, ["a5", "a6", "a2", "a7", "a4", "a3", "a1"]),
        # Unfinished jobs (no completed_at) sort as smallest: first ascending, last descending.
        ("completed_at", True, ["a5", "a2", "a7", "a6", "a4", "a3", "a1"]),
        ("completed_at", False, ["a1", "a3", "a4", "a6", "a7", "a2", "a5"]),
    ],
)
async def test_list_jobs_sorts(
    store: Store, sort: str, descending: bool, expected: list[str]
) -> None:
    await populate(store)
    page = await store.list_jobs(JobQuery(sort=sort, descending=descending))
    assert names(page.jobs) == expected


async def test_list_jobs_sorts_by_run_at(store: Store) -> None:
    await submit(
        store,
        new("x", run_at=at(30), payload={"name": "late"}),
        new("x", run_at=at(10), payload={"name": "early"}),
        new("x", run_at=at(20), payload={"name": "mid"}),
    )
    page = await store.list_jobs(JobQuery(sort="run_at", descending=False))
    assert names(page.jobs) == ["early", "mid", "late"]


async def test_list_jobs_pages(store: Store) -> None:
    await submit(store, *(new(payload={"name": f"j{i}"}) for i in range(7)))
    seen: list[str] = []
    pages = []
    for offset in (0, 3, 6):
        page = await store.list_jobs(JobQuery(limit=3, offset=offset, descending=False))
        pages.append((len(page.jobs), page.total, page.has_more))
        seen += names(page.jobs)
    assert pages == [(3, 7, True), (3, 7, True), (1, 7, False)]
    assert seen == [f"j{i}" for i in range(7)]

    beyond = await store.list_jobs(JobQuery(limit=3, offset=10))
    assert (beyond.jobs, beyond.total, beyond.has_more) == ([], 7, False)

    exact = await store.list_jobs(JobQuery(limit=7))
    assert (len(exact.jobs), exact.has_more) == (7, False)


async def test_list_jobs_total_counts_the_filter_not_the_page(store: Store) -> None:
    await submit(store, *(new("a") for _ in range(5)), *(new("b") for _ in range(2)))
    page = await store.list_jobs(JobQuery(job_type="a", limit=2))
    assert (len(page.jobs), page.total, page.has_more) == (2, 5, True)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (JobQuery(limit=0), "limit"),
        (JobQuery(limit=1001), "limit"),
        (JobQuery(offset=-1), "offset"),
        (JobQuery(sort="payload"), "sort"),
        (JobQuery(sort="id; DROP TABLE jobs"), "sort"),
    ],
    ids=["limit-0", "limit-1001", "offset-negative", "sort-unknown", "sort-injection"],
)
async def test_bad_query_is_a_validation_error(store: Store, query: JobQuery, field: str) -> None:
    await submit_one(store)
    with pytest.raises(ValidationError) as info:
        await store.list_jobs(query)
    assert [d.field for d in info.value.details] == [field]
    assert (await store.list_jobs(JobQuery())).total == 1  # still there


async def test_bad_query_lists_every_problem(store: Store) -> None:
    with pytest.raises(ValidationError) as info:
        await store.list_jobs(JobQuery(limit=0, offset=-5, sort="nope"))
    assert [d.field for d in info.value.details] == ["limit", "offset", "sort"]


async def test_count_by_state_names_every_state(store: Store) -> None:
    assert await store.count_by_state() == dict.fromkeys(JobState, 0)
    await populate(store)
    parent = await submit_one(store, "parent", run_at=at(999))
    await submit_one(store, "child", depends_on=[parent.id])
    failed = await submit_one(store, "doomed", now=at(20))
    got = await lease(store, job_types=("doomed",), now=at(20))
    assert await finish(store, got[0], Action.FAIL, now=at(21), error="x")
    assert failed.id == got[0].id

    assert await store.count_by_state() == {
        JobState.BLOCKED: 1,
        JobState.PENDING: 5,
        JobState.RUNNING: 1,
        JobState.COMPLETED: 1,
        JobState.FAILED: 1,
        JobState.CANCELLED: 1,
    }


async def test_pending_by_type_counts_ready_and_waiting_jobs_only(store: Store) -> None:
    assert await store.pending_by_type() == {}
    await populate(store)
    await submit_one(store, "sms", queue="q1", run_at=at(500))  # waiting still counts
    parent = await submit_one(store, "parent", queue="q9", run_at=at(999))
    await submit_one(store, "child", queue="q9", depends_on=[parent.id])  # blocked: no
    assert await store.pending_by_type() == {
        ("q1", "email"): 1,
        ("q1", "sms"): 2,
        ("q2", "sms"): 1,
        ("q2", "email"): 1,
        ("q9", "parent"): 1,
    }


async def test_get_returns_the_parents(store: Store) -> None:
    p1, p2 = await submit(store, new("p"), new("p"))
    child = await submit_one(store, "c", depends_on=[p1.id, p2.id, p1.id])
    got = await store.get(child.id)
    assert sorted(got.depends_on) == sorted([p1.id, p2.id])
    assert (await store.get(p1.id)).depends_on == []
    await run_to(store, p1, Action.COMPLETE)
    assert sorted((await store.get(child.id)).depends_on) == sorted([p1.id, p2.id])
