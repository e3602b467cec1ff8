"""A job type fired every second by a cron schedule declared in code, for the
schedule acceptance tests (``conveyor up --app cronapp``).

The handler appends ``<fire time> <job id> <pid>`` to ``$CRON_TEST_LOG`` (each
process its own file; O_APPEND, one write per line): the tests count fire
instants from these lines, not from the store.
"""

from __future__ import annotations

import os

from conveyor import Conveyor, JobContext


def register(app: Conveyor) -> None:
    @app.cron("* * * * * *", name="every-second")
    @app.job("cron_tick", max_retries=5)
    async def cron_tick(ctx: JobContext) -> None:
        line = f"{ctx.metadata['fire_at']} {ctx.job_id} {os.getpid()}\n".encode()
        fd = os.open(os.environ["CRON_TEST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
