"""The worker: batch fetch, bounded concurrency, batched completion writes.

Life of a job here: ``fetch`` leases a batch (one transaction), each job runs
as an asyncio task (sync handlers in a thread pool), its outcome goes to a
buffer, and one flusher task writes the buffer with ``finish_many`` (one
transaction per batch, fenced by lease tokens). While a write is in flight new
outcomes pile up, so batches grow with load and cost nothing when idle.

A heartbeat per worker (not per job) keeps its leases alive and brings back
cancel requests. The maintenance loop rescues the jobs of dead workers and
prunes old finished jobs; every worker runs it, and the one holding the leader
lease ``conveyor.maintenance`` does the passes (see runtime/locks.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from conveyor.bus.base import CANCEL_TOPIC, WAKE_TOPIC, Message, Subscription
from conveyor.domain.errors import (
    ConfigurationError,
    ConveyorError,
    Permanent,
    StoreUnavailable,
    ValidationError,
)
from conveyor.domain.ids import new_token
from conveyor.domain.job import Finish, Job, WorkerInfo, is_internal
from conveyor.domain.limits import safe_text
from conveyor.domain.retry import cut_traceback, decide, describe, traceback_text
from conveyor.domain.states import Action
from conveyor.observability import tracing
from conveyor.runtime.audit import attach_audit
from conveyor.runtime.context import JobContext
from conveyor.runtime.dead_letter import prune_dead_letters
from conveyor.runtime.flow import next_window_in, registered_limits, worker_capabilities
from conveyor.runtime.locks import MAINTENANCE_LEADER, Leadership
from conveyor.runtime.observe import JobsRescued, JobsStarted
from conveyor.runtime.relay import OutboxConsumer, bus_relay, skip_unheard
from conveyor.runtime.secret_refs import has_refs, resolve_refs, scrub, scrub_json
from conveyor.runtime.steps import attach_steps, child_calls, heal_finish
from conveyor.runtime.webhooks import WebhookDispatcher
from conveyor.storage.codec import storable_result

if TYPE_CHECKING:
    from conveyor.runtime.ports import RuntimeDeps
    from conveyor.runtime.registry import JobDefinition

log = structlog.get_logger("conveyor.worker")

#: The in-process bus keeps at most this many entries of the ``events`` stream.
MEMORY_STREAM_MAXLEN = 10_000


class JobTimeout(ConveyorError, TimeoutError):
    """The handler ran longer than the job's timeout (transient: retried)."""


def _unstorable(finish: Finish, exc: BaseException) -> Finish | None:
    """The plain failure recorded in place of an outcome the store refused, or
    ``None`` when ``finish`` is already that (so the store itself is failing)."""
    if isinstance(exc, StoreUnavailable) or (finish.error or "").startswith(UNSTORABLE):
        return None
    return Finish(
        finish.job_id,
        finish.lease_token,
        Action.FAIL,
        error=f"{UNSTORABLE} ({finish.action.value}): {describe(exc)}",
        job_type=finish.job_type,
        duration=finish.duration,
    )


#: Exit status of a worker process that stopped with handlers still running
#: (EX_TEMPFAIL: its supervisor restarts it; the jobs are rescued).
EXIT_ABANDONED = 75


def exit_if_abandoned(worker: Worker) -> None:
    """End the process at once when ``worker`` left handler code running at
    shutdown: a normal exit would wait for those threads forever (and the jobs must
    not run on here while the rescuer starts them elsewhere)."""
    if worker.abandoned:
        log.error("worker_exit_with_running_handlers", jobs=worker.abandoned, status=EXIT_ABANDONED)
        logging.shutdown()
        os._exit(EXIT_ABANDONED)


#: Seconds past its timeout after which a still-running handler counts as stuck.
STUCK_AFTER = 5.0

#: Seconds a stopping worker waits for cancelled handlers before abandoning them.
STOP_WAIT = 2.0

#: Error text of a job whose outcome the store refused (see ``Worker._write``).
UNSTORABLE = "the job's outcome could not be stored"


