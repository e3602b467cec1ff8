"""Submitting and driving workflows: one validation for every entry point.

The REST API, the CLI (``conveyor workflows submit FILE``), a definition loaded
from JSON or YAML, and the Python builder (``app.workflow(...)``) all end in
:meth:`WorkflowService.submit`, which checks the DAG (``check_dag``), builds
each step's job with its job type's defaults (``app.new_job``), refuses
unknown job types, and stores it all in one transaction.

    wf = app.workflow("etl", on_failure="fail_fast")
    a = wf.step("extract", extract, url="https://example.com/data.csv")
    b = wf.step("load", load, after=[a])
    run = await wf.submit()
    done = await run.wait(timeout=60)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
import pydantic

from conveyor.domain.errors import (
    ConfigurationError,
    FieldError,
    ValidationError,
    WorkflowNotFound,
)
from conveyor.domain.ids import MIN_ID_PREFIX, ambiguous_prefix_message, id_prefix_problem
from conveyor.domain.job import Job, NewJob
from conveyor.domain.workflow import (
    MAX_NAME_CHARS,
    MAX_WORKFLOW_STEPS,
    NewWorkflow,
    OnFailure,
    StepSpec,
    Workflow,
    WorkflowQuery,
    WorkflowStatus,
    check_dag,
    name_error,
)
from conveyor.observability import tracing
from conveyor.runtime.observe import WorkflowSubmitted
from conveyor.storage.codec import dumps

if TYPE_CHECKING:
    from conveyor.app import Conveyor
    from conveyor.runtime.registry import JobDefinition


def _not_bool(value: Any) -> Any:
    # JSON true is not 1: POST /api/jobs refuses it, and so must a step
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


_StepInt = Annotated[int | None, pydantic.BeforeValidator(_not_bool)]


class StepIn(pydantic.BaseModel):
    """One step of a workflow definition (REST body, JSON/YAML file)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(min_length=1, max_length=MAX_NAME_CHARS)
    job_type: str = pydantic.Field(min_length=1, max_length=100)
    payload: dict[str, Any] = pydantic.Field(default_factory=dict)
    depends_on: list[str] = pydantic.Field(default_factory=list)
    priority: _StepInt = None
    max_retries: _StepInt = None
    timeout_ms: _StepInt = None
    queue: str | None = None


