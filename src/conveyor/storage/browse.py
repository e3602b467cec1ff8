"""The dashboard's job list as SQL: only the filters asked for (so each query
plans onto an index), newest first by (created_at, id), keyset-paged."""

from __future__ import annotations

from typing import Any

from conveyor.domain.job import JobQuery
from conveyor.storage.base import prefix_upper_bound

PREFIX_CANDIDATES = 1000  #: an id-prefix search looks at this many newest matching ids


def browse_sql(
    table: str,
    query: JobQuery,
    before: tuple[Any, str] | None,
    *,
    numbered: bool,
    id_prefix: str | None = None,
) -> tuple[str, list[Any]]:
    """``SELECT *`` for ``query``'s filters after the ``before`` (created_at, id)
    key, of ids starting with ``id_prefix`` (lowercase hex); ``numbered``: ``$1``
    placeholders and byte-order id ranges (PostgreSQL), else ``?`` (SQLite)."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}" if numbered else "?"

    where: list[str] = []
    if id_prefix:
        # Candidates from the primary key first (the newest PREFIX_CANDIDATES ids
        # with the prefix): left to itself, the planner may walk the created_at
        # index through every job looking for a page of rare matches.
        # Plain comparisons (no COLLATE) so the primary key's own collation
        # serves the range; the exact prefix test keeps any collation honest.
        low, high = arg(id_prefix), arg(prefix_upper_bound(id_prefix))
        exact = f"substr(id, 1, {len(id_prefix)}) = {arg(id_prefix)}"
        where.append(
            f"id IN (SELECT id FROM {table} WHERE id >= {low} AND id < {high} AND {exact}"
            f" ORDER BY id DESC LIMIT {PREFIX_CANDIDATES})"
        )
    if query.states:
        where.append(f"state IN ({', '.join(arg(s.value) for s in query.states)})")
    if query.job_type is not None:
        where.append(f"job_type = {arg(query.job_type)}")
    if query.queue is not None:
        where.append(f"queue = {arg(query.queue)}")
    if query.created_by is not None:
        where.append(f"created_by = {arg(query.created_by)}")
    if not query.include_internal:
        where.append("job_type NOT LIKE 'conveyor.%'")
    if before is not None:
        at, job_id = before
        # The bare upper bound lets the created_at index serve the range; the
        # OR breaks ties between jobs created in the same instant.
        first, second = arg(at), arg(at)
        where.append(f"created_at <= {first} AND (created_at < {second} OR id < {arg(job_id)})")
    sql = f"SELECT * FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY created_at DESC, id DESC LIMIT {arg(query.limit)}"
    return sql, args
