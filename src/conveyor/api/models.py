"""Request bodies of the REST API (pydantic lives only at this edge)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
)

from conveyor.domain.errors import FieldError, ValidationError
from conveyor.domain.events import TYPE_FILTER_REGEX
from conveyor.domain.flow import MAX_CONCURRENCY_LIMIT
from conveyor.domain.job import MAX_RETRIES_LIMIT, MAX_TIMEOUT_MS
from conveyor.domain.limits import MAX_DELAY_MS


def _iso_string(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 string with a time zone, e.g. 2026-11-22T10:00:00Z")
    return value


def _json_integer(value: Any) -> Any:
    # JSON Schema's "integer" admits 97.0 but not "97" or true.
    if isinstance(value, str | bool):
        raise ValueError("must be an integer")
    return value


def _ranged(low: int, high: int) -> Any:
    """A JSON integer from ``low`` to ``high``: the bounds go before the validator so
    that the OpenAPI schema shows them as minimum/maximum."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_json_integer)]


IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_string)]
Int = Annotated[int, BeforeValidator(_json_integer)]
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,100}$"
JobId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
CapabilityName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
CapabilityValue = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,100}$")]


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    """The error envelope of every failed request."""

    success: bool = Field(False, examples=[False])
    error: str = Field(examples=["Job 'x' not found"])
    details: list[FieldProblem] | None = None


class JobSubmit(BaseModel):
    """``POST /api/jobs``."""

    model_config = ConfigDict(
        extra="forbid",
        # delay_ms and scheduled_at both say when the job runs: at most one of them.
        json_schema_extra={
            "not": {
                "required": ["delay_ms", "scheduled_at"],
                "properties": {
                    "delay_ms": {"type": "integer"},
                    "scheduled_at": {"type": "string"},
                },
            }
        },
    )

    job_type: StrictStr = Field(
        pattern=NAME_PATTERN,
        examples=["test_job"],
        description="A type some worker registered (others are refused with the known list).",
    )
    payload: dict[str, Any] = Field(examples=[{"message": "hello"}])
    priority: _ranged(0, 100) | None = Field(  # type: ignore[valid-type]
        None, description="Higher runs first. Default: the job type's."
    )
    max_retries: _ranged(0, MAX_RETRIES_LIMIT) | None = Field(  # type: ignore[valid-type]
        None, description="Default: the job type's."
    )
    timeout_ms: _ranged(1, MAX_TIMEOUT_MS) | None = Field(  # type: ignore[valid-type]
        None, description="Default: the job type's."
    )
    scheduled_at: IsoDatetime | None = Field(
        None,
        description=(
            "ISO-8601 with a zone, between 1970-01-01T00:00:00Z and 9999-12-30T00:00:00Z."
        ),
    )
    delay_ms: _ranged(0, MAX_DELAY_MS) | None = Field(  # type: ignore[valid-type]
        None,
        examples=[5000],
        description="Run no earlier than this many milliseconds from now (up to 100 "
        "years). Give it or scheduled_at, not both.",
    )
    queue: StrictStr | None = Field(None, pattern=NAME_PATTERN)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=255)
    depends_on: list[JobId] | None = Field(None, max_length=100)
    metadata: dict[str, Any] | None = None
    concurrency_key: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="Key the job type's concurrency and rate limits count per "
        "(default: computed from the payload by the type's template).",
    )
    requires: dict[CapabilityName, CapabilityValue] | None = Field(
        None,
        max_length=20,
        examples=[{"gpu": "a100"}],
        description="Capabilities a worker must offer to run it (default: the type's).",
        json_schema_extra={"propertyNames": {"pattern": r"^[A-Za-z0-9_\-]{1,64}$"}},
    )


class WebhookCreate(BaseModel):
    """``POST /api/webhooks``."""

    model_config = ConfigDict(extra="forbid")

    url: StrictStr = Field(
        max_length=2048,
        pattern=r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?(/[!-~]*)?$",
        examples=["https://example.com/hooks/conveyor"],
    )
    # The pattern is documented, not enforced here: validate_webhook says what is wrong.
    event_types: list[
        Annotated[StrictStr, Field(json_schema_extra={"pattern": TYPE_FILTER_REGEX})]
    ] = Field(min_length=1, max_length=50, examples=[["job_completed", "job_dead_lettered"]])
    secret: StrictStr | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="HMAC key for X-Conveyor-Signature; generated (and shown once) if omitted.",
    )


class QueueChange(BaseModel):
    """``PATCH /api/queues/{name}``: leave a field out to keep it (at least one)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    paused: StrictBool | None = None
    concurrency_limit: _ranged(1, MAX_CONCURRENCY_LIMIT) | None = Field(  # type: ignore[valid-type]
        None, description="Most jobs of this queue running at once, fleet-wide; null removes it."
    )


def submit_delay(delay_ms: int | None, scheduled_at: object) -> float | None:
    """``delay_ms`` as the seconds ``Conveyor.submit(delay=...)`` takes, or ``None``.

    Raises ``ValidationError`` (400, both fields in ``details``) when the body also
    has ``scheduled_at``: the two say when the job runs, one of them must.
    """
    if delay_ms is None:
        return None
    if scheduled_at is not None:
        message = "give either delay_ms or scheduled_at, not both"
        raise ValidationError(
            f"delay_ms and scheduled_at: {message}",
            [FieldError("delay_ms", message), FieldError("scheduled_at", message)],
        )
    return delay_ms / 1000
