"""Settings: defaults, CONVEYOR_* variables, overrides and their errors."""

from __future__ import annotations

import pytest

from conveyor.domain.errors import ConfigurationError
from conveyor.settings import DEFAULT_DATABASE_URL, Settings


def test_defaults_with_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.database_url == DEFAULT_DATABASE_URL == "sqlite:///./conveyor.db"
    assert (s.concurrency, s.heartbeat_interval, s.heartbeat_timeout, s.max_lost) == (10, 5, 15, 2)
    assert s.queues == ("default",)
    assert s.log_level == "INFO"


def test_every_variable_is_parsed() -> None:
    s = Settings.from_env(
        {
            "CONVEYOR_DATABASE_URL": "memory://",
            "CONVEYOR_CONCURRENCY": "4",
            "CONVEYOR_HEARTBEAT_INTERVAL": "0.5",
            "CONVEYOR_HEARTBEAT_TIMEOUT": "2",
            "CONVEYOR_MAX_LOST": "3",
            "CONVEYOR_POLL_INTERVAL": "0.05",
            "CONVEYOR_SHUTDOWN_GRACE": "0",
            "CONVEYOR_RETENTION": "3600",
            "CONVEYOR_QUEUES": " high, default ,,low ",
            "CONVEYOR_LOG_LEVEL": "DEBUG",
        }
    )
    assert s == Settings(
        database_url="memory://",
        concurrency=4,
        heartbeat_interval=0.5,
        heartbeat_timeout=2.0,
        max_lost=3,
        poll_interval=0.05,
        shutdown_grace=0.0,
        retention=3600.0,
        queues=("high", "default", "low"),
        log_level="DEBUG",
    )
    assert isinstance(s.concurrency, int)
    assert isinstance(s.heartbeat_timeout, float)


def test_empty_variables_mean_the_default() -> None:
    assert Settings.from_env({"CONVEYOR_CONCURRENCY": "", "CONVEYOR_QUEUES": ""}) == Settings()


def test_unknown_and_foreign_variables_are_ignored() -> None:
    assert Settings.from_env({"CONVEYOR_NOPE": "1", "CONCURRENCY": "3"}) == Settings()


def test_overrides_beat_the_environment_and_none_means_unset() -> None:
    env = {"CONVEYOR_CONCURRENCY": "4", "CONVEYOR_DATABASE_URL": "memory://"}
    s = Settings.from_env(env, concurrency=8, database_url=None)
    assert (s.concurrency, s.database_url) == (8, "memory://")


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_MAX_LOST", "5")
    assert Settings.from_env().max_lost == 5


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("CONCURRENCY", "four", "int"),
        ("CONCURRENCY", "1.5", "int"),
        ("MAX_LOST", "1e3", "int"),
        ("HEARTBEAT_INTERVAL", "5s", "float"),
        ("RETENTION", "7d", "float"),
    ],
)
def test_unparsable_values_name_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({f"CONVEYOR_{name}": raw})
    assert str(info.value) == f"CONVEYOR_{name}={raw!r} is not a valid {kind}"
    assert info.value.__cause__ is None


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CONVEYOR_CONCURRENCY": "0"}, "concurrency must be >= 1"),
        ({"CONVEYOR_HEARTBEAT_INTERVAL": "0"}, "heartbeat_interval must be > 0 seconds"),
        (
            {"CONVEYOR_HEARTBEAT_TIMEOUT": "5"},
            "heartbeat_timeout must be greater than heartbeat_interval (5.0 <= 5.0)",
        ),
        ({"CONVEYOR_MAX_LOST": "0"}, "max_lost must be >= 1"),
        ({"CONVEYOR_POLL_INTERVAL": "-1"}, "poll_interval must be > 0 seconds"),
        ({"CONVEYOR_SHUTDOWN_GRACE": "-0.1"}, "shutdown_grace must be >= 0 seconds"),
        ({"CONVEYOR_RETENTION": "0"}, "retention must be > 0 seconds"),
        ({"CONVEYOR_QUEUES": " , ,"}, "queues must name at least one queue"),
        # 1e300 used to pass and crash every scheduler pass (timedelta overflow).
        (
            {"CONVEYOR_SCHEDULER_MISFIRE_GRACE": "1e300"},
            "scheduler_misfire_grace must be >= 0 and <= 86400 seconds",
        ),
        (
            {"CONVEYOR_SCHEDULER_MISFIRE_GRACE": "-5"},
            "scheduler_misfire_grace must be >= 0 and <= 86400 seconds",
        ),
    ],
)
def test_invalid_values_are_explained(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert str(info.value) == f"Invalid settings: {problem}"


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"CONVEYOR_CONCURRENCY": "0", "CONVEYOR_MAX_LOST": "0"})
    assert str(info.value) == "Invalid settings: concurrency must be >= 1; max_lost must be >= 1"


