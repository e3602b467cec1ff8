"""PostgreSQL Store (asyncpg): many workers and API processes share one database.

Hot path, one round trip per batch: ``fetch`` is one ``FOR UPDATE SKIP LOCKED``
CTE feeding an ``UPDATE ... RETURNING`` that also writes execution rows and
outbox events; ``finish_many`` locks the batch's running rows, then writes
every job update, execution row and event in one ``unnest`` statement.
Wake-ups travel by ``LISTEN/NOTIFY`` (one notify per statement, not per row).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import asyncpg
import orjson
import structlog

from conveyor.domain.auth import ApiKey, Scope
from conveyor.domain.dashboard import Count, Cursor, MinuteBucket, RecentStats
from conveyor.domain.errors import (
    ApiKeyNotFound,
    ConfigurationError,
    ConveyorError,
    FieldError,
    InvalidTransition,
    JobNotCancellable,
    JobNotFound,
    StoreError,
    StoreUnavailable,
    ValidationError,
    WorkflowNotFound,
)
from conveyor.domain.events import WEBHOOK_DISABLED
from conveyor.domain.flow import MAX_RATE_WINDOW_SECONDS, FlowLimits, FlowStats, QueueInfo
from conveyor.domain.ids import new_job_id, new_job_ids, new_token
from conveyor.domain.job import (
    FINISH_ACTIONS,
    PARENT_FAILED_ERROR,
    Activity,
    EnqueueResult,
    Event,
    Execution,
    Finish,
    Job,
    JobQuery,
    JobTypeInfo,
    NewJob,
    Page,
    Rescued,
    WorkerInfo,
    lost_action,
    require_failed,
    validate_batch,
    validate_steps,
)
from conveyor.domain.locks import LockInfo
from conveyor.domain.states import EVENT_FOR_ACTION, Action, EventType, JobState, next_state
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
    Webhook,
    WebhookNotFound,
    WebhookState,
)
from conveyor.domain.workflow import (
    WORKFLOW_CANCEL_REASON,
    WORKFLOW_SUBMITTED,
    WORKFLOW_UPDATED,
    NewWorkflow,
    StepDetail,
    StepSpec,
    Workflow,
    WorkflowQuery,
    check_dag,
    fail_fast_reason,
    settled_status,
    step_state,
    terminal_event,
    workflow_event,
)
from conveyor.security.redact import redact, redact_url
from conveyor.storage.audit import owned as audit_owned
from conveyor.storage.audit_postgres import PostgresAudit
from conveyor.storage.base import (
    QueueStat,
    Store,
    check_limit,
    delivery_from_row,
    delivery_params,
    disabled_event,
    prefix_upper_bound,
    row_event,
    webhook_from_row,
)
from conveyor.storage.browse import browse_sql
from conveyor.storage.codec import dumps, dumps_object, roundtrip
from conveyor.storage.finishing import RESCUE_QUERY, RunningRow, plan_finishes
from conveyor.storage.flow import (
    KEEP_LIMIT,
    FlowRow,
    check_queue_change,
    flow_stats,
    limits_from_row,
)
from conveyor.storage.locks import lock_from_row
from conveyor.storage.schedules_postgres import PostgresSchedules
from conveyor.storage.secrets_postgres import PostgresSecrets
from conveyor.storage.sql import load_migrations, load_queries
from conveyor.storage.workflows import (
    MAX_MOVED_LISTED,
    Moved,
    check_can_add,
    check_retryable,
    descendants,
    event_steps,
    group_moved,
    retry_states,
    split_added,
    step_details,
    updated_event,
    wants_fail_fast,
    workflow_from_row,
)

T = TypeVar("T")
Q = load_queries("postgres")
W = load_queries("postgres", "workflows.sql")
LQ = load_queries("postgres", "locks.sql")
MQ = load_queries("postgres", "metrics.sql")
DQ = load_queries("postgres", "dashboard.sql")
FQ = load_queries("postgres", "flow.sql")
#: Seconds a store trusts its copy of which job types and queues have limits
#: (a new limit is seen at once anyway: the ordinary fetch returns nothing then).
FLOW_CONFIG_TTL = 1.0
# insert_jobs for batches with an idempotency key (and without: no conflict possible)
_INSERT_KEYED = Q["insert_jobs"].replace("{on_key_conflict}", Q["on_key_conflict"])
_INSERT_UNKEYED = Q["insert_jobs"].replace("{on_key_conflict}", "")
CHANNEL = "conveyor_jobs"
log = structlog.get_logger("conveyor.postgres")

_UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # Raised when a pool resets a connection the server just dropped.
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


# Class 53 (disk full, out of memory, too many connections) and a server in
# recovery or read-only: "retry later", not a bug (HTTP 503, not 500).
_OUT_OF_RESOURCES = (
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


def _resource_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return "the database disk is full"
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return "the database is read-only"
    return "the database is out of resources"


def _usable(conn: Any) -> bool:
    """A pooled connection still attached, open and outside a transaction (the
    pool detaches a connection it saw break)."""
    try:
        return not conn.is_closed() and not conn.is_in_transaction()
    except asyncpg.InterfaceError:  # "released back to the pool"
        return False


async def _acquire(pool: asyncpg.Pool) -> Any:
    """A pool connection the server has not hung up on: one that broke while it
    waited in the pool is closed (the pool replaces it), never handed out."""
    for _ in range(pool.get_max_size() + 1):
        conn = await pool.acquire()
        if not _hung_up(conn):
            return conn
        _discard(conn)
        await _release(pool, conn)
    return await pool.acquire()  # every one was replaced: this one is fresh


# What poll() reports for a socket whose server has hung up or reset it. An idle
# pooled connection is never sent anything else worth keeping (no LISTEN here),
# so where the peer's half-close can't be told apart, readable data counts too.
_POLL = hasattr(select, "poll")  # not on Windows: there the first statement's retry remains
_HUNG_UP = (
    select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", select.POLLIN) if _POLL else 0
)


def _hung_up(conn: Any) -> bool:
    """Whether the server already closed ``conn``'s socket, asyncpg not knowing yet.

    A backend terminated while its connection sat idle sends an error, then
    closes: asyncpg reads the error (its protocol stops being idle) a loop turn
    before it reads the end of the stream. A connection handed out in between
    fails its caller with "another operation is in progress". One poll(2) of the
    socket, no round trip, sees the hang-up already.
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or not _POLL:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), _HUNG_UP)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us
        return True


# SQLSTATE classes that end the session (08 connection exception, 57 operator
# intervention such as pg_terminate_backend, XX internal error): after one of
# them the connection is dead even if its socket has not reported it yet.
_FATAL_CLASSES = ("08", "57", "XX")


def _reusable_after(exc: BaseException, conn: Any) -> bool:
    """Whether ``conn`` may serve another call after ``exc`` escaped a call on it.

    Only a statement's own error (a constraint, a bad value...) leaves the
    protocol idle. After anything else the connection may still look open
    while asyncpg waits for a reply that will never come: a second caller would
    get "another operation is in progress". Our domain errors are raised
    between statements, with nothing in flight.
    """
    if isinstance(exc, asyncpg.PostgresError):
        statement_error = (exc.sqlstate or "")[:2] not in _FATAL_CLASSES
        return statement_error and _usable(conn)
    return isinstance(exc, ConveyorError) and _usable(conn)


