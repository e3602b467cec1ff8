"""``conveyor queues list|pause|resume|limit`` (docs/flow_control.md).

The commands take the CLI's helpers from ``conveyor.cli.main`` when they run:
that module adds this group to ``conveyor`` at import time."""

from __future__ import annotations

from typing import Any

import click

from conveyor.auditing import audited
from conveyor.presenters import queue_dict
from conveyor.storage.flow import KEEP_LIMIT


def _cli() -> Any:
    from conveyor.cli import main

    return main


@click.group()
def queues() -> None:
    """List queues, pause and resume them, set their concurrency limit."""


@queues.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def queues_list(obj: Any, as_json: bool) -> None:
    """Queues with jobs or settings: paused, concurrency limit, pending, running."""
    m = _cli()
    found = m.run(lambda a: a.store.list_queues(), obj.app())
    if as_json:
        m.emit_json([queue_dict(q) for q in found])
        return
    table = m._table("Queues", ("queue", "paused", "limit", "pending", "running"))
    for q in found:
        m._add_row(
            table,
            q.name,
            "PAUSED" if q.paused else "no",
            "-" if q.concurrency_limit is None else str(q.concurrency_limit),
            str(q.pending),
            str(q.running),
        )
    m.out.print(table)


@queues.command("pause")
@click.argument("name")
@click.pass_obj
def queues_pause(obj: Any, name: str) -> None:
    """Stop every worker fetching NAME's jobs (at once); running jobs finish."""
    m = _cli()
    q = m.run(
        lambda a: audited(
            a, "queue.pause", "queue", name, lambda: a.store.set_queue(name, a.now(), paused=True)
        ),
        obj.app(),
    )
    text = f"Queue {q.name} paused ({q.pending} pending, {q.running} running)"
    m.out.print(text, highlight=False)


@queues.command("resume")
@click.argument("name")
@click.pass_obj
def queues_resume(obj: Any, name: str) -> None:
    """Let workers fetch NAME's jobs again."""
    m = _cli()
    q = m.run(
        lambda a: audited(
            a, "queue.resume", "queue", name, lambda: a.store.set_queue(name, a.now(), paused=False)
        ),
        obj.app(),
    )
    m.out.print(f"Queue {q.name} resumed ({q.pending} pending)", highlight=False)


@queues.command("limit")
@click.argument("name")
@click.argument("concurrency", required=False, type=int)
@click.option("--clear", is_flag=True, help="Remove the queue's concurrency limit.")
@click.pass_obj
def queues_limit(obj: Any, name: str, concurrency: int | None, clear: bool) -> None:
    """Set the most of NAME's jobs running at once across all workers (or --clear)."""
    if (concurrency is None) == (not clear):
        raise click.UsageError("Give a CONCURRENCY (>= 1) or --clear")
    limit = None if clear else concurrency
    if limit == KEEP_LIMIT:
        limit = 0  # refused by the store's validation like any value below 1
    m = _cli()
    q = m.run(
        lambda a: audited(
            a,
            "queue.change",
            "queue",
            name,
            lambda: a.store.set_queue(name, a.now(), concurrency_limit=limit),
            {"concurrency_limit": limit},
        ),
        obj.app(),
    )
    shown = "none" if q.concurrency_limit is None else str(q.concurrency_limit)
    m.out.print(f"Queue {q.name}: concurrency limit {shown}", highlight=False)
