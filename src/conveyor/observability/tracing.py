"""OpenTelemetry traces from submit to execution (``docs/tracing.md``).

Every other module calls tracing through this one. It costs one attribute read per
submit and per job while tracing is off, which it is unless:

- the OpenTelemetry SDK is installed (``pip install 'conveyor[otel]'``), and
- ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``...) or an OTLP
  endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._TRACES_ENDPOINT``), and
  ``OTEL_SDK_DISABLED`` is not ``true``; or the process already has an SDK
  ``TracerProvider`` (``opentelemetry-instrument``, or the application set one
  before creating ``Conveyor``), which is then used as it is.

Everything else is the SDK's own reading of the standard variables: sampler
(``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``), resource
(``OTEL_SERVICE_NAME``, default ``conveyor``; ``OTEL_RESOURCE_ATTRIBUTES``) and
the exporter's endpoint, headers and protocol.

Spans: ``submit <job_type>`` (kind PRODUCER) around a submit, whose W3C trace
context is stored with each job in ``metadata["traceparent"]`` (and
``metadata["tracestate"]`` when there is one); ``process <job_type>`` (kind
CONSUMER) around each attempt in the worker, the child of that stored context,
so every attempt of a job (retries, rescues) is a sibling under one submit span.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.domain.job import EnqueueResult, Job, NewJob

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

T = TypeVar("T")
_log = logging.getLogger("conveyor.tracing")

#: Metadata keys holding a job's W3C trace context (reserved: overwritten at submit
#: while tracing is on; read by the worker whether or not the submitter traced).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Instrumentation scope name of Conveyor's spans.
SCOPE = "conveyor"
#: ``messaging.system`` of every span.
SYSTEM = "conveyor"
#: Longest ``tracestate`` stored or read (the W3C limit is 32 members of ~256 bytes).
_MAX_TRACESTATE = 512
_MAX_STATUS = 1_000

_tracer: Tracer | None = None  # None: tracing is off
_provider: Any = None  # the SDK provider this module set up itself (to shut down)
_configured = False
_propagator: Any = None


def enabled() -> bool:
    """Whether spans are being recorded by this process."""
    return _tracer is not None


def configure(*, force: bool = False) -> bool:
    """Turn tracing on as the ``OTEL_*`` environment says (see the module doc);
    returns whether it is on. The environment is read once per process (``force``:
    again); a later call only picks up an SDK provider the application has set
    globally since. An exporter that is named but not installed, or a bad setting,
    logs ``tracing_unavailable`` and leaves tracing off: a process never fails to
    start for want of tracing."""
    global _configured, _provider
    if _configured and not force:
        if _tracer is None:
            _adopt_global()
        return _tracer is not None
    _configured = True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not _wanted() and "opentelemetry.sdk.trace" not in sys.modules:
        return False  # no SDK provider can exist yet: spare every process the ~0.1 s import
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider  # noqa: F401 - is the SDK there?
    except ImportError:
        if _wanted():
            _log.warning(
                "tracing_unavailable: OTEL_* variables ask for traces but the OpenTelemetry "
                "SDK is not installed: pip install 'conveyor[otel]'",
                extra={"event": "tracing_unavailable"},
            )
        return False
    if _adopt_global():
        return True
    if not _wanted():
        return False
    try:
        provider = _provider_from_env()
    except Exception as exc:  # noqa: BLE001 - tracing never stops the process
        _log.warning("tracing_unavailable: %s", exc, extra={"event": "tracing_unavailable"})
        return False
    trace.set_tracer_provider(provider)
    _provider = provider
    use(provider)
    return True


def _adopt_global() -> bool:
    """Use the process's global provider when it is an SDK one (someone set it up)."""
    if "opentelemetry.sdk.trace" not in sys.modules:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return False
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        use(current)
        return True
    return False


def use(provider: Any) -> None:
    """Record spans through ``provider`` (an OpenTelemetry ``TracerProvider``), or
    stop tracing with ``None``. For tests and applications that keep their own
    provider without making it the global one."""
    global _tracer, _propagator, _otel
    if provider is None:
        _tracer = None
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _otel = _Otel()
    _propagator = TraceContextTextMapPropagator()
    _context_of.cache_clear()
    global _parent_decides
    _parent_decides = _drops_unsampled_children(provider)
    _tracer = provider.get_tracer(SCOPE, _version())


#: Whether the provider's sampler records no span whose parent was not sampled
#: (see ``_drops_unsampled_children``): then an attempt of an unsampled job needs
#: no span at all.
_parent_decides = False
#: ``ParentBased`` samplers whose description has these drop every child of an
#: unsampled parent, remote or local (the SDK's defaults, which every
#: ``parentbased_*`` value of ``OTEL_TRACES_SAMPLER`` gives).
_DROPS_UNSAMPLED = (
    "remoteParentNotSampled:AlwaysOffSampler",
    "localParentNotSampled:AlwaysOffSampler",
)


