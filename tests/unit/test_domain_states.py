"""The job state machine: the transition table and its properties."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.domain.errors import ConveyorError, InvalidTransition
from conveyor.domain.states import (
    ACTIVE_STATES,
    EVENT_FOR_ACTION,
    TERMINAL_STATES,
    TRANSITIONS,
    Action,
    EventType,
    JobState,
    next_state,
    sources,
)

# DESIGN.md §2, written out independently of the module under test.
EXPECTED = {
    ("blocked", "unblock"): "pending",
    ("blocked", "parent_failed"): "cancelled",
    ("blocked", "cancel"): "cancelled",
    ("pending", "fetch"): "running",
    ("pending", "cancel"): "cancelled",
    ("running", "complete"): "completed",
    ("running", "retry"): "pending",
    ("running", "fail"): "failed",
    ("running", "confirm_cancel"): "cancelled",
    ("running", "lost"): "pending",
    ("running", "quarantine"): "failed",
    ("running", "release"): "pending",
    ("failed", "dlq_retry"): "pending",
}
ALL_PAIRS = list(itertools.product(JobState, Action))
DISALLOWED = [(s, a) for s, a in ALL_PAIRS if (s.value, a.value) not in EXPECTED]
ENTRY_STATES = (JobState.PENDING, JobState.BLOCKED)  # what enqueue creates (or cancelled)


def test_table_is_exactly_the_design() -> None:
    assert {(s.value, a.value): t.value for (s, a), t in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(("pair", "target"), list(TRANSITIONS.items()), ids=str)
def test_every_allowed_transition(pair: tuple[JobState, Action], target: JobState) -> None:
    state, action = pair
    assert next_state(state, action) is target
    assert state in sources(action)


@pytest.mark.parametrize(("state", "action"), DISALLOWED, ids=str)
def test_every_disallowed_pair_raises(state: JobState, action: Action) -> None:
    with pytest.raises(InvalidTransition) as info:
        next_state(state, action)
    assert isinstance(info.value, ConveyorError)
    assert (info.value.state, info.value.action) == (state.value, action.value)
    assert str(info.value) == f"Cannot {action.value} a job in {state.value} status"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert state not in sources(action)


def test_sources() -> None:
    assert sources(Action.CANCEL) == {JobState.BLOCKED, JobState.PENDING}
    assert sources(Action.FETCH) == {JobState.PENDING}
    assert sources(Action.DLQ_RETRY) == {JobState.FAILED}
    assert sources(Action.RELEASE) == {JobState.RUNNING}


def test_terminal_and_active_states_partition_the_states() -> None:
    assert set(JobState) == TERMINAL_STATES | ACTIVE_STATES
    assert not TERMINAL_STATES & ACTIVE_STATES
    assert {s for s in JobState if s.is_terminal} == {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
    }


@pytest.mark.parametrize("state", [JobState.COMPLETED, JobState.CANCELLED])
def test_completed_and_cancelled_have_no_exits(state: JobState) -> None:
    assert not [a for (s, a) in TRANSITIONS if s is state]


def test_failed_only_exits_by_dlq_retry_to_pending() -> None:
    assert {a: t for (s, a), t in TRANSITIONS.items() if s is JobState.FAILED} == {
        Action.DLQ_RETRY: JobState.PENDING
    }


def test_nothing_enters_blocked() -> None:
    assert JobState.BLOCKED not in TRANSITIONS.values()


def test_every_state_is_reachable_from_enqueue() -> None:
    seen = set(ENTRY_STATES)
    frontier = list(ENTRY_STATES)
    while frontier:
        state = frontier.pop()
        for (s, _), t in TRANSITIONS.items():
            if s is state and t not in seen:
                seen.add(t)
                frontier.append(t)
    assert seen == set(JobState)


def test_every_action_has_a_lifecycle_event() -> None:
    assert set(EVENT_FOR_ACTION) == set(Action)
    assert EVENT_FOR_ACTION[Action.COMPLETE] is EventType.JOB_COMPLETED
    assert EVENT_FOR_ACTION[Action.FAIL] is EventType.JOB_DEAD_LETTERED
    assert EVENT_FOR_ACTION[Action.QUARANTINE] is EventType.JOB_DEAD_LETTERED
    assert EVENT_FOR_ACTION[Action.FETCH] is EventType.JOB_STARTED
    assert EVENT_FOR_ACTION[Action.RETRY] is EventType.JOB_RETRYING
    assert EVENT_FOR_ACTION[Action.LOST] is EventType.JOB_RETRYING
    for action in (Action.CANCEL, Action.CONFIRM_CANCEL, Action.PARENT_FAILED):
        assert EVENT_FOR_ACTION[action] is EventType.JOB_CANCELLED
    for action in (Action.UNBLOCK, Action.RELEASE, Action.DLQ_RETRY):
        assert EVENT_FOR_ACTION[action] is EventType.JOB_STATUS_CHANGED


def test_states_and_actions_are_their_string_values() -> None:
    assert JobState("running") is JobState.RUNNING
    assert Action("confirm_cancel") is Action.CONFIRM_CANCEL
    assert f"{JobState.FAILED}" == "failed"


# -- properties over random action sequences -------------------------------------------


def drive(start: JobState, actions: list[Action]) -> list[tuple[JobState, Action, JobState]]:
    """Apply the allowed actions, checking the refused ones change nothing."""
    state = start
    path = []
    for action in actions:
        try:
            new = next_state(state, action)
        except InvalidTransition:
            assert (state, action) not in TRANSITIONS
            continue
        path.append((state, action, new))
        state = new
    return path


@given(start=st.sampled_from(ENTRY_STATES), actions=st.lists(st.sampled_from(Action)))
def test_random_actions_only_follow_the_table(start: JobState, actions: list[Action]) -> None:
    path = drive(start, actions)
    state = start
    for src, action, dst in path:
        assert src is state  # a path never skips a state
        assert TRANSITIONS[(src, action)] is dst
        state = dst


@given(start=st.sampled_from(ENTRY_STATES), actions=st.lists(st.sampled_from(Action)))
def test_terminal_states_are_final_except_failed(start: JobState, actions: list[Action]) -> None:
    path = drive(start, actions)
    for i, (_, _, dst) in enumerate(path):
        later = path[i + 1 :]
        if dst in (JobState.COMPLETED, JobState.CANCELLED):
            assert later == []
        if dst is JobState.FAILED and later:
            assert later[0][1] is Action.DLQ_RETRY
            assert later[0][2] is JobState.PENDING


@given(
    state=st.sampled_from(JobState),
    actions=st.lists(st.sampled_from(Action), min_size=1),
)
def test_from_completed_or_cancelled_every_action_is_refused(
    state: JobState, actions: list[Action]
) -> None:
    if state not in (JobState.COMPLETED, JobState.CANCELLED):
        return
    for action in actions:
        with pytest.raises(InvalidTransition):
            next_state(state, action)


@given(actions=st.lists(st.sampled_from(Action)))
def test_a_job_runs_only_after_a_fetch(actions: list[Action]) -> None:
    for src, action, dst in drive(JobState.PENDING, actions):
        if dst is JobState.RUNNING:
            assert (src, action) == (JobState.PENDING, Action.FETCH)
        assert src is not JobState.BLOCKED, "a pending job never becomes blocked"
