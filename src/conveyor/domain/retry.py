"""Retry decisions: pure functions of the error, the attempt and a policy."""

from __future__ import annotations

import math
import random as _random
import traceback as _traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from conveyor.domain.errors import Permanent, Retry
from conveyor.domain.limits import clamp_retry_delay, safe_text
from conveyor.domain.states import Action


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter.

    The n-th retry waits a uniform random time in ``[0, min(max_delay,
    base * factor ** (n - 1))]`` seconds. ``jitter=False`` waits the cap itself.
    """

    base: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True
    permanent_errors: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.factor >= 1 and self.max_delay >= 0) or not all(
            math.isfinite(v) for v in (self.base, self.factor, self.max_delay)
        ):
            raise ValueError("RetryPolicy needs finite base >= 0, factor >= 1 and max_delay >= 0")

    def cap(self, retry_number: int) -> float:
        exponent = max(0, retry_number - 1)
        try:
            return float(min(self.max_delay, self.base * float(self.factor) ** exponent))
        except OverflowError:
            return self.max_delay

    def delay(self, retry_number: int, rand: Callable[[], float] = _random.random) -> float:
        cap = self.cap(retry_number)
        return cap * rand() if self.jitter else cap


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action  # RETRY or FAIL
    delay: float  # seconds until the retry; 0 for FAIL
    error: str


#: What a mask (``mask=``) may see of a text before it is cut to its stored size:
#: a secret that straddled the cut would otherwise be stored in part.
MASK_WINDOW = 1 << 20


def describe(exc: BaseException, mask: Callable[[str], str] | None = None) -> str:
    """``"Type: message"`` (or ``"Type"``) for any exception, storable and bounded.

    Never raises: a ``__str__`` that raises, lone surrogates, NUL characters and
    huge messages are handled by :func:`conveyor.domain.limits.safe_text`.
    ``mask`` (e.g. hiding resolved secrets) runs on the whole text before it is
    cut, so nothing it hides survives in part at the cut.
    """
    name = safe_text(type(exc).__name__, 200)
    text = safe_text(exc) if mask is None else safe_text(mask(safe_text(exc, MASK_WINDOW)))
    return f"{name}: {text}" if text else name


#: Characters of a traceback kept in an attempt's history (the end: the frames
#: nearest the raise and the exception line).
MAX_TRACEBACK_CHARS = 8_192


def traceback_text(exc: BaseException, mask: Callable[[str], str] | None = None) -> str | None:
    """``exc``'s traceback as Python prints it (chained exceptions included), cut to
    its last ``MAX_TRACEBACK_CHARS`` characters behind a ``... [N characters cut]``
    line, storable by every store; None when it has no traceback. Never raises:
    the ``traceback`` module describes an exception whose ``__str__`` raises as
    ``<exception str() failed>``. It does run that ``__str__``: call it where a
    hanging one can't freeze anything (the worker does it off its event loop).
    ``mask`` runs on the whole text before the cut (see ``describe``)."""
    try:
        if exc.__traceback__ is None:
            return None
        text = "".join(_traceback.format_exception(exc))
    except BaseException:  # noqa: BLE001 - a hostile exception must not escape
        return None
    return cut_traceback(text, mask)


def cut_traceback(text: str, mask: Callable[[str], str] | None = None) -> str:
    """A traceback's text as stored: masked, cleaned, its last ``MAX_TRACEBACK_CHARS``
    characters behind a ``... [N characters cut]`` line."""
    if mask is not None:
        text = mask(text)
    text = safe_text(text, len(text) + 1)
    if len(text) > MAX_TRACEBACK_CHARS:
        cut = len(text) - MAX_TRACEBACK_CHARS
        text = f"... [{cut} characters cut]\n" + text[-MAX_TRACEBACK_CHARS:]
    return text


def decide(
    exc: BaseException,
    *,
    attempt: int,
    max_retries: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = _random.random,
    error: str | None = None,
) -> Decision:
    """What to do after attempt number ``attempt`` (1-based) raised ``exc``.

    Transient unless marked permanent; timeouts are transient; ``Retry`` asks
    for its own delay (clamped to ``MAX_RETRY_DELAY_SECONDS``); no attempts left
    means the dead-letter queue. Never raises. ``error``: the text already made of
    ``exc`` (the worker describes hostile exceptions off its event loop).
    """
    if error is None:
        error = describe(exc)
    if isinstance(exc, (Permanent, policy.permanent_errors)):
        return Decision(Action.FAIL, 0.0, error)
    if attempt > max_retries:
        return Decision(Action.FAIL, 0.0, error)
    if isinstance(exc, Retry):
        try:
            delay = clamp_retry_delay(exc.__dict__.get("delay"))
        except BaseException:  # noqa: BLE001 - a hostile delay object: use the backoff
            delay = None
        if delay is not None:
            return Decision(Action.RETRY, delay, error)
    return Decision(Action.RETRY, policy.delay(attempt, rand), error)
