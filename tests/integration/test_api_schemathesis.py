"""Property-based check of the REST API against its own OpenAPI document (schemathesis).

Generated requests (valid and invalid) must never produce a 5xx, every response
must be one the schema declares, in the shape it declares, and every error
response must carry the error envelope of API.md.
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

import conveyor.demo
from conveyor.api.app import create_app
from conveyor.app import Conveyor
from conveyor.security.vault import MasterKey
from conveyor.settings import Settings

# schemathesis needs the schema when the module is collected (its lazy `from_fixture`
# loader does not work with pytest 9), so the app is built here, on a throwaway database.
_DIR = Path(tempfile.mkdtemp(prefix="conveyor-schemathesis-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
# schemathesis calls the app as host "testserver": allowed like a configured name.
# A master key: /api/secrets answers 503 without one (a server fault, by design).
CV = Conveyor(
    settings=Settings(
        database_url=f"sqlite:///{_DIR / 'api.db'}",
        allowed_hosts=("testserver",),
        master_key=MasterKey.generate().to_base64(),
    )
)
conveyor.demo.register(CV)
API = create_app(CV)
schema = schemathesis.openapi.from_asgi("/openapi.json", API)


@pytest.fixture(scope="module", autouse=True)
def _store() -> Iterator[None]:
    # schemathesis runs the app and its lifespan on an event loop of its own thread. The
    # SQLite store works from any loop: open it here (the lifespan's open is then a no-op)
    # so that it is closed, and its file removed, when this module is done.
    asyncio.run(CV.open())
    yield
    asyncio.run(CV.close())
    shutil.rmtree(_DIR, ignore_errors=True)


def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error response is JSON with ``success: false`` and a non-empty ``error``."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert body.get("success") is False, body
    assert isinstance(body.get("error"), str), body
    assert body["error"].strip(), body
    return True


# positive_data_acceptance is replaced by the variant below. allow_header_conformance
# stays on: a 405 lists every method of every route at its path.
EXCLUDED = [positive_data_acceptance, negative_data_rejection]


def negative_data_rejection_or_too_large(ctx: Any, response: Any, case: Any) -> Any:
    """Schema-violating requests are refused; 413 is a refusal too (a body past
    the 1 MiB limit, e.g. a workflow with more steps than the schema allows, is
    turned away before it is parsed)."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


def positive_data_acceptance_but_unknown_parents(ctx: Any, response: Any, case: Any) -> Any:
    """Schema-valid requests are accepted, except documented limits the schema cannot
    express: ``depends_on`` naming jobs that do not exist, JSON integers beyond 64 bits
    (which Conveyor does not store), NUL characters, job types no worker serves,
    timestamps outside 1970..9999-12-30 UTC, and webhook URLs whose host does not resolve to a
    public address (this machine has no DNS: every generated host is refused)."""
    if response.status_code == 400:
        details = response.json().get("details") or []
        if {d.get("field") for d in details} == {"depends_on"}:
            return None
        if {d.get("field") for d in details} == {"url"} and any(
            "resolve" in d.get("message", "") or "port" in d.get("message", "") for d in details
        ):
            return None
        limits = ("64-bit", "NUL", "unknown job type", "must be between", "lone surrogates")
        if details and all(any(m in d.get("message", "") for m in limits) for d in details):
            return None
        # Schedules: a cron expression or an IANA zone the schema can only bound in
        # length, a name generated twice, a payload the job type's handler refuses.
        if details and all(
            d.get("field") in ("cron", "timezone")
            or (d.get("field") == "name" and d.get("message") == "already taken")
            or str(d.get("field", "")).startswith("payload")
            for d in details
        ):
            return None
        # Workflows: a DAG's rules (unique names, known parents, no cycle, limits) and
        # each step's job rules, which the schema cannot express.
        if (
            case.path == "/api/workflows"
            and details
            and all(
                str(d.get("field", "")).startswith(("steps", "depends_on", "name", "payload"))
                for d in details
            )
        ):
            return None
    return positive_data_acceptance(ctx, response, case)


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case: schemathesis.Case) -> None:
    case.call_and_validate(
        excluded_checks=EXCLUDED,
        additional_checks=[
            error_envelope,
            positive_data_acceptance_but_unknown_parents,
            negative_data_rejection_or_too_large,
        ],
    )
