"""``conveyor queues list|pause|resume|limit`` (docs/flow_control.md)."""

from __future__ import annotations

import click

from conveyor.cli.main import Ctx, _add_row, _table, emit_json, out, run
from conveyor.presenters import queue_dict
from conveyor.storage.flow import KEEP_LIMIT


@click.group()
def queues() -> None:
    """List queues, pause and resume them, set their concurrency limit."""


@queues.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def queues_list(obj: Ctx, as_json: bool) -> None:
    """Queues with jobs or settings: paused, concurrency limit, pending, running."""
    found = run(lambda a: a.store.list_queues(), obj.app())
    if as_json:
        emit_json([queue_dict(q) for q in found])
        return
    table = _table("Queues", ("queue", "paused", "limit", "pending", "running"))
    for q in found:
        _add_row(
            table,
            q.name,
            "PAUSED" if q.paused else "no",
            "-" if q.concurrency_limit is None else str(q.concurrency_limit),
            str(q.pending),
            str(q.running),
        )
    out.print(table)


@queues.command("pause")
@click.argument("name")
@click.pass_obj
def queues_pause(obj: Ctx, name: str) -> None:
    """Stop every worker fetching NAME's jobs (at once); running jobs finish."""
    q = run(lambda a: a.store.set_queue(name, a.now(), paused=True), obj.app())
    out.print(f"Queue {q.name} paused ({q.pending} pending, {q.running} running)", highlight=False)


@queues.command("resume")
@click.argument("name")
@click.pass_obj
def queues_resume(obj: Ctx, name: str) -> None:
    """Let workers fetch NAME's jobs again."""
    q = run(lambda a: a.store.set_queue(name, a.now(), paused=False), obj.app())
    out.print(f"Queue {q.name} resumed ({q.pending} pending)", highlight=False)


@queues.command("limit")
@click.argument("name")
@click.argument("concurrency", required=False, type=int)
@click.option("--clear", is_flag=True, help="Remove the queue's concurrency limit.")
@click.pass_obj
def queues_limit(obj: Ctx, name: str, concurrency: int | None, clear: bool) -> None:
    """Set the most of NAME's jobs running at once across all workers (or --clear)."""
    if (concurrency is None) == (not clear):
        raise click.UsageError("Give a CONCURRENCY (>= 1) or --clear")
    limit = None if clear else concurrency
    if limit == KEEP_LIMIT:
        limit = 0  # refused by the store's validation like any value below 1
    q = run(lambda a: a.store.set_queue(name, a.now(), concurrency_limit=limit), obj.app())
    shown = "none" if q.concurrency_limit is None else str(q.concurrency_limit)
    out.print(f"Queue {q.name}: concurrency limit {shown}", highlight=False)
