"""Helpers the adapters share for the secrets table (see ``Store.put_secret``)."""

from __future__ import annotations

from conveyor.domain.errors import FieldError, ValidationError


def check_keep(keep: int) -> None:
    """``keep`` (versions kept per secret) must be 1..1000."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= 1000:
        raise ValidationError("Invalid keep", [FieldError("keep", "must be 1..1000 versions")])


def revoked_key_error(key_id: str) -> ValidationError:
    """Rotating a revoked key: there is nothing left to overlap with."""
    return ValidationError(
        f"API key {key_id!r} is revoked: create a new one with `conveyor keys create`",
        [FieldError("key_id", "is revoked")],
    )
