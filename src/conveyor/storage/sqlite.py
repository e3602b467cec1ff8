"""SQLite Store: the embedded default.

One connection, owned by one thread, does every read and write: SQLite has a
single writer anyway, and a single thread keeps the connection's prepared
statements warm. WAL mode lets other processes read while we write;
``synchronous=FULL`` makes each commit durable before ``enqueue`` returns
(promise 1). Every write transaction is ``BEGIN IMMEDIATE`` so two processes
never deadlock upgrading a read lock; ``busy_timeout`` makes them queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from conveyor.domain.auth import ApiKey, Scope
from conveyor.domain.dashboard import Count, Cursor, MinuteBucket, RecentStats, percentile
from conveyor.domain.errors import (
    ApiKeyNotFound,
    ConfigurationError,
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
from conveyor.domain.flow import (
    MAX_RATE_WINDOW_SECONDS,
    FlowLimits,
    FlowStats,
    QueueInfo,
)
from conveyor.domain.ids import new_job_id, new_token
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
from conveyor.storage.audit import bind as audit_bind
from conveyor.storage.audit_sqlite import SQLiteAudit
from conveyor.storage.base import (
    QueueStat,
    Store,
    check_limit,
    delivery_from_row,
    delivery_params,
    disabled_event,
    no_external_connection,
    prefix_upper_bound,
    row_event,
    webhook_from_row,
)
from conveyor.storage.browse import browse_sql
from conveyor.storage.codec import dumps, dumps_object
from conveyor.storage.finishing import RESCUE_QUERY, RunningRow, plan_finishes
from conveyor.storage.flow import (
    KEEP_LIMIT,
    NO_KEY,
    Candidate,
    FlowRow,
    TypeLimit,
    allowed,
    check_queue_change,
    choose,
    flow_stats,
    limits_from_row,
    walk_keys,
    window_start,
)
from conveyor.storage.locks import lock_from_row
from conveyor.storage.schedules_sqlite import SQLiteSchedules
from conveyor.storage.secrets_sqlite import SQLiteSecrets
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
Q = load_queries("sqlite")
W = load_queries("sqlite", "workflows.sql")
LQ = load_queries("sqlite", "locks.sql")
MQ = load_queries("sqlite", "metrics.sql")
DQ = load_queries("sqlite", "dashboard.sql")
FQ = load_queries("sqlite", "flow.sql")

_FINISH_SQL = {
    Action.COMPLETE: Q["finish_complete"],
    Action.RETRY: Q["finish_retry"],
    Action.FAIL: Q["finish_fail"],
    Action.CONFIRM_CANCEL: Q["finish_cancel"],
    Action.RELEASE: Q["finish_release"],
}


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _dt(ts: float | None) -> datetime | None:
    """A stored timestamp as a datetime. Rows written before the value ranges were
    enforced may hold timestamps Python can't represent (year 0): clamped to the
    representable range, so such a row never breaks a fetch or a listing."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return datetime.min.replace(tzinfo=UTC) if ts < 0 else datetime.max.replace(tzinfo=UTC)


def job_from_row(row: sqlite3.Row) -> Job:
    result = row["result"]
    return Job(
        id=row["id"],
        job_type=row["job_type"],
        state=JobState(row["state"]),
        payload=orjson.loads(row["payload"]),
        queue=row["queue"],
        priority=row["priority"],
        attempt=row["attempt"],
        max_retries=row["max_retries"],
        timeout_ms=row["timeout_ms"],
        run_at=_dt(row["run_at"]),
        result=None if result is None else orjson.loads(result),
        error=row["error"],
        lease_token=row["lease_token"],
        worker_id=row["worker_id"],
        idempotency_key=row["idempotency_key"],
        workflow_id=row["workflow_id"],
        cancel_requested_at=_dt(row["cancel_requested_at"]),
        lost_count=row["lost_count"],
        created_by=row["created_by"],
        metadata=orjson.loads(row["metadata"]),
        created_at=_dt(row["created_at"]),
        started_at=_dt(row["started_at"]),
        completed_at=_dt(row["completed_at"]),
        updated_at=_dt(row["updated_at"]),
        step_name=row["step_name"],
        payload_version=row["payload_version"],
        checkpoint=None if row["checkpoint"] is None else orjson.loads(row["checkpoint"]),
        schedule_id=row["schedule_id"],
        concurrency_key=row["concurrency_key"] or None,
        requires=orjson.loads(row["requires"]) if row["requires"] else None,
    )


def _event_json(row: Any, status: str, attempt: int, **extra: Any) -> bytes:
    return orjson.dumps(row_event(row, status, attempt, **extra))


# SQLite result codes (primary, low byte) that mean "not now", not "never": the
# caller gets StoreUnavailable (HTTP 503, retry later) with a reason free of paths.
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_FULL: "the database disk is full",
    sqlite3.SQLITE_IOERR: "disk I/O error on the database",
    sqlite3.SQLITE_BUSY: "the database is busy",
    sqlite3.SQLITE_LOCKED: "the database is locked",
    sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
    sqlite3.SQLITE_READONLY: "the database is read-only",
    sqlite3.SQLITE_NOMEM: "the database is out of memory",
}


def _store_error(exc: sqlite3.DatabaseError, path: str) -> StoreError:
    """The Conveyor error for a SQLite failure; the message names the file for the
    operator, ``StoreUnavailable.reason`` does not."""
    code = getattr(exc, "sqlite_errorcode", None)
    reason = _UNAVAILABLE_CODES.get(code & 0xFF) if isinstance(code, int) else None
    text = str(exc)
    if reason is None and ("locked" in text or "busy" in text):
        reason = "the database is busy"
    if reason is not None:
        return StoreUnavailable(f"SQLite database {path}: {text}", reason=reason)
    return StoreError(f"SQLite error on {path}: {text}")


