"""Tables that fit the terminal: short forms first, then the least important
columns go, free text is cut to the room left; the id is never touched."""

from __future__ import annotations

import io

from rich.console import Console

from conveyor.cli.layout import MIN_FREE_TEXT, Column, fit_columns, fitted_table

ID = "01a2304a8e9681a1c6aa9fd9b5cd3c14"


def columns() -> list[Column]:
    return [
        Column("id", [ID]),
        Column("status", ["cancelled"]),
        Column("queue", ["default"], drop=3),
        Column("prio", ["50"], drop=2),
        Column("created", ["2026-12-01 06:28:42"], short=["12-01 06:28"]),
        Column("error", ["RuntimeError: " + "x" * 50], drop=1, free_text=True),
    ]


def render(width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(fitted_table("Jobs", columns(), width))
    return console.export_text().splitlines()


def test_a_wide_terminal_keeps_every_column_in_its_long_form() -> None:
    kept, short = fit_columns(columns(), 200)
    assert [c.header for c in kept] == ["id", "status", "queue", "prio", "created", "error"]
    assert short is False


def test_narrower_terminals_shorten_then_drop_the_highest_drop_first() -> None:
    kept, short = fit_columns(columns(), 100)
    assert short is True  # the short date makes it fit
    assert [c.header for c in kept] == ["id", "status", "queue", "prio", "created", "error"]
    kept, _ = fit_columns(columns(), 90)
    assert [c.header for c in kept] == ["id", "status", "prio", "created", "error"]
    kept, _ = fit_columns(columns(), 80)
    assert [c.header for c in kept] == ["id", "status", "created", "error"]
    kept, _ = fit_columns(columns(), 60)  # columns with drop=0 always stay
    assert [c.header for c in kept] == ["id", "status", "created"]


def test_rows_stay_on_one_line_and_the_id_whole() -> None:
    for width in (70, 80, 100, 120):
        lines = render(width)
        body = [line for line in lines if line.startswith("│")]
        assert len(body) == 1, (width, lines)
        assert ID in body[0]
        assert "cancelled" in body[0]
        assert max(len(line) for line in lines) <= width
    # Narrower than the kept columns: the others fold, the id still does not.
    assert any(ID in line for line in render(40))


def test_free_text_is_cut_with_an_ellipsis_to_the_room_left() -> None:
    (row,) = [line for line in render(80) if line.startswith("│")]
    assert "RuntimeError" in row
    assert "…" in row
    assert len(row) <= 80
    assert MIN_FREE_TEXT >= 10


def test_control_characters_from_users_print_as_visible_escapes() -> None:
    import io

    from rich.console import Console

    from conveyor.cli.layout import printable
    from conveyor.cli.main import _add_row, _table

    hostile = "key\x1b]0;pwned\x07\x1b[2J\r\x9b31m"
    assert printable(hostile) == "key\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m"
    assert printable("line\n\ttab") == "line\n\ttab"
    table = _table("t", ("id", "error"))
    _add_row(table, "abc", hostile)
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False).print(table)
    shown = buf.getvalue()
    for control in ("\x1b", "\x07", "\x9b"):
        assert control not in shown
    assert "\\x1b]0;pwned" in shown
