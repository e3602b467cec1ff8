"""``conveyor workflows``: submit a definition file, list, show (the DAG as a tree),
cancel and retry workflows."""

from __future__ import annotations

import math
import sys
from typing import Any

import click
from rich.markup import escape
from rich.tree import Tree

from conveyor.app import Conveyor
from conveyor.cli.layout import workflows_table
from conveyor.cli.loader import apply_app
from conveyor.cli.main import ConveyorGroup, Ctx, cli, emit_json, out, run
from conveyor.presenters import workflow_dict
from conveyor.workflows import load_definition

_STATUS_STYLE = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "cancelling": "yellow",
    "running": "cyan",
    "pending": "white",
    "blocked": "dim",
}


@cli.group(cls=ConveyorGroup)
def workflows() -> None:
    """Submit, list, show, cancel and retry workflows (DAGs of steps)."""


@workflows.command("submit")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--wait", "wait_s", type=float, default=None, help="Wait up to N seconds for the end."
)
@click.option("--app", "apps", multiple=True, help="Module whose handlers validate the payloads.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def workflows_submit(
    obj: Ctx, file: str, wait_s: float | None, apps: tuple[str, ...], as_json: bool
) -> None:
    """Submit the workflow defined in FILE (.json, .yaml or .yml; the shape of
    POST /api/workflows). Each step's payload is checked against its handler's
    signature when the job type is known here: the demo types, and those of --app
    modules. With --wait, the exit status is 0 only if the workflow completed
    (1 failed or cancelled, 2 still running at the deadline)."""
    if wait_s is not None and not (wait_s >= 0 and math.isfinite(wait_s)):
        raise click.BadParameter("must be a number of seconds >= 0", param_hint="--wait")
    definition = load_definition(file)
    app = obj.app()
    for spec in ("conveyor.demo", *apps):
        apply_app(app, spec)

    async def go(app: Conveyor) -> dict[str, Any]:
        wf, duplicate = await app.workflows.submit(definition, created_by="cli")
        summary = {"name": wf.name, "duplicate": duplicate}
        await app.audit.record("workflow.create", "workflow", wf.id, summary)
        done = await app.workflows.get(wf.id, results=False)
        if wait_s is not None:
            try:
                done = await app.workflows.wait(wf.id, timeout=wait_s)
            except TimeoutError:
                done = await app.workflows.get(wf.id, results=False)
        return {**workflow_dict(done), "duplicate": duplicate}

    data = run(go, app)
    if as_json:
        emit_json(data)
    else:
        dup = (
            " (duplicate: the workflow already submitted with this key)"
            if data["duplicate"]
            else ""
        )
        out.print(
            f"{data['id']} {data['status']} {data['total_steps']} steps{dup}", highlight=False
        )
    if wait_s is not None and data["status"] != "completed":
        sys.exit(2 if data["status"] == "running" else 1)


@workflows.command("list")
@click.option("--status", default=None, help="running, completed, failed or cancelled")
@click.option("--name", default=None)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def workflows_list(
    obj: Ctx, status: str | None, name: str | None, limit: int, offset: int, as_json: bool
) -> None:
    """List workflows, newest first."""

    async def go(app: Conveyor) -> dict[str, Any]:
        rows, total = await app.workflows.list(status=status, name=name, limit=limit, offset=offset)
        return {"workflows": [workflow_dict(w) for w in rows], "total": total}

    data = run(go, obj.app())
    if as_json:
        emit_json(data)
        return
    out.print(workflows_table(f"Workflows ({data['total']})", data["workflows"], out.width))


_MAX_DEPTH = 8


def _tree(data: dict[str, Any]) -> Tree:
    """The DAG as a tree: each step under its first parent, its other parents named."""
    steps = data["step_details"]
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in steps:
        children.setdefault(s["depends_on"][0] if s["depends_on"] else None, []).append(s)
    root = Tree(
        f"[bold]{escape(data['name'])}[/] {data['id']} "
        f"[{_STATUS_STYLE.get(data['status'], 'white')}]{data['status']}[/] "
        f"{data['progress']:.0%}"
    )

    # A stack, not recursion: a chain of 10,000 steps overflowed Python's stack.
    # Past _MAX_DEPTH levels a chain goes on flat, each step naming its parent.
    stack: list[tuple[Tree, str | None, int]] = [(root, None, 0)]
    while stack:
        node, parent, depth = stack.pop()
        for s in children.get(parent, []):
            style = _STATUS_STYLE.get(s["status"], "white")
            label = f"{escape(s['name'])} [{style}]{s['status']}[/] ({escape(s['job_type'])}"
            label += f", attempt {s['attempt']})" if s["attempt"] else ")"
            flat = depth >= _MAX_DEPTH
            if len(s["depends_on"]) > 1 or (flat and s["depends_on"]):
                label += " after " + ", ".join(escape(p) for p in s["depends_on"])
            if s["error"]:
                label += f" [red]{escape(s['error'][:120])}[/]"
            child = node.add(label)
            stack.append((node, s["name"], depth) if flat else (child, s["name"], depth + 1))
    return root


@workflows.command("show")
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def workflows_show(obj: Ctx, workflow_id: str, as_json: bool) -> None:
    """Show a workflow: the DAG as a tree with each step's state. WORKFLOW_ID may be
    a unique prefix of at least 6 characters."""

    async def go(app: Conveyor) -> dict[str, Any]:
        wf_id = await app.workflows.resolve_id(workflow_id)
        return workflow_dict(await app.workflows.get(wf_id, results=as_json))

    data = run(go, obj.app())
    if as_json:
        emit_json(data)
        return
    out.print(_tree(data))


@workflows.command("cancel")
@click.argument("workflow_id")
@click.pass_obj
def workflows_cancel(obj: Ctx, workflow_id: str) -> None:
    """Cancel every unfinished step of a workflow (WORKFLOW_ID or a unique prefix of
    at least 6 characters)."""

    async def go(app: Conveyor) -> dict[str, Any]:
        wid = await app.workflows.resolve_id(workflow_id)
        async with app.audit.change("workflow.cancel", "workflow", wid):
            return workflow_dict(await app.workflows.cancel(wid))

    data = run(go, obj.app())
    out.print(f"{data['id']} {data['status']}", highlight=False)


@workflows.command("retry")
@click.argument("workflow_id")
@click.pass_obj
def workflows_retry(obj: Ctx, workflow_id: str) -> None:
    """Run a finished workflow's failed and cancelled steps again (WORKFLOW_ID or a
    unique prefix of at least 6 characters)."""

    async def go(app: Conveyor) -> dict[str, Any]:
        wid = await app.workflows.resolve_id(workflow_id)
        async with app.audit.change("workflow.retry", "workflow", wid):
            return workflow_dict(await app.workflows.retry(wid))

    data = run(go, obj.app())
    again = [s["name"] for s in data["step_details"] if s["status"] in ("pending", "blocked")]
    out.print(f"{data['id']} {data['status']}: {len(again)} step(s) to run again", highlight=False)
