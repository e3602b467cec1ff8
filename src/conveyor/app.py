"""The composition root: ``Conveyor`` builds the object graph from Settings.

Nothing here is global: two ``Conveyor`` objects in one process are
independent (tests rely on it).
"""

from __future__ import annotations

import asyncio
import gc
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import structlog

from conveyor.auditing import AuditedSecrets, AuditLog, audit_property
from conveyor.bus.base import CANCEL_TOPIC, WAKE_TOPIC, EventBus
from conveyor.domain.errors import ConfigurationError, FieldError, JobNotFound, ValidationError
from conveyor.domain.events import INTERNAL_JOB_PREFIX
from conveyor.domain.flow import FlowLimits
from conveyor.domain.job import (
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    EnqueueResult,
    Finish,
    Job,
    JobQuery,
    JobTypeInfo,
    NewJob,
    is_internal,
)
from conveyor.domain.limits import delay_error, run_at_after, text_error, timeout_error
from conveyor.domain.locks import LEADER_PREFIX, LockInfo
from conveyor.domain.retry import RetryPolicy
from conveyor.domain.schedules import Schedule
from conveyor.domain.states import JobState
from conveyor.observability import tracing
from conveyor.runtime.flow import flow_limits, job_flow, per_payload_key
from conveyor.runtime.locks import Leadership, LockBackend, LockRequest, Locks
from conveyor.runtime.ports import RuntimeDeps, Signals
from conveyor.runtime.registry import (
    FROM_SETTINGS,
    Handler,
    JobDefinition,
    TimeoutOption,
    default_retry,
)
from conveyor.runtime.scheduler import Scheduler
from conveyor.runtime.steps import DEFAULT_MAX_HEALS, check_heal
from conveyor.runtime.webhooks import WEBHOOK_JOB, WebhookSender
from conveyor.runtime.worker import Worker, exit_if_abandoned
from conveyor.security.file_secrets import ChainedSecrets, FileSecrets
from conveyor.security.redact import redact_url
from conveyor.security.vault import StoreSecrets, load_keyring
from conveyor.settings import ISOLATION_MODES, Settings
from conveyor.storage.base import Store
from conveyor.workflows import (
    WorkflowBuilder,
    WorkflowIn,
    WorkflowRun,
    WorkflowService,
    parse_definition,
)

F = TypeVar("F", bound=Handler)
T = TypeVar("T")
log = structlog.get_logger("conveyor.app")
SIGNAL_TIMEOUT = 1.0
#: Fewest characters of a job id prefix accepted for an id (CLI).
MIN_ID_PREFIX = 6
_HEX_RE = re.compile("[0-9a-f]+")
#: Seconds a process trusts its copy of the job types workers recorded, and how
#: often at most a type missing from it makes it read them again.
JOB_TYPES_TTL = 10.0
JOB_TYPES_MISS_TTL = 0.2


def bus_from_url(url: str, *, max_bytes: int | None = None) -> EventBus:
    """The event bus ``CONVEYOR_REDIS_URL`` names: Redis, or in-process when empty.
    ``max_bytes`` (``CONVEYOR_EVENT_STREAM_MAX_BYTES``) bounds what it holds in this
    process: the in-process stream, and each subscriber's backlog (both buses)."""
    if not url:
        from conveyor.bus.memory import DEFAULT_MAX_STREAM_BYTES, MemoryBus

        return MemoryBus(max_stream_bytes=max_bytes or DEFAULT_MAX_STREAM_BYTES)
    try:
        from conveyor.bus.redis import RedisBus
    except ImportError as exc:
        raise ConfigurationError(
            "Redis needs redis-py: pip install 'conveyor[redis]' (from a clone: "
            "pip install '.[redis]' or scripts/setup.sh redis)"
        ) from exc
    return RedisBus(url, max_subscriber_bytes=max_bytes)


def store_from_url(url: str, *, pool_size: int = 10) -> Store:
    """Build the Store adapter a database URL names."""
    if url == "memory://" or url == "memory:":
        from conveyor.storage.memory import MemoryStore

        return MemoryStore()
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        # sqlite:///relative/path.db and sqlite:////absolute/path.db, as in SQLAlchemy.
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(
                f"Bad SQLite URL {url!r}: use sqlite:///./conveyor.db (relative) or "
                "sqlite:////var/lib/conveyor.db (absolute)"
            )
        from conveyor.storage.sqlite import SQLiteStore

        return SQLiteStore(Path(path))
    if parsed.scheme in ("postgres", "postgresql"):
        try:
            from conveyor.storage.postgres import PostgresStore
        except ImportError as exc:
            raise ConfigurationError(
                "PostgreSQL needs asyncpg: pip install 'conveyor[postgres]' (from a clone: "
                "pip install '.[postgres]' or scripts/setup.sh postgres; see docs/postgres.md)"
            ) from exc
        return PostgresStore(url, max_size=pool_size)
    raise ConfigurationError(
        f"Unsupported database URL {redact_url(url)!r}: expected sqlite:///PATH, "
        "postgresql://USER@HOST/DB or memory://"
    )


