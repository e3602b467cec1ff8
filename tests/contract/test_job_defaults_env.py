"""Fleet-wide job-type defaults (``CONVEYOR_JOB_*``) on every backend: options a
registration leaves out take them, options it gives win, and types submitted with
no registration get them too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from appkit import api_client, app_on, finished

from conveyor import Conveyor
from conveyor.domain.retry import RetryPolicy
from conveyor.domain.states import JobState
from conveyor.settings import Settings
from conveyor.storage.base import Store
from support import running_worker

FLEET = {
    "job_timeout": 7.5,
    "job_max_retries": 0,
    "job_retry_base": 0.01,
    "job_retry_factor": 3.0,
    "allow_unknown_job_types": True,
}


async def boom(ctx) -> None:
    raise RuntimeError("boom")


def register(app: Conveyor) -> None:
    app.job("omits")(boom)
    app.job("gives", max_retries=2, timeout=60, retry=RetryPolicy(base=0.02, factor=1.5))(boom)


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, register, **FLEET) as conveyor:
        yield conveyor


async def test_a_registrations_explicit_values_beat_the_environment(app):
    gives = app.registry["gives"]
    assert (gives.max_retries, gives.timeout) == (2, 60)
    assert (gives.retry.base, gives.retry.factor) == (0.02, 1.5)
    job = await app.enqueue("gives", {})
    assert (job.max_retries, job.timeout_ms) == (2, 60_000)


async def test_options_a_registration_leaves_out_take_the_environment(app):
    omits = app.registry["omits"]
    assert (omits.max_retries, omits.timeout) == (0, 7.5)
    assert (omits.retry.base, omits.retry.factor) == (0.01, 3.0)
    job = await app.enqueue("omits", {})
    assert (job.max_retries, job.timeout_ms) == (0, 7_500)
    # A submit's own option still beats both.
    assert (await app.enqueue("omits", {}, max_retries=4)).max_retries == 4


async def test_the_worker_runs_with_the_environments_defaults(app):
    omits = await app.enqueue("omits", {})
    gives = await app.enqueue("gives", {})
    async with running_worker(app):
        jobs = await finished(app, [omits.id, gives.id])
    # max_retries 0 from the environment: dead-lettered after its one attempt;
    # the registration's 2 retries: three attempts.
    assert (jobs[omits.id].state, jobs[omits.id].attempt) == (JobState.FAILED, 1)
    assert (jobs[gives.id].state, jobs[gives.id].attempt) == (JobState.FAILED, 3)


async def test_a_type_with_no_registration_takes_the_environment_over_rest(app):
    async with api_client(app) as c:
        resp = await c.post("/api/jobs", json={"job_type": "deployed_later", "payload": {}})
        assert resp.status_code == 201, resp.text
        shown = await c.post(
            "/api/jobs", json={"job_type": "deployed_later", "payload": {}, "max_retries": 5}
        )
    job = await app.store.get(resp.json()["job_id"])
    assert (job.max_retries, job.timeout_ms) == (0, 7_500)
    assert (await app.store.get(shown.json()["job_id"])).max_retries == 5


async def test_a_zero_timeout_means_none_and_new_settings_reach_omitted_options(app):
    app.settings = app.settings.with_(job_timeout=0.0, job_max_retries=6)
    omits, gives = app.registry["omits"], app.registry["gives"]
    assert (omits.timeout, omits.max_retries) == (None, 6)
    assert (gives.timeout, gives.max_retries) == (60, 2)
    job = await app.enqueue("omits", {})
    assert (job.timeout_ms, job.max_retries) == (None, 6)


async def test_included_registrations_take_the_including_apps_defaults(app, store):
    library = Conveyor(settings=Settings(database_url="memory://"), store=store)
    library.job("from_library")(boom)
    library.job("pinned", max_retries=1)(boom)
    assert library.registry["from_library"].max_retries == 3  # the library's own default
    app.include(library)
    assert app.registry["from_library"].max_retries == 0
    assert app.registry["pinned"].max_retries == 1