class WorkflowIn(pydantic.BaseModel):
    """A workflow definition: ``POST /api/workflows`` and ``conveyor workflows submit``."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(min_length=1, max_length=MAX_NAME_CHARS)
    steps: list[StepIn] = pydantic.Field(min_length=1, max_length=MAX_WORKFLOW_STEPS)
    on_failure: Literal["fail_fast", "continue"] = "fail_fast"
    idempotency_key: str | None = pydantic.Field(default=None, min_length=1, max_length=255)
    metadata: dict[str, Any] = pydantic.Field(default_factory=dict)


def parse_definition(data: Any) -> WorkflowIn:
    """A workflow definition from decoded JSON/YAML. Raises ``ValidationError``
    listing every bad field (``steps[3].job_type`` ...)."""
    if not isinstance(data, Mapping):
        raise ValidationError(
            "A workflow definition must be an object with 'name' and 'steps'",
            [FieldError("body", "must be an object")],
        )
    try:
        return WorkflowIn.model_validate(data)
    except pydantic.ValidationError as exc:
        details = [
            FieldError(".".join(str(p) for p in e["loc"]) or "body", e["msg"])
            for e in exc.errors()[:50]
        ]
        first = details[0]
        raise ValidationError(f"Invalid workflow: {first.field} {first.message}", details) from None


def _no_alias_loader() -> Any:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):  # type: ignore[misc]
        """``safe_load`` without aliases: nested aliases expand exponentially (a
        small file becomes gigabytes), and a workflow definition needs none."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, "YAML aliases (*name) are not allowed", event.start_mark
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_definition(path: str | Path) -> WorkflowIn:
    """Read a workflow definition from a ``.json``, ``.yaml`` or ``.yml`` file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read workflow file {str(p)!r}: {exc.strerror}") from exc
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_no_alias_loader())  # a SafeLoader without aliases
        else:
            data = orjson.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ValidationError(
            f"Workflow file {p.name!r} is not valid {kind}: {exc}",
            [FieldError("file", "cannot be parsed")],
        ) from None
    return parse_definition(data)


class WorkflowService:
    """Workflow operations with the application's validation and defaults."""

    def __init__(self, app: Conveyor) -> None:
        self._app = app

    async def build_steps(
        self, steps: Sequence[StepIn], *, created_by: str | None = None
    ) -> list[tuple[str, NewJob]]:
        """Each step's job with its type's defaults; every bad field of every step
        in one ``ValidationError`` (``steps[i].<field>``, naming the step)."""
        app = self._app
        out: list[tuple[str, NewJob]] = []
        errors: list[FieldError] = []
        for i, s in enumerate(steps):
            defaults = None
            if s.job_type not in app.registry:
                defaults = await app.recorded_job_type(s.job_type)
            try:
                # the store checks this too, but without saying which step
                dumps(s.payload)
                new = app.new_job(
                    s.job_type,
                    s.payload,
                    queue=s.queue,
                    priority=s.priority,
                    max_retries=s.max_retries,
                    timeout_ms=s.timeout_ms,
                    depends_on=tuple(s.depends_on),
                    created_by=created_by,
                    defaults=defaults,
                )
                problems = [e for e in new.errors() if e.field != "depends_on"]
            except ValidationError as exc:
                problems = list(exc.details) or [FieldError("step", exc.message)]
            errors += [
                FieldError(f"steps[{i}].{e.field}", f"(step {s.name!r}) {e.message}")
                for e in problems
            ]
            if not problems:
                out.append((s.name, new))
        if errors:
            raise ValidationError(
                f"Invalid workflow: {errors[0].field} {errors[0].message}", errors
            )
        await app._check_known_types([new for _, new in out])
        return out

    async def submit(
        self, definition: WorkflowIn, *, created_by: str | None = None
    ) -> tuple[Workflow, bool]:
        """Validate and store a workflow; returns it and whether an earlier one
        with the same ``idempotency_key`` came back instead. Raises
        ``ValidationError`` and stores nothing when anything is wrong."""
        problem = name_error(definition.name, "name")
        if problem is not None:
            raise ValidationError(f"Invalid workflow: {problem}", [FieldError("name", problem)])
        specs = [
            StepSpec(s.name, s.job_type, depends_on=tuple(s.depends_on)) for s in definition.steps
        ]
        order = check_dag(specs)
        by_name = {s.name: s for s in definition.steps}
        built = dict(await self.build_steps(definition.steps, created_by=created_by))
        workflow = NewWorkflow(
            definition.name,
            OnFailure(definition.on_failure),
            definition.idempotency_key,
            definition.metadata,
            created_by,
        )
        if workflow.idempotency_key is not None:
            _check_key(workflow.idempotency_key)
        app = self._app
        await app.open()
        steps = [(name, built[by_name[name].name]) for name in order]
        with tracing.submitting([j for _, j in steps], "submit workflow") as traced:
            steps = [(name, j) for (name, _), j in zip(steps, traced.jobs, strict=True)]
            wf, duplicate = await app.store.create_workflow(workflow, steps, app.now())
            traced.set("conveyor.workflow.id", wf.id)
        if not duplicate:
            app.after_submit()
            if app.signals.observing:
                app.signals.observe(WorkflowSubmitted(len(order)))
        return wf, duplicate

    async def add_steps(
        self,
        workflow_id: str,
        job_id: str,
        lease_token: str,
        steps: Sequence[Mapping[str, Any] | StepIn],
    ) -> list[Job]:
        """Steps a running step (``job_id`` with ``lease_token``) adds to its own
        workflow (dynamic fan-out): the ``StepIn`` shape; ``depends_on`` may name
        any step of the workflow. Raises ``ValidationError``, ``LeaseLost``,
        ``WorkflowConflict``."""
        parsed: list[StepIn] = []
        for i, s in enumerate(steps):
            if isinstance(s, StepIn):
                parsed.append(s)
                continue
            try:
                parsed.append(StepIn.model_validate(s))
            except pydantic.ValidationError as exc:
                e = exc.errors()[0]
                where = ".".join(str(p) for p in e["loc"])
                raise ValidationError(
                    f"Invalid step {i}: {where} {e['msg']}",
                    [FieldError(f"steps[{i}].{where}", e["msg"])],
                ) from None
        if not parsed:
            return []
        built = tracing.steps_with_trace_context(await self.build_steps(parsed))
        app = self._app
        jobs = await app.store.add_steps(workflow_id, job_id, lease_token, built, app.now())
        app.after_submit()
        return jobs

    async def resolve_id(self, text: str) -> str:
        """The workflow id ``text`` names: a full id, or a unique prefix of at least
        6 hex digits (as copied from ``conveyor workflows list``). Raises
        ``ValidationError`` for a short or malformed one, or one several workflows
        share (naming them), ``WorkflowNotFound`` when none matches."""
        key = text.strip().lower() if isinstance(text, str) else ""
        problem = id_prefix_problem(key)
        if problem is not None:
            raise ValidationError(
                f"{text!r} is not a workflow id or an id prefix: give at least "
                f"{MIN_ID_PREFIX} of its hexadecimal digits",
                [FieldError("workflow_id", problem)],
            )
        if len(key) == 32:
            return key
        await self._app.open()
        found = await self._app.store.workflow_ids_with_prefix(key, 6)
        if not found:
            raise WorkflowNotFound(text)
        if len(found) > 1:
            raise ValidationError(
                ambiguous_prefix_message("Workflow", text, found),
                [FieldError("workflow_id", "ambiguous prefix")],
            )
        return found[0]

    async def get(self, workflow_id: str, *, results: bool = True) -> Workflow:
        await self._app.open()
        return await self._app.store.get_workflow(workflow_id, results=results)

    async def list(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Workflow], int]:
        try:
            query = WorkflowQuery(
                WorkflowStatus(status) if status else None, name or None, limit, offset
            )
        except ValueError:
            allowed = ", ".join(s.value for s in WorkflowStatus)
            raise ValidationError(
                f"status must be one of {allowed}", [FieldError("status", f"one of {allowed}")]
            ) from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise ValidationError(
                "limit must be 1-1000 and offset >= 0",
                [FieldError("limit", "must be 1-1000"), FieldError("offset", "must be >= 0")],
            )
        await self._app.open()
        return await self._app.store.list_workflows(query)

    async def cancel(self, workflow_id: str) -> Workflow:
        """Cancel every unfinished step; running ones are told at once over the bus."""
        app = self._app
        await app.open()
        wf = await app.store.cancel_workflow(workflow_id, app.now())
        for step in wf.steps or []:
            if step.status == "cancelling":
                await app.signal_cancel(step.job_id)
        app.events_written()
        return wf

    async def retry(self, workflow_id: str) -> Workflow:
        app = self._app
        await app.open()
        wf = await app.store.retry_workflow(workflow_id, app.now())
        app.after_submit()
        return wf

    async def wait(
        self,
        workflow_id: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the deadline of our own polling
        poll: float = 0.05,
    ) -> Workflow:
        """Return the workflow once it is finished (any terminal status). Raises
        ``TimeoutError`` after ``timeout`` seconds."""
        if timeout is not None and not (timeout >= 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            wf = await self.get(workflow_id, results=False)
            if wf.status.is_terminal:
                return await self.get(workflow_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Workflow {workflow_id!r} still {wf.status.value} after {timeout} s"
                )
            await asyncio.sleep(
                delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            )
            delay = min(delay * 1.5, 1.0)


def _check_key(key: str) -> None:
    problem = NewJob("x", idempotency_key=key).errors()
    if problem:
        raise ValidationError(
            f"idempotency_key {problem[0].message}",
            [FieldError("idempotency_key", problem[0].message)],
        )


@dataclass(frozen=True, slots=True)
class StepRef:
    """A step of a workflow being built: pass it in ``after=[...]``."""

    name: str


class WorkflowBuilder:
    """Build a workflow step by step, then ``await submit()``. See the module doc."""

    def __init__(
        self,
        service: WorkflowService,
        name: str,
        *,
        on_failure: str = "fail_fast",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self._service = service
        self._name = name
        self._on_failure = on_failure
        self._metadata = dict(metadata or {})
        self._steps: list[StepIn] = []

    def step(
        self,
        name: str,
        job: str | JobDefinition,
        /,
        *,
        after: Sequence[StepRef | str] = (),
        queue: str | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout_ms: int | None = None,
        payload: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> StepRef:
        """Add a step running ``job`` (a registered handler or a job type name)
        with ``payload`` (or the keyword ``fields``) once every step in ``after``
        completed."""
        job_type = job if isinstance(job, str) else getattr(job, "job_type", None)
        if not isinstance(job_type, str):
            raise ConfigurationError(
                f"Step {name!r}: {job!r} is neither a job type's name nor a handler "
                "registered with @app.job"
            )
        if isinstance(after, str | StepRef):  # one parent: a bare name is not its letters
            after = [after]
        body = dict(payload or {})
        body.update(fields)
        self._steps.append(
            StepIn.model_construct(
                name=name,
                job_type=job_type,
                payload=body,
                depends_on=[a.name if isinstance(a, StepRef) else a for a in after],
                priority=priority,
                max_retries=max_retries,
                timeout_ms=timeout_ms,
                queue=queue,
            )
        )
        return StepRef(name)

    def definition(self, *, idempotency_key: str | None = None) -> WorkflowIn:
        """The definition as JSON-ready data would give it (validated)."""
        return parse_definition(
            {
                "name": self._name,
                "on_failure": self._on_failure,
                "metadata": self._metadata,
                "idempotency_key": idempotency_key,
                "steps": [s.model_dump() for s in self._steps],
            }
        )

    async def submit(self, *, idempotency_key: str | None = None) -> WorkflowRun:
        wf, _ = await self._service.submit(self.definition(idempotency_key=idempotency_key))
        return WorkflowRun(self._service, wf.id)


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """A submitted workflow: ``await run.status()``, ``await run.wait()``."""

    service: WorkflowService
    id: str

    async def status(self) -> Workflow:
        return await self.service.get(self.id)

    async def wait(self, timeout: float | None = None) -> Workflow:  # noqa: ASYNC109
        return await self.service.wait(self.id, timeout=timeout)

    async def cancel(self) -> Workflow:
        return await self.service.cancel(self.id)

    async def retry(self) -> Workflow:
        return await self.service.retry(self.id)
