"""JSON logs (``CONVEYOR_LOG_FORMAT=json``) of a real ``conveyor worker``, and
tracing switched on and off by ``OTEL_*`` variables alone (docs/tracing.md)."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from test_tracing import console_spans

from contract.appkit import finished
from conveyor.app import Conveyor
from conveyor.domain.errors import ConfigurationError
from conveyor.observability.logging import configure_logging
from conveyor.settings import Settings
from support import conveyor_cmd, conveyor_env, free_port, run_cli, wait_until


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[Conveyor]:
    cv = Conveyor(
        settings=Settings(
            database_url=f"sqlite:///{tmp_path}/logs.db",
            poll_interval=0.05,
            allow_unknown_job_types=True,  # the worker process registers them
        )
    )
    async with cv:
        yield cv


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


def run_worker(db_url: str, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], Any]:
    out, err = (tmp_path / "worker.out").open("w"), (tmp_path / "worker.err").open("w")
    proc = subprocess.Popen(
        conveyor_cmd("worker", "traceapp"),
        env=conveyor_env(
            db_url,
            PYTHONPATH=f"{Path(__file__).parent}:{conveyor_env('')['PYTHONPATH']}",
            CONVEYOR_LOG_FORMAT="json",
            CONVEYOR_POLL_INTERVAL="0.05",
            **env,
        ),
        stdout=out,
        stderr=err,
    )
    return proc, (out, err)


def stop(
    proc: subprocess.Popen[bytes], files: Any, tmp_path: Path, name: str = "worker.err"
) -> list[dict[str, Any]]:
    """SIGTERM, then every stderr line as JSON (each must parse and name its event)."""
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    for f in files:
        f.close()
    text = (tmp_path / name).read_text()
    assert code == 0, text
    lines = []
    for raw in text.splitlines():
        line = json.loads(raw)  # every line is one JSON object
        assert isinstance(line, dict), raw
        assert isinstance(line["event"], str), raw
        assert line["event"], raw
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), raw
        assert line["timestamp"].endswith("Z") or "+00:00" in line["timestamp"], raw
        lines.append(line)
    return lines


@pytest.mark.slow
async def test_worker_json_logs_name_the_job_worker_and_trace(
    app: Conveyor, tmp_path: Path
) -> None:
    proc, files = run_worker(
        app.settings.database_url,
        tmp_path,
        CONVEYOR_LOG_LEVEL="INFO",
        OTEL_TRACES_EXPORTER="console",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    try:
        ok = [await app.enqueue("traced_ok", {"n": i}) for i in range(5)]
        bad = await app.enqueue("always_fails", max_retries=0)
        warns = await app.enqueue("logs_a_warning")
        await finished(app, [j.id for j in [*ok, bad, warns]])
    finally:
        lines = stop(proc, files, tmp_path)
    (started,) = [x for x in lines if x["event"] == "worker_started"]
    worker_id = started["worker_id"]
    (dead,) = [x for x in lines if x["event"] == "job_dead_lettered"]
    assert dead["job_id"] == bad.id
    assert dead["worker_id"] == worker_id
    assert dead["level"] == "warning"
    assert "this job always fails" in dead["error"]
    # Logged inside the attempt's span: the trace of the job's process span.
    (span,) = [
        s
        for s in console_spans((tmp_path / "worker.out").read_text())
        if s["name"] == "process always_fails"
    ]
    assert dead["trace_id"] == span["context"]["trace_id"].removeprefix("0x")
    # The handler's own line (ctx.logger) names its job, worker and trace.
    (own,) = [x for x in lines if x["event"] == "handler_noticed_something"]
    assert own["job_id"] == warns.id
    assert own["worker_id"] == worker_id
    (warn_span,) = [
        s
        for s in console_spans((tmp_path / "worker.out").read_text())
        if s["name"] == "process logs_a_warning"
    ]
    assert own["trace_id"] == warn_span["context"]["trace_id"].removeprefix("0x")
    assert own["span_id"] == warn_span["context"]["span_id"].removeprefix("0x")
    # No per-job line at INFO for jobs that simply succeed.
    text = (tmp_path / "worker.err").read_text()
    assert not any(j.id in text for j in ok)


@pytest.mark.slow
async def test_debug_level_has_a_line_per_job(app: Conveyor, tmp_path: Path) -> None:
    proc, files = run_worker(app.settings.database_url, tmp_path, CONVEYOR_LOG_LEVEL="DEBUG")
    try:
        jobs = [await app.enqueue("traced_ok", {"n": i}) for i in range(3)]
        await finished(app, [j.id for j in jobs])
        wait_until(
            lambda: (tmp_path / "worker.err").read_text().count("job_finished") >= 3,
            10,
            "the job_finished lines",
        )
    finally:
        lines = stop(proc, files, tmp_path)
    (started,) = [x for x in lines if x["event"] == "worker_started"]
    done = {x["job_id"]: x for x in lines if x["event"] == "job_finished"}
    assert set(done) >= {j.id for j in jobs}
    for j in jobs:
        assert done[j.id]["worker_id"] == started["worker_id"]
        assert done[j.id]["outcome"] == "complete"
        assert done[j.id]["level"] == "debug"
        assert done[j.id]["duration_ms"] >= 0
        assert "trace_id" not in done[j.id]  # tracing is off in this worker


def test_json_format_in_process(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream, fmt="json")
    structlog.get_logger("t").warning("thing_failed", job_id="j1", password="hunter2")
    try:
        raise ValueError("with postgresql://u:secret@db/x inside")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("boom %s", "here")
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert first["event"] == "thing_failed"
    assert first["job_id"] == "j1"
    assert first["password"] == "***"
    assert first["level"] == "warning"
    assert second["event"] == "uvicorn.error"
    assert second["message"] == "boom here"
    assert "ValueError" in second["exception"]
    assert "secret" not in second["exception"]
    with pytest.raises(ConfigurationError, match="log format"):
        configure_logging("INFO", stream, fmt="xml")
    with pytest.raises(ConfigurationError, match="log_format"):
        Settings(log_format="xml")
    assert Settings.from_env({"CONVEYOR_LOG_FORMAT": "json"}).log_format == "json"


def test_cli_refuses_an_unknown_log_format(tmp_path: Path) -> None:
    proc = run_cli(f"sqlite:///{tmp_path}/x.db", "status", check=False, CONVEYOR_LOG_FORMAT="xml")
    assert proc.returncode == 2
    assert "xml" in proc.stderr


def test_cli_refuses_an_unknown_log_level(tmp_path: Path) -> None:
    # It used to fall back to INFO silently.
    url = f"sqlite:///{tmp_path}/x.db"
    proc = run_cli(url, "status", check=False, CONVEYOR_LOG_LEVEL="LOUD")
    assert proc.returncode == 2
    assert "LOUD" in proc.stderr
    assert run_cli(url, "status", check=False, CONVEYOR_LOG_LEVEL="warning").returncode == 0


# -- configuration by OTEL_* variables only -------------------------------------------
PROBE = (
    "from conveyor.observability import tracing; from conveyor.app import Conveyor; "
    "Conveyor('memory://'); print('ON' if tracing.enabled() else 'OFF')"
)


@pytest.mark.parametrize(
    ("env", "expected", "warning"),
    [
        ({}, "OFF", None),
        ({"OTEL_TRACES_EXPORTER": "console"}, "ON", None),
        ({"OTEL_TRACES_EXPORTER": "none"}, "OFF", None),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, "OFF", None),
        ({"OTEL_TRACES_EXPORTER": "no_such_exporter"}, "OFF", "no trace exporter"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
            "OFF",
            "unsupported OTLP protocol",
        ),
    ],
)
def test_tracing_is_configured_by_otel_variables_alone(
    env: dict[str, str], expected: str, warning: str | None
) -> None:
    base = {k: v for k, v in conveyor_env("memory://").items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected, proc.stderr
    if warning is not None:
        assert "tracing_unavailable" in proc.stderr
        assert warning in proc.stderr


@pytest.mark.slow
def test_up_with_json_logs_and_tracing(tmp_path: Path) -> None:
    """``conveyor up``: stderr is JSON lines only (the banner too); a request's
    ``traceparent`` header is the parent of the submit span, and the job's
    process span its child, over a real HTTP server."""
    port = free_port()
    out, err = (tmp_path / "up.out").open("w"), (tmp_path / "up.err").open("w")
    proc = subprocess.Popen(
        conveyor_cmd("up", "--port", str(port)),
        env=conveyor_env(
            f"sqlite:///{tmp_path}/up.db",
            CONVEYOR_LOG_FORMAT="json",
            CONVEYOR_POLL_INTERVAL="0.05",
            OTEL_TRACES_EXPORTER="console",
            OTEL_BSP_SCHEDULE_DELAY="50",
        ),
        stdout=out,
        stderr=err,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "up.err").read_text()
            try:
                return httpx.get(f"{base}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 20, "conveyor up")
        r = httpx.post(
            f"{base}/api/jobs",
            json={"job_type": "test_job", "payload": {"message": "hi"}},
            headers={"traceparent": f"00-{TRACE}-{SPAN}-01"},
        )
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        wait_until(
            lambda: httpx.get(f"{base}/api/jobs/{job_id}").json()["job"]["status"] == "completed",
            20,
            "the job",
        )
    finally:
        lines = stop(proc, (out, err), tmp_path, "up.err")
    (started,) = [x for x in lines if x["event"] == "api_started"]
    assert started["url"] == f"http://localhost:{port}"
    spans = console_spans((tmp_path / "up.out").read_text())
    (submit,) = [s for s in spans if s["name"] == "submit test_job"]
    (process,) = [s for s in spans if s["name"] == "process test_job"]
    by_id = {s["context"]["span_id"]: s for s in spans}
    root = submit  # FastAPI's own server spans may sit between the caller and the submit
    while root["parent_id"] in by_id:
        root = by_id[root["parent_id"]]
    assert root["parent_id"] == f"0x{SPAN}"
    assert submit["context"]["trace_id"] == process["context"]["trace_id"] == f"0x{TRACE}"
    assert process["parent_id"] == submit["context"]["span_id"]
    assert process["attributes"]["conveyor.job.outcome"] == "complete"


TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"


def test_without_the_sdk_tracing_stays_off_with_a_warning() -> None:
    """The ``otel`` extra left out: asked-for traces log ``tracing_unavailable``, jobs
    are submitted as usual and carry no trace context."""
    script = (
        "import sys\n"
        "class NoSdk:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry.sdk' or name.startswith('opentelemetry.sdk.'):\n"
        "            raise ImportError('no SDK here')\n"
        "sys.meta_path.insert(0, NoSdk())\n"
        "import asyncio\n"
        "from conveyor.app import Conveyor\n"
        "from conveyor.observability import tracing\n"
        "async def main():\n"
        "    async with Conveyor('memory://') as app:\n"
        "        app.job('t')(lambda ctx: None)\n"
        "        job = await app.enqueue('t')\n"
        "        print('ON' if tracing.enabled() else 'OFF', sorted(job.metadata))\n"
        "asyncio.run(main())\n"
    )
    base = {k: v for k, v in conveyor_env("memory://").items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**base, "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OFF []", proc.stderr
    assert "tracing_unavailable" in proc.stderr
    assert "SDK is not installed" in proc.stderr
