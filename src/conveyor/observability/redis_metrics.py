"""Latency of the Redis commands this process sends: ``conveyor_redis_command_seconds``.

Process-wide, unlike the rest of ``Metrics``: the Redis clients (the event bus,
Redis locks, the API's rate limiter) belong to the process, not to whichever part
of it serves ``/metrics``, so every ``Metrics`` renders this one family. Each
client labels its commands with ``client`` (``bus``, ``locks``, ``ratelimit``)
and ``op`` (see ``docs/metrics.md``). Observations come from the event loop the
clients run on, like every other family's (no lock).
"""

from __future__ import annotations

from conveyor.observability.families import Histogram, HistogramChild

#: Seconds: a loopback round trip is ~0.1 ms, a fsynced write ~1 ms.
REDIS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
)
#: Distinct (client, op) label sets kept; later ones count as op ``other`` (an
#: application may send any command through ``bus.client``).
MAX_OPS = 64

REDIS_COMMANDS = Histogram(
    "conveyor_redis_command_seconds",
    "Redis command latency as this process's clients see it (round trip, retries "
    "included), by client (bus, locks, ratelimit) and op (command or operation); "
    "blocking reads are not timed",
    ["client", "op"],
    buckets=REDIS_BUCKETS,
)

_children: dict[tuple[str, str], HistogramChild] = {}


def child(client: str, op: str) -> HistogramChild:
    """The histogram child for ``client``/``op`` (``op`` ``other`` past ``MAX_OPS``)."""
    found = _children.get((client, op))
    if found is not None:
        return found
    if len(_children) >= MAX_OPS:
        other = (client, "other")
        found = _children.get(other)
        if found is None:
            found = _children[other] = REDIS_COMMANDS.labels(*other)
        return found
    found = _children[(client, op)] = REDIS_COMMANDS.labels(client, op)
    return found


def observe(client: str, op: str, seconds: float) -> None:
    """Count one ``op`` of ``client`` that took ``seconds``."""
    child(client, op).observe(seconds)
