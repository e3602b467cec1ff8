"""Process isolation: job handlers run in supervised child processes.

A :class:`ProcessPool` keeps up to ``size`` child processes. ``await
pool.run(job, timeout)`` sends one :class:`ChildJob` to a free child and
returns its :class:`ChildOutcome`. Whatever the handler does (raises anything,
calls ``sys.exit`` or ``os._exit``, segfaults, exhausts memory, hangs), only
that attempt fails: the parent's event loop never blocks on a child, a dead
child is replaced, and a child that overruns its timeout or whose ``run()`` is
cancelled is killed (``SIGTERM``, then ``SIGKILL`` after ``kill_grace``
seconds, to its whole process group) and reaped *before* ``run()`` raises. So
a job's code is never still running once ``run()`` has returned or raised.

What crosses the process boundary
---------------------------------
- The handler is found by name: :class:`HandlerRef` is its module and
  qualified name, so a handler must be a module-level function (or a
  ``@app.job`` definition) in an importable module. The child imports that
  module itself, once per child: side effects at import run in every child.
  Lambdas and nested functions are refused with ``ConfigurationError``. A
  script that defines handlers must start its worker under ``if __name__ ==
  "__main__":`` (the child imports the script as ``__mp_main__``).
- ``payload`` and ``metadata`` go in as JSON, the result comes back as JSON
  (it is JSON-roundtripped in the child). A result that is not JSON (an
  object, bytes, a non-finite number, an integer beyond 64 bits, more than
  :data:`MAX_MESSAGE_BYTES`) fails the attempt permanently, with a message
  saying why.
- ``ctx`` is a :class:`~conveyor.runtime.context.JobContext` built in the
  child with ``job_id``, ``job_type``, ``attempt``, ``max_retries``,
  ``queue``, ``worker_id``, ``metadata``, ``logger`` (structlog, configured
  as the child's own imports leave it), ``cancelled`` and ``is_cancelled``.
  ``ctx.cancelled`` is set when the child receives ``SIGTERM`` (timeout,
  cancel or shutdown); an async handler's task is also cancelled then. The
  handler has ``kill_grace`` seconds to stop before ``SIGKILL``.
  ``ctx.step``, ``ctx.checkpoint`` and ``ctx.last_checkpoint`` work too: the
  child sends each store call to the parent as a ``call`` message on its
  socket and blocks for the ``reply`` (:class:`ChildSteps`), which ``run()``'s
  ``on_call`` answers; the checkpoint comes with the job.
- Exceptions come back as text (``error``: ``"Type: message"``, made storable
  and capped at :data:`ERROR_TEXT_LIMIT` bytes; ``traceback``, capped at
  :data:`TRACEBACK_LIMIT`) plus what the retry decision needs: ``Permanent``,
  ``Retry(delay=...)`` and the job type's ``permanent_errors``. Every
  ``BaseException`` (``SystemExit``, ``KeyboardInterrupt``, a
  ``CancelledError`` the handler raised) is that attempt's failure.
- The child sees the parent's ``sys.path`` and working directory. Its
  environment variables are those of the forkserver process, i.e. of the
  parent when the first pool of the process started a child.

Start method: ``forkserver`` (the default where it exists). Children are forked
from a small server process that has imported Conveyor once, so a replacement
child costs a fork (tens of ms) instead of a fresh interpreter importing
Conveyor (0.5-0.9 s), and, unlike plain ``fork``, no child inherits the worker's threads,
event loop, locks or database connections. ``spawn`` is accepted (and is the
fallback where ``forkserver`` does not exist).

Memory: with ``max_memory_mb``, each child limits its data segment
(``RLIMIT_DATA``, or ``RLIMIT_AS`` where that is missing) to what it uses
when idle plus ``max_memory_mb``, so a runaway allocation fails that attempt
with ``MemoryError`` (or the kernel kills only that child); and a child whose
peak resident size (``ru_maxrss``, interpreter and imported modules included)
passed ``max_memory_mb`` after a job, or whose job ran out of memory, is
replaced.

A child that loses its parent (the worker was killed with ``SIGKILL``) kills
its process group and exits, so an orphaned attempt never overlaps the rerun
of the rescued job. A job that returns while threads it started still run ends
its child before ``run()`` returns.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import importlib
import inspect
import math
import multiprocessing
import multiprocessing.util  # its atexit hook must be registered before ours
import os
import re
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from conveyor.domain.errors import (
    ConfigurationError,
    ConveyorError,
    LeaseLost,
    Permanent,
    Retry,
    StoreError,
    ValidationError,
)
from conveyor.domain.limits import clamp_retry_delay
from conveyor.runtime.context import JobContext
from conveyor.runtime.secret_refs import scrub
from conveyor.runtime.steps import Steps

__all__ = [
    "ERROR_TEXT_LIMIT",
    "MAX_MESSAGE_BYTES",
    "TRACEBACK_LIMIT",
    "ChildCrashed",
    "ChildJob",
    "ChildOutcome",
    "HandlerRef",
    "PoolClosed",
    "PoolStats",
    "ProcessPool",
    "safe_text",
]

ERROR_TEXT_LIMIT = 8 * 1024
"""Bytes (UTF-8) kept of an error text; longer ones end with a truncation marker."""
TRACEBACK_LIMIT = 16 * 1024
"""Bytes (UTF-8) kept of a traceback: its end, after a marker saying how much was cut."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message a child may send: bounds a result, and the parent's buffer."""

_HEADER = struct.Struct(">I")
#: Answers a running job's call (``{"kind": "call", "op": ...}``) in the parent.
CallHandler = Callable[[dict[str, Any]], Awaitable[Any]]
_SURROGATES = re.compile("[\ud800-\udfff]")


class ChildCrashed(ConveyorError):
    """The child process running the job died or broke its protocol (transient)."""


class PoolClosed(ConveyorError):
    """``run()`` was called on, or interrupted by, a closed :class:`ProcessPool`."""


# -- data crossing the boundary ---------------------------------------------------------


