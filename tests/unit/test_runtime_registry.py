"""Payload validation built from a handler's signature."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.app import Conveyor
from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError
from conveyor.domain.job import NewJob
from conveyor.runtime.registry import JobDefinition, payload_model
from conveyor.settings import Settings
from conveyor.storage.memory import MemoryStore


@pytest.fixture
def app() -> Conveyor:
    return Conveyor(settings=Settings(database_url="memory://"), store=MemoryStore())


def define(app: Conveyor, handler: Any, job_type: str = "job") -> JobDefinition:
    return app.job(job_type)(handler)


def send_email(ctx: Any, to: str, subject: str, retries: int = 3) -> dict[str, Any]:
    return {"to": to, "subject": subject, "retries": retries}


def details(exc: ValidationError) -> list[tuple[str, str]]:
    return [(d.field, d.message) for d in exc.details]


def test_a_fitting_payload_passes(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    d.validate_payload({"to": "a@b.c", "subject": "hi"})
    d.validate_payload({"to": "a@b.c", "subject": "hi", "retries": 5})


def test_missing_field(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"to": "a@b.c"})
    assert details(info.value) == [("payload.subject", "Field required")]
    assert str(info.value) == (
        "Invalid payload for job type 'send_email': payload.subject: Field required"
    )
    assert isinstance(info.value, ValueError)


def test_wrong_type(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"to": "a@b.c", "subject": "hi", "retries": "many"})
    ((field, message),) = details(info.value)
    assert field == "payload.retries"
    assert "integer" in message


def test_unknown_field_is_rejected(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"to": "a@b.c", "subject": "hi", "cc": "x@y.z"})
    assert details(info.value) == [("payload.cc", "Extra inputs are not permitted")]


def test_every_problem_is_listed(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"subject": 5, "bogus": 1})
    fields = sorted(f for f, _ in details(info.value))
    assert fields == ["payload.bogus", "payload.subject", "payload.to"]
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_nested_errors_name_the_path(app: Conveyor) -> None:
    def handler(ctx: Any, items: list[int]) -> None: ...

    d = define(app, handler)
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"items": [1, "two"]})
    assert [f for f, _ in details(info.value)] == ["payload.items.1"]


def test_kwargs_only_handler_accepts_any_payload(app: Conveyor) -> None:
    def handler(ctx: Any, **payload: Any) -> None: ...

    assert payload_model("job", handler) is None
    d = define(app, handler)
    d.validate_payload({})
    d.validate_payload({"anything": object(), "nested": {"x": [1]}})


def test_kwargs_allows_extra_fields_but_checks_named_ones(app: Conveyor) -> None:
    def handler(ctx: Any, n: int, **rest: Any) -> None: ...

    d = define(app, handler)
    d.validate_payload({"n": 1, "extra": "ok"})
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"extra": "ok"})
    assert details(info.value) == [("payload.n", "Field required")]


def test_ctx_only_handler_takes_an_empty_payload(app: Conveyor) -> None:
    def handler(ctx: Any) -> None: ...

    d = define(app, handler)
    d.validate_payload({})
    with pytest.raises(ValidationError) as info:
        d.validate_payload({"x": 1})
    assert details(info.value) == [("payload.x", "Extra inputs are not permitted")]


def test_unannotated_parameters_accept_anything(app: Conveyor) -> None:
    def handler(ctx, a, b=2):  # type: ignore[no-untyped-def]
        ...

    d = define(app, handler)
    d.validate_payload({"a": object()})
    with pytest.raises(ValidationError):
        d.validate_payload({"b": 1})


def test_keyword_only_parameters_are_payload_fields(app: Conveyor) -> None:
    def handler(ctx: Any, *, to: str) -> None: ...

    d = define(app, handler)
    d.validate_payload({"to": "x"})
    with pytest.raises(ValidationError):
        d.validate_payload({})


def test_async_handlers_are_recognised(app: Conveyor) -> None:
    async def handler(ctx: Any, n: int) -> int:
        return n

    d = define(app, handler)
    assert d.is_async
    assert not define(app, send_email, "sync").is_async


def test_calling_the_definition_calls_the_handler(app: Conveyor) -> None:
    d = define(app, send_email, "send_email")
    assert d(None, to="a", subject="b") == {"to": "a", "subject": "b", "retries": 3}


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (lambda: None, "must take `ctx` as its first parameter"),
        (lambda *args: None, "must take `ctx` as its first parameter"),
        (lambda ctx, *args: None, "payload parameters must be keywords (got 'args')"),
    ],
    ids=["no-ctx", "varargs-only", "varargs"],
)
def test_bad_signatures_are_configuration_errors(handler: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        payload_model("job", handler)
    assert message in str(info.value)
    assert "'job'" in str(info.value)


def test_positional_only_payload_parameter_is_refused() -> None:
    def handler(ctx: Any, a: int, /) -> None: ...

    with pytest.raises(ConfigurationError, match="must be keywords"):
        payload_model("job", handler)


def test_unresolvable_annotation_is_a_configuration_error() -> None:
    def handler(ctx: Any, a: NoSuchType) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ConfigurationError, match="cannot be resolved"):
        payload_model("job", handler)


def test_duplicate_job_type_is_refused(app: Conveyor) -> None:
    define(app, send_email, "send_email")
    with pytest.raises(ConfigurationError, match="already registered"):
        define(app, send_email, "send_email")


def test_bad_registration_options_are_refused(app: Conveyor) -> None:
    with pytest.raises(ValidationError):
        app.job("bad name")
    with pytest.raises(ValidationError):
        app.job("ok", priority=500)
    with pytest.raises(ConfigurationError, match="timeout"):
        app.job("ok", timeout=0)


def test_field_error_is_a_value() -> None:
    assert FieldError("a", "b") == FieldError("a", "b")


def test_new_job_fills_every_field_from_options_and_defaults(app: Conveyor) -> None:
    app.job("typed", queue="q1", priority=7, max_retries=2, timeout=1.5)(send_email)
    run_at = datetime(2030, 1, 1, tzinfo=UTC)
    new = app.new_job(
        "typed",
        {"to": "a@b.c", "subject": "s"},
        idempotency_key="k",
        depends_on=["p1", "p2"],
        metadata={"m": 1},
        created_by="me",
        run_at=run_at,
    )
    assert new == NewJob(
        job_type="typed",
        payload={"to": "a@b.c", "subject": "s"},
        queue="q1",
        priority=7,
        max_retries=2,
        timeout_ms=1500,
        run_at=run_at,
        idempotency_key="k",
        depends_on=("p1", "p2"),
        metadata={"m": 1},
        created_by="me",
    )
    other = app.new_job("untyped", queue="q2", priority=9, max_retries=0, timeout_ms=5)
    assert (other.queue, other.priority, other.max_retries, other.timeout_ms) == ("q2", 9, 0, 5)
    assert (other.payload, other.metadata, other.depends_on, other.run_at) == ({}, {}, (), None)
    with pytest.raises(ValidationError, match="Invalid payload"):
        app.new_job("typed", {"to": "a@b.c"})


async def test_enqueue_many_submits_one_job_per_payload_with_shared_options(
    app: Conveyor,
) -> None:
    app.job("typed", queue="q1")(send_email)
    payloads = [{"to": f"{i}@b.c", "subject": "s"} for i in range(5)]
    jobs = await app.enqueue_many("typed", payloads, priority=9, metadata={"m": 1})
    assert [j.payload for j in jobs] == payloads
    assert {(j.job_type, j.queue, j.priority, j.max_retries) for j in jobs} == {
        ("typed", "q1", 9, 3)
    }
    assert all(j.metadata == {"m": 1} for j in jobs)
    assert len({j.id for j in jobs}) == 5
    assert await app.enqueue_many("typed", []) == []


async def test_enqueue_many_with_one_bad_payload_stores_nothing(app: Conveyor) -> None:
    app.job("typed")(send_email)
    good = {"to": "a@b.c", "subject": "s"}
    with pytest.raises(ValidationError, match=r"payloads\[2\]: .*subject") as bad:
        await app.enqueue_many("typed", [good, good, {"to": "x@y.z"}, good])
    assert [d.field for d in bad.value.details] == ["payloads[2].subject"]
    with pytest.raises(ValidationError, match=r"payloads\[0\]"):
        await app.enqueue_many("typed", [{"to": 1}, good])
    with pytest.raises(
        ValidationError, match="delay must be a finite number of seconds from 0"
    ) as opt:
        await app.enqueue_many("typed", [good], delay=-1)
    assert [d.field for d in opt.value.details] == ["delay"]
    with pytest.raises(ConfigurationError, match="idempotency key names one job"):
        await app.enqueue_many("typed", [good, good], idempotency_key="k")
    assert sum((await app.store.count_by_state()).values()) == 0
