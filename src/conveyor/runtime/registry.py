"""Job definitions: handler, defaults, and payload validation from the signature."""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import pydantic

from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError
from conveyor.domain.flow import FlowLimits
from conveyor.domain.job import DEFAULT_MAX_RETRIES, DEFAULT_PRIORITY, DEFAULT_QUEUE, JobTypeInfo
from conveyor.domain.retry import RetryPolicy
from conveyor.runtime.secret_refs import check_refs, has_refs, with_placeholders
from conveyor.runtime.steps import DEFAULT_MAX_HEALS

if TYPE_CHECKING:
    from conveyor.domain.job import Job
    from conveyor.runtime.ports import Submitter
    from conveyor.settings import Settings

Handler = Callable[..., Any]


@dataclass
class JobDefinition:
    """A registered job type. Calling it runs the handler directly (for tests)."""

    job_type: str
    handler: Handler
    app: Submitter  # the application it was registered on
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout: float | None = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    isolation: str | None = None  # "thread" | "process"; None: the worker's mode
    is_async: bool = False
    _model: type[pydantic.BaseModel] | None = None
    #: ``heal(payload, error, attempt) -> new payload | None``, run before each retry
    #: of a failed attempt, at most ``max_heals`` times per job (see runtime/steps.py).
    heal: Callable[..., Any] | None = None
    max_heals: int = DEFAULT_MAX_HEALS
    #: Flow control as registered (docs/flow_control.md); workers record it.
    flow: FlowLimits | None = None
    #: Options the registration left out (``"timeout"``, ``"max_retries"``,
    #: ``"retry"``): ``fill_defaults`` sets them from the fleet-wide settings.
    from_settings: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.handler)
        self._model = payload_model(self.job_type, self.handler)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(*args, **kwargs)

    def validate_payload(self, payload: Mapping[str, Any]) -> None:
        """Raise ``ValidationError`` if ``payload`` does not fit the handler's signature."""
        refs = has_refs(payload)
        if refs:
            check_refs(payload)
        if self._model is not None:
            # A secret reference stands for text, resolved by the worker (docs/security.md).
            self._validate(with_placeholders(payload) if refs else payload)

    def _validate(self, payload: Mapping[str, Any]) -> Any:
        assert self._model is not None
        try:
            # The model's validator itself: ``model_validate`` adds a wrapper and
            # a copy per call, and bulk submits validate thousands of payloads.
            return self._model.__pydantic_validator__.validate_python(
                payload if type(payload) is dict else dict(payload), strict=False
            )
        except pydantic.ValidationError as exc:
            details = [
                FieldError(
                    "payload." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "payload",
                    err["msg"],
                )
                for err in exc.errors()
            ]
            raise ValidationError(
                f"Invalid payload for job type {self.job_type!r}: "
                + "; ".join(f"{d.field}: {d.message}" for d in details),
                details,
            ) from None

    def validated_payload(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments the handler receives: ``payload`` validated against
        its signature, each value coerced to its annotation (``"3"`` for an ``int``
        parameter arrives as ``3``, an ISO string as a ``datetime``). Raises
        ``ValidationError`` as ``validate_payload`` does."""
        if self._model is None:
            return dict(payload)
        model = self._validate(payload)
        values = {name: getattr(model, name) for name in type(model).model_fields}
        if model.model_extra:
            values.update(model.model_extra)
        return values

    def info(self) -> JobTypeInfo:
        """What a worker records in the store about this job type."""
        return JobTypeInfo(
            self.job_type,
            self.queue,
            self.priority,
            self.max_retries,
            None if self.timeout is None else max(1, math.ceil(self.timeout * 1000)),
        )

    async def enqueue(self, **payload: Any) -> Job:
        """Submit this job type with ``payload`` as keyword arguments."""
        return await self.app.enqueue(self.job_type, payload)

    def fill_defaults(self, settings: Settings) -> None:
        """Set the options the registration left out from ``settings``
        (``CONVEYOR_JOB_*``); options it gave keep their values."""
        if "timeout" in self.from_settings:
            self.timeout = settings.job_timeout or None  # 0: no timeout
        if "max_retries" in self.from_settings:
            self.max_retries = settings.job_max_retries
        if "retry" in self.from_settings:
            self.retry = default_retry(settings)


def default_retry(settings: Settings) -> RetryPolicy:
    """The backoff of a job type that gives none: ``CONVEYOR_JOB_RETRY_BASE`` and
    ``CONVEYOR_JOB_RETRY_FACTOR`` over ``RetryPolicy``'s other defaults."""
    return RetryPolicy(base=settings.job_retry_base, factor=settings.job_retry_factor)


class _FromSettings(enum.Enum):
    TOKEN = "from settings"

    def __repr__(self) -> str:
        return "FROM_SETTINGS"


#: The default of ``app.job(timeout=...)``: the fleet-wide ``CONVEYOR_JOB_TIMEOUT``
#: (``None`` is taken: it means no timeout).
FROM_SETTINGS: Final = _FromSettings.TOKEN


def payload_model(job_type: str, handler: Handler) -> type[pydantic.BaseModel] | None:
    """A pydantic model of the handler's keyword parameters (after ``ctx``).

    ``None`` when the handler takes ``**kwargs`` only (any payload goes).
    """
    try:
        sig = inspect.signature(handler, eval_str=True)
    except (TypeError, ValueError):
        return None
    except NameError as exc:
        raise ConfigurationError(
            f"Handler of job type {job_type!r} has an annotation that cannot be resolved: {exc}"
        ) from exc
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(
            f"Handler of job type {job_type!r} must take `ctx` as its first parameter"
        )
    fields_: dict[str, Any] = {}
    extra: Literal["allow", "forbid"] = "forbid"
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = "allow"
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise ConfigurationError(
                f"Handler of job type {job_type!r}: payload parameters must be keywords "
                f"(got {p.name!r})"
            )
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields_[p.name] = (annotation, default)
    if not fields_ and extra == "allow":
        return None
    try:
        return pydantic.create_model(
            f"{job_type}_payload",
            # allow_inf_nan=False: "nan" or "1e309" for a float parameter is refused
            # like a literal NaN (JSON has none, and the handler must never see one).
            __config__=pydantic.ConfigDict(
                extra=extra, arbitrary_types_allowed=True, allow_inf_nan=False
            ),
            **fields_,
        )
    except (pydantic.PydanticUserError, TypeError, NameError) as exc:
        raise ConfigurationError(
            f"Cannot build a payload model for job type {job_type!r}: {exc}"
        ) from exc


#: ``app.job(timeout=...)``: seconds, ``None`` for none, or ``FROM_SETTINGS``.
TimeoutOption = float | None | Literal[_FromSettings.TOKEN]