@dataclass(frozen=True)
class HandlerRef:
    """Where a child finds a handler: ``importlib.import_module(module)``, then
    the attributes of ``qualname`` (dotted) one by one."""

    module: str
    qualname: str

    @classmethod
    def of(cls, fn: Any) -> HandlerRef:
        """The reference of a module-level function or ``@app.job`` definition.

        Raises ``ConfigurationError`` when ``fn`` cannot be found again by name
        (a lambda, a nested function, a ``functools.partial``, a callable
        object, or a name rebound to something else).
        """
        inner = getattr(fn, "handler", fn)
        module = getattr(inner, "__module__", None)
        qualname = getattr(inner, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str):
            raise ConfigurationError(
                f"Handler {fn!r} cannot run in a child process: it has no module and "
                "qualified name. Use a function defined at module level."
            )
        if "<" in qualname:
            raise ConfigurationError(
                f"Handler {module}.{qualname} cannot run in a child process: a lambda or a "
                "function defined inside another one cannot be imported by name. "
                "Define it at module level."
            )
        ref = cls(module, qualname)
        try:
            found = ref.resolve()
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"Handler {module}.{qualname} cannot run in a child process: {exc}"
            ) from exc
        if found is not inner:
            raise ConfigurationError(
                f"Handler {module}.{qualname} cannot run in a child process: that name "
                f"refers to {found!r}, not to this function. Give it its own module-level name."
            )
        return ref

    def resolve(self) -> Callable[..., Any]:
        """Import the module and walk the name; a ``JobDefinition`` gives its ``.handler``.

        Raises ``ConfigurationError`` (cause kept) when the import or a lookup fails.
        """
        return self.resolve_with_payload()[0]

    def resolve_with_payload(
        self,
    ) -> tuple[Callable[..., Any], Callable[[dict[str, Any]], dict[str, Any]] | None]:
        """``resolve()`` and, when the name is a ``JobDefinition``, its
        ``validated_payload`` (so a child's handler gets values coerced to its
        signature, as in a thread)."""
        try:
            obj: Any = importlib.import_module(self.module)
        except BaseException as exc:
            raise ConfigurationError(
                f"cannot import module {self.module!r}: {_describe(exc)}"
            ) from exc
        for part in self.qualname.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as exc:
                raise ConfigurationError(
                    f"module {self.module!r} has no attribute {self.qualname!r}"
                ) from exc
        handler = getattr(obj, "handler", obj)
        if not callable(handler):
            raise ConfigurationError(f"{self.module}.{self.qualname} is not callable")
        validate = getattr(obj, "validated_payload", None) if obj is not handler else None
        return handler, validate if callable(validate) else None


@dataclass(frozen=True)
class ChildJob:
    """One attempt, as sent to a child. Plain data only: it travels as JSON.

    ``permanent_errors`` names exception classes (``"module:qualname"``) the
    job type's retry policy treats as permanent; the child checks them with
    ``isinstance`` and reports ``permanent=True``.
    """

    job_id: str
    job_type: str
    attempt: int
    max_retries: int
    queue: str
    worker_id: str
    metadata: dict[str, Any]
    payload: dict[str, Any]
    handler: HandlerRef
    is_async: bool
    permanent_errors: tuple[str, ...] = ()
    #: For a workflow step: {"workflow_id", "step_name", "parent_results"}.
    workflow: dict[str, Any] | None = None
    #: The job's last checkpoint (``ctx.last_checkpoint`` in the child).
    checkpoint: Any = None
    #: Resolved secret values of the payload: the child masks them in its error
    #: text and traceback before cutting them (the payload holds them anyway).
    secrets: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_type": self.job_type,
            "attempt": self.attempt,
            "max_retries": self.max_retries,
            "queue": self.queue,
            "worker_id": self.worker_id,
            "metadata": self.metadata,
            "payload": self.payload,
            "handler": [self.handler.module, self.handler.qualname],
            "is_async": self.is_async,
            "permanent_errors": list(self.permanent_errors),
            "workflow": self.workflow,
            "checkpoint": self.checkpoint,
            "secrets": list(self.secrets),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ChildJob:
        module, qualname = data["handler"]
        return cls(
            job_id=data["job_id"],
            job_type=data["job_type"],
            attempt=data["attempt"],
            max_retries=data["max_retries"],
            queue=data["queue"],
            worker_id=data["worker_id"],
            metadata=data["metadata"],
            payload=data["payload"],
            handler=HandlerRef(module, qualname),
            is_async=data["is_async"],
            permanent_errors=tuple(data.get("permanent_errors", ())),
            workflow=data.get("workflow"),
            checkpoint=data.get("checkpoint"),
            secrets=tuple(data.get("secrets", ())),
        )


@dataclass(frozen=True)
class ChildOutcome:
    """How one attempt ended in its child.

    ``ok``: ``result`` is the handler's JSON result. Otherwise ``error`` is
    ``"Type: message"`` (storable: lone surrogates replaced, NUL escaped,
    capped at ``ERROR_TEXT_LIMIT`` bytes) and ``error_type`` the class name;
    ``permanent``/``retry_delay`` carry ``Permanent`` and ``Retry(delay=...)``;
    ``crashed`` means the child died (``exit_code``: its status, negative for a
    signal) or broke the protocol. ``pid`` is the child that ran the attempt;
    ``peak_rss_kb`` its peak resident size after the job (``None`` if it died).
    """

    ok: bool
    result: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    permanent: bool = False
    retry_delay: float | None = None
    crashed: bool = False
    exit_code: int | None = None
    pid: int | None = None
    peak_rss_kb: int | None = None

    def as_exception(self) -> BaseException:
        """An exception that ``conveyor.domain.retry.decide`` classifies and
        describes as it would the handler's own: same ``"Type: message"`` text,
        a ``Permanent`` when permanent, a ``Retry`` carrying ``retry_delay``,
        :class:`ChildCrashed` for a crash. ``child_traceback`` holds the text."""
        if self.ok:
            raise ValueError("a successful outcome has no exception")
        name = self.error_type or "Error"
        text = self.error or name
        message = text[len(name) + 2 :] if text.startswith(name + ": ") else text
        if text == name:
            message = ""
        exc: BaseException
        if self.permanent:
            exc = _named_error(name, Permanent)(message)
        elif self.retry_delay is not None:
            retry_cls = cast(type[Retry], _named_error(name, Retry))
            exc = retry_cls(message, delay=self.retry_delay)
        elif self.crashed:
            exc = _named_error(name, ChildCrashed)(message)
        else:
            exc = _named_error(name, _IsolatedError)(message)
        exc.child_traceback = self.traceback  # type: ignore[attr-defined]
        return exc


class _IsolatedError(ConveyorError):
    """Base of the exceptions rebuilt from a child's ordinary (transient) failure."""


