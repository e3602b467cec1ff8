"""NewJob validation, batches, queries and small Job rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.job import (
    MAX_RETRIES_LIMIT,
    MAX_TIMEOUT_MS,
    Job,
    JobQuery,
    NewJob,
    Page,
    lost_action,
    validate_batch,
)
from conveyor.domain.states import Action, JobState

NAME_RULE = "must be 1-100 characters of letters, digits, '_', '-', '.', ':'"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def errors(**fields: object) -> list[tuple[str, str]]:
    job = NewJob(**{"job_type": "ok", **fields})  # type: ignore[arg-type]
    return [(e.field, e.message) for e in job.errors()]


def test_a_valid_job_has_no_errors() -> None:
    job = NewJob(
        "send_email.v2:fast-lane",
        payload={"a": 1},
        queue="mail",
        priority=0,
        max_retries=MAX_RETRIES_LIMIT,
        timeout_ms=MAX_TIMEOUT_MS,
        run_at=NOW,
        idempotency_key="x" * 255,
        depends_on=["abc"],
    )
    assert job.errors() == []
    job.validate()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"job_type": ""}, [("job_type", NAME_RULE)]),
        ({"job_type": "a" * 101}, [("job_type", NAME_RULE)]),
        ({"job_type": "has space"}, [("job_type", NAME_RULE)]),
        ({"job_type": "slash/y"}, [("job_type", NAME_RULE)]),
        ({"job_type": 5}, [("job_type", NAME_RULE)]),
        ({"queue": ""}, [("queue", NAME_RULE)]),
        ({"queue": "q!"}, [("queue", NAME_RULE)]),
        ({"payload": ["a"]}, [("payload", "must be a JSON object")]),
        ({"payload": "text"}, [("payload", "must be a JSON object")]),
        ({"metadata": 3}, [("metadata", "must be a JSON object")]),
        ({"priority": -1}, [("priority", "must be an integer from 0 to 100")]),
        ({"priority": 101}, [("priority", "must be an integer from 0 to 100")]),
        ({"priority": True}, [("priority", "must be an integer from 0 to 100")]),
        ({"priority": 5.0}, [("priority", "must be an integer from 0 to 100")]),
        ({"max_retries": -1}, [("max_retries", "must be an integer from 0 to 100")]),
        ({"max_retries": 101}, [("max_retries", "must be an integer from 0 to 100")]),
        (
            {"timeout_ms": 0},
            [("timeout_ms", f"must be an integer from 1 to {MAX_TIMEOUT_MS} (or null)")],
        ),
        (
            {"timeout_ms": MAX_TIMEOUT_MS + 1},
            [("timeout_ms", f"must be an integer from 1 to {MAX_TIMEOUT_MS} (or null)")],
        ),
        ({"run_at": datetime(2026, 1, 1)}, [("run_at", "must be a timezone-aware datetime")]),  # noqa: DTZ001
        ({"run_at": "2026-01-01T00:00:00Z"}, [("run_at", "must be a timezone-aware datetime")]),
        ({"idempotency_key": ""}, [("idempotency_key", "must be 1-255 characters")]),
        ({"idempotency_key": "k" * 256}, [("idempotency_key", "must be 1-255 characters")]),
        ({"depends_on": "abc"}, [("depends_on", "must be a list of job ids")]),
        ({"depends_on": ["a", ""]}, [("depends_on", "must be a list of job ids")]),
        ({"depends_on": [1]}, [("depends_on", "must be a list of job ids")]),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, list) else "",
)
def test_each_rule_names_its_field_and_fix(
    fields: dict[str, object], expected: list[tuple[str, str]]
) -> None:
    assert errors(**fields) == expected


def test_null_timeout_and_run_at_are_allowed() -> None:
    assert errors(timeout_ms=None, run_at=None, idempotency_key=None) == []


def test_validate_reports_every_problem_in_one_error() -> None:
    job = NewJob("bad type", queue="", priority=200, max_retries=-1)
    with pytest.raises(ValidationError) as info:
        job.validate()
    assert isinstance(info.value, ValueError)
    assert info.value.details == (
        FieldError("job_type", NAME_RULE),
        FieldError("queue", NAME_RULE),
        FieldError("priority", "must be an integer from 0 to 100"),
        FieldError("max_retries", "must be an integer from 0 to 100"),
    )
    assert str(info.value) == (
        f"Invalid job: job_type {NAME_RULE}; queue {NAME_RULE}; "
        "priority must be an integer from 0 to 100; max_retries must be an integer from 0 to 100"
    )
    assert info.value.message == str(info.value)


def test_validate_batch_prefixes_fields_with_the_job_index() -> None:
    with pytest.raises(ValidationError) as info:
        validate_batch([NewJob("ok"), NewJob("ok", priority=-1), NewJob("", queue="")])
    assert [d.field for d in info.value.details] == [
        "jobs[1].priority",
        "jobs[2].job_type",
        "jobs[2].queue",
    ]
    assert str(info.value).startswith("Invalid job: jobs[1].priority must be")


def test_validate_batch_of_one_has_no_prefix() -> None:
    with pytest.raises(ValidationError) as info:
        validate_batch([NewJob("ok", priority=-1)])
    assert [d.field for d in info.value.details] == ["priority"]


def test_validate_batch_accepts_good_and_empty_batches() -> None:
    validate_batch([])
    validate_batch([NewJob("a"), NewJob("b")])


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        (JobQuery(limit=0), ["limit"]),
        (JobQuery(limit=1001), ["limit"]),
        (JobQuery(offset=-1), ["offset"]),
        (JobQuery(sort="id"), ["sort"]),
        (JobQuery(limit=0, offset=-1, sort="x"), ["limit", "offset", "sort"]),
    ],
)
def test_job_query_validation(query: JobQuery, fields: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        query.validate()
    assert [d.field for d in info.value.details] == fields
    assert str(info.value).startswith("Invalid query: ")


def test_job_query_accepts_every_sort_field_and_bounds() -> None:
    for sort in JobQuery.SORT_FIELDS:
        JobQuery(sort=sort, limit=1).validate()
    JobQuery(limit=1000, offset=0).validate()


def test_page_has_more() -> None:
    job = Job("id", "t", JobState.PENDING, {})
    assert Page([job], total=3, limit=1, offset=0).has_more
    assert Page([job], total=3, limit=1, offset=1).has_more
    assert not Page([job], total=3, limit=1, offset=2).has_more
    assert not Page([], total=0, limit=10, offset=0).has_more


def test_status_shows_cancelling_while_a_cancel_is_unconfirmed() -> None:
    job = Job("id", "t", JobState.RUNNING, {})
    assert job.status == "running"
    job.cancel_requested_at = NOW
    assert job.status == "cancelling"
    job.state = JobState.PENDING
    assert job.status == "pending"


def test_attempts_left() -> None:
    left = [
        Job("id", "t", JobState.PENDING, {}, attempt=n, max_retries=2).attempts_left
        for n in range(5)
    ]
    assert left == [3, 2, 1, 0, 0]


@pytest.mark.parametrize(
    ("lost_count", "attempt", "max_retries", "cancel", "max_lost", "action"),
    [
        (0, 1, 3, False, 2, Action.LOST),
        (1, 2, 3, False, 2, Action.QUARANTINE),  # the second loss
        (0, 1, 3, False, 1, Action.QUARANTINE),
        (0, 4, 3, False, 5, Action.QUARANTINE),  # no attempt left
        (0, 3, 3, False, 5, Action.LOST),
        (5, 9, 3, True, 2, Action.CONFIRM_CANCEL),  # a requested cancel wins
    ],
)
def test_lost_action(
    lost_count: int, attempt: int, max_retries: int, cancel: bool, max_lost: int, action: Action
) -> None:
    job = Job(
        "id",
        "t",
        JobState.RUNNING,
        {},
        lost_count=lost_count,
        attempt=attempt,
        max_retries=max_retries,
        cancel_requested_at=NOW if cancel else None,
    )
    assert lost_action(job, max_lost) is action


def test_bulk_ids_are_unique_time_prefixed_and_shaped_like_single_ones() -> None:
    from conveyor.domain.ids import new_job_id, new_job_ids

    ids = new_job_ids(1000)
    assert len(set(ids)) == 1000
    one = new_job_id()
    assert all(len(i) == len(one) == 32 for i in ids)
    assert all(int(i, 16) >= 0 for i in ids)
    assert abs(int(ids[0][:12], 16) - int(one[:12], 16)) < 60_000  # same clock, ms
    assert new_job_ids(0) == []


def test_with_payload_changes_the_payload_only() -> None:
    from dataclasses import asdict, replace

    job = NewJob(
        "t",
        {"a": 1},
        queue="q",
        priority=7,
        max_retries=2,
        timeout_ms=9,
        run_at=datetime(2030, 1, 1, tzinfo=UTC),
        idempotency_key="k",
        depends_on=("p",),
        metadata={"m": 1},
        created_by="me",
        workflow_id="w",
    )
    assert asdict(job.with_payload({"b": 2})) == asdict(replace(job, payload={"b": 2}))
