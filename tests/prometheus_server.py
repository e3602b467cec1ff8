"""A private Prometheus server for the alerting tests (Debian's `prometheus` package).

Started in a temp dir on 127.0.0.1 and a free port, never as a system service;
scrapes the given targets every ``interval`` and evaluates the given rule file.
Without the binary: the test skips locally and fails when ``$CI`` is set
(scripts/test.sh installs it when run as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import free_port, wait_until


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(binary: str) -> str:
    """The path of ``binary`` (promtool, prometheus), or skip/fail the test."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} not found: install it with `apt-get install -y prometheus`"
        if in_ci():
            pytest.fail(f"{message}. CI must run the Prometheus tests.", pytrace=False)
        pytest.skip(f"{message} (scripts/test.sh does this when run as root)")
    return path


class PrometheusServer:
    def __init__(
        self,
        workdir: Path,
        targets: dict[str, list[str]],
        rules: Path,
        *,
        interval: str = "500ms",
    ) -> None:
        self.binary = need("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": hosts}],
                }
                for job, hosts in targets.items()
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrometheusServer:
        self._fh = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        wait_until(self._ready, 30, f"Prometheus on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base}/-/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        resp = httpx.get(f"{self.base}/api/v1/{path}", params=params, timeout=5.0)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()