def test_empty_queue_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="queues"):
        Settings(queues=("a", ""))


@pytest.mark.parametrize(
    "name", ["HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT", "POLL_INTERVAL", "SHUTDOWN_GRACE"]
)
def test_nan_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        Settings.from_env({f"CONVEYOR_{name}": "nan"})


def test_with_changes_some_fields_and_ignores_none() -> None:
    s = Settings().with_(concurrency=2, log_level=None)
    assert (s.concurrency, s.log_level) == (2, "INFO")
    with pytest.raises(ConfigurationError):
        Settings().with_(concurrency=0)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().concurrency = 3  # type: ignore[misc]


def test_event_and_webhook_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "CONVEYOR_REDIS_URL": "redis://127.0.0.1:6379/0",
            "CONVEYOR_WEBHOOK_ALLOW_PRIVATE": "true",
            "CONVEYOR_WEBHOOK_DISABLE_AFTER": "0",
            "CONVEYOR_EVENT_POLL_INTERVAL": "0.1",
        }
    )
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.webhook_allow_private is True
    assert s.webhook_disable_after == 0
    assert s.event_poll_interval == 0.1
    with pytest.raises(ConfigurationError, match="not a boolean"):
        Settings.from_env({"CONVEYOR_WEBHOOK_ALLOW_PRIVATE": "maybe"})
    with pytest.raises(ConfigurationError, match="redis_url must start with"):
        Settings.from_env({"CONVEYOR_REDIS_URL": "localhost:6379"})


def test_event_stream_max_bytes_is_parsed_and_checked() -> None:
    assert Settings().event_stream_max_bytes == 64 * 1024 * 1024
    s = Settings.from_env({"CONVEYOR_EVENT_STREAM_MAX_BYTES": "1048576"})
    assert s.event_stream_max_bytes == 1_048_576
    with pytest.raises(ConfigurationError, match="event_stream_max_bytes must be >= 1024"):
        Settings.from_env({"CONVEYOR_EVENT_STREAM_MAX_BYTES": "100"})
    with pytest.raises(ConfigurationError, match="CONVEYOR_EVENT_STREAM_MAX_BYTES"):
        Settings.from_env({"CONVEYOR_EVENT_STREAM_MAX_BYTES": "64MiB"})


def test_metrics_port_and_host() -> None:
    s = Settings.from_env({})
    assert (s.metrics_port, s.metrics_host) == (0, "127.0.0.1")  # off, loopback
    s = Settings.from_env({"CONVEYOR_METRICS_PORT": "9090", "CONVEYOR_METRICS_HOST": "0.0.0.0"})
    assert (s.metrics_port, s.metrics_host) == (9090, "0.0.0.0")
    for env, problem in (
        ({"CONVEYOR_METRICS_PORT": "70000"}, "metrics_port must be between 0 (off) and 65535"),
        ({"CONVEYOR_METRICS_PORT": "-1"}, "metrics_port must be between 0 (off) and 65535"),
        ({"CONVEYOR_METRICS_HOST": "a b"}, "metrics_host must be a host name or address"),
        ({"CONVEYOR_METRICS_HOST": "a\x00"}, "metrics_host must be a host name or address"),
    ):
        with pytest.raises(ConfigurationError) as info:
            Settings.from_env(env)
        assert problem in str(info.value)
    with pytest.raises(ConfigurationError, match="CONVEYOR_METRICS_PORT='x' is not a valid int"):
        Settings.from_env({"CONVEYOR_METRICS_PORT": "x"})


