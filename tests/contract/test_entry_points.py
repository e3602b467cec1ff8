"""One set of rules at every entry point: Python, REST and the CLI accept and refuse
the same values, on every backend, and a handler receives the validated values."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog
from appkit import api_client, app_on
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conveyor import Conveyor
from conveyor.cli.main import cli
from conveyor.domain.errors import ValidationError
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.security.api_keys import new_api_key
from conveyor.settings import Settings
from conveyor.storage.base import Store
from support import async_wait_until, run_cli, running_worker


async def typed(ctx, n: int = 0, **rest: Any) -> dict[str, Any]:
    return {"n": n, "type": type(n).__name__}


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, lambda a: a.job("typed")(typed)) as conveyor:
        yield conveyor


client = api_client


# -- generated values ------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),  # includes NUL and lone surrogates
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))])
run_ats = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 - hypothesis wants naive bounds
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        timezones=zones,
    ),
    st.sampled_from([datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))]),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.integers(min_value=-5, max_value=105),
        "max_retries": st.integers(min_value=-2, max_value=120),
        "timeout_ms": st.integers(min_value=-1, max_value=86_400_001),
        "run_at": run_ats,
        "queue": st.sampled_from(["default", "q:1", "bad queue", "", "x" * 101]),
        "idempotency_key": st.one_of(
            st.text(min_size=0, max_size=6), st.sampled_from(["webhook:x:1", "conveyor:k"])
        ),
        "metadata": st.dictionaries(st.text(max_size=3), json_values, max_size=2),
        "job_type": st.sampled_from(["typed", "conveyor.webhook", "nobody_serves_this"]),
    },
)


def rest_body(payload: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"job_type": opts.get("job_type", "typed"), "payload": payload}
    for name in ("priority", "max_retries", "timeout_ms", "queue", "idempotency_key", "metadata"):
        if name in opts:
            body[name] = opts[name]
    if opts.get("run_at") is not None:
        body["scheduled_at"] = opts["run_at"].isoformat()
    return body


_client: list[Any] = [None, None]  # [the app, its API client]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.dictionaries(st.sampled_from(["n", "a", "b"]), json_values, max_size=3), opts=options
)
async def test_python_and_rest_accept_and_refuse_alike(app, payload, opts):
    opts = dict(opts)
    job_type = opts.pop("job_type", "typed")
    if "idempotency_key" in opts:
        opts["idempotency_key"] += f"-{id(payload)}-{len(str(opts))}"  # no cross-example dedupe
    python_ok, stored = False, None
    try:
        job = await app.enqueue(job_type, payload, **opts)
        # As stored (PostgreSQL's jsonb writes 7.2e16 back as an integer).
        python_ok, stored = True, (await app.store.get(job.id)).payload
    except ValidationError:
        pass  # any other ConveyorError fails the test
    if "idempotency_key" in opts:
        opts["idempotency_key"] += "-rest"
    if _client[0] is not app:  # one API per test, not per example: building it costs ~50 ms
        _client[:] = [app, client(app)]
    c = _client[1]
    resp = await c.post(
        "/api/jobs",
        content=json.dumps(rest_body(payload, {**opts, "job_type": job_type})),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code in (200, 201, 400), resp.text
    rest_ok = resp.status_code in (200, 201)
    assert python_ok == rest_ok, (payload, opts, resp.text)
    if rest_ok:
        got = await app.store.get(resp.json()["job_id"])
        assert got.payload == stored


async def test_a_row_never_breaks_listings_after_refused_values(app):
    for bad in ({"x": math.nan}, {"x": "\x00"}, {"x": 2**70}):
        with pytest.raises(ValidationError):
            await app.enqueue("typed", bad)
    with pytest.raises(ValidationError, match="run_at must be between"):
        await app.enqueue("typed", run_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))))
    assert (await app.store.list_jobs(JobQuery())).total == 0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"delay": 1e13}, "delay"),
        ({"delay": math.nan}, "delay"),
        ({"max_retries": 101}, "max_retries"),
        ({"idempotency_key": "webhook:abc:1"}, "idempotency_key"),
        ({"idempotency_key": "k\x00"}, "idempotency_key"),
        ({"depends_on": ["a\x00"]}, "depends_on"),
    ],
)
async def test_python_options_outside_their_range_are_refused(app, options, field):
    with pytest.raises(ValidationError) as err:
        await app.enqueue("typed", {}, **options)
    assert field in {d.field for d in err.value.details}
    assert (await app.store.list_jobs(JobQuery())).total == 0


async def test_strings_that_parse_to_non_finite_floats_are_refused(app):
    @app.job("ratio")
    async def ratio(ctx, x: float) -> float:
        return x

    for text in ("nan", "inf", "-Infinity", "1e309"):
        with pytest.raises(ValidationError, match=r"payload\.x"):
            await app.enqueue("ratio", {"x": text})
    assert (await app.enqueue("ratio", {"x": "1.5"})).payload == {"x": "1.5"}


async def test_the_handler_receives_the_validated_values(app):
    job = await app.enqueue("typed", {"n": "7"})
    async with running_worker(app):
        done = await async_wait_until(
            lambda: _completed(app, job.id), 10, "the typed job to complete"
        )
    assert done.result == {"n": 7, "type": "int"}


async def _completed(app: Conveyor, job_id: str) -> Any:
    job = await app.store.get(job_id)
    return job if job.state is JobState.COMPLETED else None


# -- registration defaults, known types, reserved names ------------------------------------------
async def test_rest_takes_the_registration_defaults_and_refuses_unknown_types(app):
    @app.job("charge_card", max_retries=0, timeout=5, priority=90, queue="payments")
    async def charge_card(ctx, order: str) -> None: ...

    async with client(app) as c:
        resp = await c.post(
            "/api/jobs", json={"job_type": "charge_card", "payload": {"order": "o1"}}
        )
        assert resp.status_code == 201, resp.text
        job = await app.store.get(resp.json()["job_id"])
        assert (job.max_retries, job.timeout_ms, job.priority, job.queue) == (
            0,
            5000,
            90,
            "payments",
        )
        resp = await c.post("/api/jobs", json={"job_type": "chrage_card", "payload": {}})
        assert resp.status_code == 400
        assert "Known types: charge_card, typed" in resp.json()["error"]


async def test_an_api_without_handlers_knows_the_types_a_worker_recorded(app, store):
    @app.job("charge_card", max_retries=0, timeout=5, priority=90, queue="payments")
    async def charge_card(ctx, order: str) -> None: ...

    api_only = Conveyor(settings=Settings(database_url="memory://"), store=store)
    async with client(api_only) as c:
        refused = await c.post("/api/jobs", json={"job_type": "charge_card", "payload": {}})
        assert refused.status_code == 400
        async with running_worker(app):
            api_only._known_types_at = -1e9  # the test does not wait out the cache
            resp = await c.post("/api/jobs", json={"job_type": "charge_card", "payload": {}})
            assert resp.status_code == 201, resp.text
            job = await store.get(resp.json()["job_id"])
            assert (job.max_retries, job.timeout_ms, job.priority, job.queue) == (
                0,
                5000,
                90,
                "payments",
            )
    await api_only.bus.close()


async def test_internal_job_types_and_keys_are_not_reachable_from_the_api(app, store):
    async with client(app) as c:
        forged = await c.post(
            "/api/jobs",
            json={"job_type": "conveyor.webhook", "payload": {"webhook_id": "w", "event": {}}},
        )
        assert forged.status_code == 400
        assert "reserved" in forged.json()["error"]
        squat = await c.post(
            "/api/jobs",
            json={"job_type": "typed", "payload": {}, "idempotency_key": "webhook:w1:99"},
        )
        assert squat.status_code == 400
        assert "reserved" in squat.json()["error"]
    # A delivery job as the dispatcher makes it, then the listings.
    internal = app.new_job(
        "conveyor.webhook",
        {"webhook_id": "w", "delivery_id": "d", "event": {}},
        idempotency_key="webhook:w:1",
        internal=True,
    )
    (made,) = await app.submit_many([internal])
    read_key, read = new_api_key("reader", "read", app.now())
    admin_key, admin = new_api_key("boss", "admin", app.now())
    await store.create_api_key(read)
    await store.create_api_key(admin)
    async with client(app) as c:
        as_read = {"Authorization": f"Bearer {read_key}"}
        as_admin = {"Authorization": f"Bearer {admin_key}"}
        listed = await c.get("/api/jobs?job_type=conveyor.webhook", headers=as_read)
        assert listed.json()["jobs"] == []
        assert (await c.get(f"/api/jobs/{made.job.id}", headers=as_read)).status_code == 404
        denied = await c.get("/api/jobs?include_internal=true", headers=as_read)
        assert denied.status_code == 403
        events = (await c.get("/api/events?after=0", headers=as_read)).json()["events"]
        assert [e for e in events if e["job_id"] == made.job.id] == []
        events = (await c.get("/api/events?after=0", headers=as_admin)).json()["events"]
        assert [e["job_id"] for e in events if e["job_id"] == made.job.id] == [made.job.id]
        write_key, write = new_api_key("writer", "write", app.now())
        await store.create_api_key(write)
        as_write = {"Authorization": f"Bearer {write_key}"}
        assert (await c.delete(f"/api/jobs/{made.job.id}", headers=as_write)).status_code == 404
        retried = await c.post(f"/api/jobs/{made.job.id}/retry", headers=as_write)
        assert retried.status_code == 404
        assert (await store.get(made.job.id)).state is JobState.PENDING
        huge = await c.get(f"/api/events?after={2**63}", headers=as_read)
        assert huge.status_code == 400
        shown = await c.get("/api/jobs?include_internal=true", headers=as_admin)
        assert [j["id"] for j in shown.json()["jobs"]] == [made.job.id]
        assert (await c.get(f"/api/jobs/{made.job.id}", headers=as_admin)).status_code == 200


# -- the CLI: same refusals ----------------------------------------------------------------------
def register_typed(app: Conveyor) -> None:
    """``--app test_entry_points:register_typed``: the CLI knows the ``typed`` handler."""
    app.job("typed")(typed)


cli_options = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.integers(min_value=-5, max_value=105),
        "max_retries": st.integers(min_value=-2, max_value=120),
        "timeout": st.one_of(
            st.integers(min_value=-1, max_value=86_401), st.floats(allow_nan=True)
        ),
        "delay": st.one_of(st.floats(allow_nan=True), st.just(1e13)),
        "queue": st.sampled_from(["default", "q:1", "bad queue", "x" * 101]),
        "idempotency_key": st.one_of(
            st.text(min_size=1, max_size=6).filter(lambda k: not k.startswith("-")),
            st.sampled_from(["webhook:x:1", "conveyor:k"]),
        ),
        "job_type": st.sampled_from(["typed", "conveyor.webhook", "nobody_serves_this"]),
    },
)


@contextmanager
def logging_kept() -> Iterator[None]:
    """The CLI configures logging for its process; in this one, put it back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**saved)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.dictionaries(st.sampled_from(["n", "a", "b"]), json_values, max_size=3),
    opts=cli_options,
)
def test_the_cli_accepts_and_refuses_what_python_does(backend, request, tmp_path, payload, opts):
    # Generated values through `conveyor jobs submit` (in this process, for speed)
    # and through Python's enqueue on the same database: both accept or both refuse.
    url = (
        f"sqlite:///{tmp_path}/cli.db"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_dsn")
    )
    opts = dict(opts)
    job_type = opts.pop("job_type", "typed")
    if "idempotency_key" in opts:
        opts["idempotency_key"] += f"-{len(str(payload))}-{len(str(opts))}"
    args = ["jobs", "submit", job_type, "--app", "test_entry_points:register_typed"]
    args += ["--payload", json.dumps(payload, allow_nan=True)]
    for name, value in opts.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    with logging_kept():
        result = CliRunner().invoke(
            cli, args, env={"CONVEYOR_DATABASE_URL": url}, catch_exceptions=True
        )
    # 0 stored, 1 refused by Conveyor's rules, 2 refused by click's parsing.
    assert result.exit_code in (0, 1, 2), (args, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    cli_ok = result.exit_code == 0
    event(f"cli exit {result.exit_code}")

    async def python() -> bool:
        app = Conveyor(settings=Settings(database_url=url))
        register_typed(app)
        async with app:
            try:
                if "idempotency_key" in opts:  # not the CLI's job back as a duplicate
                    opts["idempotency_key"] += "-py"
                await app.enqueue(job_type, payload, **opts)
            except ValidationError:
                return False
            return True

    with logging_kept():
        python_ok = asyncio.run(python())
    assert cli_ok == python_ok, (args, result.output)


CLI_CASES = [
    ("nan", ["--payload", '{"x": NaN}']),
    ("overflow", ["--payload", '{"x": 1e309}']),
    ("huge int", ["--payload", '{"x": 1180591620717411303424}']),
    ("nul", ["--payload", '{"x": "a\\u0000b"}']),
    ("timeout", ["--timeout", "-1"]),
    ("delay", ["--delay", "1e13"]),
    ("retries", ["--max-retries", "101"]),
    ("reserved key", ["--idempotency-key", "webhook:x:1"]),
]


def test_the_cli_refuses_what_python_and_rest_refuse(tmp_path: Path):
    db = f"sqlite:///{tmp_path}/cli.db"
    for name, args in CLI_CASES:
        proc = run_cli(db, "jobs", "submit", "test_job", *args, check=False)
        assert proc.returncode != 0, (name, proc.stdout)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
    proc = run_cli(db, "jobs", "submit", "conveyor.webhook", check=False)
    assert proc.returncode != 0
    assert "reserved" in proc.stdout + proc.stderr
    listed = run_cli(db, "jobs", "list", "--json")
    assert json.loads(listed.stdout)["jobs"] == []


async def test_the_demo_fail_job_fails_for_good_by_default(store: Store):
    import conveyor.demo

    app = Conveyor(settings=Settings(database_url="memory://", heartbeat_interval=0.2), store=store)
    conveyor.demo.register(app)
    await app.open()
    try:
        job = await app.enqueue("fail", max_retries=1)
        async with running_worker(app):

            async def dead() -> bool:
                return (await app.store.get(job.id)).state is JobState.FAILED

            await async_wait_until(dead, 20, "the fail job to be dead-lettered")
        outcomes = [e.outcome for e in await app.store.executions(job.id)]
        assert outcomes == ["retry", "failed"]
    finally:
        await app.bus.close()


async def test_a_nul_in_a_url_is_400_on_every_backend(app):
    async with client(app) as c:
        for method, url in [
            ("GET", "/api/jobs/a%00b"),
            ("DELETE", "/api/jobs/a%00b"),
            ("POST", "/api/jobs/a%00b/retry"),
            ("GET", "/api/jobs?queue=a%00"),
            ("GET", "/api/dlq?job_type=%00"),
            ("GET", "/api/webhooks/a%00"),
        ]:
            resp = await c.request(method, url)
            assert resp.status_code == 400, (method, url, resp.text)
            assert "NUL" in resp.json()["error"]
