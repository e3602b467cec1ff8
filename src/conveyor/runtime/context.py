"""What a handler receives as ``ctx``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from conveyor.domain.errors import ConfigurationError
from conveyor.runtime.audit import audit_call
from conveyor.runtime.steps import Steps, in_event_loop


@dataclass
class JobContext:
    """Per-attempt context handed to a handler as its first argument.

    ``cancelled`` is set when a cancel was requested (or the job timed out, or
    the worker is shutting down past its grace period). Async handlers are also
    cancelled with ``CancelledError``; sync handlers should check it.
    """

    job_id: str
    job_type: str
    attempt: int
    max_retries: int
    queue: str
    worker_id: str
    metadata: dict[str, Any]
    cancelled: threading.Event = field(default_factory=threading.Event)
    _logger: Any = None
    #: The workflow this job is a step of (``None`` for a plain job) and its step name.
    workflow_id: str | None = None
    step_name: str | None = None
    #: Fan-in: each completed parent step's result, by step name (``{}`` for a root
    #: step or a plain job). Read before the attempt starts; JSON values.
    parent_results: dict[str, Any] = field(default_factory=dict)
    _add_steps: Any = None
    #: The state the last ``checkpoint`` stored, by this attempt or an earlier one
    #: of the same job (None: none yet). JSON values (a tuple comes back a list).
    last_checkpoint: Any = None
    _steps: Steps | None = None
    #: ``ctx.audit``'s recorder (runtime/audit.py): on the worker's loop, or (in a
    #: child process) a blocking call to the worker.
    _audit: Any = None
    _audit_loop: Any = None
    _audit_sync: Any = None

    @property
    def logger(self) -> Any:
        if self._logger is None:
            self._logger = structlog.get_logger("conveyor.job").bind(
                job_id=self.job_id,
                job_type=self.job_type,
                attempt=self.attempt,
                worker_id=self.worker_id,
            )
        return self._logger

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    async def add_steps(self, steps: Sequence[Mapping[str, Any]]) -> list[str]:
        """Dynamic fan-out: add steps to this job's workflow while it runs.

        ``steps``: objects of the ``POST /api/workflows`` step shape (``name``,
        ``job_type``, ``payload``, ``depends_on``...). ``depends_on`` may name any
        step of the workflow, this one included, and the new ones (e.g. one step
        per item, each after this one, then a ``join`` step after all of them).
        Returns the new steps' job ids. Raises ``ConfigurationError`` outside a
        workflow or in a process-isolated handler, ``ValidationError`` for a bad
        step or a cycle, ``WorkflowConflict`` when the workflow is finishing,
        ``LeaseLost`` when this attempt no longer holds the job.
        """
        if self.workflow_id is None:
            raise ConfigurationError(
                f"Job {self.job_id!r} is not a workflow step: only steps can add steps"
            )
        if self._add_steps is None:
            raise ConfigurationError(
                "ctx.add_steps is not available in a process-isolated handler: run the "
                "step that fans out with isolation='thread' (or 'none')"
            )
        jobs = await self._add_steps(list(steps))
        return [j.id for j in jobs]

    # -- durable steps (see docs/workflows.md) -------------------------------------------
    def _durable(self) -> Steps:
        if self._steps is None:
            self._steps = Steps(None)
        return self._steps

    def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once per job and return its result.

        The result (JSON: made storable like a job's result) is stored under
        ``name`` (1-200 characters, no control characters), fenced by this
        attempt's lease; a later attempt of the job (retry, rescue after a crash)
        gets the stored result back without calling ``fn``. The first run returns
        the result as stored too (a tuple comes back a list). An exception from
        ``fn`` propagates and nothing is stored.

        In an async handler: ``await ctx.step(...)`` (a sync ``fn`` runs in a
        thread, off the event loop). In a sync handler: ``ctx.step(...)`` without
        ``await`` (``fn`` runs in the handler's thread).

        Raises ``ValidationError`` for a bad name or a result that can't be
        stored, ``LeaseLost`` when this attempt lost the job (the step is not
        stored; let it propagate: the attempt is over). A context made by hand
        (a handler called directly in a test) keeps its steps in memory.
        """
        steps = self._durable()
        if in_event_loop():
            return steps.step(name, fn, args, kwargs)
        return steps.step_sync(name, fn, args, kwargs)

    def checkpoint(self, state: Any) -> Any:
        """Store ``state`` (JSON, at most 16 MiB) as the job's checkpoint and make it
        ``last_checkpoint``. Kept across attempts, replaced by the next call.

        ``await ctx.checkpoint(state)`` in an async handler, ``ctx.checkpoint(state)``
        in a sync one. Raises ``ValidationError`` (not JSON) or ``LeaseLost`` like
        ``step``.
        """
        steps = self._durable()
        if in_event_loop():
            return self._checkpoint_async(steps, state)
        self.last_checkpoint = steps.checkpoint_sync(state)
        return None

    async def _checkpoint_async(self, steps: Steps, state: Any) -> None:
        self.last_checkpoint = await steps.checkpoint(state)

    # -- the audit log (docs/security.md) -------------------------------------------------
    def audit(
        self,
        action: str,
        resource_type: str = "job",
        resource_id: str | None = None,
        *,
        summary: Mapping[str, Any] | None = None,
        model: str | None = None,
        prompt: str | None = None,
        response: str | None = None,
        hash_ai_fields: bool = True,
    ) -> Any:
        """Record a decision in the hash-chained audit log (actor ``system``; the
        summary gets ``job_id``, ``job_type`` and ``attempt`` under ``"job"``).

        ``action``: e.g. ``"ai.decision"`` (a-z, 0-9, ``_ . : -``); the resource is
        this job unless given. ``summary``: a JSON object of at most 4 KiB.
        ``prompt``/``response`` (64 KiB each) are stored as their SHA-256 hex
        unless ``hash_ai_fields=False``. Returns the entry (``seq``, ``hash``...):
        ``await ctx.audit(...)`` in an async handler, ``ctx.audit(...)`` in a sync
        one; under ``isolation="process"`` the worker records it. Raises
        ``ValidationError`` (nothing recorded) or ``ConfigurationError`` in a
        context made by hand.
        """
        fields: dict[str, Any] = {
            "action": action,
            "resource_type": resource_type,
            "resource_id": self.job_id if resource_id is None else resource_id,
            "summary": summary,
            "model": model,
            "prompt": prompt,
            "response": response,
            "hash_ai_fields": hash_ai_fields,
        }
        return audit_call(self, fields)
