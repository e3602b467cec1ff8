"""Workflow definitions from files and data: one validation, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.domain.errors import ConfigurationError, ValidationError
from conveyor.domain.workflow import StepSpec, check_dag, name_error, settled_status
from conveyor.storage.workflows import descendants, retry_states
from conveyor.workflows import load_definition, parse_definition


def test_yaml_and_json_files_give_the_same_definition(tmp_path: Path):
    (tmp_path / "wf.yaml").write_text(
        "name: etl\non_failure: continue\nsteps:\n"
        "  - {name: a, job_type: t, payload: {n: 1}}\n"
        "  - {name: b, job_type: t, depends_on: [a]}\n"
    )
    (tmp_path / "wf.json").write_text(
        '{"name": "etl", "on_failure": "continue", "steps": ['
        '{"name": "a", "job_type": "t", "payload": {"n": 1}},'
        '{"name": "b", "job_type": "t", "depends_on": ["a"]}]}'
    )
    assert load_definition(tmp_path / "wf.yaml") == load_definition(tmp_path / "wf.json")


def test_unreadable_and_malformed_files_are_named(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="Cannot read workflow file"):
        load_definition(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValidationError, match="not valid YAML"):
        load_definition(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_definition(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "body"),
        ({"steps": []}, "name"),
        ({"name": "x", "steps": [{"name": "a"}]}, "steps.0.job_type"),
        ({"name": "x", "steps": [], "on_failure": "explode"}, "on_failure"),
        ({"name": "x", "steps": [], "surprise": 1}, "surprise"),
    ],
)
def test_shape_errors_name_the_field(data, field):
    with pytest.raises(ValidationError) as info:
        parse_definition(data)
    assert field in [d.field for d in info.value.details]


def test_names_refuse_control_characters_and_surrogates():
    assert name_error("ok name") is None
    assert "control" in (name_error("a\nb") or "")
    assert "surrogates" in (name_error("a\udcff") or "")
    assert name_error("x" * 201) is not None


def test_limits_are_checked_before_anything_else():
    specs = [StepSpec(f"s{i}", "t") for i in range(11)]
    with pytest.raises(ValidationError, match="at most 10 steps"):
        check_dag(specs, max_steps=10)


def test_settled_status_and_retry_states():
    assert settled_status({"completed": 2, "running": 1}) is None
    assert settled_status({"completed": 3}).value == "completed"
    assert settled_status({"completed": 1, "cancelled": 1}).value == "cancelled"
    assert settled_status({"failed": 1, "cancelled": 1}).value == "failed"
    assert descendants(["a"], [("b", "a"), ("c", "b"), ("d", "x")]) == {"b", "c"}
    edges = 50_001
    specs = [StepSpec("root", "t")] + [
        StepSpec(f"s{i}", "t", depends_on=("root",) * 1) for i in range(edges)
    ]
    with pytest.raises(ValidationError, match="dependencies in all"):
        check_dag(specs, max_steps=100_000)
    assert retry_states(["b", "c"], [("b", "a"), ("c", "b")]) == {"b": "pending", "c": "blocked"}
