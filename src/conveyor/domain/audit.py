"""The hash-chained audit log (pure): entry shape, canonical form, hashing, verify.

Canonical JSON (what every hash and anchor MAC is computed over): the object's
keys sorted by code point, no whitespace (``,`` and ``:`` separators), text
as UTF-8 with non-ASCII characters written as themselves (not ``\\u`` escapes),
integers in decimal, no NaN or infinity, ``null`` for an absent field.

An entry's ``hash`` is the SHA-256 (lower-case hex) of the canonical JSON of
the object ``{"seq", "at", "actor", "action", "resource_type", "resource_id",
"summary", "request_id", "model", "prompt", "response", "ai_hashed",
"prev_hash"}``; ``at`` is ISO 8601 UTC with microseconds
(``2026-12-01T06:11:25.123456Z``). The first entry's ``prev_hash`` is
``GENESIS`` (64 zeros). ``verify`` walks the entries in ``seq`` order and
names the first one that breaks the chain; ``Anchor`` rows (a ``(seq, hash,
at)`` triple signed with HMAC-SHA256) let it see a truncated tail too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.limits import text_error

GENESIS = "0" * 64
#: Bounds, in characters (summary: bytes of its canonical JSON).
MAX_ACTOR = 200
MAX_ACTION = 100
MAX_RESOURCE_TYPE = 100
MAX_RESOURCE_ID = 500
MAX_REQUEST_ID = 200
MAX_MODEL = 200
MAX_AI_TEXT = 64 * 1024
MAX_SUMMARY_BYTES = 4096
MAX_LIST_LIMIT = 1000
_ACTION = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,99}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = (
    "seq",
    "at",
    "actor",
    "action",
    "resource_type",
    "resource_id",
    "summary",
    "request_id",
    "model",
    "prompt",
    "response",
    "ai_hashed",
    "prev_hash",
)


def canonical_json(value: Any) -> bytes:
    """``value`` in the canonical form (module doc). Raises ``ValueError`` for NaN,
    infinities, lone surrogates and values JSON cannot hold."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def iso_at(at: datetime) -> str:
    """``at`` as the canonical timestamp: UTC, microseconds, ``Z``."""
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """An entry before the store numbers and chains it (``AuditDraft.make`` checks it)."""

    at: str
    actor: str
    action: str
    resource_type: str
    resource_id: str
    summary: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    model: str | None = None
    prompt: str | None = None
    response: str | None = None
    ai_hashed: bool = False

    @classmethod
    def make(
        cls,
        action: str,
        resource_type: str,
        resource_id: str,
        *,
        at: datetime,
        actor: str = "system",
        summary: Mapping[str, Any] | None = None,
        request_id: str | None = None,
        model: str | None = None,
        prompt: str | None = None,
        response: str | None = None,
        hash_ai_fields: bool = True,
    ) -> AuditDraft:
        """A checked draft. ``prompt``/``response`` are kept as their SHA-256 hex when
        ``hash_ai_fields`` (the default), else as given (up to 64 KiB each).
        Raises ``ValidationError`` listing every bad field (nothing is written)."""
        errors: list[FieldError] = []
        _text(errors, "actor", actor, MAX_ACTOR)
        _text(errors, "resource_type", resource_type, MAX_RESOURCE_TYPE)
        _text(errors, "resource_id", resource_id, MAX_RESOURCE_ID, empty_ok=True)
        if not isinstance(action, str) or not _ACTION.match(action):
            errors.append(
                FieldError(
                    "action", "must be 1-100 of a-z, 0-9, '_', '.', ':', '-' (e.g. job.cancel)"
                )
            )
        for name, value, limit in (
            ("request_id", request_id, MAX_REQUEST_ID),
            ("model", model, MAX_MODEL),
            ("prompt", prompt, MAX_AI_TEXT),
            ("response", response, MAX_AI_TEXT),
        ):
            if value is not None:
                _text(errors, name, value, limit, empty_ok=True)
        if not isinstance(hash_ai_fields, bool):
            errors.append(FieldError("hash_ai_fields", "must be true or false"))
        body = dict(summary or {}) if isinstance(summary, Mapping | type(None)) else None
        if body is None:
            errors.append(FieldError("summary", "must be a JSON object"))
        else:
            problem = summary_error(body)
            if problem:
                errors.append(FieldError("summary", problem))
        try:
            stamp = iso_at(at)
        except (ValueError, AttributeError, TypeError):
            errors.append(FieldError("at", "must be a timezone-aware datetime"))
            stamp = ""
        if errors:
            raise ValidationError(
                f"Invalid audit entry: {errors[0].field} {errors[0].message}", errors
            )
        hashed = bool(hash_ai_fields) and (prompt is not None or response is not None)
        return cls(
            stamp,
            actor,
            action,
            resource_type,
            resource_id,
            body or {},
            request_id,
            model,
            sha256_hex(prompt) if hashed and prompt is not None else prompt,
            sha256_hex(response) if hashed and response is not None else response,
            hashed,
        )


