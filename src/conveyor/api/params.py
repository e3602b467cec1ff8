"""Query strings: an unknown or repeated parameter is a 400, never ignored.

Why: a misspelled filter (``GET /api/jobs?state=failed`` for ``status=``) that
is silently dropped answers with every job, which a script then retries,
cancels or purges; ``POST /api/dlq/retry-all?job-type=x`` would retry every
dead letter. Every API route checks its query string after its key
(``Auth.require`` calls ``refuse_unknown_params``, so a missing key is still a
401 first).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from conveyor.domain.errors import FieldError, ValidationError

MAX_NAMED = 5  #: unknown names quoted in the message (each cut to 40 characters)

#: Kept on the route object itself, not in a table by id(): a route of an app that
#: is gone can leave its id to another app's route, then checked with wrong names.
_ATTR = "_conveyor_query_names"


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _declared(route: APIRoute) -> frozenset[str]:
    known: frozenset[str] | None = getattr(route, _ATTR, None)
    if known is None:
        known = frozenset(_query_names(route.dependant))
        setattr(route, _ATTR, known)
    return known


async def refuse_unknown_params(request: Request) -> None:
    """Raises ``ValidationError`` (400, one detail per unknown name) when the
    query string has a parameter the route does not declare; the message names
    the ones it takes."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _declared(route)
    unknown = sorted({name for name in request.query_params if name not in allowed})
    if not unknown:
        problems = [
            FieldError(name, "given more than once: give it once (lists are comma-separated)")
            for name in sorted(allowed)
            if len(request.query_params.getlist(name)) > 1
        ]
        if problems:
            raise ValidationError(
                "Bad query parameter(s): "
                + "; ".join(f"{p.field} {p.message}" for p in problems[:MAX_NAMED]),
                problems[:MAX_NAMED],
            )
        return
    takes = ", ".join(sorted(allowed)) or "none"
    shown = [name[:40] for name in unknown[:MAX_NAMED]]
    raise ValidationError(
        f"Unknown query parameter(s) {', '.join(map(repr, shown))}: this route takes {takes}",
        [FieldError(name, f"unknown query parameter; allowed: {takes}") for name in shown],
    )