@functools.lru_cache(maxsize=256)
def _named_error(name: str, base: type[BaseException]) -> type[BaseException]:
    # A subclass named like the child's exception, so that error texts read the
    # same in process and thread mode ("ValueError: boom").
    return type(name, (base,), {"__module__": __name__, "__qualname__": name})


@dataclass(frozen=True)
class PoolStats:
    """Counters of a pool, for status and metrics."""

    size: int
    alive: int  # children started and not yet reaped
    busy: int  # children running a job now
    started: int  # children started since the pool was made
    jobs: int  # outcomes received (crashes included)
    recycled: int  # children retired after max_jobs_per_child / max_memory_mb
    crashed: int  # children that died or broke the protocol during a job
    killed: int  # children killed at a timeout or a cancellation


# -- text made storable ----------------------------------------------------------------


def safe_text(text: str, limit: int = ERROR_TEXT_LIMIT, *, keep: str = "head") -> str:
    """``text`` made storable: lone surrogates become U+FFFD, NUL becomes
    ``\\x00`` (four characters), and at most ``limit`` UTF-8 bytes are kept,
    with a visible marker saying how many there were. ``keep="tail"`` keeps
    the end (for tracebacks)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATES.sub("\ufffd", text)
        data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    if keep == "tail":
        marker = f"[... {len(data)} bytes in total, the start was cut ...]\n"
        room = max(0, limit - len(marker.encode()))
        return marker + data[len(data) - room :].decode("utf-8", "ignore")
    marker = f" [... truncated: {len(data)} bytes in total]"
    room = max(0, limit - len(marker.encode()))
    return data[:room].decode("utf-8", "ignore") + marker


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` whatever ``str(exc)`` does (it may raise)."""
    name = _type_name(exc)
    try:
        text = str(exc)
    except BaseException as err:  # noqa: BLE001 - a broken __str__ must not break the report
        text = f"<str() of the exception raised {_type_name(err)}>"
    return f"{name}: {text}" if text else name


def _type_name(exc: BaseException) -> str:
    name = getattr(type(exc), "__name__", None)
    return safe_text(name, 200) if isinstance(name, str) and name else "BaseException"


# -- wire format: 4-byte big-endian length, then one JSON object --------------------------


def _frame(message: dict[str, Any]) -> bytes:
    data = orjson.dumps(message)
    return _HEADER.pack(len(data)) + data


# -- the pool (parent side) ---------------------------------------------------------------


class _ProtocolError(Exception):
    """The child died, closed its socket or sent something that is not a message."""

    def __init__(self, reason: str, *, died: bool = False) -> None:
        super().__init__(reason)
        self.died = died


@dataclass(eq=False)
class _Child:
    process: Any  # multiprocessing.process.BaseProcess
    sock: socket.socket
    pid: int
    jobs: int = 0
    grouped: bool = False  # the child leads its own process group (it said hello)
    buffer: bytearray = field(default_factory=bytearray)
    ending: asyncio.Task[None] | None = None
    reaped: bool = False
    exit_code: int | None = None
    # It closed its socket with our message unread (ECONNRESET), so it never
    # started that job.
    unread: bool = False

    def pop_message(self) -> dict[str, Any] | None:
        """The next complete message in the buffer, if any. Raises ``_ProtocolError``."""
        if len(self.buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.buffer)
        if size > MAX_MESSAGE_BYTES + 1024:
            raise _ProtocolError(f"sent a message header announcing {size} bytes")
        end = _HEADER.size + size
        if len(self.buffer) < end:
            return None
        data = bytes(self.buffer[_HEADER.size : end])
        del self.buffer[:end]
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _ProtocolError(f"sent a message that is not JSON ({exc})") from None
        if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
            raise _ProtocolError("sent a message that is not a Conveyor message")
        return message

    def drain(self) -> None:
        """Read whatever the socket holds without waiting (the child is gone)."""
        while len(self.buffer) <= MAX_MESSAGE_BYTES + 1024:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                self.unread = True
                return
            except OSError:  # BlockingIOError included: nothing more
                return
            if not chunk:
                return
            self.buffer += chunk


_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


def _kill_all_at_exit() -> None:
    # multiprocessing's own exit hook joins every non-daemonic child; children
    # only exit when their socket closes, so kill them first (atexit runs this
    # hook before multiprocessing's, which was registered earlier).
    for pool in list(_POOLS):
        pool._kill_now()


atexit.register(_kill_all_at_exit)


# Imported by the forkserver before it forks any child: Conveyor, and what a
# handler module's `Conveyor(...)` and `@app.job` (a pydantic model per job
# type) load lazily: about 0.1 s in every child otherwise. A name missing in
# some pydantic version is skipped (the forkserver ignores ImportError).
_FORKSERVER_PRELOAD = (
    __name__,
    "conveyor.storage.memory",
    "conveyor.storage.sqlite",
    "conveyor.bus.memory",
    "pydantic.fields",
    "pydantic.types",
    "pydantic.json_schema",
    "pydantic._internal._model_construction",
    "pydantic.plugin._loader",
)


