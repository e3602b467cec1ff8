"""RetryPolicy (backoff with full jitter) and the retry decision."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.domain.errors import Permanent, Retry
from conveyor.domain.retry import Decision, RetryPolicy, decide, describe
from conveyor.domain.states import Action


def never() -> float:
    raise AssertionError("rand must not be called")


# -- RetryPolicy -----------------------------------------------------------------------


def test_defaults_double_from_one_second_up_to_five_minutes() -> None:
    p = RetryPolicy(jitter=False)
    assert [p.cap(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert p.cap(100) == 300


def test_cap_of_retry_zero_or_below_is_the_base() -> None:
    p = RetryPolicy(base=3, factor=10)
    assert p.cap(0) == p.cap(-5) == p.cap(1) == 3


def test_cap_is_capped_by_max_delay() -> None:
    p = RetryPolicy(base=10, factor=3, max_delay=50)
    assert [p.cap(n) for n in (1, 2, 3, 4)] == [10, 30, 50, 50]


def test_cap_is_a_float() -> None:
    assert isinstance(RetryPolicy(base=1, factor=2, max_delay=100).cap(3), float)


@pytest.mark.parametrize("retry_number", [65, 66, 1000, 10**6, 10**18, 2**63])
def test_huge_retry_numbers_do_not_overflow(retry_number: int) -> None:
    p = RetryPolicy(base=1, factor=2, max_delay=300)
    assert p.cap(retry_number) == 300
    assert p.delay(retry_number, rand=lambda: 0.5) == 150


def test_large_factor_does_not_overflow() -> None:
    assert RetryPolicy(factor=1e6, max_delay=300).cap(64) == 300


@given(
    base=st.floats(0, 100),
    factor=st.floats(1, 10),
    max_delay=st.floats(0, 10_000),
    retry_number=st.integers(-5, 10**9),
    r=st.floats(0, 1, exclude_max=True),
)
def test_full_jitter_stays_within_zero_and_the_cap(
    base: float, factor: float, max_delay: float, retry_number: int, r: float
) -> None:
    p = RetryPolicy(base=base, factor=factor, max_delay=max_delay)
    cap = p.cap(retry_number)
    assert 0 <= cap <= max_delay
    assert math.isfinite(cap)
    delay = p.delay(retry_number, rand=lambda: r)
    assert 0 <= delay <= cap
    assert delay == pytest.approx(cap * r)


@given(retry_number=st.integers(1, 200))
def test_caps_never_decrease(retry_number: int) -> None:
    p = RetryPolicy(base=0.5, factor=1.7, max_delay=1000)
    assert p.cap(retry_number) <= p.cap(retry_number + 1)


def test_jitter_bounds_with_injected_rand() -> None:
    p = RetryPolicy(base=2, factor=2, max_delay=100)
    assert p.delay(3, rand=lambda: 0.0) == 0
    assert p.delay(3, rand=lambda: 0.25) == 2
    assert p.delay(3, rand=lambda: 0.999) == pytest.approx(7.992)


def test_no_jitter_waits_the_cap_and_does_not_draw() -> None:
    p = RetryPolicy(base=2, factor=3, max_delay=100, jitter=False)
    assert p.delay(1, rand=never) == 2
    assert p.delay(3, rand=never) == 18
    assert p.delay(10, rand=never) == 100


def test_default_rand_stays_in_bounds() -> None:
    p = RetryPolicy(base=1, factor=2, max_delay=8)
    assert all(0 <= p.delay(4) <= 8 for _ in range(200))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": -0.1},
        {"factor": 0.99},
        {"factor": 0},
        {"max_delay": -1},
    ],
    ids=["negative-base", "factor-below-1", "factor-zero", "negative-max-delay"],
)
def test_bad_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="base >= 0, factor >= 1 and max_delay >= 0"):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize("name", ["base", "factor", "max_delay"])
def test_nan_parameters_raise(name: str) -> None:
    with pytest.raises(ValueError, match="RetryPolicy needs"):
        RetryPolicy(**{name: math.nan})


def test_edge_parameters_are_allowed() -> None:
    assert RetryPolicy(base=0).cap(5) == 0
    assert RetryPolicy(max_delay=0).cap(5) == 0
    assert RetryPolicy(factor=1, base=7).cap(50) == 7


# -- decide ----------------------------------------------------------------------------

POLICY = RetryPolicy(base=1, factor=2, max_delay=60)


def test_transient_error_is_retried_with_backoff() -> None:
    d = decide(ValueError("flaky"), attempt=3, max_retries=5, policy=POLICY, rand=lambda: 0.5)
    assert d == Decision(Action.RETRY, 2.0, "ValueError: flaky")


def test_first_failure_draws_from_the_first_cap() -> None:
    d = decide(OSError("x"), attempt=1, max_retries=1, policy=POLICY, rand=lambda: 0.75)
    assert (d.action, d.delay) == (Action.RETRY, 0.75)


def test_permanent_fails_at_once_whatever_retries_remain() -> None:
    d = decide(Permanent("card declined"), attempt=1, max_retries=100, policy=POLICY, rand=never)
    assert d == Decision(Action.FAIL, 0.0, "Permanent: card declined")


class Declined(Exception):
    pass


class HardDeclined(Declined):
    pass


@pytest.mark.parametrize("exc", [Declined("no"), HardDeclined("never"), KeyError("k")])
def test_configured_permanent_errors_fail(exc: Exception) -> None:
    policy = RetryPolicy(permanent_errors=(Declined, KeyError))
    d = decide(exc, attempt=1, max_retries=5, policy=policy, rand=never)
    assert (d.action, d.delay) == (Action.FAIL, 0.0)


def test_unconfigured_errors_stay_transient() -> None:
    policy = RetryPolicy(permanent_errors=(KeyError,))
    d = decide(Declined("no"), attempt=1, max_retries=5, policy=policy, rand=lambda: 0)
    assert d.action is Action.RETRY


@pytest.mark.parametrize(
    ("attempt", "max_retries", "action"),
    [
        (1, 0, Action.FAIL),
        (1, 1, Action.RETRY),
        (2, 1, Action.FAIL),
        (3, 3, Action.RETRY),  # the 4th attempt is still allowed
        (4, 3, Action.FAIL),
        (100, 3, Action.FAIL),
    ],
)
def test_exhausted_attempts_fail(attempt: int, max_retries: int, action: Action) -> None:
    d = decide(
        RuntimeError("x"), attempt=attempt, max_retries=max_retries, policy=POLICY, rand=lambda: 0
    )
    assert d.action is action
    if action is Action.FAIL:
        assert d.delay == 0


def test_retry_with_delay_is_honoured() -> None:
    d = decide(
        Retry("rate limited", delay=7.5), attempt=1, max_retries=3, policy=POLICY, rand=never
    )
    assert d == Decision(Action.RETRY, 7.5, "Retry: rate limited")


def test_retry_delay_beyond_max_delay_is_still_honoured() -> None:
    d = decide(Retry(delay=3600), attempt=1, max_retries=3, policy=POLICY, rand=never)
    assert d.delay == 3600


def test_retry_delay_zero_is_honoured() -> None:
    d = decide(Retry(delay=0), attempt=2, max_retries=3, policy=POLICY, rand=never)
    assert (d.action, d.delay) == (Action.RETRY, 0)


def test_retry_without_delay_uses_the_policy() -> None:
    d = decide(Retry(), attempt=2, max_retries=3, policy=POLICY, rand=lambda: 0.5)
    assert (d.action, d.delay) == (Action.RETRY, 1.0)


def test_retry_when_exhausted_fails() -> None:
    d = decide(Retry(delay=5), attempt=4, max_retries=3, policy=POLICY, rand=never)
    assert d.action is Action.FAIL


def test_retry_rejects_a_negative_delay() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Retry(delay=-1)


@pytest.mark.parametrize("exc", [TimeoutError("slow"), TimeoutError(), ConnectionError("reset")])
def test_timeouts_and_connection_errors_are_transient(exc: Exception) -> None:
    d = decide(exc, attempt=1, max_retries=2, policy=POLICY, rand=lambda: 1.0)
    assert (d.action, d.delay) == (Action.RETRY, 1.0)


def test_worker_job_timeout_is_transient() -> None:
    from conveyor.runtime.worker import JobTimeout

    d = decide(JobTimeout("job timed out after 1s"), attempt=1, max_retries=2, policy=POLICY)
    assert d.action is Action.RETRY
    assert d.error == "JobTimeout: job timed out after 1s"


def test_describe() -> None:
    assert describe(ValueError("bad value")) == "ValueError: bad value"
    assert describe(KeyError()) == "KeyError"
    assert describe(Permanent("x")) == "Permanent: x"


@given(
    attempt=st.integers(1, 200),
    max_retries=st.integers(0, 100),
    r=st.floats(0, 1, exclude_max=True),
)
def test_decide_retries_exactly_while_attempts_remain(
    attempt: int, max_retries: int, r: float
) -> None:
    d = decide(
        ValueError("x"), attempt=attempt, max_retries=max_retries, policy=POLICY, rand=lambda: r
    )
    if attempt <= max_retries:
        assert d.action is Action.RETRY
        assert 0 <= d.delay <= POLICY.cap(attempt)
    else:
        assert d == Decision(Action.FAIL, 0.0, "ValueError: x")