def summary_error(summary: Mapping[str, Any]) -> str | None:
    """Why ``summary`` can't be an entry's summary (not JSON, too big), or None."""
    if not all(isinstance(k, str) for k in summary):
        return "keys must be text"
    if _has_bad_float(summary):
        return "must not contain NaN or infinite numbers"
    try:
        size = len(canonical_json(summary))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        return f"must be JSON ({type(exc).__name__})"
    if size > MAX_SUMMARY_BYTES:
        return f"must be at most {MAX_SUMMARY_BYTES} bytes of JSON (is {size})"
    return None


def _has_bad_float(value: Any, depth: int = 0) -> bool:
    if depth > 20:
        return True
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_has_bad_float(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_bad_float(v, depth + 1) for v in value)
    return False


def _text(
    errors: list[FieldError], name: str, value: object, limit: int, *, empty_ok: bool = False
) -> None:
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be text"))
        return
    if not empty_ok and not value:
        errors.append(FieldError(name, "must not be empty"))
    elif len(value) > limit:
        errors.append(FieldError(name, f"must be at most {limit} characters"))
    else:
        problem = text_error(value)
        if problem:
            errors.append(FieldError(name, problem))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One chained entry as stored: the draft's fields plus ``seq``, ``prev_hash``, ``hash``."""

    seq: int
    at: str
    actor: str
    action: str
    resource_type: str
    resource_id: str
    summary: Mapping[str, Any]
    request_id: str | None
    model: str | None
    prompt: str | None
    response: str | None
    ai_hashed: bool
    prev_hash: str
    hash: str

    def fields(self) -> dict[str, Any]:
        """Everything the hash covers (all but ``hash``)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.fields(), "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEntry:
        """From an export line / ``to_dict``. Raises ``KeyError``/``TypeError`` on a bad shape."""
        return cls(**{name: data[name] for name in (*_FIELDS, "hash")})

    def expected_hash(self) -> str:
        return entry_hash(self.fields())


def entry_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``fields`` (which include ``prev_hash``)."""
    return hashlib.sha256(canonical_json(dict(fields))).hexdigest()


def chain(draft: AuditDraft, seq: int, prev_hash: str) -> AuditEntry:
    """``draft`` numbered ``seq`` after the entry whose hash is ``prev_hash``."""
    fields: dict[str, Any] = {
        "seq": seq,
        "at": draft.at,
        "actor": draft.actor,
        "action": draft.action,
        "resource_type": draft.resource_type,
        "resource_id": draft.resource_id,
        "summary": dict(draft.summary),
        "request_id": draft.request_id,
        "model": draft.model,
        "prompt": draft.prompt,
        "response": draft.response,
        "ai_hashed": draft.ai_hashed,
        "prev_hash": prev_hash,
    }
    return AuditEntry(**fields, hash=entry_hash(fields))


@dataclass(frozen=True, slots=True)
class Anchor:
    """A signed checkpoint: entry ``seq`` had ``hash`` at ``at``. ``mac`` is the
    HMAC-SHA256 hex (key ``key_id``) of the canonical JSON of ``{seq, hash, at}``,
    or None when no key was available (an unsigned anchor)."""

    seq: int
    hash: str
    at: str
    key_id: str | None
    mac: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "at": self.at,
            "key_id": self.key_id,
            "mac": self.mac,
        }


def anchor_mac(key: bytes, seq: int, hash_: str, at: str) -> str:
    return hmac.new(
        key, canonical_json({"seq": seq, "hash": hash_, "at": at}), "sha256"
    ).hexdigest()


def make_anchor(
    seq: int, hash_: str, at: datetime, key: bytes | None, key_id: str | None
) -> Anchor:
    stamp = iso_at(at)
    if key is None:
        return Anchor(seq, hash_, stamp, None, None)
    return Anchor(seq, hash_, stamp, key_id, anchor_mac(key, seq, hash_, stamp))


