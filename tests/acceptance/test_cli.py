"""The ``conveyor`` command, run as a user runs it: in subprocesses."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from support import WorkerProcess, run_cli, wait_until

FAST = {
    "CONVEYOR_HEARTBEAT_INTERVAL": "0.2",
    "CONVEYOR_HEARTBEAT_TIMEOUT": "1.0",
    "CONVEYOR_POLL_INTERVAL": "0.05",
}


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def show(db: str, job_id: str) -> dict:
    return json.loads(run_cli(db, "jobs", "show", job_id, "--json").stdout)


def submit(db: str, *args: str) -> dict:
    return json.loads(run_cli(db, "jobs", "submit", *args, "--json").stdout)


def test_submit_worker_status_cancel_and_dlq(db, tmp_path):
    assert "up to date" in run_cli(db, "migrate").stdout
    ok = submit(db, "test_job", "--payload", '{"message": "hello"}', "--priority", "70")
    assert ok["status"] == "pending"
    assert ok["priority"] == 70
    delayed = submit(db, "test_job", "--payload", "{}", "--delay", "3600")
    doomed = submit(db, "fail", "--payload", '{"times": 5, "permanent": true}')
    retried = submit(db, "fail", "--payload", '{"times": 1}', "--max-retries", "2")

    # Before any worker runs, status says which job types wait for one.
    status = json.loads(run_cli(db, "status", "--json").stdout)
    assert status["live_workers"] == 0
    assert {u["job_type"] for u in status["unserved_job_types"]} == {"test_job", "fail"}
    assert status["queue_depths"]["pending"] == 4

    w = WorkerProcess(db, tmp_path / "worker.out", "conveyor.demo", **FAST)
    try:
        wait_until(lambda: show(db, ok["job_id"])["status"] == "completed", 20, "test_job")
        assert show(db, ok["job_id"])["result"] == {"message": "hello"}
        wait_until(lambda: show(db, doomed["job_id"])["status"] == "failed", 20, "dead letter")
        wait_until(lambda: show(db, retried["job_id"])["status"] == "completed", 20, "retry")
        r = show(db, retried["job_id"])
        assert [e["outcome"] for e in r["executions"]] == ["retry", "completed"]

        status = json.loads(run_cli(db, "status", "--json").stdout)
        assert status["live_workers"] == 1
        assert status["unserved_job_types"] == []
        # The worker runs the outbox consumers (they skip ahead: nothing listens).
        assert {c["name"] for c in status["outbox"]["consumers"]} == {"relay", "webhooks"}
        assert status["outbox"]["latest_event_id"] > 0
        assert "Outbox" in run_cli(db, "status").stdout

        # The delayed job waits; cancelling it is immediate.
        assert show(db, delayed["job_id"])["status"] == "pending"
        out = run_cli(db, "jobs", "cancel", delayed["job_id"]).stdout
        assert "cancelled" in out
        again = run_cli(db, "jobs", "cancel", delayed["job_id"], check=False)
        assert again.returncode == 1
        assert "Cannot cancel job in cancelled status" in again.stderr

        # A running job is cancelled once its worker confirms.
        sleeper = submit(db, "sleep", "--payload", '{"seconds": 60}')
        wait_until(lambda: show(db, sleeper["job_id"])["status"] == "running", 20, "sleep")
        assert "cancelling" in run_cli(db, "jobs", "cancel", sleeper["job_id"]).stdout
        wait_until(lambda: show(db, sleeper["job_id"])["status"] == "cancelled", 10, "confirm")

        # Dead-letter queue: list, retry (fails again: permanent), purge.
        dl = json.loads(run_cli(db, "dlq", "list", "--json").stdout)
        assert [j["job_id"] for j in dl["jobs"]] == [doomed["job_id"]]
        assert "Re-queued 1" in run_cli(db, "dlq", "retry", doomed["job_id"]).stdout
        wait_until(
            lambda: (
                len(show(db, doomed["job_id"])["executions"]) == 2
                and show(db, doomed["job_id"])["status"] == "failed"
            ),
            20,
            "second dead letter",
        )
        assert "Purged 1" in run_cli(db, "dlq", "purge", "--all").stdout
        gone = run_cli(db, "jobs", "show", doomed["job_id"], check=False)
        assert gone.returncode == 1
        assert "not found" in gone.stderr
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()

    listed = json.loads(run_cli(db, "jobs", "list", "--status", "completed", "--json").stdout)
    assert {j["job_id"] for j in listed["jobs"]} == {ok["job_id"], retried["job_id"]}
    # A comma list, as the REST API takes it; a bad state names the allowed ones.
    both = run_cli(db, "jobs", "list", "--status", "completed,cancelled", "--json").stdout
    assert len(json.loads(both)["jobs"]) == 4
    bad = run_cli(db, "jobs", "list", "--status", "pending,done", check=False)
    assert bad.returncode == 2
    assert "Unknown status 'done'" in bad.stderr


def test_idempotency_key_returns_the_first_job(db):
    first = submit(db, "test_job", "--idempotency-key", "order-42")
    second = submit(db, "test_job", "--idempotency-key", "order-42")
    assert second["duplicate"] is True
    assert second["job_id"] == first["job_id"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "submit", "test_job", "--payload", "{nope"], "not valid JSON"),
        (["jobs", "submit", "test_job", "--payload", "[1]"], "must be a JSON object"),
        (["jobs", "submit", "sleep", "--payload", '{"seconds": "x"}'], "payload.seconds"),
        (["jobs", "submit", "sleep", "--payload", '{"bogus": 1}'], "payload.bogus"),
        (["jobs", "submit", "bad type!"], "job_type"),
        (["jobs", "submit", "test_job", "--priority", "101"], "from 0 to 100"),
        (["jobs", "show", "nope"], "is not a job id"),
        (["jobs", "show", "abcdef0123"], "not found"),
        (["dlq", "retry"], "Give job ids or --all"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(db, args, message):
    proc = run_cli(db, *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    status = json.loads(run_cli(db, "status", "--json").stdout)
    assert sum(status["queue_depths"].values()) == 0


def test_bad_database_url_is_explained(tmp_path):
    proc = run_cli("mysql://x", "status", check=False)
    assert proc.returncode == 1
    assert "Unsupported database URL" in proc.stderr
    proc = run_cli(f"sqlite:///{tmp_path}/missing/dir/x.db", "status", check=False)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr


def test_webhooks_list_and_enable_replays_the_missed_events(db, tmp_path):
    import asyncio
    from datetime import UTC, datetime, timedelta

    from conveyor.app import store_from_url
    from conveyor.domain.webhooks import (
        DeliveryAttempt,
        DeliveryOutcome,
        DisablePolicy,
        Webhook,
    )

    start = datetime.now(UTC)

    async def disable() -> None:
        store = store_from_url(db)
        await store.open()
        try:
            await store.create_webhook(
                Webhook("wh_cli", "https://example.com/h", ("job_submitted",), "s" * 32, start)
            )
            for n in range(3):  # failing for two hours
                attempt = DeliveryAttempt(
                    "wh_cli", f"d{n}", 0, "job_submitted", None, 1,
                    DeliveryOutcome.FAILED, 500, "HTTP 500", 1.0, start + timedelta(hours=n),
                )  # fmt: skip
                await store.record_delivery(attempt, DisablePolicy(3600, 3))
        finally:
            await store.close()

    asyncio.run(disable())
    listed = json.loads(run_cli(db, "webhooks", "list", "--json").stdout)
    assert [(w["id"], w["state"]) for w in listed] == [("wh_cli", "disabled")]
    assert "secret" not in listed[0]
    submit(db, "test_job", "--payload", "{}")  # missed: the endpoint is disabled
    submit(db, "test_job", "--payload", "{}")

    enabled = run_cli(db, "webhooks", "enable", "wh_cli")
    assert "Webhook wh_cli is active; 2 missed event(s) queued for delivery" in enabled.stdout
    again = run_cli(db, "webhooks", "enable", "wh_cli")
    assert "0 missed event(s)" in again.stdout
    listed = json.loads(run_cli(db, "webhooks", "list", "--json").stdout)
    assert listed[0]["state"] == "active"
    unknown = run_cli(db, "webhooks", "enable", "wh_nope", check=False)
    assert unknown.returncode == 1
    assert "Webhook 'wh_nope' not found" in unknown.stderr


def test_ids_are_never_cut_and_a_unique_prefix_names_a_job(db):
    first = submit(db, "test_job", "--payload", '{"n": 1}')
    second = submit(db, "test_job", "--payload", '{"n": 2}')
    narrow = run_cli(db, "jobs", "list", COLUMNS="80").stdout
    assert first["job_id"] in narrow  # whole, in an 80-column terminal
    assert second["job_id"] in narrow
    # Ids start with their creation time: the end tells them apart.
    common = 0
    while first["job_id"][common] == second["job_id"][common]:
        common += 1
    prefix = first["job_id"][: max(common + 1, 6)]
    shown = json.loads(run_cli(db, "jobs", "show", prefix, "--json").stdout)
    assert shown["job_id"] == first["job_id"]
    if common >= 6:
        ambiguous = run_cli(db, "jobs", "show", first["job_id"][:common], check=False)
        assert ambiguous.returncode == 1
        assert "ambiguous" in ambiguous.stderr
        assert second["job_id"] in ambiguous.stderr
    short = run_cli(db, "jobs", "cancel", "01a2", check=False)
    assert short.returncode == 1
    assert "at least 6" in short.stderr
    assert "cancelled" in run_cli(db, "jobs", "cancel", prefix).stdout
    missing = run_cli(db, "jobs", "show", "ffffffffff", check=False)
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_a_unique_prefix_names_a_workflow_in_show_cancel_and_retry(db, tmp_path):
    definition = tmp_path / "wf.json"
    definition.write_text(
        json.dumps({"name": "pair", "steps": [{"name": "a", "job_type": "test_job"}]})
    )

    def submit_workflow() -> str:
        return json.loads(run_cli(db, "workflows", "submit", str(definition), "--json").stdout)[
            "id"
        ]

    first, second = submit_workflow(), submit_workflow()
    common = 0
    while first[common] == second[common]:
        common += 1
    prefix = first[: max(common + 1, 6)]
    shown = json.loads(run_cli(db, "workflows", "show", prefix, "--json").stdout)
    assert shown["id"] == first
    if common >= 6:  # made a moment apart: they share their first digits
        ambiguous = run_cli(db, "workflows", "show", first[:common], check=False)
        assert ambiguous.returncode == 1
        assert "ambiguous" in ambiguous.stderr
        assert first in ambiguous.stderr
        assert second in ambiguous.stderr
    cancelled = run_cli(db, "workflows", "cancel", prefix).stdout
    assert f"{first} cancelled" in cancelled
    retried = run_cli(db, "workflows", "retry", prefix).stdout
    assert retried.startswith(f"{first} running: 1 step(s) to run again")
    short = run_cli(db, "workflows", "retry", "01a2", check=False)
    assert short.returncode == 1
    assert "at least 6" in short.stderr
    missing = run_cli(db, "workflows", "cancel", "ffffffffff", check=False)
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def _table_rows(output: str) -> list[str]:
    """The body lines of a rich table (one per row unless a cell wrapped)."""
    return [line for line in output.splitlines() if line.startswith("│")]


def test_narrow_terminals_drop_columns_instead_of_folding_them(db, tmp_path):
    done = submit(db, "test_job", "--payload", '{"n": 1}')
    dead = submit(db, "fail", "--payload", '{"permanent": true}')
    gone = submit(db, "test_job", "--payload", '{"n": 2}', "--delay", "3600")
    run_cli(db, "jobs", "cancel", gone["job_id"])
    definition = tmp_path / "wf.json"
    definition.write_text(
        json.dumps({"name": "nightly", "steps": [{"name": "a", "job_type": "test_job"}]})
    )
    wf = json.loads(run_cli(db, "workflows", "submit", str(definition), "--json").stdout)["id"]
    w = WorkerProcess(db, tmp_path / "worker.out", "conveyor.demo", **FAST)
    try:
        wait_until(lambda: show(db, dead["job_id"])["status"] == "failed", 20, "dead letter")
        wait_until(lambda: show(db, done["job_id"])["status"] == "completed", 20, "test_job")
        wait_until(
            lambda: (
                json.loads(run_cli(db, "workflows", "show", wf, "--json").stdout)["status"]
                == "completed"
            ),
            20,
            "the workflow",
        )
    finally:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0, w.output()
    job_ids = [done["job_id"], dead["job_id"], gone["job_id"]]
    for columns in ("80", "100"):
        jobs = run_cli(db, "jobs", "list", COLUMNS=columns).stdout
        dlq = run_cli(db, "dlq", "list", COLUMNS=columns).stdout
        flows = run_cli(db, "workflows", "list", COLUMNS=columns).stdout
        for output in (jobs, dlq, flows):
            assert max(len(line) for line in output.splitlines()) <= int(columns), output
        # One line per row: no cell wrapped or folded into fragments.
        assert len(_table_rows(jobs)) == 4, jobs  # three jobs and the workflow's step
        assert len(_table_rows(dlq)) == 1, dlq
        assert len(_table_rows(flows)) == 1, flows
        for job_id in job_ids:
            assert job_id in jobs  # ids whole
        for word in ("completed", "failed", "cancelled", "test_job", "fail "):
            assert word in jobs, (columns, jobs)
        assert dead["job_id"] in dlq
        assert "Permanent" in dlq  # the error, cut to the room left
        assert wf in flows
        assert "nightly" in flows
        assert "completed" in flows
    wide = run_cli(db, "jobs", "list", COLUMNS="200").stdout
    assert "default" in wide  # the queue column is back where there is room
    assert len(_table_rows(wide)) == 4
