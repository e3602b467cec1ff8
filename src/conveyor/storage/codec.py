"""JSON encoding shared by the adapters: every adapter stores exactly what JSON can hold.

One rule set for every backend, so that SQLite, PostgreSQL and memory accept and
refuse the same values:

- Input (payloads, metadata): numbers must be finite (JSON has no NaN or
  Infinity), integers must fit in 64 bits, strings must be valid Unicode without
  NUL characters (PostgreSQL's ``jsonb`` cannot hold ``\\u0000``). Anything else
  raises ``ValidationError`` naming the field.
- Outcomes (results): made storable where possible (NUL and lone surrogates
  become U+FFFD); a result that still can't be stored, or is larger than
  ``MAX_RESULT_BYTES``, raises ``ValidationError`` and the worker records a
  permanent failure saying why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.limits import MAX_JSON_INT, MIN_JSON_INT, safe_text

#: Largest handler result stored, in bytes of JSON (16 MiB).
MAX_RESULT_BYTES = 16 * 1024 * 1024
_NUL = b"\\u0000"


def dumps(value: Any, field: str = "payload") -> str:
    """Encode ``value`` as JSON text; ``ValidationError`` naming ``field`` if it can't be."""
    try:
        data = orjson.dumps(value)
    except TypeError as exc:
        raise _invalid(field, value, exc) from exc
    if b"null" in data:  # orjson writes NaN and Infinity as null
        _refuse_non_finite(value, field)
    if _NUL in data:
        problem = _find(value, field, _has_nul)
        if problem is not None:
            raise ValidationError(
                f"{problem} contains a NUL character (\\u0000), which no backend stores: "
                "remove it or encode the data (e.g. base64)",
                [FieldError(problem, "must not contain NUL characters")],
            )
    return data.decode()


def roundtrip(value: Any, field: str = "payload") -> Any:
    """``value`` as it comes back from JSON storage (tuples become lists, ...)."""
    return orjson.loads(dumps(value, field))


def dumps_object(value: Mapping[str, Any], field: str = "payload") -> str:
    """A job's payload or metadata (a mapping) as JSON text: ``dumps`` without a
    copy for a plain dict, and no encoder call for an empty one (bulk submits)."""
    if not value:
        return "{}"
    return dumps(value if type(value) is dict else dict(value), field)


def storable_result(value: Any) -> Any:
    """A handler's result as every backend can store it (see the module docstring).

    Returns ``value`` itself when it is already storable (the common case costs one
    encode), else a cleaned copy. Raises ``ValidationError`` when it can't be stored.
    """
    try:
        data = orjson.dumps(value)
    except TypeError:
        value = _clean(value)
        try:
            data = orjson.dumps(value)
        except TypeError as exc:
            raise _invalid("result", value, exc) from exc
    if b"null" in data:
        _refuse_non_finite(value, "result")
    if _NUL in data:
        value = _clean(value)
        data = orjson.dumps(value)
    if len(data) > MAX_RESULT_BYTES:
        raise ValidationError(
            f"result is {len(data)} bytes of JSON; the limit is {MAX_RESULT_BYTES}: "
            "store large data elsewhere and return a reference",
            [FieldError("result", "too large")],
        )
    return value


def _invalid(field: str, value: Any, exc: Exception) -> ValidationError:
    reason = safe_text(exc, 300)
    if "64-bit" in reason:
        problem = _find(value, field, _big_int) or field
        return ValidationError(
            f"{problem} is an integer outside the 64-bit range: send it as a string",
            [FieldError(problem, "integer outside the 64-bit range (-2**63..2**64-1)")],
        )
    return ValidationError(
        f"{field} is not JSON-serialisable: {reason}", [FieldError(field, reason)]
    )


def _refuse_non_finite(value: Any, field: str) -> None:
    problem = _find(value, field, _non_finite)
    if problem is not None:
        raise ValidationError(
            f"{problem} is not a finite number (NaN and Infinity are not JSON): "
            "send null or a string instead",
            [FieldError(problem, "must be a finite number")],
        )


def _non_finite(v: Any) -> bool:
    return type(v) is float and not math.isfinite(v)


def _has_nul(v: Any) -> bool:
    return isinstance(v, str) and "\x00" in v


def _big_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and not MIN_JSON_INT <= v <= MAX_JSON_INT


def _find(value: Any, path: str, bad: Any, depth: int = 0) -> str | None:
    """The path (``payload.items[2].x``) of the first value for which ``bad`` holds."""
    if bad(value):
        return path
    if depth > 200:
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            if bad(k):
                return f"{path} key {safe_text(k, 40)!r}"
            found = _find(v, f"{path}.{safe_text(k, 40)}", bad, depth + 1)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _find(v, f"{path}[{i}]", bad, depth + 1)
            if found:
                return found
    return None


def _clean(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with every string made storable (NUL, lone surrogates)."""
    if isinstance(value, str):
        return safe_text(value, limit=MAX_RESULT_BYTES)
    if depth > 200:
        return value
    if isinstance(value, Mapping):
        return {
            (_clean(k, depth + 1) if isinstance(k, str) else k): _clean(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_clean(v, depth + 1) for v in value]
    return value
