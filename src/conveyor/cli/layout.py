"""Tables that fit the terminal: ids whole, every kept column readable.

A table too wide for the terminal used to fold every column but the id into
3-letter fragments (``pen/din/g``). ``fitted_table`` instead shortens what has a
short form (dates), then drops the least important columns, and cuts free text
(an error) with an ellipsis to the room left, so each row stays on one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

#: Control characters a terminal would obey (ESC sequences clear the screen, set
#: the title, fake output...): printed as visible escapes instead. Newline and tab stay.
_CONTROLS = {
    c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)
}


def printable(text: str) -> str:
    """``text`` as a terminal may show it: control characters (ESC, BEL, CR, C1...)
    become ``\\xNN``. Job errors, ids, keys and names come from users and handlers."""
    return text.translate(_CONTROLS)


if TYPE_CHECKING:
    from conveyor.domain.job import Job

#: Fewest cells free text keeps; with less room left it is dropped.
MIN_FREE_TEXT = 12


@dataclass
class Column:
    """One column: its header and cells, and how it gives way on a narrow terminal.

    ``drop``: 0 for a column always shown; otherwise columns with the highest
    ``drop`` go first. ``short``: shorter cells used once the table does not fit.
    ``free_text``: cut with an ellipsis to the room left (kept while at least
    ``MIN_FREE_TEXT`` cells are free).
    """

    header: str
    cells: list[str]
    drop: int = 0
    short: list[str] | None = None
    free_text: bool = False


def short_time(value: datetime | None) -> str:
    """``11-30 14:05``: a listing's date in 11 cells (the year is rarely in doubt)."""
    return value.strftime("%m-%d %H:%M") if value else ""


def long_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _natural(header: str, cells: Sequence[str]) -> int:
    return max([cell_len(header), *(cell_len(c) for c in cells)])


def _needed(columns: Sequence[Column], short: bool) -> int:
    """Cells the table takes: each column's content, 2 of padding, and the borders
    (one between columns and one at each side)."""
    total = 1
    for c in columns:
        cells = c.short if short and c.short is not None else c.cells
        width = _natural(c.header, cells)
        total += (min(width, MIN_FREE_TEXT) if c.free_text else width) + 3
    return total


def fit_columns(columns: Sequence[Column], width: int) -> tuple[list[Column], bool]:
    """The columns to show in ``width`` cells and whether to use short forms."""
    kept = list(columns)
    if _needed(kept, short=False) <= width:
        return kept, False
    for victim in sorted((c for c in columns if c.drop), key=lambda c: -c.drop):
        if _needed(kept, short=True) <= width:
            break
        kept.remove(victim)
    return kept, True


def fitted_table(title: str, columns: Sequence[Column], width: int) -> Table:
    """A rich table of ``columns`` (the first one an id, never cut) for a terminal
    ``width`` cells wide. Cells are plain text (escaped here, never markup)."""
    kept, short = fit_columns(columns, width)
    table = Table(title=title)
    rows: list[list[str]] = []
    fixed = 1 + sum(
        3 + _natural(c.header, c.short if short and c.short is not None else c.cells)
        for c in kept
        if not c.free_text
    )
    for i, c in enumerate(kept):
        cells = c.short if short and c.short is not None else c.cells
        if i == 0:
            table.add_column(c.header, no_wrap=True, overflow="ignore", min_width=len(c.header))
        elif c.free_text:
            room = max(MIN_FREE_TEXT, width - fixed - 3)
            table.add_column(c.header, no_wrap=True, overflow="ellipsis", max_width=room)
        else:
            # Fits as computed; a name longer than the whole terminal still folds.
            table.add_column(c.header, overflow="fold", min_width=_natural(c.header, cells))
        rows.append(cells)
    for row in zip(*rows, strict=True):
        table.add_row(*(escape(printable(cell)) for cell in row))
    return table


# -- the listings ---------------------------------------------------------------------------
def jobs_table(title: str, jobs: Sequence[Job], width: int) -> Table:
    """``conveyor jobs list``: below the full width the date gets short, then queue,
    priority, attempt and the error go, in that order."""
    return fitted_table(
        title,
        [
            Column("id", [j.id for j in jobs]),
            Column("type", [j.job_type for j in jobs]),
            Column("status", [j.status for j in jobs]),
            Column("queue", [j.queue for j in jobs], drop=4),
            Column("prio", [str(j.priority) for j in jobs], drop=3),
            Column("attempt", [str(j.attempt) for j in jobs], drop=2),
            Column(
                "created",
                [long_time(j.created_at) for j in jobs],
                short=[short_time(j.created_at) for j in jobs],
            ),
            Column("error", [(j.error or "")[:60] for j in jobs], drop=1, free_text=True),
        ],
        width,
    )


def dlq_table(title: str, jobs: Sequence[Job], width: int) -> Table:
    """``conveyor dlq list``: lost, then attempts, then the error give way."""
    return fitted_table(
        title,
        [
            Column("id", [j.id for j in jobs]),
            Column("type", [j.job_type for j in jobs]),
            Column("attempts", [str(j.attempt) for j in jobs], drop=2),
            Column("lost", [str(j.lost_count) for j in jobs], drop=3),
            Column(
                "failed at",
                [long_time(j.completed_at) for j in jobs],
                short=[short_time(j.completed_at) for j in jobs],
            ),
            Column("error", [(j.error or "")[:80] for j in jobs], drop=1, free_text=True),
        ],
        width,
    )


def workflows_table(title: str, workflows: Sequence[dict[str, Any]], width: int) -> Table:
    """``conveyor workflows list`` (``workflow_dict`` rows): the date gets short,
    then goes, then the progress."""
    progress = []
    for w in workflows:
        done = w["completed_steps"] + w["failed_steps"] + w["cancelled_steps"]
        progress.append(f"{done}/{w['total_steps']} ({w['progress']:.0%})")
    created = [_parsed(w["created_at"]) for w in workflows]
    return fitted_table(
        title,
        [
            Column("id", [w["id"] for w in workflows]),
            Column("name", [w["name"] for w in workflows]),
            Column("status", [w["status"] for w in workflows]),
            Column("progress", progress, drop=1),
            Column(
                "created",
                [w["created_at"] or "" for w in workflows],
                drop=2,
                short=[short_time(c) for c in created],
            ),
        ],
        width,
    )


def _parsed(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