def _discard(conn: Any) -> None:
    """Close ``conn`` at once; the pool replaces it on a later acquire.

    Releasing it instead would put it back in the pool: asyncpg's release only
    notices a closed socket, not a protocol stuck mid-reply.
    """
    with contextlib.suppress(Exception):  # closed or detached already
        conn.terminate()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook: skip asyncpg's default reset query (a round trip per use).

    Safe here: this store never leaves session state behind (no session advisory
    locks, no LISTEN on pooled connections, no SET); asyncpg still rolls back
    an unfinished transaction before this runs.
    """


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


class _Lease:
    """The connection one call holds, with asyncpg's statement methods.

    Its first statement moves to a fresh connection when the held one turns out
    to be dead already: a backend terminated while its connection sat idle sends
    an error that asyncpg reads a moment before the end of the stream, and in
    between the connection looks open but refuses its next statement ("another
    operation is in progress") before sending anything. Anything else is the
    connection's own (``__getattr__``).
    """

    __slots__ = ("_pool", "_started", "conn")

    def __init__(self, pool: asyncpg.Pool, conn: Any) -> None:
        self._pool = pool
        self.conn = conn
        self._started = False

    async def _first(self, call: Callable[[Any], Awaitable[T]]) -> T:
        if self._started:
            return await call(self.conn)
        self._started = True
        try:
            return await call(self.conn)
        except asyncpg.InternalClientError as exc:
            if "another operation" not in str(exc):
                raise
        _discard(self.conn)
        await _release(self._pool, self.conn)
        self.conn = await _acquire(self._pool)
        return await call(self.conn)

    async def execute(self, query: str, *args: Any, **options: Any) -> str:
        return await self._first(lambda c: c.execute(query, *args, **options))

    async def fetch(self, query: str, *args: Any, **options: Any) -> list[asyncpg.Record]:
        return await self._first(lambda c: c.fetch(query, *args, **options))

    async def fetchrow(self, query: str, *args: Any, **options: Any) -> asyncpg.Record | None:
        return await self._first(lambda c: c.fetchrow(query, *args, **options))

    async def fetchval(self, query: str, *args: Any, **options: Any) -> Any:
        return await self._first(lambda c: c.fetchval(query, *args, **options))

    async def begin(self) -> Any:
        """Start a transaction (asyncpg's ``Transaction``, started)."""

        async def start(conn: Any) -> Any:
            transaction = conn.transaction()
            await transaction.start()
            return transaction

        return await self._first(start)

    def __getattr__(self, name: str) -> Any:
        self._started = True
        return getattr(self.conn, name)


def _describe(exc: BaseException) -> str:
    """The error as an operator should read it.

    A call holds its connection alone, so asyncpg's "another operation is in
    progress" here means the server ended the session between two statements of
    the call: asyncpg read the server's goodbye but not yet the end of the stream.
    """
    if isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc):
        return "the server closed the connection (backend terminated or server restarting)"
    return str(exc)


async def _release(pool: asyncpg.Pool, conn: Any) -> None:
    with contextlib.suppress(Exception):  # released (or discarded) already, or broken
        await pool.release(conn)


_OVERLAP_FROM = 64  # batch size from which building the returned jobs overlaps the insert
#: Inserts of one job whose key's holder keeps disappearing (pruned or purged right
#: after it blocked the insert) before the submit gives up.
_KEY_RACE_ATTEMPTS = 3


def _key_race(key: str | None) -> StoreError:
    return StoreError(
        f"idempotency key {key!r}: the job holding it was deleted (pruned or purged) "
        "while this submit ran; submit again"
    )


@dataclass(slots=True)
class _Batch:
    """Jobs being submitted, with the columns computed for them."""

    jobs: Sequence[NewJob]
    ids: list[str]
    states: list[str]
    errors: list[str | None]
    run_ats: list[datetime]
    payloads: list[str]  # JSON text
    metas: list[str]  # JSON text
    now: datetime

    def new_jobs(self) -> list[Job]:
        """The jobs as inserted (what the store would read back)."""
        return [
            _new_job(new, job_id, state, error, run_at, payload, meta, self.now)
            for new, job_id, state, error, run_at, payload, meta in zip(
                self.jobs,
                self.ids,
                self.states,
                self.errors,
                self.run_ats,
                self.payloads,
                self.metas,
                strict=True,
            )
        ]


def _insert_job_args(job: Job, payload: str, meta: str) -> tuple[Any, ...]:
    """The parameters of insert_job for a job built by ``_new_job``, in order."""
    return (
        job.id,
        job.queue,
        job.job_type,
        job.state.value,
        job.priority,
        payload,
        job.error,
        job.max_retries,
        job.timeout_ms,
        job.run_at,
        job.idempotency_key,
        job.workflow_id,
        job.created_by,
        meta,
        job.created_at,
    )


def _new_job(
    new: NewJob,
    job_id: str,
    state: str,
    error: str | None,
    run_at: datetime,
    payload: str,
    meta: str,
    now: datetime,
) -> Job:
    return Job(
        id=job_id,
        job_type=new.job_type,
        state=_STATES[state],
        payload=orjson.loads(payload),
        queue=new.queue,
        priority=new.priority,
        max_retries=new.max_retries,
        timeout_ms=new.timeout_ms,
        run_at=run_at,
        error=error,
        idempotency_key=new.idempotency_key,
        workflow_id=new.workflow_id,
        created_by=new.created_by,
        metadata={} if meta == "{}" else orjson.loads(meta),
        created_at=now,
        updated_at=now,
        completed_at=now if state == "cancelled" else None,
        depends_on=list(dict.fromkeys(new.depends_on)) if new.depends_on else [],
        concurrency_key=new.concurrency_key or None,
        requires=dict(sorted(new.requires.items())) if new.requires else None,
    )


def list_sql(query: JobQuery) -> str:
    """The list_jobs statement in ``query``'s order (a validated sort field)."""
    direction = "DESC" if query.descending else "ASC"
    nulls = ""  # only completed_at can be NULL: a NULLS clause on a NOT NULL
    if query.sort == "completed_at":  # column keeps its index from serving the order
        nulls = " NULLS LAST" if query.descending else " NULLS FIRST"
    return Q["list_jobs"].replace("{order_by}", f"{query.sort} {direction}{nulls}, seq {direction}")


def _event(r: asyncpg.Record) -> Event:
    data, job_id = r["data"], r["job_id"]
    if job_id is not None and "job_id" not in data:
        data["job_id"] = job_id  # job_submitted stores it once, in its column
    return Event(r["id"], r["type"], job_id, data, r["created_at"])


def job_from_record(r: asyncpg.Record) -> Job:
    return Job(
        id=r["id"],
        job_type=r["job_type"],
        state=JobState(r["state"]),
        payload=r["payload"],
        queue=r["queue"],
        priority=r["priority"],
        attempt=r["attempt"],
        max_retries=r["max_retries"],
        timeout_ms=r["timeout_ms"],
        run_at=r["run_at"],
        result=r["result"],
        error=r["error"],
        lease_token=r["lease_token"],
        worker_id=r["worker_id"],
        idempotency_key=r["idempotency_key"],
        workflow_id=r["workflow_id"],
        cancel_requested_at=r["cancel_requested_at"],
        lost_count=r["lost_count"],
        created_by=r["created_by"],
        metadata=r["metadata"],
        created_at=r["created_at"],
        started_at=r["started_at"],
        completed_at=r["completed_at"],
        updated_at=r["updated_at"],
        step_name=r["step_name"],
        schedule_id=r["schedule_id"],
        payload_version=r["payload_version"],
        checkpoint=r["checkpoint"],
        concurrency_key=r["concurrency_key"] or None,
        requires=r["requires"],
    )


class PostgresStore(PostgresSchedules, PostgresSecrets, PostgresAudit, Store):
    """Store on PostgreSQL. ``dsn``: ``postgresql://user:pass@host:5432/db``."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
    ) -> None:
        self.dsn = dsn
        self._min, self._max, self._timeout = min_size, max_size, connect_timeout
        self._pool: asyncpg.Pool | None = None
        # One connection of the pool kept acquired, for whichever call finds it
        # free: asyncpg's acquire + release cost ~110 us here, as much as a
        # quarter of a single-job submit. Other calls take turns in the pool.
        self._lane: Any = None
        self._lane_busy = False
        self._flow_config: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self._flow_config_at = -1e9
        self._anchors: dict[int, str] = {}  # event id -> its txid, for readers polling on
        self._listeners: list[Callable[[], None]] = []
        self._listen_task: asyncio.Task[None] | None = None

    # -- plumbing -----------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min,
                max_size=self._max,
                init=_init_connection,
                reset=_keep_session,
                timeout=self._timeout,
                command_timeout=60,
            )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"Cannot connect to PostgreSQL at {_safe(self.dsn)}: {redact(str(exc))}. Is the "
                "server running and CONVEYOR_DATABASE_URL right?",
                reason="cannot connect to the database",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StoreUnavailable(
                f"PostgreSQL refused {_safe(self.dsn)}: {redact(str(exc))}",
                reason="the database refused the connection",
            ) from exc
        try:
            await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
            self._listen_task = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._drop_lane(pool)
            await pool.close()

    @contextlib.asynccontextmanager
    async def _conn(self, tx: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one call: the kept one when free, else one from the pool.

        A connection that errors is closed and never serves another call; a
        statement's own error (a constraint, a bad value) leaves it usable, and a
        cancel goes back to the pool, whose release waits it out (or closes it).
        """
        pool = self._pool
        if pool is None:
            raise StoreError("The PostgreSQL store is not open: call `await store.open()` first")
        audit = audit_owned()
        if audit is not None:
            tx = True  # a change's audit entries ride its transaction (storage/audit.py)
        on_lane = not self._lane_busy
        if on_lane:
            self._lane_busy = True
        try:
            conn = None
            if on_lane:
                conn, self._lane = self._lane, None  # this call holds it now
                if conn is not None and (not _usable(conn) or _hung_up(conn)):
                    _discard(conn)
                    await _release(pool, conn)
                    conn = None
            lease = _Lease(pool, conn if conn is not None else await _acquire(pool))
            keep = False
            try:
                if tx:
                    transaction = await lease.begin()
                    try:
                        yield cast(asyncpg.Connection, lease)
                        written = await self._audit_flush(lease, audit)
                    except BaseException:
                        with contextlib.suppress(Exception):  # broken: it is closed below
                            await transaction.rollback()
                        raise
                    await transaction.commit()
                    if audit is not None and written is not None:
                        audit.written = written
                else:
                    yield cast(asyncpg.Connection, lease)
                keep = True
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    keep = _reusable_after(exc, lease.conn)
                    if not keep:
                        _discard(lease.conn)
                raise
            finally:
                if on_lane and keep:
                    self._lane = lease.conn
                else:
                    await _release(pool, lease.conn)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"PostgreSQL unavailable: {_describe(exc)}",
                reason="the database connection was lost",
            ) from exc
        except _OUT_OF_RESOURCES as exc:
            raise StoreUnavailable(
                f"PostgreSQL is out of resources: {exc}", reason=_resource_reason(exc)
            ) from exc
        except asyncpg.CharacterNotInRepertoireError as exc:
            # A NUL (or invalid UTF-8) in an id, name or filter: nothing can match it.
            raise ValidationError(
                "A value contains a character PostgreSQL cannot store or compare (NUL): remove it",
                [FieldError("value", "must not contain NUL characters")],
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"PostgreSQL error: {exc}") from exc
        finally:
            if on_lane:
                self._lane_busy = False

    async def _drop_lane(self, pool: asyncpg.Pool) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            await _release(pool, lane)

    async def migrate(self) -> list[str]:
        applied_now: list[str] = []
        async with self._conn(tx=True) as conn:
            await conn.execute(Q["migration_lock"])
            await conn.execute(Q["migrations_table"])
            applied = {r[0]: r[2] for r in await conn.fetch(Q["applied_migrations"])}
            for m in load_migrations("postgres"):
                if m.version in applied:
                    if applied[m.version] != m.checksum:
                        raise ConfigurationError(
                            f"Migration {m.version:04d}_{m.name} was changed after it was "
                            "applied; restore the original file"
                        )
                    continue
                await conn.execute(m.sql)
                await conn.execute(Q["record_migration"], m.version, m.name, m.checksum)
                applied_now.append(f"{m.version:04d}_{m.name}")
        return applied_now

    # -- wake-ups -----------------------------------------------------------------------
    async def subscribe_wakeups(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)
        if self._listen_task is None:
            self._listen_task = asyncio.create_task(self._listen(), name="conveyor-listen")

    def unsubscribe_wakeups(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    async def _listen(self) -> None:
        """One dedicated LISTEN connection; reconnects with backoff (wake everyone then)."""
        backoff = 0.1
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self._timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=lost: ev.set())
                await conn.add_listener(CHANNEL, lambda *_a: self._wake())
                backoff = 0.1
                self._wake()  # anything enqueued while we were not listening
                await lost.wait()
            except asyncio.CancelledError:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
                raise
            except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("listen_connection_lost", error=_describe(exc), retry_in=backoff)
            if conn is not None and not conn.is_closed():
                conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _wake(self) -> None:
        for cb in list(self._listeners):
            cb()

    # -- submit -----------------------------------------------------------------------------
    async def enqueue_many(
        self, jobs: Sequence[NewJob], now: datetime, *, connection: Any = None
    ) -> list[EnqueueResult]:
        validate_batch(jobs)
        payloads = [dumps_object(j.payload) for j in jobs]
        metas = [dumps_object(j.metadata, "metadata") for j in jobs]
        try:
            flow = any(j.concurrency_key or j.requires for j in jobs)
            if len(jobs) == 1 and not jobs[0].depends_on and not flow:
                return [await self._enqueue_one(jobs[0], payloads[0], metas[0], now, connection)]
            if connection is not None:
                # The caller's transaction: the jobs exist only if it commits.
                return await self._enqueue(connection, jobs, payloads, metas, now)
        except asyncpg.PostgresError as exc:  # from the caller's connection (_conn maps its own)
            raise StoreError(f"PostgreSQL error: {exc}") from exc
        # Without dependencies the insert is one statement (jobs, events, notify):
        # atomic on its own, so no BEGIN/COMMIT round trips.
        needs_tx = flow or any(j.depends_on for j in jobs)
        async with self._conn(tx=needs_tx) as conn:
            return await self._enqueue(conn, jobs, payloads, metas, now)

    async def _enqueue_one(
        self, new: NewJob, payload: str, meta: str, now: datetime, connection: Any = None
    ) -> EnqueueResult:
        """The most common submit, one job without dependencies: one statement with
        plain parameters (for one row, arrays cost more than the insert)."""
        job = _new_job(new, new_job_id(), "pending", None, new.run_at or now, payload, meta, now)
        args = _insert_job_args(job, payload, meta)
        borrowed = self._conn() if connection is None else contextlib.nullcontext(connection)
        async with borrowed as conn:
            for _ in range(_KEY_RACE_ATTEMPTS):
                if any(r["id"] == job.id for r in await conn.fetch(Q["insert_job"], *args)):
                    return EnqueueResult(job, False)
                # Not inserted: a kept job holds its idempotency key.
                held = await conn.fetch(Q["by_keys"], [new.idempotency_key])
                if held:
                    return EnqueueResult(job_from_record(held[0]), True)
                # The holder was deleted (pruned, purged) in between: the key is free.
        raise _key_race(new.idempotency_key)

    async def _insert_batch(self, conn: asyncpg.Connection, b: _Batch) -> set[str | None]:
        """insert_jobs for the batch: the ids inserted (not duplicates),
        and None for the NOTIFY row."""
        jobs, ids = b.jobs, b.ids

        def shared(values: Sequence[Any]) -> list[Any]:
            """The column, or its one value when every job has it (see insert_jobs)."""
            column = list(values)
            if len(column) > 1 and column.count(column[0]) == len(column):
                return column[:1]
            return column

        queues = shared([j.queue for j in jobs])
        job_types = shared([j.job_type for j in jobs])
        kept_states = shared(b.states)
        priorities = shared([j.priority for j in jobs])
        event_data = None
        if len(queues) == len(job_types) == len(kept_states) == len(priorities) == 1:
            event_data = {
                "job_type": job_types[0],
                "queue": queues[0],
                "status": kept_states[0],
                "attempt": 0,
                "priority": priorities[0],
            }
        inserted: set[str | None] = {
            ids[i] for i, j in enumerate(jobs) if j.idempotency_key is None
        }  # see insert_jobs: the others' ids come back if they were inserted
        keyed = len(inserted) < len(jobs)
        inserted.update(
            r["id"]
            for r in await conn.fetch(
                _INSERT_KEYED if keyed else _INSERT_UNKEYED,
                ids,
                queues,
                job_types,
                kept_states,
                priorities,
                b.payloads,
                shared(b.errors),
                shared([j.max_retries for j in jobs]),
                shared([j.timeout_ms for j in jobs]),
                shared(b.run_ats),
                shared([j.idempotency_key for j in jobs]),
                shared([j.workflow_id for j in jobs]),
                shared([j.created_by for j in jobs]),
                shared(b.metas),
                b.now,
                event_data,
            )
        )
        return inserted

    async def _enqueue(
        self,
        conn: asyncpg.Connection,
        jobs: Sequence[NewJob],
        payloads: list[Any],
        metas: list[Any],
        now: datetime,
    ) -> list[EnqueueResult]:
        deps = sorted({d for j in jobs for d in j.depends_on})
        parent_state: dict[str, str] = {}
        if deps:
            parent_state = {r["id"]: r["state"] for r in await conn.fetch(Q["lock_parents"], deps)}
            missing = [d for d in deps if d not in parent_state]
            if missing:
                raise ValidationError(
                    f"depends_on: job {missing[0]!r} does not exist",
                    [FieldError("depends_on", f"job {m!r} does not exist") for m in missing],
                )
        ids = new_job_ids(len(jobs))
        states: list[str] = ["pending"] * len(jobs)
        errors: list[str | None] = [None] * len(jobs)
        run_ats = [new.run_at or now for new in jobs]
        for i, new in enumerate(jobs) if deps else ():
            if new.depends_on:
                seen = {parent_state[d] for d in new.depends_on}
                if seen & {"failed", "cancelled"}:
                    states[i], errors[i] = "cancelled", PARENT_FAILED_ERROR
                elif seen != {"completed"}:
                    states[i] = "blocked"
        b = _Batch(jobs, ids, states, errors, run_ats, payloads, metas, now)
        if len(jobs) < _OVERLAP_FROM:
            inserted = await self._insert_batch(conn, b)
            built = b.new_jobs()
        else:
            # Build the jobs to return while PostgreSQL inserts them (two cores, not one).
            insert = asyncio.ensure_future(self._insert_batch(conn, b))
            try:
                await asyncio.sleep(0)  # the insert task runs until it has sent the statement
                built = b.new_jobs()
                inserted = await insert
            finally:
                if not insert.done():  # we were cancelled: the connection must be free again
                    insert.cancel()
                    await asyncio.wait([insert])
        inserted.discard(None)  # the NOTIFY row
        existing: dict[str, Job] = {}
        if len(inserted) < len(jobs):
            keys = [
                j.idempotency_key
                for j, i in zip(jobs, ids, strict=True)
                if i not in inserted and j.idempotency_key is not None
            ]
            for r in await conn.fetch(Q["by_keys"], keys):
                existing[r["idempotency_key"]] = job_from_record(r)
        dep_children = [
            i
            for i, j in zip(ids, jobs, strict=True)
            if i in inserted
            for _ in dict.fromkeys(j.depends_on)
        ]
        dep_parents = [
            p
            for i, j in zip(ids, jobs, strict=True)
            if i in inserted
            for p in dict.fromkeys(j.depends_on)
        ]
        if dep_children:
            await conn.execute(Q["insert_dependencies"], dep_children, dep_parents)
        flow_rows = [
            (i, j.concurrency_key or "", _requires_json(j.requires))
            for i, j in zip(ids, jobs, strict=True)
            if i in inserted and (j.concurrency_key or j.requires)
        ]
        if flow_rows:  # same transaction as the insert: no fetch sees the job without them
            columns = [list(c) for c in zip(*flow_rows, strict=True)]
            await conn.execute(FQ["set_flow_columns"], *columns)
            if any(r[2] for r in flow_rows):
                await conn.execute(FQ["flag_requires"])
        if not existing:
            return [EnqueueResult(job, False) for job in built]
        results = []
        for new, job in zip(jobs, built, strict=True):
            if job.id in inserted:
                results.append(EnqueueResult(job, False))
            else:
                key = new.idempotency_key
                held = existing.get(key) if key is not None else None
                if held is None:  # its holder was deleted (pruned, purged) in between
                    raise _key_race(new.idempotency_key)
                results.append(EnqueueResult(held, True))
        return results

    # -- worker hot path -----------------------------------------------------------------------
    async def fetch(
        self,
        worker_id: str,
        *,
        queues: Sequence[str],
        job_types: Sequence[str],
        limit: int,
        now: datetime,
        capabilities: Mapping[str, str] | None = None,
    ) -> list[Job]:
        check_limit(limit)
        if limit == 0:
            return []
        caps = dict(capabilities or {})
        if self._flow_limited(queues, job_types):
            return await self._fetch_limited(worker_id, queues, job_types, limit, now, caps)
        async with self._conn() as conn:
            rows = await conn.fetch(
                Q["fetch"],
                now,
                not queues,
                list(queues),
                not job_types,
                list(job_types),
                limit,
                new_token(),
                worker_id,
            )
        if not rows:
            # Nothing, or a limit now applies (the ordinary fetch stops then): look.
            await self._read_flow_config()
            if self._flow_limited(queues, job_types):
                return await self._fetch_limited(worker_id, queues, job_types, limit, now, caps)
        return [job_from_record(r) for r in rows]

    async def finish_many(self, finishes: Sequence[Finish], now: datetime) -> list[bool]:
        for f in finishes:
            if f.action not in FINISH_ACTIONS:
                raise InvalidTransition("running", f.action.value)
        finishes = [f if f.action is not Action.COMPLETE else _with_result(f) for f in finishes]
        for f in finishes:
            if f.action is Action.RETRY and f.payload is not None:
                dumps(f.payload)  # a healed payload JSON can't hold: refused before the write
        if not finishes:
            return []
        async with self._conn(tx=True) as conn:
            running = {
                r["id"]: RunningRow(
                    lease_token=r["lease_token"],
                    attempt=r["attempt"],
                    started_at=r["started_at"],
                    job_type=r["job_type"],
                    queue=r["queue"],
                    has_children=r["has_children"],
                    cancel_requested=r["cancel_requested_at"] is not None,
                    run_at=r["run_at"],
                    error=r["error"],
                    workflow_id=r["workflow_id"],
                    step_name=r["step_name"],
                    payload_version=r["payload_version"],
                )
                for r in await conn.fetch(Q["lock_running"], sorted({f.job_id for f in finishes}))
                if r["state"] == "running"
            }
            plan = plan_finishes(finishes, running, now)
            if plan.updates:
                u = plan.updates
                await conn.execute(
                    Q["apply_finishes"],
                    [x.job_id for x in u],
                    [x.state for x in u],
                    [_jsonb(x.result) if x.action is Action.COMPLETE else None for x in u],
                    [x.error for x in u],
                    [x.run_at for x in u],
                    [x.attempt for x in u],
                    [x.keep_worker for x in u],
                    [x.completed_at for x in u],
                    [e[1] for e in plan.executions],
                    [e[2] for e in plan.executions],
                    [e[3] for e in plan.executions],
                    now,
                    [e[0] for e in plan.events],
                    [e[1] for e in plan.events],
                    _json([e[2] for e in plan.events]),
                    [None if x.payload is None else _jsonb(x.payload) for x in u],
                    [e[4] for e in plan.executions],
                )
                moved = plan.moved
                if plan.finished_parents:
                    moved = moved + await self._settle_children(conn, plan.finished_parents, now)
                if moved:
                    await self._settle_workflows(conn, moved, now)
                if any(x.state == "pending" for x in u):
                    await conn.execute(Q["notify"], "")
        return plan.accepted

    async def _settle_children(
        self, conn: asyncpg.Connection, parents: list[str], now: datetime
    ) -> list[Moved]:
        """Unblock children whose parents all completed; cancel those with a failed
        parent (and theirs, level by level). One round trip per level, not per
        child. Returns the workflow steps it cancelled."""
        moved: list[Moved] = []
        todo = parents
        while todo:
            children = await conn.fetch(Q["blocked_children"], todo)
            todo = []
            if not children:
                break
            verdicts = {
                r["child_id"]: r
                for r in await conn.fetch(Q["parent_verdicts"], [c["id"] for c in children])
            }
            types, ids, datas = [], [], []
            cancel: list[str] = []
            unblock: list[str] = []
            for child in children:
                verdict = verdicts.get(child["id"])
                if verdict is None:
                    continue
                if verdict["any_failed"]:
                    cancel.append(child["id"])
                    types.append(EventType.JOB_CANCELLED.value)
                    datas.append(
                        row_event(child, "cancelled", child["attempt"], error=PARENT_FAILED_ERROR)
                    )
                    ids.append(child["id"])
                    todo.append(child["id"])
                    if child["workflow_id"] is not None:
                        moved.append(Moved(child["workflow_id"], child["step_name"], "cancelled"))
                elif verdict["all_completed"]:
                    unblock.append(child["id"])
                    types.append(EventType.JOB_STATUS_CHANGED.value)
                    datas.append(row_event(child, "pending", child["attempt"]))
                    ids.append(child["id"])
            if cancel:
                await conn.execute(Q["cancel_blocked"], PARENT_FAILED_ERROR, now, cancel)
            if types:  # the unblock, the level's events and the wake-up: one round trip
                await conn.execute(Q["unblock_with_events"], now, unblock, types, ids, _json(datas))
        return moved

    # -- workers ---------------------------------------------------------------------------------
    async def register_worker(self, worker: WorkerInfo, now: datetime) -> None:
        async with self._conn(tx=True) as conn:
            await conn.execute(
                Q["upsert_worker"],
                worker.id,
                worker.host,
                worker.pid,
                list(worker.queues),
                list(worker.job_types),
                worker.concurrency,
                now,
            )
            await conn.execute(
                FQ["set_capabilities"],
                worker.id,
                orjson.dumps(dict(sorted(worker.capabilities.items()))).decode(),
            )
            await conn.execute(
                Q["insert_events"],
                [EventType.WORKER_STATUS_CHANGED.value],
                [None],
                _json([{"worker_id": worker.id, "status": "running"}]),
                now,
            )

    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(Q["ids_with_prefix"], prefix, prefix_upper_bound(prefix), limit)
        return [r[0] for r in rows]

    async def record_job_types(self, types: Sequence[JobTypeInfo], now: datetime) -> None:
        async with self._conn() as conn:
            await conn.execute(
                Q["upsert_job_types"],
                [t.job_type for t in types],
                [t.queue for t in types],
                [t.priority for t in types],
                [t.max_retries for t in types],
                [t.timeout_ms for t in types],
                now,
            )

    async def list_job_types(self) -> list[JobTypeInfo]:
        async with self._conn() as conn:
            return [JobTypeInfo(*r) for r in await conn.fetch(Q["list_job_types"])]

    async def heartbeat(
        self, worker_id: str, jobs_running: int, now: datetime, stuck_jobs: int = 0
    ) -> set[str]:
        async with self._conn() as conn:
            return {
                r[0]
                for r in await conn.fetch(Q["heartbeat"], worker_id, now, jobs_running, stuck_jobs)
            }

    async def deregister_worker(self, worker_id: str, now: datetime) -> None:
        async with self._conn(tx=True) as conn:
            if await conn.fetchval(Q["deregister_worker"], worker_id, now) is not None:
                await conn.execute(
                    Q["insert_events"],
                    [EventType.WORKER_STATUS_CHANGED.value],
                    [None],
                    _json([{"worker_id": worker_id, "status": "stopped"}]),
                    now,
                )

    async def rescue(
        self, *, heartbeat_timeout: float, max_lost: int, now: datetime
    ) -> list[Rescued]:
        out: list[Rescued] = []
        async with self._conn(tx=True) as conn:
            dead = [
                r[0]
                for r in await conn.fetch(
                    Q["mark_stale_workers_dead"], now - timedelta(seconds=heartbeat_timeout)
                )
            ]
            types: list[str] = [EventType.WORKER_STATUS_CHANGED.value] * len(dead)
            ids: list[str | None] = [None] * len(dead)
            datas: list[dict[str, Any]] = [{"worker_id": w, "status": "dead"} for w in dead]
            finished: list[str] = []
            moved: list[Moved] = []
            for row in await conn.fetch(Q["orphaned_running"]):
                job = job_from_record(row)
                action = lost_action(job, max_lost)
                await conn.execute(Q[RESCUE_QUERY[action]], now, job.id, job.lease_token)
                state = next_state(JobState.RUNNING, action)
                status, event = state.value, EVENT_FOR_ACTION[action].value
                if state.is_terminal:
                    finished.append(job.id)
                    if job.workflow_id is not None:
                        moved.append(Moved(job.workflow_id, job.step_name or job.id, status))
                await conn.execute(
                    Q["end_execution"],
                    now,
                    "lost",
                    "worker_lost",
                    job.id,
                    job.attempt,
                    job.worker_id,
                    job.started_at,
                    job.payload_version,
                )
                types.append(event)
                ids.append(job.id)
                datas.append(
                    row_event(
                        row, status, job.attempt, error="worker_lost", worker_id=job.worker_id
                    )
                )
                out.append(Rescued(job.id, job.worker_id, action))
            if types:
                await conn.execute(Q["insert_events"], types, ids, _json(datas), now)
            if finished:
                moved += await self._settle_children(conn, finished, now)
            if moved:
                await self._settle_workflows(conn, moved, now)
            if any(r.action is Action.LOST for r in out):
                await conn.execute(Q["notify"], "")
        return out

    # -- operator actions ------------------------------------------------------------------------
    async def cancel(self, job_id: str, now: datetime, reason: str | None = None) -> Job:
        extra = {} if reason is None else {"reason": reason}
        async with self._conn(tx=True) as conn:
            row = await conn.fetchrow(Q["get_job_for_update"], job_id)
            if row is None:
                raise JobNotFound(job_id)
            state = row["state"]
            if state in ("completed", "failed", "cancelled"):
                raise JobNotCancellable(job_id, state)
            if state == "running":
                if await conn.execute(Q["request_cancel"], job_id, now, reason) != "UPDATE 0":
                    await conn.execute(
                        Q["insert_events"],
                        [EventType.JOB_STATUS_CHANGED.value],
                        [job_id],
                        _json([row_event(row, "cancelling", row["attempt"], **extra)]),
                        now,
                    )
            else:
                await conn.execute(Q["cancel_waiting"], job_id, now, reason)
                await conn.execute(
                    Q["insert_events"],
                    [EventType.JOB_CANCELLED.value],
                    [job_id],
                    _json([row_event(row, "cancelled", row["attempt"], **extra)]),
                    now,
                )
                moved: list[Moved] = []
                if row["workflow_id"] is not None:
                    moved.append(Moved(row["workflow_id"], row["step_name"], "cancelled"))
                if row["has_children"]:
                    moved += await self._settle_children(conn, [job_id], now)
                if moved:
                    await self._settle_workflows(conn, moved, now)
            return job_from_record(await conn.fetchrow(Q["get_job"], job_id))

    async def retry_failed(self, job_ids: Sequence[str], now: datetime) -> list[Job]:
        async with self._conn(tx=True) as conn:
            rows = []
            # No idempotency key check: a failed job still holds its own key (no other
            # job can have it), so it keeps it when it runs again.
            for job_id in dict.fromkeys(job_ids):
                row = await conn.fetchrow(Q["get_job_for_update"], job_id)
                if row is None:
                    raise JobNotFound(job_id)
                require_failed(job_id, row["state"], "retry")
                rows.append(row)
            out = [
                job_from_record(await conn.fetchrow(Q["retry_failed"], r["id"], now)) for r in rows
            ]
            if rows:
                await conn.execute(
                    Q["insert_events"],
                    [EventType.JOB_STATUS_CHANGED.value] * len(rows),
                    [r["id"] for r in rows],
                    _json([row_event(r, "pending", 0, reason="dlq_retry") for r in rows]),
                    now,
                )
                steps: dict[str, list[str]] = {}
                for r in rows:
                    if r["workflow_id"] is not None:
                        steps.setdefault(r["workflow_id"], []).append(r["step_name"])
                if steps:  # their workflows run again
                    await conn.execute(W["reopen_finished_workflows"], sorted(steps), now)
                    for wf_id, names in steps.items():
                        await self._unblock_descendants(conn, wf_id, names, now)
                await conn.execute(Q["notify"], "")
            return out

    async def purge_failed(self, job_ids: Sequence[str] | None, now: datetime) -> int:
        async with self._conn(tx=True) as conn:
            if job_ids is None:
                ids = [r[0] for r in await conn.fetch(Q["failed_ids"])]
            else:
                ids = list(dict.fromkeys(job_ids))
                for job_id in ids:
                    row = await conn.fetchrow(Q["get_job_for_update"], job_id)
                    if row is None:
                        raise JobNotFound(job_id)
                    require_failed(job_id, row["state"], "purge")
            if ids:
                await conn.execute(Q["delete_jobs"], ids)
            return len(ids)

    async def prune(self, older_than: datetime) -> int:
        total = 0
        while True:  # small transactions: a big prune never holds locks for long
            async with self._conn(tx=True) as conn:
                ids = [r[0] for r in await conn.fetch(Q["prunable"], older_than)]
                if ids:
                    await conn.execute(Q["delete_jobs"], ids)
                else:
                    await conn.execute(Q["prune_events"], older_than)
                    await conn.execute(W["prune_workflows"], older_than)
            total += len(ids)
            if not ids:
                return total

    # -- reads -------------------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        async with self._conn() as conn:
            row = await conn.fetchrow(Q["get_job"], job_id)
            if row is None:
                raise JobNotFound(job_id)
            job = job_from_record(row)
            job.depends_on = [r[0] for r in await conn.fetch(Q["job_parents"], job_id)]
            return job

    async def executions(self, job_id: str) -> list[Execution]:
        async with self._conn() as conn:
            if await conn.fetchval(Q["job_exists"], job_id) is None:
                raise JobNotFound(job_id)
            return [
                Execution(
                    r["job_id"],
                    r["attempt"],
                    r["worker_id"],
                    r["started_at"],
                    r["finished_at"],
                    r["outcome"],
                    r["error"],
                    r["payload_version"],
                    r["traceback"],
                )
                for r in await conn.fetch(Q["executions"], job_id)
            ]

    async def list_jobs(self, query: JobQuery) -> Page:
        query.validate()
        sql = list_sql(query)
        states = [s.value for s in query.states] if query.states else None
        args = (states, query.job_type, query.queue, query.created_by)
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *args, query.limit, query.offset, query.include_internal)
            total = await conn.fetchval(Q["count_jobs"], *args, query.include_internal)
        return Page([job_from_record(r) for r in rows], total, query.limit, query.offset)

    async def count_by_state(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        async with self._conn() as conn:
            for state, n in await conn.fetch(Q["count_by_state"]):
                counts[JobState(state)] = n
        return counts

    async def pending_by_type(self) -> dict[tuple[str, str], int]:
        async with self._conn() as conn:
            return {(q, t): n for q, t, n in await conn.fetch(Q["pending_by_type"])}

    async def list_workers(self) -> list[WorkerInfo]:
        async with self._conn() as conn:
            return [
                WorkerInfo(
                    id=r["id"],
                    host=r["host"],
                    pid=r["pid"],
                    queues=tuple(r["queues"]),
                    job_types=tuple(r["job_types"]),
                    concurrency=r["concurrency"],
                    started_at=r["started_at"],
                    heartbeat_at=r["heartbeat_at"],
                    state=r["state"],
                    jobs_running=r["jobs_running"],
                    capabilities=r["capabilities"],
                    stuck_jobs=r["stuck_jobs"],
                )
                for r in await conn.fetch(Q["list_workers"])
            ]

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        async with self._conn() as conn:
            # Readers poll from the last event they got: its txid is usually remembered.
            anchor = self._anchors.get(after_id)
            if anchor is None and after_id > 0:
                anchor = await conn.fetchval(Q["event_anchor"], after_id)
            if anchor is None:  # the start, or the anchor was pruned: by id
                rows = await conn.fetch(Q["events_after"], after_id, limit)
            else:
                rows = await conn.fetch(Q["events_after_anchor"], anchor, after_id, limit)
        if rows:
            if len(self._anchors) >= 256:
                self._anchors.clear()
            self._anchors[rows[-1]["id"]] = rows[-1]["anchor"]
        return [_event(r) for r in rows]

    async def activity(self, since: datetime) -> Activity:
        async with self._conn() as conn:
            submitted = await conn.fetchval(Q["submitted_since"], since)
            finished = {
                (t, JobState(s)): n for t, s, n in await conn.fetch(Q["finished_since"], since)
            }
        return Activity(since, submitted, finished)

    # -- API keys ----------------------------------------------------------------------------------
    async def create_api_key(self, key: ApiKey) -> None:
        try:
            async with self._conn() as conn:
                await conn.execute(
                    Q["insert_api_key"],
                    key.id,
                    key.name,
                    key.scope.value,
                    key.key_hash,
                    key.prefix,
                    key.created_at,
                    key.expires_at,
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ValidationError("An API key with this id or hash already exists") from exc
            raise

    async def list_api_keys(self) -> list[ApiKey]:
        async with self._conn() as conn:
            return [_key(r) for r in await conn.fetch(Q["list_api_keys"])]

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(Q["find_api_key"], key_hash)
        return None if row is None else _key(row)

    async def revoke_api_key(self, key_id: str, now: datetime) -> ApiKey:
        async with self._conn() as conn:
            row = await conn.fetchrow(Q["revoke_api_key"], key_id, now)
        if row is None:
            raise ApiKeyNotFound(key_id)
        return _key(row)

    async def count_api_keys(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(Q["count_active_api_keys"]))

    # -- outbox ordering ------------------------------------------------------------
    async def latest_event_id(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(Q["latest_event_id"]))

    # -- outbox consumers -------------------------------------------------------------
    async def claim_consumer(self, name: str, owner: str, ttl: float, now: datetime) -> int | None:
        async with self._conn() as conn:
            position = await conn.fetchval(
                Q["claim_consumer"], name, owner, now + timedelta(seconds=ttl), now
            )
        return None if position is None else int(position)

    async def advance_consumer(self, name: str, owner: str, position: int, now: datetime) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(Q["advance_consumer"], name, owner, position, now)
        return bool(status == "UPDATE 1")

    async def consumer_positions(self) -> dict[str, int]:
        async with self._conn() as conn:
            return {r[0]: int(r[1]) for r in await conn.fetch(Q["consumer_positions"])}

    async def release_consumer(self, name: str, owner: str, now: datetime) -> None:
        async with self._conn() as conn:
            await conn.execute(Q["release_consumer"], name, owner, now)

    # -- webhooks ---------------------------------------------------------------------
    async def create_webhook(self, webhook: Webhook) -> None:
        w = webhook
        try:
            async with self._conn() as conn:
                await conn.execute(
                    Q["insert_webhook"],
                    w.id,
                    w.url,
                    list(w.event_types),
                    w.secret,
                    w.state.value,
                    w.created_at,
                    w.secret_ref,
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ValidationError(f"A webhook with id {w.id!r} already exists") from exc
            raise

    async def list_webhooks(self) -> list[Webhook]:
        async with self._conn() as conn:
            return [webhook_from_row(r, _same) for r in await conn.fetch(Q["list_webhooks"])]

    async def get_webhook(self, webhook_id: str) -> Webhook:
        async with self._conn() as conn:
            row = await conn.fetchrow(Q["get_webhook"], webhook_id)
        if row is None:
            raise WebhookNotFound(webhook_id)
        return webhook_from_row(row, _same)

    async def delete_webhook(self, webhook_id: str) -> None:
        async with self._conn() as conn:
            status = await conn.execute(Q["delete_webhook"], webhook_id)
        if status != "DELETE 1":
            raise WebhookNotFound(webhook_id)

    async def record_delivery(self, attempt: DeliveryAttempt, policy: DisablePolicy) -> Webhook:
        at = attempt.created_at
        async with self._conn(tx=True) as conn:
            if await conn.fetchrow(Q["get_webhook"], attempt.webhook_id) is None:
                raise WebhookNotFound(attempt.webhook_id)
            await conn.execute(Q["insert_delivery"], *delivery_params(attempt, at))
            ok = attempt.outcome is DeliveryOutcome.DELIVERED
            query = Q["webhook_succeeded"] if ok else Q["webhook_failed"]
            hook = webhook_from_row(await conn.fetchrow(query, attempt.webhook_id, at), _same)
            if ok or hook.state is not WebhookState.ACTIVE:
                return hook
            if not policy.should_disable(hook, at):
                return hook
            reason = policy.reason(hook, at)
            event_id = await conn.fetchval(
                Q["insert_event_returning"],
                WEBHOOK_DISABLED,
                None,
                disabled_event(hook, reason),
                at,
            )
            row = await conn.fetchrow(Q["disable_webhook"], hook.id, at, reason, event_id)
            return webhook_from_row(row, _same)

    async def enable_webhook(self, webhook_id: str) -> tuple[Webhook, int | None]:
        async with self._conn(tx=True) as conn:
            row = await conn.fetchrow(Q["lock_webhook"], webhook_id)
            if row is None:
                raise WebhookNotFound(webhook_id)
            hook = webhook_from_row(row, _same)
            if hook.state is not WebhookState.DISABLED:
                return hook, None
            enabled = await conn.fetchrow(Q["enable_webhook"], webhook_id)
        return webhook_from_row(enabled, _same), hook.replay_after

    async def list_deliveries(self, webhook_id: str, limit: int) -> list[DeliveryAttempt]:
        async with self._conn() as conn:
            if await conn.fetchrow(Q["get_webhook"], webhook_id) is None:
                raise WebhookNotFound(webhook_id)
            rows = await conn.fetch(Q["list_deliveries"], webhook_id, limit)
        return [delivery_from_row(r, _same) for r in rows]

    # -- workflows --------------------------------------------------------------------------------
    async def _settle_workflows(
        self, conn: asyncpg.Connection, moved: list[Moved], now: datetime
    ) -> None:
        """Apply ``fail_fast``, write ``workflow_updated`` and, once no step can run,
        the status and terminal event, for the workflows whose steps ``moved``.
        The workflow row is locked first, so the last two steps finishing at once
        in two transactions end the workflow exactly once (the second counts
        after the first committed)."""
        groups = group_moved(moved)
        types: list[str] = []
        datas: list[dict[str, Any]] = []
        locked = await conn.fetch(W["lock_workflows"], sorted(groups))
        all_counts: dict[str, dict[str, int]] = {}
        # After the lock: this statement sees steps other transactions finished.
        for r in await conn.fetch(W["step_counts_many"], [r["id"] for r in locked]):
            all_counts.setdefault(r[0], {})[r[1]] = r[2]
        for row in locked:
            if row["status"] != "running":
                continue
            wf_id = row["id"]
            steps = groups[wf_id]
            counts = all_counts.get(wf_id, {})
            failed = wants_fail_fast(row["on_failure"], steps)
            reason = None if failed is None else fail_fast_reason(failed)
            if reason is None and row["on_failure"] == "fail_fast" and counts.get("failed"):
                # A step failed in an earlier transaction, and a step that was locked
                # by another transaction then (SKIP LOCKED) slipped past its cancel.
                reason = fail_fast_reason(None)
            if reason is not None and (
                counts.get("pending") or counts.get("blocked") or counts.get("running")
            ):
                steps = steps + await self._cancel_steps(conn, wf_id, reason, now)
                counts = await self._step_counts(conn, wf_id)
            types.append(WORKFLOW_UPDATED)
            datas.append(updated_event(wf_id, row["name"], counts, steps))
            status = settled_status(counts)
            if status is not None:
                await conn.execute(W["set_workflow_status"], wf_id, status.value, now)
                details = event_steps(await self._step_details(conn, wf_id, results=False))
                type_, data = terminal_event(wf_id, row["name"], status, counts, details)
                types.append(type_)
                datas.append(data)
        if types:
            await conn.execute(Q["insert_events"], types, [None] * len(types), _json(datas), now)

    async def _cancel_steps(
        self, conn: asyncpg.Connection, wf_id: str, reason: str, now: datetime
    ) -> list[Moved]:
        """Cancel the workflow's waiting steps and ask its running ones to stop."""
        cancelled = await conn.fetch(W["cancel_waiting_steps"], wf_id, reason, now)
        running = await conn.fetch(W["cancel_running_steps"], wf_id, reason, now)
        types = [EventType.JOB_CANCELLED.value] * len(cancelled) + [
            EventType.JOB_STATUS_CHANGED.value
        ] * len(running)
        datas = [
            row_event(r, "cancelled", r["attempt"], error=f"cancelled: {reason}", reason=reason)
            for r in cancelled
        ] + [row_event(r, "cancelling", r["attempt"], reason=reason) for r in running]
        if types:
            await conn.execute(
                Q["insert_events"],
                types,
                [r["id"] for r in cancelled] + [r["id"] for r in running],
                _json(datas),
                now,
            )
        moved = [Moved(wf_id, r["step_name"], "cancelled") for r in cancelled]
        parents = [r["id"] for r in cancelled if r["has_children"]]
        if parents:  # a plain job may depend on a step
            moved += [
                m for m in await self._settle_children(conn, parents, now) if m.workflow_id != wf_id
            ]
        return moved

    async def _unblock_descendants(
        self, conn: asyncpg.Connection, wf_id: str, names: list[str], now: datetime
    ) -> None:
        """Steps retried from the dead-letter queue: the steps below them that were
        cancelled because of them wait for them again (``blocked``)."""
        edges = [(r[0], r[1]) for r in await conn.fetch(W["step_edges"], wf_id)]
        below = descendants(names, edges)
        again = [
            r for r in await conn.fetch(W["retryable_steps"], wf_id) if r["step_name"] in below
        ]
        if not again:
            return
        await conn.execute(
            W["reset_steps"], [r["id"] for r in again], ["blocked"] * len(again), now
        )
        await conn.execute(
            Q["insert_events"],
            [EventType.JOB_STATUS_CHANGED.value] * len(again),
            [r["id"] for r in again],
            _json([row_event(r, "blocked", 0, reason="dlq_retry_of_parent") for r in again]),
            now,
        )

    @staticmethod
    async def _step_counts(conn: asyncpg.Connection, wf_id: str) -> dict[str, int]:
        return {r[0]: r[1] for r in await conn.fetch(W["step_counts"], wf_id)}

    @staticmethod
    async def _step_details(
        conn: asyncpg.Connection, wf_id: str, *, results: bool
    ) -> list[StepDetail]:
        rows = await conn.fetch(W["step_rows" if results else "step_rows_light"], wf_id)
        edges = [(r[0], r[1]) for r in await conn.fetch(W["step_edges"], wf_id)]
        return step_details(rows, edges, lambda v: v, results=results)

    async def _workflow(
        self, conn: asyncpg.Connection, wf_id: str, *, steps: bool, results: bool = True
    ) -> Workflow:
        row = await conn.fetchrow(W["get_workflow"], wf_id)
        if row is None:
            raise WorkflowNotFound(wf_id)
        details = await self._step_details(conn, wf_id, results=results) if steps else None
        return workflow_from_row(row, await self._step_counts(conn, wf_id), lambda v: v, details)

    async def _insert_steps(
        self,
        conn: asyncpg.Connection,
        wf_id: str,
        steps: Sequence[tuple[str, NewJob]],
        encoded: list[tuple[str, str]],
        known: dict[str, tuple[str, str]],
        now: datetime,
    ) -> list[Job]:
        """Insert steps (parents first); ``known``: step name -> (job id, state) of the
        steps already there, extended with the new ones."""
        ids = new_job_ids(len(steps))
        states: list[str] = []
        children: list[str] = []
        parents: list[str] = []
        jobs = []
        for (name, new), job_id, (payload, meta) in zip(steps, ids, encoded, strict=True):
            state = step_state(JobState(known[d][1]) for d in new.depends_on)
            states.append(state.value)
            known[name] = (job_id, state.value)
            for d in dict.fromkeys(new.depends_on):
                children.append(job_id)
                parents.append(known[d][0])
            error = PARENT_FAILED_ERROR if state is JobState.CANCELLED else None
            job = _new_job(new, job_id, state.value, error, new.run_at or now, payload, meta, now)
            job.workflow_id, job.step_name = wf_id, name
            job.depends_on = [known[d][0] for d in dict.fromkeys(new.depends_on)]
            jobs.append(job)
        news = [new for _, new in steps]
        await conn.execute(
            W["insert_steps"],
            ids,
            [n.queue for n in news],
            [n.job_type for n in news],
            states,
            [n.priority for n in news],
            [p for p, _ in encoded],
            [j.error for j in jobs],
            [n.max_retries for n in news],
            [n.timeout_ms for n in news],
            [n.run_at or now for n in news],
            [name for name, _ in steps],
            [n.created_by for n in news],
            [m for _, m in encoded],
            wf_id,
            now,
        )
        if children:
            await conn.execute(Q["insert_dependencies"], children, parents)
        return jobs

    async def create_workflow(
        self, workflow: NewWorkflow, steps: Sequence[tuple[str, NewJob]], now: datetime
    ) -> tuple[Workflow, bool]:
        validate_steps(steps)
        encoded = [
            (dumps_object(new.payload), dumps_object(new.metadata, "metadata")) for _, new in steps
        ]
        metadata = dumps_object(workflow.metadata, "metadata")
        wf_id = new_job_id()
        async with self._conn(tx=True) as conn:
            inserted = await conn.fetchval(
                W["insert_workflow"],
                wf_id,
                workflow.name,
                workflow.on_failure.value,
                len(steps),
                workflow.idempotency_key,
                metadata,
                workflow.created_by,
                now,
            )
            if inserted is None:  # a kept workflow holds the key
                held = await conn.fetchrow(W["workflow_by_key"], workflow.idempotency_key)
                return await self._workflow(conn, held["id"], steps=False), True
            await self._insert_steps(conn, wf_id, steps, encoded, {}, now)
            wf = await self._workflow(conn, wf_id, steps=False)
            data = workflow_event(
                wf_id,
                wf.name,
                "running",
                await self._step_counts(conn, wf_id),
                on_failure=wf.on_failure.value,
            )
            await conn.execute(Q["insert_events"], [WORKFLOW_SUBMITTED], [None], _json([data]), now)
            return wf, False

    async def get_workflow(self, workflow_id: str, *, results: bool = True) -> Workflow:
        async with self._conn() as conn:
            return await self._workflow(conn, workflow_id, steps=True, results=results)

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[Workflow], int]:
        status = None if query.status is None else query.status.value
        async with self._conn() as conn:
            rows = await conn.fetch(
                W["list_workflows"], status, query.name, query.limit, query.offset
            )
            counts: dict[str, dict[str, int]] = {}
            for r in await conn.fetch(W["step_counts_many"], [r["id"] for r in rows]):
                counts.setdefault(r[0], {})[r[1]] = r[2]
            total = await conn.fetchval(W["count_workflows"], status, query.name)
        return [workflow_from_row(r, counts.get(r["id"], {}), lambda v: v) for r in rows], total

    async def cancel_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        for attempt in range(3):
            try:
                async with self._conn(tx=True) as conn:
                    rows = await conn.fetch(W["lock_workflows"], [workflow_id])
                    if not rows:
                        raise WorkflowNotFound(workflow_id)
                    if rows[0]["status"] == "running":
                        await conn.execute(W["request_workflow_cancel"], workflow_id, now)
                        moved = await self._cancel_steps(
                            conn, workflow_id, WORKFLOW_CANCEL_REASON, now
                        )
                        await self._settle_workflows(
                            conn, moved or [Moved(workflow_id, "", "cancelled")], now
                        )
                    return await self._workflow(conn, workflow_id, steps=True)
            except asyncpg.DeadlockDetectedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def retry_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        async with self._conn(tx=True) as conn:
            rows = await conn.fetch(W["lock_workflows"], [workflow_id])
            check_retryable(workflow_id, rows[0] if rows else None)
            again = await conn.fetch(W["retryable_steps"], workflow_id)
            if not again:  # nothing would run: reopening would leave it running for ever
                return await self._workflow(conn, workflow_id, steps=True)
            edges = [(r[0], r[1]) for r in await conn.fetch(W["step_edges"], workflow_id)]
            states = retry_states((r["step_name"] for r in again), edges)
            await conn.execute(W["reopen_workflow"], workflow_id, now)
            await conn.execute(
                W["reset_steps"],
                [r["id"] for r in again],
                [states[r["step_name"]] for r in again],
                now,
            )
            counts = await self._step_counts(conn, workflow_id)
            types = [EventType.JOB_STATUS_CHANGED.value] * len(again) + [WORKFLOW_UPDATED]
            datas = [
                row_event(r, states[r["step_name"]], 0, reason="workflow_retry") for r in again
            ] + [
                workflow_event(
                    workflow_id,
                    rows[0]["name"],
                    "running",
                    counts,
                    retried_steps=[r["step_name"] for r in again][:MAX_MOVED_LISTED],
                )
            ]
            await conn.execute(
                Q["insert_events"], types, [r["id"] for r in again] + [None], _json(datas), now
            )
            if any(s == "pending" for s in states.values()):
                await conn.execute(Q["notify"], "")
            return await self._workflow(conn, workflow_id, steps=True)

    async def add_steps(
        self,
        workflow_id: str,
        job_id: str,
        lease_token: str,
        steps: Sequence[tuple[str, NewJob]],
        now: datetime,
    ) -> list[Job]:
        validate_steps(steps)
        encoded = [
            (dumps_object(new.payload), dumps_object(new.metadata, "metadata")) for _, new in steps
        ]
        async with self._conn(tx=True) as conn:
            rows = await conn.fetch(W["lock_workflows"], [workflow_id])
            caller = await conn.fetchrow(Q["get_job"], job_id)
            check_can_add(
                workflow_id,
                job_id,
                lease_token,
                None
                if caller is None
                else (caller["state"], caller["lease_token"], caller["workflow_id"]),
                rows[0] if rows else None,
            )
            existing = await self._step_details(conn, workflow_id, results=False)
            fresh, already = split_added(steps, existing)
            check_dag(
                [StepSpec(n, new.job_type, depends_on=tuple(new.depends_on)) for n, new in fresh],
                existing={d.name: d.depends_on for d in existing},
                allow_empty=True,
            )
            known = {
                d.name: (d.job_id, "running" if d.status == "cancelling" else d.status)
                for d in existing
            }
            fresh_encoded = [
                e for (n, _), e in zip(steps, encoded, strict=True) if n not in already
            ]
            jobs: dict[str | None, Job] = {}
            if fresh:
                for j in await self._insert_steps(
                    conn, workflow_id, fresh, fresh_encoded, known, now
                ):
                    jobs[j.step_name] = j
                await conn.execute(W["add_total_steps"], workflow_id, len(fresh), now)
            for name, held in already.items():
                jobs[name] = job_from_record(await conn.fetchrow(Q["get_job"], held))
            return [jobs[n] for n, _ in steps]

    async def parent_results(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with self._conn() as conn:
            for r in await conn.fetch(W["parent_results"], list(job_ids)):
                out.setdefault(r["child_id"], {})[r["step_name"] or r["parent_id"]] = r["result"]
        return out

    # -- distributed locks -------------------------------------------------------------
    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None:
        async with self._conn() as conn:
            token = await conn.fetchval(
                LQ["acquire_lock"], key, owner, now, now + timedelta(seconds=ttl)
            )
        return None if token is None else int(token)

    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool:
        async with self._conn() as conn:
            status = await conn.execute(
                LQ["extend_lock"], key, owner, token, now, now + timedelta(seconds=ttl)
            )
        return bool(status == "UPDATE 1")

    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool:
        async with self._conn() as conn:
            held = await conn.fetchval(LQ["release_lock"], key, owner, token, now)
        return bool(held)

    async def check_lock(self, key: str, token: int, now: datetime) -> bool:
        async with self._conn() as conn:
            return await conn.fetchval(LQ["check_lock"], key, token, now) is not None

    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]:
        check_limit(limit)
        async with self._conn() as conn:
            rows = await conn.fetch(LQ["list_locks"], include_free, now, limit)
        return [lock_from_row(r, _same, now) for r in rows]

    # -- durable steps and checkpoints -----------------------------------------------------
    async def save_step(
        self, job_id: str, lease_token: str, name: str, result: Any, now: datetime
    ) -> bool:
        data = dumps(result, "result")
        async with self._conn(tx=True) as conn:
            held = await conn.fetchval(Q["save_step"], job_id, lease_token, name, data, now)
        return held is not None

    async def job_steps(self, job_id: str) -> dict[str, Any]:
        async with self._conn() as conn:
            return {r[0]: r[1] for r in await conn.fetch(Q["job_steps"], job_id)}

    async def save_checkpoint(
        self, job_id: str, lease_token: str, state: Any, now: datetime
    ) -> bool:
        data = dumps(state, "checkpoint")
        async with self._conn() as conn:
            status = await conn.execute(Q["save_checkpoint"], job_id, lease_token, data)
        return bool(status != "UPDATE 0")

    # -- metrics ----------------------------------------------------------------------
    async def queue_stats(self, now: datetime) -> list[QueueStat]:
        async with self._conn() as conn:
            rows = await conn.fetch(MQ["queue_stats"], now)
        return [QueueStat(q, JobState(s), n, oldest) for q, s, n, oldest in rows]

    def pool_stats(self) -> tuple[int, int] | None:
        pool = self._pool
        if pool is None:
            return None
        return pool.get_size() - pool.get_idle_size(), pool.get_max_size()

    # -- dashboard reads (storage/sql/postgres/dashboard.sql) ------------------------------
    async def state_counts(self, cap: int) -> dict[JobState, Count]:
        async with self._conn() as conn:
            rows = await conn.fetch(DQ["state_counts_capped"], [s.value for s in JobState], cap)
            counts = {JobState(state): int(n) for state, n in rows}
            estimates: dict[str, int] = {}
            if any(n >= cap for n in counts.values()):
                row = await conn.fetchrow(DQ["state_estimates"])
                if row is not None and row["vals"] and row["freqs"]:
                    vals = row["vals"].strip("{}").split(",")
                    total = max(int(row["total"]), 0)
                    estimates = {
                        v.strip('"'): round(total * f)
                        for v, f in zip(vals, row["freqs"], strict=False)
                    }
        return {
            s: Count(n) if n < cap else Count(max(n, estimates.get(s.value, 0)), exact=False)
            for s, n in counts.items()
        }

    async def queue_depths(
        self, states: Sequence[JobState], cap: int
    ) -> tuple[dict[tuple[str, JobState], int], bool]:
        out: dict[tuple[str, JobState], int] = {}
        complete = True
        async with self._conn() as conn:
            for state in states:
                if state is JobState.PENDING:
                    rows = await conn.fetch(DQ["queue_depths_pending"], cap)
                else:
                    rows = await conn.fetch(DQ["queue_depths_state"], state.value, cap)
                seen = 0
                for queue, n in rows:
                    out[(queue, state)] = int(n)
                    seen += int(n)
                complete = complete and seen < cap
        return out, complete

    async def browse_jobs(
        self, query: JobQuery, before: Cursor | None, id_prefix: str | None = None
    ) -> list[Job]:
        query.validate()
        key = None if before is None else (before.created_at, before.job_id)
        sql, args = browse_sql("conveyor.jobs", query, key, numbered=True, id_prefix=id_prefix)
        async with self._conn() as conn:
            rows = await conn.fetch(sql, *args)
        return [job_from_record(r) for r in rows]

    async def job_events(
        self, job_id: str, since: datetime, until: datetime, limit: int
    ) -> list[Event]:
        check_limit(limit)
        async with self._conn() as conn:
            rows = await conn.fetch(DQ["job_events"], job_id, since, until, limit)
        return [_event(r) for r in rows]

    async def job_children(self, job_id: str, limit: int) -> list[str]:
        check_limit(limit)
        async with self._conn() as conn:
            return [r[0] for r in await conn.fetch(DQ["job_children"], job_id, limit)]

    async def recent_stats(
        self, since: datetime, sample: int, *, buckets_since: datetime | None = None
    ) -> RecentStats:
        edge = since if buckets_since is None else max(since, buckets_since)

        async def fetch(name: str, *args: Any) -> list[asyncpg.Record]:
            async with self._conn() as conn:
                return list(await conn.fetch(DQ[name], *args))

        # Four independent reads, side by side on pooled connections.
        finished, submitted, waits, oldest_rows = await asyncio.gather(
            fetch("finished_per_minute", edge),
            fetch("submitted_per_minute", edge),
            fetch("wait_p95", since, sample),
            fetch("oldest_pending"),
        )
        buckets: dict[datetime, MinuteBucket] = {}
        for minute, state, n in finished:
            b = buckets.setdefault(minute, MinuteBucket(minute))
            if state == "completed":
                b.completed += n
            elif state == "failed":
                b.failed += n
        for minute, n in submitted:
            buckets.setdefault(minute, MinuteBucket(minute)).submitted += n
        p95 = waits[0][0] if waits else None
        oldest = oldest_rows[0][0] if oldest_rows else None
        return RecentStats(
            sorted(buckets.values(), key=lambda b: b.minute),
            None if p95 is None else float(p95),
            oldest,
        )

    # -- flow control ---------------------------------------------------------------
    def _flow_limited(self, queues: Sequence[str], job_types: Sequence[str]) -> bool:
        """Whether a limit applies to a fetch of these queues and types (cached)."""
        if time.monotonic() - self._flow_config_at > FLOW_CONFIG_TTL:
            return True  # unknown: the limited fetch is right either way, then reads it
        types, capped = self._flow_config
        if not types and not capped:
            return False
        if "" in capped:  # a job with requirements exists: capabilities filter every fetch
            return True
        return bool(
            (not job_types and types)
            or types.intersection(job_types)
            or (not queues and capped)
            or capped.intersection(queues)
        )

    async def _read_flow_config(self) -> None:
        async with self._conn() as conn:
            rows = await conn.fetch(FQ["flow_config"])
        # Queues with a limit or paused; "" stands for "a job has requirements".
        self._flow_config = (
            frozenset(r[1] for r in rows if r[0] == "type"),
            frozenset(r[1] for r in rows if r[0] == "queue")
            | frozenset("" for r in rows if r[0] == "flag"),
        )
        self._flow_config_at = time.monotonic()

    async def _fetch_limited(
        self,
        worker_id: str,
        queues: Sequence[str],
        job_types: Sequence[str],
        limit: int,
        now: datetime,
        caps: dict[str, str],
    ) -> list[Job]:
        if time.monotonic() - self._flow_config_at > FLOW_CONFIG_TTL:
            await self._read_flow_config()
            if not self._flow_limited(queues, job_types):
                return await self.fetch(
                    worker_id,
                    queues=queues,
                    job_types=job_types,
                    limit=limit,
                    now=now,
                    capabilities=caps,
                )
        async with self._conn() as conn:
            rows = await conn.fetch(
                FQ["fetch_limited"],
                now,
                not queues,
                list(queues),
                not job_types,
                list(job_types),
                orjson.dumps(caps).decode(),
                limit,
                new_token(),
                worker_id,
            )
        return [job_from_record(r) for r in rows]

    async def record_flow_limits(self, limits: Sequence[FlowLimits], now: datetime) -> None:
        keep = [lim for lim in limits if not lim.empty]
        drop = [lim.job_type for lim in limits if lim.empty]
        async with self._conn(tx=True) as conn:
            if keep:
                await conn.execute(
                    FQ["upsert_flow_limits"],
                    [lim.job_type for lim in keep],
                    [lim.concurrency_key.text if lim.concurrency_key else None for lim in keep],
                    [lim.concurrency_limit for lim in keep],
                    [lim.rate_limit.limit if lim.rate_limit else None for lim in keep],
                    [lim.rate_limit.window if lim.rate_limit else None for lim in keep],
                    [_requires_json(lim.requires) for lim in keep],
                    [now] * len(keep),
                )
            if drop:
                await conn.execute(FQ["delete_flow_limits"], drop)
        self._flow_config_at = -1e9  # this process sees its own change at once

    async def list_flow_limits(self) -> list[FlowLimits]:
        async with self._conn() as conn:
            rows = await conn.fetch(FQ["list_flow_limits"])
        return [limits_from_row(r, _same) for r in rows]

    async def set_queue(
        self,
        queue: str,
        now: datetime,
        *,
        paused: bool | None = None,
        concurrency_limit: int | None = KEEP_LIMIT,
    ) -> QueueInfo:
        check_queue_change(queue, paused, concurrency_limit)
        async with self._conn() as conn:
            await conn.execute(FQ["set_queue"], queue, paused, concurrency_limit, now)
        self._flow_config_at = -1e9
        return next(q for q in await self.list_queues() if q.name == queue)

    async def list_queues(self) -> list[QueueInfo]:
        async with self._conn() as conn:
            settings = {
                r["queue"]: QueueInfo(
                    r["queue"], r["paused"], r["concurrency_limit"], updated_at=r["updated_at"]
                )
                for r in await conn.fetch(FQ["list_queue_settings"])
            }
            counts: dict[str, dict[str, int]] = {}
            for r in await conn.fetch(FQ["queue_counts"]):
                counts.setdefault(r[0], {})[r[1]] = r[2]
        return [
            replace(
                settings.get(name, QueueInfo(name)),
                pending=counts.get(name, {}).get("pending", 0),
                running=counts.get(name, {}).get("running", 0),
            )
            for name in sorted(set(settings) | set(counts))
        ]

    async def prune_flow_windows(self, now: datetime) -> int:
        async with self._conn() as conn:
            status = await conn.execute(
                FQ["prune_flow_windows"], now.timestamp(), float(MAX_RATE_WINDOW_SECONDS)
            )
        return int(status.split()[-1])

    async def queue_settings(self) -> list[QueueInfo]:
        async with self._conn() as conn:
            return [
                QueueInfo(
                    r["queue"], r["paused"], r["concurrency_limit"], updated_at=r["updated_at"]
                )
                for r in await conn.fetch(FQ["list_queue_settings"])
            ]

    async def flow_stats(self, now: datetime) -> FlowStats:
        async with self._conn() as conn:
            rows = {
                FlowRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5]): r[6]
                for r in await conn.fetch(FQ["flow_rows"], now)
            }
            windows = {(r[0], r[1]): (r[2], r[3]) for r in await conn.fetch(FQ["flow_windows"])}
        return flow_stats(
            rows,
            await self.list_flow_limits(),
            await self.list_queues(),
            windows,
            now.timestamp(),
        )

    async def workflow_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                W["workflow_ids_with_prefix"], prefix, prefix_upper_bound(prefix), limit
            )
        return [r[0] for r in rows]


_STATES = {s.value: s for s in JobState}


def _same(value: Any) -> Any:
    return value


def _jsonb(value: Any) -> str:
    return orjson.dumps(value).decode()


def _json(values: list[dict[str, Any]]) -> list[str]:
    return [_jsonb(v) for v in values]


def _key(r: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=r["id"],
        name=r["name"],
        scope=Scope(r["scope"]),
        key_hash=r["key_hash"],
        prefix=r["prefix"],
        created_at=r["created_at"],
        revoked_at=r["revoked_at"],
        expires_at=r["expires_at"],
        last_used_at=r["last_used_at"],
    )


def _with_result(f: Finish) -> Finish:
    return replace(f, result=roundtrip(f.result, "result"))


def _safe(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return redact_url(dsn)


def _requires_json(requires: Mapping[str, str] | None) -> str | None:
    return orjson.dumps(dict(sorted(requires.items()))).decode() if requires else None
