"""The flow model: parse a flow document, validate it completely, compile it once.

:func:`parse_flow` turns a JSON/YAML document (docs/flows.md) into a frozen :class:`Flow` whose
steps carry their templates and branch conditions pre-compiled, so the executor never parses
or validates anything per run — callers cache one ``Flow`` per flow version. Validation
collects *every* problem with its path (``steps[3].then[0].input.url``) before raising one
:class:`~conveyor.engine.errors.FlowInvalid`; the checks for references between steps live in
:mod:`conveyor.engine.references`.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import yaml
from croniter import croniter

from conveyor.engine import pieces  # registers the built-in step types
from conveyor.engine.conditions import Condition
from conveyor.engine.errors import ErrorDetail, FlowInvalid
from conveyor.engine.references import check_references
from conveyor.engine.spec import REGISTRY, Registry, StepSpec, is_number
from conveyor.engine.templating import (
    RESERVED_ROOTS,
    Renderer,
    TemplateSyntaxError,
    compile_value,
    iter_refs,
    walk_strings,
)

#: The registered step type names, in the order error messages list them.
STEP_TYPES: Final = pieces.REGISTRY.names()
TRIGGER_TYPES: Final = ("webhook", "schedule", "manual")
NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_FLOW_NAME: Final = 200
MAX_RETRY_ATTEMPTS: Final = 10
MAX_BACKOFF_S: Final = 300.0
MAX_STEP_TIMEOUT_S: Final = 86_400.0
#: Keys the API adds to a flow it returns; accepted and ignored so GET → edit → PUT works.
SERVER_FIELDS: Final = frozenset(
    {"id", "version", "enabled", "webhook_url", "sync_webhook_url", "created_at", "updated_at"}
)
_COMMON_KEYS: Final = frozenset({"name", "type", "retry", "continue_on_failure", "timeout_s"})


@dataclass(frozen=True, slots=True)
class Retry:
    """Per-step retry: ``attempts`` tries in total (1–10); waits ``backoff_s`` × 2ⁿ between."""

    attempts: int = 1
    backoff_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Trigger:
    """What starts a run: ``webhook`` (optional HMAC ``secret``), ``schedule``, ``manual``.

    ``secret`` is the raw text, usually ``{{secrets.NAME}}``; :attr:`secret_name` extracts
    NAME so ingest can look the value up. ``timezone`` defaults to UTC for schedules.
    """

    type: str
    secret: str | None = None
    cron: str | None = None
    timezone: str | None = None

    @property
    def secret_name(self) -> str | None:
        """NAME when ``secret`` is ``{{secrets.NAME}}``, else ``None``."""
        if self.secret is None or "{{" not in self.secret:
            return None
        ref = next(iter_refs(self.secret))
        return str(ref.segments[0]) if ref.segments else None

    def to_document(self) -> dict[str, Any]:
        """The trigger as it appears in a flow document."""
        doc: dict[str, Any] = {"type": self.type}
        if self.secret is not None:
            doc["secret"] = self.secret
        if self.cron is not None:
            doc["cron"] = self.cron
        if self.timezone is not None:
            doc["timezone"] = self.timezone
        return doc


@dataclass(frozen=True, slots=True, eq=False)
class Step:
    """One validated, compiled step. ``raw`` is the document it came from (for round trips);
    ``spec`` is its type's :class:`~conveyor.engine.spec.StepSpec`.

    Compiled members: ``input_r`` (input renderer), ``when_c`` (branch condition),
    ``items_r`` (loop items renderer); nested steps in ``then``/``else_``/``steps`` (the
    spec's arms say which).
    """

    name: str
    type: str
    raw: Mapping[str, Any] = field(repr=False)
    input_r: Renderer = field(repr=False)
    spec: StepSpec = field(repr=False)
    code: str | None = None
    when_c: Condition | None = field(default=None, repr=False)
    then: tuple[Step, ...] = ()
    else_: tuple[Step, ...] = ()
    items_r: Renderer | None = field(default=None, repr=False)
    steps: tuple[Step, ...] = ()
    retry: Retry = Retry()
    continue_on_failure: bool = False
    timeout_s: float | None = None
    #: For loops: names whose outputs make up one iteration's ``{inner_step: output}``
    #: (direct children and steps in their branch arms; nested loops' insides excluded).
    iteration_names: tuple[str, ...] = ()
    #: Whatever else a step type's compile hook keeps (for types the fields above do not fit).
    compiled: Any = field(default=None, repr=False)

    def to_document(self) -> dict[str, Any]:
        """The step as a JSON-ready mapping (nested steps included)."""
        doc: dict[str, Any] = dict(self.raw)
        for arm in self.spec.arms:
            doc[arm.key] = [s.to_document() for s in getattr(self, arm.attr)]
        # A deep copy: compiled constants share objects with the stored document.
        copy: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return copy


@dataclass(frozen=True, slots=True, eq=False)
class Flow:
    """A validated flow. ``secret_names`` lists every ``{{secrets.NAME}}`` it uses, so the
    worker loads (and redacts) only those; ``step_names`` covers nested steps too."""

    name: str
    trigger: Trigger
    steps: tuple[Step, ...]
    description: str | None = None
    secret_names: frozenset[str] = frozenset()
    step_names: frozenset[str] = frozenset()

    def to_document(self) -> dict[str, Any]:
        """Serialise back to a flow document that :func:`parse_flow` accepts unchanged."""
        doc: dict[str, Any] = {"name": self.name, "trigger": self.trigger.to_document()}
        if self.description is not None:
            doc["description"] = self.description
        doc["steps"] = [s.to_document() for s in self.steps]
        # A deep copy: compiled constants share objects with the stored document.
        copy: dict[str, Any] = orjson.loads(orjson.dumps(doc))
        return copy


#: Flow documents nest a few levels per branch or loop; deeper is a parser bomb, not a flow.
MAX_DOCUMENT_DEPTH: Final = 64


class _FlowYamlLoader(yaml.SafeLoader):
    """YAML without anchors/aliases (a few hundred bytes of nested aliases expand to
    gigabytes: "billion laughs") and with bounded nesting (no ``RecursionError``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event: Any = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.YAMLError(
                f"aliases (*{event.anchor}) are not supported in flow documents"
                f" (line {event.start_mark.line + 1}); repeat the value instead"
            )
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if getattr(event, "anchor", None):
            raise yaml.YAMLError(
                f"anchors (&{event.anchor}) are not supported in flow documents"
                f" (line {event.start_mark.line + 1})"
            )
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DOCUMENT_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DOCUMENT_DEPTH} levels")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth


def load_document(text: str | bytes, content_type: str | None = None) -> Any:
    """Decode a flow document from JSON or YAML text.

    JSON is tried first unless ``content_type`` names YAML (JSON is valid YAML, but orjson is
    much faster). YAML anchors and aliases are refused and nesting is capped at
    :data:`MAX_DOCUMENT_DEPTH`. Raises :class:`FlowInvalid` with path ``""`` when it does not
    decode.
    """
    is_yaml = content_type is not None and "yaml" in content_type.lower()
    if not is_yaml:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if content_type is not None and "json" in content_type.lower():
                raise FlowInvalid([{"path": "", "message": f"invalid JSON: {exc}"}]) from None
    try:
        return yaml.load(text, Loader=_FlowYamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise FlowInvalid([{"path": "", "message": f"invalid YAML: {exc}"}]) from None
    except (RecursionError, ValueError, OverflowError) as exc:
        raise FlowInvalid(
            [{"path": "", "message": f"invalid YAML: {type(exc).__name__}"}]
        ) from None


def _nul_paths(value: Any, path: str) -> list[str]:
    """Paths of every key or string in ``value`` that contains ``\\x00``."""
    found: list[str] = []
    if isinstance(value, str):
        if "\x00" in value:
            found.append(path)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if "\x00" in str(k):
                found.append(sub.replace("\x00", "\\0"))
            found += _nul_paths(v, sub.replace("\x00", "\\0"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _nul_paths(v, f"{path}[{i}]")
    return found


def _depth_ok(value: Any, limit: int) -> bool:
    """True when ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, Mapping | list | tuple))
    return True


def parse_flow(document: Any, *, registry: Registry = REGISTRY) -> Flow:
    """Validate ``document`` (a mapping, or JSON/YAML text) and return the compiled flow.

    Raises :class:`FlowInvalid` listing every problem with its path. ``registry`` holds the
    step types the document may use (the built-in ones by default).
    """
    if isinstance(document, str | bytes):
        document = load_document(document)
    if not _depth_ok(document, MAX_DOCUMENT_DEPTH):
        raise FlowInvalid(
            [{"path": "", "message": f"nested deeper than {MAX_DOCUMENT_DEPTH} levels"}]
        )
    # One JSON round trip: a deep copy the caller cannot mutate afterwards, YAML-only types
    # (dates, int keys) normalised to what the document looks like once stored as JSON.
    try:
        encoded = orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
        document = orjson.loads(encoded)
    except (TypeError, RecursionError) as exc:
        raise FlowInvalid([{"path": "", "message": f"not representable as JSON: {exc}"}]) from None
    if b"\\u0000" in encoded:
        # PostgreSQL cannot store NUL in text or jsonb; say where it is instead of failing later.
        raise FlowInvalid(
            [{"path": p, "message": "contains a NUL character"} for p in _nul_paths(document, "")]
        )
    v = _Validator(registry)
    v.check_document(document)
    errors = v.errors
    secret_names: set[str] = set()
    if isinstance(document, Mapping):
        ref_errors, secret_names = check_references(document, registry)
        errors = errors + ref_errors
    if errors:
        raise FlowInvalid(errors)
    steps = tuple(_build_step(s, registry) for s in document["steps"])
    trig = document["trigger"]
    trigger = Trigger(
        type=trig["type"],
        secret=trig.get("secret"),
        cron=trig.get("cron"),
        timezone=trig.get("timezone", "UTC" if trig["type"] == "schedule" else None),
    )
    return Flow(
        name=document["name"],
        trigger=trigger,
        steps=steps,
        description=document.get("description"),
        secret_names=frozenset(secret_names),
        step_names=frozenset(v.names),
    )


def _build_step(raw: Mapping[str, Any], registry: Registry) -> Step:
    retry_doc = raw.get("retry") or {}
    retry = Retry(
        attempts=int(retry_doc.get("attempts", 1)), backoff_s=float(retry_doc.get("backoff_s", 0))
    )
    spec = registry[raw["type"]]
    children = {
        arm.attr: tuple(_build_step(s, registry) for s in raw.get(arm.key) or ())
        for arm in spec.arms
    }
    # The arms' lists and what the type compiles become Step fields of the same names.
    fields: dict[str, Any] = dict(children)
    if spec.compile is not None:
        fields.update(spec.compile(raw, children))
    timeout = raw.get("timeout_s")
    return Step(
        name=raw["name"],
        type=raw["type"],
        raw=raw,
        input_r=compile_value(raw.get("input", {})),
        spec=spec,
        retry=retry,
        continue_on_failure=bool(raw.get("continue_on_failure", False)),
        timeout_s=float(timeout) if timeout is not None else None,
        **fields,
    )


class _Validator:
    """Structural checks; collects errors instead of stopping at the first one."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.errors: list[ErrorDetail] = []
        self.names: dict[str, str] = {}

    def err(self, path: str, message: str) -> None:
        self.errors.append({"path": path, "message": message})

    def check_document(self, doc: Any) -> None:
        if not isinstance(doc, Mapping):
            self.err("", "a flow document must be an object")
            return
        for key in doc:
            if key not in {"name", "trigger", "steps", "description"} | SERVER_FIELDS:
                self.err(str(key), "unknown key")
        name = doc.get("name")
        if not isinstance(name, str) or not name.strip():
            self.err("name", "is required (text, 1–200 characters)")
        elif len(name) > MAX_FLOW_NAME:
            self.err("name", f"is longer than {MAX_FLOW_NAME} characters")
        elif any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
            self.err("name", "may not contain control characters (NUL, newline …)")
        desc = doc.get("description")
        if desc is not None and not isinstance(desc, str):
            self.err("description", "must be text")
        self.check_trigger(doc.get("trigger"))
        steps = doc.get("steps")
        if not isinstance(steps, list):
            self.err("steps", "is required (a list of steps)")
        else:
            self.check_steps(steps, "steps")

    def check_trigger(self, trig: Any) -> None:
        if not isinstance(trig, Mapping):
            self.err("trigger", "is required: {type: webhook|schedule|manual}")
            return
        typ = trig.get("type")
        if typ not in TRIGGER_TYPES:
            self.err(
                "trigger.type",
                f"unknown trigger type {typ!r}; expected webhook, schedule or manual",
            )
            return
        allowed = {"webhook": {"type", "secret"}, "schedule": {"type", "cron", "timezone"}}
        for key in trig:
            if key not in allowed.get(typ, {"type"}):
                self.err(f"trigger.{key}", f"unknown key for a {typ} trigger")
        if typ == "webhook" and "secret" in trig:
            self.check_trigger_secret(trig["secret"])
        if typ == "schedule":
            self.check_schedule(trig)

    def check_schedule(self, trig: Mapping[str, Any]) -> None:
        cron = trig.get("cron")
        if not isinstance(cron, str) or not cron.strip():
            self.err("trigger.cron", "is required for a schedule trigger")
        elif not croniter.is_valid(cron):
            self.err("trigger.cron", f"invalid cron expression {cron!r}")
        tz = trig.get("timezone", "UTC")
        try:
            if not isinstance(tz, str):
                raise ValueError
            zoneinfo.ZoneInfo(tz)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            self.err("trigger.timezone", f"unknown time zone {tz!r}")

    def check_trigger_secret(self, secret: Any) -> None:
        if not isinstance(secret, str) or not secret:
            self.err("trigger.secret", "must be a secret reference {{secrets.NAME}}")
            return
        if "{{" not in secret:
            # A literal would sit in the flow document in plain text, shown to anyone who
            # can read flows; a reference keeps the value encrypted at rest.
            self.err(
                "trigger.secret",
                "must be a secret reference {{secrets.NAME}} (store the value with "
                "PUT /api/v1/secrets/NAME); literal secrets are not accepted",
            )
            return
        try:
            refs = list(iter_refs(secret))
        except TemplateSyntaxError as exc:
            self.err("trigger.secret", str(exc))
            return
        if (
            len(refs) != 1
            or refs[0].root != "secrets"
            or len(refs[0].segments) != 1
            or secret.strip() != refs[0].text
        ):
            self.err("trigger.secret", "may only be {{secrets.NAME}}")

    def check_steps(self, steps: Any, path: str) -> None:
        if not isinstance(steps, list):
            self.err(path, "must be a list of steps")
            return
        for i, step in enumerate(steps):
            self.check_step(step, f"{path}[{i}]")

    def check_step(self, step: Any, p: str) -> None:
        if not isinstance(step, Mapping):
            self.err(p, "a step must be an object")
            return
        self.check_name(step.get("name"), p)
        typ = step.get("type")
        spec = self.registry.get(typ)
        if spec is None:
            known = ", ".join(self.registry.names())
            self.err(f"{p}.type", f"unknown step type {typ!r}; expected one of {known}")
            return
        allowed = _COMMON_KEYS | spec.keys
        for key in step:
            if key not in allowed:
                self.err(f"{p}.{key}", f"unknown key for a {typ} step")
        self.check_common(step, p)
        self.check_input(spec, step, p)
        if spec.check is not None:
            spec.check(self, step, p)
        for arm in spec.arms:
            if arm.key in step:
                self.check_steps(step[arm.key], f"{p}.{arm.key}")
            elif arm.required:
                self.err(f"{p}.{arm.key}", f"is required for a {typ} step")

    def check_name(self, name: Any, p: str) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            self.err(f"{p}.name", "is required and must match [A-Za-z_][A-Za-z0-9_]*")
        elif name in RESERVED_ROOTS:
            self.err(f"{p}.name", f'"{name}" is reserved (trigger, loop, run, secrets)')
        elif name in self.names:
            self.err(
                f"{p}.name", f'duplicate step name "{name}" (first used at {self.names[name]})'
            )
        else:
            self.names[name] = p

    def check_input(self, spec: StepSpec, step: Mapping[str, Any], p: str) -> None:
        if "input" in step and not isinstance(step["input"], Mapping):
            self.err(f"{p}.input", "must be an object")
        elif spec.input_keys is not None:
            inp = step.get("input") or {}
            for key in inp:
                if key not in spec.input_keys:
                    self.err(f"{p}.input.{key}", f"unknown input for a {spec.type} step")
            if spec.check_input is not None:
                spec.check_input(self, inp, f"{p}.input")
        self.check_syntax(step.get("input"), f"{p}.input")

    def check_common(self, step: Mapping[str, Any], p: str) -> None:
        retry = step.get("retry")
        if retry is not None:
            if not isinstance(retry, Mapping):
                self.err(f"{p}.retry", "must be {attempts, backoff_s}")
            else:
                for key in retry:
                    if key not in ("attempts", "backoff_s"):
                        self.err(f"{p}.retry.{key}", "unknown key")
                att = retry.get("attempts", 1)
                if (
                    not isinstance(att, int)
                    or isinstance(att, bool)
                    or not 1 <= att <= MAX_RETRY_ATTEMPTS
                ):
                    self.err(f"{p}.retry.attempts", f"must be an integer 1–{MAX_RETRY_ATTEMPTS}")
                back = retry.get("backoff_s", 0)
                if not is_number(back) or not 0 <= back <= MAX_BACKOFF_S:
                    self.err(f"{p}.retry.backoff_s", f"must be a number 0–{MAX_BACKOFF_S:g}")
        cof = step.get("continue_on_failure", False)
        if not isinstance(cof, bool):
            self.err(f"{p}.continue_on_failure", "must be true or false")
        t = step.get("timeout_s")
        if t is not None and (not is_number(t) or not 0 < t <= MAX_STEP_TIMEOUT_S):
            self.err(
                f"{p}.timeout_s", f"must be a number of seconds, 0 < t ≤ {MAX_STEP_TIMEOUT_S:g}"
            )

    def check_syntax(self, value: Any, path: str) -> None:
        for p, text in walk_strings(value, path):
            if "{{" not in text:
                continue
            try:
                for _ in iter_refs(text):
                    pass
            except TemplateSyntaxError as exc:
                self.err(p, str(exc))
