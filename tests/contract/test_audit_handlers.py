"""``ctx.audit`` on every backend: a handler's AI decision is chained in the audit
log, in a thread, on the event loop and in a child process (isolation="process")."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
from appkit import app_on, finished

from conveyor import Conveyor
from conveyor.domain.audit import AuditQuery, verify
from conveyor.domain.errors import ConfigurationError
from conveyor.domain.states import JobState
from conveyor.runtime.context import JobContext
from conveyor.storage.base import Store
from integration import audit_handlers
from support import running_worker

PROMPT = "Should invoice 42 be paid?"


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, heartbeat_timeout=2.0, shutdown_grace=0.5) as conveyor:
        yield conveyor


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_handlers_record_decisions(app: Conveyor, isolation: str) -> None:
    app.job("decide_sync", isolation=isolation)(audit_handlers.decide_sync)
    app.job("decide_async", isolation=isolation)(audit_handlers.decide_async)
    app.job("bad_audit", isolation=isolation)(audit_handlers.bad_audit)
    a = await app.enqueue("decide_sync", {"prompt": PROMPT})
    b = await app.enqueue("decide_async", {"prompt": PROMPT})
    c = await app.enqueue("bad_audit", {})
    async with running_worker(app, concurrency=1):
        jobs = await finished(app, [a.id, b.id, c.id])
    assert all(j.state is JobState.COMPLETED for j in jobs.values()), [
        j.error for j in jobs.values()
    ]
    assert "Invalid audit entry" in jobs[c.id].result["refused"]
    rows = await app.store.list_audit(AuditQuery(action="ai.decision", limit=10))
    by_job = {e.summary["job"]["job_id"]: e for e in rows}
    assert set(by_job) == {a.id, b.id}
    hashed = by_job[a.id]
    assert hashed.resource_id == a.id
    assert hashed.actor == "system"
    assert hashed.prompt == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert hashed.response == hashlib.sha256(b"approve").hexdigest()
    assert hashed.ai_hashed is True
    assert hashed.model == "m-1"
    assert jobs[a.id].result["seq"] == hashed.seq
    plain = by_job[b.id]
    assert (plain.resource_type, plain.resource_id) == ("document", "doc-7")
    assert (plain.prompt, plain.response, plain.ai_hashed) == (PROMPT, "reject", False)
    assert plain.summary["verdict"] == "reject"
    assert verify(await app.store.list_audit(AuditQuery(limit=100))).ok


def test_a_context_made_by_hand_has_no_audit_log() -> None:
    ctx = JobContext("j", "t", 1, 0, "default", "w", {})
    with pytest.raises(ConfigurationError, match="audit"):
        ctx.audit("ai.decision")