def _as_json(values: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """The validated payload as JSON values for a child process (``"7"`` already an
    ``int``; a ``datetime`` as ISO text, turned back by the child's validation)."""
    try:
        return dict(orjson.loads(orjson.dumps(values)))
    except (TypeError, ValueError):
        return fallback


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


@dataclass
class _Running:
    job: Job
    ctx: JobContext
    task: asyncio.Task[None]
    cancel_requested: bool = False
    released: bool = False
    deadline: float | None = None  # monotonic time the handler's timeout expires
    stuck_since: float | None = None  # asked to stop (timeout/cancel), still running
    abandoned: bool = False  # shutdown left its code running: no outcome is written
    timeout_cm: asyncio.Timeout | None = None  # the handler's timeout, to tell it apart
    timed_out: bool = False  # the pool killed its child at the timeout
    error: BaseException | None = None  # what the attempt raised (for a heal)
    secrets: tuple[str, ...] = ()  # values its secret references resolved to (scrubbed)


@dataclass(frozen=True, slots=True)
class _Raised:
    """What a sync handler raised, carried back from its thread as a value:
    ``StopIteration`` can't be set on a Future, and nothing else may be lost."""

    exc: BaseException


#: Exception arguments whose text is computed without user code (by class id:
#: a metaclass can't interfere with an integer lookup).
_PLAIN_ARGS = frozenset(id(t) for t in (str, int, float, bool, type(None), bytes))
#: Exception classes whose description and classification run no user code.
_SAFE_EXCEPTIONS = frozenset(
    id(t) for t in vars(builtins).values() if isinstance(t, type) and issubclass(t, BaseException)
)


class HandlerFailure(ConveyorError):
    """Stands for a handler's exception that could not describe itself in time."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _timed(f: Finish, job_type: str, duration: float) -> Finish:
    """``f`` with its job type and handler duration (for metrics): built
    positionally, as ``dataclasses.replace`` costs ~5 us a job walking the fields."""
    return Finish(
        f.job_id,
        f.lease_token,
        f.action,
        f.result,
        f.error,
        f.retry_at,
        job_type,
        duration,
        f.payload,
        f.error_type,
        f.traceback,
    )


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Resolve ``fut`` from another thread's result (if nobody gave up on it yet)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _class_name(exc: BaseException) -> str:
    """The exception's class name through type's own descriptor: no metaclass
    code runs (a hostile ``__name__`` property can't interfere)."""
    return str(type.__dict__["__name__"].__get__(type(exc), type))


#: Seconds a user-defined exception gets to describe itself (``__str__``).
DESCRIBE_TIMEOUT = 1.0


class Worker:
    def __init__(
        self,
        deps: RuntimeDeps,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        job_types: Sequence[str] | None = None,
        worker_id: str | None = None,
        maintenance: bool = True,
        isolation: str | None = None,
        capabilities: Mapping[str, str] | None = None,
    ) -> None:
        s = deps.settings
        self.deps = deps
        self.store = deps.store
        self.concurrency = concurrency or s.concurrency
        self.queues = tuple(queues or s.queues)
        self.job_types = tuple(job_types or deps.registry)
        if not self.job_types:
            raise ConveyorError(
                "This worker has no job types: register handlers with @app.job(...) "
                "before starting it"
            )
        unknown = set(self.job_types) - set(deps.registry)
        if unknown:
            raise ConveyorError(f"No handler registered for job types: {sorted(unknown)}")
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{new_token()[:8]}"
        self.maintenance = maintenance
        self._running: dict[str, _Running] = {}
        self._outbox: list[Finish] = []
        self._outbox_event = asyncio.Event()
        self._tick = asyncio.Event()
        self._stopping = asyncio.Event()
        self._flushed = asyncio.Event()
        self._force_stop = False
        self.isolation = isolation or s.isolation
        if self.isolation not in ("thread", "process"):
            raise ConfigurationError(
                f"isolation must be 'thread' or 'process' (got {self.isolation!r})"
            )
        # How a child finds each isolated handler, resolved once (a lambda fails here,
        # not per job), with the names of its job type's permanent errors.
        self._child_specs: dict[str, tuple[Any, tuple[str, ...]]] = {}
        for name in self.job_types:
            definition = deps.registry[name]
            if self._isolated(definition):
                from conveyor.runtime.isolation import HandlerRef

                self._child_specs[name] = (
                    HandlerRef.of(definition.handler),
                    tuple(
                        f"{e.__module__}:{e.__qualname__}"
                        for e in definition.retry.permanent_errors
                    ),
                )
        self._pool: Any = None  # runtime.isolation.ProcessPool, started on first use
        self._threads = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="conveyor-job"
        )
        self.processed = 0
        self._abandoned: set[str] = set()
        self.started = asyncio.Event()
        self._consumers: list[OutboxConsumer] = []
        # Per-job log lines are DEBUG; checked once here, not per job.
        self._debug_jobs = logging.getLogger("conveyor.worker").isEnabledFor(logging.DEBUG)
        #: What this worker offers to jobs with requirements (docs/flow_control.md).
        self.capabilities = worker_capabilities(capabilities, s.capabilities)
        self._limited = any(
            (flow := deps.registry[t].flow) is not None and flow.limited for t in self.job_types
        )

    # -- control ----------------------------------------------------------------
    def notify(self) -> None:
        """Wake the fetch loop (called on in-process enqueue)."""
        self._tick.set()

    def request_stop(self) -> None:
        """Begin a graceful stop; a second call stops without waiting for the grace period."""
        if self._stopping.is_set():
            self._force_stop = True
        self._stopping.set()
        self._tick.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def abandoned(self) -> int:
        """Jobs whose code was still running when this worker stopped (the process
        must then exit: see ``exit_if_abandoned``)."""
        return len(self._abandoned)

    @property
    def jobs_running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Run until ``request_stop``; returns after a graceful shutdown."""
        now = self.deps.now()
        await self.store.register_worker(
            WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
                job_types=self.job_types,
                concurrency=self.concurrency,
                capabilities=self.capabilities,
            ),
            now,
        )
        await self.store.record_job_types(
            [self.deps.registry[t].info() for t in self.job_types], now
        )
        await self.store.record_flow_limits(
            registered_limits(self.deps.registry, self.job_types), now
        )
        for name in self.job_types:
            queue = self.deps.registry[name].queue
            if queue not in self.queues:
                log.warning(
                    "job_type_queue_not_served",
                    worker_id=self.id,
                    job_type=name,
                    queue=queue,
                    queues=list(self.queues),
                    hint=f"jobs of {name!r} wait in queue {queue!r}: add --queue {queue}",
                )
        self.deps.signals.add_listener(self.notify)
        await self.store.subscribe_wakeups(self.notify)
        log.info(
            "worker_started",
            worker_id=self.id,
            job_types=list(self.job_types),
            queues=list(self.queues),
            concurrency=self.concurrency,
        )
        helpers = [
            asyncio.create_task(self._flusher(), name="conveyor-flusher"),
            asyncio.create_task(self._heartbeat_loop(), name="conveyor-heartbeat"),
        ]
        if self.maintenance:
            helpers.append(asyncio.create_task(self._maintenance_loop(), name="conveyor-maint"))
        events_stop = asyncio.Event()
        self._consumers = self.outbox_consumers()
        for c in self._consumers:
            self.deps.signals.on_events_written(c.wake)
        consumers = [
            asyncio.create_task(c.run(events_stop), name=f"conveyor-outbox-{c.name}")
            for c in self._consumers
        ]
        subscriptions = await self._subscribe_signals()
        self.started.set()
        try:
            await self._fetch_loop()
            await self._drain()
        finally:
            self.deps.signals.remove_listener(self.notify)
            self.store.unsubscribe_wakeups(self.notify)
            events_stop.set()
            for c in self._consumers:
                self.deps.signals.remove_events_listener(c.wake)
            for sub in subscriptions:
                with contextlib.suppress(Exception):
                    await sub.close()
            # Consumers finish their batch and give their lease up.
            await asyncio.gather(*consumers, return_exceptions=True)
            for t in helpers[1:]:
                t.cancel()
            self._outbox_event.set()
            # The flusher exits once the outbox is empty and no job is running.
            try:
                await asyncio.wait_for(
                    helpers[0], timeout=max(5.0, self.deps.settings.shutdown_grace)
                )
            except (asyncio.CancelledError, TimeoutError):
                # The store would not take the last results: those jobs stay leased to
                # this worker and are rescued (run again) after heartbeat_timeout.
                log.error("worker_results_unsaved", worker_id=self.id, jobs=len(self._outbox))
            for t in helpers[1:]:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(ConveyorError):
                await self.store.deregister_worker(self.id, self.deps.now())
            if (lease := getattr(self, "_maintenance_lease", None)) is not None:
                await lease.resign_quietly()  # the next worker's pass takes over at once
            self._threads.shutdown(wait=False, cancel_futures=True)
            if self._pool is not None:
                await self._pool.close()
            log.info("worker_stopped", worker_id=self.id, processed=self.processed)

    # -- events ------------------------------------------------------------------
    def outbox_consumers(self) -> list[OutboxConsumer]:
        """The outbox relay (to the bus) and the webhook dispatcher, when maintenance is on.
        Every worker runs them; a lease makes one of each active at a time."""
        if not self.maintenance:
            return []
        s = self.deps.settings
        options: dict[str, Any] = {"clock": self.deps.now, "poll_interval": s.event_poll_interval}
        maxlen = s.event_stream_maxlen
        if self.deps.bus.backend == "memory":
            maxlen = min(maxlen, MEMORY_STREAM_MAXLEN)  # it lives in this process's RAM
        dispatcher = WebhookDispatcher(self.deps)
        return [
            OutboxConsumer(
                self.store,
                "relay",
                bus_relay(self.deps.bus, stream_maxlen=maxlen),
                skip_to=skip_unheard(self.store, self.deps.bus),
                **options,
            ),
            OutboxConsumer(
                self.store, "webhooks", dispatcher, skip_to=dispatcher.skip_to, **options
            ),
        ]

    async def _subscribe_signals(self) -> list[Subscription]:
        """Cancel requests and wake-ups from other processes, over the bus (best effort:
        the heartbeat and the poll are the fallbacks)."""

        async def on_cancel(message: Message) -> None:
            job_id = message.payload.get("job_id")
            if isinstance(job_id, str):
                self.cancel_local(job_id)

        async def on_wake(_: Message) -> None:
            self.notify()

        subscriptions: list[Subscription] = []
        try:
            subscriptions.append(await self.deps.bus.subscribe(CANCEL_TOPIC, on_cancel))
            if self.deps.bus.backend != "memory":
                subscriptions.append(await self.deps.bus.subscribe(WAKE_TOPIC, on_wake))
        except Exception as exc:  # noqa: BLE001 - the worker runs without the bus
            log.warning("bus_subscribe_failed", worker_id=self.id, error=str(exc))
        return subscriptions

    # -- fetch loop ---------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        poll = self.deps.settings.poll_interval
        backoff = 0.1
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            got = 0
            if free > 0:
                self._tick.clear()  # before fetching, so an enqueue during fetch re-arms it
                fetched_at = self.deps.now()
                try:
                    jobs = await self.store.fetch(
                        self.id,
                        queues=self.queues,
                        job_types=self.job_types,
                        limit=free,
                        now=fetched_at,
                        capabilities=self.capabilities,
                    )
                    backoff = 0.1
                except Exception as exc:  # noqa: BLE001 - keep the worker alive
                    log.warning(
                        "fetch_failed", worker_id=self.id, error=str(exc), kind=type(exc).__name__
                    )
                    await self._wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                got = len(jobs)
                if got:
                    self.deps.signals.events_written()
                    if self.deps.signals.observing:
                        self.deps.signals.observe(JobsStarted(jobs, fetched_at))
                parents = await self._parent_results(jobs)
                for job in jobs:
                    self._start(job, parents)
                if got == free:
                    continue  # there may be more: fetch again as soon as a slot is free
            else:
                self._tick.clear()
                if len(self._running) < self.concurrency:
                    continue
            window = (
                next_window_in(self.deps.registry, self.job_types, time.time()) if free else None
            )
            await self._idle(poll if window is None else min(poll, window + 0.001))

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tick.wait(), seconds)

    async def _idle(self, seconds: float) -> None:
        """Wait for a wake-up: in-process signal, a change seen by the store, or the poll."""
        step = self.store.change_check_interval
        if step is None or len(self._running) >= self.concurrency:
            await self._wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while not self._tick.is_set() and time.monotonic() < deadline:
            await self._wait(min(step, max(0.0, deadline - time.monotonic())))
            if self._tick.is_set():
                return
            try:
                if await self.store.changed():
                    return
            except ConveyorError:
                return

    async def _parent_results(self, jobs: Sequence[Job]) -> dict[str, dict[str, Any]] | None:
        """The fetched workflow steps' parent results, in one read for the batch
        (None if that read failed: each step then reads its own when it starts)."""
        steps = [j.id for j in jobs if j.workflow_id is not None]
        if not steps:
            return {}
        try:
            return await self.store.parent_results(steps)
        except Exception as exc:  # noqa: BLE001 - retried per step in _attempt
            log.warning("parent_results_failed", worker_id=self.id, error=str(exc))
            return None

    def _start(self, job: Job, parents: dict[str, dict[str, Any]] | None = None) -> None:
        definition = self.deps.registry[job.job_type]
        ctx = JobContext(
            job_id=job.id,
            job_type=job.job_type,
            attempt=job.attempt,
            max_retries=job.max_retries,
            queue=job.queue,
            worker_id=self.id,
            metadata=job.metadata,
            workflow_id=job.workflow_id,
            step_name=job.step_name,
        )
        if job.workflow_id is not None:
            if parents is not None:
                ctx.parent_results = parents.get(job.id, {})
            else:
                ctx.parent_results = None  # type: ignore[assignment] # read in _attempt
            add = self.deps.add_steps
            if add is not None and not self._isolated(definition):
                token, wf_id = job.lease_token or "", job.workflow_id

                async def _add(steps: Sequence[Any]) -> list[Job]:
                    return await add(wf_id, job.id, token, steps)

                ctx._add_steps = _add
        attach_steps(ctx, job, self.store, self.deps.now)
        attach_audit(ctx, job, self.deps.audit)
        task = asyncio.create_task(self._execute(job, ctx, definition))
        self._running[job.id] = _Running(job, ctx, task)

    # -- execution -----------------------------------------------------------------
    async def _execute(self, job: Job, ctx: JobContext, definition: JobDefinition) -> None:
        """Run one attempt and queue its outcome. Whatever the handler does, this
        records an outcome (or, on shutdown with the code still running, none: the
        lease then expires and the rescuer takes over) and frees the slot."""
        started = time.perf_counter()
        entry = self._running[job.id]
        finish: Finish | None
        span = tracing.start_job(job)  # None while tracing is off
        if self._debug_jobs:
            log.debug("job_started", job_id=job.id, worker_id=self.id, job_type=job.job_type)
        try:
            finish = await self._attempt(job, ctx, definition)
        except BaseException as exc:  # noqa: BLE001 - the outcome path itself must not fail
            log.error(
                "job_outcome_unrecorded",
                job_id=job.id,
                worker_id=self.id,
                error=describe(exc),
            )
            finish = Finish(
                job.id,
                job.lease_token or "",
                Action.FAIL,
                error="internal error while recording the outcome: " + describe(exc),
            )
        if finish is not None and finish.action is Action.RETRY and not entry.abandoned:
            finish = await heal_finish(finish, job, definition, entry.error)
        self._running.pop(job.id, None)
        self.processed += 1
        outcome = None if finish is None or entry.abandoned else finish.action.value
        if span is not None:
            tracing.end_job(span, outcome, finish.error if finish is not None else None)
        if self._debug_jobs:
            log.debug(
                "job_finished",
                job_id=job.id,
                worker_id=self.id,
                job_type=job.job_type,
                attempt=job.attempt,
                outcome=outcome or "abandoned",
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        if finish is None or entry.abandoned:
            self._abandoned.add(job.id)
            return  # its code may still run: leave the lease to expire (rescue)
        if self.deps.signals.has_finish_listeners:
            finish = _timed(finish, job.job_type, time.perf_counter() - started)
        self._outbox.append(finish)
        self._outbox_event.set()
        self._tick.set()

    async def _attempt(self, job: Job, ctx: JobContext, definition: JobDefinition) -> Finish | None:
        entry = self._running[job.id]
        timeout = job.timeout_ms / 1000 if job.timeout_ms else definition.timeout
        raised: BaseException
        try:
            if ctx.parent_results is None:  # the batch read failed: this step's own
                ctx.parent_results = (await self.store.parent_results([job.id])).get(job.id, {})
            payload = job.payload
            if self.deps.secrets is not None and has_refs(payload):
                payload, values = await resolve_refs(payload, self.deps.secrets)
                entry.secrets = tuple(values)
            kwargs = definition.validated_payload(payload)
            if self._isolated(definition):
                outcome = await self._run_in_child(job, ctx, definition, kwargs, timeout)
                return self._child_outcome(job, definition, outcome)
            if definition.is_async:
                entry.deadline = _deadline(timeout)
                coro = definition.handler(ctx, **kwargs)
                entry.timeout_cm = asyncio.timeout(timeout)
                async with entry.timeout_cm:  # cheaper than wait_for: no extra task
                    result = await coro
                return self._success(job, definition, result)
            result = await self._run_in_thread(entry, definition, kwargs, timeout)
            if not isinstance(result, _Raised):
                return self._success(job, definition, result)
            raised = result.exc
        except asyncio.CancelledError as exc:
            if entry.cancel_requested or entry.released:
                ctx.cancelled.set()
                if entry.cancel_requested:
                    return Finish(
                        job.id, job.lease_token or "", Action.CONFIRM_CANCEL, error="cancelled"
                    )
                return Finish(job.id, job.lease_token or "", Action.RELEASE)
            # Not a cancel, timeout or shutdown of ours: the handler raised it, or
            # cancelled its own task. An ordinary failure of this attempt.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            raised = exc
        except TimeoutError as exc:
            cm = entry.timeout_cm
            if entry.timed_out or (cm is not None and cm.expired()):
                ctx.cancelled.set()
                raised = JobTimeout(f"job timed out after {timeout}s")
            else:
                raised = exc  # the handler's own (a socket, its own wait_for...)
        except ValidationError as exc:
            raised = Permanent(str(exc))
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too:
            # whatever a handler raises is that attempt's failure, never the worker's.
            raised = exc
        return await self._failure_off_loop(job, definition, raised)

    async def _failure_off_loop(
        self, job: Job, definition: JobDefinition, exc: BaseException
    ) -> Finish:
        """``_failure`` without trusting the exception. Describing and classifying
        it runs its code (``__str__``, ``isinstance`` through a ``__class__``
        property, a ``Retry`` delay's ``__float__``...): unless it is a builtin
        exception with plain arguments, that runs in a side thread for at most
        ``DESCRIBE_TIMEOUT`` seconds, so no exception can freeze the event loop
        (and with it the heartbeats of every running job)."""
        if (
            id(type(exc)) in _SAFE_EXCEPTIONS
            and all(id(type(a)) in _PLAIN_ARGS for a in exc.args)
            and exc.__cause__ is None  # a chained one is described in the traceback
            and exc.__context__ is None
        ):
            return self._failure(job, definition, exc)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Finish] = loop.create_future()

        def describe_it() -> None:
            finish: Finish | None = None
            error: BaseException | None = None
            try:
                finish = self._failure(job, definition, exc, quiet=True)
            except BaseException as err:  # noqa: BLE001 - reported through the future
                error = err
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, done, finish, error)

        # A daemon thread of its own (in the job's context: its log lines name its
        # trace): one whose __str__ never returns is left behind without holding a
        # pool slot that later failures need, nor the process's exit.
        threading.Thread(
            target=tracing.in_context(describe_it), name="conveyor-describe", daemon=True
        ).start()
        try:
            finish = await asyncio.wait_for(asyncio.shield(done), DESCRIBE_TIMEOUT)
            if finish.action is Action.FAIL:
                self._log_dead_lettered(job, finish.error)
            return finish
        except Exception:  # noqa: BLE001 - a timeout or a raise
            name = safe_text(_class_name(exc), 200)
            text = f"{name}: <its text did not come within {DESCRIBE_TIMEOUT:g} s>"
            # Its class is read without running its code: a Permanent stays permanent.
            permanent = issubclass(type(exc), (Permanent, *definition.retry.permanent_errors))
            stand_in = Permanent(text) if permanent else HandlerFailure(text)
            return self._failure(job, definition, stand_in)

    async def _run_in_thread(
        self,
        entry: _Running,
        definition: JobDefinition,
        kwargs: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109 - the job's own, enforced in here
    ) -> Any:
        """Run a sync handler in the pool. The timeout counts from the moment the
        thread really starts it. A timed-out or cancelled handler's outcome is
        written only once its thread has returned: until then the job stays
        ``running`` (it is), so it is never started twice at once."""
        loop = asyncio.get_running_loop()
        began = asyncio.Event()
        ctx = entry.ctx

        def call() -> Any:
            loop.call_soon_threadsafe(began.set)
            try:
                return definition.handler(ctx, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - StopIteration can't cross a Future
                return _Raised(exc)

        cf = self._threads.submit(tracing.in_context(call))
        fut = asyncio.wrap_future(cf)
        waiter = asyncio.ensure_future(began.wait())
        try:
            try:
                await asyncio.wait({waiter, fut}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        except asyncio.CancelledError:
            if cf.cancel():
                raise  # it never started
            await self._outlive(entry, fut)
            raise
        entry.deadline = _deadline(timeout)
        entry.timeout_cm = asyncio.timeout(timeout)
        try:
            async with entry.timeout_cm:
                return await asyncio.shield(fut)
        except (TimeoutError, asyncio.CancelledError):
            await self._outlive(entry, fut)
            raise

    async def _outlive(self, entry: _Running, fut: asyncio.Future[Any]) -> None:
        """Wait for a sync handler's thread after its timeout or cancel."""
        entry.ctx.cancelled.set()
        if fut.done():
            return
        entry.stuck_since = time.monotonic()
        log.warning(
            "job_handler_still_running",
            job_id=entry.job.id,
            worker_id=self.id,
            job_type=entry.job.job_type,
            reason="cancel" if entry.cancel_requested else "timeout or shutdown",
        )
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                raise
            # Shutdown past its grace: the thread still runs the handler. No outcome
            # is written; the lease expires and the job is rescued as after a crash.
            entry.abandoned = True
            raise
        except BaseException:  # noqa: BLE001 - its own outcome no longer counts
            pass
        finally:
            entry.stuck_since = None

    def _isolated(self, definition: JobDefinition) -> bool:
        if is_internal(definition.job_type):
            return False  # Conveyor's own jobs (webhook deliveries) run in this process
        mode = definition.isolation or self.isolation
        return mode == "process"

    async def _run_in_child(
        self,
        job: Job,
        ctx: JobContext,
        definition: JobDefinition,
        kwargs: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109 - the job's own, enforced in here
    ) -> Any:
        pool = self._child_pool()
        from conveyor.runtime.isolation import ChildJob

        handler, permanent_errors = self._child_specs[job.job_type]
        child_job = ChildJob(  # the child builds the same JobContext from these
            *(ctx.job_id, ctx.job_type, ctx.attempt, ctx.max_retries, ctx.queue),
            *(ctx.worker_id, ctx.metadata),
            payload=_as_json(kwargs, job.payload),
            handler=handler,
            is_async=definition.is_async,
            permanent_errors=permanent_errors,
            workflow=None
            if ctx.workflow_id is None
            else {
                "workflow_id": ctx.workflow_id,
                "step_name": ctx.step_name,
                "parent_results": ctx.parent_results,
            },
            checkpoint=ctx.last_checkpoint,
            secrets=self._running[job.id].secrets,
        )
        entry = self._running[job.id]
        entry.deadline = _deadline(timeout)
        try:
            return await pool.run(child_job, timeout, child_calls(ctx))
        except TimeoutError:
            entry.timed_out = True  # the pool's own: it killed the child
            raise
        except asyncio.CancelledError:
            # run() returns or raises only once the child is dead: nothing still runs.
            ctx.cancelled.set()
            raise

    def _child_pool(self) -> Any:
        if self._pool is None:
            from conveyor.runtime.isolation import ProcessPool

            s = self.deps.settings
            self._pool = ProcessPool(
                self.concurrency,
                max_jobs_per_child=s.max_jobs_per_child or None,
                max_memory_mb=s.max_memory_mb or None,
            )
        return self._pool

    def _child_outcome(self, job: Job, definition: JobDefinition, outcome: Any) -> Finish:
        """A child's ``ChildOutcome`` as this worker's finish: the same retry
        decision and error text as if the handler had raised here."""
        if outcome.ok:
            return self._success(job, definition, outcome.result)
        if outcome.crashed:
            log.warning(
                "job_child_crashed",
                job_id=job.id,
                worker_id=self.id,
                job_type=job.job_type,
                exit_code=outcome.exit_code,
                error=scrub(outcome.error, getattr(self._running.get(job.id), "secrets", ())),
            )
        # The child described the exception already (safely, in its own process).
        return self._failure(
            job,
            definition,
            outcome.as_exception(),
            error=outcome.error,
            child_traceback=outcome.traceback,
        )

    def _log_dead_lettered(self, job: Job, error: str | None) -> None:
        log.warning(
            "job_dead_lettered",
            job_id=job.id,
            worker_id=self.id,
            job_type=job.job_type,
            attempt=job.attempt,
            error=error,
        )

    def _success(self, job: Job, definition: JobDefinition, result: Any) -> Finish:
        try:
            result = storable_result(result)
        except ValidationError as exc:  # a result that cannot be stored: permanent failure
            return self._failure(job, definition, Permanent(exc.message))
        entry = self._running.get(job.id)
        if entry is not None and entry.secrets:
            # A handler that returns what it got (an echo, a debug dump) would hand
            # its resolved secrets to anyone who can read results and events.
            result = scrub_json(result, entry.secrets)
        return Finish(job.id, job.lease_token or "", Action.COMPLETE, result=result)

    def _failure(
        self,
        job: Job,
        definition: JobDefinition,
        exc: BaseException,
        *,
        error: str | None = None,
        child_traceback: str | None = None,
        quiet: bool = False,
    ) -> Finish:
        """The finish of an attempt that raised ``exc``. ``quiet``: log nothing (a
        side thread's attempt, whose result may come too late to be used)."""
        entry = self._running.get(job.id)
        if entry is not None:
            entry.error = exc
        secrets = entry.secrets if entry is not None else ()
        # Resolved secrets are masked in the whole text, before it is cut to its
        # stored size: one straddling the cut would be stored in part.
        mask = (lambda text: scrub(text, secrets) or "") if secrets else None
        raised_here = error is None  # else a child described it: its frames are there
        if error is not None:
            error = safe_text(mask(error) if mask is not None else error)
        elif mask is not None:
            error = describe(exc, mask)
        decision = decide(
            exc,
            attempt=job.attempt,
            max_retries=job.max_retries,
            policy=definition.retry,
            rand=self.deps.rand,
            error=error,
        )
        if child_traceback is not None:
            trace: str | None = cut_traceback(child_traceback, mask)
        else:
            trace = traceback_text(exc, mask) if raised_here else None
        retry_at = (
            self.deps.now() + timedelta(seconds=decision.delay)
            if decision.action is Action.RETRY
            else None
        )
        if decision.action is Action.FAIL and not quiet:
            self._log_dead_lettered(job, decision.error)
        return Finish(
            job.id,
            job.lease_token or "",
            decision.action,
            error=decision.error,
            retry_at=retry_at,
            error_type=_class_name(exc),
            traceback=trace,
        )

    # -- completion writes ------------------------------------------------------------
    async def _flusher(self) -> None:
        backoff = 0.05
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            if self._outbox:
                batch, self._outbox = self._outbox, []
                written, unwritten, error = await self._write(batch)
                if written:
                    self.deps.signals.events_written()
                    if any(ok and f.action is Action.COMPLETE for f, ok in written):
                        # A completion may have made dependent jobs (workflow steps)
                        # ready in the same transaction: look for them now.
                        self.deps.signals.notify_listeners()
                    elif self._limited:  # a finish just committed may free a limit's slot
                        self._tick.set()
                for f, ok in written:
                    if not ok:
                        log.warning(
                            "stale_lease_rejected",
                            job_id=f.job_id,
                            action=f.action.value,
                            worker_id=self.id,
                        )
                    self.deps.signals.emit_finished(f, ok)
                if unwritten:
                    # The store is failing (not one row): keep the outcomes, the jobs
                    # stay leased to us until written.
                    log.warning(
                        "finish_failed",
                        worker_id=self.id,
                        error=safe_text(error, 500),
                        batch=len(unwritten),
                    )
                    self._outbox[:0] = unwritten
                    self._outbox_event.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
            if self._stopping.is_set() and not self._running and not self._outbox:
                self._flushed.set()
                return

    async def _write(
        self, batch: list[Finish]
    ) -> tuple[list[tuple[Finish, bool]], list[Finish], BaseException | None]:
        """Write ``batch``; returns (written with acceptance, unwritten, last error).

        A batch the store refuses is split in halves until the offending outcome is
        alone; that one is replaced by a plain failure saying why it could not be
        stored, so one bad outcome never holds back the others. Only when even that
        plain failure can't be written (the store itself is down) does anything
        stay unwritten.
        """
        written: list[tuple[Finish, bool]] = []
        chunks = [batch]
        while chunks:
            chunk = chunks.pop(0)
            try:
                accepted = await self.store.finish_many(chunk, self.deps.now())
            except Exception as exc:  # noqa: BLE001 - isolate the row, keep the worker alive
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    chunks[:0] = [chunk[:mid], chunk[mid:]]
                    continue
                fallback = _unstorable(chunk[0], exc)
                if fallback is None:
                    return written, [f for c in [chunk, *chunks] for f in c], exc
                try:  # once more alone: a passing fault must not fail a good outcome
                    accepted = await self.store.finish_many(chunk, self.deps.now())
                    written.extend(zip(chunk, accepted, strict=True))
                    continue
                except Exception:  # noqa: BLE001 - it is this row
                    pass
                try:
                    accepted = await self.store.finish_many([fallback], self.deps.now())
                except Exception:  # noqa: BLE001 - the store itself is failing
                    return written, [f for c in [chunk, *chunks] for f in c], exc
                log.error(
                    "job_outcome_unstorable",
                    job_id=chunk[0].job_id,
                    worker_id=self.id,
                    action=chunk[0].action.value,
                    error=fallback.error,
                )
                chunk = [fallback]
            written.extend(zip(chunk, accepted, strict=True))
        return written, [], None

    async def _drain(self) -> None:
        """Graceful stop: let running jobs finish within the grace period, then stop
        the rest. A job whose code has stopped is handed back (``released``); one
        whose code still runs (a sync handler's thread, a handler that ignores
        cancellation) is *abandoned*: no outcome is written, its lease expires with
        this process and the rescuer re-runs it as after a crash, so it never runs
        twice at once."""
        grace = self.deps.settings.shutdown_grace
        deadline = time.monotonic() + grace
        while self._running and not self._force_stop and time.monotonic() < deadline:
            tasks = [r.task for r in self._running.values()]
            await asyncio.wait(tasks, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if self._running:
            log.warning("worker_releasing_jobs", worker_id=self.id, jobs=len(self._running))
            for _ in range(2):  # the second cancel interrupts waits for stuck threads
                for entry in list(self._running.values()):
                    entry.released = True
                    entry.ctx.cancelled.set()
                    entry.task.cancel()
                pending = [r.task for r in self._running.values()]
                if pending:
                    await asyncio.wait(pending, timeout=STOP_WAIT)
            for job_id, entry in list(self._running.items()):
                entry.abandoned = True
                self._running.pop(job_id, None)
                self._abandoned.add(job_id)
            if self.abandoned:
                log.error(
                    "worker_abandoned_jobs",
                    worker_id=self.id,
                    jobs=self.abandoned,
                    note="their code still runs; the process must exit, they are rescued",
                )
        self._outbox_event.set()

    # -- heartbeats, cancels, maintenance ---------------------------------------------
    def stuck_jobs(self) -> int:
        """Jobs whose handler was asked to stop (timeout, cancel) or is past its
        timeout by ``STUCK_AFTER`` seconds, and still runs."""
        now = time.monotonic()
        return sum(
            1
            for r in self._running.values()
            if r.stuck_since is not None
            or (r.deadline is not None and now > r.deadline + STUCK_AFTER)
        )

    def _check_stuck(self) -> None:
        stuck = self.stuck_jobs()
        if not stuck:
            return
        limit = self.deps.settings.max_stuck_jobs or self.concurrency
        log.warning("worker_stuck_handlers", worker_id=self.id, stuck=stuck, limit=limit)
        if stuck >= limit and not self._stopping.is_set():
            # Its slots are held by code that won't stop: exit so the supervisor
            # starts a fresh process; the stuck jobs are rescued, never run twice.
            log.error("worker_stopping_stuck", worker_id=self.id, stuck=stuck)
            self.request_stop()
            self._force_stop = True

    async def _heartbeat_loop(self) -> None:
        interval = self.deps.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self._check_stuck()
            try:
                cancel_ids = await self.store.heartbeat(
                    self.id, len(self._running), self.deps.now(), self.stuck_jobs()
                )
            except Exception as exc:  # noqa: BLE001 - keep the worker alive
                log.warning("heartbeat_failed", worker_id=self.id, error=str(exc))
                continue
            for job_id in cancel_ids:
                self.cancel_local(job_id)

    def cancel_local(self, job_id: str) -> bool:
        """Stop a job running here because its cancel was requested."""
        entry = self._running.get(job_id)
        if entry is None or entry.cancel_requested:
            return False
        entry.cancel_requested = True
        entry.ctx.cancelled.set()
        entry.task.cancel()
        log.info("job_cancel_delivered", job_id=job_id, worker_id=self.id)
        return True

    async def _maintenance_loop(self) -> None:
        s = self.deps.settings
        last_prune = 0.0
        # One process of the fleet runs the passes; if it dies another takes over
        # after heartbeat_timeout, as dead workers' jobs are rescued after it.
        lease = self._maintenance_lease = Leadership(
            self.store, MAINTENANCE_LEADER, ttl=s.heartbeat_timeout, clock=self.deps.now
        )
        while True:
            await asyncio.sleep(s.heartbeat_interval)
            try:
                if not await lease.hold():
                    continue
                rescued = await self.store.rescue(
                    heartbeat_timeout=s.heartbeat_timeout,
                    max_lost=s.max_lost,
                    now=self.deps.now(),
                )
                for r in rescued:
                    log.warning(
                        "job_rescued",
                        job_id=r.job_id,
                        worker_id=self.id,
                        lost_worker=r.worker_id,
                        action=r.action.value,
                    )
                if rescued:
                    self.deps.signals.notify_listeners()
                    if self.deps.signals.observing:
                        self.deps.signals.observe(JobsRescued(rescued))
                if time.monotonic() - last_prune > 60:
                    last_prune = time.monotonic()
                    pruned = await self.store.prune(
                        self.deps.now() - timedelta(seconds=s.retention)
                    )
                    if not s.job_dead_letter:  # the DLQ is off: failures go like the rest
                        pruned += await prune_dead_letters(
                            self.store,
                            self.deps.now() - timedelta(seconds=s.retention),
                            self.deps.now(),
                        )
                    if pruned:
                        log.info("jobs_pruned", worker_id=self.id, count=pruned)
                    # Old secret versions past CONVEYOR_SECRETS_RETENTION (docs/security.md).
                    replaced = await self.store.prune_secret_versions(
                        self.deps.now() - timedelta(seconds=s.secrets_retention)
                    )
                    if replaced:
                        log.info("secret_versions_pruned", worker_id=self.id, count=replaced)
                    windows = await self.store.prune_flow_windows(self.deps.now())
                    if windows:
                        log.info("flow_windows_pruned", worker_id=self.id, count=windows)
            except Exception as exc:  # noqa: BLE001 - keep the worker alive
                log.warning("maintenance_failed", worker_id=self.id, error=str(exc))
