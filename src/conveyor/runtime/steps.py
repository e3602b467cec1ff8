"""Durable steps, checkpoints and heal-before-retry: the runtime side.

A handler's ``ctx.step(name, fn, *args, **kwargs)`` runs ``fn`` once per job:
its JSON result is stored (fenced by the attempt's lease token), and any later
attempt of the same job (a retry, a rescue after a crash) gets the stored
result back without running ``fn`` again. ``ctx.checkpoint(state)`` stores one
JSON state per job; ``ctx.last_checkpoint`` reads it back.

Where the store is reached from depends on where the handler runs:

- in the worker's process (async handlers on its event loop, sync handlers in
  its thread pool): :class:`LocalSteps` calls the store on the worker's loop;
- in a child process (``isolation="process"``): the child asks the worker
  over its socket (:class:`conveyor.runtime.isolation.ChildSteps`), and the
  worker answers with a :class:`LocalSteps` (see :func:`child_calls`).

``ctx.step`` and ``ctx.checkpoint`` work in both kinds of handlers: called
where an event loop runs (an async handler) they return an awaitable; called
from a thread without a running loop (a sync handler) they do the work and
return the value themselves.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import dataclasses
import inspect
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import structlog

from conveyor.domain.errors import ConfigurationError, FieldError, LeaseLost, ValidationError
from conveyor.domain.limits import safe_text
from conveyor.security.redact import redact
from conveyor.storage.codec import MAX_RESULT_BYTES, dumps, roundtrip, storable_result

log = structlog.get_logger("conveyor.steps")

#: Longest step name, in characters.
MAX_STEP_NAME = 200
#: Largest checkpoint, in bytes of JSON (the same limit as a result).
MAX_CHECKPOINT_BYTES = MAX_RESULT_BYTES
#: Heals per job when ``@app.job(heal=...)`` gives no ``max_heals``.
DEFAULT_MAX_HEALS = 3
#: Most heals a job type may allow.
MAX_HEALS_LIMIT = 100
#: Seconds a heal function gets; past that the retry goes ahead unhealed.
HEAL_TIMEOUT = 30.0


def step_name_error(name: object) -> str | None:
    """Why ``name`` can't name a durable step, or ``None`` when it can."""
    if type(name) is not str or not name:
        return "must be a non-empty string"
    if len(name) > MAX_STEP_NAME:
        return f"must be at most {MAX_STEP_NAME} characters"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "must not contain NUL or other control characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def check_step_name(name: object) -> str:
    problem = step_name_error(name)
    if problem is not None:
        raise ValidationError(
            f"step name {safe_text(repr(name), 80)} {problem}", [FieldError("name", problem)]
        )
    assert isinstance(name, str)
    return name


def encode_checkpoint(state: Any) -> Any:
    """``state`` as stored (JSON values only), or ``ValidationError`` saying why not."""
    text = dumps(state, "checkpoint")
    if len(text.encode()) > MAX_CHECKPOINT_BYTES:
        raise ValidationError(
            f"checkpoint is more than {MAX_CHECKPOINT_BYTES} bytes of JSON: "
            "store large data elsewhere and checkpoint a reference",
            [FieldError("checkpoint", "too large")],
        )
    return roundtrip(state, "checkpoint")


def lease_lost(job_id: str, what: str) -> LeaseLost:
    return LeaseLost(
        f"{what} of job {job_id} was not stored: this attempt no longer holds the job's "
        "lease (it was rescued after a missed heartbeat, cancelled or finished "
        "elsewhere); the attempt ends here"
    )


class StepPort(Protocol):
    """What a ``JobContext`` needs from wherever its store is."""

    job_id: str

    async def load(self) -> dict[str, Any]: ...
    async def save(self, name: str, result: Any) -> bool: ...
    async def save_checkpoint(self, state: Any) -> bool: ...
    def load_sync(self) -> dict[str, Any]: ...
    def save_sync(self, name: str, result: Any) -> bool: ...
    def save_checkpoint_sync(self, state: Any) -> bool: ...


class StoreLike(Protocol):
    async def save_step(
        self, job_id: str, lease_token: str, name: str, result: Any, now: datetime
    ) -> bool: ...
    async def job_steps(self, job_id: str) -> dict[str, Any]: ...
    async def save_checkpoint(
        self, job_id: str, lease_token: str, state: Any, now: datetime
    ) -> bool: ...


