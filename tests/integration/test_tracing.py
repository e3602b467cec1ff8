"""OpenTelemetry traces from submit to execution (docs/tracing.md).

In process: the SDK's ``InMemorySpanExporter`` sees one trace from an HTTP submit
(``create_app`` over ASGI, with the caller's ``traceparent`` header) down to the
handler's own span. Across processes: the API in this process, a ``conveyor
worker`` subprocess configured only by ``OTEL_*`` variables (console exporter on
its stdout), and the worker's span is the child of this process's submit span.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once
from traceapp import register

from contract.appkit import finished
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.domain.errors import ValidationError
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.observability import tracing
from conveyor.settings import Settings
from support import conveyor_cmd, conveyor_env, running_worker, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, into memory, through the global provider (the
    handlers' own spans use it); off and unset again afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.use(None)
        provider.shutdown()
        # No public way to unset the global provider: as OpenTelemetry's own tests do.
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
        trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Conveyor]:
    cv = Conveyor(
        settings=Settings(
            database_url=f"sqlite:///{tmp_path}/trace.db",
            poll_interval=0.05,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            shutdown_grace=2.0,
        )
    )
    register(cv)
    async with cv:
        yield cv


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


def root_of(span: ReadableSpan, exporter: InMemorySpanExporter) -> ReadableSpan:
    """The outermost span of this process above ``span`` (its parent, if any, is
    remote: the caller's)."""
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
    return span


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


async def test_one_trace_from_an_http_submit_to_the_handlers_span(
    app: Conveyor, spans: InMemorySpanExporter
) -> None:
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(app)), base_url="http://localhost"
        ) as client,
        running_worker(app, concurrency=4),
    ):
        ids = []
        for job_type in ("traced_ok", "traced_sync"):
            r = await client.post(
                "/api/jobs",
                json={"job_type": job_type, "payload": {"n": 1}, "metadata": {"team": "a"}},
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["job_id"])
        jobs = await finished(app, ids)
    for job_id, job_type, inner in (
        (ids[0], "traced_ok", "handler work"),
        (ids[1], "traced_sync", "sync handler work"),
    ):
        assert jobs[job_id].state is JobState.COMPLETED
        (submit,) = [
            s for s in named(spans, "submit ") if s.attributes["conveyor.job.id"] == job_id
        ]
        (process,) = [
            s for s in named(spans, "process ") if s.attributes["conveyor.job.id"] == job_id
        ]
        (handler,) = [
            s
            for s in named(spans, inner)
            if s.parent is not None and s.parent.span_id == process.context.span_id
        ]
        # The caller's span -> (FastAPI's server spans) -> submit (PRODUCER) ->
        # process (CONSUMER) -> the handler's.
        root = root_of(submit, spans)
        assert root.parent is not None
        assert root.parent.is_remote
        assert format(root.parent.span_id, "016x") == CLIENT_SPAN
        assert hex_trace(submit) == hex_trace(process) == hex_trace(handler) == CLIENT_TRACE
        assert process.parent is not None
        assert process.parent.span_id == submit.context.span_id
        assert submit.kind is SpanKind.PRODUCER
        assert process.kind is SpanKind.CONSUMER
        assert submit.name == f"submit {job_type}"
        assert process.name == f"process {job_type}"
        assert submit.attributes["messaging.system"] == "conveyor"
        assert submit.attributes["conveyor.job.type"] == job_type
        assert submit.attributes["messaging.destination.name"] == "default"
        assert process.attributes["conveyor.job.attempt"] == 1
        assert process.attributes["conveyor.job.outcome"] == "complete"
        assert process.attributes["messaging.destination.name"] == "default"
        # The context is stored with the job, beside the caller's own metadata.
        meta = jobs[job_id].metadata
        assert meta["team"] == "a"
        assert meta["traceparent"].split("-")[1:3] == [
            CLIENT_TRACE,
            format(submit.context.span_id, "016x"),
        ]


