"""Step specs: everything the engine knows about one step type, kept in one registry.

A :class:`StepSpec` says which keys a step of its type accepts, how its input and other keys
are validated, which child lists it has (a branch's ``then``/``else``, a loop's ``steps``), what
it compiles once per flow version, and how the executor runs it (a leaf *piece*, or a walk
function for types that steer the walk). :mod:`conveyor.engine.flow`,
:mod:`conveyor.engine.references` and :mod:`conveyor.engine.executor` ask the registry and
never compare type names. The built-in types register themselves in
:mod:`conveyor.engine.pieces`, one module each; see docs/architecture.md ("Adding a step
type").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from conveyor.engine.context import RunEnv, RunOutcome, Services, StepRecord
    from conveyor.engine.errors import StepFailed
    from conveyor.engine.flow import Step
    from conveyor.status import StepStatus


class StepType(StrEnum):
    """The built-in step types (a registered type need not be one of these)."""

    TRANSFORM = "transform"
    CODE = "code"
    HTTP = "http"
    BRANCH = "branch"
    LOOP = "loop"
    DELAY = "delay"
    RESPOND = "respond"


@dataclass(frozen=True, slots=True)
class Arm:
    """One list of child steps: ``key`` in the document, ``attr`` on the compiled step.

    ``iterates`` marks a loop body: its steps run once per item in their own scope and are
    not visible after the step (only its output is). ``required`` makes the key mandatory.
    """

    key: str
    attr: str
    iterates: bool = False
    required: bool = False


class Checks(Protocol):
    """What a spec's validation hooks may call on the flow validator."""

    def err(self, path: str, message: str) -> None: ...
    def check_syntax(self, value: Any, path: str) -> None: ...


@dataclass(slots=True)
class At:
    """Where and when a step runs: its record's parent/iteration and its start times."""

    parent: str | None
    iteration: int | None
    started: datetime
    t0: float


@dataclass(frozen=True, slots=True)
class Where:
    """A step's place in the walk: parent step, loop iteration, loop depth (0 = top level),
    and the step's ``PAUSED`` record when a paused run resumes."""

    parent: str | None
    iteration: int | None
    depth: int
    paused: StepRecord | None = None


class Stop(Exception):
    """Unwinds the walk: the run failed (not continued) or paused."""

    def __init__(self, outcome: RunOutcome) -> None:
        super().__init__(outcome.status)
        self.outcome = outcome


class Walker(Protocol):
    """The executor's side of one run, as walk functions of control-flow types see it."""

    services: Services
    env: RunEnv

    def start(self, step: Step, where: Where) -> At: ...
    def track(self, step: Step, at: At) -> None: ...
    async def run_steps(
        self,
        steps: Sequence[Step],
        scope: dict[str, Any],
        parent: str | None,
        iteration: int | None,
        depth: int,
    ) -> None: ...
    async def record(
        self,
        step: Step,
        status: StepStatus,
        at: At,
        *,
        input: Any = None,
        output: Any = None,
        error: str | None = None,
    ) -> None: ...
    async def failed(self, step: Step, exc: StepFailed, at: At, *, input: Any = None) -> None: ...
    async def succeeded(
        self, step: Step, scope: dict[str, Any], output: Any, at: At, *, input: Any = None
    ) -> None: ...


#: ``async def piece(env, step, input) -> (output, logs)``; raises ``StepFailed``.
Piece = Callable[["RunEnv", "Step", Any], Awaitable[tuple[Any, str]]]
#: Runs a control-flow step itself (records it, walks its children).
WalkFn = Callable[[Walker, "Step", dict[str, Any], Where], Awaitable[None]]
#: Replays a finished step on redelivery, after its output is back in scope.
RestoreFn = Callable[[Walker, "Step", Any, dict[str, Any], Where], Awaitable[None]]
#: Validation hook: ``(checks, value, path)``; reports through ``checks.err``.
CheckFn = Callable[[Checks, Mapping[str, Any], str], None]
#: Compile hook: the raw step and its compiled children by arm attribute → extra
#: :class:`~conveyor.engine.flow.Step` fields.
CompileFn = Callable[[Mapping[str, Any], Mapping[str, Sequence["Step"]]], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step type.

    Parameters: ``type`` name; ``keys`` it accepts besides the common ones (name, type,
    retry, continue_on_failure, timeout_s); ``input_keys`` (``None``: any input, unchecked)
    and ``check_input`` for the input object; ``check`` for its other keys (runs after the
    input checks, before its ``arms`` are validated); ``template_keys`` whose strings are
    templates checked for references; ``arms`` (child step lists); ``compile`` (extra
    compiled fields); exactly one of ``piece`` (a leaf) or ``walk`` (control flow);
    ``restore`` (replay on redelivery); ``timeout_grace_s`` added to the step's own timeout
    (for runners that enforce it themselves and report better than a cancel would);
    ``schema``: the step document's JSON Schema for the API docs
    (:func:`conveyor.engine.schema.step_schema`).
    """

    type: str
    keys: frozenset[str] = frozenset({"input"})
    input_keys: frozenset[str] | None = None
    check_input: CheckFn | None = None
    check: CheckFn | None = None
    template_keys: tuple[str, ...] = ("input",)
    arms: tuple[Arm, ...] = ()
    compile: CompileFn | None = None
    piece: Piece | None = None
    walk: WalkFn | None = None
    restore: RestoreFn | None = None
    timeout_grace_s: float = 0.0
    schema: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.piece is None) == (self.walk is None):
            raise ValueError(f"step type {self.type!r} needs exactly one of piece or walk")


class Registry:
    """Step specs by type name, in registration order (the order error messages list)."""

    def __init__(self, specs: Sequence[StepSpec] = ()) -> None:
        self._specs: dict[str, StepSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: StepSpec) -> StepSpec:
        """Add ``spec``; a type name may be registered once."""
        if spec.type in self._specs:
            raise ValueError(f"step type {spec.type!r} is already registered")
        self._specs[spec.type] = spec
        return spec

    def get(self, typ: Any) -> StepSpec | None:
        """The spec of ``typ``, or ``None`` (also for non-text values from a document)."""
        return self._specs.get(typ) if isinstance(typ, str) else None

    def __getitem__(self, typ: str) -> StepSpec:
        return self._specs[typ]

    def __iter__(self) -> Iterator[StepSpec]:
        return iter(self._specs.values())

    def names(self) -> tuple[str, ...]:
        """Registered type names, in registration order."""
        return tuple(self._specs)

    def arm_keys(self) -> dict[str, bool]:
        """Every child-list key any type uses → whether it is a loop body."""
        return {arm.key: arm.iterates for spec in self for arm in spec.arms}

    def template_keys(self) -> tuple[str, ...]:
        """Every key any type holds templates in (checked on every step, known type or not)."""
        return tuple(dict.fromkeys(k for spec in self for k in spec.template_keys))


#: The process-wide registry; :mod:`conveyor.engine.pieces` fills it on import.
REGISTRY: Final = Registry()


def is_number(v: Any) -> bool:
    """True for ints and floats, not bools."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_template(v: Any) -> bool:
    """True for text holding a ``{{ … }}`` template."""
    return isinstance(v, str) and "{{" in v


def now() -> datetime:
    """The current UTC time (step records' clock)."""
    return datetime.now(UTC)