# -- fleet-wide job-type defaults ---------------------------------------------------------------
def test_job_type_defaults_from_the_environment() -> None:
    s = Settings.from_env({})
    assert (s.job_timeout, s.job_max_retries, s.job_retry_base, s.job_retry_factor) == (
        300.0,
        3,
        1.0,
        2.0,
    )
    s = Settings.from_env(
        {
            "CONVEYOR_JOB_TIMEOUT": "45.5",
            "CONVEYOR_JOB_MAX_RETRIES": "7",
            "CONVEYOR_JOB_RETRY_BASE": "0.25",
            "CONVEYOR_JOB_RETRY_FACTOR": "3",
        }
    )
    assert (s.job_timeout, s.job_max_retries, s.job_retry_base, s.job_retry_factor) == (
        45.5,
        7,
        0.25,
        3.0,
    )
    assert Settings.from_env({"CONVEYOR_JOB_TIMEOUT": "0"}).job_timeout == 0  # no timeout


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"CONVEYOR_JOB_TIMEOUT": "-1"}, "job_timeout (CONVEYOR_JOB_TIMEOUT) must be"),
        ({"CONVEYOR_JOB_TIMEOUT": "86401"}, "job_timeout (CONVEYOR_JOB_TIMEOUT) must be"),
        ({"CONVEYOR_JOB_TIMEOUT": "nan"}, "job_timeout must be a finite number"),
        ({"CONVEYOR_JOB_MAX_RETRIES": "101"}, "job_max_retries (CONVEYOR_JOB_MAX_RETRIES)"),
        ({"CONVEYOR_JOB_MAX_RETRIES": "-1"}, "job_max_retries (CONVEYOR_JOB_MAX_RETRIES)"),
        ({"CONVEYOR_JOB_RETRY_BASE": "-0.5"}, "job_retry_base (CONVEYOR_JOB_RETRY_BASE)"),
        ({"CONVEYOR_JOB_RETRY_BASE": "inf"}, "job_retry_base must be a finite number"),
        ({"CONVEYOR_JOB_RETRY_FACTOR": "0.5"}, "job_retry_factor (CONVEYOR_JOB_RETRY_FACTOR)"),
    ],
)
def test_bad_job_type_defaults_are_refused_naming_the_variable(
    env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [
        ("JOB_MAX_RETRIES", "three", "int"),
        ("JOB_MAX_RETRIES", "2.5", "int"),
        ("JOB_TIMEOUT", "5m", "float"),
    ],
)
def test_unparsable_job_type_defaults_name_the_variable(name: str, raw: str, kind: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({f"CONVEYOR_{name}": raw})
    assert str(info.value) == f"CONVEYOR_{name}={raw!r} is not a valid {kind}"


def test_an_app_built_without_settings_takes_the_job_defaults_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conveyor.app import Conveyor
    from conveyor.storage.memory import MemoryStore

    monkeypatch.setenv("CONVEYOR_JOB_MAX_RETRIES", "9")
    monkeypatch.setenv("CONVEYOR_JOB_TIMEOUT", "12")
    monkeypatch.setenv("CONVEYOR_JOB_RETRY_FACTOR", "4")
    app = Conveyor(store=MemoryStore())

    @app.job("plain")
    def plain(ctx: object) -> None: ...

    @app.job("own", max_retries=1, timeout=None)
    def own(ctx: object) -> None: ...

    assert (plain.max_retries, plain.timeout, plain.retry.factor) == (9, 12.0, 4.0)
    assert (own.max_retries, own.timeout, own.retry.factor) == (1, None, 4.0)


def test_the_dead_letter_switch_is_a_boolean_named_in_its_error() -> None:
    assert Settings.from_env({"CONVEYOR_JOB_DEAD_LETTER": "off"}).job_dead_letter is False
    assert Settings.from_env({"CONVEYOR_JOB_DEAD_LETTER": "yes"}).job_dead_letter is True
    with pytest.raises(ConfigurationError, match="CONVEYOR_JOB_DEAD_LETTER='maybe'"):
        Settings.from_env({"CONVEYOR_JOB_DEAD_LETTER": "maybe"})