def _drops_unsampled_children(provider: Any) -> bool:
    """Whether ``provider`` (an SDK ``TracerProvider``) would record no span under
    a parent that was not sampled: its sampler is exactly the SDK's ``ParentBased``
    with ``AlwaysOff`` for unsampled parents. Any other sampler (a subclass, a
    custom one) is asked for every attempt, as the SDK does."""
    try:
        from opentelemetry.sdk.trace.sampling import ParentBased
    except ImportError:  # pragma: no cover - use() is given SDK providers
        return False
    sampler = getattr(provider, "sampler", None)
    if type(sampler) is not ParentBased:
        return False
    description = sampler.get_description()  # type: ignore[no-untyped-call]  # untyped in the SDK
    return all(part in description for part in _DROPS_UNSAMPLED)


class _Otel:
    """The OpenTelemetry names the hot path uses, imported once (a function-level
    import costs ~1 us a call)."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.context import Context
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        self.attach = context.attach
        self.detach = context.detach
        self.set_span_in_context = trace.set_span_in_context
        self.get_current_span = trace.get_current_span
        self.root = Context()
        self.span_context = SpanContext
        self.non_recording = NonRecordingSpan
        self.trace_flags = TraceFlags
        self.consumer = SpanKind.CONSUMER
        self.producer = SpanKind.PRODUCER
        self.status = Status
        self.error = StatusCode.ERROR


_otel: Any = None


def shutdown() -> None:
    """Export what is buffered and stop the provider this module set up (the SDK
    also does it at exit)."""
    if _provider is not None:
        _provider.shutdown()


def _wanted() -> bool:
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return names != "none"
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _exporter_names() -> list[str]:
    """Entry point names of the exporters ``OTEL_TRACES_EXPORTER`` asks for
    (``otlp`` by default), ``otlp`` resolved by the OTLP protocol variables."""
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    names = []
    for name in (n.strip() for n in raw.split(",")):
        if not name or name.lower() == "none":
            continue
        if name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"  # the specification's default; needs no gRPC
            ).strip()
            name = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}.get(protocol, "")
            if not name:
                raise ValueError(f"unsupported OTLP protocol {protocol!r}")
        names.append(name)
    return names


def _provider_from_env() -> Any:
    """An SDK ``TracerProvider`` with a ``BatchSpanProcessor`` per exporter that
    ``OTEL_TRACES_EXPORTER`` names, found through the SDK's entry points as its
    own auto-configuration does (sampler and limits from the environment)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporters = []
    for name in _exporter_names():
        found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            hint = "pip install 'conveyor[otel]'" if name.startswith("otlp") else "install it"
            raise ValueError(f"no trace exporter {name!r} is installed ({hint})")
        cls = next(iter(found)).load()
        if not (isinstance(cls, type) and issubclass(cls, SpanExporter)):
            raise ValueError(f"{name!r} is not a trace exporter")
        exporters.append(cls())
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "conveyor"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _version() -> str:
    try:
        return importlib.metadata.version("conveyor")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# -- submit ---------------------------------------------------------------------------
class _Untraced:
    """What ``submitting`` gives while tracing is off: the jobs as they are."""

    __slots__ = ("jobs",)

    def __init__(self, jobs: Sequence[NewJob]) -> None:
        self.jobs = jobs

    def __enter__(self) -> _Untraced:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def done(self, results: Sequence[EnqueueResult]) -> None:
        return None

    def set(self, key: str, value: Any) -> None:
        return None


class _Submit:
    """A PRODUCER span around one submit; ``jobs`` carry its context."""

    __slots__ = ("_cm", "_given", "jobs", "span")

    def __init__(self, tracer: Tracer, jobs: Sequence[NewJob], name: str | None) -> None:
        self._given = jobs
        self.jobs = jobs
        types = {j.job_type for j in jobs if type(j.job_type) is str}
        queues = {j.queue for j in jobs if type(j.queue) is str}
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
        }
        if len(types) == 1:
            attributes["conveyor.job.type"] = next(iter(types))
        if len(queues) == 1:
            attributes["messaging.destination.name"] = next(iter(queues))
        if len(jobs) != 1:
            attributes["messaging.batch.message_count"] = len(jobs)
        if name is None:
            name = f"submit {next(iter(types))}" if len(types) == 1 else "submit"
        self._cm = tracer.start_as_current_span(name, kind=_otel.producer, attributes=attributes)
        self.span: Span | None = None

    def __enter__(self) -> _Submit:
        self.span = self._cm.__enter__()
        self.jobs = with_trace_context(self._given)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def done(self, results: Sequence[EnqueueResult]) -> None:
        """Name the submitted job (a single submit) once the store gave it its id."""
        span = self.span
        if span is None or len(results) != 1:
            return
        job, duplicate = results[0].job, results[0].duplicate
        span.set_attribute("conveyor.job.id", job.id)
        if duplicate:
            span.set_attribute("conveyor.job.duplicate", True)

    def set(self, key: str, value: Any) -> None:
        """Add an attribute to the submit span."""
        if self.span is not None:
            self.span.set_attribute(key, value)


