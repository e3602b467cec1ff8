"""The README's shell blocks, run as a newcomer would, unattended.

The quick start's first command (``scripts/up.sh``) is started as written, on a
free port and a temporary database; the second (``scripts/test.sh``) is this
suite, so it is not run again. The block that talks to the server then runs in
bash with ``set -e`` after three stated substitutions: the server's port for
8000, and the id of the job the block submitted for ``<job_id>``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
from test_up import FAST, free_port

from support import ROOT, conveyor_env, wait_until

BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_blocks_run_as_written(tmp_path: Path):
    blocks = readme_blocks()
    quick_start, talk = blocks[0], blocks[1]
    assert "scripts/up.sh" in quick_start
    assert "scripts/test.sh" in quick_start
    port = free_port()
    db = f"sqlite:///{tmp_path / 'readme.db'}"
    env = conveyor_env(db, **FAST)
    log = (tmp_path / "up.log").open("w")
    server = subprocess.Popen(
        ["bash", "scripts/up.sh", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "up.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 60, "scripts/up.sh to serve")
        script = talk.replace(":8000", f":{port}").replace(
            "<job_id>",
            f"$(curl -s 'localhost:{port}/api/jobs?limit=1' | python3 -c "
            '\'import json,sys; print(json.load(sys.stdin)["jobs"][0]["job_id"])\')',
        )
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert '"success":true' in out
        assert "job_submitted" in out  # the events
        assert "SMOKE TEST PASSED" in out
        assert "Queue depths" in out or "pending" in out  # conveyor status
    finally:
        server.terminate()
        server.wait(30)
        log.close()
