"""Settings: one frozen object, read from flags or ``CONVEYOR_*`` variables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from conveyor.domain.errors import ConfigurationError
from conveyor.domain.job import DEFAULT_MAX_RETRIES, MAX_RETRIES_LIMIT
from conveyor.domain.limits import MAX_TIMEOUT_SECONDS

DEFAULT_DATABASE_URL = "sqlite:///./conveyor.db"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")  # auto: uvloop when installed
ISOLATION_MODES = ("thread", "process")
LOCKS_BACKENDS = ("store", "redis")  # redis: needs redis_url
LOG_FORMATS = ("console", "json")
#: Longest CONVEYOR_SCHEDULER_MISFIRE_GRACE, in seconds (one day).
MAX_MISFIRE_GRACE = 86_400.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, its default and its environment variable (``CONVEYOR_<NAME>``)."""

    database_url: str = DEFAULT_DATABASE_URL
    concurrency: int = 10
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 15.0
    max_lost: int = 2
    poll_interval: float = 1.0
    shutdown_grace: float = 30.0
    retention: float = 7 * 24 * 3600.0
    queues: tuple[str, ...] = ("default",)
    log_level: str = "INFO"
    redis_url: str = ""  # empty: in-process event bus
    event_poll_interval: float = 0.02
    event_stream_maxlen: int = 100_000
    event_stream_max_bytes: int = 64 * 1024 * 1024  # what the bus holds in this process
    webhook_timeout: float = 10.0
    webhook_max_retries: int = 8
    webhook_retry_base: float = 2.0
    webhook_disable_after: int = 20  # and at least this many failed attempts in a row
    webhook_disable_after_seconds: float = 86_400.0  # failing this long without a success
    webhook_allow_private: bool = False
    ws_queue_size: int = 1_000
    event_loop: str = "auto"  # one of EVENT_LOOPS
    isolation: str = "thread"  # one of ISOLATION_MODES: where sync handlers run by default
    max_jobs_per_child: int = 0  # process isolation: recycle a child after N jobs (0 = never)
    max_memory_mb: int = 0  # process isolation: memory ceiling of a child (0 = none)
    max_stuck_jobs: int = 0  # stuck handlers before the worker exits (0 = its concurrency)
    allow_unknown_job_types: bool = False  # accept submits of types no one has registered
    trust_user_header: bool = False  # created_by from X-User-Id (behind a trusted proxy)
    # Host names the API answers besides localhost and loopback addresses
    # (DNS-rebinding guard); "*" = any, ".example.com" = its subdomains.
    allowed_hosts: tuple[str, ...] = ()
    locks_backend: str = "store"  # one of LOCKS_BACKENDS: where app.lock() keeps its locks
    # Cron schedules (docs/schedules.md): whether `conveyor up` runs a scheduler,
    # how late a fire time may be and still count as on time, and the longest
    # the scheduler sleeps (how soon it sees new or changed schedules).
    scheduler: bool = True
    scheduler_misfire_grace: float = 60.0
    scheduler_interval: float = 1.0
    # `conveyor worker`'s /metrics, /health, /ready (docs/metrics.md): off by default,
    # since a fixed port collides when several workers share a host.
    metrics_port: int = 0  # 0 = off
    metrics_host: str = "127.0.0.1"
    # Signs dashboard session cookies; empty: a random secret per process (sessions
    # end when the process restarts). Set it to keep logins across restarts.
    dashboard_secret: str = ""
    log_format: str = "console"  # one of LOG_FORMATS: console lines or one JSON object a line
    # What a worker offers to jobs with requirements: "gpu=a100" items
    # (CONVEYOR_CAPABILITIES=gpu=a100,region=eu; CLI --capability).
    capabilities: tuple[str, ...] = ()
    # The secrets vault (docs/security.md): the master key as base64 of 32 bytes,
    # or a file holding it (mode 0600, checked); a previous key still unwraps
    # rows not yet re-wrapped by `conveyor secrets rotate-master`. Never printed.
    master_key: str = field(default="", repr=False)
    master_key_file: str = ""
    master_key_previous: str = field(default="", repr=False)
    secrets_cache_ttl: float = 300.0  # seconds a worker keeps a decrypted value
    secrets_keep_versions: int = 5  # versions kept per secret (older ones are deleted)
    # Request rate limits (`limits` notation, e.g. "600/minute"): per API key, and
    # failed authentications per client address; shared through redis_url when set.
    rate_limits: bool = True
    rate_limit: str = "1200/minute"
    rate_limit_auth_failures: str = "30/minute"
    # Seconds an old secret version is kept after a newer one replaced it (at most
    # secrets_keep_versions versions either way); 0 = only the newest is kept.
    secrets_retention: float = 30 * 86_400.0
    # A directory of one file per secret (Vault Agent, Kubernetes, Docker secrets):
    # payload references read it first, then the vault. "" = the vault only.
    secrets_dir: str = ""
    # Fleet-wide job-type defaults (docs/api.md "Job types"): what a registration
    # that leaves an option out, and a type submitted with no registration, gets.
    # A registration's own value always wins.
    job_timeout: float = 300.0  # seconds; 0 = no timeout
    job_max_retries: int = DEFAULT_MAX_RETRIES
    job_retry_base: float = 1.0  # seconds before the first retry (before jitter)
    job_retry_factor: float = 2.0  # each further retry waits this many times longer
    # false: a job that fails for good is deleted `retention` after it failed, like
    # a completed one, instead of waiting in the dead-letter queue to be purged.
    job_dead_letter: bool = True
    # The audit log (docs/security.md): a signed anchor every this many entries
    # (0 = only when `conveyor audit anchor`/`verify` runs).
    audit_anchor_every: int = 1000

    def __post_init__(self) -> None:
        problems = [
            f"{f.name} must be a finite number"
            for f in fields(self)
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))
        ]
        if self.concurrency < 1:
            problems.append("concurrency must be >= 1")
        if self.heartbeat_interval <= 0:
            problems.append("heartbeat_interval must be > 0 seconds")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            problems.append(
                "heartbeat_timeout must be greater than heartbeat_interval "
                f"({self.heartbeat_timeout} <= {self.heartbeat_interval})"
            )
        if self.max_lost < 1:
            problems.append("max_lost must be >= 1")
        if self.poll_interval <= 0:
            problems.append("poll_interval must be > 0 seconds")
        if self.shutdown_grace < 0:
            problems.append("shutdown_grace must be >= 0 seconds")
        if self.retention <= 0:
            problems.append("retention must be > 0 seconds")
        if self.event_poll_interval <= 0:
            problems.append("event_poll_interval must be > 0 seconds")
        if self.event_stream_maxlen < 1:
            problems.append("event_stream_maxlen must be >= 1")
        if self.event_stream_max_bytes < 1024:
            problems.append("event_stream_max_bytes must be >= 1024 bytes")
        if self.webhook_timeout <= 0:
            problems.append("webhook_timeout must be > 0 seconds")
        if not 0 <= self.webhook_max_retries <= 100:
            problems.append("webhook_max_retries must be between 0 and 100")
        if self.webhook_retry_base < 0:
            problems.append("webhook_retry_base must be >= 0 seconds")
        if self.webhook_disable_after < 0:
            problems.append("webhook_disable_after must be >= 0 (0 = never disable)")
        if self.webhook_disable_after_seconds < 0:
            problems.append("webhook_disable_after_seconds must be >= 0 (0 = never disable)")
        if self.ws_queue_size < 1:
            problems.append("ws_queue_size must be >= 1")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("redis_url must start with redis://, rediss:// or unix://")
        if self.event_loop not in EVENT_LOOPS:
            problems.append(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if self.isolation not in ISOLATION_MODES:
            problems.append(f"isolation must be one of {', '.join(ISOLATION_MODES)}")
        if self.max_jobs_per_child < 0:
            problems.append("max_jobs_per_child must be >= 0 (0 = never recycle)")
        if self.max_memory_mb < 0:
            problems.append("max_memory_mb must be >= 0 (0 = no ceiling)")
        if self.max_stuck_jobs < 0:
            problems.append("max_stuck_jobs must be >= 0 (0 = the worker's concurrency)")
        if any(not h or "/" in h or " " in h for h in self.allowed_hosts):
            problems.append(
                "allowed_hosts must be host names (comma-separated), e.g. conveyor.internal"
            )
        if any("=" not in c for c in self.capabilities):
            problems.append("capabilities must be NAME=VALUE items, e.g. gpu=a100,region=eu")
        if not self.queues or not all(self.queues):
            problems.append("queues must name at least one queue")
        if self.locks_backend not in LOCKS_BACKENDS:
            problems.append(f"locks_backend must be one of {', '.join(LOCKS_BACKENDS)}")
        elif self.locks_backend == "redis" and not self.redis_url:
            problems.append("locks_backend=redis needs redis_url (CONVEYOR_REDIS_URL)")
        if not 0 <= self.scheduler_misfire_grace <= MAX_MISFIRE_GRACE:
            # Past this, fire times overflow datetime arithmetic (every pass crashed)
            # and an every-second schedule would fire a day of instants at once.
            problems.append(
                f"scheduler_misfire_grace must be >= 0 and <= {MAX_MISFIRE_GRACE:g} seconds"
            )
        if not 0 < self.scheduler_interval <= 60:
            problems.append("scheduler_interval must be > 0 and <= 60 seconds")
        if self.secrets_cache_ttl < 0:
            problems.append("secrets_cache_ttl must be >= 0 seconds (0 = no cache)")
        if not 1 <= self.secrets_keep_versions <= 1000:
            problems.append("secrets_keep_versions must be between 1 and 1000")
        for name in ("rate_limit", "rate_limit_auth_failures"):
            if not _is_rate(getattr(self, name)):
                problems.append(f"{name} must look like 600/minute (count per second|minute|hour)")
        if not 0 <= self.audit_anchor_every <= 10_000_000:
            problems.append("audit_anchor_every must be between 0 (off) and 10000000 entries")
        if not 0 <= self.metrics_port <= 65535:
            problems.append("metrics_port must be between 0 (off) and 65535")
        if not self.metrics_host or any(c in self.metrics_host for c in " /\x00"):
            problems.append("metrics_host must be a host name or address, e.g. 0.0.0.0")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if not 0 <= self.secrets_retention <= 10 * 365 * 86_400:
            problems.append("secrets_retention must be between 0 and 10 years, in seconds")
        problems.extend(_job_default_problems(self))
        if problems:
            raise ConfigurationError("Invalid settings: " + "; ".join(problems))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``CONVEYOR_*`` variables, then ``overrides`` (None = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"CONVEYOR_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_TYPES: dict[str, type] = {
    "concurrency": int,
    "max_lost": int,
    "heartbeat_interval": float,
    "heartbeat_timeout": float,
    "poll_interval": float,
    "shutdown_grace": float,
    "retention": float,
    "event_poll_interval": float,
    "event_stream_maxlen": int,
    "event_stream_max_bytes": int,
    "webhook_timeout": float,
    "webhook_max_retries": int,
    "webhook_retry_base": float,
    "webhook_disable_after": int,
    "webhook_disable_after_seconds": float,
    "ws_queue_size": int,
    "webhook_allow_private": bool,
    "max_jobs_per_child": int,
    "max_memory_mb": int,
    "max_stuck_jobs": int,
    "allow_unknown_job_types": bool,
    "trust_user_header": bool,
    "scheduler": bool,
    "scheduler_misfire_grace": float,
    "scheduler_interval": float,
    "metrics_port": int,
    "secrets_cache_ttl": float,
    "secrets_keep_versions": int,
    "rate_limits": bool,
    "secrets_retention": float,
    "secrets_dir": str,
    "job_timeout": float,
    "job_max_retries": int,
    "job_retry_base": float,
    "job_retry_factor": float,
    "job_dead_letter": bool,
    "audit_anchor_every": int,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, raw: str) -> Any:
    if name in ("queues", "allowed_hosts", "capabilities"):
        return tuple(q.strip() for q in raw.split(",") if q.strip())
    kind = _TYPES.get(name)
    if kind is None:
        return raw
    if kind is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigurationError(f"CONVEYOR_{name.upper()}={raw!r} is not a boolean (true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigurationError(
            f"CONVEYOR_{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None


def _is_rate(text: str) -> bool:
    """``text`` is one ``N/unit`` or ``N per unit`` rate the ``limits`` library reads."""
    from limits import parse_many

    try:
        return len(parse_many(text)) == 1
    except ValueError:
        return False


def _job_default_problems(s: Settings) -> list[str]:
    """What is wrong with the fleet-wide job-type defaults, each naming its variable
    (the ranges are a registration's: ``app.job`` refuses the same values)."""
    problems = []
    if not (s.job_timeout == 0 or 0 < s.job_timeout <= MAX_TIMEOUT_SECONDS):
        problems.append(
            f"job_timeout (CONVEYOR_JOB_TIMEOUT) must be seconds above 0 and at most "
            f"{MAX_TIMEOUT_SECONDS}, or 0 for no timeout"
        )
    if not 0 <= s.job_max_retries <= MAX_RETRIES_LIMIT:
        problems.append(
            f"job_max_retries (CONVEYOR_JOB_MAX_RETRIES) must be between 0 and {MAX_RETRIES_LIMIT}"
        )
    if not s.job_retry_base >= 0:
        problems.append("job_retry_base (CONVEYOR_JOB_RETRY_BASE) must be >= 0 seconds")
    if not s.job_retry_factor >= 1:
        problems.append("job_retry_factor (CONVEYOR_JOB_RETRY_FACTOR) must be >= 1")
    return problems