@dataclass(frozen=True, slots=True)
class Broken:
    """The first broken link: the entry ``seq`` (or the anchor) and why."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``verify`` found. ``broken`` is None when the chain holds;
    ``warnings`` say what could not be checked (unsigned anchors, no anchor)."""

    count: int
    last_seq: int
    last_hash: str
    broken: Broken | None
    last_anchor: Anchor | None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify(
    entries: Iterable[AuditEntry],
    anchors: Iterable[Anchor] = (),
    *,
    anchor_key: bytes | None = None,
) -> Verdict:
    """Walk ``entries`` (in the order given, which must be ``seq`` order) and the
    anchors; the first broken link wins.

    Detected: an edited entry (its hash no longer matches its fields), a deleted
    one (a gap in ``seq``), an inserted or reordered one (``prev_hash`` is not
    the previous entry's hash, or ``seq`` does not increase by one), and a
    truncated tail (an anchor names a ``seq`` past the last entry, or a hash that
    the entry at that ``seq`` no longer has). ``anchor_key``: the HMAC key; with
    it, an anchor whose MAC is wrong (forged) breaks the chain too; without it
    (or for unsigned anchors) a warning says the anchors were not authenticated.
    """
    hashes: dict[int, str] = {}
    prev_hash = GENESIS
    expected = 1
    count = 0
    broken: Broken | None = None
    for entry in entries:
        count += 1
        if broken is not None:
            continue
        if entry.seq != expected:
            if entry.seq > expected:
                what = (
                    f"entry {expected} is missing (deleted)"
                    if entry.seq == expected + 1
                    else f"entries {expected}..{entry.seq - 1} are missing (deleted)"
                )
                broken = Broken(entry.seq, f"seq gap: {what}")
            else:
                broken = Broken(entry.seq, f"out of order: expected seq {expected}")
            continue
        if not isinstance(entry.hash, str) or not _HEX64.match(entry.hash):
            broken = Broken(entry.seq, "hash is not 64 hex digits")
            continue
        if entry.prev_hash != prev_hash:
            broken = Broken(
                entry.seq,
                "prev_hash does not match the previous entry's hash "
                "(an entry was inserted, deleted or reordered before it, or the previous one "
                "was edited and re-hashed)",
            )
            continue
        try:
            actual = entry.expected_hash()
        except (ValueError, TypeError):
            actual = ""
        if actual != entry.hash:
            broken = Broken(entry.seq, "hash does not match its fields (the entry was edited)")
            continue
        hashes[entry.seq] = entry.hash
        prev_hash = entry.hash
        expected += 1
    last_seq = expected - 1
    warnings: list[str] = []
    ordered = sorted(anchors, key=lambda a: a.seq)
    last_anchor = ordered[-1] if ordered else None
    if broken is None:
        unsigned = 0
        for anchor in ordered:
            if anchor.mac is None:
                unsigned += 1
            elif anchor_key is not None and not hmac.compare_digest(
                anchor.mac, anchor_mac(anchor_key, anchor.seq, anchor.hash, anchor.at)
            ):
                broken = Broken(anchor.seq, "anchor signature is wrong (the anchor was forged)")
                break
            if anchor.seq > last_seq:
                broken = Broken(
                    anchor.seq,
                    f"missing: an anchor recorded entry {anchor.seq} but the log ends at "
                    f"{last_seq} (the tail was truncated)",
                )
                break
            if hashes.get(anchor.seq) != anchor.hash:
                broken = Broken(
                    anchor.seq,
                    "hash differs from the anchored hash (the entries up to it were rewritten)",
                )
                break
        if broken is None:
            if last_anchor is None:
                warnings.append(
                    "no anchor yet: a truncated tail cannot be detected "
                    "(run `conveyor audit anchor`)"
                )
            if unsigned:
                warnings.append(
                    f"{unsigned} anchor(s) unsigned (no master key when they were made): they "
                    "detect truncation but not a forged anchor"
                )
            if anchor_key is None and len(ordered) > unsigned:
                warnings.append("no anchor key available: anchor signatures were not checked")
    return Verdict(
        count,
        last_seq,
        hashes.get(last_seq, GENESIS),
        broken,
        last_anchor,
        tuple(warnings),
    )


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Filters of ``Store.list_audit``: entries after ``after`` in ``seq`` order."""

    resource_id: str | None = None
    actor: str | None = None
    action: str | None = None
    after: int = 0
    limit: int = 100

    def errors(self) -> list[FieldError]:
        errs: list[FieldError] = []
        for name, limit in (
            ("resource_id", MAX_RESOURCE_ID),
            ("actor", MAX_ACTOR),
            ("action", MAX_ACTION),
        ):
            value = getattr(self, name)
            if value is not None:
                _text(errs, name, value, limit)
        if isinstance(self.after, bool) or not isinstance(self.after, int):
            errs.append(FieldError("after", "must be an integer"))
        elif not 0 <= self.after < 2**62:
            errs.append(FieldError("after", "must be 0 or more"))
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            errs.append(FieldError("limit", "must be an integer"))
        elif not 1 <= self.limit <= MAX_LIST_LIMIT:
            errs.append(FieldError("limit", f"must be 1..{MAX_LIST_LIMIT}"))
        return errs

    def check(self) -> None:
        errs = self.errors()
        if errs:
            raise ValidationError(f"Invalid audit query: {errs[0].field} {errs[0].message}", errs)

    def matches(self, entry: AuditEntry) -> bool:
        return (
            entry.seq > self.after
            and (self.resource_id is None or entry.resource_id == self.resource_id)
            and (self.actor is None or entry.actor == self.actor)
            and (self.action is None or entry.action == self.action)
        )