def submitting(jobs: Sequence[NewJob], name: str | None = None) -> _Untraced | _Submit:
    """Context manager around a submit of ``jobs``; its ``jobs`` are the ones to
    store (with ``metadata["traceparent"]`` while tracing is on), and ``done(results)``
    names the job in the span. While tracing is off: the same jobs, no span."""
    tracer = _tracer
    if tracer is None:
        return _Untraced(jobs)
    return _Submit(tracer, jobs, name)


def trace_context() -> dict[str, str]:
    """The current span's W3C context as metadata entries (empty with no span)."""
    if _tracer is None or _propagator is None:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def with_trace_context(jobs: Sequence[NewJob]) -> Sequence[NewJob]:
    """``jobs`` with the current span's trace context in their metadata (copies:
    the caller's jobs and dicts are left alone; jobs sharing one metadata dict
    share one copy). Unchanged with no active span."""
    carrier = trace_context()
    if not carrier:
        return jobs
    copies: dict[int, dict[str, Any]] = {}
    out: list[NewJob] = []
    for j in jobs:
        meta = j.metadata
        if type(meta) is not dict and not isinstance(meta, Mapping):
            out.append(j)  # validation names it
            continue
        new_meta = copies.get(id(meta))
        if new_meta is None:
            new_meta = {k: v for k, v in meta.items() if k not in (TRACEPARENT, TRACESTATE)}
            new_meta.update(carrier)
            copies[id(meta)] = new_meta
        out.append(
            NewJob(  # positional, in field order (as NewJob.with_payload)
                j.job_type,
                j.payload,
                j.queue,
                j.priority,
                j.max_retries,
                j.timeout_ms,
                j.run_at,
                j.idempotency_key,
                j.depends_on,
                new_meta,
                j.created_by,
                j.workflow_id,
                j.internal,
            )
        )
    return out


def steps_with_trace_context(steps: Sequence[tuple[str, NewJob]]) -> list[tuple[str, NewJob]]:
    """Workflow steps ``(name, job)`` with the current trace context in each job."""
    jobs = with_trace_context([j for _, j in steps])
    return [(name, j) for (name, _), j in zip(steps, jobs, strict=True)]


def extract(metadata: Mapping[str, Any]) -> Any:
    """The OpenTelemetry ``Context`` a job's metadata carries (an empty one when it
    carries none, or a malformed one). Only while tracing is on."""
    return _parent_of(metadata)[0]


_NO_PARENT: tuple[Any, Any, bool | None] = (None, None, None)


def _parent_of(metadata: Mapping[str, Any]) -> tuple[Any, Any, bool | None]:
    """``(context, parent span, sampled)`` of the trace context in ``metadata``;
    ``sampled`` is ``None`` when there is none (the context is then the empty one)."""
    if type(metadata) is not dict and not isinstance(metadata, Mapping):
        return _otel.root, None, None
    parent = metadata.get(TRACEPARENT)
    if type(parent) is not str or len(parent) > _MAX_TRACESTATE:
        return _otel.root, None, None  # metadata is the submitter's: anything may be there
    state = metadata.get(TRACESTATE)
    if type(state) is not str or len(state) > _MAX_TRACESTATE:
        state = None
    return _context_of(parent, state)


#: A W3C ``traceparent`` of version 00 as Conveyor writes it (lower-case hex).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@functools.lru_cache(maxsize=4096)
def _context_of(traceparent: str, tracestate: str | None) -> tuple[Any, Any, bool | None]:
    """Parsed once per distinct context: a batch's jobs share one (contexts are
    immutable). The common form is parsed here (the propagator's general parse
    costs ~6 us, a job submitted alone has its own context); a ``tracestate`` or
    another version goes through the propagator."""
    m = _TRACEPARENT_00.fullmatch(traceparent) if not tracestate else None
    if m is not None:
        trace_id, span_id = int(m[1], 16), int(m[2], 16)
        if not trace_id or not span_id:
            return _otel.root, None, None  # invalid ids: as the propagator, no parent
        span = _otel.non_recording(
            _otel.span_context(
                trace_id, span_id, is_remote=True, trace_flags=_otel.trace_flags(int(m[3], 16))
            )
        )
    else:
        carrier = {TRACEPARENT: traceparent}
        if tracestate:
            carrier[TRACESTATE] = tracestate
        ctx = _propagator.extract(carrier, context=_otel.root)
        span = _otel.get_current_span(ctx)
        if not span.get_span_context().is_valid:
            return _otel.root, None, None
    ctx = _otel.set_span_in_context(span, _otel.root)
    return ctx, span, bool(span.get_span_context().trace_flags.sampled)


