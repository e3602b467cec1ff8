"""``CONVEYOR_JOB_DEAD_LETTER=false``: the dead-letter queue switched off.

A job that fails for good is always marked ``failed`` (its history, error and
events are written as usual). With the DLQ on (the default) it then stays until
someone retries or purges it. With it off, it is deleted ``CONVEYOR_RETENTION``
seconds after it failed, like a completed or cancelled job: the fleet keeps no
backlog of failures for triage. Conveyor's own jobs (``conveyor.`` types, e.g.
webhook deliveries) keep their DLQ either way.
"""

from __future__ import annotations

from datetime import datetime

from conveyor.domain.errors import InvalidTransition, NotFound
from conveyor.domain.job import JobQuery
from conveyor.domain.states import JobState
from conveyor.storage.base import Store

#: Failed jobs read and deleted per round.
BATCH = 500


async def prune_dead_letters(store: Store, older_than: datetime, now: datetime) -> int:
    """Delete failed (non-internal) jobs that failed before ``older_than``, oldest
    first, ``BATCH`` at a time; returns how many. A job retried or purged in the
    meantime is skipped, not an error."""
    query = JobQuery(
        states=(JobState.FAILED,),
        limit=BATCH,
        sort="completed_at",
        descending=False,
        include_internal=False,
    )
    total = 0
    while True:
        page = await store.list_jobs(query)
        ids = [
            j.id for j in page.jobs if j.completed_at is not None and j.completed_at < older_than
        ]
        if not ids:
            return total
        try:
            purged = await store.purge_failed(ids, now)
        except (InvalidTransition, NotFound):  # one left the DLQ meanwhile: the rest still go
            purged = 0
            for job_id in ids:
                try:
                    purged += await store.purge_failed([job_id], now)
                except (InvalidTransition, NotFound):
                    continue
        total += purged
        if purged == 0 or len(ids) < BATCH:
            return total