class LocalSteps:
    """Steps of one attempt, stored through ``store`` on the worker's event loop
    ``loop``. The ``*_sync`` methods are for threads (they block until the loop
    has done the write) and must not be called on ``loop`` itself."""

    def __init__(
        self,
        store: StoreLike,
        job_id: str,
        lease_token: str,
        clock: Callable[[], datetime],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.lease_token = lease_token
        self.clock = clock
        self.loop = loop

    async def load(self) -> dict[str, Any]:
        return await self.store.job_steps(self.job_id)

    async def save(self, name: str, result: Any) -> bool:
        return await self.store.save_step(self.job_id, self.lease_token, name, result, self.clock())

    async def save_checkpoint(self, state: Any) -> bool:
        return await self.store.save_checkpoint(self.job_id, self.lease_token, state, self.clock())

    def _blocking(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def load_sync(self) -> dict[str, Any]:
        return dict(self._blocking(self.load()))

    def save_sync(self, name: str, result: Any) -> bool:
        return bool(self._blocking(self.save(name, result)))

    def save_checkpoint_sync(self, state: Any) -> bool:
        return bool(self._blocking(self.save_checkpoint(state)))


def in_event_loop() -> bool:
    """Whether an event loop runs in this thread (an async handler called us)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Detached:
    """The port of a context no worker made (a handler called directly in a test):
    steps and checkpoints live in the context only, and nothing is fenced."""

    job_id = ""

    async def load(self) -> dict[str, Any]:
        return {}

    async def save(self, name: str, result: Any) -> bool:
        return True

    async def save_checkpoint(self, state: Any) -> bool:
        return True

    def load_sync(self) -> dict[str, Any]:
        return {}

    def save_sync(self, name: str, result: Any) -> bool:
        return True

    def save_checkpoint_sync(self, state: Any) -> bool:
        return True


class Steps:
    """The durable-step state of one attempt (held by its ``JobContext``).
    ``port`` None: a context made by hand, whose steps live in memory only."""

    def __init__(self, port: StepPort | None) -> None:
        self.port = port
        self.done: dict[str, Any] | None = None  # stored results, loaded on first use
        # Concurrent calls with one name (asyncio.gather, threads) take turns: the
        # second finds the first's stored result instead of running fn again.
        # name -> (its lock, how many calls hold or wait for it): dropped when the
        # last one leaves, so a loop of many step names keeps no lock per name.
        self._running: dict[str, tuple[asyncio.Lock, int]] = {}
        self._running_sync: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    def _port(self) -> StepPort:
        return _Detached() if self.port is None else self.port

    # -- async (an async handler) ---------------------------------------------------
    async def step(self, name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        check_step_name(name)
        turn, users = self._running.get(name, (asyncio.Lock(), 0))
        self._running[name] = (turn, users + 1)
        try:
            async with turn:
                return await self._step(name, fn, args, kwargs)
        finally:
            turn, users = self._running[name]
            if users == 1:
                del self._running[name]
            else:
                self._running[name] = (turn, users - 1)

    async def _step(self, name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        port = self._port()
        if self.done is None:
            self.done = await port.load()
        if name in self.done:
            return self.done[name]
        result = await _call_async(fn, args, kwargs)
        value = roundtrip(storable_result(result), "result")
        if not await port.save(name, value):
            raise lease_lost(port.job_id, f"step {name!r}")
        self.done[name] = value
        return value

    async def checkpoint(self, state: Any) -> Any:
        value = encode_checkpoint(state)
        port = self._port()
        if not await port.save_checkpoint(value):
            raise lease_lost(port.job_id, "the checkpoint")
        return value

    # -- sync (a sync handler, in its thread) ---------------------------------------
    def step_sync(self, name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        check_step_name(name)
        with self._guard:
            lock, users = self._running_sync.get(name, (threading.Lock(), 0))
            self._running_sync[name] = (lock, users + 1)
        try:
            with lock:
                return self._step_sync(name, fn, args, kwargs)
        finally:
            with self._guard:
                lock, users = self._running_sync[name]
                if users == 1:
                    del self._running_sync[name]
                else:
                    self._running_sync[name] = (lock, users - 1)

    def _step_sync(self, name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        port = self._port()
        if self.done is None:
            self.done = port.load_sync()
        if name in self.done:
            return self.done[name]
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
        value = roundtrip(storable_result(result), "result")
        if not port.save_sync(name, value):
            raise lease_lost(port.job_id, f"step {name!r}")
        self.done[name] = value
        return value

    def checkpoint_sync(self, state: Any) -> Any:
        value = encode_checkpoint(state)
        port = self._port()
        if not port.save_checkpoint_sync(value):
            raise lease_lost(port.job_id, "the checkpoint")
        return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def in_thread(
    fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[asyncio.Future[Any], threading.Thread]:
    """``fn(*args, **kwargs)`` in a new daemon thread (with this context's
    variables); the future gets its result or exception. Not a pool: code that
    never returns holds only its own thread, never one that asyncio (DNS
    lookups) or the next job needs, and never holds up the process's exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return  # its waiter gave up (a timeout)
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, context.run(fn, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    thread = threading.Thread(target=run, name="conveyor-step", daemon=True)
    thread.start()
    return fut, thread


async def _call_async(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """``fn`` called from an async handler: awaited if it is async, else run in a
    thread so that the event loop (and every other job's heartbeat) goes on. A
    cancel (timeout, job cancel, shutdown) waits for that thread to return: the
    attempt's code must have stopped before its outcome is written."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    fut, thread = in_thread(fn, *args, **kwargs)
    cancelled = False
    try:
        while True:
            try:
                result = await asyncio.shield(fut)
                break
            except asyncio.CancelledError:
                if fut.done():
                    raise
                cancelled = True  # keep waiting for the thread, then end as cancelled
    finally:
        if fut.done():
            # It handed its outcome over and is ending: gone before the job ends
            # (a child process counts the threads a job leaves behind).
            thread.join(1.0)
    if cancelled:
        raise asyncio.CancelledError
    if inspect.isawaitable(result):
        result = await result
    return result


# -- heal before retry ----------------------------------------------------------------


def check_heal(job_type: str, heal: Any, max_heals: Any) -> None:
    """``ConfigurationError`` unless ``heal`` is None or callable and ``max_heals`` an
    integer from 0 to ``MAX_HEALS_LIMIT``."""
    if heal is not None and not callable(heal):
        raise ConfigurationError(f"heal of job type {job_type!r} must be a function")
    if type(max_heals) is not int or not 0 <= max_heals <= MAX_HEALS_LIMIT:
        raise ConfigurationError(
            f"max_heals of job type {job_type!r} must be an integer from 0 to {MAX_HEALS_LIMIT}"
        )


async def run_heal(
    heal: Callable[..., Any],
    payload: dict[str, Any],
    error: BaseException,
    attempt: int,
    validate: Callable[[dict[str, Any]], Any],
    *,
    job_id: str,
    timeout: float = HEAL_TIMEOUT,  # noqa: ASYNC109 - bounds user code, enforced here
) -> dict[str, Any] | None:
    """The healed payload for the next attempt, or ``None`` to keep the old one.

    Never raises (but ``CancelledError``): a heal that raises, overruns
    ``timeout`` seconds or returns something that is not a valid payload (a
    mapping that passes ``validate`` and JSON) is logged and counts as ``None``.
    A sync ``heal`` runs in a thread; it may go on running past the timeout (its
    result is then ignored).
    """
    started = time.monotonic()
    try:
        copy = roundtrip(payload)
        if inspect.iscoroutinefunction(heal):
            async with asyncio.timeout(timeout):
                new = await heal(copy, error, attempt)
        else:
            new = await asyncio.wait_for(in_thread(heal, copy, error, attempt)[0], timeout)
            if inspect.isawaitable(new):
                async with asyncio.timeout(max(0.0, timeout - (time.monotonic() - started))):
                    new = await new
        if new is None:
            return None
        if not isinstance(new, dict):
            raise ValidationError(
                f"heal must return a dict (the new payload) or None, not {type(new).__name__}"
            )
        validate(new)
        return dict(roundtrip(new))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken heal must never stop the retry
        log.warning(
            "job_heal_failed",
            job_id=job_id,
            attempt=attempt,
            error_type=_class_name(exc),
            error=await _describe(exc),
            note="the retry goes ahead with the payload it had",
        )
        return None


#: Seconds a heal's exception gets to describe itself (its ``__str__``), off the loop.
HEAL_DESCRIBE_TIMEOUT = 1.0
#: Characters of a heal's error message kept in the log line.
HEAL_ERROR_CHARS = 500

#: Exception classes (builtins and ours) whose text runs no user code when their
#: arguments are plain values (by class id: a metaclass can't interfere).
_PLAIN_ARGS = frozenset(id(t) for t in (str, int, float, bool, type(None), bytes))
_SAFE_EXCEPTIONS = frozenset(
    id(t)
    for t in (*vars(builtins).values(), ValidationError)
    if isinstance(t, type) and issubclass(t, BaseException)
)


def _class_name(exc: BaseException) -> str:
    # The class's own name through type's descriptor: no metaclass code runs.
    return safe_text(type.__dict__["__name__"].__get__(type(exc), type), 200)


async def _describe(exc: BaseException) -> str:
    """``"Type: message"``, redacted and at most ``HEAL_ERROR_CHARS`` characters.
    A user-defined exception's ``__str__`` runs in a daemon thread for at most
    ``HEAL_DESCRIBE_TIMEOUT`` seconds: a hostile one can't stall the event loop."""
    name = _class_name(exc)
    plain = id(type(exc)) in _SAFE_EXCEPTIONS and all(id(type(a)) in _PLAIN_ARGS for a in exc.args)
    if plain:
        text = safe_text(exc, HEAL_ERROR_CHARS)
    else:
        try:
            fut, _ = in_thread(safe_text, exc, HEAL_ERROR_CHARS)
            text = await asyncio.wait_for(fut, HEAL_DESCRIBE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except BaseException:  # noqa: BLE001 - a timeout: the class name must do
            return f"{name}: <its text did not come within {HEAL_DESCRIBE_TIMEOUT:g} s>"
    return redact(safe_text(f"{name}: {text}" if text else name, HEAL_ERROR_CHARS))


# -- the worker's hooks ---------------------------------------------------------------


def attach_steps(ctx: Any, job: Any, store: StoreLike, clock: Callable[[], datetime]) -> None:
    """Give ``ctx`` (a ``JobContext`` of a fetched ``job``) its checkpoint and durable
    steps, stored through ``store`` on the running event loop."""
    ctx.last_checkpoint = job.checkpoint
    port = LocalSteps(store, job.id, job.lease_token or "", clock, asyncio.get_running_loop())
    ctx._steps = Steps(port)


async def heal_finish(finish: Any, job: Any, definition: Any, error: BaseException | None) -> Any:
    """``finish`` (a ``Finish`` with ``Action.RETRY``) with the payload the job type's
    heal returns, while the job has heals left (``payload_version - 1 <
    max_heals``); else ``finish`` itself. Never raises: the retry is recorded
    whatever the heal does (a cancel during the heal keeps the old payload)."""
    heal = definition.heal
    if heal is None or job.payload_version - 1 >= definition.max_heals:
        return finish
    try:
        new = await run_heal(
            heal,
            job.payload,
            error if error is not None else RuntimeError(finish.error or "failed"),
            job.attempt,
            definition.validate_payload,
            job_id=job.id,
            timeout=HEAL_TIMEOUT,
        )
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return finish
    except BaseException:  # noqa: BLE001 - run_heal logs; the retry must be recorded
        return finish
    if new is None:
        return finish
    log.info("job_healed", job_id=job.id, payload_version=job.payload_version + 1)
    return dataclasses.replace(finish, payload=new)


def child_calls(ctx: Any) -> Callable[[dict[str, Any]], Awaitable[Any]] | None:
    """What answers the calls ``ctx.step`` / ``ctx.checkpoint`` make from a child
    process (``isolation="process"``): the attempt's own ``LocalSteps``, with the
    child's message checked as any input (it is another process's word)."""
    steps = ctx._steps
    port = steps.port if isinstance(steps, Steps) else None
    if port is None:
        return None

    async def on_call(message: dict[str, Any]) -> Any:
        if message.get("job_id") != port.job_id:
            raise ValidationError("a call for another job")
        op = message.get("op")
        if op == "audit" and getattr(ctx, "_audit", None) is not None:
            return await ctx._audit(message)  # checked there (runtime/audit.py)
        if op == "load":
            return await port.load()
        if op == "save":
            name = check_step_name(message.get("name"))
            value = roundtrip(storable_result(message.get("value")), "result")
            if not await port.save(name, value):
                raise lease_lost(port.job_id, f"step {name!r}")
            return None
        if op == "checkpoint":
            if not await port.save_checkpoint(encode_checkpoint(message.get("value"))):
                raise lease_lost(port.job_id, "the checkpoint")
            return None
        raise ValidationError(f"unknown call {safe_text(repr(op), 40)}")

    return on_call
