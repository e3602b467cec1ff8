"""What the runtime takes from outside: one explicit bundle, built by the composition root.

The worker, the webhook sender and dispatcher and the status report get their
ports (store, bus, job registry, clock, settings) and the process's in-process
signals from a ``RuntimeDeps``, never from the application object: nothing under
``runtime/`` imports ``conveyor.app`` (an import-linter contract checks it).
``Conveyor`` builds the bundle once (``app.deps``) and hands it to ``Worker`` and
the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from conveyor.bus.base import EventBus
from conveyor.domain.job import EnqueueResult, Finish, Job, NewJob
from conveyor.runtime.observe import Observation
from conveyor.settings import Settings
from conveyor.storage.base import Store

if TYPE_CHECKING:
    from conveyor.runtime.registry import JobDefinition

_log = structlog.get_logger("conveyor.signals")


class Submitter(Protocol):
    """What a ``JobDefinition`` submits its own jobs through (the application)."""

    async def enqueue(
        self, job_type: str, payload: Mapping[str, Any] | None = None, **options: Any
    ) -> Job: ...


class Signals:
    """In-process hints between the parts of one process; the store stays the truth.

    - wake listeners (``add_listener``): a job became ready here, fetch loops look now;
    - events-written listeners (``on_events_written``): events were committed here,
      outbox readers look now instead of at their next poll;
    - finish listeners (``on_finish``): a worker recorded an outcome, called with
      ``(finish, accepted)``.

    Callbacks are cheap and synchronous.
    """

    __slots__ = ("_event_listeners", "_finish_listeners", "_listeners", "_observers")

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._event_listeners: list[Callable[[], None]] = []
        self._finish_listeners: list[Callable[[Finish, bool], None]] = []
        self._observers: list[Callable[[Observation], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def notify_listeners(self) -> None:
        for cb in list(self._listeners):
            cb()

    def on_events_written(self, callback: Callable[[], None]) -> None:
        self._event_listeners.append(callback)

    def remove_events_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._event_listeners:
            self._event_listeners.remove(callback)

    def events_written(self) -> None:
        for cb in list(self._event_listeners):
            cb()

    def on_finish(self, callback: Callable[[Finish, bool], None]) -> None:
        self._finish_listeners.append(callback)

    @property
    def has_finish_listeners(self) -> bool:
        return bool(self._finish_listeners)

    def emit_finished(self, finish: Finish, accepted: bool) -> None:
        for cb in self._finish_listeners:
            cb(finish, accepted)

    def on_observe(self, callback: Callable[[Observation], None]) -> None:
        """Call ``callback`` with each ``runtime.observe`` event (jobs started,
        rescued, webhook attempts, workflows submitted): metrics hook in here."""
        self._observers.append(callback)

    @property
    def observing(self) -> bool:
        return bool(self._observers)

    def observe(self, event: Observation) -> None:
        for cb in self._observers:
            try:
                cb(event)
            except Exception as exc:  # noqa: BLE001 - an observer never breaks the job path
                _log.warning("observer_failed", error=str(exc), kind=type(exc).__name__)


@dataclass(frozen=True, slots=True)
class RuntimeDeps:
    """The ports and services a runtime component uses.

    ``registry`` is the application's own mapping (job type -> ``JobDefinition``),
    so types registered after the bundle was built are seen. ``now`` returns an
    aware UTC ``datetime``; ``rand`` a float in [0, 1) (retry jitter).
    ``new_job`` / ``submit_many`` are the application's: a ``NewJob`` with the
    type's registered defaults (raises ``ValidationError``), and an all-or-none
    submit that wakes this process's workers and outbox readers.
    """

    settings: Settings
    store: Store
    bus: EventBus
    registry: Mapping[str, JobDefinition]
    now: Callable[[], datetime]
    rand: Callable[[], float]
    signals: Signals
    new_job: Callable[..., NewJob]
    submit_many: Callable[[Sequence[NewJob]], Awaitable[list[EnqueueResult]]]
    #: ``add_steps(workflow_id, job_id, lease_token, steps)``: a running step adds
    #: steps (``POST /api/workflows`` step objects) to its workflow; returns their jobs.
    add_steps: (
        Callable[[str, str, str, Sequence[Mapping[str, Any]]], Awaitable[list[Job]]] | None
    ) = None
    #: ``secrets(name)``: the value of a vault secret, for payload references
    #: ``{"$secret": name}`` resolved just before a handler call (docs/security.md).
    secrets: Callable[[str], Awaitable[str]] | None = None
    #: ``audit(fields, job)``: record a handler's ``ctx.audit`` entry (fields checked
    #: by the recorder; ``job`` has job_id, job_type, attempt); returns the entry dict.
    audit: Callable[[dict[str, Any], Mapping[str, Any]], Awaitable[dict[str, Any]]] | None = None
