"""The event envelope, type filters and webhook signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from conveyor.domain.errors import ValidationError
from conveyor.domain.events import (
    EVENT_TYPES,
    EventFilter,
    envelope,
    parse_type_patterns,
    type_matches,
)
from conveyor.domain.job import Event
from conveyor.domain.webhooks import sign, validate_webhook, verify

WHEN = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def completed(event_id: int = 7, queue: str = "mail") -> Event:
    data = {
        "job_id": "j1",
        "job_type": "send_email",
        "queue": queue,
        "status": "completed",
        "attempt": 1,
        "result": {"ok": True},
        "duration_ms": 3.5,
    }
    return Event(event_id, "job_completed", "j1", data, WHEN)


def test_envelope_lifts_the_common_fields_and_keeps_the_rest_in_data() -> None:
    assert envelope(completed()) == {
        "id": 7,
        "type": "job_completed",
        "version": 1,
        "timestamp": "2026-11-23T12:00:00+00:00",
        "job_id": "j1",
        "job_type": "send_email",
        "queue": "mail",
        "data": {"status": "completed", "attempt": 1, "result": {"ok": True}, "duration_ms": 3.5},
    }


def test_envelope_of_a_non_job_event() -> None:
    e = Event(9, "webhook_disabled", None, {"webhook_id": "wh1"}, WHEN)
    out = envelope(e)
    assert out["job_id"] is None
    assert out["job_type"] is None
    assert out["data"] == {"webhook_id": "wh1"}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ()),
        ("", ()),
        ("job_*", ("job_*",)),
        ("job_completed, job_failed", ("job_completed", "job_failed")),
        (["*"], ("*",)),
    ],
)
def test_type_patterns_parse(raw: object, expected: tuple[str, ...]) -> None:
    assert parse_type_patterns(raw) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["job_finished", "JOB_*", "job-completed", "x" * 80, "job_*;drop"])
def test_unknown_or_malformed_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_type_patterns(bad)
    assert info.value.details[0].field == "types"


def test_type_matching_and_filters() -> None:
    assert type_matches((), "job_failed")
    assert type_matches(("job_*",), "job_failed")
    assert not type_matches(("job_completed",), "job_failed")
    assert all(type_matches(("*",), t) for t in EVENT_TYPES)
    e = completed()
    assert EventFilter(("job_*",), "j1", "mail").matches(e)
    assert not EventFilter(job_id="other").matches(e)
    assert not EventFilter(queue="default").matches(e)
    assert not EventFilter(("job_failed",)).matches(e)


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":1}'
    header = sign("secret-secret-secret", 1700000000, body)
    expected = hmac.new(b"secret-secret-secret", b"1700000000." + body, hashlib.sha256)
    assert header == f"t=1700000000,v1={expected.hexdigest()}"
    assert verify("secret-secret-secret", header, body, now=1700000100)
    assert not verify("other-secret-secret!", header, body, now=1700000100)
    assert not verify("secret-secret-secret", header, body + b" ", now=1700000100)
    assert not verify("secret-secret-secret", header, body, now=1700000000 + 301)  # too old
    assert not verify("secret-secret-secret", "garbage", body, now=1700000000)


def test_webhook_validation_names_every_problem() -> None:
    with pytest.raises(ValidationError) as info:
        validate_webhook("http://user:pw@x/h", [], "short")
    assert {d.field for d in info.value.details} == {"url", "event_types", "secret"}
    url, patterns = validate_webhook("https://hooks.example.com/a", ["job_*"], None)
    assert url == "https://hooks.example.com/a"
    assert patterns == ("job_*",)