async def test_every_attempt_is_a_child_of_the_one_submit_span(
    app: Conveyor, spans: InMemorySpanExporter
) -> None:
    async with running_worker(app, concurrency=2):
        with trace.get_tracer("test").start_as_current_span("caller"):
            job = await app.enqueue("fails_first")
        bad = await app.enqueue("always_fails")
        jobs = await finished(app, [job.id, bad.id])
    assert jobs[job.id].state is JobState.COMPLETED
    (submit,) = list(named(spans, "submit fails_first"))
    (caller,) = named(spans, "caller")
    assert submit.parent is not None
    assert submit.parent.span_id == caller.context.span_id
    attempts = sorted(
        named(spans, "process fails_first"), key=lambda s: s.attributes["conveyor.job.attempt"]
    )
    assert [s.attributes["conveyor.job.attempt"] for s in attempts] == [1, 2]
    for s in attempts:  # retries share the parent: linked through the submit span
        assert s.parent is not None
        assert s.parent.span_id == submit.context.span_id
        assert hex_trace(s) == hex_trace(submit)
    first, second = attempts
    assert first.attributes["conveyor.job.outcome"] == "retry"
    assert first.status.status_code is StatusCode.ERROR
    (event,) = [e for e in first.events if e.name == "exception"]
    assert event.attributes["exception.type"] == "RuntimeError"
    assert "first attempt fails" in str(event.attributes["exception.message"])
    assert second.attributes["conveyor.job.outcome"] == "complete"
    assert second.status.status_code is not StatusCode.ERROR
    # A job submitted outside any span starts its own trace; its failure is recorded.
    (dead,) = named(spans, "process always_fails")
    (dead_submit,) = named(spans, "submit always_fails")
    assert dead_submit.parent is None
    assert dead.attributes["conveyor.job.outcome"] == "fail"
    assert dead.status.status_code is StatusCode.ERROR


async def test_batches_and_workflows_carry_the_context(
    app: Conveyor, spans: InMemorySpanExporter
) -> None:
    shared = {"origin": "batch"}
    jobs = await app.enqueue_many("traced_ok", [{"n": i} for i in range(3)], metadata=shared)
    assert shared == {"origin": "batch"}  # the caller's dict is left alone
    (submit,) = named(spans, "submit traced_ok")
    assert submit.attributes["messaging.batch.message_count"] == 3
    span_id = format(submit.context.span_id, "016x")
    assert {j.metadata["traceparent"].split("-")[2] for j in jobs} == {span_id}
    assert all(j.metadata["origin"] == "batch" for j in jobs)

    run = await app.submit_workflow(
        {
            "name": "pair",
            "steps": [
                {"name": "a", "job_type": "traced_ok"},
                {"name": "b", "job_type": "traced_sync", "depends_on": ["a"]},
            ],
        }
    )
    (wf_submit,) = named(spans, "submit workflow")
    assert wf_submit.attributes["conveyor.workflow.id"] == run.id
    async with running_worker(app, concurrency=2):
        wf = await run.wait(timeout=20)
    assert wf.status.value == "completed", wf
    steps = [s for s in named(spans, "process ") if "conveyor.workflow.id" in s.attributes]
    assert {s.attributes["conveyor.workflow.step"] for s in steps} == {"a", "b"}
    for s in steps:
        assert s.parent is not None
        assert s.parent.span_id == wf_submit.context.span_id


@pytest.mark.parametrize(
    "given", [5, "", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 10_000, None]
)
async def test_a_hostile_traceparent_in_metadata_starts_a_new_trace(
    app: Conveyor, spans: InMemorySpanExporter, given: Any
) -> None:
    """Metadata is the submitter's: a bad ``traceparent`` there never breaks the job."""
    tracing.use(None)  # submit untraced: the given value is stored as it is
    job = await app.enqueue("traced_ok", metadata={"traceparent": given, "tracestate": given})
    assert job.metadata["traceparent"] == given
    tracing.use(trace.get_tracer_provider())
    async with running_worker(app, concurrency=1):
        done = await finished(app, [job.id])
    assert done[job.id].state is JobState.COMPLETED
    (process,) = named(spans, "process traced_ok")
    assert process.parent is None


async def test_off_it_stores_nothing_and_keeps_a_given_context(app: Conveyor) -> None:
    assert not tracing.enabled()
    plain = await app.enqueue("traced_ok")
    assert "traceparent" not in plain.metadata
    # An upstream system's context, passed through untouched for a traced worker.
    upstream = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    job = await app.enqueue("traced_ok", metadata={"traceparent": upstream})
    assert job.metadata == {"traceparent": upstream}


# -- across processes -----------------------------------------------------------------
def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans the SDK's console exporter printed (indented JSON objects)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


