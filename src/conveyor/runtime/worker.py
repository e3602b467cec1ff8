"""The worker: batch fetch, bounded concurrency, batched completion writes.

Life of a job here: ``fetch`` leases a batch (one transaction), each job runs
as an asyncio task (sync handlers in a thread pool), its outcome goes to a
buffer, and one flusher task writes the buffer with ``finish_many`` (one
transaction per batch, fenced by lease tokens). While a write is in flight new
outcomes pile up, so batches grow with load and cost nothing when idle.

A heartbeat per worker (not per job) keeps its leases alive and brings back
cancel requests. The maintenance loop rescues the jobs of dead workers and
prunes old finished jobs; it is safe to run in every worker at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from conveyor.bus.base import CANCEL_TOPIC, WAKE_TOPIC, Message, Subscription
from conveyor.domain.errors import ConveyorError, Permanent, ValidationError
from conveyor.domain.ids import new_token
from conveyor.domain.job import Finish, Job, WorkerInfo
from conveyor.domain.retry import decide
from conveyor.domain.states import Action
from conveyor.runtime.context import JobContext
from conveyor.runtime.relay import OutboxConsumer, bus_relay, skip_unheard
from conveyor.runtime.webhooks import WebhookDispatcher

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.runtime.registry import JobDefinition

log = structlog.get_logger("conveyor.worker")

#: The in-process bus keeps at most this many entries of the ``events`` stream.
MEMORY_STREAM_MAXLEN = 10_000


class JobTimeout(ConveyorError, TimeoutError):
    """The handler ran longer than the job's timeout (transient: retried)."""


@dataclass
class _Running:
    job: Job
    ctx: JobContext
    task: asyncio.Task[None]
    cancel_requested: bool = False
    released: bool = False