class SQLiteStore(SQLiteSchedules, SQLiteSecrets, SQLiteAudit, Store):
    """Store on one SQLite file. ``path`` may be ``:memory:`` only for one process."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 30_000) -> None:
        self.path = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._thread_ident: int | None = None
        self._data_version = 0

    # -- plumbing ---------------------------------------------------------------
    async def open(self) -> None:
        if self._executor is not None:
            return
        if self.path != ":memory:":
            parent = Path(self.path).resolve().parent  # noqa: ASYNC240 - once, at start-up
            if not parent.is_dir():
                raise ConfigurationError(
                    f"Cannot open SQLite database {self.path!r}: folder {parent} does not exist"
                )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="conveyor-sqlite")
        try:
            await self._run(self._connect)
            await self._run(self._migrate)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(executor, _close)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("The SQLite store is not open: call `await store.open()` first")
        if fn != self._migrate:  # a change's audit entries ride its write transaction
            fn = audit_bind(fn)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.DatabaseError as exc:
            raise _store_error(exc, self.path) from exc

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(
                f"Cannot open SQLite database {self.path!r}: {exc}",
                reason="the database file cannot be opened",
            ) from exc
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        for pragma in Q["connection_pragmas"].split(";"):
            sql = "\n".join(x for x in pragma.splitlines() if not x.lstrip().startswith("--"))
            if sql.strip():
                conn.execute(sql)
        self._conn = conn
        self._thread_ident = threading.get_ident()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        assert conn is not None
        conn.execute(Q["begin_write"])
        self._audit_begin(conn)
        try:
            yield conn
            audit = self._audit_flush(conn)
            conn.execute(Q["commit"])
            if audit is not None:
                audit[0].written = audit[1]
        except BaseException:
            # A COMMIT refused for a full disk or an I/O error can leave the
            # transaction open; without this rollback every later write would
            # fail with "cannot start a transaction within a transaction".
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(Q["rollback"])
            raise

    def _migrate(self) -> list[str]:
        applied_now: list[str] = []
        with self._tx() as conn:
            conn.execute(Q["migrations_table"])
            applied = {r[0]: (r[1], r[2]) for r in conn.execute(Q["applied_migrations"])}
            for m in load_migrations("sqlite"):
                if m.version in applied:
                    if applied[m.version][1] != m.checksum:
                        raise ConfigurationError(
                            f"Migration {m.version:04d}_{m.name} was changed after it was applied "
                            f"to {self.path}; restore the original file or use a new database"
                        )
                    continue
                for statement in _split_statements(m.sql):
                    conn.execute(statement)
                conn.execute(
                    Q["record_migration"],
                    (m.version, m.name, m.checksum, datetime.now(UTC).timestamp()),
                )
                applied_now.append(f"{m.version:04d}_{m.name}")
        return applied_now

    # Another process's commit changes PRAGMA data_version on our connection:
    # an idle worker checks it every 10 ms instead of sleeping a whole poll.
    change_check_interval: float | None = 0.01

    async def changed(self) -> bool:
        return await self._run(self._data_version_changed)

    def _data_version_changed(self) -> bool:
        assert self._conn is not None
        version = self._conn.execute(Q["data_version"]).fetchone()[0]
        changed = version != self._data_version
        self._data_version = version
        return bool(changed)

    async def migrate(self) -> list[str]:
        """Apply pending migrations (``open`` already does); return what was applied."""
        return await self._run(self._migrate)

    # -- submit -------------------------------------------------------------------
    async def enqueue_many(
        self, jobs: Sequence[NewJob], now: datetime, *, connection: Any = None
    ) -> list[EnqueueResult]:
        no_external_connection(connection, "SQLite")
        validate_batch(jobs)
        rows = [_job_params(new, now) for new in jobs]  # serialise before taking the lock
        return await self._run(self._enqueue, jobs, rows, now)

    def _enqueue(
        self, jobs: Sequence[NewJob], rows: list[dict[str, Any]], now_dt: datetime
    ) -> list[EnqueueResult]:
        now = now_dt.timestamp()
        with self._tx() as conn:
            keys = [j.idempotency_key for j in jobs if j.idempotency_key is not None]
            existing: dict[str, Job] = {}
            if keys:
                for r in conn.execute(Q["by_keys"], (orjson.dumps(keys).decode(),)):
                    existing[r["idempotency_key"]] = job_from_row(r)
            deps = {d for j in jobs for d in j.depends_on}
            parent_states: dict[str, str] = {}
            if deps:
                for r in conn.execute(Q["jobs_by_ids"], (orjson.dumps(sorted(deps)).decode(),)):
                    parent_states[r["id"]] = r["state"]
                missing = sorted(deps - parent_states.keys())
                if missing:
                    raise ValidationError(
                        f"depends_on: job {missing[0]!r} does not exist",
                        [FieldError("depends_on", f"job {m!r} does not exist") for m in missing],
                    )
            results: list[EnqueueResult] = []
            inserts: list[dict[str, Any]] = []
            dep_rows: list[tuple[str, str]] = []
            for new, row in zip(jobs, rows, strict=True):
                key = new.idempotency_key
                if key is not None and key in existing:
                    results.append(EnqueueResult(existing[key], True))
                    continue
                if new.depends_on:
                    states = {parent_states[d] for d in new.depends_on}
                    if states & {"failed", "cancelled"}:
                        row["state"] = "cancelled"
                        row["error"] = PARENT_FAILED_ERROR
                        row["completed_at"] = now
                    elif states != {"completed"}:
                        row["state"] = "blocked"
                    dep_rows.extend((row["id"], p) for p in dict.fromkeys(new.depends_on))
                inserts.append(row)
                job = _job_from_params(row, new, now_dt)
                if key is not None:
                    existing[key] = job
                results.append(EnqueueResult(job, False))
            last_seq = conn.execute(Q["max_seq"]).fetchone()[0]
            conn.executemany(Q["insert_job"], inserts)
            flow = [r for r in inserts if r["concurrency_key"] or r["requires"]]
            if flow:
                conn.executemany(FQ["set_flow_columns"], flow)
            if dep_rows:
                conn.executemany(Q["insert_dependency"], dep_rows)
                conn.executemany(Q["mark_has_children"], [(p,) for p in deps])
            conn.execute(Q["insert_submitted_events"], (now, last_seq))
        return results

    # -- worker hot path ------------------------------------------------------------
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
        params = {
            "caps": orjson.dumps(dict(capabilities or {})).decode(),
            "token": new_token(),
            "worker": worker_id,
            "now": now.timestamp(),
            "any_queue": not queues,
            "queues": orjson.dumps(list(queues)).decode(),
            "any_type": not job_types,
            "types": orjson.dumps(list(job_types)).decode(),
            "limit": limit,
        }
        return await self._run(self._fetch, params)

    def _fetch(self, params: dict[str, Any]) -> list[Job]:
        with self._tx() as conn:
            limited = conn.execute(FQ["limited_types"], params).fetchall()
            queue_limits = conn.execute(FQ["queue_limits"], params).fetchall()
            if (limited or queue_limits) and params["limit"]:
                rows = self._fetch_limited(conn, params, limited, queue_limits)
            else:
                rows = conn.execute(Q["fetch"], params).fetchall()
            if rows:
                conn.execute(Q["insert_started_executions"], params)
                conn.execute(Q["insert_started_events"], params)
        rows.sort(key=lambda r: (-r["priority"], r["run_at"], r["seq"]))
        return [job_from_row(r) for r in rows]

    async def finish_many(self, finishes: Sequence[Finish], now: datetime) -> list[bool]:
        for f in finishes:
            if f.action not in FINISH_ACTIONS:
                raise InvalidTransition("running", f.action.value)
        results = {
            id(f): dumps(f.result, "result") for f in finishes if f.action is Action.COMPLETE
        }
        results.update(
            (id(f), dumps(f.payload))
            for f in finishes
            if f.action is Action.RETRY and f.payload is not None
        )
        return await self._run(self._finish, finishes, results, now)

    def _finish(
        self, finishes: Sequence[Finish], results: dict[int, str], now_dt: datetime
    ) -> list[bool]:
        now = now_dt.timestamp()
        ids = orjson.dumps([f.job_id for f in finishes]).decode()
        with self._tx() as conn:
            running = {
                r["id"]: RunningRow(
                    lease_token=r["lease_token"],
                    attempt=r["attempt"],
                    started_at=_dt(r["started_at"]),
                    job_type=r["job_type"],
                    queue=r["queue"],
                    has_children=bool(r["has_children"]),
                    cancel_requested=r["cancel_requested_at"] is not None,
                    workflow_id=r["workflow_id"],
                    step_name=r["step_name"],
                    payload_version=r["payload_version"],
                )
                for r in conn.execute(Q["running_by_ids"], (ids,))
            }
            plan = plan_finishes(finishes, running, now_dt)
            by_action: dict[Action, list[tuple[Any, ...]]] = {}
            healed: list[tuple[Any, ...]] = []
            for f, u in zip(
                (f for f, ok in zip(finishes, plan.accepted, strict=True) if ok),
                plan.updates,
                strict=True,
            ):
                if u.action is Action.COMPLETE:
                    params: tuple[Any, ...] = (results[id(f)], now, now)
                elif u.action is Action.RETRY and u.payload is not None:
                    healed.append(
                        (u.error, _ts(u.run_at), now, results[id(f)], u.job_id, f.lease_token)
                    )
                    continue
                elif u.action is Action.RETRY:
                    params = (u.error, _ts(u.run_at), now)
                elif u.action is Action.RELEASE:
                    params = (now, now)
                else:
                    params = (u.error, now, now)
                by_action.setdefault(u.action, []).append((*params, u.job_id, f.lease_token))
            for action, params_list in by_action.items():
                conn.executemany(_FINISH_SQL[action], params_list)
            if healed:
                conn.executemany(Q["finish_retry_healed"], healed)
            conn.executemany(
                Q["end_execution"],
                [
                    (now, outcome, error, trace, job_id, attempt)
                    for job_id, attempt, outcome, error, trace in plan.executions
                ],
            )
            conn.executemany(
                Q["insert_event"],
                [(t, job_id, orjson.dumps(data), now) for t, job_id, data in plan.events],
            )
            moved = plan.moved
            if plan.finished_parents:
                moved = moved + self._settle_children(conn, plan.finished_parents, now)
            if moved:
                self._settle_workflows(conn, moved, now)
        return plan.accepted

    def _settle_children(
        self, conn: sqlite3.Connection, parents: list[str], now: float
    ) -> list[Moved]:
        """Unblock children whose parents all completed; cancel those with a failed
        parent. Returns the workflow steps it cancelled."""
        moved: list[Moved] = []
        todo = parents
        while todo:
            children = conn.execute(Q["blocked_children"], (orjson.dumps(todo).decode(),))
            todo = []
            events = []
            for child in children.fetchall():
                states = {r[0]: r[1] for r in conn.execute(Q["parent_states"], (child["id"],))}
                if states.keys() & {"failed", "cancelled"}:
                    error = PARENT_FAILED_ERROR
                    conn.execute(Q["cancel_blocked"], (error, now, now, child["id"]))
                    events.append(
                        (
                            EventType.JOB_CANCELLED.value,
                            child["id"],
                            _event_json(child, "cancelled", child["attempt"], error=error),
                            now,
                        )
                    )
                    todo.append(child["id"])
                    if child["workflow_id"] is not None:
                        moved.append(Moved(child["workflow_id"], child["step_name"], "cancelled"))
                elif set(states) == {"completed"}:
                    conn.execute(Q["unblock"], (now, now, child["id"]))
                    events.append(
                        (
                            EventType.JOB_STATUS_CHANGED.value,
                            child["id"],
                            _event_json(child, "pending", child["attempt"]),
                            now,
                        )
                    )
            conn.executemany(Q["insert_event"], events)
        return moved

    # -- workers ----------------------------------------------------------------------
    async def register_worker(self, worker: WorkerInfo, now: datetime) -> None:
        params = {
            "id": worker.id,
            "host": worker.host,
            "pid": worker.pid,
            "queues": orjson.dumps(list(worker.queues)).decode(),
            "job_types": orjson.dumps(list(worker.job_types)).decode(),
            "concurrency": worker.concurrency,
            "now": now.timestamp(),
        }
        event = orjson.dumps({"worker_id": worker.id, "status": "running"})
        caps = orjson.dumps(dict(sorted(worker.capabilities.items()))).decode()

        def _do() -> None:
            with self._tx() as conn:
                conn.execute(Q["upsert_worker"], params)
                conn.execute(FQ["set_capabilities"], (caps, worker.id))
                conn.execute(
                    Q["insert_event"],
                    (EventType.WORKER_STATUS_CHANGED.value, None, event, params["now"]),
                )

        await self._run(_do)

    async def ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        params = (prefix, prefix_upper_bound(prefix), limit)

        def _do() -> list[str]:
            assert self._conn is not None
            return [r[0] for r in self._conn.execute(Q["ids_with_prefix"], params)]

        return await self._run(_do)

    async def record_job_types(self, types: Sequence[JobTypeInfo], now: datetime) -> None:
        rows = [
            (t.job_type, t.queue, t.priority, t.max_retries, t.timeout_ms, now.timestamp())
            for t in types
        ]

        def _do() -> None:
            with self._tx() as conn:
                conn.executemany(Q["upsert_job_type"], rows)

        await self._run(_do)

    async def list_job_types(self) -> list[JobTypeInfo]:
        def _do() -> list[JobTypeInfo]:
            with self._tx() as conn:
                return [
                    JobTypeInfo(r[0], r[1], r[2], r[3], r[4], _dt(r[5]))
                    for r in conn.execute(Q["list_job_types"])
                ]

        return await self._run(_do)

    async def heartbeat(
        self, worker_id: str, jobs_running: int, now: datetime, stuck_jobs: int = 0
    ) -> set[str]:
        def _do() -> set[str]:
            with self._tx() as conn:
                conn.execute(Q["heartbeat"], (now.timestamp(), jobs_running, stuck_jobs, worker_id))
                return {r[0] for r in conn.execute(Q["cancel_requested_for_worker"], (worker_id,))}

        return await self._run(_do)

    async def deregister_worker(self, worker_id: str, now: datetime) -> None:
        event = orjson.dumps({"worker_id": worker_id, "status": "stopped"})

        def _do() -> None:
            with self._tx() as conn:
                cur = conn.execute(Q["deregister_worker"], (now.timestamp(), worker_id))
                if cur.rowcount:
                    conn.execute(
                        Q["insert_event"],
                        (EventType.WORKER_STATUS_CHANGED.value, None, event, now.timestamp()),
                    )

        await self._run(_do)

    async def rescue(
        self, *, heartbeat_timeout: float, max_lost: int, now: datetime
    ) -> list[Rescued]:
        ts = now.timestamp()

        def _do() -> list[Rescued]:
            out: list[Rescued] = []
            with self._tx() as conn:
                dead = [
                    r[0]
                    for r in conn.execute(Q["mark_stale_workers_dead"], (ts - heartbeat_timeout,))
                ]
                events: list[tuple[str, str | None, bytes, float]] = [
                    (
                        EventType.WORKER_STATUS_CHANGED.value,
                        None,
                        orjson.dumps({"worker_id": w, "status": "dead"}),
                        ts,
                    )
                    for w in dead
                ]
                finished: list[str] = []
                moved: list[Moved] = []
                for row in conn.execute(Q["orphaned_running"]).fetchall():
                    job = job_from_row(row)
                    action = lost_action(job, max_lost)
                    conn.execute(Q[RESCUE_QUERY[action]], (ts, ts, job.id, job.lease_token))
                    state = next_state(JobState.RUNNING, action)
                    status, event = state.value, EVENT_FOR_ACTION[action].value
                    if state.is_terminal:
                        finished.append(job.id)
                        if job.workflow_id is not None:
                            moved.append(Moved(job.workflow_id, job.step_name or job.id, status))
                    conn.execute(
                        Q["end_execution"], (ts, "lost", "worker_lost", None, job.id, job.attempt)
                    )
                    events.append(
                        (
                            event,
                            job.id,
                            _event_json(
                                row,
                                status,
                                job.attempt,
                                error="worker_lost",
                                worker_id=job.worker_id,
                            ),
                            ts,
                        )
                    )
                    out.append(Rescued(job.id, job.worker_id, action))
                conn.executemany(Q["insert_event"], events)
                if finished:
                    moved += self._settle_children(conn, finished, ts)
                if moved:
                    self._settle_workflows(conn, moved, ts)
            return out

        return await self._run(_do)

    # -- operator actions -------------------------------------------------------------
    async def cancel(self, job_id: str, now: datetime, reason: str | None = None) -> Job:
        ts = now.timestamp()
        params = {"id": job_id, "now": ts, "reason": reason}
        extra = {} if reason is None else {"reason": reason}

        def _do() -> Job:
            with self._tx() as conn:
                row = conn.execute(Q["get_job"], (job_id,)).fetchone()
                if row is None:
                    raise JobNotFound(job_id)
                state = row["state"]
                if state in ("completed", "failed", "cancelled"):
                    raise JobNotCancellable(job_id, state)
                if state == "running":
                    if conn.execute(Q["request_cancel"], params).rowcount:
                        conn.execute(
                            Q["insert_event"],
                            (
                                EventType.JOB_STATUS_CHANGED.value,
                                job_id,
                                _event_json(row, "cancelling", row["attempt"], **extra),
                                ts,
                            ),
                        )
                else:
                    conn.execute(Q["cancel_waiting"], params)
                    conn.execute(
                        Q["insert_event"],
                        (
                            EventType.JOB_CANCELLED.value,
                            job_id,
                            _event_json(row, "cancelled", row["attempt"], **extra),
                            ts,
                        ),
                    )
                    moved: list[Moved] = []
                    if row["workflow_id"] is not None:
                        moved.append(Moved(row["workflow_id"], row["step_name"], "cancelled"))
                    if row["has_children"]:
                        moved += self._settle_children(conn, [job_id], ts)
                    if moved:
                        self._settle_workflows(conn, moved, ts)
                return job_from_row(conn.execute(Q["get_job"], (job_id,)).fetchone())

        return await self._run(_do)

    async def retry_failed(self, job_ids: Sequence[str], now: datetime) -> list[Job]:
        ts = now.timestamp()

        def _do() -> list[Job]:
            with self._tx() as conn:
                rows = []
                # No idempotency key check: a failed job still holds its own key (no
                # other job can have it), so it keeps it when it runs again.
                for job_id in dict.fromkeys(job_ids):
                    row = conn.execute(Q["get_job"], (job_id,)).fetchone()
                    if row is None:
                        raise JobNotFound(job_id)
                    require_failed(job_id, row["state"], "retry")
                    rows.append(row)
                steps: dict[str, list[str]] = {}
                for row in rows:
                    conn.execute(Q["retry_failed"], {"id": row["id"], "now": ts})
                    if row["workflow_id"] is not None:
                        steps.setdefault(row["workflow_id"], []).append(row["step_name"])
                for wf_id, names in steps.items():  # its workflow runs again
                    conn.execute(W["reopen_finished_workflow"], {"id": wf_id, "now": ts})
                    self._unblock_descendants(conn, wf_id, names, ts)
                conn.executemany(
                    Q["insert_event"],
                    [
                        (
                            EventType.JOB_STATUS_CHANGED.value,
                            r["id"],
                            _event_json(r, "pending", 0, reason="dlq_retry"),
                            ts,
                        )
                        for r in rows
                    ],
                )
                return [
                    job_from_row(conn.execute(Q["get_job"], (r["id"],)).fetchone()) for r in rows
                ]

        return await self._run(_do)

    async def purge_failed(self, job_ids: Sequence[str] | None, now: datetime) -> int:
        def _do() -> int:
            with self._tx() as conn:
                if job_ids is None:
                    ids = [r[0] for r in conn.execute(Q["failed_ids"])]
                else:
                    ids = list(dict.fromkeys(job_ids))
                    for job_id in ids:
                        row = conn.execute(Q["get_job"], (job_id,)).fetchone()
                        if row is None:
                            raise JobNotFound(job_id)
                        require_failed(job_id, row["state"], "purge")
                self._delete(conn, ids)
                return len(ids)

        return await self._run(_do)

    @staticmethod
    def _delete(conn: sqlite3.Connection, ids: list[str]) -> None:
        params = [(i,) for i in ids]
        conn.executemany(Q["delete_job"], params)
        conn.executemany(Q["delete_executions"], params)
        conn.executemany(Q["delete_dependencies"], params)
        conn.executemany(Q["delete_steps"], params)

    async def prune(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()

        def _chunk() -> int:
            # Small transactions, so a big prune never holds the write lock for long.
            with self._tx() as conn:
                ids = [r[0] for r in conn.execute(Q["prunable"], (cutoff,))]
                self._delete(conn, ids)
                if not ids:
                    conn.execute(Q["prune_events"], (cutoff,))
                    for (wf_id,) in conn.execute(W["prunable_workflows"], (cutoff,)).fetchall():
                        conn.execute(W["delete_workflow"], (wf_id,))
                return len(ids)

        total = 0
        while True:
            n = await self._run(_chunk)
            total += n
            if n == 0:
                return total

    # -- reads ------------------------------------------------------------------------------
    async def get(self, job_id: str) -> Job:
        def _do() -> Job:
            assert self._conn is not None
            row = self._conn.execute(Q["get_job"], (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            job = job_from_row(row)
            job.depends_on = [r[0] for r in self._conn.execute(Q["job_parents"], (job_id,))]
            return job

        return await self._run(_do)

    async def executions(self, job_id: str) -> list[Execution]:
        def _do() -> list[Execution]:
            assert self._conn is not None
            if self._conn.execute(Q["get_job"], (job_id,)).fetchone() is None:
                raise JobNotFound(job_id)
            return [
                Execution(
                    r["job_id"],
                    r["attempt"],
                    r["worker_id"],
                    _dt(r["started_at"]),  # type: ignore[arg-type]
                    _dt(r["finished_at"]),
                    r["outcome"],
                    r["error"],
                    r["payload_version"],
                    r["traceback"],
                )
                for r in self._conn.execute(Q["executions"], (job_id,))
            ]

        return await self._run(_do)

    async def list_jobs(self, query: JobQuery) -> Page:
        query.validate()
        direction = "DESC" if query.descending else "ASC"
        sql = Q["list_jobs"].replace(
            "{order_by}",
            f"{query.sort} {direction}, seq {direction}",  # validated: one of SORT_FIELDS
        )
        params = {
            "states": orjson.dumps([s.value for s in query.states]).decode()
            if query.states
            else None,
            "job_type": query.job_type,
            "queue": query.queue,
            "created_by": query.created_by,
            "internal": query.include_internal,
            "limit": query.limit,
            "offset": query.offset,
        }

        def _do() -> Page:
            assert self._conn is not None
            jobs = [job_from_row(r) for r in self._conn.execute(sql, params)]
            total = self._conn.execute(Q["count_jobs"], params).fetchone()[0]
            return Page(jobs, total, query.limit, query.offset)

        return await self._run(_do)

    async def count_by_state(self) -> dict[JobState, int]:
        def _do() -> dict[JobState, int]:
            assert self._conn is not None
            counts = dict.fromkeys(JobState, 0)
            for state, n in self._conn.execute(Q["count_by_state"]):
                counts[JobState(state)] = n
            return counts

        return await self._run(_do)

    async def pending_by_type(self) -> dict[tuple[str, str], int]:
        def _do() -> dict[tuple[str, str], int]:
            assert self._conn is not None
            return {(q, t): n for q, t, n in self._conn.execute(Q["pending_by_type"])}

        return await self._run(_do)

    async def list_workers(self) -> list[WorkerInfo]:
        def _do() -> list[WorkerInfo]:
            assert self._conn is not None
            return [
                WorkerInfo(
                    id=r["id"],
                    host=r["host"],
                    pid=r["pid"],
                    queues=tuple(orjson.loads(r["queues"])),
                    job_types=tuple(orjson.loads(r["job_types"])),
                    concurrency=r["concurrency"],
                    started_at=_dt(r["started_at"]),
                    heartbeat_at=_dt(r["heartbeat_at"]),
                    state=r["state"],
                    jobs_running=r["jobs_running"],
                    capabilities=orjson.loads(r["capabilities"]),
                    stuck_jobs=r["stuck_jobs"],
                )
                for r in self._conn.execute(Q["list_workers"])
            ]

        return await self._run(_do)

    async def events_after(self, after_id: int, limit: int) -> list[Event]:
        def _do() -> list[Event]:
            assert self._conn is not None
            return [
                Event(r[0], r[1], r[2], orjson.loads(r[3]), _dt(r[4]))  # type: ignore[arg-type]
                for r in self._conn.execute(Q["events_after"], (after_id, limit))
            ]

        return await self._run(_do)

    async def activity(self, since: datetime) -> Activity:
        ts = since.timestamp()

        def _do() -> Activity:
            assert self._conn is not None
            submitted = self._conn.execute(Q["submitted_since"], (ts,)).fetchone()[0]
            finished = {
                (t, JobState(state)): n
                for t, state, n in self._conn.execute(Q["finished_since"], (ts,))
            }
            return Activity(since, submitted, finished)

        return await self._run(_do)

    # -- API keys ---------------------------------------------------------------------
    async def create_api_key(self, key: ApiKey) -> None:
        params = (
            key.id,
            key.name,
            key.scope.value,
            key.key_hash,
            key.prefix,
            key.created_at.timestamp(),
            _ts(key.expires_at),
        )

        def _do() -> None:
            with self._tx() as conn:
                try:
                    conn.execute(Q["insert_api_key"], params)
                except sqlite3.IntegrityError as exc:
                    raise ValidationError("An API key with this id or hash already exists") from exc

        await self._run(_do)

    async def list_api_keys(self) -> list[ApiKey]:
        def _do() -> list[ApiKey]:
            assert self._conn is not None
            return [_key_from_row(r) for r in self._conn.execute(Q["list_api_keys"])]

        return await self._run(_do)

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        def _do() -> ApiKey | None:
            assert self._conn is not None
            row = self._conn.execute(Q["find_api_key"], (key_hash,)).fetchone()
            return None if row is None else _key_from_row(row)

        return await self._run(_do)

    async def revoke_api_key(self, key_id: str, now: datetime) -> ApiKey:
        def _do() -> ApiKey:
            with self._tx() as conn:
                conn.execute(Q["revoke_api_key"], (now.timestamp(), key_id))
                row = conn.execute(Q["get_api_key"], (key_id,)).fetchone()
                if row is None:
                    raise ApiKeyNotFound(key_id)
                return _key_from_row(row)

        return await self._run(_do)

    async def count_api_keys(self) -> int:
        def _do() -> int:
            assert self._conn is not None
            return int(self._conn.execute(Q["count_active_api_keys"]).fetchone()[0])

        return await self._run(_do)

    async def latest_event_id(self) -> int:
        def _do() -> int:
            assert self._conn is not None
            return int(self._conn.execute(Q["latest_event_id"]).fetchone()[0])

        return await self._run(_do)

    # -- outbox consumers -------------------------------------------------------------
    async def claim_consumer(self, name: str, owner: str, ttl: float, now: datetime) -> int | None:
        params = {
            "name": name,
            "owner": owner,
            "expires": now.timestamp() + ttl,
            "now": now.timestamp(),
        }

        def _do() -> int | None:
            with self._tx() as conn:
                row = conn.execute(Q["claim_consumer"], params).fetchone()
                return None if row is None else int(row[0])

        return await self._run(_do)

    async def advance_consumer(self, name: str, owner: str, position: int, now: datetime) -> bool:
        params = {"name": name, "owner": owner, "position": position, "now": now.timestamp()}

        def _do() -> bool:
            with self._tx() as conn:
                return conn.execute(Q["advance_consumer"], params).rowcount == 1

        return await self._run(_do)

    async def consumer_positions(self) -> dict[str, int]:
        def _do() -> dict[str, int]:
            assert self._conn is not None
            return {r[0]: int(r[1]) for r in self._conn.execute(Q["consumer_positions"])}

        return await self._run(_do)

    async def release_consumer(self, name: str, owner: str, now: datetime) -> None:
        params = {"name": name, "owner": owner, "now": now.timestamp()}

        def _do() -> None:
            with self._tx() as conn:
                conn.execute(Q["release_consumer"], params)

        await self._run(_do)

    # -- webhooks ---------------------------------------------------------------------
    async def create_webhook(self, webhook: Webhook) -> None:
        def _do() -> None:
            with self._tx() as conn:
                try:
                    conn.execute(Q["insert_webhook"], _webhook_params(webhook))
                except sqlite3.IntegrityError as exc:
                    raise ValidationError(
                        f"A webhook with id {webhook.id!r} already exists"
                    ) from exc

        await self._run(_do)

    async def list_webhooks(self) -> list[Webhook]:
        def _do() -> list[Webhook]:
            assert self._conn is not None
            return [webhook_from_row(r, _dt) for r in self._conn.execute(Q["list_webhooks"])]

        return await self._run(_do)

    def _webhook(self, conn: sqlite3.Connection, webhook_id: str) -> Webhook:
        row = conn.execute(Q["get_webhook"], (webhook_id,)).fetchone()
        if row is None:
            raise WebhookNotFound(webhook_id)
        return webhook_from_row(row, _dt)

    async def get_webhook(self, webhook_id: str) -> Webhook:
        def _do() -> Webhook:
            assert self._conn is not None
            return self._webhook(self._conn, webhook_id)

        return await self._run(_do)

    async def delete_webhook(self, webhook_id: str) -> None:
        def _do() -> None:
            with self._tx() as conn:
                if conn.execute(Q["delete_webhook"], (webhook_id,)).rowcount == 0:
                    raise WebhookNotFound(webhook_id)
                conn.execute(Q["delete_webhook_deliveries"], (webhook_id,))

        await self._run(_do)

    async def record_delivery(self, attempt: DeliveryAttempt, policy: DisablePolicy) -> Webhook:
        ts = attempt.created_at.timestamp()

        def _do() -> Webhook:
            with self._tx() as conn:
                self._webhook(conn, attempt.webhook_id)
                conn.execute(Q["insert_delivery"], delivery_params(attempt, ts))
                ok = attempt.outcome is DeliveryOutcome.DELIVERED
                query = Q["webhook_succeeded"] if ok else Q["webhook_failed"]
                row = conn.execute(query, {"id": attempt.webhook_id, "at": ts}).fetchone()
                hook = webhook_from_row(row, _dt)
                if ok or hook.state is not WebhookState.ACTIVE:
                    return hook
                if not policy.should_disable(hook, attempt.created_at):
                    return hook
                reason = policy.reason(hook, attempt.created_at)
                event_id = conn.execute(
                    Q["insert_event"],
                    (WEBHOOK_DISABLED, None, orjson.dumps(disabled_event(hook, reason)), ts),
                ).lastrowid
                params = {"id": hook.id, "at": ts, "reason": reason, "event_id": event_id}
                return webhook_from_row(conn.execute(Q["disable_webhook"], params).fetchone(), _dt)

        return await self._run(_do)

    async def enable_webhook(self, webhook_id: str) -> tuple[Webhook, int | None]:
        def _do() -> tuple[Webhook, int | None]:
            with self._tx() as conn:
                hook = self._webhook(conn, webhook_id)
                if hook.state is not WebhookState.DISABLED:
                    return hook, None
                row = conn.execute(Q["enable_webhook"], {"id": webhook_id}).fetchone()
                return webhook_from_row(row, _dt), hook.replay_after

        return await self._run(_do)

    async def list_deliveries(self, webhook_id: str, limit: int) -> list[DeliveryAttempt]:
        def _do() -> list[DeliveryAttempt]:
            assert self._conn is not None
            self._webhook(self._conn, webhook_id)
            rows = self._conn.execute(Q["list_deliveries"], (webhook_id, limit))
            return [delivery_from_row(r, _dt) for r in rows]

        return await self._run(_do)

    # -- workflows ------------------------------------------------------------------------
    def _settle_workflows(self, conn: sqlite3.Connection, moved: list[Moved], now: float) -> None:
        """Apply ``fail_fast``, write ``workflow_updated`` and, once no step can run,
        the status and terminal event, for the workflows whose steps ``moved``
        (their rows and step counts read in one query each, for the whole batch)."""
        groups = group_moved(moved)
        ids = orjson.dumps(sorted(groups)).decode()
        rows = conn.execute(W["workflows_by_ids"], (ids,)).fetchall()
        all_counts: dict[str, dict[str, int]] = {}
        for r in conn.execute(W["step_counts_many"], (ids,)):
            all_counts.setdefault(r[0], {})[r[1]] = r[2]
        events = []
        for row in rows:
            if row["status"] != "running":
                continue
            wf_id = row["id"]
            steps = groups[wf_id]
            counts = all_counts.get(wf_id, {})
            failed = wants_fail_fast(row["on_failure"], steps)
            if failed is not None:
                steps = steps + self._cancel_steps(conn, wf_id, fail_fast_reason(failed), now)
                counts = self._step_counts(conn, wf_id)
            data = updated_event(wf_id, row["name"], counts, steps)
            events.append((WORKFLOW_UPDATED, None, orjson.dumps(data), now))
            status = settled_status(counts)
            if status is not None:
                conn.execute(
                    W["set_workflow_status"],
                    {"id": wf_id, "status": status.value, "finished_at": now, "now": now},
                )
                details = event_steps(self._step_details(conn, wf_id, results=False))
                type_, data = terminal_event(wf_id, row["name"], status, counts, details)
                events.append((type_, None, orjson.dumps(data), now))
        conn.executemany(Q["insert_event"], events)

    def _cancel_steps(
        self, conn: sqlite3.Connection, wf_id: str, reason: str, now: float
    ) -> list[Moved]:
        """Cancel the workflow's waiting steps and ask its running ones to stop."""
        params = {"workflow_id": wf_id, "reason": reason, "now": now}
        cancelled = conn.execute(W["cancel_waiting_steps"], params).fetchall()
        running = conn.execute(W["cancel_running_steps"], params).fetchall()
        events = [
            (
                EventType.JOB_CANCELLED.value,
                r["id"],
                _event_json(
                    r, "cancelled", r["attempt"], error=f"cancelled: {reason}", reason=reason
                ),
                now,
            )
            for r in cancelled
        ] + [
            (
                EventType.JOB_STATUS_CHANGED.value,
                r["id"],
                _event_json(r, "cancelling", r["attempt"], reason=reason),
                now,
            )
            for r in running
        ]
        conn.executemany(Q["insert_event"], events)
        moved = [Moved(wf_id, r["step_name"], "cancelled") for r in cancelled]
        parents = [r["id"] for r in cancelled if r["has_children"]]
        if parents:  # a plain job may depend on a step
            moved += [
                m for m in self._settle_children(conn, parents, now) if m.workflow_id != wf_id
            ]
        return moved

    def _unblock_descendants(
        self, conn: sqlite3.Connection, wf_id: str, names: list[str], now: float
    ) -> None:
        """Steps retried from the dead-letter queue: the steps below them that were
        cancelled because of them wait for them again (``blocked``)."""
        edges = [(r[0], r[1]) for r in conn.execute(W["step_edges"], (wf_id,))]
        below = descendants(names, edges)
        events = []
        for r in conn.execute(W["retryable_steps"], (wf_id,)).fetchall():
            if r["step_name"] in below:
                conn.execute(W["reset_step"], {"id": r["id"], "state": "blocked", "now": now})
                events.append(
                    (
                        EventType.JOB_STATUS_CHANGED.value,
                        r["id"],
                        _event_json(r, "blocked", 0, reason="dlq_retry_of_parent"),
                        now,
                    )
                )
        conn.executemany(Q["insert_event"], events)

    @staticmethod
    def _step_counts(conn: sqlite3.Connection, wf_id: str) -> dict[str, int]:
        return {r[0]: r[1] for r in conn.execute(W["step_counts"], (wf_id,))}

    @staticmethod
    def _step_details(conn: sqlite3.Connection, wf_id: str, *, results: bool) -> list[StepDetail]:
        rows = conn.execute(W["step_rows"], (wf_id,)).fetchall()
        edges = [(r[0], r[1]) for r in conn.execute(W["step_edges"], (wf_id,))]
        return step_details(rows, edges, _dt, results=results, load=orjson.loads)

    def _workflow(
        self, conn: sqlite3.Connection, wf_id: str, *, steps: bool, results: bool = True
    ) -> Workflow:
        row = conn.execute(W["get_workflow"], (wf_id,)).fetchone()
        if row is None:
            raise WorkflowNotFound(wf_id)
        details = self._step_details(conn, wf_id, results=results) if steps else None
        return workflow_from_row(row, self._step_counts(conn, wf_id), _dt, details)

    def _insert_steps(
        self,
        conn: sqlite3.Connection,
        wf_id: str,
        steps: Sequence[tuple[str, NewJob]],
        rows: list[dict[str, Any]],
        known: dict[str, tuple[str, str]],
        now: float,
    ) -> list[Job]:
        """Insert steps (parents first); ``known``: step name -> (job id, state) of the
        steps already there, extended with the new ones."""
        last_seq = conn.execute(Q["max_seq"]).fetchone()[0]
        dep_rows: list[tuple[str, str]] = []
        parents: set[str] = set()
        jobs = []
        now_dt = _dt(now)
        assert now_dt is not None
        for (name, new), row in zip(steps, rows, strict=True):
            state = step_state(JobState(known[d][1]) for d in new.depends_on)
            row["state"] = state.value
            row["workflow_id"] = wf_id
            row["step_name"] = name
            if state is JobState.CANCELLED:
                row["error"] = PARENT_FAILED_ERROR
                row["completed_at"] = now
            known[name] = (row["id"], state.value)
            for d in dict.fromkeys(new.depends_on):
                dep_rows.append((row["id"], known[d][0]))
                parents.add(known[d][0])
            job = _job_from_params(row, new, now_dt)
            job.workflow_id, job.step_name = wf_id, name
            job.depends_on = [known[d][0] for d in dict.fromkeys(new.depends_on)]
            jobs.append(job)
        conn.executemany(W["insert_step"], rows)
        conn.executemany(Q["insert_dependency"], dep_rows)
        conn.executemany(Q["mark_has_children"], [(p,) for p in parents])
        conn.execute(Q["insert_submitted_events"], (now, last_seq))
        return jobs

    async def create_workflow(
        self, workflow: NewWorkflow, steps: Sequence[tuple[str, NewJob]], now: datetime
    ) -> tuple[Workflow, bool]:
        validate_steps(steps)
        rows = [_job_params(new, now) for _, new in steps]
        wf_id, ts = new_job_id(), now.timestamp()
        params = {
            "id": wf_id,
            "name": workflow.name,
            "on_failure": workflow.on_failure.value,
            "total_steps": len(steps),
            "idempotency_key": workflow.idempotency_key,
            "metadata": dumps_object(workflow.metadata, "metadata"),
            "created_by": workflow.created_by,
            "now": now.timestamp(),
        }

        def _do() -> tuple[Workflow, bool]:
            with self._tx() as conn:
                if workflow.idempotency_key is not None:
                    held = conn.execute(
                        W["workflow_by_key"], (workflow.idempotency_key,)
                    ).fetchone()
                    if held is not None:
                        return self._workflow(conn, held["id"], steps=False), True
                conn.execute(W["insert_workflow"], params)
                self._insert_steps(conn, wf_id, steps, rows, {}, ts)
                wf = self._workflow(conn, wf_id, steps=False)
                data = workflow_event(
                    wf.id,
                    wf.name,
                    "running",
                    self._step_counts(conn, wf.id),
                    on_failure=wf.on_failure.value,
                )
                conn.execute(
                    Q["insert_event"], (WORKFLOW_SUBMITTED, None, orjson.dumps(data), params["now"])
                )
                return wf, False

        return await self._run(_do)

    async def get_workflow(self, workflow_id: str, *, results: bool = True) -> Workflow:
        def _do() -> Workflow:
            assert self._conn is not None
            return self._workflow(self._conn, workflow_id, steps=True, results=results)

        return await self._run(_do)

    async def list_workflows(self, query: WorkflowQuery) -> tuple[list[Workflow], int]:
        params = {
            "status": None if query.status is None else query.status.value,
            "name": query.name,
            "limit": query.limit,
            "offset": query.offset,
        }

        def _do() -> tuple[list[Workflow], int]:
            assert self._conn is not None
            conn = self._conn
            rows = conn.execute(W["list_workflows"], params).fetchall()
            counts: dict[str, dict[str, int]] = {}
            ids = orjson.dumps([r["id"] for r in rows]).decode()
            for r in conn.execute(W["step_counts_many"], (ids,)):
                counts.setdefault(r[0], {})[r[1]] = r[2]
            total = conn.execute(W["count_workflows"], params).fetchone()[0]
            return [workflow_from_row(r, counts.get(r["id"], {}), _dt) for r in rows], total

        return await self._run(_do)

    async def cancel_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        ts = now.timestamp()

        def _do() -> Workflow:
            with self._tx() as conn:
                row = conn.execute(W["get_workflow"], (workflow_id,)).fetchone()
                if row is None:
                    raise WorkflowNotFound(workflow_id)
                if row["status"] == "running":
                    conn.execute(W["request_workflow_cancel"], {"id": workflow_id, "now": ts})
                    moved = self._cancel_steps(conn, workflow_id, WORKFLOW_CANCEL_REASON, ts)
                    # Nothing was waiting: settle on the running steps' outcome.
                    self._settle_workflows(conn, moved or [Moved(workflow_id, "", "cancelled")], ts)
                return self._workflow(conn, workflow_id, steps=True)

        return await self._run(_do)

    async def retry_workflow(self, workflow_id: str, now: datetime) -> Workflow:
        ts = now.timestamp()

        def _do() -> Workflow:
            with self._tx() as conn:
                row = conn.execute(W["get_workflow"], (workflow_id,)).fetchone()
                check_retryable(workflow_id, row)
                again = conn.execute(W["retryable_steps"], (workflow_id,)).fetchall()
                if not again:  # nothing would run: reopening would leave it running for ever
                    return self._workflow(conn, workflow_id, steps=True)
                edges = [(r[0], r[1]) for r in conn.execute(W["step_edges"], (workflow_id,))]
                states = retry_states((r["step_name"] for r in again), edges)
                conn.execute(W["reopen_workflow"], {"id": workflow_id, "now": ts})
                events = []
                for r in again:
                    state = states[r["step_name"]]
                    conn.execute(W["reset_step"], {"id": r["id"], "state": state, "now": ts})
                    events.append(
                        (
                            EventType.JOB_STATUS_CHANGED.value,
                            r["id"],
                            _event_json(r, state, 0, reason="workflow_retry"),
                            ts,
                        )
                    )
                conn.executemany(Q["insert_event"], events)
                wf = self._workflow(conn, workflow_id, steps=False)
                data = workflow_event(
                    wf.id,
                    wf.name,
                    "running",
                    self._step_counts(conn, wf.id),
                    retried_steps=[r["step_name"] for r in again][:MAX_MOVED_LISTED],
                )
                conn.execute(Q["insert_event"], (WORKFLOW_UPDATED, None, orjson.dumps(data), ts))
                return self._workflow(conn, workflow_id, steps=True)

        return await self._run(_do)

    async def add_steps(
        self,
        workflow_id: str,
        job_id: str,
        lease_token: str,
        steps: Sequence[tuple[str, NewJob]],
        now: datetime,
    ) -> list[Job]:
        validate_steps(steps)
        rows = [_job_params(new, now) for _, new in steps]
        ts = now.timestamp()

        def _do() -> list[Job]:
            with self._tx() as conn:
                caller = conn.execute(Q["get_job"], (job_id,)).fetchone()
                row = conn.execute(W["get_workflow"], (workflow_id,)).fetchone()
                check_can_add(
                    workflow_id,
                    job_id,
                    lease_token,
                    None
                    if caller is None
                    else (caller["state"], caller["lease_token"], caller["workflow_id"]),
                    row,
                )
                existing = self._step_details(conn, workflow_id, results=False)
                fresh, already = split_added(steps, existing)
                check_dag(
                    [
                        StepSpec(n, new.job_type, depends_on=tuple(new.depends_on))
                        for n, new in fresh
                    ],
                    existing={d.name: d.depends_on for d in existing},
                    allow_empty=True,
                )
                known = {
                    d.name: (d.job_id, "running" if d.status == "cancelling" else d.status)
                    for d in existing
                }
                fresh_rows = [r for (n, _), r in zip(steps, rows, strict=True) if n not in already]
                jobs = {
                    j.step_name: j
                    for j in self._insert_steps(conn, workflow_id, fresh, fresh_rows, known, ts)
                }
                if fresh:
                    conn.execute(
                        W["add_total_steps"], {"id": workflow_id, "n": len(fresh), "now": ts}
                    )
                for name, held in already.items():
                    jobs[name] = job_from_row(conn.execute(Q["get_job"], (held,)).fetchone())
                return [jobs[n] for n, _ in steps]

        return await self._run(_do)

    async def parent_results(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        ids = orjson.dumps(list(job_ids)).decode()

        def _do() -> dict[str, dict[str, Any]]:
            assert self._conn is not None
            out: dict[str, dict[str, Any]] = {}
            for r in self._conn.execute(W["parent_results"], (ids,)):
                result = r["result"]
                out.setdefault(r["child_id"], {})[r["step_name"] or r["parent_id"]] = (
                    None if result is None else orjson.loads(result)
                )
            return out

        return await self._run(_do)

    # -- distributed locks -------------------------------------------------------------
    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None:
        params = {"key": key, "owner": owner, "now": now.timestamp(), "expires": _expiry(now, ttl)}

        def _do() -> int | None:
            with self._tx() as conn:
                row = conn.execute(LQ["acquire_lock"], params).fetchone()
                return None if row is None else int(row[0])

        return await self._run(_do)

    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool:
        params = {
            "key": key,
            "owner": owner,
            "token": token,
            "now": now.timestamp(),
            "expires": _expiry(now, ttl),
        }

        def _do() -> bool:
            with self._tx() as conn:
                return conn.execute(LQ["extend_lock"], params).rowcount == 1

        return await self._run(_do)

    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool:
        params = {"key": key, "owner": owner, "token": token, "now": now.timestamp()}

        def _do() -> bool:
            with self._tx() as conn:
                row = conn.execute(LQ["release_lock"], params).fetchone()
                return row is not None and bool(row[0])

        return await self._run(_do)

    async def check_lock(self, key: str, token: int, now: datetime) -> bool:
        params = {"key": key, "token": token, "now": now.timestamp()}

        def _do() -> bool:
            assert self._conn is not None
            return self._conn.execute(LQ["check_lock"], params).fetchone() is not None

        return await self._run(_do)

    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]:
        check_limit(limit)
        params = {"all": include_free, "now": now.timestamp(), "limit": limit}

        def _do() -> list[LockInfo]:
            assert self._conn is not None
            return [
                lock_from_row(r, _dt, now) for r in self._conn.execute(LQ["list_locks"], params)
            ]

        return await self._run(_do)

    # -- durable steps and checkpoints ------------------------------------------------
    async def save_step(
        self, job_id: str, lease_token: str, name: str, result: Any, now: datetime
    ) -> bool:
        params = {
            "id": job_id,
            "token": lease_token,
            "name": name,
            "result": dumps(result, "result"),
            "now": now.timestamp(),
        }

        def _do() -> bool:
            with self._tx() as conn:
                if conn.execute(Q["holds_lease"], params).fetchone() is None:
                    return False
                conn.execute(Q["save_step"], params)
                return True

        return await self._run(_do)

    async def job_steps(self, job_id: str) -> dict[str, Any]:
        def _do() -> dict[str, Any]:
            assert self._conn is not None
            return {r[0]: orjson.loads(r[1]) for r in self._conn.execute(Q["job_steps"], (job_id,))}

        return await self._run(_do)

    async def save_checkpoint(
        self, job_id: str, lease_token: str, state: Any, now: datetime
    ) -> bool:
        params = {"id": job_id, "token": lease_token, "state": dumps(state, "checkpoint")}

        def _do() -> bool:
            with self._tx() as conn:
                return conn.execute(Q["save_checkpoint"], params).rowcount == 1

        return await self._run(_do)

    # -- metrics ----------------------------------------------------------------------
    async def queue_stats(self, now: datetime) -> list[QueueStat]:
        def _do() -> list[QueueStat]:
            assert self._conn is not None
            rows = self._conn.execute(MQ["queue_stats"], {"now": now.timestamp()})
            return [QueueStat(q, JobState(s), n, _dt(oldest)) for q, s, n, oldest in rows]

        return await self._run(_do)

    # -- dashboard reads (storage/sql/sqlite/dashboard.sql) --------------------------------
    async def state_counts(self, cap: int) -> dict[JobState, Count]:
        def _do() -> dict[JobState, Count]:
            assert self._conn is not None
            out = {}
            for s in JobState:
                n = self._conn.execute(DQ["state_count_capped"], (s.value, cap)).fetchone()[0]
                out[s] = Count(n, exact=n < cap)
            return out

        return await self._run(_do)

    async def queue_depths(
        self, states: Sequence[JobState], cap: int
    ) -> tuple[dict[tuple[str, JobState], int], bool]:
        def _do() -> tuple[dict[tuple[str, JobState], int], bool]:
            assert self._conn is not None
            out: dict[tuple[str, JobState], int] = {}
            complete = True
            for state in states:
                rows = self._conn.execute(DQ["queue_depths_state"], (state.value, cap))
                seen = 0
                for queue, n in rows:
                    out[(queue, state)] = n
                    seen += n
                complete = complete and seen < cap
            return out, complete

        return await self._run(_do)

    async def browse_jobs(
        self, query: JobQuery, before: Cursor | None, id_prefix: str | None = None
    ) -> list[Job]:
        query.validate()
        key = None if before is None else (_ts(before.created_at), before.job_id)
        sql, args = browse_sql("jobs", query, key, numbered=False, id_prefix=id_prefix)

        def _do() -> list[Job]:
            assert self._conn is not None
            return [job_from_row(r) for r in self._conn.execute(sql, args)]

        return await self._run(_do)

    async def job_events(
        self, job_id: str, since: datetime, until: datetime, limit: int
    ) -> list[Event]:
        check_limit(limit)
        params = (since.timestamp(), until.timestamp(), job_id, limit)

        def _do() -> list[Event]:
            assert self._conn is not None
            return [
                Event(r[0], r[1], r[2], orjson.loads(r[3]), _dt(r[4]))  # type: ignore[arg-type]
                for r in self._conn.execute(DQ["job_events"], params)
            ]

        return await self._run(_do)

    async def job_children(self, job_id: str, limit: int) -> list[str]:
        check_limit(limit)

        def _do() -> list[str]:
            assert self._conn is not None
            return [r[0] for r in self._conn.execute(DQ["job_children"], (job_id, limit))]

        return await self._run(_do)

    async def recent_stats(
        self, since: datetime, sample: int, *, buckets_since: datetime | None = None
    ) -> RecentStats:
        ts = since.timestamp()
        edge = ts if buckets_since is None else max(ts, buckets_since.timestamp())

        def _do() -> RecentStats:
            assert self._conn is not None
            buckets: dict[float, MinuteBucket] = {}

            def bucket(minute: float) -> MinuteBucket:
                return buckets.setdefault(minute, MinuteBucket(_dt(minute)))  # type: ignore[arg-type]

            for minute, state, n in self._conn.execute(DQ["finished_per_minute"], (edge,)):
                if state == "completed":
                    bucket(minute).completed += n
                elif state == "failed":
                    bucket(minute).failed += n
            for minute, n in self._conn.execute(DQ["submitted_per_minute"], (edge,)):
                bucket(minute).submitted += n
            waits = [r[0] for r in self._conn.execute(DQ["recent_waits"], (ts, sample))]
            oldest = self._conn.execute(DQ["oldest_pending"]).fetchone()
            return RecentStats(
                [buckets[k] for k in sorted(buckets)],
                percentile(waits, 0.95),
                None if oldest is None else _dt(oldest[0]),
            )

        return await self._run(_do)

    # -- flow control ---------------------------------------------------------------
    def _fetch_limited(
        self,
        conn: sqlite3.Connection,
        params: dict[str, Any],
        limited_rows: list[sqlite3.Row],
        queue_limits: list[sqlite3.Row],
    ) -> list[sqlite3.Row]:
        """The limited fetch (storage/flow.py) inside the fetch transaction."""
        limit = params["limit"]
        now = params["now"]
        limits = [TypeLimit(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in limited_rows]
        params["limited"] = orjson.dumps([t.job_type for t in limits if not t.templated]).decode()
        params["keyed"] = orjson.dumps([t.job_type for t in limits if t.templated]).decode()
        names = {t.job_type for t in limits}
        candidates: list[Candidate] = []
        walked = list(limits)
        if params["any_type"]:
            candidates.extend(
                Candidate(1, r[1], 0, r[2], r[0], r[3], r[4], NO_KEY)
                for r in conn.execute(FQ["open_candidates"], params)
            )
        else:
            # Types without limits are walked like limited ones (no room to count):
            # index ranges per type and key, never a scan past a limited backlog.
            walked.extend(
                TypeLimit(t, None, None, None, NO_KEY)
                for t in sorted(set(orjson.loads(params["types"])) - names)
            )
        for tl in limits:
            if tl.templated:  # its keyless jobs are not limited
                rows = conn.execute(
                    FQ["keyless_candidates"], {**params, "job_type": tl.job_type, "n": limit}
                ).fetchall()
                candidates.extend(
                    Candidate(1, r[1], 0, r[2], r[0], r[3], tl.job_type, NO_KEY) for r in rows
                )
        for tl in walked:
            limited = tl.concurrency_limit is not None or tl.rate_limit is not None
            counted = tl.concurrency_limit is not None
            running = (
                dict(conn.execute(FQ["running_by_key"], (tl.job_type,)).fetchall())
                if counted
                else {}
            )
            ws = window_start(tl, now)

            def after(k: str, t: str = tl.job_type) -> list[str]:
                rows = conn.execute(FQ["keys_after"], {"job_type": t, "key": k, "m": 128})
                return [r[0] for r in rows]

            gave = 0
            for walk, key in enumerate(walk_keys(after, tl.cursor, not tl.templated), start=1):
                started = 0
                if ws is not None:
                    row = conn.execute(FQ["window_started"], (tl.job_type, key, ws)).fetchone()
                    started = 0 if row is None else row[0]
                room = min(allowed(tl, running.get(key, 0), started), limit)
                if room <= 0:
                    continue
                query = FQ["keyless_candidates"] if key == NO_KEY else FQ["key_candidates"]
                rows = conn.execute(
                    query, {**params, "job_type": tl.job_type, "key": key, "n": room}
                ).fetchall()
                if not limited:  # priority and FIFO alone order a type without limits
                    candidates.extend(
                        Candidate(1, r[1], 0, r[2], r[0], r[3], tl.job_type, NO_KEY) for r in rows
                    )
                    gave += len(rows)
                else:
                    candidates.extend(
                        Candidate(rank, r[1], walk, r[2], r[0], r[3], tl.job_type, key)
                        for rank, r in enumerate(rows, start=1)
                    )
                    gave += 1 if rows else 0
                if gave >= limit:
                    break
        room_q: dict[str, int] = {}
        if queue_limits:
            running_q = dict(conn.execute(FQ["running_by_queue"]).fetchall())
            room_q = {q: n - running_q.get(q, 0) for q, n in queue_limits}
        chosen, cursors = choose(candidates, limit, room_q)
        if not chosen:
            return []
        seqs = orjson.dumps([c.seq for c in chosen]).decode()
        rows = conn.execute(FQ["lease_chosen"], {**params, "seqs": seqs}).fetchall()
        by_type = {tl.job_type: tl for tl in limits}
        started_now: dict[tuple[str, str], int] = {}
        for c in chosen:
            rated = by_type.get(c.job_type)
            if rated is not None and rated.rate_limit is not None:
                started_now[(c.job_type, c.key)] = started_now.get((c.job_type, c.key), 0) + 1
        for (t, key), n in started_now.items():
            ws = window_start(by_type[t], now)
            conn.execute(FQ["count_start"], {"job_type": t, "key": key, "window_start": ws, "n": n})
        conn.executemany(FQ["move_cursor"], [(k, t) for t, k in cursors.items()])
        return rows

    async def record_flow_limits(self, limits: Sequence[FlowLimits], now: datetime) -> None:
        ts = now.timestamp()
        upserts = [
            (
                lim.job_type,
                lim.concurrency_key.text if lim.concurrency_key else None,
                lim.concurrency_limit,
                lim.rate_limit.limit if lim.rate_limit else None,
                lim.rate_limit.window if lim.rate_limit else None,
                orjson.dumps(dict(lim.requires)).decode() if lim.requires else None,
                ts,
            )
            for lim in limits
            if not lim.empty
        ]
        deletes = [(lim.job_type,) for lim in limits if lim.empty]

        def _do() -> None:
            with self._tx() as conn:
                conn.executemany(FQ["upsert_flow_limits"], upserts)
                conn.executemany(FQ["delete_flow_limits"], deletes)

        await self._run(_do)

    async def list_flow_limits(self) -> list[FlowLimits]:
        def _do() -> list[FlowLimits]:
            assert self._conn is not None
            return [limits_from_row(r, _dt) for r in self._conn.execute(FQ["list_flow_limits"])]

        return await self._run(_do)

    async def set_queue(
        self,
        queue: str,
        now: datetime,
        *,
        paused: bool | None = None,
        concurrency_limit: int | None = KEEP_LIMIT,
    ) -> QueueInfo:
        check_queue_change(queue, paused, concurrency_limit)

        def _do() -> None:
            with self._tx() as conn:
                row = conn.execute(FQ["get_queue_settings"], (queue,)).fetchone()
                old_paused = bool(row["paused"]) if row is not None else False
                old_limit = row["concurrency_limit"] if row is not None else None
                conn.execute(
                    FQ["upsert_queue_settings"],
                    (
                        queue,
                        old_paused if paused is None else paused,
                        old_limit if concurrency_limit == KEEP_LIMIT else concurrency_limit,
                        now.timestamp(),
                    ),
                )

        await self._run(_do)
        return next(q for q in await self.list_queues() if q.name == queue)

    async def list_queues(self) -> list[QueueInfo]:
        def _do() -> list[QueueInfo]:
            assert self._conn is not None
            settings = {
                r["queue"]: QueueInfo(
                    r["queue"],
                    bool(r["paused"]),
                    r["concurrency_limit"],
                    updated_at=_dt(r["updated_at"]),
                )
                for r in self._conn.execute(FQ["list_queue_settings"])
            }
            counts: dict[str, dict[str, int]] = {}
            for q, state, n in self._conn.execute(FQ["queue_counts"]):
                counts.setdefault(q, {})[state] = n
            return [
                replace(
                    settings.get(name, QueueInfo(name)),
                    pending=counts.get(name, {}).get("pending", 0),
                    running=counts.get(name, {}).get("running", 0),
                )
                for name in sorted(set(settings) | set(counts))
            ]

        return await self._run(_do)

    async def prune_flow_windows(self, now: datetime) -> int:
        def _do() -> int:
            assert self._conn is not None
            with self._conn:
                cur = self._conn.execute(
                    FQ["prune_flow_windows"], (now.timestamp(), float(MAX_RATE_WINDOW_SECONDS))
                )
            return cur.rowcount

        return await self._run(_do)

    async def queue_settings(self) -> list[QueueInfo]:
        def _do() -> list[QueueInfo]:
            assert self._conn is not None
            return [
                QueueInfo(
                    r["queue"],
                    bool(r["paused"]),
                    r["concurrency_limit"],
                    updated_at=_dt(r["updated_at"]),
                )
                for r in self._conn.execute(FQ["list_queue_settings"])
            ]

        return await self._run(_do)

    async def flow_stats(self, now: datetime) -> FlowStats:
        ts = now.timestamp()

        def _do() -> tuple[dict[FlowRow, int], dict[tuple[str, str], tuple[float, int]]]:
            assert self._conn is not None
            rows = {
                FlowRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5]): r[6]
                for r in self._conn.execute(FQ["flow_rows"], {"now": ts})
            }
            windows = {(r[0], r[1]): (r[2], r[3]) for r in self._conn.execute(FQ["flow_windows"])}
            return rows, windows

        rows, windows = await self._run(_do)
        return flow_stats(
            rows, await self.list_flow_limits(), await self.list_queues(), windows, ts
        )

    async def workflow_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        params = (prefix, prefix_upper_bound(prefix), limit)

        def _do() -> list[str]:
            assert self._conn is not None
            return [r[0] for r in self._conn.execute(W["workflow_ids_with_prefix"], params)]

        return await self._run(_do)


