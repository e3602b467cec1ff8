"""A unique prefix (6+ hex digits) names a workflow on every backend, as one names
a job: what ``conveyor workflows show/cancel/retry`` take."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from appkit import app_on

import conveyor.demo
from conveyor import Conveyor
from conveyor.domain.errors import ValidationError, WorkflowNotFound
from conveyor.storage.base import Store
from conveyor.workflows import parse_definition


@pytest.fixture
async def app(store: Store) -> AsyncIterator[Conveyor]:
    async with app_on(store, conveyor.demo.register) as conveyor_app:
        yield conveyor_app


def definition(name: str):
    return parse_definition({"name": name, "steps": [{"name": "a", "job_type": "test_job"}]})


async def test_a_unique_prefix_resolves_and_a_shared_one_names_the_candidates(app):
    first, _ = await app.workflows.submit(definition("one"))
    second, _ = await app.workflows.submit(definition("two"))
    ids = sorted([first.id, second.id])
    common = 0
    while ids[0][common] == ids[1][common]:
        common += 1
    for wf_id in ids:
        assert await app.workflows.resolve_id(wf_id[: max(common + 1, 6)]) == wf_id
        assert await app.workflows.resolve_id(wf_id.upper()) == wf_id  # as pasted
    assert await app.store.workflow_ids_with_prefix(ids[0][: common + 1], 6) == [ids[0]]
    if common >= 6:  # two workflows made a moment apart share their first digits
        assert await app.store.workflow_ids_with_prefix(ids[0][:common], 6) == ids
        with pytest.raises(ValidationError) as err:
            await app.workflows.resolve_id(ids[0][:common])
        assert "ambiguous" in err.value.message
        assert ids[0] in err.value.message
        assert ids[1] in err.value.message


@pytest.mark.parametrize("text", ["01a2", "", "zzzzzzzz", "a" * 33, "abc\x00def", "0" * 6 + " x"])
async def test_a_short_or_malformed_prefix_is_refused(app, text):
    with pytest.raises(ValidationError) as err:
        await app.workflows.resolve_id(text)
    assert "at least 6" in err.value.message
    assert err.value.details[0].field == "workflow_id"


async def test_a_prefix_no_workflow_has_is_not_found(app):
    await app.workflows.submit(definition("one"))
    with pytest.raises(WorkflowNotFound):
        await app.workflows.resolve_id("ffffffffff")
