"""Request bodies of the REST API (pydantic lives only at this edge)."""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_API_TIMEOUT_MS = 86_400_000


class JobSubmit(BaseModel):
    """``POST /api/jobs``."""

    model_config = ConfigDict(extra="forbid")

    job_type: StrictStr = Field(min_length=1, max_length=100, examples=["send_email"])
    payload: dict[str, Any] = Field(examples=[{"to": "a@b.c"}])
    priority: StrictInt = Field(50, ge=0, le=100, description="Higher runs first.")
    max_retries: StrictInt = Field(3, ge=0, le=10)
    timeout_ms: StrictInt = Field(300_000, ge=1000, le=MAX_API_TIMEOUT_MS)
    scheduled_at: AwareDatetime | None = Field(None, description="ISO-8601 with a zone.")
    queue: StrictStr | None = Field(None, min_length=1, max_length=100)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=255)
    depends_on: list[StrictStr] | None = Field(None, max_length=100)
    metadata: dict[str, Any] | None = None