def attach(context: Any) -> object:
    """Make ``context`` current; returns the token for ``detach``."""
    return _otel.attach(context)


def detach(token: object) -> None:
    _otel.detach(token)


# -- execution ------------------------------------------------------------------------
class JobSpan:
    """The CONSUMER span of one attempt, current in the worker's task for the job
    (``span`` is ``None`` for an unsampled job: only its context is current)."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span | None, token: object) -> None:
        self.span = span
        self.token = token


def start_job(job: Job) -> JobSpan | None:
    """Start the ``process <job_type>`` span of ``job``'s attempt, the child of the
    context its metadata carries, and make it current (the handler's own spans
    nest under it). ``None`` while tracing is off.

    A job whose submit was not sampled gets no span when the sampler follows the
    parent's decision (the default, and every ``parentbased_*`` sampler): the SDK
    would make a non-recording span (~12 us); instead the submitter's context is
    made current, so the handler's own spans are dropped alike."""
    tracer = _tracer
    if tracer is None:
        return None
    parent, parent_span, sampled = _parent_of(job.metadata)
    if sampled is False and _parent_decides:
        return JobSpan(None, _otel.attach(_otel.set_span_in_context(parent_span)))
    # Few attributes: the SDK checks each one, ~1 us apiece per job.
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue,
        "conveyor.job.id": job.id,
        "conveyor.job.type": job.job_type,
        "conveyor.job.attempt": job.attempt,
    }
    if job.workflow_id is not None:
        attributes["conveyor.workflow.id"] = job.workflow_id
        if job.step_name is not None:
            attributes["conveyor.workflow.step"] = job.step_name
    span = tracer.start_span(
        f"process {job.job_type}",
        context=parent,
        kind=_otel.consumer,
        attributes=attributes,
    )
    return JobSpan(span, _otel.attach(_otel.set_span_in_context(span)))


def end_job(job_span: JobSpan, action: str | None, error: str | None) -> None:
    """End an attempt's span: ``conveyor.job.outcome`` (``complete``, ``retry``,
    ``fail``, ``confirm_cancel``, ``release``; ``None``: abandoned at shutdown),
    status ERROR and an ``exception`` event (type and message from the stored
    ``"Type: message"`` error text, never from the exception object: describing a
    handler's exception runs its code) when the attempt failed."""
    span = job_span.span
    if span is None:
        _otel.detach(job_span.token)
        return
    if span.is_recording():  # a custom sampler may still have dropped it
        span.set_attribute("conveyor.job.outcome", action or "abandoned")
        if error and action in ("retry", "fail"):
            kind, sep, _ = error.partition(": ")
            span.add_event(
                "exception",
                {
                    "exception.type": kind if sep and " " not in kind else "Error",
                    "exception.message": error[:_MAX_STATUS],
                },
            )
            span.set_status(_otel.status(_otel.error, error[:_MAX_STATUS]))
    span.end()
    _otel.detach(job_span.token)


def in_context(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` to run in another thread with this task's context (the job's span
    current there too); ``fn`` itself while tracing is off."""
    if _tracer is None:
        return fn
    return functools.partial(contextvars.copy_context().run, fn)


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of the current span, ``None`` without one."""
    if _tracer is None:
        return None
    ctx = _otel.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class TraceContextMiddleware:
    """ASGI middleware: a request's W3C ``traceparent``/``tracestate`` headers become
    the current context, so a submit span is the child of the caller's span (while
    tracing is on; otherwise it passes the request straight on). When a server span
    is current already (FastAPI's own telemetry, which is on whenever a global
    provider is set, or an ASGI instrumentation), that one read the headers: it is
    left as the parent."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            _tracer is None
            or scope["type"] != "http"
            or _otel.get_current_span().get_span_context().is_valid
        ):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or ():
            if name in (b"traceparent", b"tracestate") and len(value) <= _MAX_TRACESTATE:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        if TRACEPARENT not in headers:
            await self.app(scope, receive, send)
            return
        token = attach(extract(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            detach(token)