class Conveyor:
    """A Conveyor application: job registry, store and settings.

    >>> app = Conveyor()                      # sqlite:///./conveyor.db
    >>> @app.job("send_email", max_retries=5, timeout=30)
    ... async def send_email(ctx, to: str, subject: str) -> dict: ...
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        store: Store | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], datetime] | None = None,
        rand: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(database_url=database_url)
        if database_url is not None and settings is not None:
            self.settings = self.settings.with_(database_url=database_url)
        self.store = store if store is not None else store_from_url(self.settings.database_url)
        self._clock = clock or (lambda: datetime.now(UTC))
        self.rand: Callable[[], float] = rand or random.random
        self.registry: dict[str, JobDefinition] = {}
        self.signals = Signals()
        self._opened = False
        self.bus = (
            bus
            if bus is not None
            else bus_from_url(
                self.settings.redis_url, max_bytes=self.settings.event_stream_max_bytes
            )
        )
        self._pending_signals: set[asyncio.Future[bool]] = set()
        self._known_types: dict[str, JobTypeInfo] = {}
        self._known_flow: dict[str, FlowLimits] = {}
        self._known_types_at = -1e9
        self.workflows = WorkflowService(self)
        # What the runtime gets instead of this object (it never imports app.py).
        self.deps = RuntimeDeps(
            settings=self.settings,
            store=self.store,
            bus=self.bus,
            registry=self.registry,
            now=self.now,
            rand=self.rand,
            signals=self.signals,
            new_job=self.new_job,
            submit_many=self.submit_many,
            add_steps=self.workflows.add_steps,
            secrets=self._resolve_secret,
            audit=self._handler_audit,
        )
        s = self.settings
        self.webhooks = WebhookSender(
            self.deps,
            timeout=s.webhook_timeout,
            disable_after=s.webhook_disable_after,
            allow_private=s.webhook_allow_private,
            clock=self.now,
        )
        self.job(
            WEBHOOK_JOB,
            max_retries=s.webhook_max_retries,
            timeout=s.webhook_timeout * 2 + 5,
            retry=RetryPolicy(base=s.webhook_retry_base, max_delay=3600.0),
            _internal=True,
        )(self.webhooks.deliver)
        self.locks = Locks(lock_backend(self.settings, self.store), clock=self.now)
        tracing.configure()  # from OTEL_* variables, once per process

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        # Settings replaced after construction (tests do) reach the workers built later.
        self._settings = value
        if hasattr(self, "deps"):
            self.deps = replace(self.deps, settings=value)
        for definition in getattr(self, "registry", {}).values():
            definition.fill_defaults(value)  # options left out follow the settings
        #: Schedules declared in code (``@app.cron``, ``app.schedule``), by name.
        self.schedules: dict[str, Schedule] = {}

    # -- lifecycle --------------------------------------------------------------
    def now(self) -> datetime:
        return self._clock()

    async def open(self) -> Conveyor:
        if not self._opened:
            if self.settings.secrets_dir:  # a typo stops the process now, not a job later
                self._file_secrets = FileSecrets(self.settings.secrets_dir)
            await self.store.open()
            try:
                await self.bus.open()
            except BaseException:
                await self.store.close()
                raise
            self._opened = True
            await self._move_webhook_secrets()
        return self

    async def close(self) -> None:
        if self._opened:
            audit = getattr(self, "_audit_log", None)
            if audit is not None:
                await audit.drain()  # secret reads recorded from the vault's hook
            self._opened = False
            try:
                await self.webhooks.close()
                await self.bus.close()
                if self.locks.backend is not self.store:  # Redis locks: their own client
                    await self.locks.backend.close()  # type: ignore[attr-defined]
            finally:
                await self.store.close()

    async def __aenter__(self) -> Conveyor:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- registration ---------------------------------------------------------------
    def job(
        self,
        job_type: str,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = DEFAULT_PRIORITY,
        max_retries: int | None = None,
        timeout: TimeoutOption = FROM_SETTINGS,
        retry: RetryPolicy | None = None,
        isolation: str | None = None,
        _internal: bool = False,
        heal: Callable[..., Any] | None = None,
        max_heals: int = DEFAULT_MAX_HEALS,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        rate_limit: str | None = None,
        requires: Mapping[str, str] | None = None,
    ) -> Callable[[F], JobDefinition]:
        """Register a handler ``(ctx, **payload)`` for ``job_type``.

        ``timeout`` in seconds (``None``: none); ``isolation``: ``"thread"`` or
        ``"process"`` (a supervised child process, see docs/operations.md), default
        the worker's. ``heal``: ``fn(payload, error, attempt) -> new payload | None``
        (sync or async) run before each retry of a failed attempt, at most
        ``max_heals`` times per job (0-100; see docs/workflows.md). Raises
        ``ValidationError`` / ``ConfigurationError`` for bad values, a reserved
        (``conveyor.``) type or a type registered twice.
        the worker's. Raises ``ValidationError`` / ``ConfigurationError`` for bad
        values, a reserved (``conveyor.``) type or a type registered twice.

        Flow control (docs/flow_control.md), enforced by the store for every
        worker: ``concurrency_key`` a template over the payload
        (``"tenant:{tenant_id}"``) that the limits count per;
        ``concurrency_limit`` the most jobs running at once per key (or for the
        type, without a key); ``rate_limit`` the most starting per fixed window
        per key (``"100/60s"``); ``requires`` what a worker must offer
        (``{"gpu": "a100"}``, see ``conveyor worker --capability``).

        Left out, ``timeout``, ``max_retries`` and ``retry`` take the fleet-wide
        settings (``CONVEYOR_JOB_TIMEOUT``, ``CONVEYOR_JOB_MAX_RETRIES``,
        ``CONVEYOR_JOB_RETRY_BASE``/``_FACTOR``; 300 s, 3, 1 s and 2 unset); values
        given here always win.
        """
        from_settings: set[str] = set()
        if timeout is FROM_SETTINGS:
            from_settings.add("timeout")
            timeout = self.settings.job_timeout or None
        if max_retries is None:
            from_settings.add("max_retries")
            max_retries = self.settings.job_max_retries
        if retry is None:
            from_settings.add("retry")
        probe = NewJob(
            job_type, queue=queue, priority=priority, max_retries=max_retries, internal=_internal
        )
        probe.validate()
        if timeout is not None:
            problem = timeout_error(timeout)
            if problem is not None:
                raise ConfigurationError(f"timeout of job type {job_type!r} {problem}")
        if isolation not in (None, *ISOLATION_MODES):
            raise ConfigurationError(
                f"isolation of job type {job_type!r} must be one of {', '.join(ISOLATION_MODES)}"
            )
        check_heal(job_type, heal, max_heals)

        flow = flow_limits(job_type, concurrency_key, concurrency_limit, rate_limit, requires)

        def decorator(fn: F) -> JobDefinition:
            if job_type in self.registry:
                raise ConfigurationError(f"Job type {job_type!r} is already registered")
            definition = JobDefinition(
                job_type=job_type,
                handler=fn,
                app=self,
                queue=queue,
                priority=priority,
                max_retries=max_retries,
                timeout=timeout,
                retry=retry or default_retry(self.settings),
                isolation=isolation,
                heal=heal,
                max_heals=max_heals,
                flow=flow,
                from_settings=frozenset(from_settings),
            )
            self.registry[job_type] = definition
            return definition

        return decorator

    def include(self, other: Conveyor) -> None:
        """Adopt the job types registered on another app object."""
        for job_type, definition in other.registry.items():
            if job_type.startswith(INTERNAL_JOB_PREFIX):
                continue  # every app has its own
            if job_type in self.registry:
                raise ConfigurationError(f"Job type {job_type!r} is registered twice")
            definition.app = self
            definition.fill_defaults(self.settings)  # this app's fleet-wide defaults
            self.registry[job_type] = definition
        for name, declared in other.schedules.items():
            if name in self.schedules:
                raise ConfigurationError(f"Schedule {name!r} is declared twice")
            self.schedules[name] = declared

    # -- submitting -------------------------------------------------------------------
    def new_job(
        self,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        timeout_ms: int | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        depends_on: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        created_by: str | None = None,
        defaults: JobTypeInfo | None = None,
        internal: bool = False,
        concurrency_key: str | None = None,
        requires: Mapping[str, str] | None = None,
        flow: FlowLimits | None = None,
    ) -> NewJob:
        """A ``NewJob`` with the job type's registered defaults filled in (payload checked).

        Options left out (``None``) take the job type's registration: its
        ``@app.job(...)`` arguments, or ``defaults`` (what a worker recorded in the
        store, for types this process has no handler for), else the global
        defaults. ``timeout`` is in seconds (``timeout_ms`` wins when both are
        given); ``delay`` in seconds from now. Raises ``ValidationError`` for any
        value outside the documented ranges (``docs/api.md``), ``ConfigurationError``
        when both ``delay`` and ``run_at`` are given.

        ``concurrency_key`` (text) overrides the key the job type's template would
        compute from the payload; ``requires`` (``{"gpu": "a100"}``) overrides the
        type's requirements. ``flow``: the type's recorded limits (as ``defaults``).
        """
        if not internal and type(job_type) is str and is_internal(job_type):
            NewJob(job_type).validate()  # names the reserved prefix, before the payload
        definition = self.registry.get(job_type)
        if payload is None:
            payload = {}
        d_timeout_ms: int | None
        if definition is not None:
            if type(payload) is dict or isinstance(payload, Mapping):
                definition.validate_payload(payload)
            d_queue, d_priority, d_retries = (
                definition.queue,
                definition.priority,
                definition.max_retries,
            )
            d_timeout_ms = _seconds_to_ms(definition.timeout)
        elif defaults is not None:
            d_queue, d_priority, d_retries, d_timeout_ms = (
                defaults.queue,
                defaults.priority,
                defaults.max_retries,
                defaults.timeout_ms,
            )
        else:
            d_queue, d_priority, d_retries, d_timeout_ms = (  # fleet-wide defaults
                DEFAULT_QUEUE,
                DEFAULT_PRIORITY,
                self.settings.job_max_retries,
                _seconds_to_ms(self.settings.job_timeout or None),
            )
        if delay is not None:
            if run_at is not None:
                raise ConfigurationError("Give either delay or run_at, not both")
            problem = delay_error(delay)
            if problem is not None:
                raise ValidationError(f"delay {problem}", [FieldError("delay", problem)])
            run_at = run_at_after(self.now(), delay)
        if timeout_ms is None:
            if timeout is None:
                timeout_ms = d_timeout_ms
            else:
                problem = timeout_error(timeout)
                if problem is not None:
                    raise ValidationError(f"timeout {problem}", [FieldError("timeout", problem)])
                timeout_ms = _seconds_to_ms(timeout)
        new = NewJob(  # positional, in field order: keywords cost ~1 us a job in bulk
            job_type,
            payload,
            queue or d_queue,
            d_priority if priority is None else _integral(priority),
            d_retries if max_retries is None else _integral(max_retries),
            _integral(timeout_ms),
            run_at,
            idempotency_key,
            tuple(depends_on) if depends_on else (),
            metadata or {},
            created_by,
            None,
            internal,
        )
        if definition is not None:
            flow = definition.flow
        if concurrency_key is not None or requires is not None or flow is not None:
            new.concurrency_key, new.requires = job_flow(flow, payload, concurrency_key, requires)
        return new  # validated (all fields at once) by the store when submitted

    async def submit(
        self,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        connection: Any = None,
        **options: Any,
    ) -> EnqueueResult:
        """Submit one job; returns it and whether it was a duplicate (idempotency key).

        ``connection``: an asyncpg connection inside your own transaction
        (PostgreSQL): the job exists only if your transaction commits.
        """
        if job_type not in self.registry and options.get("defaults") is None:
            options["defaults"] = await self.recorded_job_type(job_type)
            options.setdefault("flow", self._known_flow.get(job_type))
        new = self.new_job(job_type, payload, **options)
        (result,) = await self.submit_many([new], connection=connection)
        return result

    async def enqueue(
        self, job_type: str, payload: Mapping[str, Any] | None = None, **options: Any
    ) -> Job:
        """Submit one job and return it once it is committed to the store."""
        return (await self.submit(job_type, payload, **options)).job

    async def enqueue_many(
        self,
        job_type: str,
        payloads: Iterable[Mapping[str, Any] | None],
        *,
        connection: Any = None,
        **options: Any,
    ) -> list[Job]:
        """Submit one ``job_type`` job per payload, all in one transaction (all or
        none); returns the jobs in the same order.

        ``options`` (``queue``, ``priority``, ``delay``, ``depends_on``...) apply to
        every job. For options that differ per job, build each with ``new_job``
        and call ``submit_many``.
        """
        if "idempotency_key" in options:
            raise ConfigurationError(
                "enqueue_many gives every job the same options: an idempotency key names "
                "one job. Build the jobs with new_job(..., idempotency_key=...) and call "
                "submit_many"
            )
        items = list(payloads)
        if not items:
            return []
        if job_type not in self.registry and options.get("defaults") is None:
            options["defaults"] = await self.recorded_job_type(job_type)
            options.setdefault("flow", self._known_flow.get(job_type))
        try:
            first = self.new_job(job_type, items[0], **options)  # defaults resolved once
        except ValidationError as exc:
            raise _payload_error_at(exc, 0) from None
        definition = self.registry.get(job_type)
        check = definition.validate_payload if definition is not None else None
        jobs = [first]
        for i, payload in enumerate(islice(items, 1, None), start=1):
            if payload is None:
                payload = {}
            if check is not None and (type(payload) is dict or isinstance(payload, Mapping)):
                try:
                    check(payload)
                except ValidationError as exc:
                    raise _payload_error_at(exc, i) from None
            jobs.append(first.with_payload(payload))
        template = per_payload_key(self.registry.get(job_type), options)
        if template is not None:  # each payload has its own key
            for i, job in enumerate(jobs[1:], start=1):
                try:
                    job.concurrency_key = template.render(job.payload)
                except ValidationError as exc:
                    raise _payload_error_at(exc, i) from None
        return [r.job for r in await self.submit_many(jobs, connection=connection)]

    async def submit_many(
        self, jobs: Sequence[NewJob], *, connection: Any = None
    ) -> list[EnqueueResult]:
        """Submit many jobs in one transaction (all or none)."""
        if not self._opened:
            await self.open()
        await self._check_known_types(jobs)
        with tracing.submitting(jobs) as traced:  # a PRODUCER span while tracing is on
            results = await self.store.enqueue_many(traced.jobs, self.now(), connection=connection)
            traced.done(results)
        # Inside the caller's transaction nothing is ready before it commits: no
        # cross-process wake-up (the commit's NOTIFY does it on PostgreSQL).
        self.after_submit(wake_others=connection is None)
        return results

    async def recorded_job_type(self, job_type: str) -> JobTypeInfo | None:
        """The defaults a worker recorded for ``job_type`` (``None`` if none did).

        Read from the store at most once per ``JOB_TYPES_TTL`` seconds, and again
        (at most every ``JOB_TYPES_MISS_TTL``) for a type not seen yet: a worker may
        have been deployed a moment ago."""
        info = (await self._recorded_types()).get(job_type)
        if info is None and time.monotonic() - self._known_types_at > JOB_TYPES_MISS_TTL:
            info = (await self._recorded_types(refresh=True)).get(job_type)
        return info

    async def known_job_types(self) -> list[str]:
        """Every job type this process or any worker knows, sorted (internal ones left out)."""
        names = set(await self._recorded_types()) | set(self.registry)
        return sorted(n for n in names if not is_internal(n))

    async def _recorded_types(self, *, refresh: bool = False) -> dict[str, JobTypeInfo]:
        if refresh or time.monotonic() - self._known_types_at >= JOB_TYPES_TTL:
            await self.open()
            self._known_types = {t.job_type: t for t in await self.store.list_job_types()}
            self._known_flow = {f.job_type: f for f in await self.store.list_flow_limits()}
            self._known_types_at = time.monotonic()
        return self._known_types

    async def _check_known_types(self, jobs: Sequence[NewJob]) -> None:
        """Refuse job types no registration and no worker knows: such a job would
        wait forever (``allow_unknown_job_types`` turns this off)."""
        if self.settings.allow_unknown_job_types:
            return
        unknown: list[str] = []
        seen: set[str] = set()
        for new in jobs:
            t = new.job_type
            if t in seen or t in self.registry:
                continue
            seen.add(t)
            if type(t) is str and await self.recorded_job_type(t) is None:
                unknown.append(t)
        if unknown:
            known = await self.known_job_types()
            listed = ", ".join(known[:50]) + (" ..." if len(known) > 50 else "")
            raise ValidationError(
                f"Unknown job type(s) {', '.join(repr(u) for u in unknown[:10])}: no worker "
                f"serves them, so they would never run. Known types: {listed or '(none)'}. "
                "Start a worker that registers them (or set "
                "CONVEYOR_ALLOW_UNKNOWN_JOB_TYPES=true to accept types deployed later)",
                [FieldError("job_type", "unknown job type")],
            )

    async def resolve_job_id(self, text: str) -> str:
        """The job id ``text`` names: a full id, or a unique prefix of at least
        ``MIN_ID_PREFIX`` characters (as copied from a listing). Raises
        ``ValidationError`` for a short or malformed one, or one that several jobs
        share (naming some), ``JobNotFound`` when no job matches."""
        key = text.strip().lower()
        if not _HEX_RE.fullmatch(key) or not MIN_ID_PREFIX <= len(key) <= 32:
            raise ValidationError(
                f"{text!r} is not a job id or an id prefix: give at least {MIN_ID_PREFIX} "
                "of its hexadecimal digits",
                [FieldError("job_id", "must be 6-32 hexadecimal digits")],
            )
        if len(key) == 32:
            return key
        await self.open()
        found = await self.store.ids_with_prefix(key, 6)
        if not found:
            raise JobNotFound(text)
        if len(found) > 1:
            shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
            raise ValidationError(
                f"Job id prefix {text!r} is ambiguous: it matches {shown}. Give more digits "
                "(the first 12 are the creation time in ms, the rest tell jobs apart)",
                [FieldError("job_id", "ambiguous prefix")],
            )
        return found[0]

    # -- operator actions -----------------------------------------------------------------
    async def cancel(self, job_id: str, reason: str | None = None) -> Job:
        """Cancel a job. A running one is flagged and its worker told over the bus
        (the heartbeat carries the flag too, should the message be lost)."""
        if reason is not None:
            problem = None if not isinstance(reason, str) else text_error(reason)
            if not isinstance(reason, str) or not 1 <= len(reason) <= 500 or problem:
                message = problem or "must be text of 1-500 characters"
                raise ValidationError(f"reason {message}", [FieldError("reason", message)])
        await self.open()
        job = await self.store.cancel(job_id, self.now(), reason)
        if job.state is JobState.RUNNING:
            await self.signal_cancel(job.id)
        return job

    async def signal(self, topic: str, payload: dict[str, Any]) -> bool:
        """Best-effort control message on the bus; False (logged) if it failed."""
        try:
            await asyncio.wait_for(self.bus.publish(topic, payload), SIGNAL_TIMEOUT)
            return True
        except Exception as exc:  # noqa: BLE001 - signals are hints; the store is the truth
            log.warning("bus_signal_failed", topic=topic, error=str(exc))
            return False

    def _signal_soon(self, topic: str, payload: dict[str, Any]) -> None:
        task = asyncio.ensure_future(self.signal(topic, payload))
        self._pending_signals.add(task)
        task.add_done_callback(self._pending_signals.discard)

    # -- dead-letter queue --------------------------------------------------------------
    async def retry_dead_letters(
        self, job_type: str | None = None, *, include_internal: bool = False
    ) -> int:
        """Re-queue every dead-lettered job (of ``job_type``), 1,000 per transaction.
        Conveyor's own jobs (``conveyor.`` types: webhook deliveries) only when
        ``include_internal`` or when ``job_type`` names one. Returns how many."""
        await self.open()
        internal = include_internal or (job_type is not None and is_internal(job_type))
        retried = 0
        while True:
            page = await self.store.list_jobs(
                JobQuery(
                    states=(JobState.FAILED,),
                    job_type=job_type,
                    limit=1000,
                    include_internal=internal,
                )
            )
            if not page.jobs:
                break
            await self.store.retry_failed([j.id for j in page.jobs], self.now())
            retried += len(page.jobs)
            self.notify_listeners()
        return retried

    # -- in-process signals -------------------------------------------------------------
    def add_listener(self, callback: Callable[[], None]) -> None:
        self.signals.add_listener(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self.signals.remove_listener(callback)

    def notify_listeners(self) -> None:
        self.signals.notify_listeners()

    def on_events_written(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (cheap, sync) when this process just committed events:
        the outbox readers look at once instead of at their next poll."""
        self.signals.on_events_written(callback)

    def remove_events_listener(self, callback: Callable[[], None]) -> None:
        self.signals.remove_events_listener(callback)

    def events_written(self) -> None:
        self.signals.events_written()

    def on_finish(self, callback: Callable[[Finish, bool], None]) -> None:
        self.signals.on_finish(callback)

    @property
    def has_finish_listeners(self) -> bool:
        return self.signals.has_finish_listeners

    def emit_finished(self, finish: Finish, accepted: bool) -> None:
        self.signals.emit_finished(finish, accepted)

    # -- workflows ------------------------------------------------------------------------
    def workflow(
        self,
        name: str,
        *,
        on_failure: str = "fail_fast",
        metadata: Mapping[str, Any] | None = None,
    ) -> WorkflowBuilder:
        """Start building a workflow (``docs/workflows.md``): add steps with
        ``.step(...)``, then ``run = await wf.submit()`` and ``await run.wait()``."""
        return WorkflowBuilder(self.workflows, name, on_failure=on_failure, metadata=metadata)

    async def submit_workflow(
        self, definition: Mapping[str, Any] | WorkflowIn, *, created_by: str | None = None
    ) -> WorkflowRun:
        """Submit a workflow from its definition (the ``POST /api/workflows`` shape,
        as a dict, or loaded with ``conveyor.workflows.load_definition``)."""
        if not isinstance(definition, WorkflowIn):
            definition = parse_definition(definition)
        wf, _ = await self.workflows.submit(definition, created_by=created_by)
        return WorkflowRun(self.workflows, wf.id)

    def after_submit(self, *, wake_others: bool = True) -> None:
        """Wake this process's workers and outbox readers, and (``wake_others``)
        other processes' workers over the bus, after jobs were made ready."""
        self.notify_listeners()
        self.events_written()
        if wake_others and self.bus.backend != "memory":
            self._signal_soon(WAKE_TOPIC, {})  # workers of other processes start at once

    async def signal_cancel(self, job_id: str) -> None:
        """Tell the worker running ``job_id`` that its cancel was requested."""
        await self.signal(CANCEL_TOPIC, {"job_id": job_id})

    # -- running --------------------------------------------------------------------------
    def worker(self, **options: Any) -> Worker:
        return Worker(self.deps, **options)

    async def run_worker(self, **options: Any) -> None:
        """Open the store and run a worker until SIGTERM/SIGINT; with
        ``settings.metrics_port`` it also serves ``/metrics``, ``/health`` and
        ``/ready`` on ``settings.metrics_host`` (``ConfigurationError`` when that
        port can't be bound)."""
        import signal

        await self.open()
        worker = self.worker(**options)
        endpoints = None
        if self.settings.metrics_port:  # /metrics, /health, /ready (docs/metrics.md)
            from conveyor.observability.endpoints import WorkerEndpoints

            endpoints = WorkerEndpoints(
                self.deps, worker, host=self.settings.metrics_host, port=self.settings.metrics_port
            )
            try:
                await endpoints.start()
            except BaseException:
                await self.close()
                raise
        gc.freeze()  # everything imported so far lives for the whole process
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop)
        try:
            await worker.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if endpoints is not None:
                await endpoints.close()
            await self.close()
        exit_if_abandoned(worker)

    # -- distributed locks and leader election (docs/locks.md) -----------------------
    def lock(self, key: str, *, ttl: float = 30.0, wait: float = 0.0) -> LockRequest:
        """A distributed lock on ``key`` for ``ttl`` seconds::

            async with app.lock("invoice:42", ttl=30, wait=5) as lock:
                await lock.check()          # or pass lock.token to your own writes
                await lock.extend(30)

        ``lock.token`` is the fencing token: greater than every earlier holder's of
        this key. ``wait`` seconds to wait while someone holds it (0: fail fast),
        then ``LockNotAcquired``. Released at the end of the block; an expired
        lock is not renewed for you (``extend``, or use ``with_lock``). The store
        keeps the locks, or Redis with ``CONVEYOR_LOCKS_BACKEND=redis``.
        ``ValidationError`` for a bad key (1-200 characters, no control
        characters), ttl (0.01 s to 30 days) or wait (0 to 86,400 s)."""
        return self.locks(key, ttl=ttl, wait=wait)

    async def with_lock(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        ttl: float = 30.0,
        wait: float = 0.0,
        renew_every: float | None = None,
        **kwargs: Any,
    ) -> T:
        """``await fn(*args, **kwargs)`` while holding ``key``, renewed every
        ``renew_every`` seconds (default ``ttl / 3``). If the lock is lost (taken
        over, or not renewable before it expires), ``fn`` is cancelled and
        ``LockLost`` raised. Returns ``fn``'s result."""
        return await self.locks.run(
            key, fn, *args, ttl=ttl, wait=wait, renew_every=renew_every, **kwargs
        )

    def leader(self, name: str, *, ttl: float = 15.0) -> Leadership:
        """The leader lease ``name`` (kept in the store under ``leader:<name>``):
        one process of the fleet holds it; if it dies, another takes over within
        ``ttl`` seconds (plus its polling interval, ``ttl / 3``)::

            async with app.leader("report-sender") as lease:
                await send_reports(fence=lease.token)   # cancelled if the lease is lost

        or ``if await lease.hold(): ...`` in a loop faster than ``ttl``."""
        return Leadership(self.store, name, ttl=ttl, clock=self.now)

    async def list_locks(self, *, limit: int = 100, include_free: bool = False) -> list[LockInfo]:
        """The held locks and leader leases in key order (``include_free``: every
        key ever locked, with its last token); at most ``limit``."""
        rows = await self.locks.list(limit=limit, include_free=include_free)
        if self.locks.backend is not self.store:  # leader leases always live in the store
            leases = await self.store.list_locks(self.now(), limit=limit, include_free=include_free)
            rows = sorted(
                rows + [r for r in leases if r.key.startswith(LEADER_PREFIX)], key=lambda r: r.key
            )[:limit]
        return rows

    # -- cron schedules (docs/schedules.md) -------------------------------------------
    def cron(
        self,
        expression: str,
        *,
        timezone: str = "UTC",
        name: str | None = None,
        payload: Mapping[str, Any] | None = None,
        misfire: str = "skip",
        catch_up_max: int = 1,
        jitter: float = 0.0,
        overlap: str = "allow",
    ) -> Callable[[JobDefinition], JobDefinition]:
        """Fire the job type below on a cron schedule (put it above ``@app.job``)::

            @app.cron("*/5 * * * *", timezone="Europe/Berlin")
            @app.job("cleanup")
            async def cleanup(ctx) -> None: ...

        ``name`` defaults to the job type (give one per ``@app.cron`` when stacking
        several). Raises ``ValidationError`` at once for a bad expression, zone,
        payload or policy. Schedulers store it when they start (see ``schedule``).
        """

        def decorator(definition: JobDefinition) -> JobDefinition:
            if not isinstance(definition, JobDefinition):
                raise ConfigurationError(
                    "@app.cron takes a registered job: put it above @app.job(...)"
                )
            self.schedule(
                name or definition.job_type,
                expression,
                definition.job_type,
                payload,
                timezone=timezone,
                misfire=misfire,
                catch_up_max=catch_up_max,
                jitter=jitter,
                overlap=overlap,
            )
            return definition

        return decorator

    def schedule(
        self,
        name: str,
        cron: str,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timezone: str = "UTC",
        queue: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        misfire: str = "skip",
        catch_up_max: int = 1,
        jitter: float = 0.0,
        overlap: str = "allow",
    ) -> Schedule:
        """Declare a schedule in code: submit ``job_type`` with ``payload`` at every
        fire time of ``cron`` (5 fields, 6 with seconds first, or a macro such as
        ``@hourly``) in ``timezone``.

        Job options left out take the job type's registration, as ``enqueue``
        does. ``misfire``: ``"skip"`` or ``"catch_up"`` (up to ``catch_up_max``
        missed fire times); ``jitter``: up to that many seconds added to each
        job's run time; ``overlap``: ``"allow"`` or ``"skip_if_running"``. Raises
        ``ValidationError`` (everything wrong at once) or ``ConfigurationError``
        for a name declared twice. Every scheduler (``conveyor up``, ``conveyor
        scheduler``) upserts the declared schedules when it starts.
        """
        from conveyor.scheduling import build_schedule

        if isinstance(name, str) and name in self.schedules:
            raise ConfigurationError(f"Schedule {name!r} is declared twice")
        declared = build_schedule(
            self,
            name=name,
            cron=cron,
            job_type=job_type,
            payload=payload,
            timezone=timezone,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            misfire=misfire,
            catch_up_max=catch_up_max,
            jitter=jitter,
            overlap=overlap,
            source="code",
        )
        self.schedules[declared.name] = declared
        return declared

    def scheduler(self, **options: Any) -> Scheduler:
        """A scheduler loop on this app's store, clock and declared schedules
        (``options`` override ``Scheduler``'s arguments)."""

        s = self.settings
        values: dict[str, Any] = {
            "clock": self.now,
            "rand": self.rand,
            "grace": s.scheduler_misfire_grace,
            "interval": s.scheduler_interval,
            "on_fired": self.after_submit,
            "declared": list(self.schedules.values()),
            "owned_job_types": [t for t in self.registry if not is_internal(t)],
            "keep_fires": max(s.retention, 86_400.0),
            "signals": self.signals,
        }
        values.update(options)
        return Scheduler(self.store, **values)

    async def run_scheduler(self) -> None:
        """Open the store and run a scheduler alone until SIGTERM/SIGINT."""
        import signal

        await self.open()
        scheduler = self.scheduler()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, scheduler.request_stop)
        try:
            await scheduler.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.close()

    # -- the secrets vault (docs/security.md) --------------------------------------------
    @property
    def secrets(self) -> StoreSecrets:
        """The vault: ``await app.secrets.get("smtp")``, ``set``, ``list``, ``delete``,
        ``rotate_master``. Built on first use from the master key settings (a bad
        key or an unsafe key file raises ``ConfigurationError`` then)."""
        vault: StoreSecrets | None = getattr(self, "_vault", None)
        if vault is None or vault.store is not self.store:
            s = self.settings
            vault = AuditedSecrets(  # every read and change audited (auditing.py)
                self.store,
                load_keyring(s),
                self.now,
                cache_ttl=s.secrets_cache_ttl,
                keep=s.secrets_keep_versions,
                retention=s.secrets_retention,
                audit=self.audit,
            )
            self._vault = vault
        return vault

    async def _resolve_secret(self, name: str) -> str:
        """A payload reference's (or a webhook's) secret: from ``CONVEYOR_SECRETS_DIR``
        first when set (security/file_secrets.py), then the vault. Conveyor's own
        secrets (``conveyor.*``) come from the vault only."""
        if self.settings.secrets_dir and not name.startswith("conveyor."):
            files: FileSecrets | None = getattr(self, "_file_secrets", None)
            if files is None or str(files.directory) != self.settings.secrets_dir:
                files = FileSecrets(self.settings.secrets_dir)
                self._file_secrets = files
            return await ChainedSecrets(files, self.secrets).get(name)
        return await self.secrets.get(name)

    async def _move_webhook_secrets(self) -> None:
        """At open, with a master key: webhook secrets still stored in their rows
        move into the vault (security/webhook_secrets.py). A bad key or a store
        error is logged and left for the vault's next use to report."""
        s = self.settings
        if not (s.master_key or s.master_key_file):
            return
        from conveyor.domain.errors import ConveyorError
        from conveyor.security.webhook_secrets import move_webhook_secrets

        try:
            moved = await move_webhook_secrets(self.store, self.secrets)
        except ConveyorError as exc:
            log.warning("webhook_secrets_not_moved", error=str(exc))
            return
        if moved:
            log.info("webhook_secrets_moved", count=moved)

    # -- the audit log (docs/security.md) ---------------------------------------------------
    @property
    def audit(self) -> AuditLog:
        """The hash-chained audit log: ``change``, ``record``, ``list``, ``verify``,
        ``anchor`` (``conveyor.auditing``)."""
        return audit_property(self)

    async def _handler_audit(
        self, fields: dict[str, Any], job: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``ctx.audit`` (runtime/audit.py): record a handler's entry as ``system``."""
        return await self.audit.record_handler(fields, job)


def _integral(value: Any) -> Any:
    """``50.0`` as ``50``, as the REST API reads a JSON number (JSON has one number
    type); anything else unchanged, for validation to judge."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _seconds_to_ms(seconds: float | None) -> int | None:
    """A timeout in seconds as whole milliseconds, rounded up (0.0001 s is 1 ms)."""
    return None if seconds is None else max(1, math.ceil(seconds * 1000))


def _payload_error_at(exc: ValidationError, index: int) -> ValidationError:
    """A payload's ValidationError naming which payload of a batch it is about."""
    if not any(d.field.startswith("payload") for d in exc.details):
        return exc  # about an option, not the payload
    details = [
        FieldError(f"payloads[{index}]{d.field[len('payload') :]}", d.message)
        if d.field.startswith("payload")
        else d
        for d in exc.details
    ]
    return ValidationError(f"payloads[{index}]: {exc}", details)


def lock_backend(settings: Settings, store: Store) -> LockBackend:
    """Where locks live: the store, or Redis with ``locks_backend=redis``."""
    if settings.locks_backend != "redis":
        return store
    try:
        from conveyor.storage.redis_locks import RedisLocks
    except ImportError as exc:
        raise ConfigurationError(
            "Redis locks need redis-py: pip install 'conveyor[redis]'"
        ) from exc
    return RedisLocks(settings.redis_url)