def _preload_in_forkserver(modules: Sequence[str]) -> None:
    """Add ``modules`` to what the forkserver imports when it starts, so every
    child is forked with them imported. The list is process-wide and read once,
    when the forkserver starts; what is already in it is kept. (``__main__``,
    there by default, is not imported by CPython 3.11's forkserver: each child
    runs the main script again, as under spawn.)"""
    import multiprocessing.forkserver as forkserver

    server = getattr(forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    missing = [m for m in modules if m not in current]
    if missing:
        forkserver.set_forkserver_preload([*current, *missing])


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class ProcessPool:
    """Up to ``size`` supervised child processes running :class:`ChildJob` attempts.

    - ``max_jobs_per_child``: a child is replaced after that many jobs.
    - ``max_memory_mb``: per-child memory ceiling in MiB (see the module doc).
    - ``kill_grace``: seconds between ``SIGTERM`` and ``SIGKILL``.
    - ``start_method``: ``"forkserver"`` (default where available) or ``"spawn"``.
    - ``start_timeout``: seconds a new child has to start (import, preload).
    - ``preload``: modules each child imports when it starts, before it says
      it is ready (for example the handlers' modules), so its first job does
      not pay for them. An import that fails is left for the job to report;
      one that hangs is cut by ``start_timeout``.

    Children start lazily, one per concurrent ``run()``; :meth:`start` starts
    them all ahead. Use from one event loop. Call :meth:`close` when done.
    """

    def __init__(
        self,
        size: int,
        *,
        max_jobs_per_child: int | None = None,
        max_memory_mb: int | None = None,
        kill_grace: float = 2.0,
        start_method: str | None = None,
        start_timeout: float = 60.0,
        preload: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ConfigurationError(f"process pool size must be >= 1 (got {size})")
        if max_jobs_per_child is not None and max_jobs_per_child < 1:
            raise ConfigurationError(
                f"max_jobs_per_child must be >= 1 or None (got {max_jobs_per_child})"
            )
        if max_memory_mb is not None and max_memory_mb < 1:
            raise ConfigurationError(f"max_memory_mb must be >= 1 or None (got {max_memory_mb})")
        if not (math.isfinite(kill_grace) and kill_grace >= 0):
            raise ConfigurationError(f"kill_grace must be a finite number >= 0 (got {kill_grace})")
        if not (math.isfinite(start_timeout) and start_timeout > 0):
            raise ConfigurationError(f"start_timeout must be > 0 seconds (got {start_timeout})")
        method = start_method or _default_start_method()
        if method not in ("forkserver", "spawn"):
            raise ConfigurationError(
                f"start_method must be 'forkserver' or 'spawn' (got {method!r}); 'fork' would "
                "copy the worker's threads, locks and connections into every child"
            )
        if method not in multiprocessing.get_all_start_methods():
            raise ConfigurationError(f"start method {method!r} is not available on this platform")
        self.size = size
        self.max_jobs_per_child = max_jobs_per_child
        self.max_memory_mb = max_memory_mb
        self.kill_grace = kill_grace
        self.start_method = method
        self.start_timeout = start_timeout
        self.preload = tuple(preload)
        self._mp: Any = multiprocessing.get_context(method)
        if method == "forkserver":
            _preload_in_forkserver(_FORKSERVER_PRELOAD)
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._busy: dict[_Child, asyncio.Task[Any] | None] = {}  # child -> task using it
        self._close_cancelled: set[asyncio.Task[Any]] = set()
        self._children: set[_Child] = set()  # started and not yet reaped
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = self._jobs = self._recycled = self._crashed = self._killed = 0
        _POOLS.add(self)

    # -- public ---------------------------------------------------------------------

    @property
    def stats(self) -> PoolStats:
        return PoolStats(
            size=self.size,
            alive=len(self._children),
            busy=len(self._busy),
            started=self._started,
            jobs=self._jobs,
            recycled=self._recycled,
            crashed=self._crashed,
            killed=self._killed,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        """Start children until ``size`` are alive (a failed start is left to ``run``)."""
        async with contextlib.AsyncExitStack() as stack:
            wanted = self.size - len(self._idle) - len(self._busy)
            for _ in range(wanted):
                await stack.enter_async_context(self._slots)
            started = await asyncio.gather(
                *(self._spawn() for _ in range(wanted)), return_exceptions=True
            )
            for item in started:
                if isinstance(item, _Child):
                    self._idle.append(item)

    async def run(
        self,
        job: ChildJob,
        timeout: float | None,  # noqa: ASYNC109 - past it the child is killed, not just awaited
        on_call: CallHandler | None = None,
    ) -> ChildOutcome:
        """Run ``job`` in a free child and return how it ended.

        Waits for a free slot when ``size`` jobs are running. ``timeout``
        (seconds, ``None`` for none) counts from the moment the job is handed
        to a started child. Raises ``TimeoutError`` past it and
        ``CancelledError`` when the caller is cancelled, in both cases only
        after the child was killed and reaped. Raises :class:`PoolClosed` when
        the pool is, or gets, closed (its child is then killed and reaped too).

        ``on_call`` answers the calls the job makes while it runs (``ctx.step``,
        ``ctx.checkpoint``: see :class:`ChildSteps`); without it they fail.
        """
        if self._closed:
            raise PoolClosed("the process pool is closed")
        try:
            data = _frame({"kind": "job", "job": job.to_wire()})
        except TypeError as exc:
            return ChildOutcome(
                ok=False,
                error_type="Permanent",
                error=safe_text(f"Permanent: payload cannot be sent to a child process: {exc}"),
                permanent=True,
            )
        task = asyncio.current_task()
        try:
            async with self._slots:
                if self._closed:
                    raise PoolClosed("the process pool is closed")
                return await self._run(job, timeout, data, on_call)
        except asyncio.CancelledError:
            if task is not None and task in self._close_cancelled:
                self._close_cancelled.discard(task)
                if task.uncancel() == 0:  # cancelled by close() alone
                    raise PoolClosed("the process pool was closed while the job ran") from None
            raise

    async def _run(
        self, job: ChildJob, limit: float | None, data: bytes, on_call: CallHandler | None = None
    ) -> ChildOutcome:
        outcome = await self._run_once(job, limit, data, on_call=on_call)
        if outcome is None:
            # The child died before it read the job (killed while idle, just
            # before it was picked): the job never started; a new child runs it.
            outcome = await self._run_once(job, limit, data, retry=False, on_call=on_call)
        assert outcome is not None
        return outcome

    async def _run_once(
        self,
        job: ChildJob,
        limit: float | None,
        data: bytes,
        *,
        retry: bool = True,
        on_call: CallHandler | None = None,
    ) -> ChildOutcome | None:
        """The outcome; ``None`` (if ``retry``) when the child died before reading the job."""
        child = self._take_idle() or await self._spawn_for_run()
        if isinstance(child, ChildOutcome):
            return child
        self._busy[child] = asyncio.current_task()
        calls = 0
        try:
            try:
                async with asyncio.timeout(limit):
                    await asyncio.get_running_loop().sock_sendall(child.sock, data)
                    message = await self._next_message(child)
                    while message.get("kind") == "call":
                        calls += 1  # the job started: a later failure is never "unread"
                        await self._answer(child, message, on_call)
                        message = await self._next_message(child)
            except TimeoutError:
                self._killed += 1
                await self._end_uninterrupted(child)
                raise TimeoutError(
                    f"the job ran longer than {limit}s; its child process {child.pid} was killed"
                ) from None
            except (_ProtocolError, OSError) as exc:
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    child.unread = True  # it was gone before it could read the job
                if child.unread and retry and not calls:
                    await self._end_uninterrupted(child)
                    return None
                return await self._lost(child, exc)
            except BaseException:
                self._killed += 1
                await self._end_uninterrupted(child)
                raise
        finally:
            self._busy.pop(child, None)
        if message.get("kind") != "outcome" or message.get("job_id") != job.job_id:
            return await self._lost(child, _ProtocolError("answered with another message"))
        self._jobs += 1
        child.jobs += 1
        outcome = _outcome_from(message, child.pid)
        if message.get("stray_threads"):
            # The child exits at once to stop them; the job's code must not
            # outlive run().
            self._recycled += 1
            await self._end_uninterrupted(child)
            return outcome
        self._check_in(child, outcome)
        return outcome

    async def _answer(
        self, child: _Child, message: dict[str, Any], on_call: CallHandler | None
    ) -> None:
        """Answer one call of a running job. Whatever ``on_call`` raises goes back
        to the child as an error (its ``type`` and text), to be raised there."""
        reply: dict[str, Any] = {"kind": "reply"}
        try:
            if on_call is None:
                raise ConfigurationError(
                    "this job's process pool has no store behind it: durable steps and "
                    "checkpoints need a job run by a worker"
                )
            reply["value"] = await on_call(message)
            reply["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported to the job, raised there
            reply.update(ok=False, error_type=_type_name(exc), error=safe_text(_describe(exc)))
        try:
            frame = _frame(reply)
        except TypeError as exc:
            frame = _frame(
                {
                    "kind": "reply",
                    "ok": False,
                    "error_type": "StoreError",
                    "error": safe_text(f"the answer is not JSON: {exc}"),
                }
            )
        try:
            await asyncio.get_running_loop().sock_sendall(child.sock, frame)
        except OSError as exc:
            raise _ProtocolError(f"went away while its call was answered ({exc})") from None

    def _take_idle(self) -> _Child | None:
        """A live idle child: one killed while idle (the OOM killer, an operator)
        is reaped here rather than failing the next job."""
        while self._idle:
            child = self._idle.pop()
            if child.process.is_alive() and _quiet(child.sock):
                return child
            self._end(child)
        return None

    async def close(self) -> None:
        """Kill every child (``SIGTERM``, ``SIGKILL`` after ``kill_grace``) and reap
        them. Running ``run()`` calls raise :class:`PoolClosed`. Idempotent."""
        self._closed = True
        for child in self._idle:
            self._end(child)
        self._idle.clear()
        current = asyncio.current_task()
        runners = {t for t in self._busy.values() if t is not None and t is not current}
        for runner in runners:
            # The runner ends its child itself: it holds the child's socket and
            # exit watch, which must not be closed under it.
            if runner not in self._close_cancelled and not runner.done():
                self._close_cancelled.add(runner)
                runner.cancel()
        while runners or self._ending:
            await asyncio.wait([*runners, *self._ending])
            runners = {t for t in runners if not t.done()}

    # -- children ---------------------------------------------------------------------

    async def _spawn_for_run(self) -> _Child | ChildOutcome:
        try:
            return await self._spawn()
        except _StartFailed as exc:
            self._crashed += 1
            return ChildOutcome(
                ok=False,
                error_type="ChildCrashed",
                error=safe_text(f"ChildCrashed: {exc}"),
                crashed=True,
                exit_code=exc.exit_code,
            )

    async def _spawn(self) -> _Child:
        """A started child that said hello. Raises ``_StartFailed``."""
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        config = {
            "max_memory_mb": self.max_memory_mb,
            "preload": list(self.preload),
            # Forkserver children only: what they inherit can kill their siblings.
            "close_fds": self.start_method == "forkserver",
        }
        process = self._mp.Process(
            target=_child_main, args=(child_sock, config), name="conveyor-isolated", daemon=False
        )
        start = loop.run_in_executor(None, process.start)

        def late(fut: asyncio.Future[None]) -> None:
            # The start finished after run() gave up on it: that child gets no job.
            child_sock.close()
            if not fut.cancelled() and fut.exception() is None and process.pid is not None:
                self._end(self._adopt(process, parent_sock))
            else:
                parent_sock.close()

        try:
            done, _ = await asyncio.wait({start}, timeout=self.start_timeout)
        except asyncio.CancelledError:
            start.add_done_callback(late)
            raise
        if not done:  # a forkserver that never answers must not hang run()
            start.add_done_callback(late)
            raise _StartFailed(
                f"no child process started within {self.start_timeout}s "
                f"(start method {self.start_method})"
            )
        exc = start.exception()
        if exc is not None:
            child_sock.close()
            parent_sock.close()
            raise _StartFailed(f"a child process could not be started: {_describe(exc)}") from exc
        child_sock.close()  # the child has its own copy; ours would hide its EOF
        child = self._adopt(process, parent_sock)
        self._busy[child] = asyncio.current_task()
        try:
            async with asyncio.timeout(self.start_timeout):
                hello = await self._next_message(child)
            if hello.get("kind") != "hello":
                raise _ProtocolError("did not say hello")
        except TimeoutError:
            await self._end_uninterrupted(child)
            raise _StartFailed(
                f"child process {child.pid} did not start within {self.start_timeout}s"
            ) from None
        except _ProtocolError as exc:
            await self._end_uninterrupted(child)
            raise _StartFailed(
                f"child process {child.pid} failed to start: it {exc} "
                f"({_describe_exit(child.exit_code)})",
                child.exit_code,
            ) from None
        except BaseException:
            await self._end_uninterrupted(child)
            raise
        finally:
            self._busy.pop(child, None)
        child.grouped = bool(hello.get("grouped"))
        return child

    def _adopt(self, process: Any, sock: socket.socket) -> _Child:
        sock.setblocking(False)
        child = _Child(process, sock, process.pid)
        self._children.add(child)
        self._started += 1
        return child

    def _check_in(self, child: _Child, outcome: ChildOutcome) -> None:
        recycle = (
            (self.max_jobs_per_child is not None and child.jobs >= self.max_jobs_per_child)
            or (
                self.max_memory_mb is not None
                and outcome.peak_rss_kb is not None
                and outcome.peak_rss_kb > self.max_memory_mb * 1024
            )
            or outcome.error_type == "MemoryError"
            or bool(child.buffer)  # it sent more than its answer
        )
        if recycle or self._closed:
            if not self._closed:
                self._recycled += 1
            self._end(child)
        else:
            self._idle.append(child)

    async def _lost(self, child: _Child, exc: BaseException) -> ChildOutcome:
        """The child died or broke the protocol during a job: end it, say how."""
        await self._end_uninterrupted(child)
        if self._closed:
            raise PoolClosed("the process pool was closed while the job ran")
        self._crashed += 1
        self._jobs += 1
        code = child.exit_code
        if isinstance(exc, _ProtocolError) and exc.died:
            what = f"died while running the job ({_describe_exit(code)})"
        else:
            reason = str(exc) if isinstance(exc, _ProtocolError) else _describe(exc)
            what = (
                f"broke the protocol while running the job: it {reason}; it was stopped "
                f"({_describe_exit(code)})"
            )
        return ChildOutcome(
            ok=False,
            error_type="ChildCrashed",
            error=safe_text(f"ChildCrashed: child process {child.pid} {what}"),
            crashed=True,
            exit_code=code,
            pid=child.pid,
        )

    def _end(self, child: _Child) -> asyncio.Task[None]:
        """Start ending ``child`` (idempotent); the task is tracked until reaped."""
        if child.ending is None:
            child.ending = asyncio.get_running_loop().create_task(self._terminate(child))
            self._ending.add(child.ending)
            child.ending.add_done_callback(self._ending.discard)
        return child.ending

    async def _end_uninterrupted(self, child: _Child) -> None:
        """End ``child`` and wait until it is reaped, even if cancelled meanwhile
        (then ``CancelledError`` is raised afterwards)."""
        if await _wait_uninterrupted(self._end(child)):
            raise asyncio.CancelledError

    async def _terminate(self, child: _Child) -> None:
        # The socket stays open until the child is dead: its EOF would tell the
        # child's parent watch that the worker died, and that kills at once,
        # where SIGTERM gives the job its grace to stop.
        if not await self._wait_dead(child, 0):
            self._signal(child, signal.SIGTERM)
            if not await self._wait_dead(child, self.kill_grace):
                self._signal(child, signal.SIGKILL)
                await self._wait_dead(child, None)
        if child.grouped:
            # Whatever the job started in the child's group goes with it.
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            child.sock.close()
        child.exit_code = child.process.exitcode
        child.reaped = True
        self._children.discard(child)
        with contextlib.suppress(ValueError, OSError):
            child.process.close()  # frees its sentinel

    def _signal(self, child: _Child, sig: signal.Signals) -> None:
        try:
            if child.grouped:
                os.killpg(child.pid, sig)
            else:
                os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is gone and its id reused: signal the child only
            with contextlib.suppress(OSError):
                os.kill(child.pid, sig)

    async def _wait_dead(self, child: _Child, grace: float | None) -> bool:
        """True once the child is dead and reaped; False if still alive after ``grace`` s."""
        deadline = None if grace is None else time.monotonic() + grace
        while child.process.is_alive():
            remaining = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if remaining <= 0:
                return False
            # The sentinel is readable at exit; the periodic re-check covers a
            # sentinel kept open by a grandchild (spawn).
            await _readable(child.process.sentinel, remaining)
        return True

    async def _next_message(self, child: _Child) -> dict[str, Any]:
        """The child's next message. Raises ``_ProtocolError`` when it dies,
        closes its socket or sends something else than a message."""
        message = child.pop_message()
        if message is not None:
            return message
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        fd = child.sock.fileno()
        sentinel = child.process.sentinel

        def on_data() -> None:
            if waiter.done():
                return
            try:
                chunk = child.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                child.unread = True
                waiter.set_exception(_ProtocolError("died", died=True))
                return
            except OSError as exc:
                waiter.set_exception(_ProtocolError(f"broke its socket ({exc})"))
                return
            if not chunk:
                waiter.set_exception(_ProtocolError("closed its socket", died=True))
                return
            child.buffer += chunk
            try:
                found = child.pop_message()
            except _ProtocolError as exc:
                waiter.set_exception(exc)
                return
            if found is not None:
                waiter.set_result(found)

        def on_exit() -> None:
            if waiter.done():
                return
            child.drain()  # it may have answered just before dying
            try:
                found = child.pop_message()
            except _ProtocolError as exc:
                waiter.set_exception(exc)
                return
            if found is not None:
                waiter.set_result(found)
            else:
                waiter.set_exception(_ProtocolError("died", died=True))

        loop.add_reader(fd, on_data)
        loop.add_reader(sentinel, on_exit)
        try:
            return await waiter
        finally:
            loop.remove_reader(fd)
            loop.remove_reader(sentinel)

    def _kill_now(self) -> None:
        """SIGKILL every child at once, without an event loop (interpreter exit)."""
        self._closed = True
        for child in list(self._children):
            with contextlib.suppress(OSError):
                child.sock.close()
            if child.process.pid is not None and not child.reaped:
                with contextlib.suppress(OSError):
                    if child.grouped:
                        os.killpg(child.pid, signal.SIGKILL)
                    else:
                        os.kill(child.pid, signal.SIGKILL)


def _quiet(sock: socket.socket) -> bool:
    """An idle child's socket has nothing to read; EOF (it died: its descriptors
    close before its parent learns of the exit) or stray bytes mean it is unfit."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    return False


class _StartFailed(Exception):
    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


async def _wait_uninterrupted(fut: asyncio.Future[Any]) -> bool:
    """Wait until ``fut`` is done, even through cancellations; True if the
    caller was cancelled meanwhile (it must then raise ``CancelledError``)."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:  # noqa: BLE001 - the caller reads fut's exception
            break
    return cancelled


async def _readable(fd: int, seconds: float) -> None:
    """Wait until ``fd`` is readable or ``seconds`` passed."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, ready)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, seconds)
    finally:
        loop.remove_reader(fd)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal"
        return f"killed by signal {name} ({-code})"
    return f"exit code {code}"


def _outcome_from(message: dict[str, Any], pid: int) -> ChildOutcome:
    def text(key: str, limit: int, keep: str = "head") -> str | None:
        value = message.get(key)
        return safe_text(value, limit, keep=keep) if isinstance(value, str) else None

    delay = message.get("retry_delay")
    peak = message.get("peak_rss_kb")
    return ChildOutcome(
        ok=message.get("ok") is True,
        result=message.get("result"),
        error_type=text("error_type", 200),
        error=text("error", ERROR_TEXT_LIMIT),
        traceback=text("traceback", TRACEBACK_LIMIT, "tail"),
        permanent=message.get("permanent") is True,
        retry_delay=float(delay) if isinstance(delay, (int, float)) else None,
        pid=pid,
        peak_rss_kb=peak if isinstance(peak, int) else None,
    )


# -- the child ------------------------------------------------------------------------------


class _ChildState:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.busy = False
        self.seq = 0
        self.terminating = False
        self.grouped = False  # leads its own process group
        self.ctx: JobContext | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cond = threading.Condition()
        self.handlers: dict[
            tuple[str, str],
            tuple[Callable[..., Any], Callable[[dict[str, Any]], dict[str, Any]] | None],
        ] = {}
        self.classes: dict[str, type[BaseException] | None] = {}
        # A call to the parent (ctx.step) is in flight: the data the watcher sees
        # is its reply, not the next job. ``ended``: the job's outcome was sent.
        self.calling = False
        self.ended = False
        self.call_lock = threading.Lock()


_CHILD: _ChildState | None = None  # set in a child process only


def _close_inherited_fds(keep: int) -> None:
    """Close every descriptor but stdio and this child's socket. A forkserver child
    inherits the forkserver's "parent alive" pipe and the resource tracker's: a job
    writing to them would kill the forkserver, and with it the attempts of every
    sibling. (The resource tracker is started afresh if a job needs one.)"""
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker
    with contextlib.suppress(Exception):
        tracker._fd = None
        tracker._pid = None
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)


def _child_main(sock: socket.socket, config: dict[str, Any]) -> None:
    """Entry point of a child: set up, say hello, then run jobs until EOF."""
    global _CHILD
    if config.get("close_fds"):
        _close_inherited_fds(sock.fileno())
    state = _CHILD = _ChildState(sock)
    sock.setblocking(True)
    try:
        os.setpgid(0, 0)  # its own group: a kill reaches what the job started too
        state.grouped = True
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a job stops
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, state))
    watch = threading.Thread(target=_watch_parent, args=(state,), name="parent-watch", daemon=True)
    watch.start()
    own_threads = {threading.main_thread(), watch}
    with state.cond:  # watched like a job: a stuck import must not outlive the parent
        state.busy = True
        state.seq += 1
        state.cond.notify_all()
    for module in config.get("preload", ()):
        with contextlib.suppress(Exception):
            importlib.import_module(module)  # a failure is reported by the job itself
    limit = config.get("max_memory_mb")
    if limit:  # after the thread started and the imports: part of the idle baseline
        _limit_memory(int(limit))
    with state.cond:
        state.busy = False
    if state.terminating:
        return
    _send(sock, {"kind": "hello", "pid": os.getpid(), "grouped": state.grouped})
    while True:
        data = _recv_frame(sock)
        if data is None:
            return  # the parent closed the socket: retired, or the pool closed
        job = ChildJob.from_wire(orjson.loads(data)["job"])
        with state.cond:
            state.busy = True
            state.ended = False
            state.seq += 1
            state.cond.notify_all()
        message = _run_job(job, state)
        if state.terminating:
            return
        message["peak_rss_kb"] = _peak_rss_kb()
        # Threads the job left running would go on after its outcome: this
        # child ends now, and the parent waits for that before returning.
        stray = sum(1 for t in threading.enumerate() if t not in own_threads)
        message["stray_threads"] = stray
        with state.cond:
            state.ended = True
            state.cond.notify_all()
        try:
            _send(sock, message)
        except OSError:
            return
        if stray:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        with state.cond:
            state.busy = False
        if state.terminating:
            return


def _on_sigterm(state: _ChildState, signum: int, frame: Any) -> None:
    state.terminating = True
    if not state.busy:
        raise SystemExit(0)
    if state.ctx is not None:
        state.ctx.cancelled.set()
    if state.loop is not None and state.task is not None:
        with contextlib.suppress(RuntimeError):
            state.loop.call_soon_threadsafe(state.task.cancel)


def _watch_parent(state: _ChildState) -> None:
    """While a job runs, wait for the parent's end of the socket to close: the
    parent died, so kill this child's group before the job is rescued and rerun.
    (Between jobs the main thread reads the socket and sees the EOF itself.)"""
    seen = 0

    def next_job() -> bool:
        return state.busy and state.seq != seen

    def job_goes_on() -> bool | None:
        """After data came: None while a call's reply is still unread; True when the
        job read it and runs on; False when the data is the next job."""
        if state.ended or state.seq != seen:
            return False
        return None if state.calling else True

    poller = select.poll()
    poller.register(state.sock, select.POLLIN)
    while True:
        with state.cond:
            state.cond.wait_for(next_job)
            seen = state.seq
        while True:
            poller.poll()
            try:
                peeked = state.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue  # woken for nothing: watch on
            except OSError:
                peeked = b""
            if not peeked:
                if state.grouped:
                    with contextlib.suppress(OSError):
                        os.killpg(0, signal.SIGKILL)
                os._exit(70)
            # Data: the reply to a call of this job (watch on once the job has read
            # it), or the next job after this one ended (wait for it to start).
            with state.cond:
                state.cond.wait_for(lambda: job_goes_on() is not None)
                goes_on = job_goes_on()
            if not goes_on:
                break


def _limit_memory(limit_mb: int) -> None:
    which = getattr(resource, "RLIMIT_DATA", None)
    status_key = "VmData"
    if which is None or not sys.platform.startswith("linux"):
        which, status_key = resource.RLIMIT_AS, "VmSize"
    base = 0
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii") as f,
    ):
        for line in f:
            if line.startswith(status_key + ":"):
                base = int(line.split()[1]) * 1024
    cap = base + limit_mb * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(which, (cap, hard))


def _peak_rss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)  # macOS: bytes


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(_frame(message))


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def _run_job(job: ChildJob, state: _ChildState) -> dict[str, Any]:
    base: dict[str, Any] = {"kind": "outcome", "job_id": job.job_id}
    ctx = JobContext(
        job_id=job.job_id,
        job_type=job.job_type,
        attempt=job.attempt,
        max_retries=job.max_retries,
        queue=job.queue,
        worker_id=job.worker_id,
        metadata=job.metadata,
    )
    if job.workflow is not None:
        ctx.workflow_id = job.workflow.get("workflow_id")
        ctx.step_name = job.workflow.get("step_name")
        ctx.parent_results = job.workflow.get("parent_results") or {}
    ctx.last_checkpoint = job.checkpoint
    ctx._steps = Steps(ChildSteps(state, job.job_id))
    ctx._audit_sync = ChildSteps(state, job.job_id).audit_sync
    state.ctx = ctx
    try:
        key = (job.handler.module, job.handler.qualname)
        found = state.handlers.get(key)
        if found is None:
            try:
                found = job.handler.resolve_with_payload()
            except ConfigurationError as exc:
                raise Permanent(f"cannot load the handler of {job.job_type!r}: {exc}") from exc
            state.handlers[key] = found
        handler, validate = found
        kwargs = validate(job.payload) if validate is not None else job.payload
        if job.is_async:
            result = asyncio.run(_run_async(handler(ctx, **kwargs), state))
        else:
            result = handler(ctx, **kwargs)
            if inspect.iscoroutine(result):
                result = asyncio.run(_run_async(result, state))
    except BaseException as exc:  # noqa: BLE001 - SystemExit & co. fail this attempt only
        return base | _failure(exc, job, state)
    finally:
        state.ctx = None
        state.loop = state.task = None
    try:
        encoded = orjson.dumps(result)
        if b"null" in encoded and _has_non_finite(result):
            raise TypeError("it contains a non-finite number (NaN or Infinity); JSON has none")
        if len(encoded) > MAX_MESSAGE_BYTES:
            raise TypeError(
                f"it is {len(encoded)} bytes, more than the {MAX_MESSAGE_BYTES} a child may send"
            )
    except TypeError as exc:
        error = f"Permanent: handler result is not JSON-serialisable: {_describe_plain(exc)}"
        return base | {
            "ok": False,
            "error_type": "Permanent",
            "error": safe_text(error),
            "permanent": True,
        }
    return base | {"ok": True, "result": orjson.Fragment(encoded)}


async def _run_async(awaitable: Any, state: _ChildState) -> Any:
    state.loop = asyncio.get_running_loop()
    state.task = asyncio.current_task()
    if state.terminating:  # SIGTERM came before the task existed
        raise asyncio.CancelledError
    return await awaitable


def _describe_plain(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001
        return _type_name(exc)


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _failure(exc: BaseException, job: ChildJob, state: _ChildState) -> dict[str, Any]:
    """The outcome of a failed attempt, computed in a side thread for at most
    ``DESCRIBE_TIMEOUT`` seconds: the exception's own code (``__str__``, a
    ``delay`` property, its class's attributes) may raise or hang, and the report
    must come back all the same."""
    done: list[dict[str, Any]] = []

    def compute() -> None:
        with contextlib.suppress(BaseException):
            done.append(_failure_report(exc, job, state))

    thread = threading.Thread(target=compute, name="describe", daemon=True)
    thread.start()
    thread.join(DESCRIBE_TIMEOUT)
    if done:
        return done[0]
    name = safe_text(type.__dict__["__name__"].__get__(type(exc), type), 200)
    return {
        "ok": False,
        "error_type": name,
        "error": f"{name}: <its text did not come within {DESCRIBE_TIMEOUT:g} s>",
        "traceback": None,
        "permanent": False,
        "retry_delay": None,
    }


#: Seconds a failed attempt's exception gets to describe itself in the child.
DESCRIBE_TIMEOUT = 1.0


def _failure_report(exc: BaseException, job: ChildJob, state: _ChildState) -> dict[str, Any]:
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:  # noqa: BLE001 - a traceback is a nicety
        tb = _describe(exc)
    error = _describe(exc)
    if job.secrets:  # masked whole, before the cuts below (a secret must not straddle one)
        error = scrub(error, job.secrets) or ""
        tb = scrub(tb, job.secrets) or ""
    permanent = isinstance(exc, Permanent) or any(
        cls is not None and isinstance(exc, cls)
        for cls in (_class(name, state) for name in job.permanent_errors)
    )
    delay: float | None = None
    if isinstance(exc, Retry):
        try:  # clamped as in a thread (10**400 is 30 days, not a crash)
            delay = clamp_retry_delay(exc.__dict__.get("delay"))
        except BaseException:  # noqa: BLE001 - a hostile delay: the backoff decides
            delay = None
    return {
        "ok": False,
        "error_type": _type_name(exc),
        "error": safe_text(error),
        "traceback": safe_text(tb, TRACEBACK_LIMIT, keep="tail"),
        "permanent": permanent,
        "retry_delay": delay,
    }


def _class(name: str, state: _ChildState) -> type[BaseException] | None:
    if name not in state.classes:
        module, _, qualname = name.partition(":")
        found: Any = None
        with contextlib.suppress(Exception):
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        ok = isinstance(found, type) and issubclass(found, BaseException)
        state.classes[name] = found if ok else None
    return state.classes[name]


class ChildSteps:
    """Durable steps of a job in a child process: each store call goes to the
    worker over the child's socket (``{"kind": "call"}``, answered by a
    ``{"kind": "reply"}``) and blocks until the answer. One call at a time."""

    def __init__(self, state: _ChildState, job_id: str) -> None:
        self.state = state
        self.job_id = job_id

    def _call(self, op: str, **fields: Any) -> Any:
        state = self.state
        with state.call_lock:
            with state.cond:
                state.calling = True
            try:
                _send(state.sock, {"kind": "call", "job_id": self.job_id, "op": op, **fields})
                data = _recv_frame(state.sock)
            finally:
                with state.cond:
                    state.calling = False
                    state.cond.notify_all()
        if data is None:
            raise ChildCrashed("the worker went away while a durable step was being stored")
        reply = orjson.loads(data)
        if reply.get("ok") is True:
            return reply.get("value")
        name = str(reply.get("error_type") or "StoreError")
        text = str(reply.get("error") or name)
        message = text[len(name) + 2 :] if text.startswith(name + ": ") else text
        if name == "LeaseLost":
            raise LeaseLost(message)
        if name == "ValidationError":
            raise ValidationError(message)
        raise StoreError(f"{name}: {message}")

    def load_sync(self) -> dict[str, Any]:
        value = self._call("load")
        return dict(value) if isinstance(value, dict) else {}

    def save_sync(self, name: str, result: Any) -> bool:
        self._call("save", name=name, value=result)
        return True

    def save_checkpoint_sync(self, state: Any) -> bool:
        self._call("checkpoint", value=state)
        return True

    def audit_sync(self, fields: dict[str, Any]) -> Any:
        """``ctx.audit`` in the child: the worker records the entry."""
        return self._call("audit", **fields)

    # An async handler in the child runs alone on its loop: a short blocking call is fine.
    async def load(self) -> dict[str, Any]:
        return self.load_sync()

    async def save(self, name: str, result: Any) -> bool:
        return self.save_sync(name, result)

    async def save_checkpoint(self, state: Any) -> bool:
        return self.save_checkpoint_sync(state)
