"""Secrets in the vault (pure): names, stored versions and their errors.

A secret is a name with numbered versions; each version holds one sealed value
(see ``conveyor.security.vault``). Stores keep ciphertexts only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.domain.errors import ConveyorError, FieldError, NotFound, ValidationError

#: The largest value a secret may hold, in bytes (credentials, keys, certificates).
MAX_SECRET_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: The payload shape of a secret reference: ``{"$secret": "smtp_password"}``.
SECRET_REF = "$secret"


class SecretNotFound(NotFound):
    def __init__(self, name: str, version: int | None = None) -> None:
        self.name = name
        self.version = version
        what = f"{name!r}" if version is None else f"{name!r} version {version}"
        super().__init__(f"Secret {what} not found")


class SecretDecryptError(ConveyorError):
    """A stored secret does not decrypt: the row was edited or swapped with
    another secret's row, or it was sealed under a master key this process
    does not hold."""


@dataclass(frozen=True, slots=True)
class SecretVersion:
    """One stored version: the sealed value and which master key wraps it."""

    name: str
    version: int
    key_id: str  # hex id of the master key that wraps this version's data key
    ciphertext: bytes
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What listings show: never a value. ``versions`` = how many are kept."""

    name: str
    version: int  # the newest
    versions: int
    created_at: datetime  # of the oldest kept version
    updated_at: datetime  # of the newest

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "versions": self.versions,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def validate_secret_name(name: object) -> str:
    """The name, or ``ValidationError``: 1-100 of ``A-Z a-z 0-9 _ . -``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValidationError(
            "Invalid secret name",
            [FieldError("name", "1-100 characters of letters, digits, '_', '.', '-'")],
        )
    return name


def validate_secret_value(value: object) -> bytes:
    """The value as bytes (text is UTF-8), or ``ValidationError``: not empty,
    at most ``MAX_SECRET_BYTES``."""
    if isinstance(value, str):
        try:
            value = value.encode()
        except UnicodeEncodeError:
            raise ValidationError(
                "Invalid secret value", [FieldError("value", "text must be valid UTF-8")]
            ) from None
    if not isinstance(value, bytes):
        raise ValidationError("Invalid secret value", [FieldError("value", "must be text")])
    if not value:
        raise ValidationError("Invalid secret value", [FieldError("value", "must not be empty")])
    if len(value) > MAX_SECRET_BYTES:
        raise ValidationError(
            "Invalid secret value", [FieldError("value", f"at most {MAX_SECRET_BYTES} bytes")]
        )
    return value


def secret_ref(value: object) -> str | None:
    """The secret name when ``value`` is a reference ``{"$secret": NAME}``, else None."""
    if isinstance(value, dict) and len(value) == 1 and SECRET_REF in value:
        name = value[SECRET_REF]
        return name if isinstance(name, str) else None
    return None