def _key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        scope=Scope(row["scope"]),
        key_hash=row["key_hash"],
        prefix=row["prefix"],
        created_at=_dt(row["created_at"]),  # type: ignore[arg-type]
        revoked_at=_dt(row["revoked_at"]),
        expires_at=_dt(row["expires_at"]),
        last_used_at=_dt(row["last_used_at"]),
    )


def _job_params(new: NewJob, now: datetime) -> dict[str, Any]:
    ts = now.timestamp()
    return {
        "id": new_job_id(),
        "queue": new.queue,
        "job_type": new.job_type,
        "state": "pending",
        "priority": new.priority,
        "payload": dumps_object(new.payload),
        "error": None,
        "max_retries": new.max_retries,
        "timeout_ms": new.timeout_ms,
        "run_at": ts if new.run_at is None else new.run_at.timestamp(),
        "idempotency_key": new.idempotency_key,
        "workflow_id": new.workflow_id,
        "created_by": new.created_by,
        "metadata": dumps_object(new.metadata, "metadata"),
        "created_at": ts,
        "completed_at": None,
        "concurrency_key": new.concurrency_key or NO_KEY,
        "requires": orjson.dumps(dict(sorted(new.requires.items()))).decode()
        if new.requires
        else None,
    }


def _job_from_params(row: dict[str, Any], new: NewJob, now: datetime) -> Job:
    return Job(
        id=row["id"],
        job_type=new.job_type,
        state=JobState(row["state"]),
        payload=dict(new.payload),
        queue=new.queue,
        priority=new.priority,
        max_retries=new.max_retries,
        timeout_ms=new.timeout_ms,
        run_at=new.run_at or now,
        error=row["error"],
        idempotency_key=new.idempotency_key,
        workflow_id=new.workflow_id,
        created_by=new.created_by,
        metadata=dict(new.metadata),
        created_at=now,
        completed_at=None if row["completed_at"] is None else now,
        updated_at=now,
        depends_on=list(dict.fromkeys(new.depends_on)),
        concurrency_key=new.concurrency_key or None,
        requires=dict(sorted(new.requires.items())) if new.requires else None,
    )


def _split_statements(script: str) -> list[str]:
    """Split a migration into statements (``sqlite3.complete_statement`` aware)."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        if not buf and line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        statements.append(buf.strip())
    return statements


def _webhook_params(w: Webhook) -> tuple[Any, ...]:
    return (
        w.id,
        w.url,
        orjson.dumps(list(w.event_types)).decode(),
        w.secret,
        w.state.value,
        w.created_at.timestamp(),
        w.secret_ref,
    )


def _expiry(now: datetime, ttl: float) -> float:
    return now.timestamp() + ttl
