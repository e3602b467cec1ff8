"""The ``store`` fixture: every contract test runs once per Store adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from storekit import ADAPTERS

from conveyor.storage.base import Store


@pytest.fixture(params=list(ADAPTERS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with ADAPTERS[request.param](tmp_path) as opened:
        yield opened


@pytest.fixture
def adapter(request: pytest.FixtureRequest, store: Store) -> str:
    """The id of the adapter under test (``memory``, ``sqlite``, ...)."""
    return request.node.callspec.params["store"]


@pytest.fixture
def known_bug(request: pytest.FixtureRequest, adapter: str):
    """``known_bug({"memory"}, "bug: ...")`` marks this run strict-xfail on those adapters."""

    def mark(adapters: set[str], reason: str) -> None:
        if adapter in adapters:
            # Only a failed assertion (or a missing expected exception) counts as
            # the known bug; any other error still fails the run.
            request.applymarker(
                pytest.mark.xfail(
                    reason=reason, strict=True, raises=(AssertionError, pytest.fail.Exception)
                )
            )

    return mark
