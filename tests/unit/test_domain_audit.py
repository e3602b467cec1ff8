"""The audit log's pure parts: canonical JSON, drafts (hostile input), chaining
and ``verify``'s reasons."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from conveyor.domain.audit import (
    GENESIS,
    AuditDraft,
    AuditEntry,
    AuditQuery,
    canonical_json,
    chain,
    entry_hash,
    make_anchor,
    verify,
)
from conveyor.domain.errors import ValidationError

AT = datetime(2026, 12, 1, 6, 11, 25, 123456, tzinfo=UTC)


def draft(**kw) -> AuditDraft:
    return AuditDraft.make("job.cancel", "job", kw.pop("rid", "j1"), at=AT, **kw)


def log(n: int) -> list[AuditEntry]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        e = chain(draft(rid=f"j{i}"), i, prev)
        out.append(e)
        prev = e.hash
    return out


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert (
        canonical_json({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()
    )
    with pytest.raises(ValueError, match="JSON compliant"):
        canonical_json({"x": float("nan")})


def test_hash_covers_every_field_and_the_previous_hash() -> None:
    e = chain(draft(summary={"k": 1}), 1, GENESIS)
    assert e.at == "2026-12-01T06:11:25.123456Z"
    assert e.hash == hashlib.sha256(canonical_json(e.fields())).hexdigest()
    for field, value in (("actor", "x"), ("summary", {"k": 2}), ("prev_hash", "1" * 64)):
        assert entry_hash({**e.fields(), field: value}) != e.hash


def test_times_are_normalised_to_utc() -> None:
    other = AT.astimezone(timezone(timedelta(hours=5)))
    assert draft().at == AuditDraft.make("a.b", "job", "j", at=other).at


def test_ai_fields_are_hashed_unless_asked_not_to() -> None:
    hashed = draft(model="m", prompt="p", response="r")
    assert hashed.prompt == hashlib.sha256(b"p").hexdigest()
    assert hashed.ai_hashed is True
    plain = draft(prompt="p", response="r", hash_ai_fields=False)
    assert (plain.prompt, plain.response, plain.ai_hashed) == ("p", "r", False)
    assert draft().ai_hashed is False  # nothing to hash


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"actor": ""}, "actor"),
        ({"actor": "a\x00"}, "actor"),
        ({"actor": "a" * 201}, "actor"),
        ({"actor": 7}, "actor"),
        ({"summary": {"x": float("inf")}}, "summary"),
        ({"summary": {"x": "y" * 5000}}, "summary"),
        ({"summary": ["not", "an", "object"]}, "summary"),
        ({"summary": {1: "int key"}}, "summary"),
        ({"prompt": "\ud800", "hash_ai_fields": False}, "prompt"),
        ({"prompt": "p" * (64 * 1024 + 1)}, "prompt"),
        ({"hash_ai_fields": "yes"}, "hash_ai_fields"),
        ({"request_id": "r" * 201}, "request_id"),
        ({"rid": "r" * 501}, "resource_id"),
    ],
)
def test_bad_drafts_are_refused_with_details(kwargs, field) -> None:
    with pytest.raises(ValidationError) as caught:
        draft(**kwargs)
    assert field in [d.field for d in caught.value.details]


@pytest.mark.parametrize("action", ["", "Job.Cancel", "a b", "x" * 101, None, "-x"])
def test_bad_actions(action) -> None:
    with pytest.raises(ValidationError):
        AuditDraft.make(action, "job", "j", at=AT)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValidationError):
        AuditDraft.make("a.b", "job", "j", at=datetime(2026, 1, 1))  # noqa: DTZ001


def test_verify_reasons() -> None:
    entries = log(5)
    assert verify(entries).ok
    assert verify(entries).last_seq == 5
    gap = verify([entries[0], *entries[2:]]).broken
    assert (gap.seq, "missing" in gap.reason) == (3, True)
    swapped = verify([entries[0], entries[2], entries[1], *entries[3:]]).broken
    assert swapped.seq == 3
    edited = AuditEntry(**{**entries[1].fields(), "actor": "eve"}, hash=entries[1].hash)
    broken = verify([entries[0], edited, *entries[2:]]).broken
    assert (broken.seq, "edited" in broken.reason) == (2, True)
    assert "no anchor yet" in verify(entries).warnings[0]


def test_anchors_detect_truncation_and_forgery() -> None:
    entries = log(5)
    key = b"k" * 32
    anchor = make_anchor(5, entries[4].hash, AT, key, "k:v1")
    assert verify(entries, [anchor], anchor_key=key).ok
    cut = verify(entries[:3], [anchor], anchor_key=key).broken
    assert (cut.seq, "truncated" in cut.reason) == (5, True)
    forged = make_anchor(3, entries[2].hash, AT, b"x" * 32, "k:v1")
    assert "forged" in verify(entries[:3], [forged], anchor_key=key).broken.reason
    unsigned = make_anchor(5, entries[4].hash, AT, None, None)
    verdict = verify(entries, [unsigned])
    assert verdict.ok
    assert any("unsigned" in w for w in verdict.warnings)


def test_export_lines_round_trip() -> None:
    (e,) = log(1)
    assert AuditEntry.from_dict(e.to_dict()) == e
    assert verify([AuditEntry.from_dict(e.to_dict())]).ok


def test_queries_are_checked() -> None:
    AuditQuery(limit=1000).check()
    for bad in (AuditQuery(limit=0), AuditQuery(after=-1), AuditQuery(after=True)):
        with pytest.raises(ValidationError):
            bad.check()