@pytest.mark.slow
async def test_the_worker_process_span_is_the_child_of_this_process_submit(
    app: Conveyor, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    env = conveyor_env(
        app.settings.database_url,
        PYTHONPATH=f"{Path(__file__).parent}:{conveyor_env('')['PYTHONPATH']}",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="conveyor-test-worker",
        OTEL_BSP_SCHEDULE_DELAY="50",
        CONVEYOR_POLL_INTERVAL="0.05",
        CONVEYOR_LOG_FORMAT="json",
    )
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(conveyor_cmd("worker", "traceapp"), env=env, stdout=fo, stderr=fe)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(app)), base_url="http://localhost"
            ) as client:
                r = await client.post(
                    "/api/jobs", json={"job_type": "traced_sync", "payload": {"n": 2}}
                )
                assert r.status_code == 201, r.text
                job_id = r.json()["job_id"]
                done = await finished(app, [job_id])
            assert done[job_id].state is JobState.COMPLETED
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, err.read_text()
    (submit,) = named(spans, "submit traced_sync")
    printed = console_spans(out.read_text())
    (process,) = [s for s in printed if s["name"] == "process traced_sync"]
    (inner,) = [s for s in printed if s["name"] == "sync handler work"]
    assert process["context"]["trace_id"] == f"0x{hex_trace(submit)}"
    assert process["parent_id"] == f"0x{submit.context.span_id:016x}"
    assert process["kind"] == "SpanKind.CONSUMER"
    assert process["attributes"]["conveyor.job.id"] == job_id
    assert process["resource"]["attributes"]["service.name"] == "conveyor-test-worker"
    assert inner["parent_id"] == process["context"]["span_id"]
    assert inner["context"]["trace_id"] == process["context"]["trace_id"]


@pytest.mark.parametrize(
    "header",
    ["garbage", "00-" + "f" * 32 + "-" + "0" * 16 + "-01", "00-" + "a" * 2000, "ff-" + "1" * 60],
)
async def test_a_hostile_traceparent_header_starts_a_new_trace(
    app: Conveyor, spans: InMemorySpanExporter, header: str
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(app)), base_url="http://localhost"
    ) as client:
        r = await client.post(
            "/api/jobs",
            json={"job_type": "traced_ok", "payload": {}},
            headers={"traceparent": header, "tracestate": header},
        )
    assert r.status_code == 201, r.text
    (submit,) = named(spans, "submit traced_ok")
    assert root_of(submit, spans).parent is None  # no remote parent taken from the header
    job = await app.store.get(r.json()["job_id"])
    assert job.metadata["traceparent"].split("-")[2] == format(submit.context.span_id, "016x")


async def test_without_a_global_provider_the_header_is_the_submit_spans_parent(
    app: Conveyor,
) -> None:
    """An application that hands Conveyor its own provider (``tracing.use``) and
    sets none globally: FastAPI makes no server span, Conveyor's middleware reads
    the ``traceparent`` header itself."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(app)), base_url="http://localhost"
        ) as client:
            r = await client.post(
                "/api/jobs",
                json={"job_type": "traced_ok", "payload": {}},
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
            )
        assert r.status_code == 201, r.text
    finally:
        tracing.use(None)
        provider.shutdown()
    (submit,) = named(exporter, "submit traced_ok")
    assert submit.parent is not None
    assert submit.parent.is_remote
    assert format(submit.parent.span_id, "016x") == CLIENT_SPAN
    assert hex_trace(submit) == CLIENT_TRACE


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver on a loopback port (what a collector
    does first: accept ``POST /v1/traces`` protobuf and answer 200)."""

    def __init__(self) -> None:
        import gzip
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        received: list[Any] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                if self.path == "/v1/traces":
                    received.append(request)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of every span received."""
        out = []
        for request in self.received:
            for rs in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    out.extend((service, span) for span in ss.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
async def test_a_worker_exports_over_otlp_to_a_collector(
    app: Conveyor, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT`` alone turns tracing on in a ``conveyor worker``
    (OTLP over HTTP, the ``otel`` extra's exporter); its span reaches the collector
    as the child of this process's submit span."""
    receiver = OtlpReceiver()
    env = conveyor_env(
        app.settings.database_url,
        PYTHONPATH=f"{Path(__file__).parent}:{conveyor_env('')['PYTHONPATH']}",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_SERVICE_NAME="otlp-worker",
        OTEL_BSP_SCHEDULE_DELAY="50",
        CONVEYOR_POLL_INTERVAL="0.05",
    )
    env.pop("OTEL_TRACES_EXPORTER", None)
    err = tmp_path / "worker.err"
    try:
        with err.open("w") as fe:
            proc = subprocess.Popen(
                conveyor_cmd("worker", "traceapp"), env=env, stdout=fe, stderr=fe
            )
            try:
                job = await app.enqueue("traced_ok", {"n": 3})
                done = await finished(app, [job.id])
                assert done[job.id].state is JobState.COMPLETED

                def exported() -> list[Any]:
                    return [s for _, s in receiver.spans() if s.name == "process traced_ok"]

                wait_until(exported, 20, "the worker's span at the collector")
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0, err.read_text()
        ((service, process),) = [
            (svc, s) for svc, s in receiver.spans() if s.name == "process traced_ok"
        ]
    finally:
        receiver.close()
    (submit,) = named(spans, "submit traced_ok")
    assert service == "otlp-worker"
    assert process.trace_id.hex() == hex_trace(submit)
    assert process.parent_span_id.hex() == f"{submit.context.span_id:016x}"
    attributes = {a.key: a.value for a in process.attributes}
    assert attributes["conveyor.job.id"].string_value == job.id
    assert attributes["conveyor.job.outcome"].string_value == "complete"


