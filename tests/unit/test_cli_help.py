"""What ``conveyor --help`` and ``conveyor up`` tell a newcomer, checked in process."""

from __future__ import annotations

from click.testing import CliRunner

from conveyor.cli.main import cli
from conveyor.cli.serve import what_a_forced_stop_does


def test_the_database_url_help_names_every_backend() -> None:
    result = CliRunner().invoke(cli, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    assert "--database-url" in help_text
    assert "postgresql://user:pass@host:5432/db (needs the postgres extra)" in help_text
    assert "sqlite:///./conveyor.db (default)" in help_text
    assert "memory://" in help_text


def test_a_forced_stop_never_promises_to_hand_back_running_code() -> None:
    text = what_a_forced_stop_does(15.0)
    assert "code that keeps running is not handed back" in text
    assert "after the heartbeat timeout (15 s)" in text
    assert "as a new attempt" in text
