"""``conveyor up`` / ``conveyor api``: uvicorn + workers in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Iterator

import structlog
import uvicorn
from rich.console import Console
from rich.markup import escape

from conveyor import demo
from conveyor.api.app import create_app
from conveyor.api.guard import is_loopback_name
from conveyor.app import Conveyor
from conveyor.domain.errors import ConfigurationError
from conveyor.observability.metrics import Metrics
from conveyor.runtime.worker import Worker, exit_if_abandoned
from conveyor.security.redact import redact_url

log = structlog.get_logger("conveyor.serve")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve_forever`` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot listen on {host}:{port} ({exc.strerror}): choose another --port"
            ) from None


async def serve_forever(
    app: Conveyor,
    *,
    host: str,
    port: int,
    with_worker: bool,
    console: Console,
    max_body_bytes: int,
) -> None:
    await app.open()
    worker: Worker | None = None
    try:
        keys = await app.store.count_api_keys()
        loopback = is_loopback_name(host)
        if not loopback and keys == 0:
            raise ConfigurationError(
                f"Refusing to listen on {host} without API keys: create one with "
                "`conveyor keys create --scope admin --name ops`, or bind to 127.0.0.1"
            )
        check_port(host, port)
        metrics = Metrics()
        app.on_finish(metrics.job_finished)
        app.signals.on_observe(metrics.observe)
        # Every queue a registered type names, so `up` runs all of its own jobs.
        queues = sorted({*app.settings.queues, *(d.queue for d in app.registry.values())})
        worker = app.worker(queues=queues) if with_worker else None
        # `up` fires cron schedules too (any number of processes may: docs/schedules.md).
        scheduler = app.scheduler() if with_worker and app.settings.scheduler else None
        api = create_app(
            app,
            allow_anonymous=loopback,
            max_body_bytes=max_body_bytes,
            metrics=metrics,
            workers=[worker] if worker is not None else [],
        )
        config = uvicorn.Config(
            api,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # uvicorn's lines go through Conveyor's logging: bounded and redacted.
            log_config=None,
            # proxy_headers and forwarded_allow_ips keep uvicorn's defaults: a TLS
            # proxy's X-Forwarded-Proto counts from FORWARDED_ALLOW_IPS only (the
            # dashboard cookie's Secure flag; docs/dashboard.md).
        )
        server = _Server(config)
        gc.freeze()  # everything imported so far lives for the whole process

        base = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}"
        console.print(
            f"[bold green]Conveyor[/] API on {base}  (docs: {base}/docs)", highlight=False
        )
        database = escape(redact_url(app.settings.database_url))
        console.print(f"  database: {database}", highlight=False)
        if worker is not None:
            types = escape(", ".join(sorted(app.registry)))
            console.print(f"  worker: {worker.concurrency} slots for {types}", highlight=False)
        if scheduler is not None:
            console.print(
                f"  scheduler: on ({len(app.schedules)} schedule(s) declared in code)",
                highlight=False,
            )
        if keys == 0:
            console.print(
                "  auth: [yellow]off[/] (loopback only, no API key exists; "
                "`conveyor keys create` turns it on)",
                highlight=False,
            )
        else:
            console.print(f"  auth: on ({keys} active API key(s))", highlight=False)
        console.print(
            "  try: curl -s -X POST " + base + "/api/jobs -H 'Content-Type: application/json' "
            '-d \'{"job_type": "test_job", "payload": {"message": "hello"}}\'',
            highlight=False,
            soft_wrap=True,
        )
        if "test_job" in app.registry and "fail" in app.registry:
            console.print(f"  demo types: {escape(demo.SUMMARY)}", highlight=False)
        grace = app.settings.shutdown_grace
        if app.settings.log_format == "json":  # the banner, as one line for log collectors
            log.info(
                "api_started",
                url=base,
                database=redact_url(app.settings.database_url),
                worker_concurrency=worker.concurrency if worker is not None else 0,
                auth=keys > 0,
            )
        console.print(
            f"  stop: Ctrl-C (running jobs get {grace:g} s to finish; a second Ctrl-C stops "
            "at once)",
            highlight=False,
        )

        loop = asyncio.get_running_loop()

        def stop(escalate: bool = True) -> None:
            """A signal: stop gracefully; a second signal: stop now."""
            if server.should_exit and escalate:
                server.force_exit = True
                console.print(
                    "Stopping now. " + what_a_forced_stop_does(app.settings.heartbeat_timeout),
                    highlight=False,
                )
            elif escalate and worker is not None and worker.jobs_running:
                console.print(
                    f"Stopping: waiting up to {grace:g} s for {worker.jobs_running} running "
                    "job(s). Ctrl-C again to stop at once: "
                    + what_a_forced_stop_does(app.settings.heartbeat_timeout),
                    highlight=False,
                )
            server.should_exit = True
            if worker is not None and (escalate or not worker.stopping):
                worker.request_stop()
            if scheduler is not None:
                scheduler.request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        try:
            tasks = [asyncio.create_task(server.serve(), name="uvicorn")]
            if worker is not None:
                tasks.append(asyncio.create_task(worker.run(), name="worker"))
            if scheduler is not None:
                tasks.append(asyncio.create_task(scheduler.run(), name="scheduler"))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            stop(escalate=False)  # one part ended (or failed): stop the other, gracefully
            await asyncio.gather(*tasks)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    finally:
        await app.close()
        if worker is not None:
            exit_if_abandoned(worker)


def what_a_forced_stop_does(heartbeat_timeout: float) -> str:
    """What a stop without grace means for running jobs, as the worker does it
    (``Worker._drain``): only a job whose code has stopped can be handed back."""
    return (
        "a job whose code stops is handed back to pending (its attempt not counted); "
        "code that keeps running is not handed back: once this process has exited, "
        f"a worker rescues its job after the heartbeat timeout ({heartbeat_timeout:g} s) "
        "and runs it again as a new attempt"
    )