async def test_a_refused_submit_ends_its_span_in_error(
    app: Conveyor, spans: InMemorySpanExporter
) -> None:
    with pytest.raises(ValidationError, match="priority"):
        await app.enqueue("traced_ok", priority=500)
    (submit,) = named(spans, "submit traced_ok")
    assert submit.status.status_code is StatusCode.ERROR
    (event,) = [e for e in submit.events if e.name == "exception"]
    assert event.attributes["exception.type"].endswith("ValidationError")
    assert (await app.store.list_jobs(JobQuery())).jobs == []


# -- unsampled jobs and the context parse --------------------------------------------------
SAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
UNSAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"


async def test_an_unsampled_job_gets_no_span_and_its_handlers_spans_are_dropped(
    app: Conveyor, spans: InMemorySpanExporter
) -> None:
    """The default sampler follows the submit's decision: an unsampled job's attempt
    records nothing, and its handler's spans are not made roots of new traces."""

    async def own_spans(ctx: Any) -> None:
        # This test's provider (traceapp's module tracer is bound to the first one set).
        with trace.get_tracer("handler").start_as_current_span("handler work"):
            return None

    app.job("own_spans")(own_spans)
    tracing.use(None)  # stored as given
    kept = await app.enqueue("own_spans", metadata={"traceparent": SAMPLED})
    dropped = await app.enqueue("own_spans", metadata={"traceparent": UNSAMPLED})
    tracing.use(trace.get_tracer_provider())
    async with running_worker(app, concurrency=1):
        done = await finished(app, [kept.id, dropped.id])
    assert {j.state for j in done.values()} == {JobState.COMPLETED}
    (process,) = named(spans, "process own_spans")
    assert process.attributes is not None
    assert process.attributes["conveyor.job.id"] == kept.id
    assert process.parent is not None
    assert format(process.parent.span_id, "016x") == CLIENT_SPAN
    (work,) = named(spans, "handler work")
    assert work.parent is not None
    assert work.parent.span_id == process.context.span_id


async def test_a_sampler_that_ignores_the_parent_decides_for_unsampled_jobs(
    app: Conveyor,
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    job = await app.enqueue("traced_ok", metadata={"traceparent": UNSAMPLED})
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        async with running_worker(app, concurrency=1):
            await finished(app, [job.id])
    finally:
        tracing.use(None)
        provider.shutdown()
    (process,) = named(exporter, "process traced_ok")
    assert process.parent is not None
    assert format(process.parent.span_id, "016x") == CLIENT_SPAN


@pytest.mark.parametrize(
    ("traceparent", "tracestate"),
    [
        (SAMPLED, None),
        (UNSAMPLED, None),
        (f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-03", None),
        (SAMPLED, "vendor=value,other=x"),
        (SAMPLED.upper(), None),
        (f"00-{'0' * 32}-{CLIENT_SPAN}-01", None),
        (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),
        (f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future", None),
        (f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", None),
        (f" {SAMPLED} ", None),
        (SAMPLED + "0", None),
        (SAMPLED + "-extra", None),
    ],
)
def test_the_stored_context_is_read_as_the_w3c_propagator_reads_it(
    traceparent: str, tracestate: str | None
) -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider()
    tracing.use(provider)
    try:
        meta = {"traceparent": traceparent}
        carrier = dict(meta)
        if tracestate is not None:
            meta["tracestate"] = carrier["tracestate"] = tracestate
        ours = trace.get_current_span(tracing.extract(meta)).get_span_context()
        theirs = trace.get_current_span(
            TraceContextTextMapPropagator().extract(carrier)
        ).get_span_context()
        fields = ("trace_id", "span_id", "is_remote", "trace_flags", "is_valid")
        assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]
        assert dict(ours.trace_state) == dict(theirs.trace_state)
    finally:
        tracing.use(None)
        provider.shutdown()
