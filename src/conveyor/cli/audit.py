"""``conveyor audit list|verify|export|anchor`` (docs/security.md, "Audit log").

``verify`` exits 0 with ``chain intact: N entries, last anchor ...`` or 1
naming the first broken entry and why; ``export`` writes every entry as JSON
lines (the ``GET /api/audit`` entry shape), ``--output`` to a file.
The commands take the CLI's helpers from ``conveyor.cli.main`` when they run:
that module adds this group to ``conveyor`` at import time.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import click
import orjson

from conveyor.app import Conveyor
from conveyor.domain.audit import MAX_LIST_LIMIT, AuditQuery, Verdict


def _cli() -> Any:
    from conveyor.cli import main

    return main


@click.group()
def audit() -> None:
    """Read, verify, export and anchor the hash-chained audit log."""


@audit.command("list")
@click.option("--resource-id", default=None, help="Only entries about this resource.")
@click.option("--actor", default=None, help="Only this actor (API key name, cli:<user>, system).")
@click.option("--action", default=None, help="Only this action, e.g. job.cancel.")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Entries after this seq.")
@click.option("--limit", type=click.IntRange(1, MAX_LIST_LIMIT), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def audit_list(
    obj: Any,
    resource_id: str | None,
    actor: str | None,
    action: str | None,
    after: int,
    limit: int,
    as_json: bool,
) -> None:
    """List entries in seq order (the chain of custody of --resource-id)."""
    m = _cli()
    query = AuditQuery(resource_id, actor, action, after, limit)
    query.check()  # one validation: a bad filter is a usage error, nothing read
    rows = m.run(lambda a: a.audit.list(query), obj.app())
    if as_json:
        m.emit_json([e.to_dict() for e in rows])
        return
    table = m._table("Audit log", ("seq", "at", "actor", "action", "resource", "summary"))
    for e in rows:
        m._add_row(
            table,
            str(e.seq),
            e.at,
            e.actor,
            e.action,
            f"{e.resource_type}:{e.resource_id}",
            orjson.dumps(dict(e.summary)).decode()[:80],
        )
    m.out.print(table)


def _report(verdict: Verdict) -> None:
    m = _cli()
    for warning in verdict.warnings:
        m.err.print(f"[yellow]warning:[/] {m._plain(warning)}", highlight=False)
    if verdict.broken is not None:
        m.err.print(
            f"[bold red]chain broken at entry {verdict.broken.seq}:[/] "
            f"{m._plain(verdict.broken.reason)}",
            highlight=False,
        )
        sys.exit(1)
    anchor = verdict.last_anchor
    last = (
        "none"
        if anchor is None
        else f"seq {anchor.seq} at {anchor.at} ({'signed' if anchor.mac else 'UNSIGNED'})"
    )
    m.out.print(f"chain intact: {verdict.count} entries, last anchor {last}", highlight=False)


@audit.command("verify")
@click.option(
    "--no-anchor", is_flag=True, help="Only check; do not record an anchor at the head after."
)
@click.option(
    "--allow-unsigned",
    is_flag=True,
    help="Accept unsigned anchors (made before a master key was set); with a master "
    "key they otherwise break the chain.",
)
@click.pass_obj
def audit_verify(obj: Any, no_anchor: bool, allow_unsigned: bool) -> None:
    """Walk the whole chain and its anchors; exit 1 naming the first broken entry.
    A chain intact without warnings gets a new signed anchor at its head (unless
    --no-anchor)."""
    m = _cli()

    async def go(app: Conveyor) -> Verdict:
        verdict = await app.audit.verify(allow_unsigned=allow_unsigned)
        # Never anchor what could not be fully checked: a new signed anchor over a
        # chain whose old anchors were not verified would launder a rewrite.
        unchecked = any(w.startswith("no anchor key available") for w in verdict.warnings)
        if verdict.ok and not unchecked and not no_anchor and verdict.count:
            head = (await app.audit.list(AuditQuery(after=verdict.last_seq - 1, limit=1)))[0]
            anchor = await app.audit.anchor(head)
            if anchor is not None:
                verdict = dataclasses.replace(verdict, last_anchor=anchor)
        return verdict

    _report(m.run(go, obj.app()))


@audit.command("anchor")
@click.pass_obj
def audit_anchor(obj: Any) -> None:
    """Record a signed anchor at the newest entry (HMAC key from the vault)."""
    m = _cli()
    anchor = m.run(lambda a: a.audit.anchor(), obj.app())
    if anchor is None:
        m.out.print(
            "Nothing anchored: the audit log is empty, or its anchors are signed and "
            "this process has no master key (CONVEYOR_MASTER_KEY)"
        )
        return
    if anchor.mac is None:
        m.err.print(
            "[yellow]warning:[/] no master key (CONVEYOR_MASTER_KEY): the anchor is unsigned",
            highlight=False,
        )
    m.out.print(f"anchored seq {anchor.seq} ({anchor.hash[:16]}...)", highlight=False)


@audit.command("export")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to this file (default: stdout).",
)
@click.option("--after", type=click.IntRange(min=0), default=0, help="Entries after this seq.")
@click.pass_obj
def audit_export(obj: Any, output: str | None, after: int) -> None:
    """Every entry as JSON lines, in seq order (the shape of GET /api/audit)."""
    m = _cli()

    async def go(app: Conveyor) -> int:
        count = 0
        sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: ASYNC230, SIM115
        try:
            async for entry in app.audit.entries(after):
                sink.write(orjson.dumps(entry.to_dict()) + b"\n")
                count += 1
        finally:
            if output:
                sink.close()
            else:
                sink.flush()
        return count

    n = m.run(go, obj.app())
    if output:
        m.err.print(f"Exported {n} entries to {m._plain(output)}", highlight=False)
