"""Handlers that record AI decisions with ``ctx.audit`` (thread, async, and child
processes under ``isolation="process"``)."""

from __future__ import annotations

from typing import Any

from conveyor import JobContext
from conveyor.domain.errors import ValidationError


def decide_sync(ctx: JobContext, prompt: str) -> dict[str, Any]:
    entry = ctx.audit(
        "ai.decision",
        summary={"verdict": "approve"},
        model="m-1",
        prompt=prompt,
        response="approve",
    )
    return {"seq": entry["seq"], "hash": entry["hash"]}


async def decide_async(ctx: JobContext, prompt: str) -> dict[str, Any]:
    entry = await ctx.audit(
        "ai.decision",
        "document",
        "doc-7",
        summary={"verdict": "reject"},
        model="m-2",
        prompt=prompt,
        response="reject",
        hash_ai_fields=False,
    )
    return {"seq": entry["seq"], "hash": entry["hash"]}


def bad_audit(ctx: JobContext) -> dict[str, Any]:
    try:
        ctx.audit("Not An Action!", summary={"x": float("nan")})
    except ValidationError as exc:
        return {"refused": str(exc)}
    return {"refused": None}
