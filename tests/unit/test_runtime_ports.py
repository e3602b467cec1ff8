"""The runtime's dependency bundle: what the composition root hands the worker."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.app import Conveyor
from conveyor.domain.job import Finish
from conveyor.domain.states import Action
from conveyor.runtime.ports import RuntimeDeps
from conveyor.settings import Settings
from conveyor.storage.memory import MemoryStore


def noop(ctx: Any) -> None:
    return None


@pytest.fixture
def app() -> Conveyor:
    return Conveyor(settings=Settings(database_url="memory://"), store=MemoryStore())


def test_the_bundle_holds_the_apps_own_ports(app: Conveyor) -> None:
    deps = app.deps
    assert isinstance(deps, RuntimeDeps)
    assert (deps.settings, deps.store, deps.bus) == (app.settings, app.store, app.bus)
    assert deps.now().tzinfo is not None
    app.job("late")(noop)  # registered after the bundle was built
    assert "late" in deps.registry


def test_a_worker_takes_the_bundle_not_the_app(app: Conveyor) -> None:
    app.job("j")(noop)
    worker = app.worker(concurrency=3)
    assert worker.deps is app.deps
    assert not hasattr(worker, "app")
    assert worker.concurrency == 3


def test_settings_replaced_on_the_app_reach_workers_built_after(app: Conveyor) -> None:
    app.job("j")(noop)
    app.settings = app.settings.with_(concurrency=7)
    assert app.deps.settings.concurrency == 7
    assert app.worker().concurrency == 7


def test_the_apps_listeners_are_the_bundles_signals(app: Conveyor) -> None:
    woken: list[str] = []
    finished: list[tuple[str, bool]] = []

    def wake() -> None:
        woken.append("wake")

    def events() -> None:
        woken.append("events")

    app.add_listener(wake)
    app.on_events_written(events)
    app.on_finish(lambda f, ok: finished.append((f.job_id, ok)))
    assert app.deps.signals.has_finish_listeners
    assert app.has_finish_listeners
    app.deps.signals.notify_listeners()
    app.deps.signals.events_written()
    app.deps.signals.emit_finished(Finish("j1", "t", Action.COMPLETE), True)
    assert woken == ["wake", "events"]
    assert finished == [("j1", True)]
    app.remove_listener(wake)
    app.remove_events_listener(events)
    app.notify_listeners()
    app.events_written()
    assert woken == ["wake", "events"]
