"""Secret references in payloads: ``{"$secret": "smtp_password"}``.

The store, the events, the logs and the API keep the reference. The worker
resolves it for the handler call only (``resolve_refs``), and scrubs the
resolved values out of any error text it stores (``scrub``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.secrets import secret_ref

MASK = "***"
#: Secrets Conveyor keeps for itself (webhook signing secrets, the audit anchor key):
#: a payload can never reference them, or any job could read them.
RESERVED_PREFIX = "conveyor."


def reserved_ref_error(name: str) -> ValidationError:
    return ValidationError(
        f"Secret {name!r} is Conveyor's own: a payload cannot reference it",
        [FieldError("payload", f"references the reserved secret {name!r} (conveyor.*)")],
    )


def check_refs(value: Any) -> None:
    """Raise ``ValidationError`` when ``value`` references a reserved secret."""
    name = secret_ref(value)
    if name is not None:
        if name.startswith(RESERVED_PREFIX):
            raise reserved_ref_error(name)
    elif isinstance(value, dict):
        for v in value.values():
            check_refs(v)
    elif isinstance(value, list):
        for v in value:
            check_refs(v)


#: How a resolver turns a secret name into its value (raises ``SecretNotFound``).
Resolver = Callable[[str], Awaitable[str]]


def has_refs(value: Any) -> bool:
    """Whether ``value`` (a JSON value) holds a secret reference anywhere."""
    if isinstance(value, dict):
        return secret_ref(value) is not None or any(has_refs(v) for v in value.values())
    if isinstance(value, list):
        return any(has_refs(v) for v in value)
    return False


def with_placeholders(value: Any) -> Any:
    """``value`` with each reference replaced by a text stand-in: a submit checks a
    payload against the handler's signature before any secret is read."""
    if secret_ref(value) is not None:
        return MASK
    if isinstance(value, dict):
        return {k: with_placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_placeholders(v) for v in value]
    return value


async def resolve_refs(payload: dict[str, Any], get: Resolver) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``payload`` with every reference replaced by its value, and the
    values used (for ``scrub``). Each name is resolved once."""
    values: dict[str, str] = {}

    async def walk(value: Any) -> Any:
        name = secret_ref(value)
        if name is not None:
            if name.startswith(RESERVED_PREFIX):  # stored before the submit check existed
                raise reserved_ref_error(name)
            if name not in values:
                values[name] = await get(name)
            return values[name]
        if isinstance(value, dict):
            return {k: await walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [await walk(v) for v in value]
        return value

    resolved = await walk(payload)
    return resolved, list(values.values())


def scrub_json(value: Any, values: Sequence[str]) -> Any:
    """``value`` (a JSON value) with ``scrub`` applied to every string in it, keys
    included: a job's result never carries a secret it was given."""
    if isinstance(value, str):
        return scrub(value, values)
    if isinstance(value, dict):
        return {scrub(k, values): scrub_json(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json(v, values) for v in value]
    return value


def scrub(text: str | None, values: Iterable[str]) -> str | None:
    """``text`` with each value, and its ``repr`` and JSON escaped forms, masked."""
    if not text:
        return text
    forms: set[str] = set()
    for v in values:
        if v:
            forms.update((v, repr(v)[1:-1], json.dumps(v)[1:-1]))
    for form in sorted(forms, key=len, reverse=True):
        if form:
            text = text.replace(form, MASK)
    return text