class Worker:
    def __init__(
        self,
        app: Conveyor,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        job_types: Sequence[str] | None = None,
        worker_id: str | None = None,
        maintenance: bool = True,
    ) -> None:
        s = app.settings
        self.app = app
        self.store = app.store
        self.concurrency = concurrency or s.concurrency
        self.queues = tuple(queues or s.queues)
        self.job_types = tuple(job_types or app.registry)
        if not self.job_types:
            raise ConveyorError(
                "This worker has no job types: register handlers with @app.job(...) "
                "before starting it"
            )
        unknown = set(self.job_types) - set(app.registry)
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
        self._threads = ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="conveyor-job"
        )
        self.processed = 0
        self.started = asyncio.Event()
        self._consumers: list[OutboxConsumer] = []

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
    def jobs_running(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Run until ``request_stop``; returns after a graceful shutdown."""
        now = self.app.now()
        await self.store.register_worker(
            WorkerInfo(
                id=self.id,
                host=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
                job_types=self.job_types,
                concurrency=self.concurrency,
            ),
            now,
        )
        self.app.add_listener(self.notify)
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
            self.app.on_events_written(c.wake)
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
            self.app.remove_listener(self.notify)
            self.store.unsubscribe_wakeups(self.notify)
            events_stop.set()
            for c in self._consumers:
                self.app.remove_events_listener(c.wake)
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
                    helpers[0], timeout=max(5.0, self.app.settings.shutdown_grace)
                )
            except (asyncio.CancelledError, TimeoutError):
                # The store would not take the last results: those jobs stay leased to
                # this worker and are rescued (run again) after heartbeat_timeout.
                log.error("worker_results_unsaved", worker_id=self.id, jobs=len(self._outbox))
            for t in helpers[1:]:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            with contextlib.suppress(ConveyorError):
                await self.store.deregister_worker(self.id, self.app.now())
            self._threads.shutdown(wait=False, cancel_futures=True)
            log.info("worker_stopped", worker_id=self.id, processed=self.processed)

    # -- events ------------------------------------------------------------------
    def outbox_consumers(self) -> list[OutboxConsumer]:
        """The outbox relay (to the bus) and the webhook dispatcher, when maintenance is on.
        Every worker runs them; a lease makes one of each active at a time."""
        if not self.maintenance:
            return []
        s = self.app.settings
        options: dict[str, Any] = {"clock": self.app.now, "poll_interval": s.event_poll_interval}
        maxlen = s.event_stream_maxlen
        if self.app.bus.backend == "memory":
            maxlen = min(maxlen, MEMORY_STREAM_MAXLEN)  # it lives in this process's RAM
        dispatcher = WebhookDispatcher(self.app)
        return [
            OutboxConsumer(
                self.store,
                "relay",
                bus_relay(self.app.bus, stream_maxlen=maxlen),
                skip_to=skip_unheard(self.store, self.app.bus),
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
            subscriptions.append(await self.app.bus.subscribe(CANCEL_TOPIC, on_cancel))
            if self.app.bus.backend != "memory":
                subscriptions.append(await self.app.bus.subscribe(WAKE_TOPIC, on_wake))
        except Exception as exc:  # noqa: BLE001 - the worker runs without the bus
            log.warning("bus_subscribe_failed", worker_id=self.id, error=str(exc))
        return subscriptions

    # -- fetch loop ---------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        poll = self.app.settings.poll_interval
        backoff = 0.1
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            got = 0
            if free > 0:
                self._tick.clear()  # before fetching, so an enqueue during fetch re-arms it
                try:
                    jobs = await self.store.fetch(
                        self.id,
                        queues=self.queues,
                        job_types=self.job_types,
                        limit=free,
                        now=self.app.now(),
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
                    self.app.events_written()
                for job in jobs:
                    self._start(job)
                if got == free:
                    continue  # there may be more: fetch again as soon as a slot is free
            else:
                self._tick.clear()
                if len(self._running) < self.concurrency:
                    continue
            await self._idle(poll)

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

    def _start(self, job: Job) -> None:
        definition = self.app.registry[job.job_type]
        ctx = JobContext(
            job_id=job.id,
            job_type=job.job_type,
            attempt=job.attempt,
            max_retries=job.max_retries,
            queue=job.queue,
            worker_id=self.id,
            metadata=job.metadata,
        )
        task = asyncio.create_task(self._execute(job, ctx, definition))
        self._running[job.id] = _Running(job, ctx, task)

    # -- execution -----------------------------------------------------------------
    async def _execute(self, job: Job, ctx: JobContext, definition: JobDefinition) -> None:
        timeout = job.timeout_ms / 1000 if job.timeout_ms else definition.timeout
        finish: Finish
        started = time.perf_counter()
        try:
            definition.validate_payload(job.payload)
            if definition.is_async:
                coro = definition.handler(ctx, **job.payload)
                async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                    result = await coro
            else:
                fut = asyncio.get_running_loop().run_in_executor(
                    self._threads, partial(definition.handler, ctx, **job.payload)
                )
                async with asyncio.timeout(timeout):
                    result = await fut
            finish = self._success(job, definition, result)
        except asyncio.CancelledError:
            entry = self._running.get(job.id)
            ctx.cancelled.set()
            if entry is not None and entry.cancel_requested:
                finish = Finish(
                    job.id, job.lease_token or "", Action.CONFIRM_CANCEL, error="cancelled"
                )
            else:
                finish = Finish(job.id, job.lease_token or "", Action.RELEASE)
        except TimeoutError:
            ctx.cancelled.set()
            finish = self._failure(job, definition, JobTimeout(f"job timed out after {timeout}s"))
        except ValidationError as exc:
            finish = self._failure(job, definition, Permanent(str(exc)))
        except Exception as exc:  # noqa: BLE001 - any handler error is classified, not lost
            finish = self._failure(job, definition, exc)
        self._running.pop(job.id, None)
        self.processed += 1
        if self.app.has_finish_listeners:
            finish = replace(finish, job_type=job.job_type, duration=time.perf_counter() - started)
        self._outbox.append(finish)
        self._outbox_event.set()
        self._tick.set()

    def _success(self, job: Job, definition: JobDefinition, result: Any) -> Finish:
        try:
            orjson.dumps(result)
        except TypeError as exc:  # a result that cannot be stored is a permanent failure
            return self._failure(
                job, definition, Permanent(f"handler result is not JSON-serialisable: {exc}")
            )
        return Finish(job.id, job.lease_token or "", Action.COMPLETE, result=result)

    def _failure(self, job: Job, definition: JobDefinition, exc: BaseException) -> Finish:
        decision = decide(
            exc,
            attempt=job.attempt,
            max_retries=job.max_retries,
            policy=definition.retry,
            rand=self.app.rand,
        )
        retry_at = (
            self.app.now() + timedelta(seconds=decision.delay)
            if decision.action is Action.RETRY
            else None
        )
        if decision.action is Action.FAIL:
            log.warning(
                "job_dead_lettered",
                job_id=job.id,
                job_type=job.job_type,
                attempt=job.attempt,
                error=decision.error,
            )
        return Finish(
            job.id, job.lease_token or "", decision.action, error=decision.error, retry_at=retry_at
        )

    # -- completion writes ------------------------------------------------------------
    async def _flusher(self) -> None:
        backoff = 0.05
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            if self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    accepted = await self.store.finish_many(batch, self.app.now())
                except Exception as exc:  # noqa: BLE001 - keep the worker alive
                    # Keep the outcomes: the jobs stay leased to us until written.
                    log.warning(
                        "finish_failed", worker_id=self.id, error=str(exc), batch=len(batch)
                    )
                    self._outbox[:0] = batch
                    self._outbox_event.set()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                self.app.events_written()
                for f, ok in zip(batch, accepted, strict=True):
                    if not ok:
                        log.warning(
                            "stale_lease_rejected",
                            job_id=f.job_id,
                            action=f.action.value,
                            worker_id=self.id,
                        )
                    self.app.emit_finished(f, ok)
            if self._stopping.is_set() and not self._running and not self._outbox:
                self._flushed.set()
                return

    async def _drain(self) -> None:
        """Graceful stop: let running jobs finish within the grace period, release the rest."""
        grace = self.app.settings.shutdown_grace
        deadline = time.monotonic() + grace
        while self._running and not self._force_stop and time.monotonic() < deadline:
            tasks = [r.task for r in self._running.values()]
            await asyncio.wait(tasks, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        if self._running:
            log.warning("worker_releasing_jobs", worker_id=self.id, jobs=len(self._running))
            for entry in list(self._running.values()):
                entry.released = True
                entry.ctx.cancelled.set()
                entry.task.cancel()
            await asyncio.gather(
                *(r.task for r in list(self._running.values())), return_exceptions=True
            )
        self._outbox_event.set()

    # -- heartbeats, cancels, maintenance ---------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.app.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                cancel_ids = await self.store.heartbeat(self.id, len(self._running), self.app.now())
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
        s = self.app.settings
        last_prune = 0.0
        while True:
            await asyncio.sleep(s.heartbeat_interval)
            try:
                rescued = await self.store.rescue(
                    heartbeat_timeout=s.heartbeat_timeout,
                    max_lost=s.max_lost,
                    now=self.app.now(),
                )
                for r in rescued:
                    log.warning(
                        "job_rescued",
                        job_id=r.job_id,
                        lost_worker=r.worker_id,
                        action=r.action.value,
                    )
                if rescued:
                    self.app.notify_listeners()
                if time.monotonic() - last_prune > 60:
                    last_prune = time.monotonic()
                    pruned = await self.store.prune(self.app.now() - timedelta(seconds=s.retention))
                    if pruned:
                        log.info("jobs_pruned", count=pruned)
            except Exception as exc:  # noqa: BLE001 - keep the worker alive
                log.warning("maintenance_failed", error=str(exc))
