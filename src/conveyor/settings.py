"""Settings: one frozen object, read from flags or ``CONVEYOR_*`` variables."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from conveyor.domain.errors import ConfigurationError

DEFAULT_DATABASE_URL = "sqlite:///./conveyor.db"


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
        if not self.queues or not all(self.queues):
            problems.append("queues must name at least one queue")
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
}


def _parse(name: str, raw: str) -> Any:
    if name == "queues":
        return tuple(q.strip() for q in raw.split(",") if q.strip())
    kind = _TYPES.get(name)
    if kind is None:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise ConfigurationError(
            f"CONVEYOR_{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None
