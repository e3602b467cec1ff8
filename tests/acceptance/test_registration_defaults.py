"""A job type's registration is the source of its defaults wherever the job is
submitted (the CLI here; REST in tests/contract/test_entry_points.py), and a
worker says at start which registered types wait in a queue it does not serve."""

from __future__ import annotations

import json
from pathlib import Path

from structlog.testing import capture_logs

from conveyor import Conveyor
from conveyor.settings import Settings
from support import run_cli, running_worker


def test_cli_submit_takes_the_registration_defaults(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/defaults.db"
    # hostileapp registers `charge` with queue="payments", max_retries=0.
    made = run_cli(
        db,
        "jobs",
        "submit",
        "charge",
        "--app",
        "hostileapp",
        "--json",
        "--payload",
        '{"order_id": "o-1"}',
    )
    job = json.loads(made.stdout)
    assert (job["queue"], job["max_retries"]) == ("payments", 0)
    shown = json.loads(run_cli(db, "jobs", "show", job["id"], "--json").stdout)
    assert (shown["queue"], shown["max_retries"]) == ("payments", 0)
    # An option given on the command line still wins over the registration.
    again = run_cli(
        db,
        "jobs",
        "submit",
        "charge",
        "--app",
        "hostileapp",
        "--json",
        "--payload",
        '{"order_id": "o-2"}',
        "--max-retries",
        "2",
    )
    assert json.loads(again.stdout)["max_retries"] == 2


async def test_a_worker_warns_for_each_registered_type_whose_queue_it_does_not_serve(
    tmp_path: Path,
) -> None:
    app = Conveyor(settings=Settings(database_url=f"sqlite:///{tmp_path}/w.db"))

    @app.job("charge", queue="payments")
    async def charge(ctx: object) -> None:
        return None

    @app.job("plain")
    async def plain(ctx: object) -> None:
        return None

    async with app:
        with capture_logs() as logs:
            async with running_worker(app):  # serves the default queue only
                pass
    warned = [e for e in logs if e["event"] == "job_type_queue_not_served"]
    assert [(e["job_type"], e["queue"]) for e in warned] == [("charge", "payments")]
    assert "--queue payments" in warned[0]["hint"]
