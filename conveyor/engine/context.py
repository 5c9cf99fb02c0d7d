"""The executor's boundary: what a run needs in, what it hands out, and the injected parts.

The worker builds one :class:`Services` per process (checkpoint sink, sandbox, HTTP session,
limits) and one :class:`RunContext` per run; the executor returns a :class:`RunOutcome` and
streams :class:`~conveyor.records.StepRecord` checkpoints to the sink as steps finish. The
sink and sandbox are Protocols so Postgres batching and the isolated sandbox live outside the
engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar

from conveyor.records import StepRecord
from conveyor.status import RunStatus

__all__ = [
    "CheckpointSink",
    "RespondCallback",
    "RunContext",
    "RunEnv",
    "RunError",
    "RunOutcome",
    "Sandbox",
    "SandboxResultLike",
    "Services",
    "StepRecord",  # defined in conveyor.records, re-exported for the engine's callers
    "slot_maker",
    "step_record",
]

if TYPE_CHECKING:
    import aiohttp

    from conveyor.engine.ssrf import SsrfPolicy


class RunError(TypedDict):
    """Why a run did not succeed: the failing step (``None`` for run-level) and a message."""

    step: str | None
    message: str


class CheckpointSink(Protocol):
    """Receives every step record as the step finishes (the worker batches them to Postgres).

    ``step_finished`` may return before the write commits: a step whose checkpoint is lost
    is simply run again on redelivery, which is why http steps send an Idempotency-Key.
    A sink may also define ``async def before_step(run_id, step_type)``, awaited before each
    step starts (the worker's sink makes held checkpoints durable there), and
    ``def code_started()``, called when a code step's code starts in the sandbox. Where a
    sink defines ``def checkpoint(run_id, record)`` / ``def pre_step(run_id, step_type)``
    (their effect as ``step_finished`` / ``before_step``, returning what to await or ``None``
    when nothing is), the executor calls those instead: no coroutine per step for a record a
    sink only holds.
    """

    async def step_finished(self, run_id: str, record: StepRecord) -> None:
        """Persist ``record`` for run ``run_id``."""
        ...


class SandboxResultLike(Protocol):
    """The shape of ``conveyor.sandbox.outcome.SandboxResult`` as the engine reads it.

    ``status``: ``SUCCEEDED`` (``ok`` accepted), ``FAILED``, ``TIMEOUT`` or
    ``MEMORY_LIMIT_EXCEEDED``; ``output``: what ``run()`` returned; ``error``: text (or
    ``{type, message}``); ``logs``: captured stdout/stderr.
    """

    @property
    def status(self) -> str: ...
    @property
    def output(self) -> Any: ...
    @property
    def error(self) -> Any: ...
    @property
    def logs(self) -> str: ...
    @property
    def duration_ms(self) -> float: ...


class Sandbox(Protocol):
    """Runs a code step's ``run(input)`` somewhere isolated (the sandbox)."""

    async def run_code(
        self,
        *,
        flow_id: str,
        flow_version: int,
        step: str,
        code: str,
        input: Any,
        timeout_s: float,
        run_id: str | None = None,
        on_started: Callable[[], object] | None = None,
    ) -> SandboxResultLike:
        """Execute ``code``'s ``run(input)``; never raises for user errors. ``on_started()``
        (passed only when set) is called once the code is handed to its process."""
        ...


#: ``on_respond(status, headers, body)``: hands a respond step's reply to a waiting caller.
RespondCallback = Callable[[int, Mapping[str, str], Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunContext:
    """Everything about one run the executor needs.

    ``trigger`` is ``{method, headers, query, body}``; ``secrets`` maps NAME → plain value
    (only the names in ``Flow.secret_names`` are read); ``checkpoints`` are the step records
    already stored for this run (empty on first delivery) — completed steps are skipped and
    their outputs restored, a ``PAUSED`` delay record resumes the run after the delay.
    """

    run_id: str
    flow_id: str
    flow_version: int
    trigger: Mapping[str, Any]
    secrets: Mapping[str, str] = field(default_factory=dict)
    checkpoints: Sequence[StepRecord] = ()
    #: Wall-time budget for this call; ``None`` uses ``Services.flow_timeout_s``. A resumed
    #: or redelivered run may pass what is left of AP_FLOW_TIMEOUT_SECONDS.
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        # Checkpoints may arrive in their JSON shape (a test, an embedding caller): the
        # executor reads typed records only.
        checkpoints = self.checkpoints
        if checkpoints and any(type(r) is not StepRecord for r in checkpoints):
            object.__setattr__(
                self, "checkpoints", tuple(StepRecord.of(r) for r in self.checkpoints)
            )


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a run ended (or paused): ``output`` is the last finished step's output (redacted);
    ``resume_at`` is set only for ``PAUSED``."""

    status: RunStatus
    output: Any = None
    error: RunError | None = None
    resume_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Services:
    """Long-lived dependencies shared by all runs of one worker process.

    Parameters: ``sink`` (checkpoint sink); ``sandbox`` for code steps (``None`` → code steps
    fail); ``http`` an aiohttp session from :func:`conveyor.engine.ssrf.create_http_session`
    (``None`` → http steps fail); ``ssrf`` the policy also applied to redirect hops;
    ``flow_timeout_s`` wall time per executor call (AP_FLOW_TIMEOUT_SECONDS, default 600);
    ``max_log_bytes`` cap on all step logs of a run (AP_MAX_FLOW_RUN_LOG_SIZE_MB, 50 MB);
    ``code_timeout_s`` default for code steps without ``timeout_s`` (30 s);
    ``pause_threshold_s`` delays this long or longer pause the run (5 s).
    """

    sink: CheckpointSink
    sandbox: Sandbox | None = None
    http: aiohttp.ClientSession | None = None
    ssrf: SsrfPolicy | None = None
    flow_timeout_s: float = 600.0
    max_log_bytes: int = 50 * 1024 * 1024
    code_timeout_s: float = 30.0
    pause_threshold_s: float = 5.0
    max_loop_iterations: int = 10_000


@dataclass(frozen=True, slots=True)
class RunEnv:
    """What a piece sees of its run: the worker's services, the run context, the respond
    callback (``None`` for async runs, whose caller is not waiting), and the sink's
    ``code_started`` (``None`` if it has none), which a code step passes to the sandbox as
    ``on_started``."""

    services: Services
    ctx: RunContext
    on_respond: RespondCallback | None = None
    on_code_start: Callable[[], object] | None = None


_T = TypeVar("_T")
_UNSET: Any = object()


def slot_maker(cls: type[_T], *, post_init: bool = True) -> Callable[..., _T]:
    """A constructor for the slotted dataclass ``cls`` taking every field positionally
    (those with defaults optional), built like the dataclass's own ``__init__`` but setting
    each slot through its descriptor: no keyword parsing and no ``object.__setattr__``
    lookup per field (a 13-field :class:`StepRecord`: ~4.4 → ~1.5 µs by keywords).

    A class with a ``__post_init__`` gets ``cls`` itself back, unless ``post_init=False``
    says the caller only passes values its ``__post_init__`` leaves as they are (it is then
    not called). Classes with keyword-only or ``init=False`` fields get ``cls``."""
    params = fields(cls)  # type: ignore[arg-type]
    if (
        (post_init and hasattr(cls, "__post_init__"))
        or "__slots__" not in cls.__dict__
        or any(not f.init or f.kw_only for f in params)
    ):
        return cls
    env: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_unset": _UNSET}
    args, body = [], []
    for i, f in enumerate(params):
        env[f"_s{i}"] = cls.__dict__[f.name].__set__
        if f.default_factory is not MISSING:
            env[f"_f{i}"] = f.default_factory
            args.append(f"{f.name}=_unset")
            body.append(f"    if {f.name} is _unset: {f.name} = _f{i}()")
        elif f.default is not MISSING:
            env[f"_d{i}"] = f.default
            args.append(f"{f.name}=_d{i}")
        else:
            args.append(f.name)
        body.append(f"    _s{i}(self, {f.name})")
    source = "\n".join(
        [f"def make({', '.join(args)}):", "    self = _new(_cls)", *body, "    return self"]
    )
    exec(source, env)  # generated from the class's own field names
    make: Callable[..., _T] = env["make"]
    make.__qualname__ = make.__name__ = f"make_{cls.__name__}"
    return make


#: ``StepRecord(name, type, status, input, output, error, logs, started_at, duration_ms,
#: attempt, parent, iteration)`` positionally, built without its ``__init__`` (the executor
#: makes one per step).
step_record: Callable[..., StepRecord] = slot_maker(StepRecord)
