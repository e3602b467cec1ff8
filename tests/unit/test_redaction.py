"""Secrets out of text, bounded tracebacks, and the Host/Origin rules (pure functions)."""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import pytest
import structlog

from conveyor.api.guard import HostPolicy, host_name
from conveyor.observability.logging import (
    MAX_TRACEBACK_CHARS,
    configure_logging,
    format_exception,
)
from conveyor.security.redact import redact, redact_url

KEY = "cvk_0a1b2c3d_Zx9-yW8_vU7tS6rQ5pO4nM3lK2jI1hG0fE9dC8bA7zY6"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("postgresql://app:s3cr%40t@db:5432/conveyor", "s3cr%40t"),
        ("postgresql://app:p@ss@db:5432/conveyor failed", "p@ss"),
        ("could not connect to redis://:hunter2@cache:6379/0 (refused)", "hunter2"),
        ("postgresql://app@db/conveyor?sslmode=require&password=hunter2", "hunter2"),
        ("host=db user=app password='hunter2' dbname=x", "hunter2"),
        ("Authorization: Bearer " + KEY, KEY),
        ("authorization: bearer abc.def-ghi", "abc.def-ghi"),
        (f"GET /api/jobs?token={KEY}", KEY),
        (f"the key {KEY} was sent", KEY),
        ("{'secret': 'whsec_1234567890'}", "whsec_1234567890"),
    ],
)
def test_redact_masks_what_the_text_carries(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_the_rest_readable() -> None:
    text = 'password authentication failed for user "app"; see https://example.com/x'
    assert redact(text) == text
    assert redact("Missing API key: send 'Authorization: Bearer <key>'").endswith("<key>'")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw@db:5432/conveyor", "postgresql://app:***@db:5432/conveyor"),
        ("postgresql://app@db/conveyor", "postgresql://app@db/conveyor"),
        ("redis://:pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        ("postgresql://app:pw@db/c?password=pw2", "postgresql://app:***@db/c?password=***"),
        ("sqlite:///./conveyor.db", "sqlite:///./conveyor.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def _deep(n: int, **locals_: Any) -> None:
    if n == 0:
        raise RuntimeError(f"deep failure with {KEY}")
    _deep(n - 1, **locals_)


def test_format_exception_is_plain_bounded_and_quick() -> None:
    try:
        _deep(500, headers={"authorization": f"Bearer {KEY}"}, big="y" * 100_000)
    except RuntimeError as exc:
        start = time.perf_counter()
        text = format_exception(exc)
        elapsed = time.perf_counter() - start
    assert elapsed < 0.1
    assert len(text) <= MAX_TRACEBACK_CHARS + 100
    assert text.count("in _deep") <= 30
    assert "RuntimeError: deep failure" in text  # the last line survives the cut
    assert KEY not in text
    assert "yyyy" not in text  # no local variables


def test_format_exception_survives_a_broken_str() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise ValueError("no description")

    try:
        raise Broken
    except Broken as exc:
        text = format_exception(exc)
    assert "Broken" in text


def test_configured_logging_masks_secret_fields_and_exc_info() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        log = structlog.get_logger("t")
        log.info("connecting", url="postgresql://u:pw123456@h/db", api_key=KEY, n=3)
        try:
            _deep(3, secret="z" * 50)
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("uvicorn.error").error("dsn postgresql://u:pw123456@h/db")
    finally:
        structlog.reset_defaults()
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
    out = stream.getvalue()
    assert "pw123456" not in out
    assert KEY not in out
    assert "z" * 50 not in out
    assert "RuntimeError: deep failure" in out
    assert "n=3" in out


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:8000", "localhost"), ("[::1]:80", "::1"), ("Example.COM.", "example.com")],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_host_policy() -> None:
    policy = HostPolicy(["conveyor.internal", ".corp.example"])
    for ok in ("localhost", "127.0.0.1:8000", "[::1]", "conveyor.internal", "a.corp.example"):
        assert policy.host_ok(ok), ok
    for bad in ("evil.example", "localhost.evil.example", "corp.example.evil", "127.0.0.1.nip.io"):
        assert not policy.host_ok(bad), bad
    assert policy.origin_ok(None, "localhost")
    assert policy.origin_ok("http://localhost:3000", "localhost:8000")
    assert policy.origin_ok("https://jobs.example.com", "jobs.example.com")  # its own origin
    assert not policy.origin_ok("http://evil.example", "localhost:8000")
    assert not policy.origin_ok("null", "localhost:8000")
    assert not policy.origin_ok("file://", "localhost:8000")
    assert HostPolicy(["*"]).host_ok("anything.example")
    assert HostPolicy([], enforce=False).host_ok("anything.example")


def test_an_unsupported_database_url_is_named_without_its_password() -> None:
    from conveyor.app import store_from_url
    from conveyor.domain.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as refused:
        store_from_url("mysql://app:hunter2@db/jobs")
    assert "hunter2" not in str(refused.value)
    assert "mysql://app:***@db/jobs" in str(refused.value)


def test_fencing_tokens_stay_readable_secrets_do_not() -> None:
    # A lock's or a lease's token is a counter: operators need it to tell holders apart.
    assert redact("<Lock 'report' token=42 held=True>") == "<Lock 'report' token=42 held=True>"
    assert redact("lease lost (fencing_token=7)") == "lease lost (fencing_token=7)"
    for secret_text, secret in (
        ("GET /x?token=abc123def", "abc123def"),
        ("token=12345678901234567890123", "12345678901234567890123"),  # beyond int64
        ("access_token=123456", "123456"),
        ("password=123456", "123456"),
        (f"token={KEY}", KEY),
    ):
        out = redact(secret_text)
        assert secret not in out, secret_text
        assert "***" in out


def test_logged_fencing_token_fields_keep_integers_only() -> None:
    from conveyor.observability.logging import scrub_event

    event = scrub_event(
        None,
        "info",
        {
            "event": "leader_elected",
            "token": 42,
            "lease_token": 9,
            "fencing_token": 3,
            "api_token": 5,
            "password": 1234,
            "flag_token": True,
            "nested": {"token": 8, "secret_token": 8, "token_str": "s3cr3t"},
        },
    )
    assert (event["token"], event["lease_token"], event["fencing_token"]) == (42, 9, 3)
    assert event["api_token"] == event["password"] == event["flag_token"] == "***"
    assert event["nested"] == {"token": 8, "secret_token": "***", "token_str": "***"}
    assert scrub_event(None, "info", {"event": "x", "token": "cvk_abc"})["token"] == "***"


def test_a_standard_library_line_keeps_its_stable_event_key_in_json() -> None:
    import json

    from conveyor.observability.logging import JsonFormatter

    def line(**extra: Any) -> dict[str, Any]:
        record = logging.LogRecord(
            "conveyor.tracing",
            logging.WARNING,
            __file__,
            1,
            "tracing_unavailable: %s",
            ("no SDK",),
            None,
        )
        record.__dict__.update(extra)
        return json.loads(JsonFormatter().format(record))

    tagged = line(event="tracing_unavailable")
    assert tagged["event"] == "tracing_unavailable"
    assert tagged["message"] == "tracing_unavailable: no SDK"
    assert line()["event"] == "conveyor.tracing"  # a library's line: its logger's name
