"""JSON encoding shared by the adapters: every adapter stores exactly what JSON can hold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from conveyor.domain.errors import FieldError, ValidationError


def dumps(value: Any, field: str = "payload") -> str:
    """Encode ``value`` as JSON text; ``ValidationError`` naming ``field`` if it can't be."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise ValidationError(
            f"{field} is not JSON-serialisable: {exc}", [FieldError(field, str(exc))]
        ) from exc


def roundtrip(value: Any, field: str = "payload") -> Any:
    """``value`` as it comes back from JSON storage (tuples become lists, ...)."""
    return orjson.loads(dumps(value, field))


def dumps_object(value: Mapping[str, Any], field: str = "payload") -> str:
    """A job's payload or metadata (a mapping) as JSON text: ``dumps`` without a
    copy for a plain dict, and no encoder call for an empty one (bulk submits)."""
    if not value:
        return "{}"
    return dumps(value if type(value) is dict else dict(value), field)
