"""JSON encoding shared by the adapters: every adapter stores exactly what JSON can hold."""

from __future__ import annotations

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
