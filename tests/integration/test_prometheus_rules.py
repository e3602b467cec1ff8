"""The alert rules and the dashboard, proven: promtool checks and unit tests, every
metric they use is exposed by a real process, and a real Prometheus fires the
worker-down and DLQ alerts when a worker stops and the DLQ floods."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import metricsapp
import pytest
import yaml

from conveyor import Conveyor
from prometheus_server import PrometheusServer, need
from support import (
    FAST_WORKER_ENV,
    ROOT,
    WorkerProcess,
    async_wait_until,
    conveyor_cmd,
    conveyor_env,
    free_port,
    wait_until,
)

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules.test.yml"
EXAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "conveyor.json"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


# -- the files ---------------------------------------------------------------------------
def test_promtool_checks_the_rules() -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        t["alertname"] for case in tests for t in case["alert_rule_test"] if t.get("exp_alerts")
    }
    quiet = {
        t["alertname"] for case in tests for t in case["alert_rule_test"] if not t.get("exp_alerts")
    }
    assert len(alerts) >= 9
    assert alerts - fired == set(), "alerts no unit test fires"
    assert alerts - quiet == set(), "alerts no unit test shows quiet below threshold"


def test_the_example_prometheus_config_is_valid() -> None:
    proc = promtool("check", "config", EXAMPLE_CONFIG.name, cwd=EXAMPLE_CONFIG.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dashboard_has_the_seeds_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("queue depth over time", "worker health", "throughput", "error rates"):
        assert wanted in titles
    assert "p95" in titles
    assert "wait" in titles


# -- metric names used vs exposed -----------------------------------------------------------
_NAME = re.compile(r"\b(conveyor_[a-z0-9_]+|up)\b")


def used_metric_names() -> set[str]:
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in _NAME.findall(e)}
    return names - {"up"}  # Prometheus's own


_SUFFIXES = {  # a counter's TYPE line names it with its _total already
    "counter": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "summary": ("_count", "_sum", "_created"),
}


def exposed_metric_names(text: str) -> set[str]:
    """Sample names in a scrape, and those a declared family exposes once it has samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names |= {family + s for s in _SUFFIXES.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class UpProcess:
    """``conveyor up --app metricsapp`` on a free loopback port."""

    def __init__(self, db_url: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            conveyor_cmd("up", "--port", str(self.port), "--app", "metricsapp"),
            env=conveyor_env(db_url, **FAST_WORKER_ENV),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._healthy, 30, f"conveyor up on port {self.port}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"conveyor up exited:\n{self.log.read_text()}")
        try:
            return httpx.get(f"{self.base}/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def start_worker(tmp_path: Path, db_url: str) -> tuple[WorkerProcess, int]:
    port = free_port()
    w = WorkerProcess(
        db_url,
        tmp_path / "worker.out",
        "metricsapp",
        CONVEYOR_METRICS_PORT=str(port),
        **FAST_WORKER_ENV,
    )

    def ready() -> bool:
        assert w.proc.poll() is None, w.output()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 30, "the worker's /ready")
    return w, port


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'prom.db'}"


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[tuple[UpProcess, WorkerProcess, int]]:
    up = UpProcess(db_url, tmp_path / "up.out")
    try:
        worker, port = start_worker(tmp_path, db_url)
        try:
            yield up, worker, port
        finally:
            if worker.proc.poll() is None:
                worker.signal(signal.SIGTERM)
            worker.wait()
    finally:
        up.stop()


async def submit(db_url: str, job_type: str, n: int) -> None:
    async with Conveyor(db_url) as app:
        metricsapp.register(app)
        await app.submit_many([app.new_job(job_type) for _ in range(n)])


async def count_in(db_url: str, state: str) -> int:
    async with Conveyor(db_url) as app:
        counts = await app.store.count_by_state()
        return sum(n for s, n in counts.items() if s.value == state)


async def test_every_metric_the_rules_and_dashboard_use_is_exposed(
    fleet: tuple[UpProcess, WorkerProcess, int], db_url: str
) -> None:
    up, _worker, port = fleet
    await submit(db_url, "ok", 20)
    await submit(db_url, "boom", 2)

    async def settled() -> bool:
        return await count_in(db_url, "completed") == 20 and await count_in(db_url, "failed") == 2

    await async_wait_until(settled, 30, "20 completed and 2 dead-lettered jobs")
    async with httpx.AsyncClient(timeout=5.0) as c:
        await c.get(f"{up.base}/api/jobs")  # an /api route in the latency histogram
        texts = [(await c.get(f"{up.base}/metrics")).text]
        texts.append((await c.get(f"http://127.0.0.1:{port}/metrics")).text)
    exposed = set().union(*(exposed_metric_names(t) for t in texts))
    used = used_metric_names()
    assert len(used) >= 15
    assert used - exposed == set(), "used by rules.yml or the dashboard, but not exposed"
    # One of the two processes exports the fleet gauges, the other does not.
    exporters = [("conveyor_queue_depth{" in t) for t in texts]
    assert sorted(exporters) == [False, True]


# -- end to end: a real Prometheus fires the alerts --------------------------------------
def fast_rules(tmp_path: Path) -> Path:
    """rules.yml with every group evaluated each 500 ms and every ``for:`` 1 s."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "500ms"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def alert_names(alerts: list[dict[str, Any]]) -> set[str]:
    return {a["labels"]["alertname"] for a in alerts}


async def test_prometheus_fires_worker_down_and_dlq_alerts(
    tmp_path: Path, fleet: tuple[UpProcess, WorkerProcess, int], db_url: str
) -> None:
    up, worker, port = fleet
    prom = PrometheusServer(
        tmp_path,
        {
            "conveyor-api": [f"127.0.0.1:{up.port}"],
            "conveyor-worker": [f"127.0.0.1:{port}"],
        },
        fast_rules(tmp_path),
    ).start()
    try:

        def scraped() -> bool:
            healthy = [t for t in prom.targets() if t["health"] == "up"]
            fleet_up = prom.query("max(conveyor_fleet_exporter) == 1")
            return len(healthy) == 2 and bool(fleet_up)

        wait_until(scraped, 30, "Prometheus scraping both processes and the fleet gauges")
        assert not {"ConveyorWorkerDown", "ConveyorDLQAccumulation"} & alert_names(prom.firing())

        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()
        await submit(db_url, "boom", 60)  # up's own worker dead-letters them

        def both_fire() -> list[dict[str, Any]] | None:
            firing = prom.firing()
            names = alert_names(firing)
            if {"ConveyorWorkerDown", "ConveyorDLQAccumulation"} <= names:
                return firing
            return None

        firing = wait_until(both_fire, 60, "ConveyorWorkerDown and ConveyorDLQAccumulation")
        (down,) = [a for a in firing if a["labels"]["alertname"] == "ConveyorWorkerDown"]
        assert down["labels"]["job"] == "conveyor-worker"
        assert down["labels"]["instance"] == f"127.0.0.1:{port}"
        assert down["labels"]["severity"] == "critical"
        (dlq,) = [a for a in firing if a["labels"]["alertname"] == "ConveyorDLQAccumulation"]
        assert float(dlq["value"]) > 50
        # The DLQ count Prometheus sees is the store's (the fleet gauge, not a sum).
        (total,) = prom.query("conveyor:dlq_jobs:total")
        assert float(total["value"][1]) == await count_in(db_url, "failed") == 60
    finally:
        prom.stop()
