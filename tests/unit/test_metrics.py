"""The metric families' text format, bounded labels, and one fleet exporter at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from conveyor.app import Conveyor
from conveyor.domain.job import Finish, Job, Rescued
from conveyor.domain.states import Action, JobState
from conveyor.observability.families import Histogram
from conveyor.observability.fleet import FleetExporter
from conveyor.observability.metrics import MAX_ERROR_TYPES, Metrics
from conveyor.runtime.observe import JobsRescued, JobsStarted, WebhookAttempted, WorkflowSubmitted
from conveyor.settings import Settings


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def test_the_text_format_parses_with_hostile_label_values() -> None:
    m = Metrics(process_collector=False)
    nasty = 'a"b\\c\nd{e}=,'
    m.job_finished(Finish("j", "t", Action.COMPLETE, job_type=nasty, duration=0.2), True)
    text = m.render().decode()
    assert value(text, "conveyor_jobs_processed_total", job_type=nasty, status="completed") == 1
    assert value(text, "conveyor_job_duration_seconds_count", job_type=nasty) == 1


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram("h_seconds", "help", ["k"], buckets=(0.1, 1, 10))
    for v in (0.05, 0.1, 0.5, 1.0, 20.0):
        h.labels("x").observe(v)
    out: list[str] = []
    h.render(out)
    text = "\n".join(out) + "\n"
    assert value(text, "h_seconds_bucket", k="x", le="0.1") == 2  # 0.1 is in le="0.1"
    assert value(text, "h_seconds_bucket", k="x", le="1.0") == 4
    assert value(text, "h_seconds_bucket", k="x", le="10.0") == 4
    assert value(text, "h_seconds_bucket", k="x", le="+Inf") == 5
    assert value(text, "h_seconds_count", k="x") == 5
    assert value(text, "h_seconds_sum", k="x") == 21.65


def test_error_types_per_job_type_are_capped() -> None:
    m = Metrics(process_collector=False)
    for i in range(MAX_ERROR_TYPES + 5):
        m.job_finished(Finish("j", "t", Action.RETRY, job_type="t", error_type=f"E{i}"), True)
    m.job_finished(Finish("j", "t", Action.FAIL, job_type="t", error_type="E0"), True)
    m.job_finished(Finish("j", "t", Action.FAIL, job_type="t", error_type="X" * 500), True)
    text = m.render().decode()
    kinds = {
        dict(labels)["error_type"]
        for (name, labels) in samples(text)
        if name == "conveyor_jobs_failed_total"
    }
    assert len(kinds) == MAX_ERROR_TYPES + 1
    assert "other" in kinds
    assert value(text, "conveyor_jobs_failed_total", job_type="t", error_type="other") == 6
    assert value(text, "conveyor_jobs_failed_total", job_type="t", error_type="E0") == 2
    assert value(text, "conveyor_job_retries_total", job_type="t") == MAX_ERROR_TYPES + 5


def test_a_rejected_completion_counts_as_fenced_only() -> None:
    m = Metrics(process_collector=False)
    m.job_finished(Finish("j", "t", Action.COMPLETE, job_type="t"), False)
    text = m.render().decode()
    assert value(text, "conveyor_stale_lease_rejected_total") == 1
    assert value(text, "conveyor_jobs_processed_total", job_type="t", status="completed") is None


def test_observations_feed_wait_rescues_webhooks_and_workflows() -> None:
    m = Metrics(process_collector=False)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    jobs = [
        Job("a", "t", JobState.RUNNING, {}, queue="q", run_at=now - timedelta(seconds=3)),
        Job("b", "t", JobState.RUNNING, {}, queue="q", run_at=now + timedelta(seconds=1)),
    ]
    m.observe(JobsStarted(jobs, now))
    m.observe(JobsRescued([Rescued("a", "w", Action.LOST), Rescued("b", "w", Action.QUARANTINE)]))
    m.observe(WebhookAttempted("delivered", 0.2))
    m.observe(WorkflowSubmitted(3))
    text = m.render().decode()
    assert value(text, "conveyor_job_wait_seconds_count", queue="q") == 2
    assert value(text, "conveyor_job_wait_seconds_sum", queue="q") == 3  # a clock skew is 0
    assert value(text, "conveyor_jobs_rescued_total", action="lost") == 1
    assert value(text, "conveyor_jobs_rescued_total", action="quarantined") == 1
    assert value(text, "conveyor_webhook_deliveries_total", outcome="delivered") == 1
    assert value(text, "conveyor_webhook_delivery_seconds_count") == 1
    assert value(text, "conveyor_workflows_submitted_total") == 1


async def test_one_of_two_processes_exports_the_fleet_gauges(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    a = Conveyor(settings=Settings(database_url=url, allow_unknown_job_types=True))
    b = Conveyor(settings=Settings(database_url=url))
    async with a, b:
        await a.enqueue("t", queue="q1")
        ma, mb = Metrics(process_collector=False), Metrics(process_collector=False)
        ea, eb = FleetExporter(ma, a.deps), FleetExporter(mb, b.deps)
        await ea.refresh()
        await eb.refresh()
        text_a, text_b = ma.render().decode(), mb.render().decode()
        assert value(text_a, "conveyor_fleet_exporter") == 1
        assert value(text_a, "conveyor_queue_depth", queue="q1", state="pending") == 1
        assert value(text_a, "conveyor_queue_depth", queue="q1", state="dlq") == 0
        assert value(text_b, "conveyor_fleet_exporter") == 0
        assert "conveyor_queue_depth" not in text_b
        assert "conveyor_live_workers" not in text_b
        # The exporter stops (resigns): the other one takes over at its next try.
        await ea.close()
        eb._at = eb._next_try = -1e9
        await eb.refresh()
        text_b = mb.render().decode()
        assert value(text_b, "conveyor_fleet_exporter") == 1
        assert value(text_b, "conveyor_queue_depth", queue="q1", state="pending") == 1
        for status in ("running", "completed", "failed", "cancelled"):
            assert value(text_b, "conveyor_workflows", status=status) == 0
        await eb.close()


def test_the_workers_timed_finish_keeps_every_field() -> None:
    from dataclasses import fields

    from conveyor.runtime.worker import _timed

    f = Finish(
        "j",
        "tok",
        Action.RETRY,
        {"r": 1},
        "err",
        datetime(2026, 1, 1, tzinfo=UTC),
        "",
        None,
        {"healed": True},
        "E",
        "Traceback ...",
    )
    timed = _timed(f, "t", 0.5)
    assert [x.name for x in fields(Finish)][-4:] == [
        "duration",
        "payload",
        "error_type",
        "traceback",
    ]
    for x in fields(Finish):
        expected = {"job_type": "t", "duration": 0.5}.get(x.name, getattr(f, x.name))
        assert getattr(timed, x.name) == expected, x.name
    assert len(fields(Finish)) == 11  # a new field must be carried by _timed too
