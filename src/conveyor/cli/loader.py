"""Resolve ``APP`` arguments (``module`` or ``module:attr``) into job registrations."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from conveyor.app import Conveyor
from conveyor.domain.errors import ConfigurationError


def apply_app(app: Conveyor, spec: str) -> None:
    """Register the job types that ``spec`` provides on ``app``.

    ``spec`` is ``package.module`` (uses its ``app`` Conveyor, else its
    ``register(app)`` function) or ``package.module:name`` (a Conveyor or a
    ``register``-style function).
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"Cannot import {module_name!r} (from {spec!r}): {exc}") from exc
    if attr:
        if not hasattr(module, attr):
            raise ConfigurationError(f"Module {module_name!r} has no attribute {attr!r}")
        target: Any = getattr(module, attr)
    elif isinstance(getattr(module, "app", None), Conveyor):
        target = module.app
    elif callable(getattr(module, "register", None)):
        target = module.register
    else:
        raise ConfigurationError(
            f"Module {module_name!r} has neither a Conveyor named `app` nor a "
            "`register(app)` function; name one with MODULE:ATTR"
        )
    if isinstance(target, Conveyor):
        app.include(target)
    elif callable(target):
        target(app)
    else:
        raise ConfigurationError(f"{spec!r} is neither a Conveyor nor a register(app) function")
